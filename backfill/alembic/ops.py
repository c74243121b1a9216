"""The Alembic operations of ``backfill``, as data: each class holds its arguments and carries the docstring a user
reads as ``op.<name>``. The code that runs them lives in :mod:`backfill.alembic.toimpl`.

Importing this module registers the ``op.`` names (Alembic >= 1.18 imports it through the ``alembic.plugins``
entry point; older versions need ``import backfill.alembic`` in env.py).

Each operation's fields are the one source of its arguments: its ``__init__`` is derived from them (a dataclass),
:func:`operation` derives the ``op.<name>`` classmethod Alembic proxies, and :mod:`backfill.alembic` derives the
typed function from the class. What running it returns is the class's type argument: ``Op[ChangeResult | None]``.

A new op is a ``@operation("name")`` ``@dataclass(eq=False)`` subclass of ``Op[result]`` here (its fields, and the
docstring users read), its implementation in :mod:`backfill.alembic.toimpl`, and ``name = _typed(ops.NameOp)`` with
``"name"`` in ``__all__`` in :mod:`backfill.alembic`.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, InitVar, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, Union

from alembic.operations import MigrateOperation, Operations

from backfill.api import DEFAULT_CONTROL_SCHEMA
from backfill.executor import RunReport
from backfill.schema.constraint import ChangeResult
from backfill.schema.ddl import DEFAULT_LOCK_RETRY_SECONDS, DEFAULT_LOCK_TIMEOUT
from backfill.schema.foreign_key import fk_name
from backfill.schema.index import index_name
from backfill.schema.type_change import TypeChangeResult
from backfill.store import BackfillRecord

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ClauseElement
    from sqlalchemy.types import TypeEngine

    from backfill.settings import RunSettings

__all__ = [
    "SQLText",
    "BackfillOp",
    "EnsureBackfillFinishedOp",
    "DropBackfillOp",
    "RevertBackfillOp",
    "DropBackfillTriggerOp",
    "AddNotNullConstraintOp",
    "ValidateNotNullConstraintOp",
    "DropNotNullConstraintOp",
    "AddCheckConstraintOp",
    "ValidateCheckConstraintOp",
    "DropCheckConstraintOp",
    "AddForeignKeyOp",
    "ValidateForeignKeyOp",
    "DropForeignKeyOp",
    "AddIndexConcurrentlyOp",
    "DropIndexConcurrentlyOp",
    "TypeText",
    "StartColumnTypeChangeOp",
    "FinishColumnTypeChangeOp",
    "CleanupColumnTypeChangeOp",
    "CancelColumnTypeChangeOp",
    "UnfinishColumnTypeChangeOp",
    "RestoreColumnTypeChangeOp",
]

#: An SQL expression: text, or a SQLAlchemy expression (compiled for PostgreSQL with its values inlined).
SQLText = Union[str, "ClauseElement"]

#: Seconds ``op.ensure_backfill_finished`` waits for runners elsewhere before the upgrade fails.
DEFAULT_FINISH_TIMEOUT = 3600.0

_Result = TypeVar("_Result")


@dataclass(eq=False)
class Op(MigrateOperation, Generic[_Result]):
    """An operation of ``backfill`` whose run returns ``_Result``. Subclasses are dataclasses registered with
    :func:`operation`; their docstring is what users read as ``op.<name>``."""

    #: The ``op.<name>`` the class is registered as (set by :func:`operation`).
    op_name: ClassVar[str]

    _: KW_ONLY
    #: Not part of the operation: the typed functions of :mod:`backfill.alembic` take it (the Operations of the
    #: migration to run in; by default the running one's ``op``), so their signature is the class's own.
    operations: InitVar[Operations | None] = None

    @classmethod
    def result_type(cls) -> Any:
        """What running the operation returns (the class's type argument), for signatures."""
        for klass in cls.__mro__:
            for base in getattr(klass, "__orig_bases__", ()):
                if typing.get_origin(base) is Op:
                    return typing.get_args(base)[0]
        return inspect.Signature.empty

    def like(self, op_class: type[_OtherOp], **given: Any) -> _OtherOp:
        """An ``op_class`` operation with ``given`` and, for its other fields, this one's values of the fields of
        that name (what ``reverse()`` builds)."""
        mine = {f.name for f in dataclasses.fields(self)}
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(op_class) if f.name in mine}
        return op_class(**{**shared, **given})

    @classmethod
    def arguments(cls) -> list[inspect.Parameter]:
        """The operation's arguments: its fields, as its ``__init__`` takes them."""
        return [p for p in inspect.signature(cls).parameters.values() if p.name != "operations"]


_OtherOp = TypeVar("_OtherOp", bound="Op[Any]")
_OpClass = TypeVar("_OpClass", bound="type[Op[Any]]")


