"""Policies as specifications: what each throttle waits for and why, how batch sizes adapt, which errors are
retried. Pure logic with injected time and probes; the last section runs the real health probes on PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs
from support import wait_for

import backfill
from backfill import BackfillSpec, RunOutcome, RunSettings, SettingsError
from backfill.errors import ConnectError
from backfill.pg.health import PostgresHealth
from backfill.policies import (
    AdaptiveSize,
    CustomCheck,
    ErrorKind,
    FixedSize,
    FixedSleep,
    LagReading,
    LockWaiters,
    Longest,
    LongTransactions,
    MaxRowsPerSecond,
    ReplicaLag,
    RetryPolicy,
    RunContext,
    Sum,
    TransactionReading,
    VacuumReading,
    VacuumRunning,
    Wait,
    no_throttle,
)
from backfill.testing import FakeClock
from backfill.tools.embedded import EmbeddedServer


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(now=100.0)


def context(clock: FakeClock, batch_size: int = 1_000) -> RunContext:
    return RunContext("test", batch_size, clock(), clock)


def commit_batch(ctx: RunContext, clock: FakeClock, rows: int, seconds: float) -> None:
    """What the executor does around a batch: time passes while it runs, then it is recorded."""
    clock.advance(seconds)
    ctx.record_batch(rows, seconds, ctx.batch_size)


# --- Wait and composition ------------------------------------------------------------------------------------------


def test_a_wait_is_a_number_of_seconds_with_a_reason() -> None:
    wait = Wait(1.5, "replica_lag", lag_bytes=10)

    assert (float(wait), wait.reason, wait.details) == (1.5, "replica_lag", {"lag_bytes": 10})
    assert float(Wait(-3, "late")) == 0.0


def test_longest_waits_for_the_most_demanding_throttle_and_keeps_its_reason(clock: FakeClock) -> None:
    ctx = context(clock)
    combined = FixedSleep(0.2) | (lambda c: Wait(3.0, "custom_reason")) | no_throttle
    commit_batch(ctx, clock, 10, 0.01)

    wait = combined(ctx)

    assert isinstance(combined, Longest)
    assert len(combined.throttles) == 3  # flattened, not nested
    assert (float(wait), getattr(wait, "reason", None)) == (3.0, "custom_reason")


def test_sum_adds_waits() -> None:
    ctx = context(FakeClock())
    total = Sum(lambda c: Wait(1.0, "a"), lambda c: Wait(2.0, "b"))

    wait = total(ctx)

    assert (float(wait), getattr(wait, "reason", None)) == (3.0, "b")
    assert float((FixedSleep(0.5) + no_throttle)(ctx)) == 0.0  # nothing has run yet: no sleep owed


# --- time-based throttles ------------------------------------------------------------------------------------------


def test_fixed_sleep_counts_from_the_end_of_the_last_batch(clock: FakeClock) -> None:
    ctx, throttle = context(clock), FixedSleep(0.1)
    assert throttle(ctx) == 0.0  # no batch yet

    commit_batch(ctx, clock, 100, 0.05)
    clock.advance(0.03)  # the executor already spent 30 ms elsewhere

    wait = throttle(ctx)
    assert float(wait) == pytest.approx(0.07)
    assert getattr(wait, "reason", None) == "sleep_between"
    clock.advance(0.07)
    assert throttle(ctx) == 0.0


def test_rows_per_second_cap_paces_each_batch_and_never_pays_back_a_long_pause(clock: FakeClock) -> None:
    ctx, throttle = context(clock), MaxRowsPerSecond(2_000)
    commit_batch(ctx, clock, 1_000, 0.2)  # 1,000 rows may take 0.5 s at 2,000 rows/s: 0.3 s left

    assert float(throttle(ctx)) == pytest.approx(0.3)
    assert getattr(throttle(ctx), "reason", None) == "max_rows_per_second"

    clock.advance(60)  # a long wait for something else
    commit_batch(ctx, clock, 1_000, 0.1)

    assert float(throttle(ctx)) == pytest.approx(0.4)  # still paced: the idle minute earns no burst


# --- database throttles, with injected probes ----------------------------------------------------------------------


class Probe:
    """Returns the readings given, in order (the last one repeats), and counts calls."""

    def __init__(self, *readings: Any) -> None:
        self.readings = list(readings)
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.readings[min(self.calls, len(self.readings)) - 1]


def test_replica_lag_waits_while_a_replica_is_too_far_behind_in_bytes_or_seconds(clock: FakeClock) -> None:
    ctx = context(clock)
    by_bytes = ReplicaLag(Probe(LagReading(1, 200_000_000, 0.5)), max_bytes=64_000_000, poll=2.0)
    by_time = ReplicaLag(Probe(LagReading(2, 1_000, 30.0)), max_bytes=64_000_000, max_seconds=10.0)
    healthy = ReplicaLag(Probe(LagReading(1, 1_000, 0.1)), max_bytes=64_000_000, max_seconds=10.0)
    no_replica = ReplicaLag(Probe(LagReading(0)), max_bytes=0, max_seconds=0.0)

    wait = by_bytes(ctx)

    assert (float(wait), getattr(wait, "reason", None)) == (2.0, "replica_lag")
    assert getattr(wait, "details", {})["lag_bytes"] == 200_000_000
    assert getattr(by_time(ctx), "reason", None) == "replica_lag"
    assert (healthy(ctx), no_replica(ctx)) == (0.0, 0.0)


def test_a_healthy_probe_is_rechecked_at_most_every_interval_but_each_time_while_waiting(clock: FakeClock) -> None:
    # (The replica-lag throttle adapts its interval to the lag instead: see test_replica_lag.py.)
    ctx = context(clock)
    busy, fine = [VacuumReading(4242, "public.items", "scanning heap", True)], []
    probe = Probe(fine, fine, busy, busy, fine, fine)
    throttle = VacuumRunning(probe, every=5.0, poll=1.0)

    results = []
    for step in (0.0, 1.0, 1.0, 3.5, 1.0, 1.0, 1.0, 1.0):  # time between successive questions
        clock.advance(step)
        results.append(float(throttle(ctx)))

    # t=0 probe (fine); t=1,2 cached; t=5.5 probe (fine); t=6.5 cached; t=7.5 cached...
    assert results == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert probe.calls == 2
    clock.advance(3.0)  # t=13.5: due again, and now a vacuum runs
    assert float(throttle(ctx)) == 1.0
    clock.advance(1.0)
    assert float(throttle(ctx)) == 1.0  # waiting: probed again at once
    clock.advance(1.0)
    assert throttle(ctx) == 0.0
    assert probe.calls == 5


def test_by_default_only_an_anti_wraparound_vacuum_makes_the_runner_wait(clock: FakeClock) -> None:
    """An ordinary autovacuum cleans up the backfill's own dead rows and may run for hours: the runner works on.
    One run to prevent wraparound cannot be cancelled and must not be starved: the runner waits for it."""
    ordinary = VacuumReading(4242, "public.items", "scanning heap", True)
    wraparound = VacuumReading(4243, "public.items", "scanning heap", True, wraparound=True)
    policy = RunSettings(health_check_interval=1.0).policies(FakeHealth([ordinary]))[0]
    assert policy(context(clock)) == 0.0

    policy = RunSettings(health_check_interval=1.0).policies(FakeHealth([ordinary, wraparound]))[0]
    wait = policy(context(clock))

    assert getattr(wait, "reason", None) == "vacuum_running"
    assert getattr(wait, "details", {})["pid"] == 4243
    assert getattr(wait, "details", {})["wraparound"] is True


@pytest.mark.parametrize(
    ("setting", "waits_for_ordinary", "waits_for_wraparound"),
    [
        ("wraparound", False, True),
        ("any", True, True),
        (True, True, True),
        ("off", False, False),
        (False, False, False),
    ],
)
def test_wait_for_vacuum_chooses_which_vacuums_hold_the_runner(
    clock: FakeClock, setting: bool | str, waits_for_ordinary: bool, waits_for_wraparound: bool
) -> None:
    ordinary = VacuumReading(1, "public.items", "scanning heap", False)
    wraparound = VacuumReading(2, "public.items", "scanning heap", True, wraparound=True)
    waits = []
    for reading in (ordinary, wraparound):
        policy = RunSettings(wait_for_vacuum=setting).policies(FakeHealth([reading]))[0]
        waits.append(policy(context(clock)) > 0)
    assert waits == [waits_for_ordinary, waits_for_wraparound]


def test_wait_for_vacuum_rejects_other_values() -> None:
    with pytest.raises(SettingsError, match="wait_for_vacuum must be 'wraparound', 'any' or 'off'"):
        RunSettings(wait_for_vacuum="sometimes")


def test_vacuum_on_the_table_makes_the_runner_wait(clock: FakeClock) -> None:
    ctx = context(clock)
    running = VacuumRunning(Probe([VacuumReading(4242, "public.items", "scanning heap", True)]))
    idle = VacuumRunning(Probe([]))

    wait = running(ctx)

    assert getattr(wait, "reason", None) == "vacuum_running"
    assert getattr(wait, "details", {})["pid"] == 4242
    assert idle(ctx) == 0.0


def test_custom_check_waits_while_the_query_returns_true(clock: FakeClock) -> None:
    ctx = context(clock)
    probe = Probe(True, False)
    throttle = CustomCheck(probe, "SELECT busy FROM app_flags", every=0.0)

    assert getattr(throttle(ctx), "reason", None) == "health_check_sql"
    assert throttle(ctx) == 0.0


def test_long_transactions_and_lock_waiters(clock: FakeClock) -> None:
    ctx = context(clock)
    old = TransactionReading(77, 900.0, "idle in transaction", "report")
    young = TransactionReading(78, 5.0, "active", "app")

    assert getattr(LongTransactions(Probe(old), 300.0)(ctx), "reason", None) == "long_transaction"
    assert LongTransactions(Probe(young), 300.0)(ctx) == 0.0
    assert LongTransactions(Probe(None), 300.0)(ctx) == 0.0
    assert getattr(LockWaiters(Probe(2))(ctx), "reason", None) == "lock_waiters"
    assert LockWaiters(Probe(0))(ctx) == 0.0


# --- batch sizing --------------------------------------------------------------------------------------------------


def steady_table(size: int) -> float:
    """A steady table: 2 ms of per-batch overhead plus 5 µs per row (200,000 rows/s)."""
    return 0.002 + size * 0.000_005


def drive(sizer: AdaptiveSize, ctx: RunContext, clock: FakeClock, batches: int, cost: Any = steady_table) -> list[int]:
    sizes = []
    for _ in range(batches):
        ctx.batch_size = sizer(ctx)
        sizes.append(ctx.batch_size)
        commit_batch(ctx, clock, ctx.batch_size, cost(ctx.batch_size))
    return sizes


@pytest.mark.parametrize("start", [1_000, 10_000, 80_000])
def test_adaptive_size_converges_on_the_target_within_ten_batches(clock: FakeClock, start: int) -> None:
    sizer, ctx = AdaptiveSize(0.1, 100, 100_000), context(clock, start)

    sizes = drive(sizer, ctx, clock, 12)

    # 0.1 s = 2 ms + 5 µs * n  ->  n = 19,600 rows
    assert sizes[0] == start
    for size in sizes[9:]:
        assert steady_table(size) == pytest.approx(0.1, rel=0.05)


def test_one_slow_batch_does_not_collapse_the_size(clock: FakeClock) -> None:
    sizer, ctx = AdaptiveSize(0.1, 100, 100_000), context(clock, 19_600)
    drive(sizer, ctx, clock, 10)
    settled = ctx.batch_size

    drive(sizer, ctx, clock, 1, cost=lambda size: 10 * steady_table(size))  # one batch ten times slower
    after_slow = sizer(ctx)

    assert settled * 0.6 < after_slow < settled


def test_adaptive_size_leaves_the_round_trip_out_of_the_batch_cost(clock: FakeClock) -> None:
    """A database 10 ms away: the batch's wall time includes a round trip that no size can shorten. Sized by the
    database's own time, batches converge on the same size as next to the database instead of shrinking."""
    sizer, ctx = AdaptiveSize(0.1, 100, 100_000), context(clock, 10_000)
    for _ in range(12):
        ctx.batch_size = sizer(ctx)
        database = steady_table(ctx.batch_size)
        clock.advance(database + 0.010)
        ctx.record_batch(ctx.batch_size, database + 0.010, ctx.batch_size, database_seconds=database)

    assert steady_table(ctx.batch_size) == pytest.approx(0.1, rel=0.05)  # 19,600 rows, not 17,600


