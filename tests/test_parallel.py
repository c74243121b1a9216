"""Scale-out: one backfill split into key-range slices and worked by several runners at once, coordinated by
PostgreSQL alone; every slice processed exactly once, even when a runner dies and another takes its slice over."""

from __future__ import annotations

import signal
from typing import Any

import psycopg
import pytest
from support import run_until, sessions, start_runner, wait_for

import backfill
from backfill import BackfillSpec, RunOutcome
from backfill.api import open_store
from backfill.pg.catalog import resolve
from backfill.policies import MaxRowsPerSecond, RunContext
from backfill.testing import FakeClock

SLOW = BackfillSpec("inc", "items", {"n": "n + 1 + length(pg_sleep(0.0005)::text)"}, batch_size=20)


def _make_items(conn: psycopg.Connection[Any], keys_sql: str) -> int:
    conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute(f"INSERT INTO items (id) {keys_sql}")
    conn.execute("ANALYZE items")
    row = conn.execute("SELECT count(*) FROM items").fetchone()
    assert row is not None
    return int(row[0])


def _slice_rows(conn: psycopg.Connection[Any]) -> list[tuple[int, int, bool, int]]:
    """Per slice: rows in its key range now, rows its counters say it updated, done, batches."""
    out = []
    for piece in backfill.get_slices(_url(conn), "inc"):
        lower = int(piece.lower_bound[0]) if piece.lower_bound else -1
        row = conn.execute(
            "SELECT count(*) FROM items WHERE id > %s AND id <= %s", (lower, int(piece.upper_bound[0]))
        ).fetchone()
        assert row is not None
        out.append((int(row[0]), piece.rows_updated, piece.done, piece.batches))
    return out


def _slices_started(conn: psycopg.Connection[Any]) -> int:
    """Slices with a committed batch (0 while the runner has not even created the control tables)."""
    if conn.execute("SELECT to_regclass('backfill_slices')").fetchone() == (None,):
        return 0
    row = conn.execute("SELECT count(*) FROM backfill_slices WHERE batches > 0").fetchone()
    return int(row[0]) if row else 0


def _url(conn: psycopg.Connection[Any]) -> str:
    info = conn.info
    return f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}"


def test_workers_split_the_range_and_update_every_row_once(conn: psycopg.Connection[Any], db_url: str) -> None:
    rows = _make_items(conn, "SELECT generate_series(1, 3000)")

    report = backfill.run_backfill(db_url, SLOW.with_changes(batch_size=100), workers=3)

    assert (report.outcome, report.rows_updated) == (RunOutcome.FINISHED, rows)
    assert conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall() == [(1, rows)]
    slices = _slice_rows(conn)
    assert len(slices) == 3
    assert all(done and in_range == updated for in_range, updated, done, _ in slices)


def test_uneven_keys_still_get_even_slices(conn: psycopg.Connection[Any], db_url: str) -> None:
    # A dense run of small keys, then keys a billion apart: slices are cut by rows, not by key values.
    rows = _make_items(
        conn,
        "SELECT generate_series(1, 1000) UNION ALL "
        "SELECT 10000 + g * 1000000000::bigint FROM generate_series(1, 1000) g",
    )

    backfill.run_backfill(db_url, SLOW.with_changes(batch_size=200), slices=4)

    counts = [in_range for in_range, *_ in _slice_rows(conn)]
    assert sum(counts) == rows
    assert len(counts) == 4
    assert max(counts) - min(counts) <= 1


def test_a_runner_elsewhere_takes_another_slice(conn: psycopg.Connection[Any], db_url: str) -> None:
    """Two separate runs (as on two machines) on a backfill split in two work at the same time, one slice each."""
    rows = _make_items(conn, "SELECT generate_series(1, 2000)")
    first = start_runner(db_url, SLOW, slices=2)
    try:
        wait_for(lambda: _slices_started(conn) > 0, "the first runner's first batch")
        second = backfill.run_backfill(db_url, "inc")
    finally:
        first.wait(timeout=60)

    slices = _slice_rows(conn)
    assert second.outcome in (RunOutcome.FINISHED, RunOutcome.WORK_LEFT)
    assert 0 < second.rows_updated < rows  # it did a share, not all, not nothing
    assert conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall() == [(1, rows)]
    assert all(done and in_range == updated for in_range, updated, done, _ in slices)