def operation(name: str) -> Callable[[_OpClass], _OpClass]:
    """Register an :class:`Op` dataclass as ``op.<name>``.

    Alembic proxies a classmethod ``<name>(operations, ...)`` as ``op.<name>``, with its docstring: that classmethod
    is derived here from the class (its fields as parameters, its docstring), so the arguments are written once.
    """

    def register(op_class: _OpClass) -> _OpClass:
        def invoke(cls: type[Op[Any]], operations: Operations, *args: Any, **kwargs: Any) -> Any:
            return operations.invoke(cls(*args, **kwargs))

        arguments = op_class.arguments()
        returns = op_class.result_type()
        positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
        first = [inspect.Parameter("cls", positional), inspect.Parameter("operations", positional)]
        # Alembic names the proxied call after the function and checks its first two parameters by name.
        invoke.__name__ = name
        invoke.__qualname__ = f"{op_class.__qualname__}.{name}"
        invoke.__doc__ = op_class.__doc__
        invoke.__signature__ = inspect.Signature([*first, *arguments], return_annotation=returns)  # type: ignore[attr-defined]
        op_class.op_name = name
        setattr(op_class, name, classmethod(invoke))
        Operations.register_operation(name)(op_class)
        # The proxy Alembic wrote takes (self, *args, **kwargs): give it the operation's signature to show.
        proxy = getattr(Operations, name)
        proxy.__signature__ = inspect.Signature([first[1].replace(name="self"), *arguments], return_annotation=returns)
        return op_class

    return register


# --- backfills -----------------------------------------------------------------------------------------------------


@operation("backfill")
@dataclass(eq=False)
class BackfillOp(Op[RunReport | None]):
    """Set ``values`` on every row of ``table`` in short batches, outside the migration's transaction.

    What the migration did before this call is committed first (on its own connection, through Alembic's
    autocommit block), then the batches run as a resumable backfill named ``name``: each batch is one short
    transaction with a checkpoint. If the upgrade dies, running it again resumes from the checkpoint; a
    backfill of that name that has finished is not run again. A failed backfill fails the upgrade with the
    stored error.

    e.g.::

        op.backfill(
            "events_fill_kind",
            "events",
            {"kind": "coalesce(payload->>'kind', 'unknown')"},
            where="kind IS NULL",
        )

    :param name: unique name of the backfill (the CLI's handle on it: ``backfill status NAME``).
    :param table: the table, optionally ``schema.table``.
    :param values: column -> SQL expression evaluated per row, as text or a SQLAlchemy expression.
    :param where: optional filter (text or SQLAlchemy expression); rows not matching it are left alone.
    :param key: columns to walk (default: the primary key; offline, the script reads it when it runs).
    :param batch_size: rows per batch; by default batches adapt to a target duration.
    :param schema: the table's schema.
    :param skip_unchanged: update only rows whose values differ from the expressions' results (the default:
        a re-run over rows that already hold them writes nothing, and fires no UPDATE trigger on them);
        False rewrites every matching row, for expressions that must be applied regardless or are volatile.
    :param defer: only register the backfill (state ``pending``) for ``backfill run`` (CLI or cron) and
        return at once; gate a later revision on it with ``op.ensure_backfill_finished``.
    :param settings: a :class:`backfill.RunSettings` (timeouts, throttles, retries) for the run.
    :param force: replace a different spec stored under the same name.
    :param control_schema: schema of the control tables.
    :param keep_in_sync: before the run fixes its key range, install a ``BEFORE INSERT OR UPDATE`` trigger
        that gives every row the application writes the same values where the column is left NULL and
        ``where`` holds for the new row (application code that does not know the column keeps working, also
        after ``op.add_not_null_constraint``); a value the application writes is never overwritten. It stays
        until ``op.drop_backfill_trigger(name)`` in a later revision; ``op.drop_backfill(name)`` (this op's
        downgrade) drops it too.
    :param reversible: keep what each batch overwrites in an undo log (a table in the control schema, written
        in the batch's own statement), so that ``op.revert_backfill(name)`` (this op's downgrade then) puts
        every row back exactly (rows the application changed since are left as they are). Not offline.
    :return: the run's :class:`backfill.RunReport`; None when deferred or offline.

    In offline mode (``alembic upgrade --sql``) the backfill renders as a ``DO`` block that registers it in the
    control tables and runs the same batches, each committed with its checkpoint, outside a transaction block
    (psql's default autocommit): run again after an interruption, it continues where it stopped. It honours
    the timeouts, ``sleep_between`` and ``max_rows_per_second`` of ``settings``. Offline, an unqualified
    table is taken to be in schema ``public``, and without ``key`` the table's primary key (one column) is
    read when the script runs.
    """

    name: str
    table: str
    values: Mapping[str, SQLText]
    _: KW_ONLY
    where: SQLText | None = None
    key: str | tuple[str, ...] | None = None
    batch_size: int | None = None
    schema: str | None = None
    skip_unchanged: bool = True
    defer: bool = False
    settings: RunSettings | None = None
    force: bool = False
    control_schema: str = DEFAULT_CONTROL_SCHEMA
    keep_in_sync: bool = False
    reversible: bool = False

    def reverse(self) -> DropBackfillOp | RevertBackfillOp:
        if self.reversible:
            return self.like(RevertBackfillOp)
        return DropBackfillOp(self.name, control_schema=self.control_schema)


