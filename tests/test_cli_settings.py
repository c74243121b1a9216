"""``backfill run``'s throttle, sizing and retry flags and its scale-out flags (``--workers``, ``--slices``), and the
per-slice lines of ``status``.

Parsing tests capture what ``run`` hands to ``api.run_backfill`` (nothing connects); everything about behaviour runs
on the real database, the signal tests as real processes.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import psycopg
import pytest
import test_cli_process
from click.testing import CliRunner, Result
from support import BATCH_SLEEPING, sessions, wait_for
from test_cli_process import Runner, _counts, _items, _register_stuck, run

import backfill
from backfill import BackfillSpec, RunAllReport, RunState, api
from backfill.cli import EXIT_OK, EXIT_USAGE, EXIT_WORK_LEFT, cli
from backfill.cli.commands import RUN_SETTING_OPTIONS
from backfill.executor import RunReport
from backfill.settings import RunSettings
from backfill.state import RunOutcome
from backfill.status import live_owner
from backfill.store import SliceRecord

spawn = test_cli_process.spawn  # the fixture: background runners, killed at the end of the test
NOWHERE = "postgresql://nobody@127.0.0.1:1/nothing"  # parsing tests must never reach a database
ROWS = 2_000
#: A batch takes at least 50 ms (an uncorrelated subquery, evaluated once per batch): a run lasts long enough to
#: be caught mid-way.
SLOW = "n + 1 + (SELECT 0 FROM pg_sleep(0.05))"


pytestmark = pytest.mark.usefixtures("no_ambient_database")


def invoke(*args: str, url: str = NOWHERE) -> Result:
    return CliRunner().invoke(cli, ["--url", url, *args], catch_exceptions=False)


def one_line_error(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert 1 == len(lines), result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What ``run`` asks ``api.run_backfills`` to do, one entry per backfill named, with the health query tried in
    memory (the budget shared between the backfills is the API's: see test_run_all.py)."""
    calls: list[dict[str, Any]] = []

    def run_backfills(bind: Any, names: Sequence[str] | None, **kwargs: Any) -> RunAllReport:
        calls.extend({"name": name, **kwargs} for name in names or ())
        return RunAllReport(tuple(RunReport(name, RunOutcome.FINISHED, RunState.SUCCEEDED) for name in names or ()))

    monkeypatch.setattr(api, "run_backfills", run_backfills)
    monkeypatch.setattr("backfill.cli.commands._try_health_check", lambda database, query: None)
    return calls


# --- parsing (no database) ----------------------------------------------------------------------------------


def test_every_run_setting_but_the_policy_objects_has_a_flag() -> None:
    policy_objects = {"throttle", "sizer", "retry"}

    flagged = [name for _, name, _, _ in RUN_SETTING_OPTIONS]

    assert sorted({f.name for f in fields(RunSettings)} - policy_objects) == sorted(flagged)


