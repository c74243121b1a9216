"""The PostgreSQL store: the only code that reads or writes the control tables, and the one that runs a batch's
transaction.

A batch is one short transaction on the runner's own connection: lock the slice's control row and read its
checkpoint, find the key ``batch_size`` rows ahead, update that closed key range, write the new checkpoint. Because
the checkpoint is read and written inside the same transaction as the update, a crash at any instant neither repeats
a committed batch nor skips one, and two runners that somehow reach the same slice simply take turns.

The batch is one round trip however far the database is: its statements go out together in psycopg's pipeline
mode and run as one implicit transaction that the server commits at the pipeline's sync. The runner cannot read the
checkpoint before it writes the next one, so it sends the checkpoint it expects and the batch statement checks it
under the slice's lock (see ``TargetSQL.batch``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import sql as pgsql
from psycopg.rows import RowFactory, class_row, dict_row, kwargs_row
from psycopg.types.json import Jsonb

from backfill.errors import (
    ControlTablesMissingError,
    ControlTablesOutdatedError,
    KeyChangedError,
    KeyRoundTripError,
    PoolerError,
    SpecMismatchError,
    StateTransitionError,
    UnknownBackfillError,
    UnknownRoleError,
    UntrustedControlTablesError,
)
from backfill.pg import statements as sql
from backfill.pg.catalog import checked_key, key_changed_error
from backfill.pg.connect import Database
from backfill.plan import Plan, Target
from backfill.spec import BackfillSpec
from backfill.state import TRANSITIONS, OperatorAction, RunState
from backfill.store import (
    BackfillRecord,
    BatchRecord,
    BatchRequest,
    BatchResult,
    Key,
    LockLostError,
    SliceRecord,
    split_free_slices,
)

__all__ = ["PostgresStore"]

#: The first server version whose RETURNING reads the values an UPDATE overwrote (``old.col``).
_RETURNING_OLD = 180000
#: Tries of a first-time ``init`` that lost a race on the catalog to another one.
_INIT_ATTEMPTS = 3
_POOLER = (
    "the claim on slice {slice} belongs to another server session than the one this connection now runs on: a "
    "connection pooler in transaction mode (e.g. PgBouncer pool_mode=transaction) sits between backfill and "
    "PostgreSQL; connect backfill directly or through a session-mode pool"
)
_TRUST_RULE = (
    "backfill only uses control tables owned by you, a superuser, or a member of the database owner or of your "
    "role, with no triggers, rules, row-level security or PUBLIC grants"
)


_Row = TypeVar("_Row")


def _fetch(
    conn: psycopg.Connection[Any],
    row: type[_Row] | RowFactory[_Row],
    statement: pgsql.Composed,
    params: Sequence[Any] = (),
) -> psycopg.Cursor[_Row]:
    """Execute ``statement`` with its rows read by column name: into ``row`` if it is a dataclass, else through the
    row factory ``row``."""
    factory = class_row(row) if isinstance(row, type) else row
    return conn.cursor(row_factory=factory).execute(statement, params)


def _backfill(*, spec: dict[str, Any], state: str, **columns: Any) -> BackfillRecord:
    """A row of the backfills table (``ControlTables.select``), its counters not yet summed. The stored spec
    carries the key's signature beside the spec's own fields (see ``_document``)."""
    signature = spec.get("key_signature")
    return BackfillRecord(
        spec=BackfillSpec.from_dict(spec),
        state=RunState(state),
        key_signature=tuple(signature) if signature is not None else None,
        **columns,
    )


@dataclass(frozen=True)
class _LockedSlice:
    """A slice as a batch (``lock_slice``, with its backfill's state) or a split (``lock_slice_for_split``) reads it."""

    checkpoint: Key | None
    upper_bound: Key
    done: bool
    state: str | None = None
    lower_bound: Key | None = None
    mine: bool = True  #: whether this session holds the slice's claim (``lock_slice``)
    overrides: dict[str, Any] | None = None  #: the backfill's live setting overrides (``lock_slice``)


@dataclass(frozen=True)
class _BatchDone:
    """What the one-statement batch returns (``TargetSQL.batch``)."""

    checkpoint: Key
    done: bool
    rows: int
    slice_rows: int
    seconds: float


def _ms(seconds: float) -> str:
    return f"{max(int(seconds * 1000), 1)}ms"


@functools.lru_cache(maxsize=64)
def _batch_statement(
    target: Target, tables: sql.ControlTables, has_lower: bool, undo: int | None, returning_old: bool, history: bool
) -> pgsql.Composed:
    # Composed once per target and range shape, not once per batch.
    log = tables.undo(undo) if undo is not None else None
    return sql.for_target(target).batch(tables, has_lower, log, returning_old, history=history)


class PostgresStore:
    """The control tables in one schema, reached through one connection of the runner's own.

    The connection is opened lazily, reopened after it breaks, and its session holds the claims of the slices this
    runner works (re-taken after a reconnect, or :class:`LockLostError`).
    """

    def __init__(self, database: Database, schema: str = "public", *, history: bool = True) -> None:
        self.database = database
        #: whether batches write their history row (False only to measure what it costs: benchmarks/)
        self.writes_history = history
        self.tables = sql.ControlTables(schema)
        self._conn: psycopg.Connection[Any] | None = None
        self._claims: set[tuple[int, int]] = set()
        self._verified: psycopg.Connection[Any] | None = None
        #: (backfill id, slice) -> (checkpoint, upper bound) as this runner last saw them
        self._positions: dict[tuple[int, int], tuple[Key | None, Key]] = {}

    # --- connection ------------------------------------------------------------------------------------------

    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is not None and self._conn.closed:
            self._conn = None
        if self._conn is None:
            self._conn = self.database.connect()
            lost = [claim for claim in self._claims if not self._lock(*claim)]
            if lost:
                self._claims.difference_update(lost)
                raise LockLostError(f"another runner took slice {lost[0][1]} while this one reconnected")
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def close(self) -> None:
        self._drop()
        self._claims.clear()

    def cancel(self) -> None:
        """Cancel the statement running on this store's connection, from any thread (its batch rolls back)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.cancel_safe()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- control tables --------------------------------------------------------------------------------------

    def init(self, grant: Sequence[str] = ()) -> None:
        """Create the control tables if they do not exist (idempotent, safe to race), refuse tables it did not
        create, and grant each role in ``grant`` what a runner needs on them.

        Raises:
            UntrustedControlTablesError: the tables exist with an owner, trigger, rule, policy or grant backfill
                did not make (nothing is created or changed).
            UnknownRoleError: a role in ``grant`` does not exist (nothing is granted).
        """
        conn = self.conn
        complete = conn.execute(self.tables.complete(), (self.tables.schema,)).fetchone()
        if complete and complete[0] and not grant and self._version() == sql.CONTROL_VERSION:
            # Nothing to create: no DDL, no lock, so a runner role without DDL rights can call it (registering).
            self._check_version()
            return
        for attempt in range(_INIT_ATTEMPTS):
            try:
                with conn.transaction():
                    # Checked first so that nothing of ours (the meta row's INSERT) runs on an adopted table.
                    self._refuse_untrusted()
                    for statement in self.tables.create():
                        conn.execute(statement, ())
                    # Read under the meta table's lock (create() takes it): one init upgrades, the others wait.
                    if (self._version() or sql.CONTROL_VERSION) < sql.CONTROL_VERSION:
                        for statement in self.tables.upgrade():
                            conn.execute(statement, ())
                    self._refuse_untrusted()
                    self._grant(grant)
                break
            except psycopg.errors.InsufficientPrivilege as exc:
                version = self._version()
                if version is None or version >= sql.CONTROL_VERSION:
                    raise
                raise ControlTablesOutdatedError(
                    f"the control tables in schema {self.tables.schema!r} are version {version} and upgrading them "
                    f"to version {sql.CONTROL_VERSION} was refused ({exc.diag.message_primary}): run `backfill init` "
                    "as their owner"
                ) from None
            except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable, psycopg.errors.DuplicateObject):
                # Two first-time inits raced on the catalog; the loser's next attempt finds the tables. (No lock
                # serialises them: any role that can connect could hold an advisory lock forever.)
                if attempt == _INIT_ATTEMPTS - 1:
                    raise
        self._check_version()

    def _grant(self, roles: Sequence[str]) -> None:
        for role in roles:
            found = self.conn.execute(self.tables.role_exists(), (role,)).fetchone()
            if not found or not found[0]:
                raise UnknownRoleError(f"cannot grant the control tables to {role!r}: no such role")
            problems = self._problems(role)
            if problems:
                raise UntrustedControlTablesError(
                    f"role {role!r} would refuse the control tables in schema {self.tables.schema!r}: "
                    f"{'; '.join(problems)} ({_TRUST_RULE})"
                )
            for statement in self.tables.grant(role):
                self.conn.execute(statement, ())
            for table, _ in self.conn.execute(self.tables.undo_tables(), (self.tables.schema,)).fetchall():
                self.conn.execute(self.tables.grant_undo(table, role), ())

    def _problems(self, role: str | None = None) -> list[str]:
        params = {"schema": self.tables.schema, "role": role}
        return [row[0] for row in self.conn.execute(self.tables.distrust(), params)]

    def _refuse_untrusted(self) -> None:
        problems = self._problems()
        if problems:
            raise UntrustedControlTablesError(
                f"refusing the control tables in schema {self.tables.schema!r}: {'; '.join(problems)} "
                f"({_TRUST_RULE}: drop them, or choose another control schema)"
            )

    def _check_version(self) -> None:
        exists = self.conn.execute(self.tables.exists(), (self.tables.schema,)).fetchone()
        if not exists or not exists[0]:
            raise ControlTablesMissingError(
                f"no backfill control tables in schema {self.tables.schema!r}: run `backfill init` first"
            )
        if self._verified is not self._conn:
            # Once per connection: only a trusted owner could change the tables after this.
            self._refuse_untrusted()
            self._verified = self._conn
        version = self._version()
        if version is None or version > sql.CONTROL_VERSION:
            raise ControlTablesMissingError(
                f"the control tables in schema {self.tables.schema!r} are version {version or '?'}, "
                f"newer than this release of backfill understands ({sql.CONTROL_VERSION}): upgrade backfill"
            )
        if version < sql.CONTROL_VERSION:
            raise ControlTablesOutdatedError(
                f"the control tables in schema {self.tables.schema!r} are version {version}, older than this release "
                f"of backfill uses ({sql.CONTROL_VERSION}): run `backfill init` to upgrade them in place"
            )

    def _version(self) -> int | None:
        """The control tables' layout version (None: no meta row, or no meta table yet)."""
        exists = self.conn.execute(self.tables.exists(), (self.tables.schema,)).fetchone()
        if not exists or not exists[0]:
            return None
        row = self.conn.execute(self.tables.version(), ()).fetchone()
        return int(row[0]) if row is not None else None

    def _with_totals(self, record: BackfillRecord, totals: dict[int, dict[str, Any]]) -> BackfillRecord:
        summed = totals.get(record.id)
        return dataclasses.replace(record, **summed) if summed else record

    def _totals(self) -> dict[int, dict[str, Any]]:
        """Per backfill id, its slices' counters summed, by the names of :class:`BackfillRecord`'s fields."""
        return {row.pop("backfill_id"): row for row in _fetch(self.conn, dict_row, self.tables.slice_totals())}

    def _select(self, name: str, *, lock: bool = False) -> BackfillRecord | None:
        """The backfill's row (its counters not summed), optionally locked until the transaction ends."""
        return _fetch(self.conn, kwargs_row(_backfill), self.tables.select(one=True, lock=lock), (name,)).fetchone()

    def get(self, name: str) -> BackfillRecord:
        """The backfill called ``name``.

        Raises:
            UnknownBackfillError: there is none.
        """
        self._check_version()
        row = self._select(name)
        if row is None:
            raise UnknownBackfillError(f"no backfill named {name!r}")
        return self._with_totals(row, self._totals())

    def list_all(self) -> list[BackfillRecord]:
        self._check_version()
        totals = self._totals()
        rows = _fetch(self.conn, kwargs_row(_backfill), self.tables.select(one=False))
        return [self._with_totals(row, totals) for row in rows]

    def slices(self, backfill_id: int) -> list[SliceRecord]:
        return _fetch(self.conn, SliceRecord, self.tables.select_slices(), (backfill_id,)).fetchall()

    def live_runners(self, backfill_id: int) -> int:
        """Runners whose session holds a claim on an unfinished slice of this backfill right now."""
        row = self.conn.execute(self.tables.live_runners(), (backfill_id,)).fetchone()
        return int(row[0]) if row else 0

    def history(self, backfill_id: int, limit: int) -> list[BatchRecord]:
        """The backfill's latest ``limit`` batches over all its slices, oldest first."""
        return _fetch(self.conn, BatchRecord, self.tables.select_history(), (backfill_id, limit)).fetchall()

    def now(self) -> dt.datetime:
        """The database's time (the history's timestamps are in it, whatever the local clock says)."""
        row = self.conn.execute(self.tables.clock(), ()).fetchone()
        assert row is not None
        value: dt.datetime = row[0]
        return value

    def overrides(self, backfill_id: int) -> dict[str, Any]:
        """The backfill's live setting overrides (a runner reads them during long waits)."""
        row = self.conn.execute(self.tables.overrides(), (backfill_id,)).fetchone()
        return dict(row[0]) if row is not None else {}

    def set_overrides(self, name: str, values: Mapping[str, float], *, reset: bool = False) -> BackfillRecord:
        """Extend (or, with ``reset``, replace) the live setting overrides of backfill ``name``.

        Raises:
            UnknownBackfillError: there is no such backfill.
        """
        self._check_version()
        with self.conn.transaction():
            found = self.conn.execute(self.tables.set_overrides(), (reset, Jsonb(dict(values)), name)).fetchone()
            if found is None:
                raise UnknownBackfillError(f"no backfill named {name!r}")
        return self.get(name)

    def add_counters(
        self, backfill_id: int, slice: int, waits: Mapping[str, float], retries: Mapping[str, int]
    ) -> None:
        """Add throttle waits and retries that no batch carried to the slice's counters."""
        self.conn.execute(self.tables.add_counters(), (Jsonb(dict(waits)), Jsonb(dict(retries)), backfill_id, slice))

    def note_wait(self, backfill_id: int, slice: int, reason: str) -> None:
        """Say on the slice that its runner waits on ``reason`` from now (its next batch clears it)."""
        self.conn.execute(self.tables.note_wait(), (reason, backfill_id, slice))

    def register(self, plan: Plan, *, force: bool = False) -> BackfillRecord:
        """Store a resolved spec under its name, or check it against the one already stored.

        Raises:
            SpecMismatchError: the name holds a different spec (and ``force`` is false, or the table or key
                changed after the backfill started, so its checkpoint cannot carry over).
        """
        spec, fingerprint = plan.spec, plan.spec.fingerprint()
        conn = self.conn
        with conn.transaction():
            inserted = conn.execute(self.tables.insert(), (spec.name, _document(plan), fingerprint)).fetchone()
            if inserted is not None and spec.reversible:
                self._create_undo(inserted[0], plan)
            if inserted is None:
                row = self._select(spec.name, lock=True)
                assert row is not None
                old = row
                if old.fingerprint != fingerprint:
                    if not force:
                        raise SpecMismatchError(_mismatch(old.spec, spec))
                    same_walk = (old.spec.schema, old.spec.table, old.spec.key) == (spec.schema, spec.table, spec.key)
                    if old.spec.reversible != spec.reversible:
                        raise SpecMismatchError(
                            f"backfill {spec.name!r} is {'' if old.spec.reversible else 'not '}reversible; a "
                            "stored backfill cannot become so or stop being so: register it under a new name"
                        )
                    if old.started_at is not None and not same_walk:
                        raise SpecMismatchError(
                            f"backfill {spec.name!r} has started on {old.spec.qualified_table} by key "
                            f"({', '.join(old.spec.key or ())}); its checkpoint cannot carry over to a different "
                            "table or key: register the new spec under a new name"
                        )
                _check_key_signature(old, plan)
                if spec.reversible and old.fingerprint != fingerprint:
                    self._replace_undo(old, plan)
                if (
                    old.fingerprint != fingerprint
                    or old.spec.batch_size != spec.batch_size
                    or old.key_signature != plan.key_signature
                ):
                    conn.execute(self.tables.replace_spec(), (_document(plan), fingerprint, old.id))
        return self.get(spec.name)

    def check_key(self, record: BackfillRecord, plan: Plan) -> BackfillRecord:
        """Check that the key still means what the stored checkpoints were written in (see
        :attr:`Plan.key_signature`); a backfill that never started takes the key as it is now.

        Raises:
            KeyChangedError: the backfill has started and a key column's type, modifier or collation changed.
        """
        if record.key_signature == plan.key_signature:
            return record
        _check_key_signature(record, plan)
        conn = self.conn
        with conn.transaction():
            current = self._select(record.name, lock=True)
            if current is None:
                raise UnknownBackfillError(f"no backfill named {record.name!r}")
            _check_key_signature(current, plan)
            conn.execute(self.tables.replace_spec(), (_document(plan, current.spec), current.fingerprint, current.id))
        return self.get(record.name)

    def transition(self, name: str, action: OperatorAction) -> BackfillRecord:
        """Apply an operator action (pause, resume, cancel, retry) to the backfill ``name``.

        Raises:
            UnknownBackfillError: there is no such backfill.
            StateTransitionError: the action makes no sense in the backfill's current state.
        """
        self._check_version()
        sources, target = TRANSITIONS[action]
        conn = self.conn
        with conn.transaction():
            row = self._select(name, lock=True)
            if row is None:
                raise UnknownBackfillError(f"no backfill named {name!r}")
            current = row.state
            if current not in sources:
                raise StateTransitionError(f"cannot {action.value} backfill {name!r}: it is {current.value}")
            if action is OperatorAction.RESUME and row.started_at is None:
                target = RunState.PENDING  # never started: no key range fixed yet
            error = row.last_error if action is OperatorAction.CANCEL else None
            conn.execute(self.tables.set_state(), (target.value, error, target.terminal, row.id))
        return self.get(name)

    def held_slices(self, backfill_id: int) -> list[int]:
        """Unfinished slices another live runner holds. Each free one is claimed for an instant to find out, then
        released."""
        held = []
        for piece in self.slices(backfill_id):
            if piece.done or (backfill_id, piece.slice) in self._claims:
                continue
            if self.try_claim(backfill_id, piece.slice):
                self.release(backfill_id, piece.slice)
            else:
                held.append(piece.slice)
        return held

    def delete(self, backfill_id: int) -> None:
        """Delete a backfill's control row and its slices, and its undo log if it has one (the data it changed
        stays)."""
        with self.conn.transaction():
            self.conn.execute(self.tables.delete(), (backfill_id,))
            self.conn.execute(self.tables.drop_undo(backfill_id), ())

    # --- undo logs -------------------------------------------------------------------------------------------

    def _create_undo(self, backfill_id: int, plan: Plan) -> None:
        # In the registering transaction: a reversible backfill never exists without its undo log.
        target = plan.target
        for statement in self.tables.create_undo(backfill_id, target.key_signature, target.value_types):
            self.conn.execute(statement, ())
        for (role,) in self.conn.execute(self.tables.runner_roles(), ()).fetchall():
            self.conn.execute(self.tables.grant_undo(sql.undo_table(backfill_id), role), ())

    def _replace_undo(self, old: BackfillRecord, plan: Plan) -> None:
        # A forced new spec that sets other columns, or walks another key, needs an undo log of another shape:
        # made afresh before the first batch; after it, the rows logged so far could no longer be put back.
        spec = plan.spec
        if (sorted(old.spec.values), old.spec.key) == (sorted(spec.values), spec.key):
            return
        if old.started_at is not None:
            raise SpecMismatchError(
                f"reversible backfill {spec.name!r} has started: its undo log holds the columns "
                f"{', '.join(sorted(old.spec.values))} by key ({', '.join(old.spec.key or ())}); a spec setting "
                "other columns or walking another key cannot carry over: register it under a new name"
            )
        self.conn.execute(self.tables.drop_undo(old.id), ())
        self._create_undo(old.id, plan)

    def undo_sizes(self) -> dict[int, int]:
        """Bytes of each undo log in the control schema, by backfill id."""
        rows = self.conn.execute(self.tables.undo_tables(), (self.tables.schema,)).fetchall()
        prefix = sql.undo_table(0).removesuffix("0")
        return {int(name.removeprefix(prefix)): size for name, size in rows if name.removeprefix(prefix).isdigit()}

    def kept_rows(self, backfill_id: int) -> int:
        """Rows a revert of the backfill left as the application wrote them."""
        row = self.conn.execute(self.tables.count_kept(backfill_id), ()).fetchone()
        return int(row[0]) if row else 0

    def purge(self, record: BackfillRecord, revert_name: str) -> int:
        """Drop the undo log of ``record`` unless the backfill or its revert (``revert_name``) may still run;
        returns its size in bytes.

        Raises:
            StateTransitionError: the backfill or its revert is not succeeded or cancelled.
        """
        conn = self.conn
        with conn.transaction():
            # The backfill's row lock keeps a revert from starting meanwhile (begin_revert takes it first).
            for name in (record.name, revert_name):
                row = self._select(name, lock=True)
                if row is not None and not row.state.terminal:
                    raise StateTransitionError(
                        f"cannot purge the undo log of backfill {record.name!r}: {name!r} is {row.state.value} and "
                        "would still use it (let it finish, or cancel it first)"
                    )
            size = self.undo_sizes().get(record.id, 0)
            conn.execute(self.tables.drop_undo(record.id), ())
        return size

    def begin_revert(self, record: BackfillRecord, revert: BackfillSpec) -> BackfillRecord:
        """Stop the backfill for good and register its revert (or find the one registered before).

        The backfill is cancelled under its row's lock unless it has succeeded, and then each of its slices is
        locked once: a batch that started before the cancel holds its slice's row until it commits, so once this
        returns, every undo row the backfill will ever write is committed, and the revert's walk, fixed later,
        covers them all.
        """
        conn = self.conn
        with conn.transaction():
            row = self._select(record.name, lock=True)
            if row is None:
                raise UnknownBackfillError(f"no backfill named {record.name!r}")
            if row.state is not RunState.SUCCEEDED and row.state is not RunState.CANCELLED:
                error = f"reverted (by {revert.name!r})"
                conn.execute(self.tables.set_state(), (RunState.CANCELLED.value, error, True, row.id))
            document = Jsonb({**revert.to_dict(), "key_signature": None})
            conn.execute(self.tables.insert(), (revert.name, document, revert.fingerprint()))
        with conn.transaction():
            conn.execute(self.tables.lock_slices(), (record.id,))
        started = self._select(revert.name)
        if started is not None and not self.slices(started.id):
            # Before the revert's first batch: its look-ahead reads only the undo log's index once the log's pages
            # are marked all-visible, and the planner learns the log's size. (Autocommit: VACUUM runs outside any
            # transaction.)
            conn.execute(self.tables.vacuum_undo(record.id), ())
        return self.get(revert.name)

    # --- runner side -----------------------------------------------------------------------------------------

    def _lock(self, backfill_id: int, slice: int, owner: str | None = None) -> bool:
        assert self._conn is not None
        if self._conn.execute(self.tables.claim(), (backfill_id, slice, owner)).fetchone() is None:
            return False
        # A claim is only as good as the session it names. Behind a pooler in transaction mode the next
        # statement may run on another server session: the claim would then guard nothing.
        mine = self._conn.execute(self.tables.claim_is_mine(), (backfill_id, slice)).fetchone()
        if not mine or not mine[0]:
            raise PoolerError(_POOLER.format(slice=slice))
        return True

    def try_claim(self, backfill_id: int, slice: int, owner: str | None = None) -> bool:
        """Claim the slice for this store's session (naming ``owner`` on it, if given); False if another live
        runner's session holds it.

        Raises:
            PoolerError: the claim is not visible as this session's own right after it was made.
        """
        self.conn  # noqa: B018 -- connects (and re-takes existing claims) first
        if not self._lock(backfill_id, slice, owner):
            return False
        self._claims.add((backfill_id, slice))
        return True

    def release(self, backfill_id: int, slice: int, owner: str | None = None) -> None:
        if (backfill_id, slice) not in self._claims:
            return
        self._claims.discard((backfill_id, slice))
        if self._conn is None or self._conn.closed or self._conn.broken:
            return
        self._conn.execute(self.tables.release_slice(), (owner, backfill_id, slice))

    def start(self, record: BackfillRecord, plan: Plan | None) -> list[SliceRecord]:
        """Fix the key range on the first start (one slice up to the current largest key) and mark the backfill
        running; later starts return the slices as they are. An empty table succeeds at once."""
        assert plan is not None
        conn = self.conn
        with conn.transaction():
            # The row lock makes two runners starting at once agree on one set of slices.
            row = self._select(record.name, lock=True)
            assert row is not None
            state = row.state
            if not state.runnable:
                return self.slices(record.id)
            existing = self.slices(record.id)
            if existing:
                if state is RunState.PENDING:
                    conn.execute(self.tables.start(), (None, None, record.id))
                return existing
            conn.execute(sql.SET_TIMEOUTS, ("5s", "60s"))
            top = conn.execute(sql.for_target(plan.target).max_key(verified=True), ()).fetchone()
            if top is None:
                conn.execute(self.tables.set_state(), (RunState.SUCCEEDED.value, None, True, record.id))
                return []
            upper = Jsonb(checked_key(plan.target, top))
            conn.execute(self.tables.start(), (upper, plan.estimated_rows, record.id))
            conn.execute(self.tables.insert_slice(), (record.id, 0, None, upper, None))
        return self.slices(record.id)

    def _finish_if_done(self, backfill_id: int) -> bool:
        # Two runners finishing the last two slices at once would each see the other's slice unfinished under
        # their own snapshot, and neither would mark the backfill done. Locking the backfill's row first makes the
        # second wait for the first to commit; its next statement then takes a fresh snapshot that sees it.
        self.conn.execute(self.tables.lock_backfill(), (backfill_id,))
        return self.conn.execute(self.tables.finish_if_done(), (backfill_id, backfill_id)).rowcount == 1

    def finish_if_done(self, backfill_id: int) -> bool:
        """Mark a running backfill succeeded if none of its slices is left (e.g. its last runner stopped between
        its last batch and marking it). True if this call marked it."""
        with self.conn.transaction():
            return self._finish_if_done(backfill_id)

    def split(self, plan: Plan | None, backfill_id: int, parts: int) -> int:
        """Split unfinished slices that no runner holds until there are ``parts`` unfinished slices (or no more
        split points), each cut at keys that give its pieces equal numbers of rows. Returns how many unfinished
        slices there are now. Slices held by live runners are left alone: only a slice's holder may change it."""
        assert plan is not None
        target = plan.target
        return split_free_slices(
            self, backfill_id, parts, lambda number, cut: self._split_one(target, backfill_id, number, cut)
        )

    def _split_one(self, target: Target, backfill_id: int, slice_no: int, parts: int) -> None:
        conn = self.conn
        with conn.transaction():
            conn.execute(sql.SET_TIMEOUTS, ("5s", "300s"))
            conn.execute(self.tables.lock_backfill(), (backfill_id,))
            found = _fetch(conn, _LockedSlice, self.tables.lock_slice_for_split(), (backfill_id, slice_no)).fetchone()
            if found is None or found.done:
                return
            upper = found.upper_bound
            start = found.checkpoint if found.checkpoint is not None else found.lower_bound
            points = _split_points(conn, target, start, upper, parts)
            if not points:
                return
            first = conn.execute(self.tables.next_slice(), (backfill_id,)).fetchone()
            assert first is not None
            conn.execute(self.tables.shrink_slice(), (Jsonb(points[0]), backfill_id, slice_no))
            for number, (low, high) in enumerate(zip(points, [*points[1:], upper], strict=True), start=first[0]):
                conn.execute(self.tables.insert_slice(), (backfill_id, number, Jsonb(low), Jsonb(high), Jsonb(low)))

    def run_batch(self, plan: Plan | None, request: BatchRequest) -> BatchResult:
        """Run one batch in one transaction and one round trip (see the module docstring). Database errors
        propagate after the transaction has rolled back; a broken connection is dropped so the next call
        reconnects."""
        assert plan is not None
        where = (request.backfill_id, request.slice)
        # The checkpoint this runner expects; the batch checks it under the slice's lock. Unknown at the first
        # batch of a claim, or wrong after another runner moved it: that batch then only reads the slice, and the
        # next one goes ahead from what it read.
        unexplained = 0
        for _ in range(3):
            expected = self._positions.get(where)
            found, done, finished = self._batch_round_trip(plan, request, expected)
            assert found.state is not None
            state = RunState(found.state)
            if not found.mine and where in self._claims:
                # This connection claimed the slice, yet the claim names another session: the server session
                # under the connection changed between two transactions. (The batch checked it, and did nothing.)
                raise PoolerError(_POOLER.format(slice=request.slice))
            if done is not None:
                self._positions[where] = (done.checkpoint, found.upper_bound)
                return BatchResult(
                    state=RunState.SUCCEEDED if finished else state,
                    applied=True,
                    rows=done.rows,
                    checkpoint=done.checkpoint,
                    slice_done=done.done,
                    finished=finished,
                    slice_rows=done.slice_rows,
                    database_seconds=done.seconds,
                    overrides=found.overrides,
                )
            self._positions[where] = (found.checkpoint, found.upper_bound)
            if state is not RunState.RUNNING or found.done:
                return BatchResult(state=state, applied=False, slice_done=found.done, overrides=found.overrides)
            if expected == (found.checkpoint, found.upper_bound):
                # Everything the batch checks under the lock matched, and still it did nothing: the end key's text
                # form does not read back as the same key (or, once, an operator's change came in between).
                unexplained += 1
                if unexplained == 2:
                    unchanged = self.conn.execute(sql.for_target(plan.target).key_unchanged(), ()).fetchone()
                    if unchanged is not None and not unchanged[0]:
                        raise key_changed_error(plan.target)
                    raise KeyRoundTripError(
                        f"key ({', '.join(plan.target.key)}) of {plan.target.schema}.{plan.target.table}: the text "
                        f"form of a key after {found.checkpoint} does not read back as the same value of type "
                        f"{', '.join(plan.target.key_types)}, so a checkpoint cannot hold it exactly"
                    )
        raise LockLostError(f"slice {request.slice} keeps moving under this runner: another runner works on it")

    def _batch_round_trip(
        self, plan: Plan, request: BatchRequest, expected: tuple[Key | None, Key] | None
    ) -> tuple[_LockedSlice, _BatchDone | None, bool]:
        """The batch's statements pipelined into one implicit transaction (committed at the pipeline's sync):
        the timeouts, the slice's lock, the batch, and, once every slice is done, marking the backfill
        succeeded. Returns the slice as locked, what the batch did (None if it did not run), and whether it
        finished the backfill."""
        tables, target = self.tables, plan.target
        # No expectation: an upper bound no slice has (NULLs), so the batch only locks and reads the slice.
        checkpoint, upper = expected if expected is not None else (None, [None] * len(target.key))
        undo = request.backfill_id if plan.spec.reversible else None
        returning_old = self.conn.info.server_version >= _RETURNING_OLD
        has_lower = checkpoint is not None
        statement = _batch_statement(target, tables, has_lower, undo, returning_old, self.writes_history)
        claimed = (request.backfill_id, request.slice) in self._claims
        params = sql.TargetSQL.batch_params(
            request.backfill_id,
            request.slice,
            checkpoint,
            upper,
            claimed,
            request.batch_size,
            request.owner,
            waits=request.waits,
            retries=request.retries,
        )
        conn = self.conn
        try:
            # Not prepared: a statement that a failing batch leaves unparsed in the aborted pipeline would stay
            # in psycopg's cache of prepared statements, and every later batch would fail on its name.
            with conn.pipeline():
                conn.execute(
                    sql.BATCH_SETTINGS,
                    (_ms(request.lock_timeout), _ms(request.statement_timeout), "off"),
                    prepare=False,
                )
                lock = conn.cursor(row_factory=class_row(_LockedSlice)).execute(
                    tables.lock_slice(), (request.backfill_id, request.slice), prepare=False
                )
                batch = conn.cursor(row_factory=class_row(_BatchDone)).execute(statement, params, prepare=False)
                # Two runners finishing the last two slices at once would each see the other's slice unfinished
                # under their own snapshot, and neither would mark the backfill done. Locking the backfill's row
                # first makes the second wait for the first to commit; the next statement then takes a fresh
                # snapshot that sees it.
                conn.execute(
                    tables.lock_backfill_if_done(),
                    (request.backfill_id, request.backfill_id, request.slice),
                    prepare=False,
                )
                finish = conn.execute(
                    tables.finish_if_done(), (request.backfill_id, request.backfill_id), prepare=False
                )
            found = lock.fetchone()
            done = batch.fetchone()
        except psycopg.Error:
            if conn.broken or conn.closed:
                self._drop()
            raise
        assert found is not None, "slice vanished"
        return found, done, finish.rowcount == 1

    def fail(self, backfill_id: int, error: str) -> None:
        """Mark the backfill failed with ``error`` (after the failing batch rolled back)."""
        statement = self.tables.set_state()
        params = (RunState.FAILED.value, error[:4000], True, backfill_id)
        try:
            self.conn.execute(statement, params)
        except psycopg.OperationalError:
            self._drop()  # the failing batch may have taken the connection with it: one more try on a new one
            self.conn.execute(statement, params)


#: Up to this many rows, split points come from walking the key's index; beyond, from a sample of the table's pages.
_WALK_LIMIT = 2_000_000
#: Sampled keys per piece when sampling: enough for even pieces, a tiny fraction of a large table.
_SAMPLE_PER_PIECE = 5_000


def _split_points(
    conn: psycopg.Connection[Any], target: Target, start: Key | None, upper: Key, parts: int
) -> list[Key]:
    """Up to ``parts - 1`` keys inside (start, upper] cutting it into pieces of about equal row counts."""
    statements = sql.for_target(target)
    lower = list(start or [])
    plan = conn.execute(statements.estimate_range(start is not None, filtered=False), [*lower, *upper]).fetchone()
    estimate = int(plan[0][0]["Plan"]["Plan Rows"]) if plan else 0
    points: list[Key] = []
    if estimate <= _WALK_LIMIT:
        # Exact row counts from the index: parts - 1 look-aheads of estimate/parts entries each.
        step, cursor = max(1, estimate // parts), start
        lookahead = {has: statements.lookahead(has, verified=True) for has in (False, True)}
        for _ in range(parts - 1):
            row = conn.execute(lookahead[cursor is not None], [*(cursor or []), *upper, step - 1]).fetchone()
            if row is None or (ahead := checked_key(target, row)) == upper:
                break
            cursor = ahead
            points.append(cursor)
        return points
    percent = min(100.0, 100.0 * _SAMPLE_PER_PIECE * parts / estimate)
    sampled = conn.execute(statements.sample_keys(start is not None), [percent, *lower, *upper])
    keys = [checked_key(target, row) for row in sampled]
    for j in range(1, parts):
        key = keys[len(keys) * j // parts] if keys else None
        if key is not None and key != upper and (not points or key != points[-1]):
            points.append(key)
    return points


def _document(plan: Plan, spec: BackfillSpec | None = None) -> Jsonb:
    """The stored spec, with what its checkpoints mean (the key's types and collations) beside it."""
    return Jsonb({**(spec or plan.spec).to_dict(), "key_signature": list(plan.key_signature)})


def _check_key_signature(record: BackfillRecord, plan: Plan) -> None:
    # Before the first start no checkpoint exists, and a backfill registered by an older release has no signature
    # to compare: both take the key as it is now.
    if record.started_at is None or record.key_signature is None or record.key_signature == plan.key_signature:
        return
    was, now = ", ".join(record.key_signature), ", ".join(plan.key_signature)
    raise KeyChangedError(
        f"backfill {record.name!r}: the key ({', '.join(plan.target.key)}) of {record.spec.qualified_table} was "
        f"{was} when it started and is {now} now; its checkpoint would be read in a different order: "
        "register the backfill again under a new name"
    )


def _mismatch(old: BackfillSpec, new: BackfillSpec) -> str:
    changed = [
        field
        for field, a, b in (
            ("table", old.qualified_table, new.qualified_table),
            ("values", dict(old.values), dict(new.values)),
            ("where", old.where, new.where),
            ("key", old.key, new.key),
            ("keep_in_sync", old.keep_in_sync, new.keep_in_sync),
            ("reversible", old.reversible, new.reversible),
        )
        if a != b
    ]
    return (
        f"backfill {new.name!r} already exists with a different spec ({', '.join(changed)} changed): "
        "use a new name, or force=True (CLI: --force) to replace the stored spec"
    )
