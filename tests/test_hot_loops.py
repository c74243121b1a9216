"""No hot loops: a batch that exceeds statement_timeout at the smallest size is not retried back to back. It waits
like any retry, and after a few such timeouts the backfill fails with a message that says what to change (each
attempt held its row locks for the whole timeout)."""

from __future__ import annotations

from typing import Any

import psycopg
from structlog.testing import capture_logs

import backfill
from backfill import BackfillSpec, RetryPolicy, RunOutcome, RunSettings, RunState
from backfill.executor import Executor
from backfill.testing import FakeClock, InMemoryStore

TIMEOUT = "canceling statement due to statement timeout"


def test_timeouts_at_the_smallest_batch_back_off_then_fail_saying_what_to_change() -> None:
    store, clock = InMemoryStore.for_keys(range(1_000), batch_size=400), FakeClock()
    store.errors = [psycopg.errors.QueryCanceled(TIMEOUT) for _ in range(10_000)]
    policy = RetryPolicy(initial_wait=0.5, max_wait=10, min_batch_size=100)

    with capture_logs() as logs:
        report = Executor(store, None, "test", RunSettings(retry=policy), clock=clock, sleep=clock.sleep).run()

    retries = [(e["batch_size"], e["wait_s"]) for e in logs if e["event"] == "batch_retry"]
    assert report.outcome is RunOutcome.FAILED and store.state is RunState.FAILED
    # 400 -> 200 -> 100 at once (smaller batches are lighter); at 100 it can shrink no more: backoff, then give up.
    assert [size for size, _ in retries] == [200, 100, 100, 100]
    assert [wait for _, wait in retries][:2] == [0.0, 0.0]
    assert all(float(wait) >= 0.5 for _, wait in retries[2:])  # type: ignore[arg-type]
    assert len(store.errors) == 10_000 - 5
    assert store.last_error is not None
    assert "100 rows" in store.last_error and "statement_timeout (30s) 3 times" in store.last_error
    assert "--statement-timeout" in store.last_error and "--min-batch-size" in store.last_error
    assert report.error == store.last_error


def test_a_slow_spell_at_the_smallest_batch_is_ridden_out() -> None:
    store, clock = InMemoryStore.for_keys(range(300), batch_size=100), FakeClock()
    store.errors = [psycopg.errors.QueryCanceled(TIMEOUT) for _ in range(2)]
    policy = RetryPolicy(initial_wait=0.5, max_wait=10, min_batch_size=100)

    report = Executor(store, None, "test", RunSettings(retry=policy), clock=clock, sleep=clock.sleep).run()

    assert (report.outcome, report.retries) == (RunOutcome.FINISHED, 2)
    assert clock.slept >= 0.5 + 1.0  # two backoffs, not two retries back to back
    assert set(store.counts.values()) == {1}


def test_on_postgresql_a_batch_too_slow_at_the_smallest_size_fails_the_backfill_quickly(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO items (id) SELECT generate_series(1, 500)")
    # 20 ms per row: even the smallest batch (10 rows, 0.2 s) exceeds the 50 ms statement_timeout.
    spec = BackfillSpec("slow", "items", {"n": "n + 1 + length(pg_sleep(0.02)::text)"}, batch_size=40)
    policy = RetryPolicy(initial_wait=0.05, max_wait=0.2, budget_seconds=120, min_batch_size=10)
    settings = RunSettings(statement_timeout=0.05, retry=policy)

    with capture_logs() as logs:
        report = backfill.run_backfill(db_url, spec, settings=settings)

    retries = [e for e in logs if e["event"] == "batch_retry"]
    assert report.outcome is RunOutcome.FAILED
    assert [e["batch_size"] for e in retries] == [20, 10, 10, 10]
    assert all(float(e["wait_s"]) >= 0.05 for e in retries[2:])  # type: ignore[arg-type]
    record = backfill.get_backfill(db_url, "slow")
    assert record.state is RunState.FAILED
    assert record.last_error is not None and "exceeded statement_timeout (0.05s) 3 times" in record.last_error
    assert conn.execute("SELECT count(*) FROM items WHERE n <> 0").fetchone() == (0,)