@operation("ensure_backfill_finished")
@dataclass(eq=False)
class EnsureBackfillFinishedOp(Op[BackfillRecord | None]):
    """Make sure the backfill ``name`` (from ``op.backfill`` in an earlier revision) has finished.

    If it has not, ``finish=True`` runs the rest of it here, outside the migration's transaction (what the
    migration did before is committed first): it works every slice no other runner holds and waits for the
    runners elsewhere (a cron job's ``backfill run``) to finish theirs, taking over any slice they let go,
    for up to ``timeout`` seconds, logging ``backfill_wait`` with the progress every 30 s. ``finish=False``
    fails the upgrade with a message naming the backfill, its progress and the CLI command that finishes
    it. A failed, paused or cancelled backfill always fails the upgrade, with what to do about it.

    :param name: the backfill.
    :param finish: run the rest inline (True) or only check (False).
    :param settings: a :class:`backfill.RunSettings` for an inline run.
    :param control_schema: schema of the control tables.
    :param timeout: seconds to wait for other runners before the upgrade fails (default one hour); the
        error then names the runners and the command that shows their progress.
    :return: the finished backfill's record; None offline, where a ``DO`` block checks the control table
        (a backfill it does not know was run inline earlier in the same script).
    """

    name: str
    _: KW_ONLY
    finish: bool = True
    settings: RunSettings | None = None
    control_schema: str = DEFAULT_CONTROL_SCHEMA
    timeout: float = DEFAULT_FINISH_TIMEOUT


@operation("drop_backfill")
@dataclass(eq=False)
class DropBackfillOp(Op[None]):
    """Drop the backfill ``name``: its keep_in_sync trigger (if any) and its record in the control tables, so
    the next upgrade runs ``op.backfill(name, ...)`` again from the start. The downgrade of ``op.backfill``::

        def downgrade():
            op.drop_backfill("events_fill_kind")

    The data it changed stays as it is (drop the column in the downgrade of the revision that added it).
    Unknown names are ignored, so a downgrade can run on a database the backfill never reached.

    :param name: the backfill.
    :param force: drop it even while a runner (``backfill run``) is working on it; without it, the downgrade
        fails naming the runner.
    :param control_schema: schema of the control tables.
    """

    name: str
    _: KW_ONLY
    force: bool = False
    control_schema: str = DEFAULT_CONTROL_SCHEMA


@operation("revert_backfill")
@dataclass(eq=False)
class RevertBackfillOp(Op[None]):
    """Revert the reversible backfill ``name`` (``op.backfill(..., reversible=True)``) and drop it. The downgrade
    of a reversible ``op.backfill``::

        def downgrade():
            op.revert_backfill("events_fill_kind")

    Outside the migration's transaction (what it did before is committed first), every value the backfill
    overwrote is written back from its undo log in short batches, each committed with its checkpoint: if the
    downgrade dies, running it again resumes. A row the application changed since the backfill wrote it is
    left as it is (logged with ``revert_finished``, ``rows_kept``). Then the backfill, its revert and its undo
    log are dropped, so the next upgrade runs ``op.backfill(name, ...)`` again from the start. Unknown names are
    ignored, so a downgrade can run on a database the backfill never reached. Not offline.

    :param name: the backfill.
    :param settings: a :class:`backfill.RunSettings` (timeouts, throttles, retries) for the revert's run.
    :param control_schema: schema of the control tables.
    """

    name: str
    _: KW_ONLY
    settings: RunSettings | None = None
    control_schema: str = DEFAULT_CONTROL_SCHEMA


@operation("drop_backfill_trigger")
@dataclass(eq=False)
class DropBackfillTriggerOp(Op[None]):
    """Drop the trigger that ``op.backfill(name, ..., keep_in_sync=True)`` installed, and its function, in a
    revision deployed once no application code that does not know the column writes to the table any more.
    ``DROP TRIGGER`` takes ACCESS EXCLUSIVE for an instant: it waits at most ``lock_timeout`` seconds per
    attempt and is retried with backoff. Idempotent.

    :param name: the backfill.
    :param lock_timeout: seconds each attempt may wait for the lock.
    :param control_schema: schema of the control tables.
    """

    name: str
    _: KW_ONLY
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    control_schema: str = DEFAULT_CONTROL_SCHEMA


# --- NOT NULL --------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _NotNullOp(Op[None]):
    """An op on a column's NOT NULL-ness, with the lock settings of its ACCESS EXCLUSIVE steps."""

    table: str
    column: str
    _: KW_ONLY
    schema: str | None = None
    name: str | None = None
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (type(self).__name__, self.schema, self.table, self.column, self.name)


