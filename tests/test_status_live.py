"""``status`` tells what runs now: live runners from the claims themselves, rate and ETA over a recent window and only
for a backfill that runs now."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import threading
import time
from typing import Any

import psycopg
import pytest
from support import make_items, start_runner, wait_for

import backfill
from backfill import BackfillSpec, BackfillStatus, BatchRecord, RunOutcome, RunSettings, RunState
from backfill.status import RATE_WINDOW_SECONDS
from backfill.store import BackfillRecord, SliceRecord

SLOW = "n + 1 + (SELECT 0 FROM pg_sleep(0.05))"


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    return make_items(conn, 2000, analyze=True)


def status(url: str, name: str = "inc") -> BackfillStatus:
    return backfill.backfill_status(url, name)[0]


def test_after_kill_9_of_two_workers_status_shows_no_live_runner_within_5_s(
    items: psycopg.Connection[Any], db_url: str
) -> None:
    spec = BackfillSpec("inc", "items", {"n": SLOW}, batch_size=20)
    backfill.register_backfill(db_url, spec)
    runner = start_runner(db_url, spec, workers=2)
    try:
        running = wait_for(
            lambda: (s := status(db_url)).rate and len(s.live_runners) == 2 and s, "both workers to run batches"
        )
        runner.send_signal(signal.SIGKILL)
        runner.wait(30)
        killed = time.monotonic()
        after = wait_for(lambda: not (s := status(db_url)).live_runners and s, "no live runner", timeout=5.0)
        seconds = time.monotonic() - killed
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()

    assert {(socket.gethostname(), runner.pid)} == {(r.host, r.pid) for r in running.live_runners}
    assert [0, 1] == sorted(r.slice for r in running.live_runners)
    assert running.eta_seconds is not None
    assert seconds < 5.0
    assert (after.record.state, after.rate, after.eta_seconds) == (RunState.RUNNING, None, None)
    assert all(piece.holder is None for piece in after.slices)


def test_a_runner_waiting_in_a_long_throttle_still_shows_live(items: psycopg.Connection[Any], db_url: str) -> None:
    stop = threading.Event()
    reports: list[backfill.RunReport] = []
    spec = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=20)
    backfill.register_backfill(db_url, spec)
    thread = threading.Thread(
        target=lambda: reports.append(
            backfill.run_backfill(db_url, spec, settings=RunSettings(sleep_between=600), should_stop=stop.is_set)
        )
    )
    thread.start()
    try:
        waiting = wait_for(
            lambda: (s := status(db_url)).throttle_reason == "sleep_between" and s, "the runner to wait between batches"
        )
        # Its last batch is long past as far as the heartbeat goes: the claim is what counts.
        items.execute("UPDATE backfill_slices SET heartbeat_at = now() - interval '1 hour'")
        later = status(db_url)
    finally:
        stop.set()
        thread.join(60)

    assert [(socket.gethostname(), os.getpid(), 0)] == [(r.host, r.pid, r.slice) for r in waiting.live_runners]
    assert [(socket.gethostname(), os.getpid(), 0)] == [(r.host, r.pid, r.slice) for r in later.live_runners]
    assert later.rate is not None and later.rate >= 0
    assert reports[0].outcome is RunOutcome.WORK_LEFT


def test_no_rate_or_eta_unless_the_backfill_runs_now(items: psycopg.Connection[Any], db_url: str) -> None:
    spec = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100)
    backfill.register_backfill(db_url, spec)
    pending = status(db_url)
    backfill.run_backfill(db_url, "inc", max_batches=3)
    work_left = status(db_url)  # a cron run that exited 75: running, nobody on it
    backfill.pause_backfill(db_url, "inc")
    paused = status(db_url)
    backfill.resume_backfill(db_url, "inc")
    items.execute("CREATE FUNCTION boom() RETURNS integer LANGUAGE plpgsql AS 'BEGIN RETURN 1 / 0; END'")
    backfill.run_backfill(db_url, spec.with_changes(values={"n": "n + boom()"}), force=True)
    failed = status(db_url)
    backfill.retry_backfill(db_url, "inc")
    retried = status(db_url)
    backfill.run_backfill(db_url, spec, force=True)
    succeeded = status(db_url)

    states = [s.record.state for s in (pending, work_left, paused, failed, retried, succeeded)]
    assert [
        RunState.PENDING,
        RunState.RUNNING,
        RunState.PAUSED,
        RunState.FAILED,
        RunState.PENDING,
        RunState.SUCCEEDED,
    ] == states
    for each in (pending, work_left, paused, failed, retried, succeeded):
        assert (each.rate, each.rows_per_second, each.eta_seconds, each.live_runners) == (None, None, None, [])
        assert (each.to_json()["rows_per_second"], each.to_json()["eta_seconds"]) == (None, None)
    assert 300 == work_left.record.rows_updated


# --- the rate window, as pure logic ----------------------------------------------------------------------------------

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.timezone.utc)


def _record(state: RunState, rows: int) -> BackfillRecord:
    spec = BackfillSpec("b", "t", {"n": "1"})
    return BackfillRecord(1, "b", spec, "f", state, ["9"], 100_000, None, NOW, NOW, NOW, None, rows_updated=rows)


def _batch(seconds_ago: float, rows: int, duration: float = 0.5) -> BatchRecord:
    return BatchRecord(0, NOW - dt.timedelta(seconds=seconds_ago), rows, duration, rows, 0, 0.0, None)


def _held(holder: str | None = "pid 7, role r, application backfill") -> SliceRecord:
    return SliceRecord(0, None, ["9"], ["5"], False, 0, 0, "host-a:4242:abc", NOW, holder=holder)


def test_rate_and_eta_come_from_the_batches_of_the_recent_window_only() -> None:
    old = [_batch(RATE_WINDOW_SECONDS + 100 + i, 10_000) for i in range(10)]  # a fast start, long ago
    recent = [_batch(19.5, 500), _batch(9.5, 500)]
    running = BackfillStatus(_record(RunState.RUNNING, 50_000), (_held(),), recent=(*old, *recent), as_of=NOW)

    # 1,000 rows from the start of the first recent batch (20 s ago) to now.
    assert running.rate == pytest.approx(50.0)
    assert running.eta_seconds == pytest.approx((100_000 - 50_000) / 50.0)
    assert [("host-a", 4242, 0)] == [(r.host, r.pid, r.slice) for r in running.live_runners]


def test_a_live_runner_without_a_batch_in_the_window_has_rate_zero_and_no_eta() -> None:
    waiting = BackfillStatus(_record(RunState.RUNNING, 5), (_held(),), recent=(_batch(600, 10),), as_of=NOW)
    nobody = BackfillStatus(_record(RunState.RUNNING, 5), (_held(None),), recent=(_batch(1, 10),), as_of=NOW)

    assert (waiting.rate, waiting.eta_seconds) == (0.0, None)
    assert (nobody.rate, nobody.eta_seconds, nobody.live_runners) == (None, None, [])
