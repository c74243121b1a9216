"""One contract, two stores: every test here runs against the in-memory store (what the executor's unit tests use)
and against PostgreSQL, so the fake cannot drift from the real one.

Each test gets a ``bed``: a factory that makes a table of integer keys with one registered backfill over it, and
hands back the store of one runner, a way to make another runner's store, and the table's update counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
import pytest
from support import wait_for

from backfill import BackfillSpec, OperatorAction, RunState
from backfill.errors import StateTransitionError, UnknownBackfillError
from backfill.pg.catalog import resolve
from backfill.pg.connect import Database
from backfill.pg.store import PostgresStore
from backfill.plan import Plan
from backfill.store import BatchRequest, BatchResult, LockLostError, SliceRecord, Store
from backfill.testing import InMemoryStore


class ContractStore(Store, Protocol):
    """What both stores offer: the executor's protocol, the operator's transitions, and closing."""

    def transition(self, name: str, action: OperatorAction) -> Any: ...

    def close(self) -> None: ...


@dataclass
class Bed:
    store: ContractStore
    plan: Plan | None
    another: Callable[[], ContractStore]
    counts: Callable[[], dict[int, int]]
    insert: Callable[[Iterable[int]], None]
    lose_connection: Callable[[ContractStore], None]

    id: int = 0

    def __post_init__(self) -> None:
        self.id = int(self.store.get("test").id)

    def started(self) -> list[SliceRecord]:
        return self.store.start(self.store.get("test"), self.plan)

    def batch(self, size: int = 10, slice: int = 0, owner: str = "a", store: Store | None = None) -> BatchResult:
        request = BatchRequest(self.id, slice, size, owner, lock_timeout=5.0, statement_timeout=30.0)
        return (store or self.store).run_batch(self.plan, request)

    def work(self, slice: int, store: ContractStore | None = None, size: int = 10) -> BatchResult:
        """Batches on one slice until it is done; the last batch's result."""
        while not (result := self.batch(size, slice, store=store)).slice_done:
            assert result.applied
        return result


MakeBed = Callable[..., Bed]


@pytest.fixture
def memory_bed() -> MakeBed:
    def make(keys: Iterable[int] = range(1, 101)) -> Bed:
        store = InMemoryStore.for_keys(keys)
        return Bed(store, None, store.sharing, lambda: dict(store.counts), store.database.insert, _lose_in_memory)

    return make


def _lose_in_memory(store: ContractStore) -> None:
    assert isinstance(store, InMemoryStore)
    store.lose_connection()


@pytest.fixture
def postgres_bed(conn: psycopg.Connection[Any], db_url: str) -> Iterator[MakeBed]:
    stores: list[PostgresStore] = []

    def another() -> PostgresStore:
        stores.append(PostgresStore(Database.from_bind(db_url)))
        return stores[-1]

    def counts() -> dict[int, int]:
        return dict(conn.execute("SELECT id, n FROM items WHERE n > 0").fetchall())  # type: ignore[arg-type]

    def insert(keys: Iterable[int]) -> None:
        conn.execute("INSERT INTO items (id) SELECT unnest(%s::int[])", (list(keys),))

    def lose_connection(store: ContractStore) -> None:
        assert isinstance(store, PostgresStore)
        pid = store.conn.info.backend_pid
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # The claims are gone once the backend has exited.
        wait_for(
            lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() == (0,),
            "the runner's backend to exit",
        )

    def make(keys: Iterable[int] = range(1, 101)) -> Bed:
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
        insert(keys)
        conn.execute("ANALYZE items")
        store = another()
        plan = resolve(store.conn, BackfillSpec("test", "items", {"n": "n + 1"}, batch_size=10))
        store.init()
        store.register(plan)
        return Bed(store, plan, another, counts, insert, lose_connection)

    try:
        yield make
    finally:
        for store in stores:
            store.close()