@operation("add_not_null_constraint")
@dataclass(eq=False)
class AddNotNullConstraintOp(_NotNullOp):
    """Make ``column`` NOT NULL without locking the table for a scan.

    PostgreSQL 18+: ``ADD CONSTRAINT name NOT NULL column NOT VALID``, then ``VALIDATE CONSTRAINT`` (a scan
    that blocks neither reads nor writes). PostgreSQL 12-17: ``CHECK (column IS NOT NULL) NOT VALID``,
    ``VALIDATE CONSTRAINT``, ``SET NOT NULL`` (no scan: the valid CHECK proves it), then the CHECK is
    dropped. Each step is its own statement and transaction, outside the migration's transaction; steps
    that need ACCESS EXCLUSIVE wait at most ``lock_timeout`` seconds for it and are retried with backoff,
    so the application never queues behind the migration for longer than that.

    Idempotent from the catalog: a revision that died between two steps can be run again. If the column
    still has NULLs, the upgrade fails naming the table, the column and how many rows, and the constraint
    this call added is dropped again.

    :param table: the table, optionally ``schema.table``.
    :param column: the column.
    :param schema: the table's schema.
    :param name: the constraint's name (PostgreSQL 18+) or the temporary CHECK's (12-17).
    :param validate: False stops after the NOT VALID step (new rows are checked at once); finish later
        with ``op.validate_not_null_constraint``.
    :param validate_timeout: seconds the validating scan may run; None (the default): no limit, whatever
        the role's ``statement_timeout`` (the scan blocks neither reads nor writes).
    :param lock_timeout: seconds each ACCESS EXCLUSIVE attempt may wait.
    :param lock_retry_seconds: how long to keep retrying before the upgrade fails.

    Offline (``--sql``) the server version is unknown: the PostgreSQL 12-17 CHECK path is rendered (it works
    on 18 as well), each ACCESS EXCLUSIVE statement after its ``SET lock_timeout``.
    """

    _: KW_ONLY
    validate: bool = True
    validate_timeout: float | None = None

    def reverse(self) -> DropNotNullConstraintOp:
        return self.like(DropNotNullConstraintOp)


@operation("validate_not_null_constraint")
@dataclass(eq=False)
class ValidateNotNullConstraintOp(_NotNullOp):
    """Finish ``op.add_not_null_constraint(..., validate=False)`` from an earlier revision.

    Validates the constraint (a scan that blocks neither reads nor writes) and, on PostgreSQL 12-17, sets
    NOT NULL (no scan) and drops the CHECK. Fails if there is no NOT VALID constraint to validate, or if the
    column still has NULLs (the NOT VALID constraint then stays: new rows are still checked). Arguments as
    for ``op.add_not_null_constraint``.
    """

    _: KW_ONLY
    validate_timeout: float | None = None


@operation("drop_not_null_constraint")
@dataclass(eq=False)
class DropNotNullConstraintOp(_NotNullOp):
    """Undo ``op.add_not_null_constraint`` whatever stage it reached: drop the CHECK of the PostgreSQL 12-17
    path if there is one, and the column's NOT NULL. Each statement waits at most ``lock_timeout`` seconds
    for its ACCESS EXCLUSIVE lock and is retried with backoff. Arguments as for
    ``op.add_not_null_constraint``.
    """

    def reverse(self) -> AddNotNullConstraintOp:
        return self.like(AddNotNullConstraintOp)


# --- CHECK constraints -----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _TableOp(Op[ChangeResult | None]):
    """An op on a named constraint of a table, with the lock settings of its ACCESS EXCLUSIVE steps."""

    table: str
    name: str
    _: KW_ONLY
    schema: str | None = None
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (type(self).__name__, self.schema, self.table, self.name)


@operation("add_check_constraint")
@dataclass(eq=False)
class AddCheckConstraintOp(_TableOp):
    """Add ``CHECK (condition)`` to ``table`` while the application reads and writes it.

    ``ADD CONSTRAINT name CHECK (condition) NOT VALID`` first: ACCESS EXCLUSIVE for an instant (no row is
    read), waiting at most ``lock_timeout`` seconds per attempt and retried with backoff, so the application
    never queues behind it for longer. Then ``VALIDATE CONSTRAINT``: a scan under SHARE UPDATE EXCLUSIVE, which
    blocks neither reads nor writes. Each step is its own transaction, outside the migration's.

    Idempotent from the catalog: a revision that died between the two steps validates when run again. If
    existing rows violate the condition, the upgrade fails naming one of them, and the constraint this call
    added is dropped again::

        op.add_check_constraint("orders", "orders_amount_positive", "amount >= 0")

    :param table: the table, optionally ``schema.table``.
    :param name: the constraint's name.
    :param condition: one SQL expression, as text or a SQLAlchemy expression (compiled with its values inlined).
    :param validate: False stops after ``NOT VALID`` (rows written from now on are checked); validate in a
        later revision with ``op.validate_check_constraint``.
    :param schema: the table's schema.
    :param lock_timeout: seconds each attempt of the ``ADD`` may wait for its lock.
    :param lock_retry_seconds: how long to keep retrying before the upgrade fails.
    :return: a :class:`backfill.ChangeResult` (the steps that ran); None offline.

    Downgrade: ``op.drop_check_constraint(table, name)`` (this op's ``reverse()``).
    """

    condition: SQLText
    _: KW_ONLY
    validate: bool = True

    def reverse(self) -> DropCheckConstraintOp:
        return self.like(DropCheckConstraintOp)


@operation("validate_check_constraint")
@dataclass(eq=False)
class ValidateCheckConstraintOp(_TableOp):
    """Finish ``op.add_check_constraint(..., validate=False)`` from an earlier revision: ``VALIDATE
    CONSTRAINT``, a scan under SHARE UPDATE EXCLUSIVE that blocks neither reads nor writes. Nothing to do if it
    is valid already. Fails naming a violating row if there is one (the constraint stays NOT VALID), or if the
    table has no CHECK constraint of that name. Arguments as for ``op.add_check_constraint``.
    """