def test_run_without_setting_flags_keeps_every_default_and_one_worker(captured: list[dict[str, Any]]) -> None:
    result = invoke("run", "inc")

    assert EXIT_OK == result.exit_code, result.stderr
    (call,) = captured
    assert (RunSettings(), 1, None) == (call["settings"], call["workers"], call["slices"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--target-batch-time", "200ms"], {"target_batch_seconds": 0.2}),
        (["--target-batch-time", "off"], {"target_batch_seconds": None}),
        (["--target-batch-time", "0"], {"target_batch_seconds": None}),
        (["--min-batch-size", "500", "--max-batch-size", "5000"], {"min_batch_size": 500, "max_batch_size": 5000}),
        (["--max-rows-per-second", "2500"], {"max_rows_per_second": 2500.0}),
        (["--max-replica-lag", "1GiB"], {"max_replica_lag_bytes": 1024**3}),
        (["--max-replica-lag", "64MB"], {"max_replica_lag_bytes": 64 * 1024**2}),
        (["--max-replica-lag", "512 kB"], {"max_replica_lag_bytes": 512 * 1024}),
        (["--max-replica-lag", "1048576"], {"max_replica_lag_bytes": 1048576}),
        (["--max-replica-lag", "0"], {"max_replica_lag_bytes": 0}),
        (["--max-replica-lag", "off"], {"max_replica_lag_bytes": None}),
        (["--max-replica-lag-time", "30s"], {"max_replica_lag_seconds": 30.0}),
        (["--max-replica-lag-time", "off"], {"max_replica_lag_seconds": None}),
        (["--no-replica-lag-check"], {"max_replica_lag_bytes": None, "max_replica_lag_seconds": None}),
        (["--no-wait-for-vacuum"], {"wait_for_vacuum": False}),
        (["--wait-for-vacuum"], {"wait_for_vacuum": True}),
        (["--health-check", "SELECT false"], {"health_check_sql": "SELECT false"}),
        (["--max-transaction-age", "10m"], {"max_transaction_age": 600.0}),
        (["--max-transaction-age", "off"], {"max_transaction_age": None}),
        (["--wait-for-lock-waiters"], {"wait_for_lock_waiters": True}),
        (["--no-wait-for-lock-waiters"], {"wait_for_lock_waiters": False}),
        (["--health-check-interval", "250ms"], {"health_check_interval": 0.25}),
        (["--max-retry-time", "1h"], {"max_retry_seconds": 3600.0}),
        (["--max-retry-time", "0"], {"max_retry_seconds": 0.0}),
        (["--application-name", "nightly-backfill"], {"application_name": "nightly-backfill"}),
        (["--batch-size", "50", "--sleep", "10ms"], {"batch_size": 50, "sleep_between": 0.01}),
        (["--lock-timeout", "5s", "--statement-timeout", "1m"], {"lock_timeout": 5.0, "statement_timeout": 60.0}),
    ],
)
def test_a_setting_flag_sets_its_field_and_leaves_the_others_at_their_defaults(
    captured: list[dict[str, Any]], args: list[str], expected: dict[str, Any]
) -> None:
    result = invoke("run", "inc", *args)

    assert EXIT_OK == result.exit_code, result.stderr
    (call,) = captured
    assert RunSettings(**expected) == call["settings"]


def test_workers_and_slices_reach_every_backfill_run_and_max_batches_is_passed_whole(
    captured: list[dict[str, Any]],
) -> None:
    result = invoke("run", "a", "b", "--workers", "3", "--slices", "8", "--max-batches", "10")

    assert EXIT_OK == result.exit_code, result.stderr
    assert [("a", 3, 8, 10), ("b", 3, 8, 10)] == [
        (c["name"], c["workers"], c["slices"], c["max_batches"]) for c in captured
    ]  # the api shares max_batches out between the backfills and their workers


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-batch-size", "500", "--max-batch-size", "100"],
         "--min-batch-size (500) is larger than --max-batch-size (100)"),
        (["--max-batch-size", "50"], "--min-batch-size (100) is larger than --max-batch-size (50)"),
        (["--max-replica-lag", "12parsecs"], "'12parsecs' is not a size"),
        (["--max-replica-lag", "-5"], "'-5' is not a size"),
        (["--max-replica-lag", "1GiB", "--no-replica-lag-check"], "--no-replica-lag-check turns off"),
        (["--max-replica-lag-time", "1s", "--no-replica-lag-check"], "--max-replica-lag-time"),
        (["--target-batch-time", "soon"], "'soon' is not a duration"),
        (["--health-check-interval", "0"], "must be longer than zero"),
        (["--max-retry-time", "-1"], "'-1' is not a duration"),
        (["--max-rows-per-second", "0"], "--max-rows-per-second"),
        (["--min-batch-size", "0"], "--min-batch-size"),
        (["--health-check", "  "], "--health-check is empty"),
        (["--workers", "0"], "--workers"),
        (["--slices", "zero"], "--slices"),
        (["--wait-for-vacuum=yes"], "--wait-for-vacuum"),
    ],
)  # fmt: skip
def test_a_bad_setting_is_one_line_exit_2_and_nothing_runs(
    captured: list[dict[str, Any]], args: list[str], message: str
) -> None:
    result = invoke("run", "inc", *args)

    assert EXIT_USAGE == result.exit_code
    assert message in one_line_error(result)
    assert [] == captured


