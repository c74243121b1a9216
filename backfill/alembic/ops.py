"""The Alembic operations of ``backfill``, as data: each class holds its arguments and carries the docstring a user
reads as ``op.<name>``. The code that runs them lives in :mod:`backfill.alembic.toimpl`.

Importing this module registers the ``op.`` names (Alembic >= 1.18 imports it through the ``alembic.plugins``
entry point; older versions need ``import backfill.alembic`` in env.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Union

from alembic.operations import MigrateOperation, Operations

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ClauseElement

    from backfill.executor import RunReport
    from backfill.settings import RunSettings
    from backfill.store import BackfillRecord

__all__ = [
    "SQLText",
    "BackfillOp",
    "EnsureBackfillFinishedOp",
    "AddNotNullConstraintOp",
    "ValidateNotNullConstraintOp",
    "DropNotNullConstraintOp",
]

#: An SQL expression: text, or a SQLAlchemy expression (compiled for PostgreSQL with its values inlined).
SQLText = Union[str, "ClauseElement"]

#: Seconds an ACCESS EXCLUSIVE step may wait for its lock, per attempt.
DEFAULT_LOCK_TIMEOUT = 2.0
#: Seconds to keep retrying such a step before the upgrade fails.
DEFAULT_LOCK_RETRY_SECONDS = 300.0


@Operations.register_operation("backfill")
class BackfillOp(MigrateOperation):
    """Backfill ``table`` in short batches, outside the migration's transaction."""

    def __init__(
        self,
        name: str,
        table: str,
        values: Mapping[str, SQLText],
        *,
        where: SQLText | None = None,
        key: str | tuple[str, ...] | None = None,
        batch_size: int | None = None,
        schema: str | None = None,
        defer: bool = False,
        settings: RunSettings | None = None,
        force: bool = False,
        control_schema: str = "public",
    ) -> None:
        self.name = name
        self.table = table
        self.values = values
        self.where = where
        self.key = key
        self.batch_size = batch_size
        self.schema = schema
        self.defer = defer
        self.settings = settings
        self.force = force
        self.control_schema = control_schema

    @classmethod
    def backfill(
        cls,
        operations: Operations,
        name: str,
        table: str,
        values: Mapping[str, SQLText],
        *,
        where: SQLText | None = None,
        key: str | tuple[str, ...] | None = None,
        batch_size: int | None = None,
        schema: str | None = None,
        defer: bool = False,
        settings: RunSettings | None = None,
        force: bool = False,
        control_schema: str = "public",
    ) -> RunReport | None:
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
        :param key: columns to walk (default: the primary key). Required for ``--sql`` (offline) output, where
            the catalog cannot be read.
        :param batch_size: rows per batch; by default batches adapt to a target duration.
        :param schema: the table's schema.
        :param defer: only register the backfill (state ``pending``) for ``backfill run`` (CLI or cron) and
            return at once; gate a later revision on it with ``op.ensure_backfill_finished``.
        :param settings: a :class:`backfill.RunSettings` (timeouts, throttles, retries) for the run.
        :param force: replace a different spec stored under the same name.
        :param control_schema: schema of the control tables.
        :return: the run's :class:`backfill.RunReport`; None when deferred or offline.

        In offline mode (``alembic upgrade --sql``) the backfill renders as a ``DO`` block that runs the same
        batches, committing each one, outside a transaction block (psql's default autocommit). Offline, ``key`` is
        required and an unqualified table is taken to be in schema ``public``.
        """
        report: RunReport | None = operations.invoke(
            cls(
                name,
                table,
                values,
                where=where,
                key=key,
                batch_size=batch_size,
                schema=schema,
                defer=defer,
                settings=settings,
                force=force,
                control_schema=control_schema,
            )
        )
        return report


@Operations.register_operation("ensure_backfill_finished")
class EnsureBackfillFinishedOp(MigrateOperation):
    """Gate a revision on a backfill having finished."""

    def __init__(
        self,
        name: str,
        *,
        finish: bool = True,
        settings: RunSettings | None = None,
        control_schema: str = "public",
    ) -> None:
        self.name = name
        self.finish = finish
        self.settings = settings
        self.control_schema = control_schema

    @classmethod
    def ensure_backfill_finished(
        cls,
        operations: Operations,
        name: str,
        *,
        finish: bool = True,
        settings: RunSettings | None = None,
        control_schema: str = "public",
    ) -> BackfillRecord | None:
        """Make sure the backfill ``name`` (from ``op.backfill`` in an earlier revision) has finished.

        If it has not, ``finish=True`` runs the rest of it here, outside the migration's transaction (what the
        migration did before is committed first); ``finish=False`` fails the upgrade with a message naming the
        backfill, its progress and the CLI command that finishes it. A failed, paused or cancelled backfill
        always fails the upgrade, with what to do about it.

        :param name: the backfill.
        :param finish: run the rest inline (True) or only check (False).
        :param settings: a :class:`backfill.RunSettings` for an inline run.
        :param control_schema: schema of the control tables.
        :return: the finished backfill's record; None offline, where a ``DO`` block checks the control table
            (a backfill it does not know was run inline earlier in the same script).
        """
        record: BackfillRecord | None = operations.invoke(
            cls(name, finish=finish, settings=settings, control_schema=control_schema)
        )
        return record


class _NotNullOp(MigrateOperation):
    def __init__(
        self,
        table: str,
        column: str,
        *,
        schema: str | None = None,
        name: str | None = None,
        validate: bool = True,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS,
    ) -> None:
        self.table = table
        self.column = column
        self.schema = schema
        self.name = name
        self.validate = validate
        self.lock_timeout = lock_timeout
        self.lock_retry_seconds = lock_retry_seconds

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (type(self).__name__, self.schema, self.table, self.column, self.name)


@Operations.register_operation("add_not_null_constraint")
class AddNotNullConstraintOp(_NotNullOp):
    """Make a column NOT NULL without an ACCESS EXCLUSIVE table scan."""

    @classmethod
    def add_not_null_constraint(
        cls,
        operations: Operations,
        table: str,
        column: str,
        *,
        schema: str | None = None,
        name: str | None = None,
        validate: bool = True,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS,
    ) -> None:
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
        :param lock_timeout: seconds each ACCESS EXCLUSIVE attempt may wait.
        :param lock_retry_seconds: how long to keep retrying before the upgrade fails.

        Offline (``--sql``) the server version is unknown: the PostgreSQL 12-17 CHECK path is rendered (it works
        on 18 as well), each ACCESS EXCLUSIVE statement after its ``SET lock_timeout``.
        """
        operations.invoke(
            cls(
                table,
                column,
                schema=schema,
                name=name,
                validate=validate,
                lock_timeout=lock_timeout,
                lock_retry_seconds=lock_retry_seconds,
            )
        )

    def reverse(self) -> DropNotNullConstraintOp:
        return DropNotNullConstraintOp(
            self.table,
            self.column,
            schema=self.schema,
            name=self.name,
            lock_timeout=self.lock_timeout,
            lock_retry_seconds=self.lock_retry_seconds,
        )


