"""The executor loop: claim a slice, run batches until it is done or a budget, a pause or a stop ends the run.

Between batches the throttle decides whether to wait (and says why); the sizer picks the next batch's size; each
batch runs under the retry policy, which rides out lock timeouts, deadlocks, lost connections and server restarts
and shrinks a batch that hit statement_timeout. The loop knows nothing of SQL (the store runs each batch, the health
probes read the statistics views), of click or of Alembic. Time is injected (``clock``, ``sleep``) so unit tests
drive the real loop against an in-memory store in milliseconds.
"""

from __future__ import annotations

import functools
import os
import random as _random
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import structlog
import tenacity

from backfill import tracing
from backfill.errors import BackfillError, BatchTooSlowError, describe, transient_reason
from backfill.plan import Plan
from backfill.policies import (
    ErrorKind,
    HealthProbes,
    RunContext,
)
from backfill.retrying import Timing
from backfill.settings import RunSettings, SettingsError
from backfill.state import RunOutcome, RunState
from backfill.store import BatchRequest, BatchResult, LockLostError, SliceRecord, Store

__all__ = ["RunReport", "Executor", "BackfillFailedError"]

log = structlog.get_logger("backfill")

T = TypeVar("T")

#: Waits and retry backoffs are slept in steps this long, so a stop request or a pause cuts them short.
_WAIT_STEP = 0.5
#: A batch this many times slower per row than the usual pace, and at least this long, has the walk checked.
_SLOWDOWN = 4.0
_SLOW_BATCH_SECONDS = 0.005
_PACE_SMOOTHING = 0.3
#: A throttle wait at least this long is written on the slice (``status`` shows what the runner waits on); shorter
#: ones (a rate cap between fast batches) would cost a statement per batch.
_NOTE_WAIT_SECONDS = 1.0
#: During a wait, the live setting overrides are read again this often (each batch reads them anyway).
_SETTINGS_EVERY = 2.0


class BackfillFailedError(BackfillError):
    """Raised by :meth:`RunReport.raise_for_outcome` when a run ended with the backfill failed or cancelled."""


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
    #: retried batch attempts and seconds spent waiting on throttles during this run
    retries: int = 0
    throttled_seconds: float = 0.0

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


class _StopRequested(Exception):
    """Internal: ``should_stop`` turned true while the runner waited to retry a batch."""


class _HealthCheckFailed(Exception):
    """Internal: a health probe failed with an error retrying cannot fix (e.g. the user's query is invalid)."""