@operation("drop_check_constraint")
@dataclass(eq=False)
class DropCheckConstraintOp(_TableOp):
    """Undo ``op.add_check_constraint``: ``DROP CONSTRAINT IF EXISTS``, valid or not. ACCESS EXCLUSIVE for an
    instant, waiting at most ``lock_timeout`` seconds per attempt, retried with backoff. Arguments as for
    ``op.add_check_constraint``.
    """


# --- foreign keys ------------------------------------------------------------------------------------------------


@operation("add_foreign_key")
@dataclass(eq=False)
class AddForeignKeyOp(Op[ChangeResult | None]):
    """Add a foreign key from ``table`` (``columns``) to ``referent_table`` (``referent_columns``) while the
    application reads and writes both tables.

    ``ADD CONSTRAINT ... FOREIGN KEY ... NOT VALID`` first: SHARE ROW EXCLUSIVE on both tables for an instant
    (no row is read), waiting at most ``lock_timeout`` seconds per attempt, retried with backoff. Then
    ``VALIDATE CONSTRAINT``: a scan of ``table`` under SHARE UPDATE EXCLUSIVE (ROW SHARE on the referenced
    table), which blocks neither reads nor writes. A plain ``ADD FOREIGN KEY`` would block every write to
    either table for the whole scan.

    Idempotent from the catalog: a revision that died between the steps validates when run again. Rows whose
    key is missing from the referenced table fail the upgrade, naming one; the constraint this call added is
    dropped again. Without an index on ``columns``, every delete on ``referent_table`` scans ``table``: a
    ``foreign_key_unindexed`` warning says so and names the ``op.add_index_concurrently`` call that fixes it::

        op.add_index_concurrently("orders", ["customer_id"])
        op.add_foreign_key("orders", ["customer_id"], "customers", ["id"], on_delete="CASCADE")

    :param table: the referencing table, optionally ``schema.table``.
    :param columns: its column(s).
    :param referent_table: the referenced table, optionally ``schema.table``.
    :param referent_columns: its column(s) (a primary key or unique constraint).
    :param name: the constraint's name (default ``table_col_fkey``).
    :param on_delete: ``CASCADE``, ``SET NULL``, ``SET DEFAULT``, ``RESTRICT`` or ``NO ACTION``.
    :param validate: False stops after ``NOT VALID``; validate later with ``op.validate_foreign_key``.
    :param schema: ``table``'s schema.
    :param lock_timeout: seconds each attempt of the ``ADD`` may wait for its locks.
    :param lock_retry_seconds: how long to keep retrying before the upgrade fails.
    :return: a :class:`backfill.ChangeResult` (steps that ran, advice); None offline.

    Downgrade: ``op.drop_foreign_key(table, name)`` (this op's ``reverse()``).
    """

    table: str
    columns: str | Sequence[str]
    referent_table: str
    referent_columns: str | Sequence[str]
    _: KW_ONLY
    name: str | None = None
    on_delete: str | None = None
    validate: bool = True
    schema: str | None = None
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (type(self).__name__, self.schema, self.table, self.name, self.columns, self.referent_table)

    def constraint_name(self) -> str:
        """The name given, or the default ``table_col_fkey``."""
        return fk_name(self.table, self.columns, self.name)

    def reverse(self) -> DropForeignKeyOp:
        return self.like(DropForeignKeyOp, name=self.constraint_name())


@operation("validate_foreign_key")
@dataclass(eq=False)
class ValidateForeignKeyOp(_TableOp):
    """Finish ``op.add_foreign_key(..., validate=False)`` from an earlier revision: ``VALIDATE CONSTRAINT``, a
    scan that blocks neither reads nor writes. Nothing to do if it is valid already. Fails naming a row whose
    key is missing (the constraint stays NOT VALID), or if ``table`` has no foreign key of that name.

    :param table: the referencing table, optionally ``schema.table``.
    :param name: the foreign key's name.
    """


@operation("drop_foreign_key")
@dataclass(eq=False)
class DropForeignKeyOp(_TableOp):
    """Undo ``op.add_foreign_key``: ``DROP CONSTRAINT IF EXISTS``, valid or not. ACCESS EXCLUSIVE on ``table``
    for an instant, waiting at most ``lock_timeout`` seconds per attempt, retried with backoff."""


# --- indexes -------------------------------------------------------------------------------------------------------