@pytest.fixture(params=["memory", "postgres"])
def bed(request: pytest.FixtureRequest) -> MakeBed:
    make: MakeBed = request.getfixturevalue(f"{request.param}_bed")
    return make


def exactly_once(bed: Bed, keys: Iterable[int] = range(1, 101)) -> bool:
    return bed.counts() == dict.fromkeys(keys, 1)


def _contiguous(pieces: list[SliceRecord], upper: str) -> bool:
    lowers = [piece.lower_bound for piece in pieces]
    uppers = [piece.upper_bound for piece in pieces]
    return lowers == [None, *uppers[:-1]] and uppers[-1] == [upper]


# --- records and the first start ------------------------------------------------------------------------------------


def test_a_registered_backfill_is_pending_without_progress_and_an_unknown_name_is_an_error(bed: MakeBed) -> None:
    b = bed()
    record = b.store.get("test")

    assert (record.state, record.rows_updated, record.batches, record.started_at) == (RunState.PENDING, 0, 0, None)
    assert [] == b.store.slices(record.id)
    with pytest.raises(UnknownBackfillError, match="no backfill named 'nope'"):
        b.store.get("nope")


def test_the_first_start_fixes_one_slice_up_to_the_largest_key_and_later_starts_keep_it(bed: MakeBed) -> None:
    b = bed()

    first = b.started()
    b.insert(range(101, 111))  # rows inserted after the start are not the backfill's job
    again = b.started()

    assert [SliceRecord(0, None, ["100"], None, False, 0, 0, None, None)] == first == again
    record = b.store.get("test")
    assert (record.state, record.upper_bound) == (RunState.RUNNING, ["100"])
    assert record.started_at is not None


def test_starting_on_an_empty_table_succeeds_at_once(bed: MakeBed) -> None:
    b = bed(keys=[])

    assert [] == b.started()
    record = b.store.get("test")
    assert record.state is RunState.SUCCEEDED
    assert record.finished_at is not None


# --- claims ----------------------------------------------------------------------------------------------------------


def test_a_claimed_slice_is_out_of_reach_of_other_runners_until_released(bed: MakeBed) -> None:
    b = bed()
    b.started()
    other = b.another()

    assert b.store.try_claim(b.id, 0)
    assert not other.try_claim(b.id, 0)
    held = other.slices(b.id)[0].holder  # who holds it is named, for an operator who finds it busy
    b.store.release(b.id, 0)
    assert other.slices(b.id)[0].holder is None
    assert other.try_claim(b.id, 0)
    assert not b.store.try_claim(b.id, 0)
    assert held is not None and held != b.store.slices(b.id)[0].holder


def test_release_clears_the_slice_owner_only_for_the_runner_named(bed: MakeBed) -> None:
    b = bed()
    b.started()
    assert b.store.try_claim(b.id, 0)
    b.batch(owner="a")

    b.store.release(b.id, 0, "someone else")
    assert "a" == b.store.slices(b.id)[0].owner
    assert b.store.try_claim(b.id, 0)
    b.store.release(b.id, 0, "a")
    assert b.store.slices(b.id)[0].owner is None


# --- batches ---------------------------------------------------------------------------------------------------------


def test_a_batch_moves_the_rows_and_the_checkpoint_together(bed: MakeBed) -> None:
    b = bed()
    b.started()

    result = b.batch(10, owner="a")

    assert BatchResult(RunState.RUNNING, True, 10, ["10"], False, False, slice_rows=10) == result
    assert dict.fromkeys(range(1, 11), 1) == b.counts()
    piece = b.store.slices(b.id)[0]
    assert (piece.checkpoint, piece.rows_updated, piece.batches, piece.owner) == (["10"], 10, 1, "a")
    assert piece.heartbeat_at is not None
    record = b.store.get("test")
    assert (record.rows_updated, record.batches, record.owner) == (10, 1, "a")
    assert 0 == b.store.live_runners(b.id)  # liveness is a claim, not a recent batch
    assert b.store.try_claim(b.id, 0)
    assert 1 == b.store.live_runners(b.id)