class Executor:
    """Runs one backfill's batches through a :class:`~backfill.store.Store`.

    Args:
        store: where the batches run and the checkpoints live.
        plan: the resolved spec (``None`` only for stores that do not need it, such as the in-memory one).
        name: the backfill.
        settings: batch size, timeouts and policies.
        clock, sleep: injected time.
        random: the random source of the retry jitter (a float in [0, 1) per call).
        should_stop: polled between batches and during waits; True ends the run after the current batch.
        check_walk: asks the database whether an index still serves the batches' walk, raising
            :class:`~backfill.errors.PlanError` if not; called when batches slow down sharply (a dropped index turns
            every batch into a scan of the whole table), so the run stops instead of scanning it thousands of times.
        health: the database probes the throttles read (the caller hands in ``backfill.pg.health.PostgresHealth``);
            without any (an in-memory store), only the time-based throttles apply.
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
        random: Callable[[], float] = _random.random,
        should_stop: Callable[[], bool] | None = None,
        health: HealthProbes | None = None,
        check_walk: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.plan = plan
        self.name = name
        self.settings = settings or RunSettings()
        self.owner = owner or default_owner()
        self.clock = clock
        self.sleep = sleep
        self.random = random
        # Retries sleep in short steps that a stop request cuts short.
        self._timing = Timing(clock, self._retry_sleep, random)
        self.should_stop = should_stop or (lambda: False)
        self.health = health
        self.check_walk = check_walk
        #: smoothed seconds per row of key range of recent batches, what a sharp slowdown is measured against
        self._usual_pace: float | None = None
        self._spec_batch_size = plan.spec.batch_size if plan is not None else None
        self._backfill_id: int | None = None
        self.throttle, self.sizer, self.retry = self.settings.policies(
            health, spec_batch_size=self._spec_batch_size, sharers=self._live_runners
        )
        #: the settings the run was started with; live overrides apply on top of them
        self._base_settings = self.settings
        self._overrides: dict[str, Any] = {}
        self._next_settings_read = -float("inf")
        #: throttle waits (seconds by reason) and retries (by reason) not yet written with a batch
        self._pending_waits: dict[str, float] = {}
        self._pending_retries: dict[str, int] = {}
        self._noted_wait: str | None = None
        #: slice -> the last key done, as this runner knows it (where its next batch's key range starts)
        self._key_from: dict[int, list[str]] = {}
        self.log = log.bind(backfill=name)
        self._state = RunState.PENDING
        self._retries = 0
        self._throttled = 0.0
        #: slice -> [its rows before this run's first batch on it, its rows after the latest one]
        self._slice_rows: dict[int, list[int]] = {}
        #: rows of batches whose store does not report slice totals
        self._uncounted_rows = 0

    def run(self, *, max_runtime: float | None = None, max_batches: int | None = None) -> RunReport:
        """Run batches until the backfill is done, a budget is spent, or it is paused, cancelled or fails.

        Every step on the control tables (reading the backfill, starting it, claiming and releasing slices, marking
        it done or failed) rides out the same transient errors a batch does: a lost connection, a server restart.

        Args:
            max_runtime: seconds after which no new batch starts.
            max_batches: batches after which the run stops.
        """
        ctx = RunContext(self.name, self.settings.batch_size or 1, self.clock(), self.clock)
        with tracing.span("backfill.run", name=self.name, owner=self.owner) as span:
            try:
                report = self._run(ctx, max_runtime, max_batches)
            except _StopRequested:
                report = self._report(ctx, RunOutcome.WORK_LEFT, self._state, "stop requested")
            except Exception as exc:
                span.fail(exc)
                raise
            span.set(
                outcome=report.outcome.value,
                state=report.state.value,
                rows=report.rows_updated,
                batches=report.batches,
                retries=report.retries,
                throttle_wait_seconds=report.throttled_seconds,
                reason=report.reason,
                error=report.error,
            )
            return report

    def _run(self, ctx: RunContext, max_runtime: float | None, max_batches: int | None) -> RunReport:
        record = self._step("get", lambda: self.store.get(self.name))
        self._state = record.state
        if self.plan is None and self.settings.sizer is None:
            self._spec_batch_size = record.spec.batch_size
            self.sizer = self.settings.policies(self.health, spec_batch_size=record.spec.batch_size)[1]
        ctx.batch_size = self.settings.batch_size or record.spec.initial_batch_size
        if record.state in _EARLY:
            return self._report(ctx, _EARLY[record.state], record.state, error=record.last_error)

        self._backfill_id = record.id
        self._apply_overrides(record.overrides)
        self._step("start", lambda: self.store.start(record, self.plan))
        self.log.info(
            "run_started",
            table=record.spec.qualified_table,
            batch_size=ctx.batch_size,
            sizer=repr(self.sizer),
            throttle=repr(self.throttle),
            max_runtime=max_runtime,
            max_batches=max_batches,
        )
        # Take any unfinished slice no live runner holds, work it to its end, and look again: slices are re-read
        # each time, so a slice left by a runner that died is taken over from its checkpoint.
        while (piece := self._claim_next(record.id)) is not None:
            if piece.checkpoint is not None:
                self._key_from[piece.slice] = piece.checkpoint
            try:
                ended = self._work(ctx, record.id, piece, max_runtime, max_batches)
            except LockLostError as exc:
                self.log.warning("lock_lost", slice=piece.slice, error=str(exc))
                ended = (RunOutcome.BUSY, RunState.RUNNING, "lock lost")
            finally:
                self._flush_counters(record.id, piece.slice)
                self._step("release", lambda: self.store.release(record.id, piece.slice, self.owner))
            if ended is not None:
                return self._report(ctx, *ended)
        left = [piece for piece in self._step("slices", lambda: self.store.slices(record.id)) if not piece.done]
        held_elsewhere = bool(left)
        if not held_elsewhere:
            self._step("finish", lambda: self.store.finish_if_done(record.id))
        state = self._step("get", lambda: self.store.get(self.name)).state
        if state is RunState.SUCCEEDED:
            return self._report(ctx, RunOutcome.FINISHED, state)
        if held_elsewhere:
            outcome = RunOutcome.BUSY if ctx.batches == 0 else RunOutcome.WORK_LEFT
            holders = "; ".join(f"slice {piece.slice}: {piece.holder}" for piece in left if piece.holder)
            reason = "other runners hold the remaining slices" + (f" ({holders})" if holders else "")
            return self._report(ctx, outcome, state, reason=reason)
        return self._report(ctx, RunOutcome.WORK_LEFT, state)

    def _step(self, step: str, work: Callable[[], T]) -> T:
        """A control-table step, retried through transient errors like a batch (see RetryPolicy.call)."""
        return self.retry.call(step, work, self._timing, self.log)

    def _claim_next(self, backfill_id: int) -> SliceRecord | None:
        for piece in self._step("slices", lambda: self.store.slices(backfill_id)):
            if not piece.done and self._step(
                "claim", functools.partial(self.store.try_claim, backfill_id, piece.slice, self.owner)
            ):
                return piece
        return None

    def _live_runners(self) -> int:
        return self.store.live_runners(self._backfill_id) if self._backfill_id is not None else 1

    def _apply_overrides(self, overrides: Mapping[str, Any] | None) -> bool:
        """Apply the backfill's live setting overrides (``backfill set``) on top of the run's own settings, if they
        changed: the throttle and sizer are rebuilt from them. True if they changed."""
        if overrides is None or dict(overrides) == self._overrides:
            return False
        self._overrides = dict(overrides)
        try:
            settings = self._base_settings.with_overrides(self._overrides)
        except SettingsError as exc:
            # Checked when they were set, but against the defaults, not this run's settings (say, a min batch size
            # above this run's max): the run keeps the settings it has.
            self.log.warning("settings_override_rejected", overrides=self._overrides, error=str(exc))
            return False
        self.settings = settings
        self.throttle, self.sizer, _ = settings.policies(
            self.health, spec_batch_size=self._spec_batch_size, sharers=self._live_runners
        )
        self.log.info("settings_changed", overrides=self._overrides, throttle=repr(self.throttle))
        return True

    def _reread_overrides(self) -> bool:
        """During a wait: read the overrides again at most every few seconds; True if they changed."""
        now = self.clock()
        if self._backfill_id is None or now < self._next_settings_read:
            return False
        self._next_settings_read = now + _SETTINGS_EVERY
        backfill_id = self._backfill_id
        try:
            overrides = self.store.overrides(backfill_id)
        except Exception as exc:  # the connection may be down: the next batch's retries handle that
            self.log.debug("settings_read_failed", error=describe(exc))
            return False
        return self._apply_overrides(overrides)

    def _flush_counters(self, backfill_id: int, slice_no: int) -> None:
        """Write throttle waits and retries that no batch carried (the run stopped after them) to the slice."""
        waits, retries = self._pending_waits, self._pending_retries
        if not waits and not retries:
            return
        try:
            self._step("counters", lambda: self.store.add_counters(backfill_id, slice_no, waits, retries))
        except Exception as exc:  # counters are worth a try, not a failed run
            self.log.warning("counters_not_written", error=describe(exc))
        self._pending_waits, self._pending_retries = {}, {}

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
            try:
                stop = self._budget_spent(ctx, max_runtime, max_batches) or self._pace(
                    ctx, max_runtime, backfill_id, piece.slice
                )
            except _HealthCheckFailed as exc:
                return self._fail(backfill_id, f"health check failed: {describe(exc.__cause__ or exc)}")
            if stop is not None:
                return RunOutcome.WORK_LEFT, RunState.RUNNING, stop
            ctx.batch_size = max(1, self.sizer(ctx))
            started = self.clock()
            try:
                result = self._traced_batch(ctx, backfill_id, piece.slice)
            except LockLostError:
                raise
            except _StopRequested:
                return RunOutcome.WORK_LEFT, RunState.RUNNING, "stop requested"
            except Exception as exc:  # a permanent error, or a transient one that outlived the retry budget
                if isinstance(exc, psycopg.errors.QueryCanceled) and self.should_stop():
                    # Our own abort (a second signal cancels parallel workers' statements): the batch rolled back.
                    return RunOutcome.WORK_LEFT, RunState.RUNNING, "aborted"
                return self._fail(backfill_id, describe(exc))
            self._apply_overrides(result.overrides)
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
            # Written with this batch: what follows counts toward the next one.
            self._pending_waits, self._pending_retries, self._noted_wait = {}, {}, None
            seconds = self.clock() - started
            ctx.record_batch(result.rows, seconds, ctx.batch_size, result.database_seconds)
            self._count(piece.slice, result)
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
            walk_error = self._watch_pace(ctx)
            if walk_error is not None:
                return self._fail(backfill_id, walk_error)

    def _traced_batch(self, ctx: RunContext, backfill_id: int, slice_no: int) -> BatchResult:
        """One batch with its retries, as a span (a child of the run's) when OpenTelemetry is set up."""
        waits, retries_before = self._pending_waits, self._retries
        waited = sum(waits.values())
        key_from = self._key_from.get(slice_no)
        with tracing.span(
            "backfill.batch",
            name=self.name,
            slice=slice_no,
            batch_size=ctx.batch_size,
            key_from=",".join(key_from) if key_from is not None else None,
            throttle_wait_seconds=waited,
            throttle_reason=max(waits, key=waits.__getitem__) if waited > 0 else None,
        ) as span:
            try:
                result = self._batch_with_retry(ctx, backfill_id, slice_no)
            except _StopRequested:
                span.set(retries=self._retries - retries_before, stopped=True)
                raise
            except Exception as exc:
                span.set(retries=self._retries - retries_before)
                span.fail(exc)
                raise
            if result.checkpoint is not None:
                self._key_from[slice_no] = result.checkpoint
            span.set(
                retries=self._retries - retries_before,
                rows=result.rows,
                applied=result.applied,
                key_to=",".join(result.checkpoint) if result.checkpoint is not None else None,
                database_seconds=result.database_seconds,
            )
            return result

    def _watch_pace(self, ctx: RunContext) -> str | None:
        """After a batch much slower per row than the ones before, ask whether an index still serves the walk;
        the error to fail with if not. A slowdown with a sound plan becomes the new usual pace."""
        if self.check_walk is None or not ctx.last_batch_seconds or ctx.last_batch_size <= 0:
            return None
        pace = ctx.last_batch_seconds / ctx.last_batch_size
        usual = self._usual_pace
        if usual is None or pace <= _SLOWDOWN * usual or ctx.last_batch_seconds < _SLOW_BATCH_SECONDS:
            self._usual_pace = pace if usual is None else _PACE_SMOOTHING * pace + (1 - _PACE_SMOOTHING) * usual
            return None
        self.log.info("walk_check", reason="batches slowed down", times_slower=round(pace / usual, 1))
        try:
            self.check_walk()
        except BackfillError as exc:
            return str(exc)
        except Exception as exc:  # the check could not run (e.g. the connection dropped): the batches go on
            self.log.warning("walk_check_failed", error=describe(exc), action="batch goes on")
        self._usual_pace = pace
        return None

    def _count(self, slice_no: int, result: BatchResult) -> None:
        # A batch acknowledged as committed can still be lost in a server crash (batches commit asynchronously);
        # it is then run again. The slice's committed total tells the two apart, so the report counts rows once.
        if result.slice_rows is None:
            self._uncounted_rows += result.rows
            return
        counted = self._slice_rows.setdefault(slice_no, [result.slice_rows - result.rows, result.slice_rows])
        counted[1] = result.slice_rows

    @property
    def rows_updated(self) -> int:
        """Rows this run updated, each counted once."""
        return self._uncounted_rows + sum(max(0, last - first) for first, last in self._slice_rows.values())

    def _fail(self, backfill_id: int, message: str) -> tuple[RunOutcome, RunState, str | None]:
        self._step("fail", lambda: self.store.fail(backfill_id, message))
        self.log.error("backfill_failed", error=message, checkpoint_kept=True)
        return RunOutcome.FAILED, RunState.FAILED, message

    def _budget_spent(self, ctx: RunContext, max_runtime: float | None, max_batches: int | None) -> str | None:
        if max_batches is not None and ctx.batches >= max_batches:
            return "max_batches"
        if max_runtime is not None and ctx.elapsed >= max_runtime:
            return "max_runtime"
        if self.should_stop():
            return "stop requested"
        return None

    def _pace(self, ctx: RunContext, max_runtime: float | None, backfill_id: int, slice_no: int) -> str | None:
        """Ask the throttle until it lets the next batch go, waiting (and logging why) in between.

        A probe that fails transiently (the connection dropped, the server restarts) is logged and the batch goes
        on: the batch's own retries reconnect and ride out the outage. A permanent probe error fails the run.
        """
        while True:
            try:
                seconds = self.throttle(ctx)
            except LockLostError:
                raise
            except Exception as exc:
                if self.retry.classify(exc) is ErrorKind.PERMANENT:
                    raise _HealthCheckFailed from exc
                self.log.warning("health_check_failed", error=describe(exc), action="batch goes on")
                return None
            if seconds <= 0:
                return None
            reason = getattr(seconds, "reason", type(self.throttle).__name__)
            self.log.info(
                "throttle_wait", reason=reason, seconds=round(float(seconds), 3), **getattr(seconds, "details", {})
            )
            if seconds >= _NOTE_WAIT_SECONDS and reason != self._noted_wait:
                self._note_wait(backfill_id, slice_no, reason)
            started = self.clock()
            stop = self._wait(ctx, seconds, max_runtime)
            waited = self.clock() - started
            self._throttled += waited
            self._pending_waits[reason] = self._pending_waits.get(reason, 0.0) + waited
            if stop is not None:
                return stop

    def _note_wait(self, backfill_id: int, slice_no: int, reason: str) -> None:
        try:
            self.store.note_wait(backfill_id, slice_no, reason)
        except Exception as exc:  # only for status: the wait and the batch after it go on
            self.log.debug("wait_not_noted", error=describe(exc))
            return
        self._noted_wait = reason

    def _wait(self, ctx: RunContext, seconds: float, max_runtime: float | None) -> str | None:
        """Sleep in short steps so a stop request or the end of the time budget cuts a long wait short."""
        deadline = self.clock() + seconds
        while (left := deadline - self.clock()) > 0:
            if self.should_stop():
                return "stop requested"
            if max_runtime is not None and ctx.elapsed >= max_runtime:
                return "max_runtime"
            if self._reread_overrides():
                return None  # the throttle is asked again, as the new settings make it
            self.sleep(min(left, _WAIT_STEP))
        return None

    def _retry_sleep(self, seconds: float) -> None:
        deadline = self.clock() + seconds
        while (left := deadline - self.clock()) > 0:
            if self.should_stop():
                raise _StopRequested
            self.sleep(min(left, _WAIT_STEP))

    def _batch_with_retry(self, ctx: RunContext, backfill_id: int, slice_no: int) -> BatchResult:
        policy = self.retry
        first_try = self.clock()
        last_attempt = 0.0
        timeouts_at_floor = 0

        def classify(exc: BaseException) -> ErrorKind:
            return policy.classify(exc, timed_out=last_attempt >= self.settings.statement_timeout)

        def smaller() -> int:
            return max(1, min(ctx.batch_size, max(policy.min_batch_size, ctx.batch_size // 2)))

        def retryable(exc: BaseException) -> bool:
            return not isinstance(exc, (LockLostError, _StopRequested)) and classify(exc) is not ErrorKind.PERMANENT

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            assert exc is not None
            kind = classify(exc)
            if kind is ErrorKind.TOO_BIG:
                ctx.batch_size = smaller()
                ctx.timeouts += 1
            ctx.attempt = state.attempt_number
            self._retries += 1
            reason = _retry_reason(exc, kind)
            self._pending_retries[reason] = self._pending_retries.get(reason, 0) + 1
            self.log.warning(
                "batch_retry",
                reason=reason,
                error=describe(exc),
                attempt=state.attempt_number,
                wait_s=round(state.upcoming_sleep, 3),
                batch_size=ctx.batch_size,
            )

        def attempt() -> BatchResult:
            nonlocal last_attempt, timeouts_at_floor
            request = BatchRequest(
                backfill_id,
                slice_no,
                ctx.batch_size,
                self.owner,
                self.settings.lock_timeout,
                self.settings.statement_timeout,
                waits=dict(self._pending_waits),
                retries=dict(self._pending_retries),
            )
            started = self.clock()
            try:
                return self.store.run_batch(self.plan, request)
            except Exception as exc:
                last_attempt = self.clock() - started
                if classify(exc) is ErrorKind.TOO_BIG and smaller() >= ctx.batch_size:
                    # The smallest batch timed out: shrinking cannot help, and each retry holds its row locks for
                    # the whole statement_timeout. A few tries with backoff (the database may have been busy),
                    # then stop and say what to change.
                    timeouts_at_floor += 1
                    if timeouts_at_floor >= policy.timeouts_at_min_size:
                        raise BatchTooSlowError(_too_slow(ctx.batch_size, timeouts_at_floor, self.settings)) from exc
                raise
            finally:
                last_attempt = self.clock() - started

        backoff = policy.backoff(self.random)

        def wait(state: tenacity.RetryCallState) -> float:
            # A batch that hit statement_timeout is retried at half the size at once: it failed for its size,
            # not for the state of the database, and the smaller batch is the lighter load. One that cannot get
            # smaller waits like any other retry.
            exc = state.outcome.exception() if state.outcome else None
            if exc is not None and classify(exc) is ErrorKind.TOO_BIG and smaller() < ctx.batch_size:
                return 0.0
            return float(backoff(state))

        retrying = policy.retrying(retryable, self._timing, wait=wait, before_sleep=before_sleep)
        try:
            return retrying(attempt)
        except Exception as exc:
            if retryable(exc):
                self.log.error(
                    "retry_budget_spent",
                    error=describe(exc),
                    seconds=round(self.clock() - first_try, 1),
                    budget_seconds=policy.budget_seconds,
                )
            raise

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
            rows_updated=self.rows_updated,
            batches=ctx.batches,
            seconds=ctx.elapsed,
            longest_batch_seconds=ctx.longest_batch_seconds,
            reason=reason,
            error=error,
            retries=self._retries,
            throttled_seconds=self._throttled,
        )
        self.log.info(
            "run_finished",
            outcome=outcome.value,
            state=state.value,
            rows=self.rows_updated,
            batches=ctx.batches,
            seconds=round(ctx.elapsed, 3),
            retries=self._retries,
            throttled_seconds=round(self._throttled, 3),
            reason=reason,
        )
        return report


def _retry_reason(exc: BaseException, kind: ErrorKind) -> str:
    """A stable word for the log: why this batch is retried."""
    if kind is ErrorKind.TOO_BIG:
        return "statement_timeout"
    return transient_reason(exc) or str(kind.value)


def _too_slow(batch_size: int, timeouts: int, settings: RunSettings) -> str:
    return (
        f"a batch of {batch_size} rows of key range, the smallest allowed, exceeded statement_timeout "
        f"({settings.statement_timeout:g}s) {timeouts} times in a row: raise statement_timeout "
        "(--statement-timeout), lower min_batch_size (--min-batch-size), or check the batch's plan "
        "(`backfill plan NAME`: its EXPLAIN should walk the key's index), then `backfill retry NAME`"
    )
