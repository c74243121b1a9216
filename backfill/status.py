"""What ``backfill status`` reports: a backfill's record and slices, with its progress, rate and ETA derived."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from backfill.state import RunState
from backfill.store import LIVE_SECONDS, BackfillRecord, Key, SliceRecord

__all__ = ["BackfillStatus", "LIVE_SECONDS", "live_owner"]

#: A slice's owner counts as holding it while the owner's last batch on it is this recent: the rule the store uses
#: to count live runners for the shared rows/s cap.


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def live_owner(piece: SliceRecord, now: dt.datetime | None = None) -> str | None:
    """The runner working on ``piece``: its owner, unless the slice is done, was released, or its last batch is
    older than :data:`LIVE_SECONDS` (the runner died, or waits on a throttle that long)."""
    if piece.done or piece.owner is None or piece.heartbeat_at is None:
        return None
    now = now or dt.datetime.now(dt.timezone.utc)
    return piece.owner if (now - piece.heartbeat_at).total_seconds() <= LIVE_SECONDS else None


@dataclass(frozen=True)
class BackfillStatus:
    """One backfill as the operator sees it.

    Rate and ETA are averages since the backfill started, waits between runs included: for a backfill that cron
    runs in slices of time, the ETA is wall-clock time at that cadence.
    """

    record: BackfillRecord
    slices: tuple[SliceRecord, ...]
    #: Bytes of the backfill's undo log (a reversible backfill's, until it is purged); None when it keeps none.
    undo_bytes: int | None = None

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
    def rows_per_second(self) -> float | None:
        started, last = self.record.started_at, self.last_activity
        if started is None or last is None or self.record.rows_updated == 0:
            return None
        seconds = (last - started).total_seconds()
        return self.record.rows_updated / seconds if seconds > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until the estimate is reached at the average rate; None when unknown or not runnable."""
        rate, estimate = self.rows_per_second, self.record.estimated_rows
        if not self.record.state.runnable or not rate or not estimate:
            return None
        return max(estimate - self.record.rows_updated, 0) / rate

    def to_json(self) -> dict[str, Any]:
        """The ``status --json`` object. The first eleven keys are a stable interface for scripts."""
        record = self.record
        rate, eta, percent = self.rows_per_second, self.eta_seconds, self.percent
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