def test_a_slice_owner_is_shown_only_while_a_live_session_holds_its_claim() -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    long_ago = now - dt.timedelta(hours=1)
    holder = "pid 7, role r, application backfill"

    def piece(owner: str | None, held: str | None, done: bool = False) -> SliceRecord:
        return SliceRecord(0, None, ["9"], ["5"], done, 5, 1, owner, long_ago, holder=held)

    assert ["h:1:a", holder, None, None] == [
        live_owner(piece("h:1:a", holder)),  # its last batch an hour ago: waiting on a throttle, still live
        live_owner(piece(None, holder)),  # claimed, no owner name: the session
        live_owner(piece("h:1:a", None)),  # the runner died or let go
        live_owner(piece("h:1:a", holder, done=True)),
    ]


# --- behaviour on the real database -----------------------------------------------------------------------------


def test_a_health_check_that_fails_is_bad_input_and_nothing_runs(conn: psycopg.Connection[Any], db_url: str) -> None:
    _items(conn, 100)
    backfill.register_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}))

    result = invoke("run", "inc", "--health-check", "SELECT nope FROM nowhere", url=db_url)

    assert EXIT_USAGE == result.exit_code
    expected = 'Error: --health-check query failed: relation "nowhere" does not exist [SQLSTATE 42P01]'
    assert expected == one_line_error(result)
    record = backfill.get_backfill(db_url, "inc")
    assert (RunState.PENDING, 0) == (record.state, record.rows_updated)


def test_run_with_every_check_switched_finishes_the_backfill(conn: psycopg.Connection[Any], db_url: str) -> None:
    _items(conn, 1_000)
    backfill.register_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}))

    result = invoke(
        "run", "inc", "--target-batch-time", "off", "--batch-size", "300", "--no-wait-for-vacuum",
        "--no-replica-lag-check", "--health-check", "SELECT count(*) > 1000 FROM items", "--max-transaction-age", "1h",
        "--wait-for-lock-waiters", "--health-check-interval", "100ms", "--max-retry-time", "1m",
        "--max-rows-per-second", "1000000", "--application-name", "cli-settings-test", url=db_url,
    )  # fmt: skip

    assert EXIT_OK == result.exit_code, result.stderr
    assert {1: 1_000} == _counts(conn)
    assert 4 == backfill.get_backfill(db_url, "inc").batches  # pinned at 300: 300, 300, 300, 100


def test_status_shows_one_line_per_slice_below_its_backfill(conn: psycopg.Connection[Any], db_url: str) -> None:
    _items(conn, 1_000)
    backfill.run_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=50), slices=4, max_batches=3)
    backfill.register_backfill(db_url, BackfillSpec("later", "items", {"n": "n"}, batch_size=100))

    table = invoke("status", url=db_url)
    data = json.loads(invoke("status", "--json", url=db_url).stdout)

    assert EXIT_OK == table.exit_code, table.stderr
    header, inc, *slice_lines, later = table.stdout.splitlines()
    assert (["NAME", "TABLE", "STATE"], "inc", "later") == (header.split()[:3], inc.split()[0], later.split()[0])
    assert "150" == inc.split()[3]  # the backfill's own line sums its slices
    slices = data[0]["slices"]
    assert 4 == len(slices) == len(slice_lines)
    # The slices tile the key range: each starts (exclusive) where another ends.
    ranges = sorted((int(s["lower_bound"][0]) if s["lower_bound"] else 0, int(s["upper_bound"][0])) for s in slices)
    assert [0, *[upper for _, upper in ranges[:-1]]] == [lower for lower, _ in ranges]
    assert 1_000 == ranges[-1][1]
    for piece, line in zip(slices, slice_lines, strict=True):
        lower, upper = piece["lower_bound"], piece["upper_bound"][0]
        where = f"{lower[0]} < id <= {upper}" if lower else f"id <= {upper}"
        started = piece["checkpoint"] not in (None, lower)  # a split-off slice starts at its lower bound
        at = "done" if piece["done"] else f"at {piece['checkpoint'][0]}" if started else "not started"
        expected = f"slice {piece['slice']} {where} {at} {piece['rows_updated']} rows {piece['batches']} batches"
        assert line.startswith("  slice ")
        assert expected == " ".join(line.split())  # no owner: the run is over
    assert 150 == sum(s["rows_updated"] for s in slices)
    assert [] == data[1]["slices"]  # never started