def test_where_few_rows_change_the_key_range_stretches_past_max_size_by_time(clock: FakeClock) -> None:
    """max_size caps rows changed (held locked), not the key range walked: with 1 row in 100 matching the filter,
    the range grows until a batch takes the target time."""
    sparse, ctx = AdaptiveSize(0.1, 100, 5_000), context(clock, 1_000)
    for _ in range(15):
        ctx.batch_size = sparse(ctx)
        commit_batch(ctx, clock, ctx.batch_size // 100, steady_table(ctx.batch_size))
    dense = drive(AdaptiveSize(0.1, 100, 5_000), context(clock, 1_000), clock, 15)

    assert steady_table(ctx.batch_size) == pytest.approx(0.1, rel=0.05)  # about 19,600 rows of key range
    assert ctx.last_batch_rows <= 5_000
    assert max(dense) == 5_000


def test_adaptive_size_stays_within_bounds(clock: FakeClock) -> None:
    fast, slow = AdaptiveSize(1.0, 100, 5_000), AdaptiveSize(0.001, 300, 100_000)

    assert max(drive(fast, context(clock, 1_000), clock, 10)) == 5_000
    assert min(drive(slow, context(clock, 1_000), clock, 10)[1:]) == 300


def test_a_statement_timeout_halves_the_rate_estimate(clock: FakeClock) -> None:
    sizer, ctx = AdaptiveSize(0.1, 100, 100_000), context(clock, 19_600)
    drive(sizer, ctx, clock, 10)
    before = sizer(ctx)

    ctx.timeouts += 1  # the executor counts a batch that hit statement_timeout (and retried it at half size)
    ctx.batch_size //= 2

    assert sizer(ctx) == pytest.approx(before / 2, rel=0.01)


def test_fixed_size_keeps_the_size_it_is_given(clock: FakeClock) -> None:
    ctx = context(clock, 321)
    assert FixedSize()(ctx) == 321


def test_adaptive_size_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="target_seconds"):
        AdaptiveSize(0)
    with pytest.raises(ValueError, match="min_size"):
        AdaptiveSize(0.1, 500, 100)


