"""The executor's real loop against the in-memory store, with injected time: retries, throttle waits and batch
sizing, each run in milliseconds. Exactly-once is checked on every run (every key's counter ends at 1)."""

from __future__ import annotations

import psycopg
import pytest
from structlog.testing import capture_logs

from backfill import RunOutcome, RunSettings, RunState
from backfill.errors import ConnectError
from backfill.executor import Executor
from backfill.policies import LagReading, RetryPolicy, TransactionReading, VacuumReading, Wait
from backfill.store import BatchRequest, LockLostError
from backfill.testing import FakeClock, InMemoryStore


def pg_error(sqlstate: str, message: str = "boom") -> psycopg.Error:
    error: psycopg.Error = psycopg.errors.lookup(sqlstate)(message)
    return error


def executor(store: InMemoryStore, clock: FakeClock, settings: RunSettings | None = None, **kwargs: object) -> Executor:
    return Executor(store, None, "test", settings, clock=clock, sleep=clock.sleep, **kwargs)  # type: ignore[arg-type]


def events(logs: list[dict[str, object]], name: str) -> list[dict[str, object]]:
    return [entry for entry in logs if entry["event"] == name]


def exactly_once(store: InMemoryStore) -> bool:
    return sorted(store.counts) == store.keys and set(store.counts.values()) == {1}


# --- retries -------------------------------------------------------------------------------------------------------


def test_transient_errors_are_retried_with_growing_backoff_and_each_retry_is_logged() -> None:
    store, clock = InMemoryStore.for_keys(range(100), batch_size=10), FakeClock()
    store.errors = [
        pg_error("55P03", "canceling statement due to lock timeout"),
        pg_error("40P01", "deadlock detected"),
        pg_error("57P01", "terminating connection due to administrator command"),
        psycopg.OperationalError("server closed the connection unexpectedly"),
        ConnectError("cannot connect to postgresql://app@db/app: connection refused"),
    ]
    policy = RetryPolicy(initial_wait=1.0, max_wait=60.0)

    with capture_logs() as logs:
        report = executor(store, clock, RunSettings(retry=policy), random=lambda: 0.25).run()

    retries = events(logs, "batch_retry")
    assert report.outcome is RunOutcome.FINISHED
    assert report.retries == 5
    assert exactly_once(store)
    assert [r["reason"] for r in retries] == [
        "lock_timeout",
        "deadlock",
        "server_shutdown",
        "connection_lost",
        "cannot_connect",
    ]
    waits = [float(r["wait_s"]) for r in retries]  # type: ignore[arg-type]
    # Exponential (1, 2, 4, 8, 16 s) plus jitter: a quarter (the injected random number) of the 1 s jitter range.
    assert waits == [1.25, 2.25, 4.25, 8.25, 16.25]
    assert clock.slept == pytest.approx(sum(waits))


def test_a_permanent_error_fails_the_backfill_at_once_with_the_error_stored() -> None:
    store, clock = InMemoryStore.for_keys(range(100), batch_size=10), FakeClock()
    store.before_batch = lambda request: None
    store.errors = [pg_error("23505", 'duplicate key value violates unique constraint "items_pkey"')]

    with capture_logs() as logs:
        report = executor(store, clock).run()

    assert (report.outcome, report.state, report.retries) == (RunOutcome.FAILED, RunState.FAILED, 0)
    assert store.state is RunState.FAILED
    assert store.last_error == 'duplicate key value violates unique constraint "items_pkey" [SQLSTATE 23505]'
    assert report.error == store.last_error
    assert clock.sleeps == []
    assert events(logs, "backfill_failed")[0]["checkpoint_kept"] is True


def test_a_cancel_by_a_person_is_never_retried() -> None:
    store, clock = InMemoryStore.for_keys(range(100), batch_size=10), FakeClock()
    store.errors = [pg_error("57014", "canceling statement due to user request")]

    report = executor(store, clock).run()

    assert (report.outcome, report.retries) == (RunOutcome.FAILED, 0)
    assert store.last_error is not None and "user request" in store.last_error


def test_a_statement_timeout_halves_the_batch_and_the_run_goes_on() -> None:
    store, clock = InMemoryStore.for_keys(range(1_000), batch_size=400), FakeClock()
    store.errors = [pg_error("57014", "canceling statement due to statement timeout")] * 2

    with capture_logs() as logs:
        report = executor(store, clock, RunSettings(min_batch_size=50)).run()

    assert report.outcome is RunOutcome.FINISHED
    assert [r["reason"] for r in events(logs, "batch_retry")] == ["statement_timeout"] * 2
    assert store.requests[0].batch_size == 100  # 400 -> 200 -> 100
    assert clock.sleeps == []  # a smaller batch is retried at once: it failed for its size, not the database's state
    assert exactly_once(store)


