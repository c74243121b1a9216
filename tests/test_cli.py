"""The command line through click's CliRunner: parsing, output, exit codes and errors, on a real database."""

from __future__ import annotations

import json
from typing import Any

import click
import psycopg
import pytest
from click.testing import CliRunner, Result
from sqlalchemy.engine import make_url

import backfill
from backfill import BackfillSpec, RunState
from backfill.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, EXIT_WORK_LEFT, cli

DOCUMENTED_STATUS_KEYS = {
    "name", "table", "state", "rows_updated", "batches", "estimated_rows", "checkpoint", "last_error",
    "started_at", "updated_at", "finished_at",
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("no_ambient_database")


def invoke(*args: str, url: str | None = None) -> Result:
    argv = (["--url", url] if url else []) + list(args)
    return CliRunner().invoke(cli, argv, catch_exceptions=False)


def one_line_error(result: Result) -> str:
    """The error of a failed command: exactly one line on stderr, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert 1 == len(lines), result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def _items(conn: psycopg.Connection[Any], rows: int = 1_000) -> None:
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, d integer NOT NULL DEFAULT 1, n integer DEFAULT 0)")
    conn.execute("INSERT INTO items (id) SELECT generate_series(1, %s)", (rows,))
    conn.execute("ANALYZE items")


def _counts(conn: psycopg.Connection[Any]) -> dict[int, int]:
    return dict(conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall())


def _control_tables_exist(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regclass('public.backfills') IS NOT NULL").fetchone()
    return bool(row and row[0])


# --- help and parsing (no database) -------------------------------------------------------------------------


def test_every_command_and_option_has_help_text_and_help_needs_no_database() -> None:
    assert isinstance(cli, click.Group)
    expected = {"init", "add", "run", "status", "pause", "resume", "cancel", "retry", "delete", "plan", "demo", "serve"}
    expected |= {"revert", "purge", "set"}
    assert expected == set(cli.commands)
    for name, command in cli.commands.items():
        assert command.help and command.help.strip(), name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts}"
        # An unreachable URL: --help must not try it.
        result = invoke(name, "--help", url="postgresql://nobody@127.0.0.1:1/nothing")
        assert EXIT_OK == result.exit_code, result.output
        assert f"Usage: backfill {name}" in result.stdout


def test_top_level_help_documents_the_exit_codes() -> None:
    result = invoke("--help")

    assert EXIT_OK == result.exit_code
    for line in ("0  every named backfill finished", "75  stopped with work left", "1  a backfill failed",
                 "2  bad input or usage"):  # fmt: skip
        assert line in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["frobnicate"], "No such command"),
        (["run", "x", "--bogus"], "No such option"),
        (["run", "x", "--max-runtime", "5x"], "'5x' is not a duration"),
        (["run", "x", "--sleep", "0s"], "must be longer than zero"),
        (["run", "x", "--max-batches", "0"], "--max-batches"),
        (["run"], "name the backfills to run, or pass --all"),
        (["run", "x", "--all"], "give backfill names or --all, not both"),
        (["add", "x", "--table", "t", "--set", "novalue"], "expected COL=SQL, got 'novalue'"),
        (["add", "x", "--table", "t", "--set", "a=1", "--set", "a=2"], "column 'a' is set twice"),
        (["add", "x", "--table", "t", "--set", "a=1", "--key", "id,"], "expected COL[,COL...]"),
        (["add", "x", "--set", "a=1"], "Missing option '--table'"),
        (["status"], "no database given: pass --url or set DATABASE_URL"),
        (["--url", "mysql://u@h/db", "status"], "backfill needs PostgreSQL, got a mysql URL"),
        (["--log-format", "xml", "status"], "--log-format"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = invoke(*args)

    assert EXIT_USAGE == result.exit_code
    assert message in one_line_error(result)
    assert "" == result.stdout


# --- commands on a real database ------------------------------------------------------------------------------


def test_init_is_idempotent(conn: psycopg.Connection[Any], db_url: str) -> None:
    first, second = invoke("init", url=db_url), invoke("init", url=db_url)

    assert (EXIT_OK, EXIT_OK) == (first.exit_code, second.exit_code)
    assert "control tables ready in schema 'public'\n" == second.stdout
    assert _control_tables_exist(conn)


def test_add_registers_a_pending_backfill_with_the_resolved_key(conn: psycopg.Connection[Any], db_url: str) -> None:
    _items(conn)

    result = invoke("add", "inc", "--table", "items", "--set", "n=n + 1", "--where", "n = 0", "--batch-size", "100",
                    url=db_url)  # fmt: skip

    assert EXIT_OK == result.exit_code, result.output
    assert "backfill 'inc' on public.items (key id, batch size 100): pending\n" == result.stdout
    record = backfill.get_backfill(db_url, "inc")
    assert (RunState.PENDING, {"n": "n + 1"}, "n = 0") == (record.state, dict(record.spec.values), record.spec.where)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "x", "--table", "missing", "--set", "n=1"], "table missing does not exist"),
        (["add", "x", "--table", "items", "--set", "nope=1"], "column 'nope' does not exist"),
        (["add", "x", "--table", "items", "--set", "n=no_such_fn()"], "expression for column 'n'"),
        (["add", "x", "--table", "items", "--set", "n=1", "--key", "d"], "no btree index of public.items"),
        (["run", "nope"], "no backfill named 'nope'"),
        (["status", "nope"], "no backfill named 'nope'"),
        (["plan", "nope"], "no backfill named 'nope'"),
        (["pause", "nope"], "no backfill named 'nope'"),
    ],
)
def test_bad_input_against_the_database_is_one_line_exit_2_and_writes_nothing(
    conn: psycopg.Connection[Any], db_url: str, args: list[str], message: str
) -> None:
    _items(conn)
    if args[0] != "add":
        backfill.init_control_tables(db_url)

    result = invoke(*args, url=db_url)

    assert EXIT_USAGE == result.exit_code
    assert message in one_line_error(result)
    assert (args[0] != "add") == _control_tables_exist(conn)  # a rejected add creates nothing
    if args[0] != "add":
        assert [] == backfill.list_backfills(db_url)


def test_a_state_change_that_makes_no_sense_is_refused_and_changes_nothing(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _items(conn, 10)
    backfill.run_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}))

    results = {action: invoke(action, "inc", url=db_url) for action in ("resume", "pause", "retry", "cancel")}

    for action, result in results.items():
        assert EXIT_USAGE == result.exit_code, action
        assert f"cannot {action} backfill 'inc': it is succeeded" in one_line_error(result)
    assert RunState.SUCCEEDED is backfill.get_backfill(db_url, "inc").state


def test_verbose_adds_the_traceback_to_errors(conn: psycopg.Connection[Any], db_url: str) -> None:
    backfill.init_control_tables(db_url)

    result = invoke("-v", "status", "nope", url=db_url)

    assert EXIT_USAGE == result.exit_code
    assert "Traceback" in result.stderr
    assert result.stderr.strip().endswith("Error: no backfill named 'nope'")


def test_pause_resume_cancel_and_retry_move_the_state(conn: psycopg.Connection[Any], db_url: str) -> None:
    _items(conn, 100)
    # Row 50 makes the expression fail until its data is fixed.
    conn.execute("UPDATE items SET d = 0 WHERE id = 50")
    backfill.register_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1 / d"}, batch_size=10))

    paused = invoke("pause", "inc", url=db_url)
    run_paused = invoke("run", "inc", url=db_url)
    resumed = invoke("resume", "inc", url=db_url)
    run_failing = invoke("run", "inc", url=db_url)
    failed = backfill.get_backfill(db_url, "inc")
    conn.execute("UPDATE items SET d = 1 WHERE id = 50")
    retried = invoke("retry", "inc", url=db_url)
    run_again = invoke("run", "inc", url=db_url)

    assert "backfill 'inc' paused: now paused\n" == paused.stdout
    assert EXIT_WORK_LEFT == run_paused.exit_code
    assert "backfill 'inc' resumed: now pending\n" == resumed.stdout
    assert EXIT_FAILED == run_failing.exit_code
    assert (RunState.FAILED, 40) == (failed.state, failed.rows_updated)
    assert failed.last_error is not None and "division by zero" in failed.last_error
    assert "backfill 'inc' put back: now pending\n" == retried.stdout
    assert EXIT_OK == run_again.exit_code
    assert {1: 100} == _counts(conn)


def test_a_cancelled_backfill_exits_1_and_stays_cancelled(conn: psycopg.Connection[Any], db_url: str) -> None:
    _items(conn, 100)
    backfill.register_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=10))

    cancelled = invoke("cancel", "inc", url=db_url)
    run = invoke("run", "inc", url=db_url)

    assert "backfill 'inc' cancelled: now cancelled\n" == cancelled.stdout
    assert EXIT_FAILED == run.exit_code
    assert {0: 100} == _counts(conn)


def test_run_logs_json_lines_per_batch_and_one_summary_off_a_terminal(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _items(conn, 250)
    backfill.register_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100))

    result = invoke("run", "inc", url=db_url)

    assert EXIT_OK == result.exit_code
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert 3 == sum(1 for e in events if e["event"] == "batch_committed")
    assert [100, 200, 250] == [e["done"] for e in events if e["event"] == "batch_committed"]
    summary = events[-1]
    assert ("run_summary", {"inc": "finished"}, 250, 0) == (
        summary["event"], summary["outcomes"], summary["rows"], summary["exit_code"]
    )  # fmt: skip
    assert "batch_sql" not in {e["event"] for e in events}


def test_verbose_run_logs_the_batch_sql(conn: psycopg.Connection[Any], db_url: str) -> None:
    _items(conn, 10)
    backfill.register_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}))

    result = invoke("-v", "run", "inc", url=db_url)

    events = [json.loads(line) for line in result.stderr.splitlines()]
    sql_event = next(e for e in events if e["event"] == "batch_sql")
    assert 'UPDATE "public"."items" SET "n" = (n + 1) WHERE "id" > CAST(%s AS integer)' in sql_event["update"]


def test_run_all_works_through_pending_and_running_and_leaves_paused_alone(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _items(conn, 100)
    conn.execute("ALTER TABLE items ADD COLUMN m integer DEFAULT 0, ADD COLUMN k integer DEFAULT 0")
    backfill.run_backfill(db_url, BackfillSpec("first", "items", {"n": "n + 1"}, batch_size=10), max_batches=2)
    backfill.register_backfill(db_url, BackfillSpec("second", "items", {"m": "m + 1"}, batch_size=10))
    backfill.register_backfill(db_url, BackfillSpec("held", "items", {"k": "k + 1"}, batch_size=10))
    backfill.pause_backfill(db_url, "held")

    result = invoke("run", "--all", url=db_url)

    assert EXIT_OK == result.exit_code, result.stderr
    summary = json.loads(result.stderr.splitlines()[-1])
    assert {"first": "finished", "second": "finished"} == summary["outcomes"]
    sums = conn.execute("SELECT sum(n), sum(m), sum(k) FROM items").fetchone()
    assert (100, 100, 0) == sums


def test_run_with_a_batch_budget_stops_with_work_left(conn: psycopg.Connection[Any], db_url: str) -> None:
    _items(conn, 1_000)
    backfill.register_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100))

    partial = invoke("run", "inc", "--max-batches", "3", "--batch-size", "50", url=db_url)
    rest = invoke("run", "inc", "--sleep", "1ms", "--lock-timeout", "5s", "--statement-timeout", "1m", url=db_url)

    assert (EXIT_WORK_LEFT, EXIT_OK) == (partial.exit_code, rest.exit_code)
    assert {1: 1_000} == _counts(conn)
    assert 3 + 9 == backfill.get_backfill(db_url, "inc").batches  # 3 of 50 rows, then 850 rows in batches of 100


def test_status_table_and_json(conn: psycopg.Connection[Any], db_url: str) -> None:
    _items(conn, 1_000)
    backfill.run_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100), max_batches=3)
    backfill.register_backfill(db_url, BackfillSpec("later", "items", {"d": "d"}, batch_size=100))

    table = invoke("status", url=db_url)
    as_json = invoke("status", "--json", url=db_url)
    one = invoke("status", "inc", "--json", url=db_url)

    assert EXIT_OK == table.exit_code
    header, first, second = table.stdout.splitlines()
    assert header.split() == ["NAME", "TABLE", "STATE", "ROWS", "%", "RATE", "ETA", "LAST", "ERROR"]
    assert first.split()[:5] == ["inc", "public.items", "running", "300", "30.0%"]
    assert second.split() == ["later", "public.items", "pending", "0", "-", "-", "-"]
    data = json.loads(as_json.stdout)
    assert ["inc", "later"] == [d["name"] for d in data]
    assert DOCUMENTED_STATUS_KEYS <= set(data[0])
    inc = data[0]
    assert ("running", 300, 3, 1_000, ["300"], None) == (
        inc["state"], inc["rows_updated"], inc["batches"], inc["estimated_rows"], inc["checkpoint"], inc["last_error"]
    )  # fmt: skip
    assert inc["started_at"] is not None and inc["finished_at"] is None
    assert [inc] == json.loads(one.stdout)


def test_plan_shows_the_next_batch_with_values_and_its_explain_and_writes_nothing(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _items(conn, 1_000)
    backfill.register_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, where="d = 1", batch_size=100))

    before = invoke("plan", "inc", url=db_url)
    backfill.run_backfill(db_url, "inc", max_batches=2)
    during = invoke("plan", "inc", url=db_url)

    assert EXIT_OK == before.exit_code, before.output
    assert (
        'UPDATE "public"."items" SET "n" = (n + 1) WHERE "id" <= CAST(\'100\' AS integer) AND (d = 1) '
        'AND ("n"::text IS DISTINCT FROM (n + 1)::text);' in before.stdout
    )
    assert "Index" in before.stdout.split("EXPLAIN:", 1)[1]
    assert "~10 batches" in before.stdout
    assert "WHERE \"id\" > CAST('200' AS integer) AND \"id\" <= CAST('300' AS integer)" in during.stdout
    assert {1: 200, 0: 800} == _counts(conn)  # plan wrote nothing: only the two batches ran


def test_the_password_never_reaches_output_or_logs(conn: psycopg.Connection[Any], db_url: str) -> None:
    _items(conn, 50)
    secret = "s3cret-Pa55"
    # The test server trusts local connections, so the password is accepted and ignored.
    with_password = make_url(db_url).set(password=secret).render_as_string(hide_password=False)
    wrong_db = make_url(with_password).set(database="no_such_db").render_as_string(hide_password=False)

    results = [
        invoke("-v", "add", "inc", "--table", "items", "--set", "n=n + 1", url=with_password),
        invoke("-v", "run", "inc", url=with_password),
        invoke("-v", "status", "--json", url=with_password),
        invoke("-v", "status", url=wrong_db),
    ]

    assert [EXIT_OK, EXIT_OK, EXIT_OK, EXIT_USAGE] == [r.exit_code for r in results]
    assert "cannot connect to" in results[-1].stderr and "***" in results[-1].stderr
    for result in results:
        assert secret not in result.output