@Operations.register_operation("validate_not_null_constraint")
class ValidateNotNullConstraintOp(_NotNullOp):
    """Validate a NOT VALID not-null constraint added earlier."""

    @classmethod
    def validate_not_null_constraint(
        cls,
        operations: Operations,
        table: str,
        column: str,
        *,
        schema: str | None = None,
        name: str | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS,
    ) -> None:
        """Finish ``op.add_not_null_constraint(..., validate=False)`` from an earlier revision.

        Validates the constraint (a scan that blocks neither reads nor writes) and, on PostgreSQL 12-17, sets
        NOT NULL (no scan) and drops the CHECK. Fails if there is no NOT VALID constraint to validate, or if the
        column still has NULLs (the NOT VALID constraint then stays: new rows are still checked). Arguments as
        for ``op.add_not_null_constraint``.
        """
        operations.invoke(
            cls(
                table,
                column,
                schema=schema,
                name=name,
                lock_timeout=lock_timeout,
                lock_retry_seconds=lock_retry_seconds,
            )
        )


@Operations.register_operation("drop_not_null_constraint")
class DropNotNullConstraintOp(_NotNullOp):
    """Make a column nullable again (for downgrade())."""

    @classmethod
    def drop_not_null_constraint(
        cls,
        operations: Operations,
        table: str,
        column: str,
        *,
        schema: str | None = None,
        name: str | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS,
    ) -> None:
        """Undo ``op.add_not_null_constraint`` whatever stage it reached: drop the CHECK of the PostgreSQL 12-17
        path if there is one, and the column's NOT NULL. Each statement waits at most ``lock_timeout`` seconds
        for its ACCESS EXCLUSIVE lock and is retried with backoff. Arguments as for
        ``op.add_not_null_constraint``.
        """
        operations.invoke(
            cls(
                table,
                column,
                schema=schema,
                name=name,
                lock_timeout=lock_timeout,
                lock_retry_seconds=lock_retry_seconds,
            )
        )

    def reverse(self) -> AddNotNullConstraintOp:
        return AddNotNullConstraintOp(
            self.table,
            self.column,
            schema=self.schema,
            name=self.name,
            lock_timeout=self.lock_timeout,
            lock_retry_seconds=self.lock_retry_seconds,
        )