# --- retry classification ------------------------------------------------------------------------------------------


def pg_error(sqlstate: str, message: str = "boom") -> psycopg.Error:
    error: psycopg.Error = psycopg.errors.lookup(sqlstate)(message)
    return error


@pytest.mark.parametrize("sqlstate", ["55P03", "40P01", "40001", "57P01", "57P02", "57P03", "08006", "08001"])
def test_transient_sqlstates_are_retried(sqlstate: str) -> None:
    assert RetryPolicy().classify(pg_error(sqlstate)) is ErrorKind.TRANSIENT


def test_a_broken_connection_and_a_failed_reconnect_are_retried() -> None:
    policy = RetryPolicy()

    assert policy.classify(psycopg.OperationalError("server closed the connection unexpectedly")) is (
        ErrorKind.TRANSIENT
    )
    assert policy.classify(ConnectError("cannot connect to db: connection refused")) is ErrorKind.TRANSIENT


def test_a_statement_timeout_shrinks_the_batch_but_a_cancel_by_a_person_is_permanent() -> None:
    policy = RetryPolicy()
    timeout = pg_error("57014", "canceling statement due to statement timeout")
    cancel = pg_error("57014", "canceling statement due to user request")

    assert policy.classify(timeout) is ErrorKind.TOO_BIG
    assert policy.classify(cancel) is ErrorKind.PERMANENT
    # A translated server message: the attempt's duration still tells a timeout.
    assert policy.classify(pg_error("57014", "Abbruch wegen Zeitüberschreitung"), timed_out=True) is (ErrorKind.TOO_BIG)