@operation("add_index_concurrently")
@dataclass(eq=False)
class AddIndexConcurrentlyOp(Op[ChangeResult | None]):
    """Build an index on ``table`` with ``CREATE INDEX CONCURRENTLY``: reads and writes go on throughout.

    What the migration did so far is committed first (``CONCURRENTLY`` cannot run inside a transaction). The
    build holds SHARE UPDATE EXCLUSIVE, which blocks no application query, and waits as long as other
    sessions' transactions need: first those writing the table, then every older snapshot. Each time the
    sessions it waits for change, a ``index_build_waiting`` warning names them (pid, application name, age of
    their transaction) so you know whom to ask. No ``lock_timeout`` ends those waits: a build cut short
    leaves an INVALID index and loses its work.

    Idempotent from the catalog: a valid index of that name is left alone; an INVALID one, left by a build
    that failed or was killed, is dropped and built again. A unique build that fails on duplicates fails the
    upgrade naming one duplicated key, and the INVALID index it left is dropped at once (PostgreSQL would
    otherwise keep enforcing it on new rows)::

        op.add_index_concurrently("users", ["email"], unique=True)

    :param table: the table, optionally ``schema.table``.
    :param columns: the column(s), in order.
    :param name: the index's name (default ``table_col_idx``).
    :param unique: a unique index.
    :param where: a partial index's predicate: one SQL expression (text or SQLAlchemy).
    :param using: the index method (``btree``, ``gin``, ``gist``, ``brin``, ``hash``, ...).
    :param schema: the table's schema.
    :return: a :class:`backfill.ChangeResult` (statements that ran, sessions waited for); None offline.

    Offline (``--sql``), a psql ``\\gexec`` line drops an INVALID index of that name if the script finds one,
    then ``CREATE INDEX CONCURRENTLY IF NOT EXISTS`` builds it: run the script with psql.

    Downgrade: ``op.drop_index_concurrently(name)`` (this op's ``reverse()``).
    """

    table: str
    columns: str | Sequence[str]
    _: KW_ONLY
    name: str | None = None
    unique: bool = False
    where: SQLText | None = None
    using: str | None = None
    schema: str | None = None

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (type(self).__name__, self.schema, self.table, self.index_name())

    def index_name(self) -> str:
        """The name given, or the default ``table_col_idx``."""
        return index_name(self.table, self.columns, self.name)

    def reverse(self) -> DropIndexConcurrentlyOp:
        return self.like(DropIndexConcurrentlyOp, name=self.index_name())


@operation("drop_index_concurrently")
@dataclass(eq=False)
class DropIndexConcurrentlyOp(Op[ChangeResult | None]):
    """Drop the index ``name`` with ``DROP INDEX CONCURRENTLY`` if it exists: SHARE UPDATE EXCLUSIVE on its
    table, so reads and writes go on; it waits for the transactions using the index (named in
    ``index_build_waiting`` warnings). What the migration did so far is committed first.

    :param name: the index, optionally ``schema.name``.
    :param table: its table (optionally ``schema.table``), which gives the schema when ``name`` has none.
    :param schema: the index's schema.
    :return: a :class:`backfill.ChangeResult`; None offline.
    """

    name: str
    _: KW_ONLY
    table: str | None = None
    schema: str | None = None

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (type(self).__name__, self.schema, self.table, self.name)


# --- column type changes -------------------------------------------------------------------------------------------

#: A column type: SQL text (``"bigint"``) or a SQLAlchemy type (``sa.BigInteger()``), compiled for PostgreSQL.
TypeText = Union[str, "TypeEngine[Any]"]


@dataclass(eq=False)
class _TypeChangeOp(Op[TypeChangeResult | None]):
    """An op of a column type change, with the lock settings of its ACCESS EXCLUSIVE steps."""

    table: str
    column: str
    _: KW_ONLY
    schema: str | None = None
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS
    control_schema: str = DEFAULT_CONTROL_SCHEMA

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (type(self).__name__, self.schema, self.table, self.column)

    def reversible_with(self, value: object, argument: str, meaning: str) -> None:
        """Raise ``ValueError`` naming ``argument`` when ``value``, which ``reverse()`` needs, was not given (as
        Alembic's own ``reverse()`` does when it lacks what it needs)."""
        if value is None:
            raise ValueError(
                f"op.{self.op_name}({self.table!r}, {self.column!r}) cannot be reversed without {argument}=, {meaning}"
            )


