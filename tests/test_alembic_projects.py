"""The ops in projects made by ``alembic init``, run by the ``alembic`` command as a team would: the default env.py
(every pending revision in one transaction), the async template on asyncpg, psycopg2, a tenant search_path set in
env.py, and a role whose default statement_timeout is short. Each project's env.py is the template's own, with only
the URL (and, for the tenant, the cookbook's search_path lines) changed."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic.operations import MigrateOperation, Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import make_url
from support import wait_for

import backfill
import backfill.alembic
from backfill.alembic import MigrationContextError, ops
from backfill.alembic.toimpl import _sql_text

#: (alembic init template, SQLAlchemy driver): the sync default on psycopg 3 and psycopg2, the async one on asyncpg.
DRIVERS = [("generic", "psycopg"), ("generic", "psycopg2"), ("async", "asyncpg")]


def init_project(
    tmp_path: Path, url: str, driver: str, template: str = "generic", revisions: Sequence[str] = ()
) -> Path:
    """``alembic init -t TEMPLATE migrations`` in a fresh directory, with ``sqlalchemy.url`` set to ``url`` on
    ``driver`` (the only edit), and ``revisions`` (upgrade() bodies) as ``r1``, ``r2``, ..."""
    root = tmp_path / "app"
    root.mkdir()
    subprocess.run(  # noqa: S603
        [sys.executable, "-m", "alembic", "init", "-t", template, "migrations"],
        cwd=root,
        check=True,
        capture_output=True,
    )
    ini = root / "alembic.ini"
    sa_url = make_url(url).set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)
    ini.write_text(re.sub(r"^sqlalchemy\.url = .*$", f"sqlalchemy.url = {sa_url}", ini.read_text(), flags=re.M))
    for number, body in enumerate(revisions, start=1):
        write_revision(root, number, body)
    return root


def write_revision(project: Path, number: int, body: str) -> None:
    """Revision ``r<number>`` (after ``r<number - 1>``) whose upgrade() is ``body``."""
    down = f"'r{number - 1}'" if number > 1 else "None"
    upgrade = textwrap.indent(textwrap.dedent(body).strip(), "    ")
    source = (
        "import sqlalchemy as sa\nfrom alembic import op\n\n"
        f"revision = 'r{number}'\ndown_revision = {down}\nbranch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade() -> None:\n{upgrade}\n\n\ndef downgrade() -> None:\n    pass\n"
    )
    (project / "migrations" / "versions" / f"r{number}.py").write_text(source)


def alembic(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "alembic", *args], cwd=project, capture_output=True, text=True, timeout=240
    )


def upgrade_head(project: Path) -> None:
    done = alembic(project, "upgrade", "head")
    assert done.returncode == 0, done.stderr


def scalar(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def version(conn: psycopg.Connection[Any]) -> str:
    return str(scalar(conn, "SELECT version_num FROM alembic_version"))


def not_null(conn: psycopg.Connection[Any], table: str, column: str) -> bool:
    return bool(
        scalar(
            conn,
            f"SELECT attnotnull FROM pg_attribute WHERE attrelid = '{table}'::regclass AND attname = '{column}'",
        )
    )


ITEMS = (
    'op.execute("CREATE TABLE items (id integer PRIMARY KEY)")\n'
    'op.execute("INSERT INTO items SELECT g FROM generate_series(1, 1000) g")'
)


# --- every op on every driver --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("template", "driver"), DRIVERS, ids=[d for _, d in DRIVERS])
def test_every_op_runs_on_the_migration_connection_of_each_driver(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str, template: str, driver: str
) -> None:
    revisions = [
        ITEMS,
        """
        op.add_column("items", sa.Column("kind", sa.Text))
        op.backfill("items_kind", "items", {"kind": sa.literal("100% done")}, where=sa.column("id") % 7 == 0,
                    defer=True)
        """,
        """
        op.ensure_backfill_finished("items_kind")
        op.backfill("items_rest", "items", {"kind": "'rest'"}, where="kind IS NULL")
        op.add_not_null_constraint("items", "kind", validate=False)
        op.validate_not_null_constraint("items", "kind")
        """,
        """
        op.drop_not_null_constraint("items", "kind")
        op.add_not_null_constraint("items", "kind")
        """,
    ]
    project = init_project(tmp_path, db_url, driver, template, revisions)

    upgrade_head(project)

    assert version(conn) == "r4"
    assert dict(conn.execute("SELECT kind, count(*) FROM items GROUP BY kind").fetchall()) == {
        "100% done": 142,
        "rest": 858,
    }
    assert not_null(conn, "items", "kind")


def test_sqlalchemy_expressions_compile_to_what_the_user_wrote() -> None:
    """No ``%%``: the expression text is run as it is, never through a driver's ``%`` formatting."""
    assert _sql_text(sa.literal("100% done")) == "'100% done'"
    assert _sql_text(sa.column("id") % 7 == 0) == "id % 7 = 0"
    assert _sql_text(sa.column("name").like("a%")) == "name LIKE 'a%'"