# --- real processes ------------------------------------------------------------------------------------------


def test_run_with_workers_and_slices_finishes_every_slice_exactly_once(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _items(conn)
    backfill.register_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100))

    result = run(db_url, "run", "inc", "--workers", "2", "--slices", "4")

    assert EXIT_OK == result.returncode, result.stderr
    assert {1: ROWS} == _counts(conn)
    pieces = backfill.get_slices(db_url, "inc")
    assert [True] * 4 == [piece.done for piece in pieces]
    assert ROWS == sum(piece.rows_updated for piece in pieces)
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert [2] == [e["workers"] for e in events if e["event"] == "workers_started"]
    assert RunState.SUCCEEDED is backfill.get_backfill(db_url, "inc").state


def _live_owners(db_url: str) -> set[str]:
    return {owner for piece in backfill.get_slices(db_url, "inc") if (owner := live_owner(piece)) is not None}


def test_sigterm_stops_every_worker_after_its_batch_and_a_resume_finishes_exactly_once(
    conn: psycopg.Connection[Any], db_url: str, spawn: Callable[..., Runner]
) -> None:
    _items(conn)
    # 200 batches of at least 200 ms on two workers: 20 s, far longer than the `status` command the test runs
    # before its signal takes on a loaded machine (with SLOW's 5 s, the run once finished first).
    slower = SLOW.replace("0.05", "0.2")
    backfill.register_backfill(db_url, BackfillSpec("inc", "items", {"n": slower}, batch_size=10))
    runner = spawn(db_url, "run", "inc", "--workers", "2", "--slices", "4")
    wait_for(lambda: len(_live_owners(db_url)) == 2, "both workers to commit a batch")

    status = run(db_url, "status")
    runner.process.send_signal(signal.SIGTERM)
    code = runner.process.wait(60)
    stopped = backfill.get_backfill(db_url, "inc")
    done_then = conn.execute("SELECT count(*) FROM items WHERE n = 1").fetchone()
    rest = run(db_url, "run", "inc", "--workers", "2", "--batch-size", "1000")

    assert EXIT_WORK_LEFT == code, runner.stderr()
    events = runner.events()
    assert "stop_requested" in [e["event"] for e in events]
    assert {"inc": "work_left"} == events[-1]["outcomes"]
    owners = re.findall(r"owner (\S+)", status.stdout)
    assert 2 == len(set(owners)), status.stdout
    assert all(f":{runner.process.pid}:" in owner for owner in owners)
    assert (RunState.RUNNING, True) == (stopped.state, 0 < stopped.rows_updated < ROWS)
    assert (stopped.rows_updated,) == done_then  # what the checkpoints say is what was written
    assert EXIT_OK == rest.returncode, rest.stderr
    assert {1: ROWS} == _counts(conn)


def test_a_second_signal_rolls_back_every_workers_batch(
    conn: psycopg.Connection[Any], db_url: str, spawn: Callable[..., Runner]
) -> None:
    _register_stuck(conn, db_url)
    runner = spawn(db_url, "run", "stuck", "--workers", "2", "--statement-timeout", "1h")

    def sleeping() -> int:
        return sessions(conn, BATCH_SLEEPING)

    wait_for(lambda: sleeping() == 2, "both workers' batches to be running")
    runner.process.send_signal(signal.SIGINT)
    wait_for(lambda: "stop_requested" in [e["event"] for e in runner.events()], "the first signal to be seen")
    still_running = sleeping()
    runner.process.send_signal(signal.SIGINT)
    code = runner.process.wait(60)

    assert 2 == still_running  # the first signal let both batches go on
    assert EXIT_WORK_LEFT == code, runner.stderr()
    assert "run_aborted" in [e["event"] for e in runner.events()]
    wait_for(lambda: sleeping() == 0, "the cancelled statements to end on the server")
    assert {0: ROWS} == _counts(conn)  # both batches rolled back
    record = backfill.get_backfill(db_url, "stuck")
    assert (RunState.RUNNING, 0, 0) == (record.state, record.rows_updated, record.batches)
