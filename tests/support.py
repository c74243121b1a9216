"""Helpers shared by the tests (imported as ``support``; pytest puts this folder on the path)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg

import backfill
from backfill import BackfillSpec, RunOutcome, RunReport

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], T], what: str, timeout: float = 60.0) -> T:
    """Poll ``condition`` until it is true, and return what it returned: synchronisation on an observable state,
    with a deadline."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


def at_poll(n: int, change: Callable[[], object]) -> Callable[[], bool]:
    """A ``should_stop`` that never stops the run and makes ``change`` at its ``n``-th poll. The runner polls it
    between batches, so the change lands under a runner that planned without it, after ``n - 1`` batches."""
    polls = 0

    def should_stop() -> bool:
        nonlocal polls
        polls += 1
        if polls == n:
            change()
        return False

    return should_stop


def make_items(
    conn: psycopg.Connection[Any], rows: int, columns: str = "n integer NOT NULL DEFAULT 0", *, analyze: bool = False
) -> psycopg.Connection[Any]:
    """Create the table ``items (id integer PRIMARY KEY, <columns>)`` most tests backfill, with ids 1..``rows`` (the
    other columns at their defaults), ANALYZEd when a test needs the planner's estimate. Returns ``conn``."""
    conn.execute(f"CREATE TABLE items (id integer PRIMARY KEY, {columns})")
    conn.execute("INSERT INTO items (id) SELECT generate_series(1, %s)", (rows,))
    if analyze:
        conn.execute("ANALYZE items")
    return conn


#: A batch of a backfill whose expression sleeps, running (pg_stat_activity, for :func:`sessions`).
BATCH_SLEEPING = "state = 'active' AND wait_event = 'PgSleep' AND query LIKE 'WITH _backfill_go%%'"
#: A writer of the simulated application waiting for a lock.
APPSIM_WAITING = "application_name = 'backfill-appsim' AND wait_event_type = 'Lock'"


def sessions(conn: psycopg.Connection[Any], where: str) -> int:
    """How many sessions ``pg_stat_activity`` shows that match the SQL condition ``where``."""
    row = conn.execute(f"SELECT count(*) FROM pg_stat_activity WHERE {where}").fetchone()
    return int(row[0]) if row else 0


def constraint_state(conn: psycopg.Connection[Any], name: str) -> tuple[str, bool] | None:
    """The constraint ``name``'s (contype, validated), None if there is none."""
    row = conn.execute("SELECT contype::text, convalidated FROM pg_constraint WHERE conname = %s", (name,)).fetchone()
    return None if row is None else (row[0], row[1])


def index_state(conn: psycopg.Connection[Any], name: str) -> tuple[bool, bool] | None:
    """The index ``name``'s (valid, unique), None if there is none."""
    row = conn.execute(
        "SELECT indisvalid, indisunique FROM pg_index WHERE indexrelid = to_regclass(%s)", (name,)
    ).fetchone()
    return None if row is None else (row[0], row[1])


# --- runners in processes of their own, to be killed without warning --------------------------------------------

_RUNNER = """
import json, sys, backfill
spec = backfill.BackfillSpec.from_dict(json.loads(sys.argv[2]))
print(backfill.run_backfill(sys.argv[1], spec, **json.loads(sys.argv[3])).outcome.value, flush=True)
"""


def start_runner(url: str, spec: BackfillSpec, *, stderr: int | None = None, **options: Any) -> subprocess.Popen[bytes]:
    """``run_backfill(url, spec, **options)`` in a new process (it prints the outcome to a discarded stdout)."""
    argv = [sys.executable, "-c", _RUNNER, url, json.dumps(spec.to_dict()), json.dumps(options)]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)  # noqa: S603


def rows_done(url: str) -> int:
    """Rows the backfills in ``url`` have updated, by their slices' counters (0 before the control tables exist)."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
            row = conn.execute("SELECT coalesce(sum(rows_updated), 0) FROM backfill_slices").fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row else 0


def kill_runners_at_random_instants(
    url: str,
    spec: BackfillSpec,
    *,
    rows: int,
    rng: random.Random,
    kills: int,
    rounds: int,
    batches_ahead: tuple[int, int] = (1, 1),
    max_delay: float,
    what: str = "progress",
) -> int:
    """Start a runner on ``spec``, let it commit between ``batches_ahead`` batches, then a random moment of up to
    ``max_delay`` seconds more (inside a batch, between two, or while it commits), and SIGKILL it; again, for up to
    ``rounds`` runners, until ``kills`` kills landed or all ``rows`` are done. Returns the kills that landed (a
    runner may finish first; it must then have succeeded)."""
    assert spec.batch_size is not None
    landed = 0
    for _ in range(rounds):
        done = rows_done(url)
        if done >= rows or landed == kills:
            break
        target = min(done + rng.randint(*batches_ahead) * spec.batch_size, rows)
        runner = start_runner(url, spec, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: rows_done(url) >= target or runner.poll() is not None, what)  # noqa: B023
            time.sleep(rng.uniform(0, max_delay))  # picks the kill instant; not a synchronisation
            runner.send_signal(signal.SIGKILL)
            _, stderr = runner.communicate(timeout=30)
            if runner.returncode == -signal.SIGKILL:
                landed += 1
            else:
                assert runner.returncode == 0, stderr.decode()
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.wait()
    return landed


def run_until(
    url: str,
    backfill_ref: BackfillSpec | str,
    done: Callable[[RunReport], bool] = lambda report: report.outcome is not RunOutcome.BUSY,
    timeout: float = 30.0,
    **options: Any,
) -> RunReport:
    """Run the backfill again until ``done`` holds for the report (by default: until it is not busy). A killed
    runner's server sessions end a moment after its process, and until then still hold their slices."""

    def attempt() -> RunReport | None:
        report = backfill.run_backfill(url, backfill_ref, **options)
        return report if done(report) else None

    report = wait_for(attempt, "a killed runner's sessions to go away", timeout)
    assert report is not None
    return report