@pytest.mark.parametrize(
    "error",
    [pg_error("23505"), pg_error("22012"), pg_error("42703"), pg_error("23502"), ValueError("bug")],
    ids=["unique_violation", "division_by_zero", "undefined_column", "not_null_violation", "python_bug"],
)
def test_permanent_errors_are_not_retried(error: Exception) -> None:
    assert RetryPolicy().classify(error) is ErrorKind.PERMANENT


# --- settings ------------------------------------------------------------------------------------------------------


class FakeHealth:
    def __init__(self, vacuums: list[VacuumReading] | None = None) -> None:
        self.vacuuming = vacuums or []

    def replica_lag(self) -> LagReading:
        return LagReading(0)

    def vacuums(self) -> list[VacuumReading]:
        return self.vacuuming

    def custom_check(self, query: str) -> bool:
        return False

    def oldest_transaction(self) -> TransactionReading | None:
        return None

    def lock_waiters(self) -> int:
        return 0


def test_defaults_are_safe_for_a_production_primary() -> None:
    settings = RunSettings()

    throttle, sizer, retry = settings.policies(FakeHealth())

    assert isinstance(sizer, AdaptiveSize) and sizer.target_seconds == 0.05  # the longest stall it may cause
    assert isinstance(throttle, Longest)
    assert [type(t) for t in throttle.throttles] == [ReplicaLag, VacuumRunning]
    assert retry.budget_seconds >= 300  # rides out a failover


