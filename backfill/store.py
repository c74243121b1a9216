"""What a store is: the protocol the executor drives and the records it returns.

``backfill.pg.store.PostgresStore`` keeps them in the control tables; ``backfill.testing.InMemoryStore`` in memory.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from backfill.plan import Plan
from backfill.spec import BackfillSpec
from backfill.state import RunState

__all__ = [
    "BackfillRecord",
    "SliceRecord",
    "BatchRecord",
    "BatchRequest",
    "BatchResult",
    "LockLostError",
    "Store",
    "RunnerStore",
    "LIVE_SECONDS",
    "split_free_slices",
]

Key = list[str]

#: Kept for compatibility: liveness now comes from the claims themselves (a slice's claim counts while the session
#: that made it lives), not from how recent a runner's last batch is.
LIVE_SECONDS = 60.0


@dataclass(frozen=True)
class SliceRecord:
    """One key range of a backfill, with its own checkpoint (a backfill has one slice unless split)."""

    slice: int
    lower_bound: Key | None  #: exclusive; None = from the first key
    upper_bound: Key  #: inclusive, fixed when the run started
    checkpoint: Key | None  #: last key processed; None = nothing yet
    done: bool
    rows_updated: int
    batches: int
    owner: str | None
    heartbeat_at: dt.datetime | None
    holder: str | None = None  #: the live session holding its claim: "pid N, role R, application A"
    #: seconds its runners waited on throttles, by reason, and retried batch attempts, by reason: they only grow
    throttle_seconds: dict[str, float] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    #: the throttle its runner waits on right now (a long wait since ``waiting_since``), None between batches
    waiting_for: str | None = None
    waiting_since: dt.datetime | None = None


@dataclass(frozen=True)
class BatchRecord:
    """One committed batch, as the history keeps it (the last ``HISTORY_PER_SLICE`` batches of each slice)."""

    slice: int
    finished_at: dt.datetime  #: database time
    rows: int  #: rows it updated
    duration: float  #: seconds its transaction worked in the database
    batch_size: int  #: rows of key range it walked
    retries: int  #: attempts of it that failed transiently and were retried
    throttle_wait: float  #: seconds its runner waited on throttles before it
    throttle_reason: str | None  #: the reason of the longest of those waits


@dataclass(frozen=True)
class BackfillRecord:
    """A backfill as stored in the control table, with its slices' counters summed."""

    id: int
    name: str
    spec: BackfillSpec
    fingerprint: str
    state: RunState
    upper_bound: Key | None
    estimated_rows: int | None
    last_error: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    rows_updated: int = 0
    batches: int = 0
    heartbeat_at: dt.datetime | None = None
    owner: str | None = None
    #: What the checkpoint means (see :attr:`backfill.plan.Plan.key_signature`), stored when it was registered;
    #: None for a backfill registered by an older release.
    key_signature: tuple[str, ...] | None = None
    #: Live setting overrides (``backfill set``), by :data:`backfill.settings.LIVE_SETTINGS` name.
    overrides: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchRequest:
    """What one batch should do: which slice, how many rows of key range, with which timeouts."""

    backfill_id: int
    slice: int
    batch_size: int
    owner: str
    lock_timeout: float
    statement_timeout: float
    #: seconds waited on throttles since the runner's last batch on this slice, by reason; and retried attempts
    #: of this batch, by reason: the batch adds them to the slice's counters and its history row
    waits: Mapping[str, float] = field(default_factory=dict)
    retries: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchResult:
    """What one batch transaction did. ``applied`` is False when it found the backfill not running (paused,
    cancelled) or the slice already done, and changed nothing."""

    state: RunState
    applied: bool
    rows: int = 0
    checkpoint: Key | None = None
    slice_done: bool = False
    finished: bool = False
    #: The slice's rows updated so far, as committed with this batch (None if the store does not count them). A
    #: crash can lose the newest batches of a runner (they commit asynchronously) and they are run again: counting
    #: from these totals, a run reports each row once.
    slice_rows: int | None = None
    #: seconds the batch's transaction worked in the database (None: the store cannot tell); the round trip to
    #: it is left out, as no batch size can shorten it. A measurement, not part of what the batch did: left out of
    #: comparisons.
    database_seconds: float | None = field(default=None, compare=False)
    #: the backfill's live setting overrides as the batch read them (None: the store does not say)
    overrides: Mapping[str, float] | None = field(default=None, compare=False)


class LockLostError(Exception):
    """Internal: the runner's connection broke and another runner took the slice before it reconnected."""


class Store(Protocol):
    """What the executor needs from a store. :class:`PostgresStore` is the real one; ``backfill.testing`` has an
    in-memory one so the loop's logic is tested without a database."""

    def get(self, name: str) -> BackfillRecord: ...

    def try_claim(self, backfill_id: int, slice: int, owner: str | None = None) -> bool: ...

    def release(self, backfill_id: int, slice: int, owner: str | None = None) -> None: ...

    def start(self, record: BackfillRecord, plan: Plan | None) -> list[SliceRecord]: ...

    def slices(self, backfill_id: int) -> list[SliceRecord]: ...

    def live_runners(self, backfill_id: int) -> int: ...

    def finish_if_done(self, backfill_id: int) -> bool: ...

    def run_batch(self, plan: Plan | None, request: BatchRequest) -> BatchResult: ...

    def fail(self, backfill_id: int, error: str) -> None: ...

    def split(self, plan: Plan | None, backfill_id: int, parts: int) -> int: ...

    def add_counters(
        self, backfill_id: int, slice: int, waits: Mapping[str, float], retries: Mapping[str, int]
    ) -> None: ...

    def note_wait(self, backfill_id: int, slice: int, reason: str) -> None: ...

    def overrides(self, backfill_id: int) -> Mapping[str, float]: ...


class RunnerStore(Store, Protocol):
    """A store a worker thread owns: its statement can be cancelled from another thread, and it is closed after."""

    def cancel(self) -> None: ...

    def close(self) -> None: ...


def split_free_slices(store: Store, backfill_id: int, parts: int, split_one: Callable[[int, int], None]) -> int:
    """Split unfinished slices that no runner holds until there are ``parts`` unfinished slices (or no more split
    points): ``split_one(slice, pieces)`` cuts one claimed slice into that many. Returns how many unfinished slices
    there are now. Slices held by live runners are left alone: only a slice's holder may change it."""
    pieces = [piece for piece in store.slices(backfill_id) if not piece.done]
    if not pieces or len(pieces) >= parts:
        return len(pieces)
    free = [piece for piece in pieces if store.try_claim(backfill_id, piece.slice)]
    try:
        extra = parts - len(pieces)
        for i, piece in enumerate(free):
            cut = 1 + extra // len(free) + (1 if i < extra % len(free) else 0)
            if cut > 1:
                split_one(piece.slice, cut)
    finally:
        for piece in free:
            store.release(backfill_id, piece.slice)
    return sum(1 for piece in store.slices(backfill_id) if not piece.done)
