"""Crashes and races: a runner killed at any instant neither loses nor repeats a batch, and only one runner works
on a backfill at a time, while a dead one never blocks it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import wait_for

import backfill
from backfill import BackfillSpec, RunOutcome, RunReport

ROOT = Path(__file__).resolve().parent.parent
ROWS = 2_000
# Slow enough (about 25 ms a batch) that a kill lands mid-run, and often mid-batch.
SLOW = BackfillSpec("inc", "items", {"n": "n + 1 + length(pg_sleep(0.0004)::text)"}, batch_size=25)

RUNNER = textwrap.dedent(
    """
    import sys, backfill
    spec = backfill.BackfillSpec.from_dict({spec!r})
    report = backfill.run_backfill(sys.argv[1], spec)
    print(report.outcome.value)
    """
)


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO items (id) SELECT generate_series(1, %s)", (ROWS,))
    return conn


def _rows_done(conn: psycopg.Connection[Any]) -> int:
    if conn.execute("SELECT to_regclass('backfill_slices')").fetchone() == (None,):
        return 0
    row = conn.execute("SELECT coalesce(sum(rows_updated), 0) FROM backfill_slices").fetchone()
    return int(row[0]) if row else 0


def _run_until_not_busy(db_url: str, backfill_ref: BackfillSpec | str) -> RunReport:
    # A killed runner's server session ends a moment after the process: until then it still holds the slice.
    deadline = time.monotonic() + 30
    while True:
        report = backfill.run_backfill(db_url, backfill_ref)
        if report.outcome is not RunOutcome.BUSY or time.monotonic() > deadline:
            return report
        time.sleep(0.01)


def test_sigkill_at_random_instants_then_resume_updates_every_row_exactly_once(
    items: psycopg.Connection[Any], db_url: str
) -> None:
    script = RUNNER.format(spec=SLOW.to_dict())
    rng = random.Random(os.environ.get("BACKFILL_TEST_SEED", "2"))
    kills = 0
    for _ in range(6):
        done_before = _rows_done(items)
        if done_before >= ROWS:
            break
        runner = subprocess.Popen([sys.executable, "-c", script, db_url], cwd=ROOT, stdout=subprocess.DEVNULL)
        try:
            # Let it commit a random number of batches, then kill it without warning.
            target = min(done_before + rng.randint(1, 8) * SLOW.batch_size, ROWS)
            wait_for(
                lambda t=target, r=runner: _rows_done(items) >= t or r.poll() is not None,  # type: ignore[misc]
                "progress",
            )
            time.sleep(rng.random() * 0.02)  # a random instant inside the next batch, not a synchronisation
            runner.send_signal(signal.SIGKILL)
            kills += runner.wait() == -signal.SIGKILL
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.wait()

    final = _run_until_not_busy(db_url, "inc")

    assert kills >= 5
    assert final.outcome is RunOutcome.FINISHED
    assert items.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall() == [(1, ROWS)]
    # The counters were committed with the rows, so they agree with them too.
    assert backfill.get_backfill(db_url, "inc").rows_updated == ROWS


def test_a_second_runner_gets_busy_and_does_no_work(items: psycopg.Connection[Any], db_url: str) -> None:
    backfill.register_backfill(db_url, SLOW)
    first: list[RunReport] = []
    thread = threading.Thread(target=lambda: first.append(backfill.run_backfill(db_url, "inc")))
    thread.start()
    try:
        wait_for(lambda: _rows_done(items) > 0, "the first runner's first batch")
        second = backfill.run_backfill(db_url, "inc")
    finally:
        thread.join()

    assert (second.outcome, second.batches, second.rows_updated) == (RunOutcome.BUSY, 0, 0)
    assert first[0].outcome is RunOutcome.FINISHED
    assert first[0].rows_updated == ROWS
    assert items.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall() == [(1, ROWS)]


def test_runners_started_together_split_nothing_and_repeat_nothing(items: psycopg.Connection[Any], db_url: str) -> None:
    backfill.init_control_tables(db_url)
    barrier = threading.Barrier(4)
    reports: list[RunReport] = []

    def race() -> None:
        barrier.wait()
        reports.append(backfill.run_backfill(db_url, SLOW.with_changes(batch_size=200)))

    threads = [threading.Thread(target=race) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    outcomes = sorted(r.outcome.value for r in reports)
    assert outcomes.count("finished") >= 1
    assert set(outcomes) <= {"finished", "busy"}
    assert sum(r.rows_updated for r in reports) == ROWS
    assert items.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall() == [(1, ROWS)]


def test_a_runner_whose_process_died_does_not_block_the_backfill(items: psycopg.Connection[Any], db_url: str) -> None:
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER.format(spec=SLOW.to_dict()), db_url], cwd=ROOT, stdout=subprocess.DEVNULL
    )
    wait_for(lambda: _rows_done(items) > 0, "the runner's first batch")
    runner.kill()
    runner.wait()

    report = _run_until_not_busy(db_url, "inc")

    assert report.outcome is RunOutcome.FINISHED
    assert items.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall() == [(1, ROWS)]
