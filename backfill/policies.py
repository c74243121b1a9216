"""Policies: small callables over one :class:`RunContext` that decide how fast, how big and when to retry.

A throttle returns how many seconds to wait before the next batch (0 to go on), as a :class:`Wait` that says why;
the executor waits, then asks again, until every throttle lets the batch go. A sizer returns the next batch size. A
:class:`RetryPolicy` tells transient errors from permanent ones and how long to keep trying. Throttles combine with
``|`` (wait as long as the most demanding one asks) and ``+`` (add their waits). The executor owns the clock and the
sleep, and the database throttles get their readings from injected probes, so every policy runs instantly under test.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import psycopg
import tenacity

from backfill.errors import describe, transient_reason
from backfill.retrying import ExponentialBackoff, StopAfterBudget, Timing, retrying

__all__ = [
    "RunContext",
    "Wait",
    "Throttle",
    "BatchSizer",
    "ThrottleBase",
    "Longest",
    "Sum",
    "no_throttle",
    "FixedSleep",
    "MaxRowsPerSecond",
    "ProbingThrottle",
    "LagReading",
    "VacuumReading",
    "TransactionReading",
    "HealthProbes",
    "ReplicaLag",
    "VacuumRunning",
    "CustomCheck",
    "LongTransactions",
    "LockWaiters",
    "FixedSize",
    "AdaptiveSize",
    "ErrorKind",
    "RetryPolicy",
]

T = TypeVar("T")


@dataclass
class RunContext:
    """Everything that changes during one run; the only mutable state the policies see."""

    name: str
    batch_size: int
    started_at: float
    clock: Callable[[], float] = field(repr=False)
    #: batches and rows committed by this run
    batches: int = 0
    rows: int = 0
    last_batch_seconds: float | None = None
    #: seconds the last batch worked in the database, round trip left out (None: the store cannot tell)
    last_batch_database_seconds: float | None = None
    last_batch_rows: int = 0
    #: rows of key range the last batch walked (its batch size): what adaptive sizing measures
    last_batch_size: int = 0
    #: clock readings when the last batch started and committed (None before the first)
    last_batch_started_at: float | None = None
    last_batch_ended_at: float | None = None
    longest_batch_seconds: float = 0.0
    #: retries of the current batch (reset when a batch commits)
    attempt: int = 0
    #: batches of this run that exceeded statement_timeout (each was retried at half the size)
    timeouts: int = 0

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started_at

    def record_batch(
        self, rows: int, seconds: float, size: int | None = None, database_seconds: float | None = None
    ) -> None:
        now = self.clock()
        self.batches += 1
        self.rows += rows
        self.last_batch_rows = rows
        self.last_batch_size = self.batch_size if size is None else size
        self.last_batch_seconds = seconds
        self.last_batch_database_seconds = database_seconds
        self.last_batch_started_at = now - seconds
        self.last_batch_ended_at = now
        self.longest_batch_seconds = max(self.longest_batch_seconds, seconds)
        self.attempt = 0


class Wait(float):
    """Seconds a throttle asks the runner to wait, with the reason and the readings behind it.

    A ``float``, so waits compare and add as numbers and a throttle of your own may return a plain number.

    Args:
        seconds: how long to wait from now (negative values count as 0).
        reason: a stable snake_case word logged with the wait (``replica_lag``, ``vacuum_running``, ...).
        details: the readings that made the throttle wait, logged with it.
    """

    reason: str
    details: dict[str, object]

    def __new__(cls, seconds: float, reason: str, **details: object) -> Wait:
        wait = super().__new__(cls, max(0.0, float(seconds)))
        wait.reason = reason
        wait.details = details
        return wait

    def __repr__(self) -> str:
        return f"Wait({float(self)!r}, {self.reason!r})"


#: Waits shorter than this are no wait (clock arithmetic leaves crumbs of 1e-15 s).
_NOW = 1e-6

#: Seconds to wait before the next batch; 0 means go on.
Throttle = Callable[[RunContext], float]
#: The size of the next batch.
BatchSizer = Callable[[RunContext], int]


class ThrottleBase:
    """Base of the built-in throttles: adds ``|`` and ``+`` composition to a ``__call__(ctx) -> float``."""

    def __call__(self, ctx: RunContext) -> float:
        raise NotImplementedError

    def __or__(self, other: Throttle) -> Longest:
        return Longest(self, other)

    def __ror__(self, other: Throttle) -> Longest:
        return Longest(other, self)

    def __add__(self, other: Throttle) -> Sum:
        return Sum(self, other)

    def __radd__(self, other: Throttle) -> Sum:
        return Sum(other, self)


class Longest(ThrottleBase):
    """Wait as long as the most demanding of ``throttles`` asks (each is asked every time, so each logs its own
    reason when it is the one holding the runner back)."""

    def __init__(self, *throttles: Throttle) -> None:
        flat: list[Throttle] = []
        for throttle in throttles:
            flat.extend(throttle.throttles if isinstance(throttle, Longest) else (throttle,))
        self.throttles: tuple[Throttle, ...] = tuple(flat)

    def __call__(self, ctx: RunContext) -> float:
        return max((throttle(ctx) for throttle in self.throttles), default=0.0)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.throttles)) or "Longest()"


class Sum(ThrottleBase):
    """Wait for the sum of what ``throttles`` ask; the reason is that of the longest part."""

    def __init__(self, *throttles: Throttle) -> None:
        self.throttles: tuple[Throttle, ...] = throttles

    def __call__(self, ctx: RunContext) -> float:
        waits = [throttle(ctx) for throttle in self.throttles]
        total = sum(waits)
        if total <= 0:
            return 0.0
        longest = max(waits)
        return Wait(total, getattr(longest, "reason", "throttle"), **getattr(longest, "details", {}))


def no_throttle(ctx: RunContext) -> float:
    """Never wait."""
    del ctx
    return 0.0


@dataclass(frozen=True)
class FixedSleep(ThrottleBase):
    """Leave at least ``seconds`` between the end of one batch and the start of the next (room for vacuum, replicas
    and the application's own writes on a busy primary)."""

    seconds: float

    def __call__(self, ctx: RunContext) -> float:
        if ctx.last_batch_ended_at is None:
            return 0.0
        left = self.seconds - (ctx.clock() - ctx.last_batch_ended_at)
        return Wait(left, "sleep_between", sleep_between=self.seconds) if left > _NOW else 0.0


class MaxRowsPerSecond(ThrottleBase):
    """Cap the update rate: a batch that updated ``r`` rows is followed by the next one no sooner than ``r / rate``
    seconds after it started. Paced batch by batch, so a long wait for another reason never earns a burst.

    Args:
        rate: rows per second for the whole backfill.
        sharers: how many runners share the cap right now (each takes an equal part); read at most every
            ``every`` seconds. Without it, this runner has the whole rate.
    """

    def __init__(self, rate: float, sharers: Callable[[], int] | None = None, *, every: float = 5.0) -> None:
        self.rate = rate
        self.sharers = sharers
        self.every = every
        self._share = 1
        self._next_read = -math.inf

    def _runners(self, now: float) -> int:
        if self.sharers is not None and now >= self._next_read:
            self._share = max(1, self.sharers())
            self._next_read = now + self.every
        return self._share

    def __call__(self, ctx: RunContext) -> float:
        if ctx.last_batch_started_at is None or ctx.last_batch_rows <= 0:
            return 0.0
        now = ctx.clock()
        rate = self.rate / self._runners(now)
        left = ctx.last_batch_started_at + ctx.last_batch_rows / rate - now
        return Wait(left, "max_rows_per_second", max_rows_per_second=round(rate, 1)) if left > _NOW else 0.0

    def __repr__(self) -> str:
        return f"MaxRowsPerSecond({self.rate!r}{', shared' if self.sharers else ''})"


class ProbingThrottle(ThrottleBase):
    """A throttle that reads the database's health through a probe. While healthy it probes at most every
    ``every`` seconds (probes cost a round trip and some catalog work); once it waits, it probes each time it is
    asked, i.e. every ``poll`` seconds, until the condition clears."""

    def __init__(self, *, every: float = 1.0, poll: float = 1.0) -> None:
        self.every = every
        self.poll = poll
        self._next_check = -math.inf

    def __call__(self, ctx: RunContext) -> float:
        now = ctx.clock()
        if now < self._next_check:
            return 0.0
        wait = self.check(ctx)
        self._next_check = now if wait > 0 else now + self.every
        return wait

    def check(self, ctx: RunContext) -> float:
        """Probe now; a :class:`Wait` of ``poll`` seconds while the condition holds, 0 otherwise."""
        raise NotImplementedError


@dataclass(frozen=True)
class LagReading:
    """What ``pg_stat_replication`` says about the replicas attached to the primary."""

    replicas: int
    #: the largest replay lag in bytes of WAL, and in seconds (None: no replica, or the server does not say)
    lag_bytes: int | None = None
    lag_seconds: float | None = None


@dataclass(frozen=True)
class VacuumReading:
    """One vacuum working on the target table (or one of its partitions or TOAST tables)."""

    pid: int
    relation: str
    phase: str
    autovacuum: bool
    #: an autovacuum run to prevent transaction ID wraparound: it cannot be cancelled, and the server stops
    #: assigning transaction IDs if it falls too far behind
    wraparound: bool = False


@dataclass(frozen=True)
class TransactionReading:
    """The oldest transaction of another client session that holds back the xmin horizon."""

    pid: int
    age_seconds: float
    state: str | None
    application_name: str | None


class HealthProbes(Protocol):
    """Where the database throttles get their readings (:class:`backfill.pg.health.PostgresHealth` is the real one)."""

    def replica_lag(self) -> LagReading: ...

    def vacuums(self) -> Sequence[VacuumReading]: ...

    def custom_check(self, query: str) -> bool: ...

    def oldest_transaction(self) -> TransactionReading | None: ...

    def lock_waiters(self) -> int: ...


class ReplicaLag(ProbingThrottle):
    """Wait while a replica is further behind than ``max_bytes`` of WAL or ``max_seconds`` of replay time.

    Args:
        probe: reads the lag (``pg_stat_replication`` on the primary).
        max_bytes, max_seconds: thresholds; None ignores that measure.
        every, poll: see :class:`ProbingThrottle`. The interval adapts: while the lag is above ``near`` times a
            threshold it is probed before every batch; each reading far below doubles the interval up to ``every``.
    """

    def __init__(
        self,
        probe: Callable[[], LagReading],
        *,
        max_bytes: int | None = None,
        max_seconds: float | None = None,
        every: float = 1.0,
        poll: float = 1.0,
        near: float = 0.25,
    ) -> None:
        super().__init__(every=every, poll=poll)
        self.probe, self.max_bytes, self.max_seconds = probe, max_bytes, max_seconds
        self.near = near
        self._last: LagReading | None = None
        self._interval = 0.0

    def __call__(self, ctx: RunContext) -> float:
        # Probed once per interval, a fast backfill writes a whole interval's WAL past the last reading (38 MB
        # against a 4 MB limit). So the interval adapts: while the lag is within ``near`` of a limit (or over it),
        # every batch is preceded by a probe; each reading far from the limits doubles the interval, from a
        # sixteenth of ``every`` up to ``every``, so a lag that starts growing is seen before it gets far.
        now = ctx.clock()
        if now < self._next_check:
            return 0.0
        wait = self.check(ctx)
        if wait > 0 or self._close_to_limit():
            self._interval = 0.0
        else:
            self._interval = min(self.every, max(2 * self._interval, self.every / 16))
        self._next_check = now + self._interval
        return wait

    def _close_to_limit(self) -> bool:
        lag = self._last
        if lag is None:
            return False
        near_bytes = self.max_bytes is not None and (lag.lag_bytes or 0) > self.max_bytes * self.near
        near_time = self.max_seconds is not None and (lag.lag_seconds or 0.0) > self.max_seconds * self.near
        return near_bytes or near_time

    def check(self, ctx: RunContext) -> float:
        lag = self._last = self.probe()
        over_bytes = self.max_bytes is not None and lag.lag_bytes is not None and lag.lag_bytes > self.max_bytes
        over_time = self.max_seconds is not None and lag.lag_seconds is not None and lag.lag_seconds > self.max_seconds
        if not (over_bytes or over_time):
            return 0.0
        return Wait(
            self.poll,
            "replica_lag",
            lag_bytes=lag.lag_bytes,
            lag_seconds=lag.lag_seconds,
            max_bytes=self.max_bytes,
            max_seconds=self.max_seconds,
        )

    def __repr__(self) -> str:
        return f"ReplicaLag(max_bytes={self.max_bytes}, max_seconds={self.max_seconds})"


class VacuumRunning(ProbingThrottle):
    """Wait while a vacuum works on the target table (``pg_stat_progress_vacuum``).

    Args:
        probe: reads the vacuums at work on the table.
        only_wraparound: wait only for an autovacuum run to prevent transaction ID wraparound (the default of
            :class:`~backfill.RunSettings`). That one must never be starved: it cannot be cancelled, and if it
            falls too far behind the server stops assigning transaction IDs. An ordinary autovacuum is left to
            work alongside: it is cleaning up the very dead rows the backfill leaves, and on a large table it runs
            for hours, which a runner waiting for it would spend idle each time.
    """

    def __init__(
        self,
        probe: Callable[[], Sequence[VacuumReading]],
        *,
        only_wraparound: bool = False,
        every: float = 1.0,
        poll: float = 1.0,
    ) -> None:
        super().__init__(every=every, poll=poll)
        self.probe, self.only_wraparound = probe, only_wraparound

    def check(self, ctx: RunContext) -> float:
        running = [vacuum for vacuum in self.probe() if vacuum.wraparound or not self.only_wraparound]
        if not running:
            return 0.0
        first = running[0]
        return Wait(
            self.poll,
            "vacuum_running",
            pid=first.pid,
            relation=first.relation,
            phase=first.phase,
            autovacuum=first.autovacuum,
            wraparound=first.wraparound,
        )

    def __repr__(self) -> str:
        return "VacuumRunning(only_wraparound=True)" if self.only_wraparound else "VacuumRunning()"


class CustomCheck(ProbingThrottle):
    """Wait while the user's query returns true (first column of the first row)."""

    def __init__(self, probe: Callable[[str], bool], query: str, *, every: float = 1.0, poll: float = 1.0) -> None:
        super().__init__(every=every, poll=poll)
        self.probe, self.query = probe, query

    def check(self, ctx: RunContext) -> float:
        return Wait(self.poll, "health_check_sql", query=self.query) if self.probe(self.query) else 0.0

    def __repr__(self) -> str:
        return f"CustomCheck({self.query!r})"


class LongTransactions(ProbingThrottle):
    """Wait while another session's transaction, older than ``max_age`` seconds, holds back the xmin horizon:
    vacuum cannot remove any dead row newer than it, so every batch until it ends only adds bloat."""

    def __init__(
        self,
        probe: Callable[[], TransactionReading | None],
        max_age: float,
        *,
        every: float = 1.0,
        poll: float = 1.0,
    ) -> None:
        super().__init__(every=every, poll=poll)
        self.probe, self.max_age = probe, max_age

    def check(self, ctx: RunContext) -> float:
        oldest = self.probe()
        if oldest is None or oldest.age_seconds <= self.max_age:
            return 0.0
        return Wait(
            self.poll,
            "long_transaction",
            pid=oldest.pid,
            age_s=round(oldest.age_seconds, 1),
            state=oldest.state,
            application_name=oldest.application_name,
            max_age=self.max_age,
        )

    def __repr__(self) -> str:
        return f"LongTransactions(max_age={self.max_age})"


class LockWaiters(ProbingThrottle):
    """Wait while other sessions queue for a lock on the target table (typically a DDL statement): stepping aside
    lets it through instead of piling more lock requests behind it."""

    def __init__(self, probe: Callable[[], int], *, every: float = 1.0, poll: float = 1.0) -> None:
        super().__init__(every=every, poll=poll)
        self.probe = probe

    def check(self, ctx: RunContext) -> float:
        waiting = self.probe()
        return Wait(self.poll, "lock_waiters", sessions=waiting) if waiting > 0 else 0.0

    def __repr__(self) -> str:
        return "LockWaiters()"


@dataclass(frozen=True)
class FixedSize:
    """Keep the batch size where it is (the spec's, or where a statement timeout shrank it)."""

    def __call__(self, ctx: RunContext) -> int:
        return ctx.batch_size


class AdaptiveSize:
    """Size each batch to take about ``target_seconds`` of database time.

    It keeps an exponentially weighted moving average of the rate (rows of key range per second) of the batches
    so far and asks for ``rate * target_seconds`` rows of key range. The average damps noise: with
    ``smoothing=0.3`` one batch ten times slower than the rest cuts the next size by about a quarter, not tenfold.
    Growth is capped at ``max_growth`` per batch so a start far below the target ramps up instead of leaping on one
    fast measurement. A batch that exceeded statement_timeout halves the rate estimate.

    A batch is timed by the seconds it worked in the database when the store can tell (the round trip to a distant
    database is the same for any batch size, so counting it would only shrink batches and add round trips), by
    the runner's clock otherwise.

    ``max_size`` caps the rows a batch *changes* (the rows it holds locked until it commits), not the key range it
    walks: where the filter matches few rows, or most rows already hold their values, the key range stretches as
    far as the time target allows (up to ``max_size`` rows changed at the last batch's share of changed rows), so
    a sparse backfill costs about one pass over the key's index instead of many small batches. ``min_size``
    bounds the key range from below.

    On a steady table it converges within a few batches (the error shrinks by ``1 - smoothing`` per batch once
    within the growth cap).
    """

    def __init__(
        self,
        target_seconds: float,
        min_size: int = 100,
        max_size: int = 100_000,
        *,
        smoothing: float = 0.3,
        max_growth: float = 2.0,
    ) -> None:
        if target_seconds <= 0:
            raise ValueError(f"target_seconds must be positive, got {target_seconds!r}")
        if not 1 <= min_size <= max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {min_size!r} and {max_size!r}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing!r}")
        self.target_seconds = target_seconds
        self.min_size, self.max_size = min_size, max_size
        self.smoothing, self.max_growth = smoothing, max_growth
        #: smoothed rows of key range per second; None until a batch has been measured
        self.rate: float | None = None
        #: the largest key range the next batch may walk (rows changed stay within ``max_size``)
        self.max_range: float = float(max_size)
        self._seen_batches = 0
        self._seen_timeouts = 0

    def __call__(self, ctx: RunContext) -> int:
        seconds = ctx.last_batch_database_seconds or ctx.last_batch_seconds
        if ctx.batches > self._seen_batches and seconds and ctx.last_batch_size > 0:
            measured = ctx.last_batch_size / seconds
            self.rate = measured if self.rate is None else self.smoothing * measured + (1 - self.smoothing) * self.rate
            changed = max(ctx.last_batch_rows, 1) / ctx.last_batch_size
            self.max_range = self.max_size / min(1.0, changed)
        self._seen_batches = ctx.batches
        if ctx.timeouts > self._seen_timeouts:
            if self.rate is not None:
                self.rate /= 2 ** (ctx.timeouts - self._seen_timeouts)
            self._seen_timeouts = ctx.timeouts
        if self.rate is None:
            wanted = float(ctx.batch_size)
        else:
            wanted = min(self.rate * self.target_seconds, ctx.batch_size * self.max_growth)
        return int(min(self.max_range, max(self.min_size, wanted)))

    def __repr__(self) -> str:
        return f"AdaptiveSize(target_seconds={self.target_seconds}, min={self.min_size}, max={self.max_size})"


