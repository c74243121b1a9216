"""The ``backfill`` command as real processes against real PostgreSQL: budgets, pause from another process,
signals, overlapping runs. Slow batches come from ``(SELECT 0 FROM pg_sleep(s))`` in the expression: an
uncorrelated subquery, evaluated once per batch. Processes are synchronised by polling the control table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy
import sqlalchemy.pool
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.engine import make_url
from support import BATCH_SLEEPING, sessions, wait_for

import backfill
from backfill import BackfillSpec, RunState
from backfill import alembic as alembic_ops
from backfill.cli import EXIT_OK, EXIT_USAGE, EXIT_WORK_LEFT

ROWS = 2_000
#: Per-batch delay of the slow backfills: long enough to catch a runner mid-run, short enough to finish soon.
SLOW = "n + 1 + (SELECT 0 FROM pg_sleep(0.05))"


def command(url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "backfill.cli", "--url", url, *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BACKFILL_CONTROL_SCHEMA")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        command(url, *args), capture_output=True, text=True, timeout=timeout, env=_env(), check=False
    )


class Runner:
    """A ``backfill`` process in the background, its output going to files (a full pipe would block it)."""

    def __init__(self, argv: list[str], directory: Path) -> None:
        self.stdout_path, self.stderr_path = directory / "stdout", directory / "stderr"
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=_env())  # noqa: S603

    def events(self) -> list[dict[str, Any]]:
        complete = self.stderr_path.read_text().split("\n")[:-1]  # the last piece may be a line being written
        return [json.loads(line) for line in complete if line.startswith("{")]

    def stderr(self) -> str:
        return self.stderr_path.read_text()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Runner]]:
    """Start runners in the background; any still running at the end of the test is killed."""
    started: list[Runner] = []

    def start(url: str, *args: str) -> Runner:
        directory = tmp_path / f"runner{len(started)}"
        directory.mkdir()
        runner = Runner(command(url, *args), directory)
        started.append(runner)
        return runner

    yield start
    for runner in started:
        if runner.process.poll() is None:
            runner.process.kill()
            runner.process.wait(30)


def batches_done(url: str, name: str) -> int:
    return backfill.get_backfill(url, name).batches


def _items(conn: psycopg.Connection[Any], rows: int = ROWS) -> None:
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO items (id) SELECT generate_series(1, %s)", (rows,))
    conn.execute("ANALYZE items")


def _register_stuck(conn: psycopg.Connection[Any], db_url: str) -> None:
    """The items table and the backfill ``stuck``, whose batch would sleep ten minutes: only an abort ends it
    within a test's deadline."""
    _items(conn)
    spec = BackfillSpec("stuck", "items", {"n": "n + 1 + (SELECT 0 FROM pg_sleep(600))"}, batch_size=100)
    backfill.register_backfill(db_url, spec)


def _counts(conn: psycopg.Connection[Any]) -> dict[int, int]:
    return dict(conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall())


def _consistent(conn: psycopg.Connection[Any], url: str, name: str) -> None:
    """The data matches the checkpoint: rows up to it are done once, rows after it untouched."""
    record = backfill.get_backfill(url, name)
    (piece,) = backfill.get_slices(url, name)
    checkpoint = int(piece.checkpoint[0]) if piece.checkpoint else 0
    done = conn.execute("SELECT count(*) FROM items WHERE id <= %s AND n = 1", (checkpoint,)).fetchone()
    untouched = conn.execute("SELECT count(*) FROM items WHERE id > %s AND n = 0", (checkpoint,)).fetchone()
    assert ((checkpoint,), (ROWS - checkpoint,)) == (done, untouched)
    assert checkpoint == record.rows_updated


