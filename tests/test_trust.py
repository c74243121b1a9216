"""The control tables trust nothing backfill did not create, and a runner role set up by ``init --grant`` alone can
do its work. Roles are real PostgreSQL roles; the database gets ``public`` writable by PUBLIC, as it was by default
up to PostgreSQL 14."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import structlog
from click.testing import CliRunner, Result
from psycopg import sql
from sqlalchemy.engine import make_url
from support import make_items

import backfill
from backfill import BackfillSpec, UnknownRoleError, UntrustedControlTablesError
from backfill.cli import EXIT_OK, EXIT_USAGE, cli

SPEC = BackfillSpec("fill", "items", {"n": "id * 2"})
CONTROL_TABLES = ("backfills", "backfill_slices", "backfill_meta", "backfill_batches")


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    make_items(conn, 300, "n integer")
    conn.execute("CREATE TABLE secret (s text)")
    conn.execute("INSERT INTO secret VALUES ('the payroll')")
    return conn


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def cli_as(url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--url", url, *args], env={"DATABASE_URL": None})


def one_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert 1 == len(lines), result.stderr
    return lines[0]


def _user(url: str) -> str:
    return str(make_url(url).username)


def _can_read_secret(conn: psycopg.Connection[Any], role: str) -> bool:
    row = conn.execute("SELECT has_table_privilege(%s, 'public.secret', 'SELECT')", (role,)).fetchone()
    return bool(row and row[0])


def test_tables_a_low_role_pre_created_with_an_invoker_trigger_are_refused(
    items: psycopg.Connection[Any], db_url: str, roles: Callable[[str], str]
) -> None:
    items.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")  # the PostgreSQL <= 14 default
    low = roles("low")
    with psycopg.connect(low, autocommit=True) as attacker:
        backfill.init_control_tables(low)  # real control tables, owned by the low role
        attacker.execute(
            sql.SQL(
                """CREATE FUNCTION public.steal() RETURNS trigger LANGUAGE plpgsql AS $$
                   BEGIN EXECUTE 'GRANT SELECT ON public.secret TO ' || quote_ident({}); RETURN NEW; END $$"""
            ).format(sql.Literal(_user(low)))
        )
        attacker.execute(
            "CREATE TRIGGER steal BEFORE INSERT OR UPDATE ON backfills FOR EACH ROW EXECUTE FUNCTION public.steal()"
        )
        attacker.execute("GRANT ALL ON backfills, backfill_slices, backfill_meta TO PUBLIC")

    for args in (["init"], ["add", "fill", "--table", "items", "--set", "n=id * 2"], ["run", "fill"], ["status"]):
        result = cli_as(db_url, *args)
        assert EXIT_USAGE == result.exit_code, (args, result.output)
        message = one_line(result)
        assert "refusing the control tables in schema 'public'" in message
        assert f"public.backfills is owned by role {_user(low)}" in message
        assert "public.backfills has trigger steal" in message
        assert "grants" in message and "to PUBLIC" in message

    assert not _can_read_secret(items, _user(low))
    assert [(None,)] == items.execute("SELECT max(n) FROM items").fetchall()


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        (
            "CREATE FUNCTION t() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$; "
            "CREATE TRIGGER audit AFTER UPDATE ON backfill_slices FOR EACH ROW EXECUTE FUNCTION t()",
            "public.backfill_slices has trigger audit",
        ),
        ("CREATE RULE keep AS ON DELETE TO backfills DO INSTEAD NOTHING", "public.backfills has rule keep"),
        ("GRANT SELECT ON backfill_batches TO PUBLIC", "public.backfill_batches grants SELECT to PUBLIC"),
        ("ALTER TABLE backfill_meta ENABLE ROW LEVEL SECURITY", "public.backfill_meta has row-level security"),
        ("GRANT UPDATE ON backfills TO PUBLIC", "public.backfills grants UPDATE to PUBLIC"),
        ("GRANT UPDATE (spec) ON backfills TO PUBLIC", "public.backfills grants UPDATE on column spec to PUBLIC"),
    ],
)
def test_every_later_command_checks_the_tables_again(
    items: psycopg.Connection[Any], db_url: str, tamper: str, named: str
) -> None:
    backfill.register_backfill(db_url, SPEC)
    items.execute(tamper)

    for attempt in (
        lambda: backfill.run_backfill(db_url, "fill"),
        lambda: backfill.backfill_status(db_url),
        lambda: backfill.pause_backfill(db_url, "fill"),
        lambda: backfill.init_control_tables(db_url),
    ):
        with pytest.raises(UntrustedControlTablesError, match=named) as raised:
            attempt()
        assert "\n" not in str(raised.value)
    assert [(None,)] == items.execute("SELECT max(n) FROM items").fetchall()


def test_a_runner_role_set_up_only_by_init_grant(
    items: psycopg.Connection[Any], db_url: str, roles: Callable[[str], str]
) -> None:
    items.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")  # the PostgreSQL >= 15 default
    runner = roles("runner")
    name = _user(runner)
    items.execute(sql.SQL("GRANT SELECT, UPDATE ON items TO {}").format(sql.Identifier(name)))  # its target table
    before = cli_as(runner, "init")
    assert "permission denied for schema public" in one_line(before)

    granted = cli_as(db_url, "init", "--grant", name)
    assert EXIT_OK == granted.exit_code, granted.output
    assert f"granted role {name!r}" in granted.stdout

    assert EXIT_OK == cli_as(runner, "init").exit_code
    assert EXIT_OK == cli_as(runner, "add", "fill", "--table", "items", "--set", "n=id * 2").exit_code
    ran = cli_as(runner, "run", "fill", "--workers", "2")
    assert EXIT_OK == ran.exit_code, ran.output
    assert EXIT_OK == cli_as(runner, "status").exit_code
    assert [(600,)] == items.execute("SELECT max(n) FROM items").fetchall()

    privileges = items.execute(
        """SELECT t, p FROM unnest(%s::text[]) t, unnest(array['SELECT','INSERT','UPDATE','DELETE','TRUNCATE']) p
            WHERE has_table_privilege(%s, 'public.' || t, p) ORDER BY t, p""",
        (list(CONTROL_TABLES), name),
    ).fetchall()
    assert [
        ("backfill_batches", "INSERT"),
        ("backfill_batches", "SELECT"),
        ("backfill_batches", "UPDATE"),
        ("backfill_meta", "SELECT"),
        ("backfill_slices", "INSERT"),
        ("backfill_slices", "SELECT"),
        ("backfill_slices", "UPDATE"),
        ("backfills", "INSERT"),
        ("backfills", "SELECT"),
        ("backfills", "UPDATE"),
    ] == privileges


def test_grant_to_a_role_that_does_not_exist_is_one_line_and_grants_nothing(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    with pytest.raises(UnknownRoleError, match="no such role"):
        backfill.init_control_tables(db_url, grant="nobody_here")
    result = cli_as(db_url, "init", "--grant", "nobody_here")
    assert EXIT_USAGE == result.exit_code
    assert "cannot grant the control tables to 'nobody_here': no such role" in one_line(result)
