"""Alembic operations for safe online data migrations: ``op.backfill``, ``op.ensure_backfill_finished``,
``op.add_not_null_constraint``, ``op.validate_not_null_constraint`` and ``op.drop_not_null_constraint``.

Alembic >= 1.18 loads this module through the ``alembic.plugins`` entry point, so the ``op.`` names work without
touching env.py; with older Alembic, add ``import backfill.alembic`` to env.py. Type checkers do not see custom
``op.`` attributes: the functions below are the same operations, typed (``from backfill.alembic import backfill``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

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
    DEFAULT_LOCK_RETRY_SECONDS,
    DEFAULT_LOCK_TIMEOUT,
    AddNotNullConstraintOp,
    BackfillOp,
    DropNotNullConstraintOp,
    EnsureBackfillFinishedOp,
    SQLText,
    ValidateNotNullConstraintOp,
)
from backfill.alembic.toimpl import BackfillNotFinishedError, MigrationContextError  # noqa: E402

if TYPE_CHECKING:
    from backfill.executor import RunReport
    from backfill.settings import RunSettings
    from backfill.store import BackfillRecord

__all__ = [
    "backfill",
    "ensure_backfill_finished",
    "add_not_null_constraint",
    "validate_not_null_constraint",
    "drop_not_null_constraint",
    "BackfillOp",
    "EnsureBackfillFinishedOp",
    "AddNotNullConstraintOp",
    "ValidateNotNullConstraintOp",
    "DropNotNullConstraintOp",
    "MigrationContextError",
    "BackfillNotFinishedError",
    "setup",
]


def _operations(operations: Operations | None) -> Operations:
    if operations is not None:
        return operations
    from alembic import op

    # The Operations of the migration that is running (alembic.op is a proxy to it while one runs).
    running = getattr(op, "_proxy", None)
    if not isinstance(running, Operations):
        raise MigrationContextError(
            "no Alembic migration is running: call this from upgrade() or downgrade(), or pass operations="
        )
    return running


def backfill(
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
    operations: Operations | None = None,
) -> RunReport | None:
    """``op.backfill``, typed; ``operations`` defaults to the running migration's ``op``. See
    :meth:`BackfillOp.backfill`."""
    return BackfillOp.backfill(
        _operations(operations),
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


def ensure_backfill_finished(
    name: str,
    *,
    finish: bool = True,
    settings: RunSettings | None = None,
    control_schema: str = "public",
    operations: Operations | None = None,
) -> BackfillRecord | None:
    """``op.ensure_backfill_finished``, typed. See :meth:`EnsureBackfillFinishedOp.ensure_backfill_finished`."""
    return EnsureBackfillFinishedOp.ensure_backfill_finished(
        _operations(operations), name, finish=finish, settings=settings, control_schema=control_schema
    )


def add_not_null_constraint(
    table: str,
    column: str,
    *,
    schema: str | None = None,
    name: str | None = None,
    validate: bool = True,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS,
    operations: Operations | None = None,
) -> None:
    """``op.add_not_null_constraint``, typed. See :meth:`AddNotNullConstraintOp.add_not_null_constraint`."""
    AddNotNullConstraintOp.add_not_null_constraint(
        _operations(operations),
        table,
        column,
        schema=schema,
        name=name,
        validate=validate,
        lock_timeout=lock_timeout,
        lock_retry_seconds=lock_retry_seconds,
    )


def validate_not_null_constraint(
    table: str,
    column: str,
    *,
    schema: str | None = None,
    name: str | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    lock_retry_seconds: float = DEFAULT_LOCK_RETRY_SECONDS,
    operations: Operations | None = None,
) -> None:
    """``op.validate_not_null_constraint``, typed. See
    :meth:`ValidateNotNullConstraintOp.validate_not_null_constraint`."""
    ValidateNotNullConstraintOp.validate_not_null_constraint(
        _operations(operations),
        table,
        column,
        schema=schema,
        name=name,
        lock_timeout=lock_timeout,
        lock_retry_seconds=lock_retry_seconds,
    )


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
    DropNotNullConstraintOp.drop_not_null_constraint(
        _operations(operations),
        table,
        column,
        schema=schema,
        name=name,
        lock_timeout=lock_timeout,
        lock_retry_seconds=lock_retry_seconds,
    )