@operation("start_column_type_change")
@dataclass(eq=False)
class StartColumnTypeChangeOp(_TypeChangeOp):
    """Start changing ``column`` of ``table`` to ``new_type`` while the application reads and writes it: the
    first of three revisions (then ``op.finish_column_type_change``, then ``op.cleanup_column_type_change``).

    What the migration did so far is committed first. Then: ``ADD COLUMN <column>_new new_type`` (ACCESS
    EXCLUSIVE for an instant, no rewrite, at most ``lock_timeout`` seconds of waiting per attempt, retried with
    backoff); a trigger that sets it to ``using`` on every row the application inserts or updates (CREATE
    TRIGGER: SHARE ROW EXCLUSIVE for an instant, same timeout); then a resumable backfill named
    ``type_change:<schema>.<table>.<column>`` copies the existing rows in short batches (row locks only, one
    batch at a time). Run again, it resumes the copy::

        op.start_column_type_change("accounts", "id", "bigint")
        op.start_column_type_change("events", "payload", "jsonb", using="payload::jsonb")

    Refused before anything is written: a ``using`` PostgreSQL rejects, a generated column, a view, exclusion
    constraint or foreign key with ON UPDATE, DEFERRABLE or MATCH FULL on the column, a CHECK constraint or index of
    it that cannot hold on the new type (drop it, add it back after finish), a column of the shadow column's name
    that the change did not add. A copy that fails on a row ``using`` cannot convert fails the upgrade naming the
    error and what is left; fix the rows and run it again.

    :param table: the table, optionally ``schema.table``.
    :param column: the column.
    :param new_type: the new type: SQL text or a SQLAlchemy type.
    :param using: one SQL expression over the row giving the new value (default ``column::new_type``).
    :param name: the shadow column's name (default ``<column>_new``).
    :param defer: only register the copy (state ``pending``) for ``backfill run`` or cron;
        ``op.finish_column_type_change`` finishes it, or waits for the runner that holds it.
    :param schema: the table's schema.
    :param settings: a :class:`backfill.RunSettings` for the copy.
    :param lock_timeout: seconds each ACCESS EXCLUSIVE attempt may wait.
    :param lock_retry_seconds: how long to keep retrying before the upgrade fails.
    :param control_schema: schema of the control tables.
    :return: a :class:`backfill.TypeChangeResult` (DDL steps, the copy's report); None offline.

    Offline (``--sql``): the ``ADD COLUMN IF NOT EXISTS`` and the trigger under their lock_timeout, then the
    copy as the same batched ``DO`` block ``op.backfill`` renders. Downgrade: ``op.cancel_column_type_change``
    (this op's ``reverse()``).
    """

    new_type: TypeText
    _: KW_ONLY
    using: SQLText | None = None
    name: str | None = None
    defer: bool = False
    settings: RunSettings | None = None

    def reverse(self) -> CancelColumnTypeChangeOp:
        return self.like(CancelColumnTypeChangeOp)


@operation("finish_column_type_change")
@dataclass(eq=False)
class FinishColumnTypeChangeOp(_TypeChangeOp):
    """Finish ``op.start_column_type_change`` from an earlier revision: from the swap on, ``column`` is the new
    column, of the new type.

    Outside the migration's transaction, each step its own transaction: the rest of the copy runs here (or is waited
    for up to ``timeout`` seconds while a runner elsewhere holds it); NOT NULL is proven on the new column
    (``op.add_not_null_constraint``'s steps: no scan under ACCESS EXCLUSIVE); the column's indexes are copied with
    ``CREATE INDEX CONCURRENTLY`` (no lock that blocks the application; an INVALID copy left by a killed build is
    rebuilt; operator classes, collations, sort order, ``INCLUDE``, expressions and predicates kept); its CHECK
    constraints (``NOT VALID``, ACCESS EXCLUSIVE for an instant) and the foreign keys from and to the column (``NOT
    VALID``, SHARE ROW EXCLUSIVE on both tables for an instant) are copied and validated (a scan that blocks no
    write). A CHECK constraint or index that cannot hold on the new type stops it before any step, naming it. Then
    the swap, one transaction that only changes the catalog, under ``lock_timeout`` with retries (ACCESS EXCLUSIVE
    on the table and on the tables whose foreign keys reference it, for milliseconds): old indexes and constraints
    dropped, the default, sequence ownership (an ``integer`` sequence becomes ``AS bigint``) or identity moved, the
    columns' names swapped (the old one becomes ``<column>_old``, nullable, no longer written), the primary key
    added with ``ADD CONSTRAINT ... PRIMARY KEY USING INDEX`` on its copy, the copies renamed to the old names.

    Idempotent from the catalog: killed between any two steps, it continues when run again; after the swap it
    does nothing.

    Offline (``--sql``): a ``DO`` block reads the catalog when the script runs and plans the steps left into a
    temporary table, and a psql ``\\gexec`` line runs them one by one (NOT NULL by the CHECK path, the CHECK copies,
    the concurrent builds, the foreign key copies, the swap under ``lock_timeout``); the copy must have finished (it
    fails naming the ``backfill run`` command otherwise).

    :param table: the table, optionally ``schema.table``.
    :param column: the column given to ``op.start_column_type_change``.
    :param settings: a :class:`backfill.RunSettings` for the rest of the copy.
    :param timeout: seconds to wait for runners elsewhere to finish the copy.
    :return: a :class:`backfill.TypeChangeResult`; None offline.

    Downgrade: ``op.unfinish_column_type_change`` (this op's ``reverse()``).
    """

    _: KW_ONLY
    settings: RunSettings | None = None
    timeout: float = DEFAULT_FINISH_TIMEOUT

    def reverse(self) -> UnfinishColumnTypeChangeOp:
        return self.like(UnfinishColumnTypeChangeOp)