def test_run_with_a_time_budget_then_resume_to_completion(conn: psycopg.Connection[Any], db_url: str) -> None:
    _items(conn)
    assert (
        EXIT_OK == run(db_url, "add", "inc", "--table", "items", "--set", f"n={SLOW}", "--batch-size", "20").returncode
    )

    first = run(db_url, "run", "inc", "--max-runtime", "1s")
    after_first = backfill.get_backfill(db_url, "inc")
    _consistent(conn, db_url, "inc")
    rest = run(db_url, "run", "inc", "--batch-size", "500")

    assert EXIT_WORK_LEFT == first.returncode, first.stderr
    assert (RunState.RUNNING, True) == (after_first.state, 0 < after_first.rows_updated < ROWS)
    summary = json.loads(first.stderr.splitlines()[-1])
    assert ("run_summary", {"inc": "work_left"}, 75) == (summary["event"], summary["outcomes"], summary["exit_code"])
    assert EXIT_OK == rest.returncode, rest.stderr
    assert {1: ROWS} == _counts(conn)
    assert RunState.SUCCEEDED is backfill.get_backfill(db_url, "inc").state


def _run_slow(
    conn: psycopg.Connection[Any], db_url: str, spawn: Callable[..., Runner], *, batch_size: int, batches: int
) -> Runner:
    """The slow increment registered and run by ``backfill run`` in a process of its own, once it has committed
    ``batches`` batches."""
    _items(conn)
    backfill.register_backfill(db_url, BackfillSpec("inc", "items", {"n": SLOW}, batch_size=batch_size))
    runner = spawn(db_url, "run", "inc")
    wait_for(lambda: batches_done(db_url, "inc") >= batches, f"the runner's first {batches} batches")
    return runner


def test_pause_from_a_second_process_stops_the_runner_after_its_batch(
    conn: psycopg.Connection[Any], db_url: str, spawn: Callable[..., Runner]
) -> None:
    runner = _run_slow(conn, db_url, spawn, batch_size=10, batches=2)

    paused = run(db_url, "pause", "inc")
    runner_code = runner.process.wait(60)
    _consistent(conn, db_url, "inc")
    left_alone = run(db_url, "run", "--all")
    resumed = run(db_url, "resume", "inc")
    finished = run(db_url, "run", "inc", "--batch-size", "1000")

    assert (EXIT_OK, "backfill 'inc' paused: now paused\n") == (paused.returncode, paused.stdout)
    assert EXIT_WORK_LEFT == runner_code
    assert EXIT_OK == left_alone.returncode  # --all leaves a paused backfill alone
    assert "backfill 'inc' resumed: now running\n" == resumed.stdout
    assert EXIT_OK == finished.returncode, finished.stderr
    assert {1: ROWS} == _counts(conn)


def test_sigterm_finishes_the_current_batch_then_a_new_run_resumes_exactly_once(
    conn: psycopg.Connection[Any], db_url: str, spawn: Callable[..., Runner]
) -> None:
    runner = _run_slow(conn, db_url, spawn, batch_size=10, batches=3)

    runner.process.send_signal(signal.SIGTERM)
    code = runner.process.wait(60)
    _consistent(conn, db_url, "inc")
    stopped = backfill.get_backfill(db_url, "inc")
    rest = run(db_url, "run", "inc", "--batch-size", "1000")

    assert EXIT_WORK_LEFT == code, runner.stderr()
    events = runner.events()
    assert "stop_requested" in [e["event"] for e in events]
    assert ("work_left", "stop requested") == next(
        (e["outcome"], e["reason"]) for e in events if e["event"] == "run_finished"
    )
    assert (RunState.RUNNING, True) == (stopped.state, 0 < stopped.rows_updated < ROWS)
    assert EXIT_OK == rest.returncode, rest.stderr
    assert {1: ROWS} == _counts(conn)  # every row exactly once across the two runs


def test_a_second_signal_aborts_the_running_batch_and_rolls_it_back(
    conn: psycopg.Connection[Any], db_url: str, spawn: Callable[..., Runner]
) -> None:
    _register_stuck(conn, db_url)
    runner = spawn(db_url, "run", "stuck", "--statement-timeout", "1h")

    def sleeping() -> bool:
        return sessions(conn, BATCH_SLEEPING) > 0

    wait_for(sleeping, "the batch to be running")
    runner.process.send_signal(signal.SIGINT)
    # Two signals sent before the first is handled would count as one: wait until it was.
    wait_for(lambda: "stop_requested" in [e["event"] for e in runner.events()], "the first signal to be seen")
    assert sleeping()  # the first signal let the batch go on
    runner.process.send_signal(signal.SIGINT)
    code = runner.process.wait(60)

    assert EXIT_WORK_LEFT == code, runner.stderr()
    assert "run_aborted" in [e["event"] for e in runner.events()]
    wait_for(lambda: not sleeping(), "the cancelled statement to end on the server")
    assert {0: ROWS} == _counts(conn)  # rolled back
    record = backfill.get_backfill(db_url, "stuck")
    assert (RunState.RUNNING, 0, 0) == (record.state, record.rows_updated, record.batches)