def test_the_last_batch_finishes_the_slice_and_the_backfill_and_later_batches_change_nothing(bed: MakeBed) -> None:
    b = bed()
    b.started()

    results = [b.batch(40) for _ in range(3)]
    after = b.batch(40)

    assert [(40, False), (40, False), (20, True)] == [(r.rows, r.finished) for r in results]
    assert (results[-1].state, results[-1].slice_done) == (RunState.SUCCEEDED, True)
    assert BatchResult(RunState.SUCCEEDED, False, slice_done=True) == after
    assert exactly_once(b)
    record = b.store.get("test")
    assert (record.state, record.rows_updated, record.batches) == (RunState.SUCCEEDED, 100, 3)
    assert record.finished_at is not None
    assert 0 == b.store.live_runners(b.id)  # a runner of a finished slice no longer shares the rate cap
    assert not b.store.finish_if_done(b.id)  # already done


def test_the_batch_after_deleted_last_keys_ends_at_the_fixed_upper_bound(bed: MakeBed) -> None:
    b = bed(keys=[*range(1, 16), 100])
    b.started()

    first = b.batch(10)
    second = b.batch(10)  # five rows and the fixed bound 100 left: fewer than the batch size, so the slice ends

    assert (first.checkpoint, second.checkpoint, second.rows, second.finished) == (["10"], ["100"], 6, True)


def test_finish_if_done_leaves_a_backfill_with_work_left_running(bed: MakeBed) -> None:
    b = bed()
    b.started()
    b.batch(10)

    assert not b.store.finish_if_done(b.id)
    assert RunState.RUNNING is b.store.get("test").state


# --- operator actions and failures -----------------------------------------------------------------------------------


def test_a_batch_changes_nothing_while_the_backfill_is_paused(bed: MakeBed) -> None:
    b = bed()
    b.started()

    b.store.transition("test", OperatorAction.PAUSE)
    paused = b.batch(10)
    b.store.transition("test", OperatorAction.RESUME)
    resumed = b.batch(10)

    assert BatchResult(RunState.PAUSED, False) == paused
    assert (resumed.applied, resumed.rows) == (True, 10)
    assert dict.fromkeys(range(1, 11), 1) == b.counts()


def test_operator_actions_follow_the_state_machine(bed: MakeBed) -> None:
    b = bed()

    with pytest.raises(StateTransitionError, match="cannot retry backfill 'test': it is pending"):
        b.store.transition("test", OperatorAction.RETRY)
    b.store.transition("test", OperatorAction.PAUSE)
    # Resuming a backfill that never started puts it back to pending: no key range is fixed yet.
    assert RunState.PENDING is b.store.transition("test", OperatorAction.RESUME).state
    b.started()
    b.store.fail(b.id, "boom " * 1_000)
    failed = b.store.get("test")
    assert (failed.state, failed.last_error) == (RunState.FAILED, ("boom " * 1_000)[:4000])
    assert failed.finished_at is not None
    retried = b.store.transition("test", OperatorAction.RETRY)
    assert (retried.state, retried.last_error, retried.finished_at) == (RunState.PENDING, None, None)
    cancelled = b.store.transition("test", OperatorAction.CANCEL)
    assert cancelled.state is RunState.CANCELLED and cancelled.finished_at is not None
    with pytest.raises(StateTransitionError, match="cannot pause backfill 'test': it is cancelled"):
        b.store.transition("test", OperatorAction.PAUSE)
    with pytest.raises(UnknownBackfillError):
        b.store.transition("nope", OperatorAction.PAUSE)


# --- splitting -------------------------------------------------------------------------------------------------------