def test_a_timeout_in_another_language_is_recognised_by_how_long_the_attempt_ran() -> None:
    store, clock = InMemoryStore.for_keys(range(100), batch_size=40), FakeClock()
    translated = pg_error("57014", "Abbruch der Anweisung wegen Zeitüberschreitung")
    attempts = iter([True, False])

    def slow_then_fine(request: BatchRequest) -> None:
        if next(attempts, False):
            clock.advance(5.0)  # ran into the 5 s statement_timeout
            store.errors.append(translated)

    store.before_batch = slow_then_fine

    report = executor(store, clock, RunSettings(statement_timeout=5.0, min_batch_size=10)).run()

    assert report.outcome is RunOutcome.FINISHED
    assert store.requests[0].batch_size == 20


def test_a_transient_error_that_outlives_the_budget_fails_the_backfill() -> None:
    store, clock = InMemoryStore.for_keys(range(100), batch_size=10), FakeClock()
    store.errors = [pg_error("55P03", "canceling statement due to lock timeout")] * 1_000

    with capture_logs() as logs:
        report = executor(store, clock, RunSettings(max_retry_seconds=120)).run()

    assert (report.outcome, store.state) == (RunOutcome.FAILED, RunState.FAILED)
    assert 120 <= clock() <= 135  # gave up once the 2-minute budget was spent (the last backoff may overrun it)
    assert store.last_error is not None and "lock timeout" in store.last_error
    assert events(logs, "retry_budget_spent")[0]["budget_seconds"] == 120


def test_the_default_retry_budget_rides_out_a_failover_of_several_minutes() -> None:
    store, clock = InMemoryStore.for_keys(range(100), batch_size=10), FakeClock()
    outage_ends = 5 * 60.0

    def server_down(request: BatchRequest) -> None:
        if clock() < outage_ends:
            store.errors.append(ConnectError("cannot connect: the database system is starting up"))

    store.before_batch = server_down

    report = executor(store, clock).run()

    assert report.outcome is RunOutcome.FINISHED
    assert outage_ends <= clock() <= outage_ends + 11  # back within one capped backoff of the server's return
    assert exactly_once(store)


def test_a_stop_request_during_a_retry_backoff_ends_the_run_without_failing_it() -> None:
    store, clock = InMemoryStore.for_keys(range(100), batch_size=10), FakeClock()
    store.errors = [pg_error("55P03")] * 1_000

    report = executor(store, clock, should_stop=lambda: clock() > 3.0).run()

    assert (report.outcome, report.state, report.reason) == (RunOutcome.WORK_LEFT, RunState.RUNNING, "stop requested")
    assert store.state is RunState.RUNNING
    assert store.last_error is None
    assert clock() < 4.0  # the backoff was cut short, in steps of at most half a second


def test_losing_the_slice_lock_after_a_reconnect_ends_the_run_as_busy() -> None:
    store, clock = InMemoryStore.for_keys(range(100), batch_size=10), FakeClock()
    store.errors = [LockLostError("another runner took slice 0 while this one reconnected")]

    report = executor(store, clock).run()

    assert (report.outcome, report.state, report.retries) == (RunOutcome.BUSY, RunState.RUNNING, 0)
    assert store.last_error is None


# --- throttles -----------------------------------------------------------------------------------------------------


class FakeHealth:
    """Health probes whose readings a test changes as the run goes on."""

    def __init__(self) -> None:
        self.lag = LagReading(0)
        self.vacuuming: list[VacuumReading] = []
        self.calls = 0

    def replica_lag(self) -> LagReading:
        self.calls += 1
        return self.lag

    def vacuums(self) -> list[VacuumReading]:
        return self.vacuuming

    def custom_check(self, query: str) -> bool:
        raise psycopg.errors.UndefinedTable('relation "flags" does not exist')

    def oldest_transaction(self) -> TransactionReading | None:
        return None

    def lock_waiters(self) -> int:
        return 0


