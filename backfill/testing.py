"""An in-memory store, so the executor's real loop can be unit-tested without a database.

:class:`MemoryDatabase` plays the database: a "table" of integer keys with a counter per row, the control tables
(backfills and their slices) and the slice claims. :class:`InMemoryStore` plays one runner's connection to it,
with the same protocol and semantics as :class:`~backfill.pg.store.PostgresStore` (``tests/test_store_contract.py``
runs one set of tests against both): a slice is claimed by one store at a time, a batch moves the checkpoint and the
rows together or not at all, a lost connection loses the claims it held. Several stores over one database are several
runners. Errors can be queued to make chosen batches fail, and a hook runs before each batch to change state mid-run
(e.g. a pause).
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import psycopg

from backfill import store as protocol
from backfill.errors import StateTransitionError, UnknownBackfillError
from backfill.plan import Plan
from backfill.spec import BackfillSpec
from backfill.state import TRANSITIONS, OperatorAction, RunState
from backfill.store import BackfillRecord, BatchRequest, BatchResult, LockLostError, SliceRecord

__all__ = ["InMemoryStore", "MemoryDatabase", "FakeClock"]

_EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
_SESSIONS = itertools.count(1)


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
class _Slice:
    lower: int | None
    upper: int
    checkpoint: int | None = None
    done: bool = False
    rows_updated: int = 0
    batches: int = 0
    owner: str | None = None
    heartbeat_at: dt.datetime | None = None
    throttle_seconds: dict[str, float] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    waiting_for: str | None = None

    def add(self, waits: Mapping[str, float], retries: Mapping[str, int]) -> None:
        for reason, seconds in waits.items():
            self.throttle_seconds[reason] = self.throttle_seconds.get(reason, 0.0) + seconds
        for reason, count in retries.items():
            self.retries[reason] = self.retries.get(reason, 0) + count

    def record(self, number: int, holder: str | None) -> SliceRecord:
        return SliceRecord(
            slice=number,
            lower_bound=_key(self.lower),
            upper_bound=[str(self.upper)],
            checkpoint=_key(self.checkpoint),
            done=self.done,
            rows_updated=self.rows_updated,
            batches=self.batches,
            owner=self.owner,
            heartbeat_at=self.heartbeat_at,
            holder=holder,
            throttle_seconds=dict(self.throttle_seconds),
            retries=dict(self.retries),
            waiting_for=self.waiting_for,
        )


@dataclass
class _Backfill:
    id: int
    spec: BackfillSpec
    state: RunState = RunState.PENDING
    upper: int | None = None
    estimated_rows: int | None = None
    last_error: str | None = None
    started_at: dt.datetime | None = None
    updated_at: dt.datetime = _EPOCH
    finished_at: dt.datetime | None = None
    slices: dict[int, _Slice] = field(default_factory=dict)
    overrides: dict[str, float] = field(default_factory=dict)


def _key(value: int | None) -> protocol.Key | None:
    return None if value is None else [str(value)]


@dataclass
class MemoryDatabase:
    """What the in-memory stores share: the table's keys, how often each row was updated (exactly-once means every
    counter is 1), the backfills with their slices, and which store holds each slice's lock.

    ``clock`` gives the seconds that heartbeats and timestamps are stamped with (a :class:`FakeClock` in tests).
    """

    keys: list[int] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)
    clock: Callable[[], float] = field(default_factory=FakeClock)
    backfills: dict[str, _Backfill] = field(default_factory=dict)
    locks: dict[tuple[int, int], InMemoryStore] = field(default_factory=dict)
    #: every statement runs under this lock, as if each were its own serialisable transaction
    mutex: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def now(self) -> dt.datetime:
        return _EPOCH + dt.timedelta(seconds=self.clock())

    def insert(self, keys: Iterable[int]) -> None:
        with self.mutex:
            self.keys = sorted({*self.keys, *keys})

    def register(self, spec: BackfillSpec) -> int:
        """Store ``spec`` (pending) under its name, or return the id of the backfill already stored there."""
        with self.mutex:
            if spec.name not in self.backfills:
                self.backfills[spec.name] = _Backfill(len(self.backfills) + 1, spec, updated_at=self.now())
            return self.backfills[spec.name].id

    def by_id(self, backfill_id: int) -> _Backfill:
        return next(b for b in self.backfills.values() if b.id == backfill_id)


@dataclass(eq=False)
class InMemoryStore:
    """A :class:`~backfill.store.RunnerStore` over a :class:`MemoryDatabase`: one runner's connection to it.

    The store takes a ``plan`` argument where the PostgreSQL store does, and ignores it.
    """

    database: MemoryDatabase
    #: exceptions raised by the next batches, in order, before any change (like a rolled-back transaction)
    errors: list[BaseException] = field(default_factory=list)
    #: called with the request before each batch; may change ``state`` to simulate an operator
    before_batch: Callable[[BatchRequest], None] | None = None
    #: the batches this store applied
    requests: list[BatchRequest] = field(default_factory=list)
    #: names this store's claims in ``SliceRecord.holder`` (PostgreSQL names the claiming session)
    session: str = field(default_factory=lambda: f"in-memory session {next(_SESSIONS)}")
    _claims: set[tuple[int, int]] = field(default_factory=set)
    _connected: bool = True
    _broken: bool = False

    @classmethod
    def for_keys(cls, keys: Iterable[int], *, batch_size: int | None = 10, name: str = "test") -> InMemoryStore:
        """A store over a fresh database holding ``keys`` and one pending backfill called ``name``."""
        database = MemoryDatabase(sorted(keys))
        database.register(BackfillSpec(name, "t", {"n": "n + 1"}, batch_size=batch_size))
        return cls(database)

    def sharing(self) -> InMemoryStore:
        """Another runner's store over the same database (a ``make_store`` for ``run_parallel``)."""
        return InMemoryStore(self.database)

    # --- the first backfill, for tests of one backfill ---------------------------------------------------------

    @property
    def _only(self) -> _Backfill:
        return next(iter(self.database.backfills.values()))

    @property
    def keys(self) -> list[int]:
        return self.database.keys

    @property
    def counts(self) -> dict[int, int]:
        return self.database.counts

    @property
    def state(self) -> RunState:
        return self._only.state

    @state.setter
    def state(self, state: RunState) -> None:
        self._only.state = state

    @property
    def last_error(self) -> str | None:
        return self._only.last_error

    # --- the connection --------------------------------------------------------------------------------------

    def lose_connection(self) -> None:
        """The server ends this store's session: its slice locks are gone at once, its next call fails like a broken
        connection, and the call after reconnects and takes its claims again (or raises :class:`LockLostError`)."""
        with self.database.mutex:
            for claim in self._claims:
                self.database.locks.pop(claim, None)
            self._connected, self._broken = False, True

    def _connect(self) -> None:
        if self._broken:
            self._broken = False
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        if self._connected:
            return
        self._connected = True
        lost = [claim for claim in self._claims if not self._lock(claim)]
        if lost:
            self._claims.difference_update(lost)
            raise LockLostError(f"another runner took slice {lost[0][1]} while this one reconnected")

    def _lock(self, claim: tuple[int, int]) -> bool:
        holder = self.database.locks.setdefault(claim, self)
        return holder is self

    def cancel(self) -> None:
        return None

    def close(self) -> None:
        with self.database.mutex:
            for claim in self._claims:
                if self.database.locks.get(claim) is self:
                    del self.database.locks[claim]
            self._claims.clear()

    # --- control tables --------------------------------------------------------------------------------------

    def _record(self, backfill: _Backfill) -> BackfillRecord:
        pieces = backfill.slices.values()
        heartbeats = [p.heartbeat_at for p in pieces if p.heartbeat_at is not None]
        owners = sorted({p.owner for p in pieces if p.owner is not None})
        return BackfillRecord(
            id=backfill.id,
            name=backfill.spec.name,
            spec=backfill.spec,
            fingerprint=backfill.spec.fingerprint(),
            state=backfill.state,
            upper_bound=_key(backfill.upper),
            estimated_rows=backfill.estimated_rows,
            last_error=backfill.last_error,
            created_at=_EPOCH,
            started_at=backfill.started_at,
            updated_at=backfill.updated_at,
            finished_at=backfill.finished_at,
            rows_updated=sum(p.rows_updated for p in pieces),
            batches=sum(p.batches for p in pieces),
            heartbeat_at=max(heartbeats, default=None),
            owner=", ".join(owners) or None,
            overrides=dict(backfill.overrides),
        )

    def _named(self, name: str) -> _Backfill:
        found = self.database.backfills.get(name)
        if found is None:
            raise UnknownBackfillError(f"no backfill named {name!r}")
        return found

    def get(self, name: str) -> BackfillRecord:
        with self.database.mutex:
            self._connect()
            return self._record(self._named(name))

    def slices(self, backfill_id: int) -> list[SliceRecord]:
        with self.database.mutex:
            self._connect()
            pieces, locks = self.database.by_id(backfill_id).slices, self.database.locks
            holders = {
                number: locks[(backfill_id, number)].session for number in pieces if (backfill_id, number) in locks
            }
            return [pieces[number].record(number, holders.get(number)) for number in sorted(pieces)]

    def live_runners(self, backfill_id: int) -> int:
        """Stores holding a claim on an unfinished slice (as the PostgreSQL store counts live claim sessions)."""
        with self.database.mutex:
            self._connect()
            pieces = self.database.by_id(backfill_id).slices
            return len(
                {
                    holder
                    for (held_id, number), holder in self.database.locks.items()
                    if held_id == backfill_id and number in pieces and not pieces[number].done
                }
            )

    def overrides(self, backfill_id: int) -> dict[str, float]:
        with self.database.mutex:
            self._connect()
            return dict(self.database.by_id(backfill_id).overrides)

    def set_overrides(self, name: str, values: Mapping[str, float], *, reset: bool = False) -> BackfillRecord:
        """Extend (or, with ``reset``, replace) the live setting overrides, as ``PostgresStore.set_overrides``."""
        with self.database.mutex:
            self._connect()
            backfill = self._named(name)
            backfill.overrides = {**({} if reset else backfill.overrides), **values}
            return self._record(backfill)

    def add_counters(
        self, backfill_id: int, slice: int, waits: Mapping[str, float], retries: Mapping[str, int]
    ) -> None:
        with self.database.mutex:
            self._connect()
            self.database.by_id(backfill_id).slices[slice].add(waits, retries)

    def note_wait(self, backfill_id: int, slice: int, reason: str) -> None:
        with self.database.mutex:
            self._connect()
            self.database.by_id(backfill_id).slices[slice].waiting_for = reason

    def transition(self, name: str, action: OperatorAction) -> BackfillRecord:
        """Apply an operator action, as ``PostgresStore.transition`` does."""
        with self.database.mutex:
            self._connect()
            backfill = self._named(name)
            sources, target = TRANSITIONS[action]
            if backfill.state not in sources:
                raise StateTransitionError(f"cannot {action.value} backfill {name!r}: it is {backfill.state.value}")
            if action is OperatorAction.RESUME and backfill.started_at is None:
                target = RunState.PENDING
            error = backfill.last_error if action is OperatorAction.CANCEL else None
            self._set_state(backfill, target, error)
            return self._record(backfill)

    def _set_state(self, backfill: _Backfill, state: RunState, error: str | None) -> None:
        backfill.state, backfill.last_error, backfill.updated_at = state, error, self.database.now()
        backfill.finished_at = backfill.updated_at if state.terminal or state is RunState.FAILED else None

    # --- runner side -----------------------------------------------------------------------------------------

    def try_claim(self, backfill_id: int, slice: int, owner: str | None = None) -> bool:
        with self.database.mutex:
            self._connect()
            if not self._lock((backfill_id, slice)):
                return False
            self._claims.add((backfill_id, slice))
            if owner is not None:
                self.database.by_id(backfill_id).slices[slice].owner = owner
            return True

    def release(self, backfill_id: int, slice: int, owner: str | None = None) -> None:
        with self.database.mutex:
            if (backfill_id, slice) not in self._claims:
                return
            self._claims.discard((backfill_id, slice))
            if not self._connected:
                return
            piece = self.database.by_id(backfill_id).slices[slice]
            if owner is not None and piece.owner == owner:
                piece.owner = None
            del self.database.locks[(backfill_id, slice)]

    def start(self, record: BackfillRecord, plan: Plan | None) -> list[SliceRecord]:
        with self.database.mutex:
            self._connect()
            backfill = self.database.by_id(record.id)
            if backfill.state.runnable and backfill.slices and backfill.state is RunState.PENDING:
                self._mark_started(backfill)
            elif backfill.state.runnable and not backfill.slices:
                if not self.database.keys:
                    self._set_state(backfill, RunState.SUCCEEDED, None)
                    return []
                backfill.upper = self.database.keys[-1]
                backfill.estimated_rows = len(self.database.keys)
                self._mark_started(backfill)
                backfill.slices[0] = _Slice(None, backfill.upper)
            return self.slices(record.id)

    def _mark_started(self, backfill: _Backfill) -> None:
        backfill.state, backfill.updated_at = RunState.RUNNING, self.database.now()
        backfill.started_at = backfill.started_at or backfill.updated_at

    def _finish_if_done(self, backfill: _Backfill) -> bool:
        if backfill.state is not RunState.RUNNING or not all(p.done for p in backfill.slices.values()):
            return False
        self._set_state(backfill, RunState.SUCCEEDED, None)
        return True

    def finish_if_done(self, backfill_id: int) -> bool:
        with self.database.mutex:
            self._connect()
            return self._finish_if_done(self.database.by_id(backfill_id))

    def split(self, plan: Plan | None, backfill_id: int, parts: int) -> int:
        """Split unclaimed unfinished slices into pieces of equal row counts, as :meth:`PostgresStore.split`."""
        return protocol.split_free_slices(
            self, backfill_id, parts, lambda number, cut: self._split_one(backfill_id, number, cut)
        )

    def _split_one(self, backfill_id: int, number: int, parts: int) -> None:
        with self.database.mutex:
            self._connect()
            backfill = self.database.by_id(backfill_id)
            piece = backfill.slices[number]
            if piece.done:
                return
            start = piece.checkpoint if piece.checkpoint is not None else piece.lower
            rows = self._range(start, piece.upper)
            step = max(1, len(rows) // parts)
            points: list[int] = []
            for i in range(1, parts):
                if step * i > len(rows) or rows[step * i - 1] == piece.upper:
                    break
                points.append(rows[step * i - 1])
            if not points:
                return
            first = max(backfill.slices) + 1
            upper, piece.upper = piece.upper, points[0]
            for offset, (low, high) in enumerate(zip(points, [*points[1:], upper], strict=True)):
                backfill.slices[first + offset] = _Slice(low, high, checkpoint=low)

    def _range(self, lower: int | None, upper: int) -> list[int]:
        keys = self.database.keys
        start = 0 if lower is None else bisect.bisect_right(keys, lower)
        return keys[start : bisect.bisect_right(keys, upper)]

    def run_batch(self, plan: Plan | None, request: BatchRequest) -> BatchResult:
        if self.before_batch is not None:
            self.before_batch(request)
        if self.errors:
            raise self.errors.pop(0)
        with self.database.mutex:
            self._connect()
            backfill = self.database.by_id(request.backfill_id)
            piece = backfill.slices[request.slice]
            overrides = dict(backfill.overrides)
            if backfill.state is not RunState.RUNNING or piece.done:
                return BatchResult(state=backfill.state, applied=False, slice_done=piece.done, overrides=overrides)
            self.requests.append(request)
            rows = self._range(piece.checkpoint, piece.upper)
            # Like the PostgreSQL batch: the key batch_size rows ahead, or the slice's end when fewer rows are left.
            end = rows[request.batch_size - 1] if request.batch_size <= len(rows) else piece.upper
            chunk = rows[: bisect.bisect_right(rows, end)]
            for key in chunk:
                self.database.counts[key] = self.database.counts.get(key, 0) + 1
            piece.checkpoint, piece.done = end, end == piece.upper
            piece.rows_updated += len(chunk)
            piece.batches += 1
            piece.owner, piece.heartbeat_at = request.owner, self.database.now()
            piece.add(request.waits, request.retries)
            piece.waiting_for = None
            finished = piece.done and self._finish_if_done(backfill)
            return BatchResult(
                state=backfill.state,
                applied=True,
                rows=len(chunk),
                checkpoint=[str(end)],
                slice_done=piece.done,
                finished=finished,
                slice_rows=piece.rows_updated,
                overrides=overrides,
            )

    def fail(self, backfill_id: int, error: str) -> None:
        with self.database.mutex:
            try:
                self._connect()
            except psycopg.OperationalError:
                self._connect()  # the failing batch may have taken the connection with it: one more try
            self._set_state(self.database.by_id(backfill_id), RunState.FAILED, error[:4000])