def kill_after_batches(
    conn: psycopg.Connection[Any],
    process: subprocess.Popen[Any],
    batches: int,
    what: str,
    before_kill: Callable[[], object] = lambda: None,
) -> None:
    """SIGKILL ``process`` once the backfills of ``conn``'s database have committed ``batches`` batches (failing
    with its stderr if it ends before), after ``before_kill``; its stderr is closed."""
    try:

        def advanced() -> bool:
            if process.poll() is not None:
                error = process.stderr.read() if process.stderr else ""
                raise AssertionError(f"{what} ended early: {error.decode() if isinstance(error, bytes) else error}")
            exists = conn.execute("SELECT to_regclass('backfill_slices') IS NOT NULL").fetchone()
            if not (exists and exists[0]):
                return False
            row = conn.execute("SELECT coalesce(sum(batches), 0) FROM backfill_slices").fetchone()
            return bool(row and row[0] >= batches)

        wait_for(advanced, f"{batches} batches of {what}")
        before_kill()
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
        if process.stderr:
            process.stderr.close()


# --- an Alembic upgrade killed at each of its step boundaries ------------------------------------------------------

#: The structlog events logged once a step has committed: a DDL step, or a batch of a backfill.
STEP_EVENTS = ("ddl_step", "batch_committed")

_STEP_KILLER = """
import json, os, signal, sys
import structlog
import alembic.config, backfill, backfill.alembic, psycopg, sqlalchemy


def kill_after_the_step(logger, method, event):
    if event.get("event") in %(events)r:
        what = event.get("action") or event["event"]
        name = event.get("constraint") or event.get("index") or event.get("column") or str(event.get("checkpoint"))
        if [str(what), name] not in run["passed"]:
            print(json.dumps([str(what), name]), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    return event


for line in sys.stdin:
    run = json.loads(line)
    child = os.fork()
    if child == 0:
        structlog.configure(processors=[kill_after_the_step, structlog.processors.JSONRenderer()],
                            logger_factory=structlog.PrintLoggerFactory(sys.stderr))
        try:
            alembic.config.main(run["argv"])
        except SystemExit as exc:
            os._exit(1 if exc.code else 0)
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
"""


class StepKiller:
    """Runs ``alembic upgrade head`` of ``project`` again and again, each run in a process that SIGKILLs itself
    right after the first step it commits that no earlier run was killed after (from the step's own structlog
    event, so at a step boundary, never inside a step; a step a run redoes, such as ``CREATE OR REPLACE`` of a
    trigger's function, is let pass the second time), until a run ends by itself. The runs are forked from one
    process that imported everything once, so a run costs what its work costs, not an interpreter start."""

    def __init__(self, project: Path, url: str, stderr: Path) -> None:
        self.argv = ["-c", str(project / "alembic.ini"), "-x", f"url={url}", "upgrade", "head"]
        #: the steps (action or event, and the constraint, index, column or batch checkpoint) killed after so far
        self.killed_after: list[tuple[str, str]] = []
        self._err = stderr.open("wb")
        self.process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-c", _STEP_KILLER % {"events": STEP_EVENTS}],
            cwd=project,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )

    def run(self) -> tuple[str, str] | None:
        """One run: the step it was killed after, or None when it ran to the end."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"argv": self.argv, "passed": self.killed_after}) + "\n")
        self.process.stdin.flush()
        step = json.loads(self.process.stdout.readline())
        if isinstance(step, list):
            status = json.loads(self.process.stdout.readline())
            assert status["signal"] == signal.SIGKILL, status
            self.killed_after.append((step[0], step[1]))
            return self.killed_after[-1]
        assert step["code"] == 0, f"the upgrade failed (see {self._err.name})"
        return None

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(30)
        self._err.close()