def test_split_cuts_the_range_into_contiguous_slices_of_about_equal_rows(bed: MakeBed) -> None:
    b = bed()
    b.started()

    assert 4 == b.store.split(b.plan, b.id, 4)

    pieces = b.store.slices(b.id)
    assert [0, 1, 2, 3] == [piece.slice for piece in pieces]
    assert _contiguous(pieces, "100")
    assert all(piece.checkpoint == piece.lower_bound for piece in pieces[1:])
    sizes = [int(p.upper_bound[0]) - int((p.lower_bound or ["0"])[0]) for p in pieces]
    assert all(20 <= size <= 30 for size in sizes), sizes
    other = b.another()
    results = [b.work(0), b.work(1, store=other), b.work(2), b.work(3, store=other)]
    assert [False, False, False, True] == [r.finished for r in results]
    assert exactly_once(b)
    assert RunState.SUCCEEDED is b.store.get("test").state


def test_split_of_a_started_slice_cuts_what_is_left_after_its_checkpoint(bed: MakeBed) -> None:
    b = bed()
    b.started()
    b.batch(10)
    b.batch(10)

    assert 2 == b.store.split(b.plan, b.id, 2)

    first, second = b.store.slices(b.id)
    cut = int(first.upper_bound[0])
    assert 50 <= cut <= 70  # about half of the 80 rows after key 20
    assert (first.checkpoint, second.lower_bound, second.checkpoint) == (["20"], [str(cut)], [str(cut)])
    b.work(0)
    b.work(1)
    assert exactly_once(b)


def test_split_leaves_a_slice_another_runner_holds_alone(bed: MakeBed) -> None:
    b = bed()
    b.started()
    other = b.another()
    assert other.try_claim(b.id, 0)

    assert 1 == b.store.split(b.plan, b.id, 4)

    assert 1 == len(b.store.slices(b.id))
    assert not b.store.try_claim(b.id, 0)  # the split did not take the holder's claim away


def test_split_does_nothing_when_there_are_enough_unfinished_slices(bed: MakeBed) -> None:
    b = bed()
    b.started()
    b.store.split(b.plan, b.id, 3)
    b.work(0)

    assert 2 == b.store.split(b.plan, b.id, 2)
    assert 3 == len(b.store.slices(b.id))


def test_live_runners_counts_distinct_sessions_claiming_unfinished_slices(bed: MakeBed) -> None:
    b = bed()
    b.started()
    b.store.split(b.plan, b.id, 3)
    other = b.another()

    assert b.store.try_claim(b.id, 0) and b.store.try_claim(b.id, 1)
    assert 1 == b.store.live_runners(b.id)
    assert other.try_claim(b.id, 2)
    assert 2 == b.store.live_runners(b.id)
    b.lose_connection(other)  # a runner killed: its claim dies with its session, whatever its last batch
    assert 1 == b.store.live_runners(b.id)


# --- lost connections ------------------------------------------------------------------------------------------------


def claim_work_and_lose_the_connection(b: Bed) -> None:
    b.started()
    assert b.store.try_claim(b.id, 0)
    b.batch(10)
    b.lose_connection(b.store)


def test_a_runner_whose_slice_was_taken_while_its_connection_was_lost_gets_lock_lost(bed: MakeBed) -> None:
    b = bed()
    claim_work_and_lose_the_connection(b)

    other = b.another()
    assert other.try_claim(b.id, 0)  # the lost session's lock died with it
    with pytest.raises(psycopg.OperationalError):
        b.batch(10)  # the broken connection itself
    with pytest.raises(LockLostError, match="another runner took slice 0"):
        b.batch(10)  # reconnected, and found the slice taken
    taken_over = b.batch(10, store=other, owner="b")

    assert (taken_over.rows, taken_over.checkpoint) == (10, ["20"])  # from the lost runner's checkpoint
    assert dict.fromkeys(range(1, 21), 1) == b.counts()


def test_a_runner_that_reconnects_before_anyone_took_its_slice_keeps_it(bed: MakeBed) -> None:
    b = bed()
    claim_work_and_lose_the_connection(b)

    with pytest.raises(psycopg.OperationalError):
        b.batch(10)
    again = b.batch(10)

    assert (again.applied, again.checkpoint) == (True, ["20"])
    assert not b.another().try_claim(b.id, 0)
