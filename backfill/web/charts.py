"""The dashboard's charts: rows/s and batch duration over time, as points for an inline SVG (no script, no CDN)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Chart", "Batch", "HistoryPoint", "WIDTH", "HEIGHT", "line_chart", "rate_points", "duration_points"]

#: The SVG's coordinate box; the page scales it with CSS.
WIDTH = 360
HEIGHT = 80
#: A rate is a count over time: the recent history is cut into at most this many intervals.
_RATE_BUCKETS = 40
#: A batch after a long gap (its runner stopped, or waited on a throttle) accounts for at most this much time.
_LONGEST_SPAN = 60.0


class Batch(Protocol):
    """What the charts read of a batch of the history (``backfill.BatchRecord`` has it)."""

    @property
    def slice(self) -> int: ...

    @property
    def finished_at(self) -> dt.datetime: ...

    @property
    def rows(self) -> int: ...

    @property
    def duration(self) -> float: ...


@dataclass(frozen=True)
class HistoryPoint:
    """A batch with only what the charts read (for tests and callers without a history table)."""

    finished_at: dt.datetime
    rows: int
    duration: float  #: seconds
    slice: int = 0


@dataclass(frozen=True)
class Chart:
    """A line chart ready for the template: ``points`` is an SVG polyline's ``points`` attribute."""

    points: str
    peak: float  #: the value at the top of the box
    unit: str
    span_seconds: float  #: the time the x axis covers, ending at the newest point
    count: int  #: how many points

    @property
    def empty(self) -> bool:
        """Fewer than two points: no line to draw."""
        return self.count < 2


def _spans(history: Sequence[Batch]) -> list[tuple[float, float, int]]:
    """Each batch as (start, end, rows) in seconds on one time line: a batch accounts for the time since the
    previous batch of its slice ended (its throttle wait and its own work), at most :data:`_LONGEST_SPAN`. The
    first batch of a slice in the history gets the slice's median gap (its predecessor may have been trimmed)."""
    by_slice: dict[int, list[Batch]] = {}
    for batch in sorted(history, key=lambda point: point.finished_at):
        by_slice.setdefault(batch.slice, []).append(batch)
    spans = []
    for batches in by_slice.values():
        ends = [batch.finished_at.timestamp() for batch in batches]
        gaps = sorted(later - earlier for earlier, later in zip(ends, ends[1:], strict=False))
        for position, (batch, end) in enumerate(zip(batches, ends, strict=True)):
            since = end - ends[position - 1] if position else gaps[len(gaps) // 2] if gaps else batch.duration
            spans.append((end - min(max(since, batch.duration, 0.0), _LONGEST_SPAN), end, batch.rows))
    return spans


def rate_points(history: Sequence[Batch]) -> list[tuple[float, float]]:
    """Rows per second over time, at the end of each of up to :data:`_RATE_BUCKETS` equal intervals (seconds since
    the first batch began). Each batch's rows are spread over the time it accounts for, so a steady runner draws a
    flat line whatever the intervals; several runners' batches add up."""
    spans = _spans(history)
    if not spans:
        return []
    first, last = min(start for start, _, _ in spans), max(end for _, end, _ in spans)
    if last <= first:
        return []
    buckets = max(1, min(_RATE_BUCKETS, len(spans)))
    width = (last - first) / buckets
    rows = [0.0] * buckets
    for start, end, count in spans:
        if end <= start:
            rows[min(int((end - first) / width), buckets - 1)] += count
            continue
        for index in range(int((start - first) / width), min(int((end - first) / width), buckets - 1) + 1):
            low, high = first + index * width, first + (index + 1) * width
            rows[index] += count * max(0.0, min(end, high) - max(start, low)) / (end - start)
    return [((index + 1) * width, count / width) for index, count in enumerate(rows)]


def duration_points(history: Sequence[Batch]) -> list[tuple[float, float]]:
    """Each batch's database time in milliseconds, at its end (seconds since the first batch ended)."""
    ordered = sorted(history, key=lambda point: point.finished_at)
    if not ordered:
        return []
    first = ordered[0].finished_at
    return [((point.finished_at - first).total_seconds(), point.duration * 1000.0) for point in ordered]


def line_chart(points: Sequence[tuple[float, float]], unit: str) -> Chart:
    """Scale ``(x, y)`` points into the SVG box: x from the first point to the last, y from 0 to the peak."""
    if not points:
        return Chart("", 0.0, unit, 0.0, 0)
    x0 = min(x for x, _ in points)
    span = max(x for x, _ in points) - x0
    peak = max(max(y for _, y in points), 0.0)
    coordinates = []
    for x, y in points:
        left = (x - x0) / span * WIDTH if span > 0 else WIDTH / 2
        top = HEIGHT - (y / peak * HEIGHT if peak > 0 else 0.0)
        coordinates.append(f"{left:.1f},{top:.1f}")
    return Chart(" ".join(coordinates), peak, unit, span, len(points))
