"""What the dashboard shows of one backfill, derived from its status and batch history (no I/O here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from backfill.cli.durations import format_duration
from backfill.state import TRANSITIONS, OperatorAction, RunState
from backfill.status import BackfillStatus, LiveRunner
from backfill.store import SliceRecord
from backfill.web.charts import Batch, Chart, duration_points, line_chart, rate_points

__all__ = ["SETTINGS_FORM", "BackfillView", "SliceView", "backfill_view", "live_settings", "slice_fraction"]

#: The live settings the dashboard's form changes: (``set_backfill_settings`` keyword, label, unit, what 0 means).
SETTINGS_FORM = (
    ("max_rows_per_second", "max rows/s", "", "no cap"),
    ("sleep", "sleep", "s", "none"),
    ("target_batch_time", "target batch time", "s", "fixed size"),
)


@dataclass(frozen=True)
class SliceView:
    number: int
    #: share of the slice's key range behind its checkpoint (0..1), or None when keys cannot be measured
    fraction: float | None
    where: str  #: "done", "at KEY", "not started"
    rows: int
    batches: int


@dataclass(frozen=True)
class BackfillView:
    """One backfill as a card of the dashboard."""

    name: str
    table: str
    state: str
    percent: float | None
    rows: int
    estimated_rows: int | None
    rate: str
    eta: str
    batches: int
    retries: int
    retries_by_reason: str  #: "lock_timeout 3, deadlock 1"
    throttle_reason: str | None
    throttle_waited: str  #: time waited on throttles, all reasons
    last_error: str | None
    runners: tuple[LiveRunner, ...]
    overrides: str  #: the live settings (``backfill set``), "" without
    slices: tuple[SliceView, ...]
    rate_chart: Chart
    duration_chart: Chart
    actions: tuple[str, ...]  #: the operator actions its state allows, in button order


def _key(key: Sequence[str] | None) -> str:
    if key is None:
        return "-"
    return key[0] if len(key) == 1 else "(" + ", ".join(key) + ")"


def _integer(key: Sequence[str] | None) -> int | None:
    if key is None or len(key) != 1:
        return None
    try:
        return int(key[0])
    except ValueError:
        return None


def slice_fraction(piece: SliceRecord) -> float | None:
    """How far a slice's checkpoint is through its key range, for a one-column integer key; None otherwise.

    The first slice has no lower bound (it starts at the table's first key, which is not stored): it is measured
    from 0, exact for keys numbered from 1.
    """
    if piece.done:
        return 1.0
    upper = _integer(piece.upper_bound)
    lower = 0 if piece.lower_bound is None else _integer(piece.lower_bound)
    if upper is None or lower is None or upper <= lower:
        return None
    if piece.checkpoint is None:
        return 0.0
    at = _integer(piece.checkpoint)
    if at is None:
        return None
    return min(max((at - lower) / (upper - lower), 0.0), 1.0)


def _slice_view(piece: SliceRecord, overall: float | None, only: bool) -> SliceView:
    started = piece.checkpoint is not None and piece.checkpoint != piece.lower_bound
    where = "done" if piece.done else f"at {_key(piece.checkpoint)}" if started else "not started"
    # One slice is the whole backfill: its progress is the backfill's, which needs no integer key.
    fraction = overall / 100.0 if only and overall is not None else slice_fraction(piece)
    return SliceView(piece.slice, fraction, where, piece.rows_updated, piece.batches)


def live_settings(overrides: dict[str, float]) -> str:
    """The live settings in the page's words: ``max rows/s 500 · sleep 0.2s`` (other names as stored)."""
    labels = {name: (label, unit, zero) for name, label, unit, zero in SETTINGS_FORM}
    shown = []
    for name, value in sorted(overrides.items()):
        label, unit, zero = labels.get(name, (name, "", ""))
        shown.append(f"{label} {zero}" if value == 0 and zero else f"{label} {value:g}{unit}")
    return " · ".join(shown)


def _actions(state: RunState) -> tuple[str, ...]:
    return tuple(action.value for action in OperatorAction if state in TRANSITIONS[action][0])


def backfill_view(status: BackfillStatus, history: Sequence[Batch] | None = None) -> BackfillView:
    """The card of one backfill: its status, its runners and slices, and charts of its recent batches (by default
    those the status read)."""
    record = status.record
    history = status.recent if history is None else history
    percent, rate, eta = status.percent, status.rate, status.eta_seconds
    retries = status.retries_by_reason
    only = len(status.slices) == 1
    return BackfillView(
        name=record.name,
        table=record.spec.qualified_table,
        state=record.state.value,
        percent=percent,
        rows=record.rows_updated,
        estimated_rows=record.estimated_rows,
        rate=f"{rate:,.0f} rows/s" if rate is not None else "-",
        eta=format_duration(eta) if eta is not None else "-",
        batches=record.batches,
        retries=sum(retries.values()),
        retries_by_reason=", ".join(f"{reason} {count:,}" for reason, count in sorted(retries.items())),
        throttle_reason=status.throttle_reason,
        throttle_waited=format_duration(sum(status.throttle_wait_by_reason.values())),
        last_error=record.last_error,
        runners=tuple(status.live_runners),
        overrides=live_settings(status.overrides),
        slices=tuple(_slice_view(piece, percent, only) for piece in status.slices),
        rate_chart=line_chart(rate_points(history), "rows/s"),
        duration_chart=line_chart(duration_points(history), "ms"),
        actions=_actions(record.state),
    )
