"""The executor loop: claim a slice, run batches until it is done or a budget, a pause or a stop ends the run.

The loop knows nothing of SQL (the store runs each batch), of click or of Alembic. Time is injected (``clock``,
``sleep``) so unit tests drive the real loop against an in-memory store in milliseconds.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import tenacity

from backfill.errors import BackfillError
from backfill.plan import Plan
from backfill.policies import (
    BatchSizer,
    ErrorKind,
    FixedSize,
    FixedSleep,
    RetryPolicy,
    RunContext,
    Throttle,
    no_throttle,
)
from backfill.state import RunOutcome, RunState
from backfill.store import BatchRequest, BatchResult, LockLostError, SliceRecord, Store

__all__ = ["RunSettings", "RunReport", "Executor", "BackfillFailedError"]

log = structlog.get_logger("backfill")


class BackfillFailedError(BackfillError):
    """Raised by :meth:`RunReport.raise_for_outcome` when a run ended with the backfill failed or cancelled."""


@dataclass(frozen=True)
class RunSettings:
    """How a runner runs batches. Everything here may change between runs without touching the stored spec.

    Args:
        batch_size: rows of key range per batch to start with; defaults to the spec's.
        lock_timeout: seconds a batch may wait for a row or table lock before it is retried.
        statement_timeout: seconds one statement of a batch may run before the batch is retried smaller.
        sleep_between: seconds to wait between batches.
        max_rows_per_second: cap on the update rate, averaged over the run.
        target_batch_seconds: adaptive sizing aims each batch at this duration; None keeps the size fixed.
        min_batch_size, max_batch_size: bounds for adaptive sizing.
        max_replica_lag_bytes, max_replica_lag_seconds: wait while a replica is further behind than this
            (read from ``pg_stat_replication`` on the primary); None disables the check.
        wait_for_vacuum: wait while autovacuum works on the target table.
        health_check_sql: a query of the user's; wait while it returns true.
        max_retry_seconds: how long one batch may keep failing transiently before the run gives up.
        throttle, sizer, retry: explicit policies; when given they replace the ones built from the fields above.
        application_name: shown in ``pg_stat_activity`` for the runner's connection.
    """

    batch_size: int | None = None
    lock_timeout: float = 2.0
    statement_timeout: float = 30.0
    sleep_between: float = 0.0
    max_rows_per_second: float | None = None
    target_batch_seconds: float | None = None
    min_batch_size: int = 100
    max_batch_size: int = 100_000
    max_replica_lag_bytes: int | None = None
    max_replica_lag_seconds: float | None = None
    wait_for_vacuum: bool = False
    health_check_sql: str | None = None
    max_retry_seconds: float = 900.0
    throttle: Throttle | None = None
    sizer: BatchSizer | None = None
    retry: RetryPolicy | None = None
    application_name: str = "backfill"

    def policies(self) -> tuple[Throttle, BatchSizer, RetryPolicy]:
        """The throttle, sizer and retry policy this run uses."""
        throttle = self.throttle or (FixedSleep(self.sleep_between) if self.sleep_between > 0 else no_throttle)
        sizer = self.sizer or FixedSize()
        retry = self.retry or RetryPolicy(budget_seconds=self.max_retry_seconds)
        return throttle, sizer, retry


@dataclass(frozen=True)
class RunReport:
    """How one run ended and what it did."""

    name: str
    outcome: RunOutcome
    #: the backfill's state when the run ended
    state: RunState
    #: rows updated and batches committed by this run (not the backfill's totals)
    rows_updated: int = 0
    batches: int = 0
    seconds: float = 0.0
    longest_batch_seconds: float = 0.0
    #: why the run stopped early ("max_batches", "max_runtime", "stop requested", "lock lost") or failed
    reason: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is RunOutcome.FINISHED

    def raise_for_outcome(self) -> RunReport:
        """Raise :class:`BackfillFailedError` if the backfill failed or was cancelled; return self otherwise."""
        if self.outcome in (RunOutcome.FAILED, RunOutcome.CANCELLED):
            raise BackfillFailedError(f"backfill {self.name!r} {self.state.value}: {self.error or self.reason}")
        return self


_EARLY = {
    RunState.SUCCEEDED: RunOutcome.FINISHED,
    RunState.PAUSED: RunOutcome.PAUSED,
    RunState.CANCELLED: RunOutcome.CANCELLED,
    RunState.FAILED: RunOutcome.FAILED,
}


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Executor:
    """Runs one backfill's batches through a :class:`~backfill.store.Store`.

    Args:
        store: where the batches run and the checkpoints live.
        plan: the resolved spec (``None`` only for stores that do not need it, such as the in-memory one).
        name: the backfill.
        settings: batch size, timeouts and policies.
        clock, sleep: injected time.
        should_stop: polled between batches and during waits; True ends the run after the current batch.
    """

    def __init__(
        self,
        store: Store,
        plan: Plan | None,
        name: str,
        settings: RunSettings | None = None,
        *,
        owner: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        self.plan = plan
        self.name = name
        self.settings = settings or RunSettings()
        self.owner = owner or default_owner()
        self.clock = clock
        self.sleep = sleep
        self.should_stop = should_stop or (lambda: False)
        self.throttle, self.sizer, self.retry = self.settings.policies()
        self.log = log.bind(backfill=name)

    def run(self, *, max_runtime: float | None = None, max_batches: int | None = None) -> RunReport:
        """Run batches until the backfill is done, a budget is spent, or it is paused, cancelled or fails.

        Args:
            max_runtime: seconds after which no new batch starts.
            max_batches: batches after which the run stops.
        """
        record = self.store.get(self.name)
        batch_size = self.settings.batch_size or record.spec.batch_size
        ctx = RunContext(self.name, batch_size, self.clock(), self.clock)
        if record.state in _EARLY:
            return self._report(ctx, _EARLY[record.state], record.state, error=record.last_error)

        slices = self.store.start(record, self.plan)
        self.log.info(
            "run_started",
            table=record.spec.qualified_table,
            batch_size=batch_size,
            max_runtime=max_runtime,
            max_batches=max_batches,
        )
        busy = 0
        for piece in slices:
            if piece.done:
                continue
            if not self.store.try_claim(record.id, piece.slice):
                busy += 1
                continue
            try:
                ended = self._work(ctx, record.id, piece, max_runtime, max_batches)
            except LockLostError as exc:
                ended = (RunOutcome.BUSY, RunState.RUNNING, str(exc))
            finally:
                self.store.release(record.id, piece.slice, self.owner)
            if ended is not None:
                return self._report(ctx, *ended)
        state = self.store.get(self.name).state
        if state is RunState.SUCCEEDED:
            return self._report(ctx, RunOutcome.FINISHED, state)
        return self._report(
            ctx,
            RunOutcome.BUSY if busy else RunOutcome.WORK_LEFT,
            state,
            reason="another runner holds the backfill" if busy else None,
        )

    def _work(
        self,
        ctx: RunContext,
        backfill_id: int,
        piece: SliceRecord,
        max_runtime: float | None,
        max_batches: int | None,
    ) -> tuple[RunOutcome, RunState, str | None] | None:
        """Batches on one slice; returns how the run ends, or None when the slice is done and others may follow."""
        while True:
            stop = self._budget_spent(ctx, max_runtime, max_batches)
            if stop is None:
                stop = self._wait(ctx, self.throttle(ctx), max_runtime)
            if stop is not None:
                return RunOutcome.WORK_LEFT, RunState.RUNNING, stop
            ctx.batch_size = max(1, self.sizer(ctx))
            started = self.clock()
            try:
                result = self._batch_with_retry(ctx, backfill_id, piece.slice)
            except LockLostError:
                raise
            except Exception as exc:  # a permanent error, or a transient one that outlived the retry budget
                message = _describe(exc)
                self.store.fail(backfill_id, message)
                self.log.error("backfill_failed", error=message, checkpoint_kept=True)
                return RunOutcome.FAILED, RunState.FAILED, message
            if not result.applied:
                outcome = {
                    RunState.PAUSED: RunOutcome.PAUSED,
                    RunState.CANCELLED: RunOutcome.CANCELLED,
                    RunState.SUCCEEDED: RunOutcome.FINISHED,
                    RunState.FAILED: RunOutcome.FAILED,
                }.get(result.state)
                if result.slice_done and outcome is None:
                    return None
                self.log.info("run_stopped", state=result.state.value)
                return outcome or RunOutcome.WORK_LEFT, result.state, f"backfill is {result.state.value}"
            seconds = self.clock() - started
            ctx.record_batch(result.rows, seconds)
            self.log.info(
                "batch_committed",
                slice=piece.slice,
                rows=result.rows,
                batch_size=ctx.batch_size,
                ms=round(seconds * 1000, 1),
                checkpoint=result.checkpoint,
            )
            if result.finished:
                self.log.info("backfill_succeeded")
                return RunOutcome.FINISHED, RunState.SUCCEEDED, None
            if result.slice_done:
                return None

    def _budget_spent(self, ctx: RunContext, max_runtime: float | None, max_batches: int | None) -> str | None:
        if max_batches is not None and ctx.batches >= max_batches:
            return "max_batches"
        if max_runtime is not None and ctx.elapsed >= max_runtime:
            return "max_runtime"
        if self.should_stop():
            return "stop requested"
        return None

    def _wait(self, ctx: RunContext, seconds: float, max_runtime: float | None) -> str | None:
        """Sleep in short steps so a stop request or the end of the time budget cuts a long wait short."""
        if seconds <= 0:
            return None
        self.log.debug("throttle_wait", seconds=round(seconds, 3))
        deadline = self.clock() + seconds
        while (left := deadline - self.clock()) > 0:
            if self.should_stop():
                return "stop requested"
            if max_runtime is not None and ctx.elapsed >= max_runtime:
                return "max_runtime"
            self.sleep(min(left, 0.5))
        return None

    def _batch_with_retry(self, ctx: RunContext, backfill_id: int, slice_no: int) -> BatchResult:
        policy = self.retry
        first_try = self.clock()

        def out_of_budget(state: tenacity.RetryCallState) -> bool:
            if policy.max_attempts is not None and state.attempt_number >= policy.max_attempts:
                return True
            return self.clock() - first_try >= policy.budget_seconds or self.should_stop()

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            assert exc is not None
            kind = policy.classify(exc)
            if kind is ErrorKind.TOO_BIG:
                ctx.batch_size = max(policy.min_batch_size, ctx.batch_size // 2)
            ctx.attempt = state.attempt_number
            self.log.warning(
                "batch_retry",
                reason=kind.value,
                error=_describe(exc),
                attempt=state.attempt_number,
                wait_s=round(state.upcoming_sleep, 3),
                batch_size=ctx.batch_size,
            )

        def attempt() -> BatchResult:
            request = BatchRequest(
                backfill_id,
                slice_no,
                ctx.batch_size,
                self.owner,
                self.settings.lock_timeout,
                self.settings.statement_timeout,
            )
            return self.store.run_batch(self.plan, request)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: not isinstance(e, LockLostError) and policy.is_retryable(e)),
            wait=tenacity.wait_exponential(multiplier=policy.initial_wait, max=policy.max_wait)
            + tenacity.wait_random(0, policy.initial_wait),
            stop=out_of_budget,
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(attempt)

    def _report(
        self,
        ctx: RunContext,
        outcome: RunOutcome,
        state: RunState,
        reason: str | None = None,
        error: str | None = None,
    ) -> RunReport:
        if outcome is RunOutcome.FAILED and error is None:
            error, reason = reason, None
        report = RunReport(
            name=self.name,
            outcome=outcome,
            state=state,
            rows_updated=ctx.rows,
            batches=ctx.batches,
            seconds=ctx.elapsed,
            longest_batch_seconds=ctx.longest_batch_seconds,
            reason=reason,
            error=error,
        )
        self.log.info(
            "run_finished",
            outcome=outcome.value,
            state=state.value,
            rows=ctx.rows,
            batches=ctx.batches,
            seconds=round(ctx.elapsed, 3),
            reason=reason,
        )
        return report


def _describe(exc: BaseException) -> str:
    sqlstate = getattr(exc, "sqlstate", None)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{text} [SQLSTATE {sqlstate}]" if sqlstate else text