def test_killed_workers_slices_are_taken_over_from_their_checkpoints_exactly_once(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    rows = _make_items(conn, "SELECT generate_series(1, 2400)")
    runner = start_runner(db_url, SLOW, workers=2, slices=4)
    try:
        # Both workers have committed batches in their slices: kill the whole process without warning.
        wait_for(lambda: _slices_started(conn) >= 2, "two workers' batches")
        runner.send_signal(signal.SIGKILL)
        assert runner.wait() == -signal.SIGKILL
    finally:
        if runner.poll() is None:
            runner.kill()
    # The server has each batch whole once it is sent (one round trip): a batch in flight at the kill still commits
    # with its checkpoint. Count what the killed runner did once its sessions are gone.
    wait_for(
        lambda: sessions(conn, "datname = current_database() AND application_name = 'backfill'") == 0,
        "the killed runner's sessions to end",
    )
    before = _slice_rows(conn)
    half_done = [i for i, (in_range, updated, done, _) in enumerate(before) if 0 < updated < in_range]

    # The killed process's sessions end a moment after it: until then they still hold their slices.
    final = run_until(db_url, "inc", lambda report: report.outcome is RunOutcome.FINISHED, workers=3)

    assert half_done  # the kill did leave slices in the middle, to be taken over from their checkpoints
    assert final.outcome is RunOutcome.FINISHED
    assert conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall() == [(1, rows)]
    after = _slice_rows(conn)
    assert all(done and in_range == updated for in_range, updated, done, _ in after)
    assert final.rows_updated == rows - sum(updated for _, updated, _, _ in before)


def test_splitting_leaves_slices_held_by_live_runners_alone(conn: psycopg.Connection[Any], db_url: str) -> None:
    _make_items(conn, "SELECT generate_series(1, 1000)")
    backfill.register_backfill(db_url, SLOW)
    with open_store(db_url) as holder, open_store(db_url) as splitter:
        record = holder.get("inc")
        plan = resolve(holder.conn, record.spec)
        holder.start(record, plan)
        assert holder.try_claim(record.id, 0)

        unfinished = splitter.split(plan, record.id, 4)

        assert unfinished == 1
        assert [(s.lower_bound, s.upper_bound) for s in splitter.slices(record.id)] == [(None, ["1000"])]


def test_live_runners_are_counted_from_the_claims_whatever_the_last_batch(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _make_items(conn, "SELECT generate_series(1, 1000)")
    backfill.run_backfill(db_url, SLOW.with_changes(batch_size=50), slices=3, max_batches=2, workers=2)
    with open_store(db_url) as store, open_store(db_url) as other, open_store(db_url) as reader:
        backfill_id = reader.get("inc").id
        assert store.try_claim(backfill_id, 0) and store.try_claim(backfill_id, 1) and other.try_claim(backfill_id, 2)
        live = reader.live_runners(backfill_id)
        # A runner waiting on a long throttle commits no batch for minutes: it still shares the rate cap.
        conn.execute("UPDATE backfill_slices SET heartbeat_at = now() - interval '5 minutes'")
        waiting = reader.live_runners(backfill_id)
        other.close()  # its session ends: its claim with it (the server process exits after the client has gone)
        wait_for(lambda: reader.live_runners(backfill_id) < live, "the closed session's claim to end")
        after = reader.live_runners(backfill_id)

    assert (live, waiting, after) == (2, 2, 1)


@pytest.mark.parametrize(("sharers", "expected_wait"), [(1, 0.1), (2, 0.2), (4, 0.4)])
def test_the_rate_cap_is_divided_between_live_runners(sharers: int, expected_wait: float) -> None:
    clock = FakeClock()
    ctx = RunContext("b", 100, clock(), clock)
    ctx.record_batch(100, 0.0, 100)
    throttle = MaxRowsPerSecond(1_000, lambda: sharers)

    assert throttle(ctx) == pytest.approx(expected_wait)
