"""``/metrics``: the control tables as Prometheus metrics, read at scrape time by a custom collector."""

from __future__ import annotations

import bisect
import datetime as dt
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from backfill.state import RunState
from backfill.status import BackfillStatus
from backfill.web.charts import Batch

__all__ = ["DURATION_BUCKETS", "ControlTablesCollector", "Snapshot", "metrics_registry"]

#: Upper bounds (seconds) of the batch duration histogram: adaptive sizing aims at 50 ms, the statement timeout is
#: 30 s by default.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: What a scrape reads: every backfill's status, with its recent batches (oldest first).
Snapshot = Sequence[BackfillStatus]


@dataclass
class _Tally:
    """The batch durations of one backfill seen so far by this process: a cumulative histogram.

    The history table keeps only recent batches, so a histogram computed from it alone would shrink when old
    batches are trimmed, which Prometheus reads as a counter reset. Each scrape adds only the batches it has not
    seen (by their end time; batches of several slices can end at the same instant, hence the slices at the mark).
    """

    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0
    mark: dt.datetime | None = None
    at_mark: set[int] = field(default_factory=set)

    def add(self, history: Sequence[Batch]) -> None:
        for batch in history:
            if self.mark is not None and batch.finished_at < self.mark:
                continue
            if batch.finished_at == self.mark and batch.slice in self.at_mark:
                continue
            if self.mark is None or batch.finished_at > self.mark:
                self.mark, self.at_mark = batch.finished_at, set()
            self.at_mark.add(batch.slice)
            self.counts[bisect.bisect_left(DURATION_BUCKETS, batch.duration)] += 1
            self.total += batch.duration

    def buckets(self) -> list[tuple[str, float]]:
        cumulative, out = 0, []
        for bound, count in zip([*map(str, DURATION_BUCKETS), "+Inf"], self.counts, strict=True):
            cumulative += count
            out.append((bound, float(cumulative)))
        return out


class ControlTablesCollector(Collector):
    """Reads the control tables (through ``read``) at each scrape and reports every backfill, labelled
    ``backfill="<name>"``. Counters come from the control tables' own totals, so they are the same whichever
    server scrapes them; the duration histogram counts the batches this process has seen in the history."""

    def __init__(self, read: Callable[[], Snapshot]) -> None:
        self._read = read
        self._tallies: dict[str, _Tally] = {}
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        # Nothing to describe up front: registering the collector must not read the database.
        return []

    def collect(self) -> Iterator[Metric]:
        snapshot = self._read()
        rows = CounterMetricFamily("backfill_rows_updated", "Rows the backfill has updated.", labels=["backfill"])
        batches = CounterMetricFamily("backfill_batches", "Batches the backfill has committed.", labels=["backfill"])
        durations = HistogramMetricFamily(
            "backfill_batch_duration_seconds",
            "Database time of each batch (the batches of the history this server has read).",
            labels=["backfill"],
        )
        waits = CounterMetricFamily(
            "backfill_throttle_wait_seconds",
            "Seconds runners waited before batches, by the throttle's reason.",
            labels=["backfill", "reason"],
        )
        retries = CounterMetricFamily(
            "backfill_retries", "Batches retried, by the reason of the retry.", labels=["backfill", "reason"]
        )
        state = GaugeMetricFamily(
            "backfill_state", "1 for the backfill's current state, 0 for the others.", labels=["backfill", "state"]
        )
        live = GaugeMetricFamily("backfill_live_runners", "Runners working on the backfill now.", labels=["backfill"])
        eta = GaugeMetricFamily(
            "backfill_estimated_seconds_remaining",
            "Seconds left at the recent rate (only while the backfill runs).",
            labels=["backfill"],
        )
        with self._lock:
            for status in snapshot:
                record = status.record
                name = record.name
                rows.add_metric([name], record.rows_updated)
                batches.add_metric([name], status.batches)
                tally = self._tallies.setdefault(name, _Tally())
                tally.add(status.recent)
                durations.add_metric([name], tally.buckets(), tally.total)
                for reason, seconds in sorted(status.throttle_wait_by_reason.items()):
                    waits.add_metric([name, reason], seconds)
                for reason, count in sorted(status.retries_by_reason.items()):
                    retries.add_metric([name, reason], count)
                for value in RunState:
                    state.add_metric([name, value.value], 1.0 if record.state is value else 0.0)
                live.add_metric([name], len(status.live_runners))
                if status.eta_seconds is not None:
                    eta.add_metric([name], status.eta_seconds)
            # A backfill deleted since the last scrape: forget its tally.
            for gone in set(self._tallies) - {status.record.name for status in snapshot}:
                del self._tallies[gone]
        yield from (rows, batches, durations, waits, retries, state, live, eta)


def metrics_registry(read: Callable[[], Snapshot]) -> CollectorRegistry:
    """A registry of its own holding only the control tables' collector (not the process-wide default one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControlTablesCollector(read))
    return registry