def test_every_setting_turns_its_throttle_on() -> None:
    settings = RunSettings(
        sleep_between=0.1,
        max_rows_per_second=5_000,
        max_transaction_age=600,
        wait_for_lock_waiters=True,
        health_check_sql="SELECT false",
    )

    throttle, _, _ = settings.policies(FakeHealth())

    assert isinstance(throttle, Longest)
    assert {type(t) for t in throttle.throttles} == {
        FixedSleep,
        MaxRowsPerSecond,
        ReplicaLag,
        VacuumRunning,
        LongTransactions,
        LockWaiters,
        CustomCheck,
    }


def test_without_database_probes_only_time_based_throttles_apply() -> None:
    assert RunSettings().policies()[0] is no_throttle
    assert isinstance(RunSettings(sleep_between=0.5).policies()[0], FixedSleep)


def test_a_chosen_batch_size_pins_the_size() -> None:
    assert isinstance(RunSettings().policies(spec_batch_size=None)[1], AdaptiveSize)
    assert isinstance(RunSettings().policies(spec_batch_size=500)[1], FixedSize)
    assert isinstance(RunSettings(batch_size=2_000).policies()[1], FixedSize)
    assert isinstance(RunSettings(target_batch_seconds=None).policies()[1], FixedSize)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lock_timeout": 0}, "lock_timeout must be a positive number"),
        ({"target_batch_seconds": -1}, "target_batch_seconds must be a positive number"),
        ({"sleep_between": -0.5}, "sleep_between must be a number >= 0"),
        ({"min_batch_size": 500, "max_batch_size": 100}, "min_batch_size \\(500\\) is larger than max_batch_size"),
        ({"health_check_sql": "  "}, "health_check_sql is empty"),
        ({"max_rows_per_second": float("inf")}, "max_rows_per_second must be a positive number"),
    ],
)
def test_settings_that_make_no_sense_are_refused_with_the_field_named(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        RunSettings(**changes)


# --- the real probes on PostgreSQL ---------------------------------------------------------------------------------


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0, pad text)")
    conn.execute("INSERT INTO items (id, pad) SELECT g, repeat('x', 200) FROM generate_series(1, 3000) g")
    return conn


@pytest.fixture
def health(db_url: str, items: psycopg.Connection[Any]) -> Iterator[PostgresHealth]:
    with psycopg.connect(db_url, autocommit=True) as probe_conn:
        yield PostgresHealth(lambda: probe_conn, "public", "items")


@contextlib.contextmanager
def slow_vacuum(db_url: str) -> Iterator[int]:
    """A manual VACUUM of ``items`` slowed to a crawl by cost-based delay; yields its pid, cancels it on exit."""
    conn = psycopg.connect(db_url, autocommit=True)
    pid = conn.info.backend_pid
    conn.execute("SET vacuum_cost_delay = 100")
    conn.execute("SET vacuum_cost_limit = 1")
    done = threading.Event()

    def vacuum() -> None:
        with contextlib.suppress(psycopg.errors.QueryCanceled):
            conn.execute("VACUUM items")
        done.set()

    worker = threading.Thread(target=vacuum, daemon=True)
    worker.start()
    try:
        yield pid
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            wait_for(
                lambda: done.is_set() or admin.execute("SELECT pg_cancel_backend(%s)", (pid,)) and done.wait(0.2),
                "the vacuum to stop",
            )
        worker.join()
        conn.close()


