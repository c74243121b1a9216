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
        return self.count == 0


def rate_points(history: Sequence[Batch]) -> list[tuple[float, float]]:
    """Rows per second over time: the span of ``history`` cut into equal intervals, each interval's rows over its
    length, at the interval's end (seconds since the first batch). Several runners' batches add up."""
    if not history:
        return []
    ordered = sorted(history, key=lambda point: point.finished_at)
    start = ordered[0].finished_at - dt.timedelta(seconds=ordered[0].duration)
    span = (ordered[-1].finished_at - start).total_seconds()
    if span <= 0:
        return []
    buckets = min(_RATE_BUCKETS, len(ordered))
    width = span / buckets
    rows = [0] * buckets
    for point in ordered:
        offset = (point.finished_at - start).total_seconds()
        rows[min(int(offset / width), buckets - 1)] += point.rows
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
