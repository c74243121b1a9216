"""What ``backfill status`` reports: a backfill's record and slices, with its progress, live runners, rate and ETA."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from backfill.state import RunState
from backfill.store import LIVE_SECONDS, BackfillRecord, BatchRecord, Key, SliceRecord

__all__ = ["BackfillStatus", "LiveRunner", "LIVE_SECONDS", "RATE_WINDOW_SECONDS", "live_owner"]

#: Rate and ETA are measured over the batches of this many last seconds: what the backfill does now, not since it
#: started (waits between cron runs, or a slow start, would skew an average since then for hours).
RATE_WINDOW_SECONDS = 60.0


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def live_owner(piece: SliceRecord, now: dt.datetime | None = None) -> str | None:
    """The runner working on ``piece`` right now: its owner while a live session holds the slice's claim (see
    ``SliceRecord.holder``), whatever the time of its last batch: a runner waiting on a long throttle still holds
    it, one that was killed holds nothing. None for a done or unclaimed slice. (``now`` is ignored: kept for
    callers of the heartbeat rule this replaced.)"""
    del now
    if piece.done or piece.holder is None:
        return None
    return piece.owner or piece.holder


@dataclass(frozen=True)
class LiveRunner:
    """A runner working on a slice right now: the host and process id it runs in (from its owner name,
    ``host:pid:tag``; the database session's pid if the owner does not say)."""

    host: str
    pid: int
    slice: int


def _live_runner(piece: SliceRecord) -> LiveRunner | None:
    owner = live_owner(piece)
    if owner is None:
        return None
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if pid.isdigit():
        return LiveRunner(host, int(pid), piece.slice)
    # Not one of our owner names: the session's pid ("pid N, role R, application A").
    session = (piece.holder or "").removeprefix("pid ").partition(",")[0]
    return LiveRunner("", int(session) if session.isdigit() else 0, piece.slice)


@dataclass(frozen=True)
class BackfillStatus:
    """One backfill as the operator sees it.

    Rate and ETA are those of the batches of the last :data:`RATE_WINDOW_SECONDS` (throttle waits included), and
    only while the backfill runs now: running, with a live runner. A backfill that is pending, paused, failed,
    succeeded, or running with no runner at the moment (between cron runs) has neither.
    """

    record: BackfillRecord
    slices: tuple[SliceRecord, ...]
    #: Bytes of the backfill's undo log (a reversible backfill's, until it is purged); None when it keeps none.
    undo_bytes: int | None = None
    #: the latest batches, oldest first (the history), and the database's time when they were read
    recent: tuple[BatchRecord, ...] = ()
    as_of: dt.datetime | None = None

    @property
    def checkpoint(self) -> Key | None:
        """The last key processed (one text value per key column), or None before the first batch. A backfill
        split into several slices has one checkpoint per slice (see ``slices``) and reports None here."""
        return self.slices[0].checkpoint if len(self.slices) == 1 else None

    @property
    def last_activity(self) -> dt.datetime | None:
        return self.record.heartbeat_at or (self.record.updated_at if self.record.started_at else None)

    @property
    def updated_at(self) -> dt.datetime:
        """The last change: of the backfill's state, or of a slice's checkpoint (the last batch)."""
        beat = self.record.heartbeat_at
        return max(self.record.updated_at, beat) if beat is not None else self.record.updated_at

    @property
    def percent(self) -> float | None:
        """Rows updated as a share of the planner's estimate of the table's rows (100 once succeeded)."""
        if self.record.state is RunState.SUCCEEDED:
            return 100.0
        estimate = self.record.estimated_rows
        if not estimate:
            return None
        # A filter or a stale estimate can put the count above the estimate: never claim done before it is.
        return min(99.9, 100.0 * self.record.rows_updated / estimate)

    @property
    def batches(self) -> int:
        """Batches committed over all slices (a counter: it only grows)."""
        return self.record.batches

    @property
    def live_runners(self) -> list[LiveRunner]:
        """The runners working on the backfill's slices right now, one per slice they hold."""
        return [runner for piece in self.slices if (runner := _live_runner(piece)) is not None]

    @property
    def running_now(self) -> bool:
        """Whether the backfill is running and a runner works on it right now."""
        return self.record.state is RunState.RUNNING and bool(self.live_runners)

    @property
    def rate(self) -> float | None:
        """Rows per second over the last :data:`RATE_WINDOW_SECONDS`, from the start of the first batch in that
        window to now; 0.0 while the runners wait without a batch; None unless the backfill runs now."""
        if not self.running_now or self.as_of is None:
            return None
        since = self.as_of - dt.timedelta(seconds=RATE_WINDOW_SECONDS)
        window = [batch for batch in self.recent if batch.finished_at > since]
        if not window:
            return 0.0
        start = max(since, min(batch.finished_at - dt.timedelta(seconds=batch.duration) for batch in window))
        seconds = (self.as_of - start).total_seconds()
        return sum(batch.rows for batch in window) / seconds if seconds > 0 else None

    @property
    def rows_per_second(self) -> float | None:
        """The same as :attr:`rate`."""
        return self.rate

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until the estimate is reached at the current :attr:`rate`; None unless the backfill runs now
        at a measurable rate with an estimate."""
        rate, estimate = self.rate, self.record.estimated_rows
        if not rate or not estimate:
            return None
        return max(estimate - self.record.rows_updated, 0) / rate

    @property
    def throttle_wait_by_reason(self) -> dict[str, float]:
        """Seconds the runners waited on throttles, by reason, over all slices (counters: they only grow)."""
        return _summed(piece.throttle_seconds for piece in self.slices)

    @property
    def retries_by_reason(self) -> dict[str, int]:
        """Retried batch attempts, by reason, over all slices (counters: they only grow)."""
        return {reason: int(count) for reason, count in _summed(piece.retries for piece in self.slices).items()}

    @property
    def throttle_reason(self) -> str | None:
        """What a live runner waits on right now, else why the last batch waited (None: it did not)."""
        for piece in self.slices:
            if piece.waiting_for is not None and live_owner(piece) is not None:
                return piece.waiting_for
        return self.recent[-1].throttle_reason if self.recent else None

    @property
    def overrides(self) -> dict[str, float]:
        """The live setting overrides (``backfill set``) every runner of this backfill applies."""
        return dict(self.record.overrides)

    def to_json(self) -> dict[str, Any]:
        """The ``status --json`` object. The first eleven keys are a stable interface for scripts."""
        record = self.record
        rate, eta, percent = self.rate, self.eta_seconds, self.percent
        return {
            "name": record.name,
            "table": record.spec.qualified_table,
            "state": record.state.value,
            "rows_updated": record.rows_updated,
            "batches": record.batches,
            "estimated_rows": record.estimated_rows,
            "checkpoint": self.checkpoint,
            "last_error": record.last_error,
            "started_at": _iso(record.started_at),
            "updated_at": _iso(self.updated_at),
            "finished_at": _iso(record.finished_at),
            "created_at": _iso(record.created_at),
            "percent": round(percent, 2) if percent is not None else None,
            "rows_per_second": round(rate, 1) if rate is not None else None,
            "eta_seconds": round(eta, 1) if eta is not None else None,
            "key": list(record.spec.key or ()),
            "upper_bound": record.upper_bound,
            "owner": record.owner,
            "heartbeat_at": _iso(record.heartbeat_at),
            "undo_bytes": self.undo_bytes,
            "live_runners": [
                {"host": runner.host, "pid": runner.pid, "slice": runner.slice} for runner in self.live_runners
            ],
            "throttle_reason": self.throttle_reason,
            "throttle_wait_by_reason": self.throttle_wait_by_reason,
            "retries_by_reason": self.retries_by_reason,
            "overrides": self.overrides,
            "slices": [
                {
                    "slice": piece.slice,
                    "lower_bound": piece.lower_bound,
                    "checkpoint": piece.checkpoint,
                    "upper_bound": piece.upper_bound,
                    "done": piece.done,
                    "rows_updated": piece.rows_updated,
                    "batches": piece.batches,
                    "owner": piece.owner,
                    "holder": piece.holder,
                }
                for piece in self.slices
            ],
        }


def _summed(counters: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for counter in counters:
        for reason, value in counter.items():
            total[reason] = total.get(reason, 0.0) + float(value)
    return total
