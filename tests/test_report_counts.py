"""A run's report counts each row once, even when a server crash loses batches it had seen commit (batches commit
asynchronously, so the newest ones can vanish in a crash and are run again)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest
from support import at_poll

import backfill
from backfill import BackfillSpec, RetryPolicy, RunOutcome, RunSettings
from backfill.tools.embedded import EmbeddedServer


@pytest.fixture
def crashable() -> Iterator[EmbeddedServer]:
    """A server of the test's own whose WAL writer waits 10 s: commits not yet written are lost in a crash."""
    server = EmbeddedServer.create(
        os.environ.get("BACKFILL_TEST_PG_BIN") or None,
        {"fsync": "off", "full_page_writes": "off", "max_connections": "20", "wal_writer_delay": "10s"},
    )
    try:
        server.start()
        yield server
    finally:
        server.destroy()


def _committed_batches(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(batches), 0)::int FROM backfill_slices").fetchone()
    return row[0] if row else 0


def test_batches_lost_in_a_crash_are_counted_once(crashable: EmbeddedServer) -> None:
    url, rows = crashable.url, 3_000
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0, pad text)")
        conn.execute("INSERT INTO items (id) SELECT generate_series(1, %s)", (rows,))
        conn.execute("CHECKPOINT")
    seen: list[int] = []

    def crash() -> None:
        # On the runner's thread, between batches: the server dies at once (no shutdown checkpoint, WAL not yet
        # written is gone) and comes back; the runner's next batch reconnects.
        seen.append(_committed_batches(url))
        crashable.stop("immediate")
        crashable.start()
        seen.append(_committed_batches(url))

    crash_after_ten_batches = at_poll(11, crash)

    spec = BackfillSpec("inc", "items", {"n": "n + 1", "pad": "repeat('x', 50)"}, batch_size=100)
    settings = RunSettings(retry=RetryPolicy(initial_wait=0.02, max_wait=0.25, budget_seconds=60))
    report = backfill.run_backfill(url, spec, settings=settings, should_stop=crash_after_ten_batches)

    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall() == [(1, rows)]
    assert seen[0] == 10 and seen[1] < 10  # the crash did lose batches the runner had seen commit
    assert report.outcome is RunOutcome.FINISHED
    assert report.rows_updated == rows
    assert backfill.get_backfill(url, "inc").rows_updated == rows