# --- the default env.py: every pending revision in one transaction -------------------------------------------------


@pytest.mark.parametrize(
    "failing",
    ['op.ensure_backfill_finished("items_kind", finish=False)', 'op.execute("SELECT 1 / 0")'],
    ids=["ensure_finish_false", "sql_error"],
)
@pytest.mark.parametrize(("template", "driver"), [DRIVERS[0], DRIVERS[2]], ids=["sync", "async"])
def test_default_env_py_a_later_revision_fails_then_fixing_it_and_upgrading_again_succeeds(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str, template: str, driver: str, failing: str
) -> None:
    """A revision that commits part of its work (op.backfill) keeps its version stamp with that work: a failure in
    a later revision rolls back only that revision, and the fixed upgrade starts from there (no DuplicateColumn,
    no ``alembic stamp`` by hand)."""
    revisions = [
        ITEMS,
        """
        op.add_column("items", sa.Column("kind", sa.Text))
        op.backfill("items_kind", "items", {"kind": "'k' || id"}, defer=True)
        """,
        f'op.add_column("items", sa.Column("extra", sa.Text))\n{failing}',
    ]
    project = init_project(tmp_path, db_url, driver, template, revisions)

    failed = alembic(project, "upgrade", "head")

    assert failed.returncode != 0
    assert version(conn) == "r2"
    extra = "SELECT count(*) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'extra'"
    assert scalar(conn, extra) == 0

    write_revision(
        project,
        3,
        """
        op.add_column("items", sa.Column("extra", sa.Text))
        op.ensure_backfill_finished("items_kind")
        op.add_not_null_constraint("items", "kind")
        """,
    )
    upgrade_head(project)

    assert version(conn) == "r3"
    assert scalar(conn, "SELECT count(*) FROM items WHERE kind = 'k' || id") == 1000
    assert not_null(conn, "items", "kind")


def test_an_env_py_without_begin_transaction_is_refused_at_the_first_op(
    conn: psycopg.Connection[Any], engine: sa.Engine
) -> None:
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    with engine.connect() as connection:
        op = Operations(MigrationContext.configure(connection))
        connection.exec_driver_sql("SELECT 1")  # what Alembic itself runs first: the connection autobegins

        with pytest.raises(MigrationContextError, match=r"outside context\.begin_transaction\(\)"):
            op.backfill("items_n", "items", {"n": "n + 1"})

    assert scalar(conn, "SELECT to_regclass('backfills') IS NULL")


# --- names mean what the migration's connection makes of them -----------------------------------------------------

TENANT_ENV = """
    with connectable.connect() as connection:
        connection.execute(sa.text("SET search_path TO tenant_a"))
        connection.commit()
"""