class ErrorKind(enum.Enum):
    """What a failed batch means for the run."""

    #: Retry the same batch after a wait: lock timeout, deadlock, serialization failure, a lost connection or a
    #: server shutting down or starting up (:data:`backfill.errors.TRANSIENT_ERRORS`).
    TRANSIENT = "transient"
    #: The batch exceeded statement_timeout: retry it smaller.
    TOO_BIG = "too_big"
    #: Retrying cannot help (bad expression, constraint violation, a cancel by a person): fail the backfill.
    PERMANENT = "permanent"


@dataclass(frozen=True)
class RetryPolicy:
    """Which errors are retried, with what backoff, for how long.

    Args:
        budget_seconds: how long one batch (or one control-table step) may keep failing transiently before the run
            gives up and marks the backfill failed; long enough by default to ride out a failover or a long lock
            holder.
        max_attempts: an optional cap on attempts per batch.
        initial_wait, max_wait: exponential backoff bounds between attempts; each wait adds up to
            ``initial_wait`` of random jitter so runners that failed together do not retry together.
        min_batch_size: a statement timeout halves the batch down to this size.
        timeouts_at_min_size: a batch of ``min_batch_size`` that exceeds statement_timeout is retried after a
            backoff; after this many such timeouts in a row the backfill fails with
            :class:`~backfill.errors.BatchTooSlowError` (each attempt held its row locks for the whole timeout).
    """

    budget_seconds: float = 900.0
    max_attempts: int | None = None
    initial_wait: float = 0.5
    max_wait: float = 10.0
    min_batch_size: int = 1
    timeouts_at_min_size: int = 3

    def classify(self, exc: BaseException, *, timed_out: bool = False) -> ErrorKind:
        """What ``exc`` means for the batch.

        Args:
            timed_out: the attempt lasted at least statement_timeout. A query cancel (57014) is both a statement
                timeout and ``pg_cancel_backend``; the server's message tells them apart only in English, so the
                attempt's duration is the locale-proof signal.
        """
        if isinstance(exc, psycopg.errors.QueryCanceled):
            # Only the timeout is ours to handle; a person who cancelled the statement wants the runner to stop.
            return ErrorKind.TOO_BIG if timed_out or "statement timeout" in str(exc) else ErrorKind.PERMANENT
        return ErrorKind.TRANSIENT if transient_reason(exc) is not None else ErrorKind.PERMANENT

    def backoff(self, random: Callable[[], float]) -> ExponentialBackoff:
        """The wait between two attempts: exponential from ``initial_wait`` up to ``max_wait``, plus jitter."""
        return ExponentialBackoff(self.initial_wait, self.max_wait, self.initial_wait, random)

    def retrying(
        self,
        retry_if: Callable[[BaseException], bool],
        timing: Timing,
        *,
        wait: Callable[[tenacity.RetryCallState], float] | None = None,
        before_sleep: Callable[[tenacity.RetryCallState], None] | None = None,
    ) -> tenacity.Retrying:
        """A retry loop with this policy's budget and backoff (or ``wait``), on ``timing``'s clock and sleep."""
        return retrying(
            retry_if,
            wait=wait or self.backoff(timing.random),
            stop=StopAfterBudget(self.budget_seconds, timing.clock, max_attempts=self.max_attempts),
            sleep=timing.sleep,
            before_sleep=before_sleep,
        )

    def call(self, step: str, work: Callable[[], T], timing: Timing, logger: Any) -> T:
        """Run one step that is not a batch (reading or writing the control tables, resolving the spec), riding
        out the transient errors a batch rides out: a lost connection, a server restart, a lock timeout. The step
        must reconnect by itself on its next attempt (the store does). Each retry is logged as ``step_retry``."""

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            assert exc is not None
            logger.warning(
                "step_retry",
                step=step,
                reason=transient_reason(exc),
                error=describe(exc),
                attempt=state.attempt_number,
                wait_s=round(state.upcoming_sleep, 3),
            )

        retry_if = lambda exc: self.classify(exc) is ErrorKind.TRANSIENT  # noqa: E731
        result: T = self.retrying(retry_if, timing, before_sleep=before_sleep)(work)
        return result
