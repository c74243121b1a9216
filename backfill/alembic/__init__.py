"""Alembic operations for safe online data migrations: ``op.backfill``, ``op.ensure_backfill_finished``,
``op.drop_backfill``, ``op.drop_backfill_trigger``, ``op.add_not_null_constraint``,
``op.validate_not_null_constraint`` and ``op.drop_not_null_constraint``; ``op.add_check_constraint``,
``op.validate_check_constraint``, ``op.drop_check_constraint``; ``op.add_foreign_key``, ``op.validate_foreign_key``,
``op.drop_foreign_key``; ``op.add_index_concurrently`` and ``op.drop_index_concurrently``.

Alembic >= 1.18 loads this module through the ``alembic.plugins`` entry point, so the ``op.`` names work without
touching env.py; with older Alembic, add ``import backfill.alembic`` to env.py. Type checkers do not see custom
``op.`` attributes: the functions below are the same operations, typed (``from backfill.alembic import backfill``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alembic.runtime.plugins import Plugin


def setup(plugin: Plugin) -> None:
    """Alembic's plugin hook. The ops register themselves when this package is imported; nothing else to do.

    Defined before anything imports Alembic: importing Alembic loads its plugins, which may call this while this
    package is still being imported.
    """
    del plugin


from alembic.operations import Operations  # noqa: E402

from backfill.alembic import toimpl as _toimpl  # noqa: E402,F401 -- registers the implementations
from backfill.alembic.ops import (  # noqa: E402
    DEFAULT_FINISH_TIMEOUT,
    DEFAULT_LOCK_RETRY_SECONDS,
    DEFAULT_LOCK_TIMEOUT,
    AddCheckConstraintOp,
    AddForeignKeyOp,
    AddIndexConcurrentlyOp,
    AddNotNullConstraintOp,
    BackfillOp,
    DropBackfillOp,
    DropBackfillTriggerOp,
    DropCheckConstraintOp,
    DropForeignKeyOp,
    DropIndexConcurrentlyOp,
    DropNotNullConstraintOp,
    EnsureBackfillFinishedOp,
    SQLText,
    ValidateCheckConstraintOp,
    ValidateForeignKeyOp,
    ValidateNotNullConstraintOp,
)
from backfill.alembic.toimpl import BackfillNotFinishedError, MigrationContextError  # noqa: E402
from backfill.api import DEFAULT_CONTROL_SCHEMA  # noqa: E402

if TYPE_CHECKING:
    from backfill.executor import RunReport
    from backfill.schema.constraint import ChangeResult
    from backfill.settings import RunSettings
    from backfill.store import BackfillRecord

__all__ = [
    "backfill",
    "ensure_backfill_finished",
    "drop_backfill",
    "drop_backfill_trigger",
    "add_not_null_constraint",
    "validate_not_null_constraint",
    "drop_not_null_constraint",
    "BackfillOp",
    "EnsureBackfillFinishedOp",
    "DropBackfillOp",
    "DropBackfillTriggerOp",
    "AddNotNullConstraintOp",
    "ValidateNotNullConstraintOp",
    "DropNotNullConstraintOp",
    "add_check_constraint",
    "validate_check_constraint",
    "drop_check_constraint",
    "add_foreign_key",
    "validate_foreign_key",
    "drop_foreign_key",
    "add_index_concurrently",
    "drop_index_concurrently",
    "AddCheckConstraintOp",
    "ValidateCheckConstraintOp",
    "DropCheckConstraintOp",
    "AddForeignKeyOp",
    "ValidateForeignKeyOp",
    "DropForeignKeyOp",
    "AddIndexConcurrentlyOp",
    "DropIndexConcurrentlyOp",
    "MigrationContextError",
    "BackfillNotFinishedError",
    "setup",
]


def _running(arguments: dict[str, Any]) -> tuple[Operations, dict[str, Any]]:
    """Split a typed function's ``locals()`` into the running migration's Operations and the op's arguments."""
    operations: Operations | None = arguments.pop("operations")
    if operations is not None:
        return operations, arguments
    from alembic import op

    # The Operations of the migration that is running (alembic.op is a proxy to it while one runs).
    running = getattr(op, "_proxy", None)
    if not isinstance(running, Operations):
        raise MigrationContextError(
            "no Alembic migration is running: call this from upgrade() or downgrade(), or pass operations="
        )
    return running, arguments


def backfill(
    name: str,
    table: str,
    values: Mapping[str, SQLText],
    *,
    where: SQLText | None = None,
    key: str | tuple[str, ...] | None = None,
    batch_size: int | None = None,
    schema: str | None = None,
    skip_unchanged: bool = True,
    defer: bool = False,
    settings: RunSettings | None = None,
    force: bool = False,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
    keep_in_sync: bool = False,
    operations: Operations | None = None,
) -> RunReport | None:
    """``op.backfill``, typed; ``operations`` defaults to the running migration's ``op``. See
    :meth:`BackfillOp.backfill`."""
    running, arguments = _running(locals())
    return BackfillOp.backfill(running, **arguments)


def ensure_backfill_finished(
    name: str,
    *,
    finish: bool = True,
    settings: RunSettings | None = None,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
    timeout: float = DEFAULT_FINISH_TIMEOUT,
    operations: Operations | None = None,
) -> BackfillRecord | None:
    """``op.ensure_backfill_finished``, typed. See :meth:`EnsureBackfillFinishedOp.ensure_backfill_finished`."""
    running, arguments = _running(locals())
    return EnsureBackfillFinishedOp.ensure_backfill_finished(running, **arguments)