@operation("cleanup_column_type_change")
@dataclass(eq=False)
class CleanupColumnTypeChangeOp(_TypeChangeOp):
    """Drop the old column (``<column>_old``) of a type change finished in an earlier revision, in a revision
    deployed once no application code reads it: ``DROP COLUMN`` (ACCESS EXCLUSIVE for an instant, at most
    ``lock_timeout`` seconds of waiting per attempt, retried with backoff; no rewrite), and the copy's record in
    the control tables. Idempotent. Fails, dropping nothing, if the change is not finished.

    :param table: the table, optionally ``schema.table``.
    :param column: the column.
    :param old_type: the column's type before the change; only ``reverse()`` reads it (the old column and the
        change's record are gone, so nothing else tells what to add back).
    :return: a :class:`backfill.TypeChangeResult`; None offline.

    Downgrade: ``op.restore_column_type_change(table, column, old_type)`` (this op's ``reverse()`` when it was
    given ``old_type``).
    """

    _: KW_ONLY
    old_type: TypeText | None = None

    def reverse(self) -> RestoreColumnTypeChangeOp:
        self.reversible_with(
            self.old_type, "old_type", "the column's type before the change (or write op.restore_column_type_change)"
        )
        return self.like(RestoreColumnTypeChangeOp)


@operation("cancel_column_type_change")
@dataclass(eq=False)
class CancelColumnTypeChangeOp(_TypeChangeOp):
    """The downgrade of ``op.start_column_type_change``: drop the trigger, the shadow column (with any index or
    foreign key copies a finish built on it) and the copy's record, each under ``lock_timeout`` with retries.
    Idempotent. Fails, changing nothing, once the columns are swapped (the new column is in use). A column of the
    shadow column's name that the change did not add is never dropped.

    :param table: the table, optionally ``schema.table``.
    :param column: the column.
    :param name: the shadow column's name, if ``start`` was given one and its record is gone.
    :param new_type: the type ``start`` was given; only ``reverse()`` reads it (with ``using``).
    :param using: the ``using`` ``start`` was given, for ``reverse()``.
    :return: a :class:`backfill.TypeChangeResult`; None offline.

    Its ``reverse()`` is ``op.start_column_type_change`` when it was given ``new_type`` (``reverse()`` of start
    gives it), a ``ValueError`` naming it otherwise.
    """

    _: KW_ONLY
    name: str | None = None
    new_type: TypeText | None = None
    using: SQLText | None = None

    def reverse(self) -> StartColumnTypeChangeOp:
        self.reversible_with(self.new_type, "new_type", "the type start_column_type_change was given")
        return self.like(StartColumnTypeChangeOp, new_type=self.new_type)


@operation("unfinish_column_type_change")
@dataclass(eq=False)
class UnfinishColumnTypeChangeOp(_TypeChangeOp):
    """The downgrade of ``op.finish_column_type_change``, online: ``column`` gets its old type back, with its
    indexes, constraints, foreign keys and default, sequence or identity, and ``<column>_new`` is the shadow column
    again, kept in sync by the change's trigger (as right after ``op.start_column_type_change``, whose downgrade
    ``op.cancel_column_type_change`` then drops it).

    A type change back, by finish's own steps, outside the migration's transaction: a trigger mirrors every write
    of the column into ``<column>_old`` (CREATE TRIGGER: SHARE ROW EXCLUSIVE for an instant, at most
    ``lock_timeout`` per attempt, retried); a resumable backfill ``type_change_undo:<schema>.<table>.<column>``
    copies the rows changed since the swap (every row after ``op.restore_column_type_change``); NOT NULL proven,
    indexes copied ``CONCURRENTLY``, foreign keys ``NOT VALID`` then validated; then the swap back (ACCESS
    EXCLUSIVE on the table and the tables referencing it for milliseconds, under ``lock_timeout`` with retries),
    which puts an integer sequence back ``AS`` the old type and installs the change's trigger again.

    Refused before anything is written when a row or the sequence holds a value beyond the old integer type (the
    message names the row or the sequence). Idempotent from the catalog. Online only: ``--sql`` fails naming it.

    :param table: the table, optionally ``schema.table``.
    :param column: the column given to ``op.finish_column_type_change``.
    :param using: one SQL expression over the row giving the old type's value (default ``column::old_type``).
    :param settings: a :class:`backfill.RunSettings` for the copy back.
    :return: a :class:`backfill.TypeChangeResult`.
    """

    _: KW_ONLY
    using: SQLText | None = None
    settings: RunSettings | None = None

    def reverse(self) -> FinishColumnTypeChangeOp:
        return self.like(FinishColumnTypeChangeOp)


@operation("restore_column_type_change")
@dataclass(eq=False)
class RestoreColumnTypeChangeOp(_TypeChangeOp):
    """The downgrade of ``op.cleanup_column_type_change``: add ``<column>_old`` of ``old_type`` back, nullable and
    empty (``ADD COLUMN``: ACCESS EXCLUSIVE for an instant, no rewrite, at most ``lock_timeout`` per attempt,
    retried with backoff), so that ``op.unfinish_column_type_change`` can copy the column back into it. Idempotent:
    nothing to do while ``<column>_old`` exists. Fails, changing nothing, if the change is not finished.

    :param table: the table, optionally ``schema.table``.
    :param column: the column.
    :param old_type: the column's type before the change: SQL text or a SQLAlchemy type.
    :return: a :class:`backfill.TypeChangeResult`; None offline.

    Offline (``--sql``): the ``ADD COLUMN IF NOT EXISTS`` under its lock_timeout.
    """

    old_type: TypeText

    def reverse(self) -> CleanupColumnTypeChangeOp:
        return self.like(CleanupColumnTypeChangeOp)
