"""Policies: small callables over one :class:`RunContext` that decide how fast, how big and when to retry.

A throttle returns how many seconds to wait before the next batch (0 to go on); a sizer returns the next batch
size; a :class:`RetryPolicy` tells transient errors from permanent ones and how long to keep trying. The executor
owns the clock and the sleep, so every policy runs instantly under test.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from backfill.errors import ConnectError

__all__ = [
    "RunContext",
    "Throttle",
    "BatchSizer",
    "no_throttle",
    "FixedSleep",
    "FixedSize",
    "ErrorKind",
    "RetryPolicy",
]


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
    last_batch_rows: int = 0
    longest_batch_seconds: float = 0.0
    #: retries of the current batch (reset when a batch commits)
    attempt: int = 0

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started_at

    def record_batch(self, rows: int, seconds: float) -> None:
        self.batches += 1
        self.rows += rows
        self.last_batch_rows = rows
        self.last_batch_seconds = seconds
        self.longest_batch_seconds = max(self.longest_batch_seconds, seconds)
        self.attempt = 0


#: Seconds to wait before the next batch; 0 means go on.
Throttle = Callable[[RunContext], float]
#: The size of the next batch.
BatchSizer = Callable[[RunContext], int]


def no_throttle(ctx: RunContext) -> float:
    """Never wait."""
    del ctx
    return 0.0


@dataclass(frozen=True)
class FixedSleep:
    """Wait ``seconds`` between batches (leaves room for vacuum and replicas on a busy primary)."""

    seconds: float

    def __call__(self, ctx: RunContext) -> float:
        return self.seconds if ctx.batches else 0.0


@dataclass(frozen=True)
class FixedSize:
    """Keep the batch size where it is (the spec's, or where a statement timeout shrank it)."""

    def __call__(self, ctx: RunContext) -> int:
        return ctx.batch_size


class ErrorKind(enum.Enum):
    """What a failed batch means for the run."""

    #: Retry the same batch after a wait: lock timeout, deadlock, serialization failure, a lost connection or a
    #: server shutting down or starting up.
    TRANSIENT = "transient"
    #: The batch exceeded statement_timeout: retry it smaller.
    TOO_BIG = "too_big"
    #: Retrying cannot help (bad expression, constraint violation, a cancel by a person): fail the backfill.
    PERMANENT = "permanent"


_TRANSIENT_SQLSTATES = frozenset({"55P03", "40P01", "40001", "57P01", "57P02", "57P03"})


@dataclass(frozen=True)
class RetryPolicy:
    """Which errors are retried, with what backoff, for how long.

    Args:
        budget_seconds: how long one batch may keep failing transiently before the run gives up; long enough by
            default to ride out a failover or a long lock holder.
        max_attempts: an optional cap on attempts per batch.
        initial_wait, max_wait: exponential backoff bounds (with jitter) between attempts.
        min_batch_size: a statement timeout halves the batch down to this size.
    """

    budget_seconds: float = 900.0
    max_attempts: int | None = None
    initial_wait: float = 0.5
    max_wait: float = 30.0
    min_batch_size: int = 1

    def classify(self, exc: BaseException) -> ErrorKind:
        if isinstance(exc, ConnectError):
            return ErrorKind.TRANSIENT
        if isinstance(exc, psycopg.errors.QueryCanceled):
            # 57014 is both statement_timeout and pg_cancel_backend; only the timeout is ours to handle.
            return ErrorKind.TOO_BIG if "statement timeout" in str(exc) else ErrorKind.PERMANENT
        if not isinstance(exc, psycopg.Error):
            return ErrorKind.PERMANENT
        sqlstate = exc.sqlstate or ""
        if sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08"):
            return ErrorKind.TRANSIENT
        if isinstance(exc, psycopg.OperationalError) and not sqlstate:
            return ErrorKind.TRANSIENT  # the connection broke: no SQLSTATE, just a dead socket
        return ErrorKind.PERMANENT

    def is_retryable(self, exc: BaseException) -> bool:
        return self.classify(exc) is not ErrorKind.PERMANENT
