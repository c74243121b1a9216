"""An index must serve the walk, checked with the planner and not only the catalog: an index of another collation
or operator class cannot serve ``key > $1 ORDER BY key``, and a dropped index serves nothing; every batch would then
scan the whole table. Such a backfill is refused at the start, and a run whose batches slow down sharply asks the
planner again and stops with the reason instead of scanning the table thousands of times."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs
from support import at_poll

import backfill
from backfill import BackfillSpec, PlanError, RunOutcome, RunSettings, RunState
from backfill.executor import Executor
from backfill.pg.catalog import resolve
from backfill.pg.walk import check_walk
from backfill.testing import FakeClock, InMemoryStore

SPEC = BackfillSpec("w", "items", {"n": "n + 1"}, key=("k",))


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """A text key ``k``, unique through a constraint of the "C" collation (which cannot serve the walk of a column
    of the database's collation), and a plain btree index on (k) the tests replace or drop."""
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, k text NOT NULL, n integer NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO items (id, k) SELECT g, lpad(g::text, 8, '0') FROM generate_series(1, 3000) g")
    conn.execute('CREATE UNIQUE INDEX items_k_unique ON items ((k COLLATE "C"))')
    conn.execute("ANALYZE items")
    return conn


@pytest.mark.parametrize(
    "index",
    [
        'CREATE INDEX walk ON items ((k COLLATE "C"))',
        'CREATE INDEX walk ON items ((k COLLATE "POSIX"))',
        "CREATE INDEX walk ON items (k text_pattern_ops)",
        "CREATE INDEX walk ON items USING hash (k)",
        "CREATE INDEX walk ON items (id) INCLUDE (k)",
        "CREATE INDEX walk ON items (k) WHERE n = 0",
        "CREATE INDEX walk ON items (lower(k))",
    ],
    ids=["collation-C", "collation-POSIX", "text_pattern_ops", "hash", "include", "partial", "expression"],
)
def test_an_index_that_cannot_serve_the_walk_is_refused_before_anything_is_written(
    items: psycopg.Connection[Any], db_url: str, index: str
) -> None:
    items.execute(index)

    for attempt in (backfill.run_backfill, backfill.register_backfill):
        with pytest.raises(PlanError) as caught:
            attempt(db_url, SPEC)
        assert "(k)" in str(caught.value) and "scan" in str(caught.value)
    assert items.execute("SELECT to_regclass('public.backfills')").fetchone() == (None,)
    assert items.execute("SELECT count(*) FROM items WHERE n <> 0").fetchone() == (0,)


def test_the_check_asks_the_planner_not_the_catalog(items: psycopg.Connection[Any]) -> None:
    items.execute("CREATE INDEX walk ON items (k)")
    target = resolve(items, SPEC).target
    check_walk(items, target)  # the plain index serves it

    items.execute("DROP INDEX walk")  # the catalog check has passed; now only the planner can tell

    with pytest.raises(PlanError) as caught:
        check_walk(items, target)
    assert str(caught.value).startswith("no index of public.items serves the walk by (k): the batch look-ahead")
    assert "without a key range" in str(caught.value)  # a sequential scan, or a whole index read as a bitmap


def test_an_index_dropped_between_runs_is_found_at_the_next_start(items: psycopg.Connection[Any], db_url: str) -> None:
    items.execute("CREATE INDEX walk ON items (k)")
    first = backfill.run_backfill(db_url, SPEC.with_changes(batch_size=500), max_batches=2)
    assert first.outcome is RunOutcome.WORK_LEFT
    items.execute("DROP INDEX walk")

    with pytest.raises(PlanError, match="no btree index of public.items leads with"):
        backfill.run_backfill(db_url, "w")
    assert items.execute("SELECT count(*) FROM items WHERE n = 1").fetchone() == (1000,)


def test_an_index_dropped_mid_run_stops_the_run_after_the_first_slow_batch(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    rows = 100_000
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, k text NOT NULL, n integer NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO items (id, k) SELECT g, lpad(g::text, 8, '0') FROM generate_series(1, %s) g", (rows,))
    conn.execute('CREATE UNIQUE INDEX items_k_unique ON items ((k COLLATE "C"))')
    conn.execute("CREATE INDEX walk ON items (k)")
    conn.execute("VACUUM ANALYZE items")
    spec = SPEC.with_changes(batch_size=200)

    def batches() -> int:
        row = conn.execute("SELECT coalesce(sum(batches), 0)::int FROM backfill_slices").fetchone()
        return int(row[0]) if row else 0

    dropped_at: list[int] = []

    def drop_the_index() -> None:
        conn.execute("DROP INDEX walk")
        dropped_at.append(batches())

    # Dropped between the 20th and 21st batch, under a runner that planned with it (a thread polling for the 20th
    # batch could, on a loaded machine, wake up after the run had finished all 500).
    with capture_logs() as logs:
        report = backfill.run_backfill(db_url, spec, should_stop=at_poll(21, drop_the_index))

    assert dropped_at == [20]
    assert (report.outcome, report.state) == (RunOutcome.FAILED, RunState.FAILED)
    assert report.error is not None and "no index of public.items serves the walk by (k)" in report.error
    assert batches() - dropped_at[0] <= 3  # not the 480 full scans it would take to finish
    assert [e for e in logs if e["event"] == "walk_check"]
    record = backfill.get_backfill(db_url, "w")
    assert record.last_error == report.error
    done = conn.execute("SELECT count(*) FROM items WHERE n = 1").fetchone()
    assert done is not None and done[0] == record.rows_updated
    assert conn.execute("SELECT count(*) FROM items WHERE n > 1").fetchone() == (0,)


# --- the slowdown check, on the executor's loop with injected time -------------------------------------------------


def run_with_pace(paces: list[float], check: Callable[[], None]) -> tuple[backfill.RunReport, InMemoryStore]:
    store, clock = InMemoryStore.for_keys(range(1_000), batch_size=10), FakeClock()
    durations = iter(paces)
    store.before_batch = lambda request: clock.advance(next(durations, paces[-1]))
    executor = Executor(store, None, "test", RunSettings(), clock=clock, sleep=clock.sleep, check_walk=check)
    return executor.run(), store


def test_a_sharp_slowdown_asks_the_planner_and_a_lost_index_fails_the_run_at_once() -> None:
    calls: list[int] = []

    def lost_index() -> None:
        calls.append(1)
        raise PlanError("no index of public.t serves the walk by (id): ...")

    report, store = run_with_pace([0.01] * 10 + [0.08], lost_index)

    assert (report.outcome, report.batches, len(calls)) == (RunOutcome.FAILED, 11, 1)
    assert store.last_error == "no index of public.t serves the walk by (id): ..."


def test_a_slowdown_with_a_sound_plan_becomes_the_new_pace() -> None:
    calls: list[int] = []
    report, _ = run_with_pace([0.01] * 10 + [0.08] * 90, lambda: calls.append(1))

    assert report.outcome is RunOutcome.FINISHED
    assert len(calls) == 1  # checked once at the drop, not on every slow batch after it


@pytest.mark.parametrize(
    "paces",
    [[0.01, 0.03] * 50, [0.0005] * 10 + [0.004] * 90],
    ids=["3x-noise", "8x-but-4ms"],
)
def test_noise_or_a_slowdown_of_tiny_batches_is_not_checked(paces: list[float]) -> None:
    calls: list[int] = []

    report, _ = run_with_pace(paces, lambda: calls.append(1))

    assert report.outcome is RunOutcome.FINISHED
    assert calls == []