def test_the_runner_waits_while_a_replica_lags_and_logs_why() -> None:
    store, clock, health = InMemoryStore.for_keys(range(100), batch_size=10), FakeClock(), FakeHealth()
    vacuum = VacuumReading(99, "public.items", "scanning heap", True, wraparound=True)

    def batch(request: BatchRequest) -> None:
        clock.advance(0.5)
        if len(store.requests) == 4:  # during the 5th batch, a replica falls behind and an anti-wraparound
            # autovacuum starts (the only kind the defaults wait for)
            health.lag = LagReading(1, 500 * 1024 * 1024, 42.0)
            health.vacuuming = [vacuum]

    store.before_batch = batch

    def recover() -> bool:
        if clock() >= 10.0:
            health.lag = LagReading(1, 1024, 0.1)
        if clock() >= 15.0:
            health.vacuuming = []
        return False

    with capture_logs() as logs:
        report = executor(
            store, clock, RunSettings(health_check_interval=1.0), health=health, should_stop=recover
        ).run()

    waits = events(logs, "throttle_wait")
    assert report.outcome is RunOutcome.FINISHED
    assert exactly_once(store)
    assert {w["reason"] for w in waits} == {"replica_lag", "vacuum_running"}
    assert waits[0]["lag_bytes"] == 500 * 1024 * 1024
    assert waits[-1]["reason"] == "vacuum_running"  # the lag cleared first, at t=10; vacuum ended at t=15
    assert 15.0 + 5 * 0.5 <= clock() <= 16.0 + 5 * 0.5  # then the last five batches
    assert 12.0 <= report.throttled_seconds <= 13.5


def test_a_waiting_runner_stops_when_asked() -> None:
    store, clock, health = InMemoryStore.for_keys(range(100), batch_size=10), FakeClock(), FakeHealth()
    health.lag = LagReading(1, 10**10, None)

    report = executor(store, clock, health=health, should_stop=lambda: clock() >= 30.0).run()

    assert (report.outcome, report.reason, report.batches) == (RunOutcome.WORK_LEFT, "stop requested", 0)
    assert 30.0 <= clock() <= 30.5


def test_a_long_wait_ends_at_the_runtime_budget() -> None:
    store, clock = InMemoryStore.for_keys(range(100), batch_size=10), FakeClock()
    forever = RunSettings(throttle=lambda ctx: Wait(3600, "maintenance_window"))

    report = executor(store, clock, forever).run(max_runtime=60)

    assert (report.outcome, report.reason) == (RunOutcome.WORK_LEFT, "max_runtime")
    assert 60.0 <= clock() <= 60.5


def test_a_probe_that_loses_its_connection_is_logged_and_the_batch_goes_on() -> None:
    store, clock = InMemoryStore.for_keys(range(30), batch_size=10), FakeClock()
    failures = iter([psycopg.OperationalError("server closed the connection unexpectedly")])

    def flaky(ctx: object) -> float:
        error = next(failures, None)
        if error is not None:
            raise error
        return 0.0

    with capture_logs() as logs:
        report = executor(store, clock, RunSettings(throttle=flaky)).run()

    assert report.outcome is RunOutcome.FINISHED
    assert events(logs, "health_check_failed")[0]["action"] == "batch goes on"


def test_a_health_check_that_can_never_work_fails_the_backfill() -> None:
    store, clock, health = InMemoryStore.for_keys(range(30), batch_size=10), FakeClock(), FakeHealth()

    report = executor(store, clock, RunSettings(health_check_sql="SELECT busy FROM flags"), health=health).run()

    assert (report.outcome, store.state) == (RunOutcome.FAILED, RunState.FAILED)
    assert store.last_error == 'health check failed: relation "flags" does not exist [SQLSTATE 42P01]'
    assert store.requests == []


def test_rows_per_second_cap_holds_over_the_run() -> None:
    store, clock = InMemoryStore.for_keys(range(1_000), batch_size=100), FakeClock()
    store.before_batch = lambda request: clock.advance(0.01)

    report = executor(store, clock, RunSettings(max_rows_per_second=500)).run()

    assert report.outcome is RunOutcome.FINISHED
    # Ten batches of 100 rows at 500 rows/s: nine paced gaps of 0.2 s between starts, then the last batch.
    assert clock() == pytest.approx(9 * 0.2 + 0.01)


def test_sleep_between_leaves_a_gap_after_each_batch() -> None:
    store, clock = InMemoryStore.for_keys(range(50), batch_size=10), FakeClock()

    report = executor(store, clock, RunSettings(sleep_between=0.25)).run()

    assert report.outcome is RunOutcome.FINISHED
    assert clock.sleeps == [0.25] * 4  # between five batches


# --- batch sizing in the loop --------------------------------------------------------------------------------------


