"""The op helpers under real Alembic against real PostgreSQL: the example project upgraded and downgraded, no
ACCESS EXCLUSIVE scan, writers never queued behind the migration for longer than the lock timeout, an upgrade killed
in the middle of a backfill finished by the next one with every row updated once, and each kind of bad input."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs
from support import kill_after_batches

import backfill
import backfill.alembic
from backfill.alembic import BackfillNotFinishedError, MigrationContextError
from backfill.schema.notnull import PG18, NullValuesError
from backfill.tools.appsim import AppSimulator

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "alembic"


# --- helpers -----------------------------------------------------------------------------------------------------


def alembic_config(url: str, project: Path = EXAMPLE, *x: str) -> Config:
    """A Config for ``project`` as the alembic command line would build it with ``-x url=... -x ...``."""
    return Config(
        str(project / "alembic.ini"),
        cmd_opts=argparse.Namespace(x=[f"url={url}", *x]),
        attributes={"skip_logging_config": True},
    )


def make_project(tmp_path: Path, *revisions: str | tuple[str, str]) -> Path:
    """A copy of the example's environment with its own revisions: each string is the body of an upgrade(), or a
    pair of the bodies of upgrade() and downgrade()."""
    project = tmp_path / "project"
    (project / "versions").mkdir(parents=True)
    for name in ("alembic.ini", "env.py", "script.py.mako"):
        shutil.copy(EXAMPLE / name, project / name)
    for number, bodies in enumerate(revisions, start=1):
        body, down_body = (bodies, "pass") if isinstance(bodies, str) else bodies
        down = f"{number - 1:04d}" if number > 1 else None
        upgrade = textwrap.indent(textwrap.dedent(body).strip(), "    ")
        downgrade = textwrap.indent(textwrap.dedent(down_body).strip(), "    ")
        source = "\n".join(
            [
                f'"""Revision {number}."""',
                "import sqlalchemy as sa",
                "from alembic import op",
                "",
                "import backfill",
                "",
                f"revision = '{number:04d}'",
                f"down_revision = {down!r}",
                "branch_labels = None",
                "depends_on = None",
                "",
                "",
                "def upgrade() -> None:",
                upgrade,
                "",
                "",
                "def downgrade() -> None:",
                downgrade,
                "",
            ]
        )
        (project / "versions" / f"{number:04d}_rev.py").write_text(source)
    return project


def at_first_revision(url: str, project: Path) -> Config:
    """The Config of ``project``, upgraded to its first revision (the tables the later ones change)."""
    config = alembic_config(url, project)
    command.upgrade(config, "0001")
    return config


@contextlib.contextmanager
def upgrade_while_writing(
    config: Config, url: str, update_sql: str, insert_sql: str, key_range: tuple[int, int], seed: int
) -> Iterator[tuple[AppSimulator, list[dict[str, Any]]]]:
    """Upgrade ``config`` to head while two application writers run (the simulator, still writing, and the logs of
    the upgrade are yielded; stop the simulator inside the block to read its stats)."""
    with AppSimulator(
        url, update_sql=update_sql, insert_sql=insert_sql, key_range=key_range, writers=2, seed=seed
    ) as app:
        app.wait_until_writing()
        with capture_logs() as logs:
            command.upgrade(config, "head")
        yield app, logs


@contextlib.contextmanager
def operations(url: str, *, begin: bool = False) -> Iterator[Operations]:
    """Alembic Operations on a fresh connection, as in a migration (``begin``: inside a transaction of the caller's,
    as an env.py that wraps run_migrations() in connection.begin())."""
    engine = sa.create_engine(make_url(url).set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            transaction = connection.begin() if begin else None
            yield Operations(MigrationContext.configure(connection))
            if transaction is not None:
                transaction.rollback()
    finally:
        engine.dispose()


def scalar(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def kind_counts(conn: psycopg.Connection[Any]) -> dict[str | None, int]:
    return dict(conn.execute("SELECT kind, count(*) FROM events GROUP BY kind").fetchall())


ITEMS_TABLE = "CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0, kind text)"
ITEMS_ROWS = "INSERT INTO items (id) SELECT g FROM generate_series(1, {rows}) g"


def items_revision(rows: int) -> str:
    """The body of a revision creating ``items`` with ``rows`` rows."""
    return f'op.execute("{ITEMS_TABLE}")\nop.execute("{ITEMS_ROWS.format(rows=rows)}")'


# --- the example project -----------------------------------------------------------------------------------------


def test_example_upgrades_to_head_and_downgrades_to_base(conn: psycopg.Connection[Any], db_url: str) -> None:
    config = alembic_config(db_url)

    command.upgrade(config, "head")

    assert scalar(conn, "SELECT version_num FROM alembic_version") == "0009"
    assert kind_counts(conn) == {"unknown": 4000, "click": 4000, "view": 4000, "buy": 4000, "share": 4000}
    assert scalar(conn, "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'events'::regclass AND attname = 'kind'")
    record = backfill.get_backfill(db_url, "events_fill_kind")
    assert (record.state, record.rows_updated) == (backfill.RunState.SUCCEEDED, 20_000)

    command.downgrade(config, "base")

    assert scalar(conn, "SELECT to_regclass('events') IS NULL")
    assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == []


def test_the_not_null_revision_never_scans_under_access_exclusive(conn: psycopg.Connection[Any], db_url: str) -> None:
    """PostgreSQL 12-17: SET NOT NULL reported that the valid CHECK proves the column has no NULL (no scan).
    PostgreSQL 18: the constraint was added NOT VALID and validated (the scan ran under SHARE UPDATE EXCLUSIVE),
    and nothing else ran."""
    config = alembic_config(db_url)
    command.upgrade(config, "0003")

    with capture_logs() as logs:
        command.upgrade(config, "0004")

    steps = [(e["action"], e["proved_by_check"]) for e in logs if e["event"] == "ddl_step"]
    if conn.info.server_version >= PG18:
        assert steps == [("add", None), ("validate", None)]
        constraint = conn.execute(
            "SELECT conname, convalidated FROM pg_constraint WHERE conrelid = 'events'::regclass AND contype = 'n' "
            "AND conkey = ARRAY[(SELECT attnum FROM pg_attribute WHERE attrelid = 'events'::regclass "
            "AND attname = 'kind')]"
        ).fetchall()
        assert constraint == [("events_kind_not_null", True)]
    else:
        assert steps == [("add", None), ("validate", None), ("set_not_null", True), ("drop_check", None)]


def test_a_finished_backfill_is_not_run_again(conn: psycopg.Connection[Any], db_url: str) -> None:
    config = alembic_config(db_url)
    command.upgrade(config, "head")
    # Revision 0003 runs again with its backfill still recorded as succeeded (its downgrade would drop the record:
    # see test_alembic_deploy for downgrade then upgrade).
    command.stamp(config, "0002")
    before = backfill.get_backfill(db_url, "events_fill_kind")

    with capture_logs() as logs:
        command.upgrade(config, "0003")

    after = backfill.get_backfill(db_url, "events_fill_kind")
    assert (after.batches, after.rows_updated) == (before.batches, before.rows_updated)
    assert [e["outcome"] for e in logs if e["event"] == "run_finished"] == ["finished"]
    assert [e for e in logs if e["event"] == "batch_committed"] == []


# --- concurrency and crashes ---------------------------------------------------------------------------------------


def test_a_writer_never_waits_longer_than_the_lock_timeout_during_the_whole_upgrade(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str
) -> None:
    """The application writes throughout the upgrade. When the NOT NULL revision starts, a long transaction holds
    ACCESS SHARE on the table and keeps it until the ALTER TABLE has waited for its lock three times: each time
    the writer queues behind the waiting ALTER for at most lock_timeout, never for the whole transaction."""
    lock_timeout, margin = 0.5, 1.5
    project = make_project(
        tmp_path,
        items_revision(30_000),
        'op.backfill("items_kind", "items", {"kind": "\'k\' || id"}, batch_size=500)',
        f"""
        op.ensure_backfill_finished("items_kind")
        op.add_not_null_constraint("items", "kind", lock_timeout={lock_timeout})
        """,
    )
    config = at_first_revision(db_url, project)
    app = AppSimulator(db_url, update_sql="UPDATE items SET id = id WHERE id = %s", writers=1, key_range=(1, 30_000))
    app.start()
    holder = psycopg.connect(db_url)
    held = 0.0

    def hold_until_three_waits() -> None:
        nonlocal held
        with psycopg.connect(db_url, autocommit=True) as watcher:
            waiting_alter = (
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE NOT l.granted "
                "AND l.mode = 'AccessExclusiveLock' AND a.query LIKE 'ALTER TABLE%%'"
            )
            waits, was_waiting = 0, False
            deadline = time.monotonic() + 60
            while waits < 3 and time.monotonic() < deadline:
                waiting = scalar(watcher, waiting_alter) > 0
                waits += waiting and not was_waiting
                was_waiting = waiting
                time.sleep(0.01)
        held = time.monotonic() - held_since
        holder.commit()

    try:
        command.upgrade(config, "0002")
        holder.execute("SELECT count(*) FROM items")  # ACCESS SHARE until commit
        held_since = time.monotonic()
        releaser = threading.Thread(target=hold_until_three_waits, daemon=True)
        releaser.start()
        command.upgrade(config, "head")
        releaser.join(60)
    finally:
        writes = app.stop()
        holder.close()

    assert (writes.errors, writes.last_error) == (0, None)
    assert scalar(conn, "SELECT version_num FROM alembic_version") == "0003"
    assert scalar(conn, "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'kind'")
    assert held > lock_timeout + margin, "the lock holder must outlast the bound for the bound to mean anything"
    assert writes.writes > 100
    longest = writes.max_stall_ms / 1000
    assert longest < lock_timeout + margin, f"longest write {longest:.3f}s, lock held {held:.3f}s"


def test_an_upgrade_killed_mid_backfill_is_finished_by_the_next_one_updating_every_row_once(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str
) -> None:
    rows = 6_000
    project = make_project(
        tmp_path,
        items_revision(rows),
        'op.backfill("items_inc", "items", {"n": "n + 1"}, batch_size=20, '
        "settings=backfill.RunSettings(sleep_between=0.005))",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "alembic", "-c", str(project / "alembic.ini"), "-x", f"url={db_url}", "upgrade", "head"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    kill_after_batches(conn, process, 10, "alembic")

    interrupted = backfill.get_backfill(db_url, "items_inc")
    assert interrupted.state is backfill.RunState.RUNNING
    assert 0 < interrupted.rows_updated < rows
    assert scalar(conn, "SELECT version_num FROM alembic_version") == "0001"

    command.upgrade(alembic_config(db_url, project), "head")

    assert dict(conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall()) == {1: rows}
    finished = backfill.get_backfill(db_url, "items_inc")
    assert (finished.state, finished.rows_updated) == (backfill.RunState.SUCCEEDED, rows)
    assert scalar(conn, "SELECT version_num FROM alembic_version") == "0002"


def test_all_three_phases_in_one_revision(tmp_path: Path, conn: psycopg.Connection[Any], db_url: str) -> None:
    project = make_project(
        tmp_path,
        items_revision(3_000),
        """
        op.add_column("items", sa.Column("label", sa.Text, nullable=True))
        op.backfill("items_label", "items", {"label": "'item ' || id"}, batch_size=1_000)
        op.add_not_null_constraint("items", "label")
        """,
    )

    command.upgrade(alembic_config(db_url, project), "head")

    assert scalar(conn, "SELECT count(*) FROM items WHERE label = 'item ' || id") == 3_000
    assert scalar(conn, "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'label'")


# --- the ops one by one ----------------------------------------------------------------------------------------


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute(ITEMS_TABLE)
    conn.execute(ITEMS_ROWS.format(rows=1_000))
    return conn


def test_defer_only_registers_and_ensure_finished_runs_the_rest(items: psycopg.Connection[Any], db_url: str) -> None:
    with operations(db_url) as op:
        deferred = op.backfill("items_inc", "items", {"n": "n + 1"}, batch_size=100, defer=True)

        assert deferred is None
        assert backfill.get_backfill(db_url, "items_inc").state is backfill.RunState.PENDING
        assert scalar(items, "SELECT sum(n) FROM items") == 0

        record = op.ensure_backfill_finished("items_inc")

    assert record is not None and record.state is backfill.RunState.SUCCEEDED
    assert dict(items.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall()) == {1: 1_000}


def test_ensure_finished_without_finish_names_the_progress_and_the_cli_command(
    items: psycopg.Connection[Any], db_url: str
) -> None:
    with operations(db_url) as op:
        op.backfill("items_inc", "items", {"n": "n + 1"}, defer=True)

        with pytest.raises(BackfillNotFinishedError) as caught:
            op.ensure_backfill_finished("items_inc", finish=False)

    message = str(caught.value)
    assert "backfill 'items_inc' is pending: 0 rows updated in 0 batches" in message
    assert "`backfill run items_inc`" in message
    assert scalar(items, "SELECT sum(n) FROM items") == 0


def test_ensure_finished_on_an_unknown_backfill_is_a_clear_error(items: psycopg.Connection[Any], db_url: str) -> None:
    with operations(db_url) as op, pytest.raises(BackfillNotFinishedError, match="no backfill named 'nope'"):
        op.ensure_backfill_finished("nope")


def test_a_failed_backfill_fails_the_upgrade_with_the_stored_error(items: psycopg.Connection[Any], db_url: str) -> None:
    with operations(db_url) as op, pytest.raises(backfill.BackfillFailedError, match="division by zero"):
        op.backfill("items_bad", "items", {"n": "n / (id - id)"}, batch_size=100)

    record = backfill.get_backfill(db_url, "items_bad")
    assert record.state is backfill.RunState.FAILED
    assert "division by zero" in (record.last_error or "")


def test_values_and_where_may_be_sqlalchemy_expressions(items: psycopg.Connection[Any], db_url: str) -> None:
    items.execute("ALTER TABLE items ADD COLUMN payload jsonb")
    items.execute("UPDATE items SET payload = jsonb_build_object('kind', 'k' || id) WHERE id <= 600")
    payload = sa.column("payload", JSONB)
    kind = sa.func.coalesce(payload["kind"].astext, sa.literal("none"))

    with operations(db_url) as op:
        op.backfill("items_kind", "items", {"kind": kind}, where=sa.column("kind").is_(None), batch_size=250)

    assert scalar(items, "SELECT count(*) FROM items WHERE kind = 'k' || id") == 600
    assert scalar(items, "SELECT count(*) FROM items WHERE kind = 'none'") == 400


def test_the_typed_functions_are_the_same_ops(items: psycopg.Connection[Any], db_url: str) -> None:
    with operations(db_url) as op:
        backfill.alembic.backfill("items_kind", "items", {"kind": "'k'"}, operations=op)
        backfill.alembic.add_not_null_constraint("items", "kind", operations=op)

    assert scalar(items, "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'kind'")
    with pytest.raises(MigrationContextError, match="no Alembic migration is running"):
        backfill.alembic.drop_not_null_constraint("items", "kind")


def test_not_null_with_nulls_left_fails_the_upgrade_and_adds_nothing(
    items: psycopg.Connection[Any], db_url: str
) -> None:
    items.execute("UPDATE items SET kind = 'k' WHERE id > 7")

    with operations(db_url) as op, pytest.raises(NullValuesError, match=r"public\.items\.kind .* 7 row\(s\)"):
        op.add_not_null_constraint("items", "kind")

    assert items.execute("SELECT conname FROM pg_constraint WHERE conname LIKE 'items_kind%'").fetchall() == []


@pytest.mark.parametrize(
    ("table", "values", "message"),
    [
        ("nope", {"n": "1"}, "table nope does not exist"),
        ("items", {"nope": "1"}, "column 'nope' does not exist in table public.items"),
    ],
)
def test_backfill_on_a_missing_table_or_column_is_a_clear_error(
    items: psycopg.Connection[Any], db_url: str, table: str, values: dict[str, str], message: str
) -> None:
    with operations(db_url) as op, pytest.raises(backfill.PlanError) as caught:
        op.backfill("bad", table, values)

    assert str(caught.value) == message


def test_an_external_transaction_is_refused_before_anything_is_written(
    items: psycopg.Connection[Any], db_url: str
) -> None:
    with operations(db_url, begin=True) as op:
        with pytest.raises(MigrationContextError, match="inside a transaction of its own"):
            op.backfill("items_inc", "items", {"n": "n + 1"})
        with pytest.raises(MigrationContextError, match="inside a transaction of its own"):
            op.add_not_null_constraint("items", "n")

    assert scalar(items, "SELECT to_regclass('backfills') IS NULL")
    assert scalar(items, "SELECT sum(n) FROM items") == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda op: op.backfill("b", "items", {"n": "n + 1"}),
        lambda op: op.ensure_backfill_finished("b"),
        lambda op: op.drop_backfill("b"),
        lambda op: op.drop_backfill_trigger("b"),
        lambda op: op.add_not_null_constraint("items", "n"),
        lambda op: op.validate_not_null_constraint("items", "n"),
        lambda op: op.drop_not_null_constraint("items", "n"),
    ],
    ids=["backfill", "ensure_backfill_finished", "drop_backfill", "drop_backfill_trigger", "add", "validate", "drop"],
)
def test_every_op_refuses_a_database_other_than_postgresql(call: Callable[[Operations], Any]) -> None:
    engine = sa.create_engine("sqlite://")
    with engine.connect() as connection:
        op = Operations(MigrationContext.configure(connection))
        with pytest.raises(MigrationContextError, match="needs PostgreSQL; this migration runs on sqlite"):
            call(op)


# --- registration ------------------------------------------------------------------------------------------------


def test_the_plugin_entry_point_registers_the_ops_without_any_import_in_env_py() -> None:
    entry_points = {e.name: e.value for e in importlib.metadata.entry_points(group="alembic.plugins")}
    fresh = subprocess.run(  # noqa: S603
        [
            sys.executable,
            "-c",
            "import sys; from alembic.operations import Operations; "
            "names = ['backfill', 'ensure_backfill_finished', 'add_not_null_constraint', "
            "'validate_not_null_constraint', 'drop_not_null_constraint']; "
            "print([hasattr(Operations, n) for n in names])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )

    assert entry_points.get("backfill.operations") == "backfill.alembic"
    assert fresh.stdout.strip() == str([True] * 5)
