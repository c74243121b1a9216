"""Live settings: ``backfill set`` changes the pace of every live runner of a backfill without restarting it."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from support import make_items, wait_for

import backfill
from backfill import BackfillSpec, BatchRecord, RunOutcome, RunReport, RunSettings, SettingsError
from backfill.cli import EXIT_OK, EXIT_USAGE, cli
from backfill.errors import UnknownBackfillError
from backfill.executor import Executor
from backfill.testing import FakeClock, InMemoryStore

SPEC = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=20)


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    return make_items(conn, 4000, analyze=True)


@pytest.fixture
def background(db_url: str) -> Iterator[Callable[[RunSettings], list[RunReport]]]:
    """Start a runner of SPEC in a thread; it is stopped (after its current batch) at the end of the test."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(settings: RunSettings) -> list[RunReport]:
        reports: list[RunReport] = []
        backfill.register_backfill(db_url, SPEC)

        def run() -> None:
            reports.append(backfill.run_backfill(db_url, "inc", settings=settings, should_stop=stop.is_set))

        threads.append(threading.Thread(target=run))
        threads[-1].start()
        return reports

    yield start
    stop.set()
    for thread in threads:
        thread.join(60)


def _rate(batches: list[BatchRecord]) -> float:
    """Rows per second of consecutive batches: the rows after the first, over the time from its end to the last's."""
    seconds = (batches[-1].finished_at - batches[0].finished_at).total_seconds()
    return sum(b.rows for b in batches[1:]) / seconds


def test_set_max_rows_per_second_during_a_run_changes_the_measured_rate_within_a_second(
    items: psycopg.Connection[Any], db_url: str, background: Callable[[RunSettings], list[RunReport]]
) -> None:
    reports = background(RunSettings(max_rows_per_second=1_000))
    wait_for(lambda: len(backfill.batch_history(db_url, "inc")) >= 15, "batches at the first rate")

    changed = backfill.set_backfill_settings(db_url, "inc", max_rows_per_second=100)
    since = changed.updated_at + dt.timedelta(seconds=1)  # database time of the change, plus a second

    def after() -> list[BatchRecord]:
        return [b for b in backfill.batch_history(db_url, "inc") if b.finished_at > since]

    slow = wait_for(lambda: len(batches := after()) >= 5 and batches, "five batches at the new rate", timeout=30)
    fast = [b for b in backfill.batch_history(db_url, "inc") if b.finished_at < changed.updated_at]
    status = backfill.backfill_status(db_url, "inc")[0]

    assert {"max_rows_per_second": 100} == changed.overrides == status.overrides
    assert _rate(fast) > 300  # at most 1,000 rows/s, by 20-row batches
    assert _rate(slow) == pytest.approx(100, rel=0.2)
    assert reports == []  # still running: the change took no restart


def test_set_during_a_long_wait_applies_within_a_few_seconds_and_reset_clears_it(
    items: psycopg.Connection[Any], db_url: str, background: Callable[[RunSettings], list[RunReport]]
) -> None:
    background(RunSettings(sleep_between=600))
    wait_for(lambda: backfill.backfill_status(db_url, "inc")[0].throttle_reason == "sleep_between", "the long sleep")
    before = backfill.get_backfill(db_url, "inc").batches

    backfill.set_backfill_settings(db_url, "inc", sleep=0.01, max_rows_per_second=500)
    wait_for(lambda: backfill.get_backfill(db_url, "inc").batches >= before + 3, "batches again", timeout=10)
    record = backfill.set_backfill_settings(db_url, "inc", reset=True)

    assert {} == record.overrides


def test_the_executor_rebuilds_its_throttle_when_the_overrides_change() -> None:
    store, clock = InMemoryStore.for_keys(range(100), batch_size=10), FakeClock()
    store.set_overrides("test", {"sleep": 3.0})
    seen: list[float] = []

    def before_batch(request: object) -> None:
        seen.append(clock())
        if len(seen) == 3:
            store.set_overrides("test", {"sleep": 1.0})
        if len(seen) == 5:
            store.set_overrides("test", {}, reset=True)

    store.before_batch = before_batch
    report = Executor(store, None, "test", RunSettings(sleep_between=0.5), clock=clock, sleep=clock.sleep).run()

    assert report.outcome is RunOutcome.FINISHED
    # Batch 3 read the new override (the batch returns them): the wait after it is already the new one.
    assert [3.0, 3.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5] == [b - a for a, b in zip(seen[:-1], seen[1:], strict=True)]


def test_bad_settings_are_refused_and_nothing_is_stored(items: psycopg.Connection[Any], db_url: str) -> None:
    backfill.register_backfill(db_url, SPEC)
    refused = []
    for bad in (
        {},
        {"max_rows_per_second": -1},
        {"min_batch_size": 500, "max_batch_size": 100},
        {"max_batch_size": 0},
        {"target_batch_time": float("nan")},
    ):
        with pytest.raises(SettingsError) as error:
            backfill.set_backfill_settings(db_url, "inc", **bad)
        refused.append(str(error.value))
    with pytest.raises(UnknownBackfillError):
        backfill.set_backfill_settings(db_url, "nope", sleep=1)

    assert all("\n" not in message for message in refused)
    assert {} == backfill.get_backfill(db_url, "inc").overrides


def test_the_set_command_stores_and_shows_them_and_refuses_bad_input(
    items: psycopg.Connection[Any], db_url: str
) -> None:
    backfill.register_backfill(db_url, SPEC)

    def invoke(*args: str) -> Any:
        return CliRunner().invoke(cli, ["--url", db_url, *args])

    first = invoke("set", "inc", "--max-rows-per-second", "250", "--sleep", "200ms")
    second = invoke("set", "inc", "--target-batch-time", "off")
    shown = invoke("status", "inc")
    stored = backfill.get_backfill(db_url, "inc").overrides
    bad = invoke("set", "inc", "--max-rows-per-second", "fast")
    nothing = invoke("set", "inc")
    reset = invoke("set", "inc", "--reset")

    assert (EXIT_OK, EXIT_OK, EXIT_OK) == (first.exit_code, second.exit_code, shown.exit_code), first.output
    assert "--max-rows-per-second 250 --sleep 0.2" in first.output
    assert {"max_rows_per_second": 250, "sleep": 0.2, "target_batch_time": 0} == stored
    assert "live settings: --max-rows-per-second 250 --sleep 0.2 --target-batch-time 0" in shown.output
    assert (EXIT_USAGE, EXIT_USAGE) == (bad.exit_code, nothing.exit_code)
    assert (EXIT_OK, "no live settings") == (reset.exit_code, reset.output.split(": ", 1)[1].strip())
    assert {} == backfill.get_backfill(db_url, "inc").overrides
