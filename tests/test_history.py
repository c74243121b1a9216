"""Control tables version 2: the in-place upgrade of version 1, the batch history and the counters that only grow."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb
from support import make_items

import backfill
from backfill import BackfillSpec, ControlTablesOutdatedError, RunOutcome, RunSettings, RunState
from backfill.api import open_store
from backfill.executor import Executor
from backfill.pg.statements import HISTORY_PER_SLICE
from backfill.store import BatchRequest
from backfill.testing import FakeClock, InMemoryStore

SPEC = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=50)

#: The control tables as the first release of version 1 made them (before the claim columns were added to it).
VERSION_1 = [
    """CREATE TABLE backfill_meta (
         singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), version integer NOT NULL)""",
    """CREATE TABLE backfills (
         id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL UNIQUE, spec jsonb NOT NULL,
         fingerprint text NOT NULL,
         state text NOT NULL DEFAULT 'pending'
           CHECK (state IN ('pending', 'running', 'paused', 'succeeded', 'failed', 'cancelled')),
         upper_bound jsonb, estimated_rows bigint, last_error text, created_at timestamptz NOT NULL DEFAULT now(),
         started_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz)""",
    """CREATE TABLE backfill_slices (
         backfill_id bigint NOT NULL REFERENCES backfills (id) ON DELETE CASCADE, slice integer NOT NULL,
         lower_bound jsonb, upper_bound jsonb NOT NULL, checkpoint jsonb, done boolean NOT NULL DEFAULT false,
         rows_updated bigint NOT NULL DEFAULT 0, batches bigint NOT NULL DEFAULT 0, owner text,
         heartbeat_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (backfill_id, slice))""",
    "INSERT INTO backfill_meta (version) VALUES (1)",
    "REVOKE ALL ON backfill_meta, backfills, backfill_slices FROM PUBLIC",
]


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    return make_items(conn, 300)


def _version_1_with_progress(conn: psycopg.Connection[Any], db_url: str) -> None:
    """Version-1 tables holding backfill "inc" with its first 100 rows done, as a runner of that release left it."""
    for statement in VERSION_1:
        conn.execute(statement)
    spec = backfill.plan_backfill(db_url, SPEC).spec
    conn.execute(
        "INSERT INTO backfills (name, spec, fingerprint, state, upper_bound, estimated_rows, started_at) "
        "VALUES ('inc', %s, %s, 'running', '[\"300\"]', 300, now())",
        (Jsonb(spec.to_dict()), spec.fingerprint()),
    )
    conn.execute(
        "INSERT INTO backfill_slices (backfill_id, slice, upper_bound, checkpoint, rows_updated, batches) "
        "SELECT id, 0, '[\"300\"]', '[\"100\"]', 100, 2 FROM backfills"
    )
    conn.execute("UPDATE items SET n = 1 WHERE id <= 100")


def test_version_1_tables_are_refused_with_the_fix_until_init_upgrades_them_in_place(
    items: psycopg.Connection[Any], db_url: str
) -> None:
    _version_1_with_progress(items, db_url)

    with pytest.raises(ControlTablesOutdatedError) as refused:
        backfill.run_backfill(db_url, "inc")
    with pytest.raises(ControlTablesOutdatedError):
        backfill.backfill_status(db_url)
    untouched = items.execute("SELECT count(*) FROM items WHERE n = 1").fetchone()
    backfill.init_control_tables(db_url)
    backfill.init_control_tables(db_url)  # idempotent
    report = backfill.run_backfill(db_url, "inc")

    message = str(refused.value)
    assert "\n" not in message and "version 1" in message and "`backfill init`" in message
    assert (100,) == untouched
    assert [(2,)] == items.execute("SELECT version FROM backfill_meta").fetchall()
    assert (report.outcome, report.rows_updated, report.batches) == (RunOutcome.FINISHED, 200, 4)
    assert {1: 300} == dict(items.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall())
    # Claims work on the upgraded slices, and the batches after the upgrade are in the history.
    assert [50, 50, 50, 50] == [batch.rows for batch in backfill.batch_history(db_url, "inc")]
    record = backfill.get_backfill(db_url, "inc")
    assert (4 + 2, 300) == (record.batches, record.rows_updated)


def test_each_batch_writes_its_history_row_in_its_own_transaction(items: psycopg.Connection[Any], db_url: str) -> None:
    report = backfill.run_backfill(db_url, SPEC, max_batches=3)
    items.execute("CREATE FUNCTION boom() RETURNS integer LANGUAGE plpgsql AS 'BEGIN RETURN 1 / 0; END'")
    failed = backfill.run_backfill(db_url, SPEC.with_changes(values={"n": "n + boom()"}), force=True)
    history = backfill.batch_history(db_url, "inc")

    assert (report.batches, failed.outcome) == (3, RunOutcome.FAILED)
    # The failed batch rolled back whole: its history row with it.
    assert [(0, 50, 50, 0, 0.0, None)] * 3 == [
        (b.slice, b.rows, b.batch_size, b.retries, b.throttle_wait, b.throttle_reason) for b in history
    ]
    assert history[0].finished_at <= history[1].finished_at <= history[2].finished_at
    assert all(0 < b.duration < 30 for b in history)


def test_the_history_keeps_a_ring_of_the_last_batches_of_each_slice(
    items: psycopg.Connection[Any], db_url: str
) -> None:
    items.execute("INSERT INTO items (id) SELECT generate_series(301, %s)", (HISTORY_PER_SLICE + 20,))
    backfill.run_backfill(db_url, SPEC.with_changes(batch_size=1))

    rows = items.execute("SELECT count(*), min(batch), max(batch) FROM backfill_batches").fetchone()
    history = backfill.batch_history(db_url, "inc", limit=5)

    assert (HISTORY_PER_SLICE, 21, HISTORY_PER_SLICE + 20) == rows
    assert 5 == len(history) and history == sorted(history, key=lambda b: b.finished_at)
    assert backfill.get_backfill(db_url, "inc").batches == HISTORY_PER_SLICE + 20


def test_a_batch_adds_its_waits_and_retries_to_the_counters_and_its_history_row(
    items: psycopg.Connection[Any], db_url: str
) -> None:
    backfill.register_backfill(db_url, SPEC)
    with open_store(db_url) as store:
        record = store.get("inc")
        plan = backfill.plan_backfill(db_url, SPEC)
        store.start(record, plan)
        assert store.try_claim(record.id, 0, "me")

        def batch(waits: dict[str, float], retries: dict[str, int]) -> None:
            request = BatchRequest(record.id, 0, 50, "me", 5.0, 30.0, waits=waits, retries=retries)
            assert store.run_batch(plan, request).applied

        batch({"replica_lag": 2.5, "sleep_between": 0.5}, {"lock_timeout": 2})
        batch({"replica_lag": 1.0}, {"lock_timeout": 1, "deadlock": 1})
        store.add_counters(record.id, 0, {"max_rows_per_second": 0.25}, {})  # a run that ended after a wait
        piece = store.slices(record.id)[0]
        history = store.history(record.id, 10)

    assert {"replica_lag": 3.5, "sleep_between": 0.5, "max_rows_per_second": 0.25} == piece.throttle_seconds
    assert {"lock_timeout": 3, "deadlock": 1} == piece.retries
    assert [(3.0, "replica_lag", 2), (1.0, "replica_lag", 2)] == [
        (b.throttle_wait, b.throttle_reason, b.retries) for b in history
    ]
    status = backfill.backfill_status(db_url, "inc")[0]
    assert (status.throttle_wait_by_reason, status.retries_by_reason) == (piece.throttle_seconds, piece.retries)


def test_the_executor_sends_each_wait_and_retry_once_with_the_next_batch_or_at_the_end() -> None:
    store, clock = InMemoryStore.for_keys(range(100), batch_size=10), FakeClock()
    store.errors = [psycopg.errors.lookup("55P03")("canceling statement due to lock timeout")]
    settings = RunSettings(sleep_between=2.0)

    report = Executor(store, None, "test", settings, clock=clock, sleep=clock.sleep, random=lambda: 0.0).run(
        max_batches=3
    )
    piece = store.slices(1)[0]

    assert report.batches == 3
    assert [dict(r.waits) for r in store.requests] == [{}, {"sleep_between": 2.0}, {"sleep_between": 2.0}]
    assert [dict(r.retries) for r in store.requests] == [{"lock_timeout": 1}, {}, {}]
    assert ({"sleep_between": 4.0}, {"lock_timeout": 1}) == (piece.throttle_seconds, piece.retries)
    # A wait the run ended in (no batch after it) is written when the runner lets go of the slice.
    again = Executor(store, None, "test", settings, clock=clock, sleep=clock.sleep)
    assert again.run(max_runtime=1.0).outcome is RunOutcome.WORK_LEFT
    assert store.slices(1)[0].throttle_seconds["sleep_between"] == pytest.approx(4.0 + 1.0)
    assert RunState.RUNNING is store.state