def test_an_overlapping_run_exits_75_at_once_while_the_first_keeps_going(
    conn: psycopg.Connection[Any], db_url: str, spawn: Callable[..., Runner]
) -> None:
    first = _run_slow(conn, db_url, spawn, batch_size=5, batches=1)

    second = run(db_url, "run", "inc")
    second_all = run(db_url, "run", "--all")
    first_still_running = first.process.poll() is None
    first.process.send_signal(signal.SIGTERM)
    first_code = first.process.wait(60)

    assert EXIT_WORK_LEFT == second.returncode, second.stderr
    assert EXIT_WORK_LEFT == second_all.returncode, second_all.stderr
    assert {"inc": "busy"} == json.loads(second.stderr.splitlines()[-1])["outcomes"]
    assert first_still_running  # the second did not wait for the first: 400 batches take far longer
    assert EXIT_WORK_LEFT == first_code
    _consistent(conn, db_url, "inc")


def test_status_json_from_a_process(conn: psycopg.Connection[Any], db_url: str) -> None:
    _items(conn)
    backfill.run_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100), max_batches=4)

    result = run(db_url, "status", "--json")

    assert EXIT_OK == result.returncode
    (data,) = json.loads(result.stdout)
    assert (data["name"], data["table"], data["state"], data["rows_updated"], data["checkpoint"]) == (
        "inc", "public.items", "running", 400, ["400"]
    )  # fmt: skip
    assert "" == result.stderr


def test_bad_input_from_a_process_is_one_line_exit_2_no_traceback_nothing_written(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _items(conn)

    results = [
        run(db_url, "add", "x", "--table", "items", "--set", "n=n +"),
        run(db_url, "add", "x", "--table", "items", "--set", "n"),
        run(db_url, "run", "x", "--max-runtime", "soon"),
        run(db_url, "frobnicate"),
    ]

    for result in results:
        assert EXIT_USAGE == result.returncode
        assert 1 == len(result.stderr.strip().splitlines()), result.stderr
        assert "Traceback" not in result.stderr
    assert "expression for column 'n' of public.items is not valid" in results[0].stderr
    row = conn.execute("SELECT to_regclass('public.backfills')").fetchone()
    assert (None,) == row  # nothing written, not even the control tables


def test_run_all_finishes_a_backfill_an_alembic_migration_deferred_without_its_code(
    conn: psycopg.Connection[Any], db_url: str, tmp_path: Path
) -> None:
    _items(conn)
    engine = sqlalchemy.create_engine(
        make_url(db_url).set(drivername="postgresql+psycopg"), poolclass=sqlalchemy.pool.NullPool
    )
    with engine.connect() as connection:
        context = MigrationContext.configure(connection)
        with context.begin_transaction():
            alembic_ops.backfill("inc", "items", {"n": "n + 1"}, batch_size=300, defer=True,
                                 operations=Operations(context))  # fmt: skip
    engine.dispose()
    deferred = backfill.get_backfill(db_url, "inc")

    # A bare directory: no migration scripts, no application code, only the control table.
    result = subprocess.run(  # noqa: S603
        command(db_url, "run", "--all"), capture_output=True, text=True, timeout=120, env=_env(), cwd=tmp_path,
        check=False,
    )  # fmt: skip

    assert (RunState.PENDING, 0) == (deferred.state, deferred.rows_updated)
    assert EXIT_OK == result.returncode, result.stderr
    assert {1: ROWS} == _counts(conn)
    assert RunState.SUCCEEDED is backfill.get_backfill(db_url, "inc").state
