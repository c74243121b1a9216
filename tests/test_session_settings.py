"""A runner does not depend on what the database or role sets by default: keys read back exactly, every command
works, and triggers fire, whatever ``ALTER DATABASE ... SET`` says."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

import backfill
from backfill import BackfillSpec, RunOutcome
from backfill.cli import EXIT_OK, cli
from backfill.pg.connect import Database
from backfill.pg.session import PINNED_SETTINGS


def _database_set(conn: psycopg.Connection[Any], setting: str, value: str) -> None:
    # Applies to sessions opened from now on (the test's own connection keeps its settings).
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET {setting} = '{value}'")


def _counts(conn: psycopg.Connection[Any]) -> dict[int, int]:
    return dict(conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall())


CASES = {
    # setting, value, key column type, key expression over g
    "extra_float_digits=0": ("extra_float_digits", "0", "float8", "g / 3.0::float8 + 0.1"),
    "float4 extra_float_digits=-15": ("extra_float_digits", "-15", "real", "(g / 7.0)::real"),
    "DateStyle SQL, DMY": ("DateStyle", "SQL, DMY", "date", "'2020-01-01'::date + g"),
    "DateStyle German timestamp": (
        "DateStyle", "German", "timestamp", "'2020-01-01'::timestamp + g * '37 min'::interval",
    ),
    "DateStyle Postgres timestamptz": (
        "DateStyle", "Postgres, DMY", "timestamptz", "'2020-03-01 00:00+00'::timestamptz + g * '1 h 1 s'::interval",
    ),
    "IntervalStyle sql_standard": (
        "IntervalStyle", "sql_standard", "interval", "g * interval '1 day 1 second' - interval '2 months 3 days'",
    ),
    "IntervalStyle iso_8601": (
        "IntervalStyle", "iso_8601", "interval", "g * interval '1.5 seconds' - '1 year'::interval",
    ),
    "bytea_output escape": ("bytea_output", "escape", "bytea", "decode(lpad(to_hex(g * 7919), 8, '0'), 'hex')"),
    "TimeZone with odd offsets": (
        "TimeZone", "Asia/Kathmandu", "timestamptz", "'1900-01-01 00:00+00'::timestamptz + g * '1 h 1 s'::interval",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_keys_read_back_exactly_whatever_the_database_sets(
    conn: psycopg.Connection[Any], db_url: str, case: str
) -> None:
    setting, value, column, expression = CASES[case]
    conn.execute(f"CREATE TABLE items (k {column} PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute(f"INSERT INTO items (k) SELECT {expression} FROM generate_series(1, 2001) g")
    spec = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100)
    # Part of the run under the server's defaults, the rest under the database's setting: checkpoints written by
    # one session are read by another.
    first = backfill.run_backfill(db_url, spec, max_batches=5)
    _database_set(conn, setting, value)

    second = backfill.run_backfill(db_url, "inc", max_batches=100)
    statuses = backfill.backfill_status(db_url)

    assert (first.outcome, second.outcome) == (RunOutcome.WORK_LEFT, RunOutcome.FINISHED)
    assert first.rows_updated + second.rows_updated == 2001
    assert _counts(conn) == {1: 2001}
    assert [s.record.state.value for s in statuses] == ["succeeded"]


@pytest.mark.parametrize(("column", "digits", "step"), [("float8", "0", "3e-16"), ("real", "-2", "3e-7")])
def test_close_float_keys_are_not_rounded_together(
    conn: psycopg.Connection[Any], db_url: str, column: str, digits: str, step: str
) -> None:
    # Keys closer than the rounded text form can tell apart: rounded, the largest key and the batch ends would
    # skip the rows between a key and its rounded text.
    conn.execute(f"CREATE TABLE items (k {column} PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute(
        f"INSERT INTO items (k) SELECT DISTINCT (1 + g * {step}::float8)::{column} FROM generate_series(1, 2001) g"
    )
    total = conn.execute("SELECT count(*) FROM items").fetchone()
    _database_set(conn, "extra_float_digits", digits)

    report = backfill.run_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=50), max_batches=200)

    assert report.outcome is RunOutcome.FINISHED
    assert total is not None and _counts(conn) == {1: total[0]}


def test_every_command_works_under_a_non_iso_date_style(conn: psycopg.Connection[Any], db_url: str) -> None:
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO items (id) SELECT generate_series(1, 300)")
    _database_set(conn, "DateStyle", "SQL, DMY")
    runner = CliRunner()

    for args in (
        ["add", "inc", "--table", "items", "--set", "n=n + 1", "--batch-size", "100"],
        ["status"],
        ["status", "inc", "--json"],
        ["plan", "inc"],
        ["run", "inc"],
        ["status", "inc"],
    ):
        result = runner.invoke(cli, ["--url", db_url, *args], catch_exceptions=False)
        assert result.exit_code == EXIT_OK, (args, result.output, result.stderr)

    assert _counts(conn) == {1: 300}


def test_transaction_defaults_of_the_database_do_not_change_how_batches_run(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO items (id) SELECT generate_series(1, 500)")
    _database_set(conn, "default_transaction_isolation", "serializable")
    _database_set(conn, "default_transaction_read_only", "on")

    report = backfill.run_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100), workers=2)

    assert report.outcome is RunOutcome.FINISHED
    assert _counts(conn) == {1: 500}


def test_triggers_fire_even_where_the_database_sets_replica_mode(conn: psycopg.Connection[Any], db_url: str) -> None:
    # session_replication_role = replica silences ordinary triggers: the application's audit trigger must still see
    # every row the backfill changes.
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute("CREATE TABLE audit (id integer)")
    conn.execute(
        "CREATE FUNCTION log_it() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN INSERT INTO audit VALUES (NEW.id); RETURN NEW; END$$"
    )
    conn.execute("CREATE TRIGGER audit_items AFTER UPDATE ON items FOR EACH ROW EXECUTE FUNCTION log_it()")
    conn.execute("INSERT INTO items (id) SELECT generate_series(1, 300)")
    _database_set(conn, "session_replication_role", "replica")

    backfill.run_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100))

    assert conn.execute("SELECT count(DISTINCT id), count(*) FROM audit").fetchone() == (300, 300)


def test_every_connection_pins_the_settings_whatever_the_role_sets(conn: psycopg.Connection[Any], db_url: str) -> None:
    user = conn.info.user
    settings = {"DateStyle": "SQL, DMY", "IntervalStyle": "sql_standard", "extra_float_digits": "-3"}
    for name, value in settings.items():
        conn.execute(f"ALTER ROLE \"{user}\" IN DATABASE {conn.info.dbname} SET {name} = '{value}'")

    with Database.from_bind(db_url).connect() as runner:
        seen = {name: runner.execute("SELECT current_setting(%s)", (name,)).fetchone() for name, _ in PINNED_SETTINGS}
        datestyle = runner.execute("SHOW DateStyle").fetchone()

    assert seen["extra_float_digits"] == ("1",)
    assert seen["IntervalStyle"] == ("postgres",)
    assert seen["row_security"] == ("off",)
    # Output pinned to ISO; the role's day-month order for reading ambiguous input is kept.
    assert datestyle == ("ISO, DMY",)