def test_default_settings_size_batches_to_the_target_duration() -> None:
    store, clock = InMemoryStore.for_keys(range(2_000_000), batch_size=None), FakeClock()
    # A steady table: 3 ms per batch plus 4 µs per row -> 50 ms hold 11,750 rows.
    store.before_batch = lambda request: clock.advance(0.003 + request.batch_size * 0.000_004)

    with capture_logs() as logs:
        report = executor(store, clock).run(max_batches=30)

    durations = [float(e["ms"]) for e in events(logs, "batch_committed")]  # type: ignore[arg-type]
    assert report.batches == 30
    assert durations[0] == pytest.approx(43.0)  # DEFAULT_BATCH_SIZE (10,000) rows to start with
    for ms in durations[10:]:
        assert ms == pytest.approx(50.0, rel=0.05)


def test_a_batch_size_chosen_in_the_spec_is_kept() -> None:
    store, clock = InMemoryStore.for_keys(range(1_000), batch_size=100), FakeClock()
    store.before_batch = lambda request: clock.advance(0.001)

    report = executor(store, clock).run()

    assert report.batches == 10
    assert {request.batch_size for request in store.requests} == {100}


# --- slices ----------------------------------------------------------------------------------------------------------


def split(store: InMemoryStore, parts: int) -> None:
    """Start the backfill and split it, as ``run_backfill`` does before its workers start."""
    store.start(store.get("test"), None)
    assert parts == store.split(None, 1, parts)


def test_a_runner_claims_the_next_slice_once_one_is_done_and_finishes_the_backfill_after_the_last() -> None:
    store, clock = InMemoryStore.for_keys(range(90), batch_size=10), FakeClock()
    split(store, 3)

    report = executor(store, clock).run()

    assert (report.outcome, report.state, report.batches, report.rows_updated) == (
        RunOutcome.FINISHED,
        RunState.SUCCEEDED,
        9,
        90,
    )
    assert [0, 0, 0, 1, 1, 1, 2, 2, 2] == [request.slice for request in store.requests]
    assert exactly_once(store)


def test_a_slice_another_runner_holds_is_left_to_it_and_the_backfill_stays_running() -> None:
    store, clock = InMemoryStore.for_keys(range(60), batch_size=10), FakeClock()
    split(store, 2)
    other = store.sharing()
    assert other.try_claim(1, 1)

    report = executor(store, clock).run()

    assert (report.outcome, report.state, report.batches) == (RunOutcome.WORK_LEFT, RunState.RUNNING, 3)
    assert f"other runners hold the remaining slices (slice 1: {other.session})" == report.reason
    assert {request.slice for request in store.requests} == {0}
    assert sorted(store.counts) == list(range(30))
    assert store.state is RunState.RUNNING  # one slice done is not the backfill done

    other.release(1, 1)
    last = executor(store.sharing(), clock).run()
    assert (last.outcome, last.state, last.batches) == (RunOutcome.FINISHED, RunState.SUCCEEDED, 3)
    assert exactly_once(store)


def test_a_runner_that_finds_every_unfinished_slice_held_is_busy() -> None:
    store, clock = InMemoryStore.for_keys(range(60), batch_size=10), FakeClock()
    split(store, 2)
    other = store.sharing()
    assert other.try_claim(1, 0) and other.try_claim(1, 1)

    report = executor(store, clock).run()

    assert (report.outcome, report.state, report.batches) == (RunOutcome.BUSY, RunState.RUNNING, 0)
    assert store.counts == {}


def test_a_runner_that_loses_its_slice_mid_way_stops_as_busy_and_the_new_holder_goes_on_from_its_checkpoint() -> None:
    store, clock = InMemoryStore.for_keys(range(100), batch_size=10), FakeClock()
    other = store.sharing()

    def connection_lost_and_slice_taken(request: BatchRequest) -> None:
        if len(store.requests) == 2 and store.before_batch is not None:
            store.before_batch = None
            store.lose_connection()
            assert other.try_claim(1, 0)

    store.before_batch = connection_lost_and_slice_taken

    with capture_logs() as logs:
        report = executor(store, clock).run()

    assert (report.outcome, report.state, report.reason, report.batches) == (
        RunOutcome.BUSY,
        RunState.RUNNING,
        "lock lost",
        2,
    )
    assert ["connection_lost"] == [entry["reason"] for entry in events(logs, "batch_retry")]
    assert [0] == [entry["slice"] for entry in events(logs, "lock_lost")]
    other.release(1, 0)
    rest = executor(other, clock).run()
    assert (rest.outcome, rest.batches, other.requests[0].slice) == (RunOutcome.FINISHED, 8, 0)
    assert exactly_once(store)