def test_probes_on_a_quiet_server_see_no_replica_no_vacuum_and_no_waiters(health: PostgresHealth) -> None:
    assert health.replica_lag() == LagReading(replicas=0, lag_bytes=None, lag_seconds=None)
    assert health.vacuums() == []
    assert health.lock_waiters() == 0
    assert health.oldest_transaction() is None


def test_vacuum_probe_sees_a_vacuum_working_on_the_table(db_url: str, health: PostgresHealth) -> None:
    with slow_vacuum(db_url) as pid:
        seen = wait_for(health.vacuums, "the vacuum to show in pg_stat_progress_vacuum")

    assert [(v.pid, v.relation, v.autovacuum, v.wraparound) for v in seen] == [(pid, "items", False, False)]


def test_oldest_transaction_probe_finds_a_transaction_holding_back_xmin(db_url: str, health: PostgresHealth) -> None:
    with psycopg.connect(db_url, application_name="reporting") as other:
        # A report in a repeatable-read transaction keeps its snapshot, and so the xmin horizon, until it ends.
        other.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        other.execute("SELECT count(*) FROM items")
        found = health.oldest_transaction()
        pid = other.info.backend_pid

    assert found is not None
    assert (found.pid, found.application_name) == (pid, "reporting")
    assert found.age_seconds >= 0


def test_lock_waiters_probe_counts_sessions_queued_for_the_table(db_url: str, health: PostgresHealth) -> None:
    # ACCESS EXCLUSIVE (a DDL, say) held: even a plain read queues behind it.
    with psycopg.connect(db_url) as holder, psycopg.connect(db_url, autocommit=True) as waiter:
        holder.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        blocked = threading.Thread(target=lambda: waiter.execute("SELECT count(*) FROM items"), daemon=True)
        blocked.start()
        assert wait_for(health.lock_waiters, "a session to queue for the table") == 1
        holder.commit()
        blocked.join()

    assert health.lock_waiters() == 0


def test_custom_check_runs_the_users_query_as_written(health: PostgresHealth) -> None:
    assert health.custom_check("SELECT count(*) > 1000 FROM items WHERE pad LIKE 'x%'") is True
    assert health.custom_check("SELECT false") is False
    assert health.custom_check("SELECT true WHERE false") is False  # no row: nothing to wait for


def test_a_probe_runs_read_only_under_its_own_timeouts_which_end_with_it(health: PostgresHealth) -> None:
    # The probe's settings share its one pipelined round trip: they must still apply to the query, and only to it.
    assert health.custom_check(
        "SELECT current_setting('statement_timeout') = '5s' AND current_setting('lock_timeout') = '1s' "
        "AND current_setting('transaction_read_only') = 'on'"
    )
    conn = health.connection()
    assert conn.execute(
        "SELECT current_setting('statement_timeout'), current_setting('transaction_read_only')"
    ).fetchone() == ("0", "off")


def test_a_probe_that_writes_or_fails_raises_and_the_next_probe_works(health: PostgresHealth) -> None:
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        health.custom_check("WITH w AS (UPDATE items SET pad = 'written' WHERE id = 1 RETURNING 1) SELECT true")
    with pytest.raises(psycopg.errors.DivisionByZero):
        health.custom_check("SELECT 1 / 0 = 1")

    assert health.custom_check("SELECT count(*) = 0 FROM items WHERE pad = 'written'") is True
    assert health.replica_lag().replicas == 0


