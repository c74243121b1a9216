"""Crashes and races: a runner killed at any instant neither loses nor repeats a batch, and only one runner works
on a backfill at a time, while a dead one never blocks it."""

from __future__ import annotations

import os
import random
import threading
from typing import Any

import psycopg
import pytest
from support import kill_runners_at_random_instants, make_items, rows_done, run_until, start_runner, wait_for

import backfill
from backfill import BackfillSpec, RunOutcome, RunReport

ROWS = 2_000
# Slow enough (about 25 ms a batch) that a kill lands mid-run, and often mid-batch.
SLOW = BackfillSpec("inc", "items", {"n": "n + 1 + length(pg_sleep(0.0004)::text)"}, batch_size=25)


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    return make_items(conn, ROWS)


def test_sigkill_at_random_instants_then_resume_updates_every_row_exactly_once(
    items: psycopg.Connection[Any], db_url: str
) -> None:
    rng = random.Random(os.environ.get("BACKFILL_TEST_SEED", "2"))

    # Each runner commits a random number of batches, then is killed without warning, often inside the next one.
    kills = kill_runners_at_random_instants(
        db_url, SLOW, rows=ROWS, rng=rng, kills=6, rounds=6, batches_ahead=(1, 8), max_delay=0.02
    )
    final = run_until(db_url, "inc")

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
        wait_for(lambda: rows_done(db_url) > 0, "the first runner's first batch")
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
    runner = start_runner(db_url, SLOW)
    wait_for(lambda: rows_done(db_url) > 0, "the runner's first batch")
    runner.kill()
    runner.wait()

    report = run_until(db_url, "inc")

    assert report.outcome is RunOutcome.FINISHED
    assert items.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall() == [(1, ROWS)]