def test_a_tenant_search_path_set_in_env_py_decides_which_table_every_op_changes(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str
) -> None:
    project = init_project(tmp_path, db_url, "psycopg")
    env = project / "migrations" / "env.py"
    source = env.read_text().replace("    with connectable.connect() as connection:\n", TENANT_ENV.lstrip("\n"))
    env.write_text("import sqlalchemy as sa\n" + source)
    conn.execute("CREATE SCHEMA tenant_a")
    conn.execute("CREATE TABLE public.events (id integer PRIMARY KEY, kind text)")
    conn.execute("INSERT INTO public.events SELECT g, 'public' FROM generate_series(1, 500) g")
    conn.execute("CREATE TABLE tenant_a.events (id integer PRIMARY KEY)")
    conn.execute("INSERT INTO tenant_a.events SELECT g FROM generate_series(1, 700) g")
    write_revision(
        project,
        1,
        """
        op.add_column("events", sa.Column("kind", sa.Text))
        op.backfill("events_kind", "events", {"kind": "'tenant'"})
        op.add_not_null_constraint("events", "kind")
        """,
    )

    upgrade_head(project)

    assert dict(conn.execute("SELECT kind, count(*) FROM tenant_a.events GROUP BY kind").fetchall()) == {"tenant": 700}
    assert dict(conn.execute("SELECT kind, count(*) FROM public.events GROUP BY kind").fetchall()) == {"public": 500}
    assert not_null(conn, "tenant_a.events", "kind")
    assert backfill.get_backfill(db_url, "events_kind").spec.schema == "tenant_a"


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(make_url(db_url).set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


def test_run_backfill_on_a_connection_resolves_the_table_with_that_connections_search_path(
    conn: psycopg.Connection[Any], db_url: str, engine: sa.Engine
) -> None:
    conn.execute("CREATE SCHEMA tenant_a")
    for schema in ("public", "tenant_a"):
        conn.execute(f"CREATE TABLE {schema}.items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
        conn.execute(f"INSERT INTO {schema}.items (id) SELECT g FROM generate_series(1, 300) g")
    spec = backfill.BackfillSpec(name="items_n", table="items", values={"n": "n + 1"})

    with engine.connect() as connection:
        connection.exec_driver_sql("SET search_path TO tenant_a")
        report = backfill.run_backfill(connection, spec)
        backfill.add_not_null_constraint(connection, "items", "n")  # already NOT NULL there: nothing to do

    assert report.outcome is backfill.RunOutcome.FINISHED
    assert scalar(conn, "SELECT sum(n) FROM tenant_a.items") == 300
    assert scalar(conn, "SELECT sum(n) FROM public.items") == 0
    assert backfill.get_backfill(db_url, "items_n").spec.schema == "tenant_a"


def test_a_temporary_table_is_refused_with_a_clear_message_and_nothing_written(
    conn: psycopg.Connection[Any], db_url: str, engine: sa.Engine
) -> None:
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    spec = backfill.BackfillSpec(name="items_n", table="items", values={"n": "n + 1"})

    with engine.connect() as connection:
        connection.exec_driver_sql("CREATE TEMP TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
        connection.exec_driver_sql("INSERT INTO items (id) SELECT g FROM generate_series(1, 10) g")
        with pytest.raises(backfill.PlanError) as caught:
            backfill.run_backfill(connection, spec)

    assert str(caught.value) == (
        "table items is a temporary table of this session: backfill works on connections of its own, which cannot "
        "see it; use a regular (or UNLOGGED) table"
    )
    assert scalar(conn, "SELECT to_regclass('backfills') IS NULL")


# --- a role whose default statement_timeout is short ----------------------------------------------------------------


@pytest.fixture
def app_role(conn: psycopg.Connection[Any]) -> Iterator[str]:
    """A login role whose default statement_timeout is 40 ms, allowed to create tables in public."""
    role = f"app_{conn.info.dbname}"
    conn.execute(f"CREATE ROLE {role} LOGIN")
    conn.execute(f"ALTER ROLE {role} SET statement_timeout = '40ms'")
    conn.execute(f"GRANT ALL ON SCHEMA public TO {role}")
    yield role
    conn.execute(f"DROP OWNED BY {role}")
    conn.execute(f"DROP ROLE {role}")


def test_validate_outlasts_a_short_role_statement_timeout(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str, app_role: str
) -> None:
    """``ALTER ROLE app SET statement_timeout = '40ms'``: the validating scan, kept waiting here by a session that
    holds SHARE UPDATE EXCLUSIVE on the table for ten times that, still finishes (it blocks no reader or writer)."""
    role = app_role
    app_url = make_url(db_url).set(username=role).render_as_string(hide_password=False)
    revisions = [
        ITEMS.replace("PRIMARY KEY)", "PRIMARY KEY, kind text DEFAULT 'k')"),
        'op.add_not_null_constraint("items", "kind", validate=False)',
        'op.validate_not_null_constraint("items", "kind")',
    ]
    project = init_project(tmp_path, app_url, "psycopg", revisions=revisions)
    done = alembic(project, "upgrade", "r2")
    assert done.returncode == 0, done.stderr

    holder = psycopg.connect(db_url)
    holder.execute("LOCK TABLE items IN SHARE UPDATE EXCLUSIVE MODE")
    upgrade = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    waited_long = (
        "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND wait_event_type = 'Lock' "
        "AND query LIKE '%%VALIDATE%%' AND now() - query_start > interval '400ms'"
    )

    def validate_waited_or_upgrade_ended() -> bool:
        row = conn.execute(waited_long, (role,)).fetchone()
        return upgrade.poll() is not None or bool(row and row[0])

    try:
        wait_for(validate_waited_or_upgrade_ended, "the VALIDATE to wait 10x the role's statement_timeout")
    finally:
        holder.commit()
        holder.close()
        _, stderr = upgrade.communicate(timeout=120)

    assert upgrade.returncode == 0, stderr
    assert version(conn) == "r3"
    assert not_null(conn, "items", "kind")


def test_validate_timeout_bounds_the_scan_and_its_failure_names_what_is_left(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    from test_alembic_ops import operations

    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, kind text DEFAULT 'k')")
    conn.execute("INSERT INTO items (id) SELECT g FROM generate_series(1, 100) g")
    with operations(db_url) as op:
        op.add_not_null_constraint("items", "kind", validate=False)
    holder = psycopg.connect(db_url)
    holder.execute("LOCK TABLE items IN SHARE UPDATE EXCLUSIVE MODE")
    try:
        with operations(db_url) as op, pytest.raises(backfill.BackfillError) as caught:
            op.validate_not_null_constraint("items", "kind", validate_timeout=0.2)
    finally:
        holder.commit()
        holder.close()

    assert str(caught.value) == (
        "validate step on public.items.kind failed: canceling statement due to statement timeout [SQLSTATE 57014] "
        "(the NOT VALID constraint from an earlier call stays (new rows are checked)); "
        "run it again: it continues from what the catalog shows"
    )
    with operations(db_url) as op:
        op.validate_not_null_constraint("items", "kind")
    assert not_null(conn, "items", "kind")


# --- one source for each op's arguments ----------------------------------------------------------------------------


def _shape(signature: inspect.Signature) -> tuple[list[tuple[str, Any]], dict[str, tuple[Any, Any]]]:
    parameters = [p for p in signature.parameters.values() if p.name != "operations"]
    positional = [(p.name, p.annotation) for p in parameters if p.kind is not p.KEYWORD_ONLY]
    keywords = {p.name: (p.default, p.annotation) for p in parameters if p.kind is p.KEYWORD_ONLY}
    return positional, keywords


#: Every op: its class in ops, and the name of its classmethod (``op.<name>``) and typed function.
OPS = [
    (op_class, name)
    for name in backfill.alembic.__all__
    if name != "setup" and name.islower()
    for op_class in vars(ops).values()
    if isinstance(op_class, type) and issubclass(op_class, MigrateOperation) and name in vars(op_class)
]


def test_every_typed_function_has_its_op() -> None:
    assert len(OPS) == len([n for n in backfill.alembic.__all__ if n != "setup" and n.islower()]) >= 5


@pytest.mark.parametrize(("op_class", "name"), OPS, ids=[name for _, name in OPS])
def test_op_classmethod_and_typed_function_take_exactly_the_ops_fields(op_class: type, name: str) -> None:
    fields = _shape(inspect.signature(op_class))

    assert _shape(inspect.signature(getattr(op_class, name))) == fields
    assert _shape(inspect.signature(getattr(backfill.alembic, name))) == fields


@pytest.mark.parametrize(("op_class", "name"), OPS, ids=[name for _, name in OPS])
def test_op_name_the_typed_function_and_the_class_show_one_docstring(op_class: type, name: str) -> None:
    doc = inspect.getdoc(op_class)

    assert doc is not None
    assert inspect.getdoc(getattr(Operations, name)) == doc
    assert (inspect.getdoc(getattr(backfill.alembic, name)) or "").endswith(doc)
    assert _shape(inspect.signature(getattr(Operations, name))) == (
        [("self", inspect.Parameter.empty), *_shape(inspect.signature(op_class))[0]],
        _shape(inspect.signature(op_class))[1],
    )


def test_reverse_keeps_the_lock_settings_and_names_what_the_op_added() -> None:
    add_not_null = ops.AddNotNullConstraintOp("s.t", "c", name="n", lock_timeout=3.0, lock_retry_seconds=9.0)
    add_key = ops.AddForeignKeyOp("s.t", ["a", "b"], "r", ["x", "y"], lock_timeout=1.5, schema="s")
    add_index = ops.AddIndexConcurrentlyOp("s.t", "a", unique=True)

    assert vars(add_not_null.reverse()) == vars(
        ops.DropNotNullConstraintOp("s.t", "c", name="n", lock_timeout=3.0, lock_retry_seconds=9.0)
    )
    assert vars(add_not_null.reverse().reverse()) == vars(add_not_null)
    assert vars(add_key.reverse()) == vars(ops.DropForeignKeyOp("s.t", "t_a_b_fkey", lock_timeout=1.5, schema="s"))
    assert vars(add_index.reverse()) == vars(ops.DropIndexConcurrentlyOp("t_a_idx", table="s.t"))
    assert vars(ops.BackfillOp("b", "t", {}, force=True, control_schema="c").reverse()) == vars(
        ops.DropBackfillOp("b", control_schema="c")
    )
