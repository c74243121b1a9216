"""An in-memory store, so the executor's real loop can be unit-tested without a database.

It keeps a "table" as a sorted list of integer keys with a counter per row, and implements the same batch contract
as :class:`~backfill.pg.store.PostgresStore`: the checkpoint and the rows move together or not at all. Errors can be
queued to make chosen batches fail, and a hook runs before each batch to change state mid-run (e.g. a pause).
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from backfill.errors import UnknownBackfillError
from backfill.plan import Plan
from backfill.spec import BackfillSpec
from backfill.state import RunState
from backfill.store import BackfillRecord, BatchRequest, BatchResult, SliceRecord

__all__ = ["InMemoryStore", "FakeClock"]

_EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


@dataclass
class FakeClock:
    """Injected time for unit tests: ``clock()`` reads it, ``clock.sleep(s)`` records the sleep and advances it,
    ``clock.advance(s)`` makes time pass as if work had been done (e.g. from ``InMemoryStore.before_batch``)."""

    now: float = 0.0
    sleeps: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @property
    def slept(self) -> float:
        return sum(self.sleeps)


@dataclass
class InMemoryStore:
    """A :class:`~backfill.store.Store` over an in-memory table of integer keys; ``counts[key]`` is how many times
    the backfill updated that row (exactly-once means every value is 1)."""

    keys: list[int]
    spec: BackfillSpec
    state: RunState = RunState.PENDING
    counts: dict[int, int] = field(default_factory=dict)
    #: exceptions raised by the next batches, in order, before any change (like a rolled-back transaction)
    errors: list[BaseException] = field(default_factory=list)
    #: called with the request before each batch; may change ``state`` to simulate an operator
    before_batch: Callable[[BatchRequest], None] | None = None
    #: holders of the advisory lock per slice: a runner that is not in here must not get it
    locked_by_others: set[int] = field(default_factory=set)
    requests: list[BatchRequest] = field(default_factory=list)
    last_error: str | None = None
    checkpoint: int | None = None
    upper: int | None = None
    done: bool = False

    @classmethod
    def for_keys(cls, keys: Iterable[int], *, batch_size: int | None = 10, name: str = "test") -> InMemoryStore:
        return cls(sorted(keys), BackfillSpec(name, "t", {"n": "n + 1"}, batch_size=batch_size))

    def get(self, name: str) -> BackfillRecord:
        if name != self.spec.name:
            raise UnknownBackfillError(f"no backfill named {name!r}")
        return BackfillRecord(
            id=1,
            name=name,
            spec=self.spec,
            fingerprint=self.spec.fingerprint(),
            state=self.state,
            upper_bound=None if self.upper is None else [str(self.upper)],
            estimated_rows=len(self.keys),
            last_error=self.last_error,
            created_at=_EPOCH,
            started_at=None,
            updated_at=_EPOCH,
            finished_at=None,
            rows_updated=sum(self.counts.values()),
            batches=len(self.requests),
        )

    def try_claim(self, backfill_id: int, slice: int) -> bool:
        return slice not in self.locked_by_others

    def release(self, backfill_id: int, slice: int, owner: str) -> None:
        return None

    def start(self, record: BackfillRecord, plan: Plan | None) -> list[SliceRecord]:
        if self.state.runnable:
            if not self.keys:
                self.state = RunState.SUCCEEDED
                return []
            self.state = RunState.RUNNING
            if self.upper is None:
                self.upper = self.keys[-1]
        return [self._slice()] if self.upper is not None else []

    def slices(self, backfill_id: int) -> list[SliceRecord]:
        return [self._slice()] if self.upper is not None else []

    def live_runners(self, backfill_id: int) -> int:
        return 1

    def finish_if_done(self, backfill_id: int) -> bool:
        if self.state is RunState.RUNNING and self.done:
            self.state = RunState.SUCCEEDED
            return True
        return False

    def _slice(self) -> SliceRecord:
        assert self.upper is not None
        return SliceRecord(
            0,
            None,
            [str(self.upper)],
            None if self.checkpoint is None else [str(self.checkpoint)],
            self.done,
            sum(self.counts.values()),
            len(self.requests),
            None,
            None,
        )

    def run_batch(self, plan: Plan | None, request: BatchRequest) -> BatchResult:
        if self.before_batch is not None:
            self.before_batch(request)
        if self.errors:
            raise self.errors.pop(0)
        if self.state is not RunState.RUNNING or self.done:
            return BatchResult(state=self.state, applied=False, slice_done=self.done)
        assert self.upper is not None
        self.requests.append(request)
        start = 0 if self.checkpoint is None else bisect.bisect_right(self.keys, self.checkpoint)
        stop = bisect.bisect_right(self.keys, self.upper)
        chunk = self.keys[start : min(start + request.batch_size, stop)]
        for key in chunk:
            self.counts[key] = self.counts.get(key, 0) + 1
        end = chunk[-1] if chunk else self.upper
        self.checkpoint, self.done = end, end == self.upper
        if self.done:
            self.state = RunState.SUCCEEDED
        return BatchResult(
            state=self.state,
            applied=True,
            rows=len(chunk),
            checkpoint=[str(end)],
            slice_done=self.done,
            finished=self.done,
        )

    def fail(self, backfill_id: int, error: str) -> None:
        self.state, self.last_error = RunState.FAILED, error
