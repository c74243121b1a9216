"""The simulated application writes until stopped, times every write, and counts its errors."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from support import APPSIM_WAITING, sessions, wait_for

from backfill.tools.appsim import AppSimulator


def _table(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY, hits integer NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO items (hits) SELECT 0 FROM generate_series(1, 100)")


def test_writers_update_and_insert_and_every_write_is_counted(conn: psycopg.Connection[Any], db_url: str) -> None:
    _table(conn)
    sim = AppSimulator(
        db_url,
        update_sql="UPDATE items SET hits = hits + 1 WHERE id = %s",
        insert_sql="INSERT INTO items (hits) VALUES (1)",
        writers=3,
        insert_every=4,
        key_range=(1, 100),
        seed=1,
    )

    with sim:
        sim.wait_until_writing()
        wait_for(lambda: sim.writes >= 200, "200 writes")
    stats = sim.stats

    assert stats is not None
    hits, inserted = conn.execute("SELECT sum(hits), count(*) - 100 FROM items").fetchone()  # type: ignore[misc]
    # Every write the simulator counted happened: updates add one hit, inserts add a row with one hit.
    assert stats.writes == hits
    assert inserted > 0 and hits > inserted
    assert (0, None) == (stats.errors, stats.last_error)
    assert 0 < stats.p50_ms <= stats.p99_ms <= stats.max_stall_ms
    assert stats.writes_per_second == pytest.approx(stats.writes / stats.seconds)


def test_the_longest_stall_covers_a_lock_the_writers_waited_for(conn: psycopg.Connection[Any], db_url: str) -> None:
    _table(conn)
    sim = AppSimulator(db_url, update_sql="UPDATE items SET hits = hits + 1 WHERE id = %s", writers=2, key_range=(1, 5))

    def waiting_writers() -> int:
        return sessions(conn, APPSIM_WAITING)

    with sim, psycopg.connect(db_url) as locker:
        sim.wait_until_writing()
        locker.execute("LOCK TABLE items IN EXCLUSIVE MODE")
        wait_for(lambda: waiting_writers() == 2, "both writers to block on the lock")
        blocked_at = time.perf_counter()
        locker.rollback()
        released_at = time.perf_counter()
        writes_before = sim.writes
        wait_for(lambda: sim.writes > writes_before, "writes after the lock is released")

    assert sim.stats is not None
    # The writers were blocked when we looked and stayed blocked until the release: their writes took at least that.
    assert sim.stats.max_stall_ms >= (released_at - blocked_at) * 1000
    assert 0 == sim.stats.errors


def test_errors_are_counted_and_quoted_not_swallowed(conn: psycopg.Connection[Any], db_url: str) -> None:
    _table(conn)
    sim = AppSimulator(db_url, update_sql="UPDATE no_such_table SET x = 1 WHERE id = %s", writers=1)

    with sim:
        wait_for(lambda: sim.snapshot().errors >= 2, "two failed writes")
        with pytest.raises(TimeoutError, match="no_such_table"):
            sim.wait_until_writing(timeout=0.1)
    stats = sim.stats

    assert stats is not None
    assert 0 == stats.writes
    assert stats.last_error is not None and 'relation "no_such_table" does not exist' in stats.last_error


def test_a_writer_still_blocked_at_stop_is_cancelled_and_its_wait_counts(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _table(conn)
    sim = AppSimulator(db_url, update_sql="UPDATE items SET hits = hits + 1 WHERE id = %s", writers=1, key_range=(1, 1))

    with psycopg.connect(db_url) as locker:
        locker.execute("SELECT 1 FROM items WHERE id = 1 FOR UPDATE")
        sim.start()
        wait_for(
            lambda: sessions(conn, APPSIM_WAITING) == 1,
            "the writer to block on the row lock",
        )
        stats = sim.stop(timeout=0.1)

    # Its one write never finished: not a write, not an error (stop cancelled it), but a stall at least as long as
    # the 0.1 s stop() waited for it before cancelling.
    assert (0, 0) == (stats.writes, stats.errors)
    assert stats.max_stall_ms >= 100