def drop_backfill(
    name: str,
    *,
    force: bool = False,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
    operations: Operations | None = None,
) -> None:
    """``op.drop_backfill``, typed. See :meth:`DropBackfillOp.drop_backfill`."""
    running, arguments = _running(locals())
    DropBackfillOp.drop_backfill(running, **arguments)


def drop_backfill_trigger(
    name: str,
    *,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
    operations: Operations | None = None,
) -> None:
    """``op.drop_backfill_trigger``, typed. See :meth:`DropBackfillTriggerOp.drop_backfill_trigger`."""
    running, arguments = _running(locals())
    DropBackfillTriggerOp.drop_backfill_trigger(running, **arguments)


def add_not_null_constraint(
    table: str,
    column: str,
    *,
    schema: str | None = None,
    name: str | None = None,
    validate: bool = True,
    validate_timeout: float | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS,
    operations: Operations | None = None,
) -> None:
    """``op.add_not_null_constraint``, typed. See :meth:`AddNotNullConstraintOp.add_not_null_constraint`."""
    running, arguments = _running(locals())
    AddNotNullConstraintOp.add_not_null_constraint(running, **arguments)


def validate_not_null_constraint(
    table: str,
    column: str,
    *,
    schema: str | None = None,
    name: str | None = None,
    validate_timeout: float | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS,
    operations: Operations | None = None,
) -> None:
    """``op.validate_not_null_constraint``, typed. See
    :meth:`ValidateNotNullConstraintOp.validate_not_null_constraint`."""
    running, arguments = _running(locals())
    ValidateNotNullConstraintOp.validate_not_null_constraint(running, **arguments)


def drop_not_null_constraint(
    table: str,
    column: str,
    *,
    schema: str | None = None,
    name: str | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS,
    operations: Operations | None = None,
) -> None:
    """``op.drop_not_null_constraint``, typed. See :meth:`DropNotNullConstraintOp.drop_not_null_constraint`."""
    running, arguments = _running(locals())
    DropNotNullConstraintOp.drop_not_null_constraint(running, **arguments)


def add_check_constraint(
    table: str,
    name: str,
    condition: SQLText,
    *,
    validate: bool = True,
    schema: str | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS,
    operations: Operations | None = None,
) -> ChangeResult | None:
    """``op.add_check_constraint``, typed. See :meth:`AddCheckConstraintOp.add_check_constraint`."""
    running, arguments = _running(locals())
    return AddCheckConstraintOp.add_check_constraint(running, **arguments)


def validate_check_constraint(
    table: str,
    name: str,
    *,
    schema: str | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS,
    operations: Operations | None = None,
) -> ChangeResult | None:
    """``op.validate_check_constraint``, typed. See :meth:`ValidateCheckConstraintOp.validate_check_constraint`."""
    running, arguments = _running(locals())
    return ValidateCheckConstraintOp.validate_check_constraint(running, **arguments)


def drop_check_constraint(
    table: str,
    name: str,
    *,
    schema: str | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS,
    operations: Operations | None = None,
) -> ChangeResult | None:
    """``op.drop_check_constraint``, typed. See :meth:`DropCheckConstraintOp.drop_check_constraint`."""
    running, arguments = _running(locals())
    return DropCheckConstraintOp.drop_check_constraint(running, **arguments)


def add_foreign_key(
    table: str,
    columns: str | Sequence[str],
    referent_table: str,
    referent_columns: str | Sequence[str],
    *,
    name: str | None = None,
    on_delete: str | None = None,
    validate: bool = True,
    schema: str | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS,
    operations: Operations | None = None,
) -> ChangeResult | None:
    """``op.add_foreign_key``, typed. See :meth:`AddForeignKeyOp.add_foreign_key`."""
    running, arguments = _running(locals())
    return AddForeignKeyOp.add_foreign_key(running, **arguments)


def validate_foreign_key(
    table: str,
    name: str,
    *,
    schema: str | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS,
    operations: Operations | None = None,
) -> ChangeResult | None:
    """``op.validate_foreign_key``, typed. See :meth:`ValidateForeignKeyOp.validate_foreign_key`."""
    running, arguments = _running(locals())
    return ValidateForeignKeyOp.validate_foreign_key(running, **arguments)


def drop_foreign_key(
    table: str,
    name: str,
    *,
    schema: str | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS,
    operations: Operations | None = None,
) -> ChangeResult | None:
    """``op.drop_foreign_key``, typed. See :meth:`DropForeignKeyOp.drop_foreign_key`."""
    running, arguments = _running(locals())
    return DropForeignKeyOp.drop_foreign_key(running, **arguments)


def add_index_concurrently(
    table: str,
    columns: str | Sequence[str],
    *,
    name: str | None = None,
    unique: bool = False,
    where: SQLText | None = None,
    using: str | None = None,
    schema: str | None = None,
    operations: Operations | None = None,
) -> ChangeResult | None:
    """``op.add_index_concurrently``, typed. See :meth:`AddIndexConcurrentlyOp.add_index_concurrently`."""
    running, arguments = _running(locals())
    return AddIndexConcurrentlyOp.add_index_concurrently(running, **arguments)


def drop_index_concurrently(
    name: str, *, table: str | None = None, schema: str | None = None, operations: Operations | None = None
) -> ChangeResult | None:
    """``op.drop_index_concurrently``, typed. See :meth:`DropIndexConcurrentlyOp.drop_index_concurrently`."""
    running, arguments = _running(locals())
    return DropIndexConcurrentlyOp.drop_index_concurrently(running, **arguments)