def test_the_vacuum_probe_tells_a_real_anti_wraparound_autovacuum_and_the_default_waits_for_it() -> None:
    """A table whose oldest transaction ID is older than its autovacuum_freeze_max_age gets an autovacuum "to
    prevent wraparound" even with autovacuum disabled on it; slowed down, it is seen at work."""
    server = EmbeddedServer.create(
        os.environ.get("BACKFILL_TEST_PG_BIN") or None, {"fsync": "off", "autovacuum_naptime": "1"}
    )
    try:
        server.start()
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id integer PRIMARY KEY, pad text) WITH (autovacuum_enabled = off)")
            conn.execute("INSERT INTO items SELECT g, repeat('x', 200) FROM generate_series(1, 3000) g")
            conn.execute(
                "ALTER TABLE items SET (autovacuum_freeze_max_age = 100000, autovacuum_vacuum_cost_delay = 100, "
                "autovacuum_vacuum_cost_limit = 1)"
            )
            # 100,100 subtransactions that write: each takes a transaction ID of its own.
            conn.execute("CREATE TABLE burn (i integer)")
            conn.execute(
                "DO $$ BEGIN FOR i IN 1..100100 LOOP BEGIN INSERT INTO burn VALUES (i); "
                "EXCEPTION WHEN others THEN NULL; END; END LOOP; END $$"
            )
            health = PostgresHealth(lambda: conn, "public", "items")

            seen = wait_for(health.vacuums, "an anti-wraparound autovacuum on items")
            wait = VacuumRunning(health.vacuums, only_wraparound=True, poll=0.5)(context(FakeClock()))

        assert [(v.relation, v.autovacuum, v.wraparound) for v in seen] == [("items", True, True)]
        assert getattr(wait, "reason", None) == "vacuum_running"
        assert getattr(wait, "details", {})["wraparound"] is True
    finally:
        server.destroy()


def test_a_backfill_waits_while_vacuum_works_on_its_table_then_finishes(
    db_url: str, items: psycopg.Connection[Any]
) -> None:
    settings = RunSettings(health_check_interval=0.05, wait_for_vacuum="any")
    result: list[backfill.RunReport] = []
    with capture_logs() as logs, slow_vacuum(db_url):
        wait_for(lambda: items.execute("SELECT count(*) FROM pg_stat_progress_vacuum").fetchone() == (1,), "vacuum")
        runner = threading.Thread(
            target=lambda: result.append(backfill.run_backfill(db_url, SPEC, settings=settings)), daemon=True
        )
        runner.start()
        wait_for(lambda: any(e.get("reason") == "vacuum_running" for e in logs), "the runner to wait for vacuum")
        assert items.execute("SELECT count(*) FROM items WHERE n > 0").fetchone() == (0,)
    runner.join(timeout=30)

    assert result[0].outcome is RunOutcome.FINISHED
    assert result[0].throttled_seconds > 0
    assert items.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall() == [(1, 3000)]


def test_a_backfill_waits_while_the_custom_check_is_true(db_url: str, items: psycopg.Connection[Any]) -> None:
    items.execute("CREATE TABLE busy (until_tick integer)")
    items.execute("INSERT INTO busy VALUES (3)")
    items.execute("CREATE TABLE ticks (t integer)")
    ticks = iter(range(1_000))

    def should_stop() -> bool:
        items.execute("INSERT INTO ticks VALUES (%s)", (next(ticks),))  # time passes, as the runner sees it
        return False

    settings = RunSettings(health_check_sql="SELECT count(*) < 3 FROM ticks", health_check_interval=0.01)
    with capture_logs() as logs:
        report = backfill.run_backfill(db_url, SPEC, settings=settings, should_stop=should_stop)

    waits = [e for e in logs if e["event"] == "throttle_wait"]
    assert report.outcome is RunOutcome.FINISHED
    assert waits and {e["reason"] for e in waits} == {"health_check_sql"}
    assert items.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall() == [(1, 3000)]


def test_an_invalid_custom_check_fails_the_backfill_before_any_batch(
    db_url: str, items: psycopg.Connection[Any]
) -> None:
    settings = RunSettings(health_check_sql="SELECT busy FROM no_such_table")

    report = backfill.run_backfill(db_url, SPEC, settings=settings)

    assert report.outcome is RunOutcome.FAILED
    assert report.error is not None and report.error.startswith("health check failed: ")
    assert "no_such_table" in report.error
    assert backfill.get_backfill(db_url, "inc").last_error == report.error
    assert items.execute("SELECT count(*) FROM items WHERE n > 0").fetchone() == (0,)


SPEC = BackfillSpec("inc", "items", {"n": "n + 1"})
