"""Alembic operations for safe online data migrations: ``op.backfill``, ``op.ensure_backfill_finished``,
``op.drop_backfill``, ``op.revert_backfill``, ``op.drop_backfill_trigger``, ``op.add_not_null_constraint``,
``op.validate_not_null_constraint`` and ``op.drop_not_null_constraint``; ``op.add_check_constraint``,
``op.validate_check_constraint``, ``op.drop_check_constraint``; ``op.add_foreign_key``, ``op.validate_foreign_key``,
``op.drop_foreign_key``; ``op.add_index_concurrently`` and ``op.drop_index_concurrently``;
``op.start_column_type_change``, ``op.finish_column_type_change``, ``op.cleanup_column_type_change`` and
``op.cancel_column_type_change``, and the downgrades of finish and cleanup, ``op.unfinish_column_type_change`` and
``op.restore_column_type_change``.

Alembic >= 1.18 loads this module through the ``alembic.plugins`` entry point, so the ``op.`` names work without
touching env.py; with older Alembic, add ``import backfill.alembic`` to env.py. Type checkers do not see custom
``op.`` attributes: the functions below are the same operations, typed (``from backfill.alembic import backfill``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

if TYPE_CHECKING:
    from alembic.runtime.plugins import Plugin


def setup(plugin: Plugin) -> None:
    """Alembic's plugin hook. The ops register themselves when this package is imported; nothing else to do.

    Defined before anything imports Alembic: importing Alembic loads its plugins, which may call this while this
    package is still being imported.
    """
    del plugin


from alembic.operations import Operations  # noqa: E402

from backfill.alembic import ops  # noqa: E402
from backfill.alembic import toimpl as _toimpl  # noqa: E402,F401 -- registers the implementations
from backfill.alembic.ops import *  # noqa: E402,F403 -- the op classes, re-exported
from backfill.alembic.ops import Op  # noqa: E402
from backfill.alembic.toimpl import BackfillNotFinishedError, MigrationContextError  # noqa: E402

__all__ = [
    "backfill",
    "ensure_backfill_finished",
    "drop_backfill",
    "revert_backfill",
    "drop_backfill_trigger",
    "add_not_null_constraint",
    "validate_not_null_constraint",
    "drop_not_null_constraint",
    "add_check_constraint",
    "validate_check_constraint",
    "drop_check_constraint",
    "add_foreign_key",
    "validate_foreign_key",
    "drop_foreign_key",
    "add_index_concurrently",
    "drop_index_concurrently",
    "start_column_type_change",
    "cancel_column_type_change",
    "finish_column_type_change",
    "unfinish_column_type_change",
    "cleanup_column_type_change",
    "restore_column_type_change",
    "MigrationContextError",
    "BackfillNotFinishedError",
    "setup",
]
__all__ += ops.__all__


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _running(operations: Operations | None) -> Operations:
    """The Operations a typed function runs in: the one given, or the running migration's."""
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


def _typed(op_class: Callable[_P, Op[_R]]) -> Callable[_P, _R]:
    """``op.<name>`` as a typed function: the op class's own signature (its fields, and ``operations``), its result
    type and its docstring."""
    cls = cast("type[Op[Any]]", op_class)

    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        operations = _running(cast("Operations | None", kwargs.pop("operations", None)))
        return cast("_R", operations.invoke(op_class(*args, **kwargs)))

    parameters = [*cls.arguments(), inspect.Parameter("operations", inspect.Parameter.KEYWORD_ONLY, default=None)]
    call.__name__ = call.__qualname__ = cls.op_name
    call.__doc__ = (
        f"``op.{cls.op_name}``, typed; ``operations`` defaults to the running migration's ``op``.\n\n"
        + inspect.cleandoc(cls.__doc__ or "")
    )
    call.__signature__ = inspect.Signature(parameters, return_annotation=cls.result_type())  # type: ignore[attr-defined]
    return call


backfill = _typed(ops.BackfillOp)
ensure_backfill_finished = _typed(ops.EnsureBackfillFinishedOp)
drop_backfill = _typed(ops.DropBackfillOp)
revert_backfill = _typed(ops.RevertBackfillOp)
drop_backfill_trigger = _typed(ops.DropBackfillTriggerOp)
add_not_null_constraint = _typed(ops.AddNotNullConstraintOp)
validate_not_null_constraint = _typed(ops.ValidateNotNullConstraintOp)
drop_not_null_constraint = _typed(ops.DropNotNullConstraintOp)
add_check_constraint = _typed(ops.AddCheckConstraintOp)
validate_check_constraint = _typed(ops.ValidateCheckConstraintOp)
drop_check_constraint = _typed(ops.DropCheckConstraintOp)
add_foreign_key = _typed(ops.AddForeignKeyOp)
validate_foreign_key = _typed(ops.ValidateForeignKeyOp)
drop_foreign_key = _typed(ops.DropForeignKeyOp)
add_index_concurrently = _typed(ops.AddIndexConcurrentlyOp)
drop_index_concurrently = _typed(ops.DropIndexConcurrentlyOp)
start_column_type_change = _typed(ops.StartColumnTypeChangeOp)
finish_column_type_change = _typed(ops.FinishColumnTypeChangeOp)
cleanup_column_type_change = _typed(ops.CleanupColumnTypeChangeOp)
cancel_column_type_change = _typed(ops.CancelColumnTypeChangeOp)
unfinish_column_type_change = _typed(ops.UnfinishColumnTypeChangeOp)
restore_column_type_change = _typed(ops.RestoreColumnTypeChangeOp)
