"""backfill: batched, resumable online data migrations for PostgreSQL.

Change the data of a live table in many short transactions instead of one UPDATE that locks every row for minutes,
with a checkpoint in a control table so a crash, a deploy or a cron boundary never loses or repeats work::

    import backfill

    spec = backfill.BackfillSpec(
        name="events_fill_kind",
        table="events",
        values={"kind": "coalesce(payload->>'kind', 'unknown')"},
        where="kind IS NULL",
    )
    report = backfill.run_backfill("postgresql://app@db/app", spec, max_runtime=600)
    print(report.outcome, report.rows_updated)
"""

from __future__ import annotations

from backfill.api import (
    RevertReport,
    RunAllReport,
    TypeChangeError,
    backfill_status,
    batch_history,
    cancel_backfill,
    cancel_column_type_change,
    cleanup_column_type_change,
    delete_backfill,
    drop_backfill_trigger,
    finish_column_type_change,
    get_backfill,
    get_slices,
    held_slices,
    init_control_tables,
    list_backfills,
    pause_backfill,
    plan_backfill,
    preview_backfill,
    purge_backfill,
    register_backfill,
    resume_backfill,
    retry_backfill,
    revert_backfill,
    run_backfill,
    run_backfills,
    set_backfill_settings,
    start_column_type_change,
)
from backfill.errors import (
    BackfillBusyError,
    BackfillError,
    ConnectError,
    ControlTablesMissingError,
    ControlTablesOutdatedError,
    KeyChangedError,
    KeyRoundTripError,
    NotReversibleError,
    PlanError,
    PoolerError,
    SpecError,
    SpecMismatchError,
    StateTransitionError,
    UnknownBackfillError,
    UnknownRoleError,
    UntrustedControlTablesError,
)
from backfill.executor import BackfillFailedError, RunReport
from backfill.pg.health import PostgresHealth
from backfill.pg.preview import BatchPreview
from backfill.policies import (
    AdaptiveSize,
    CustomCheck,
    FixedSize,
    FixedSleep,
    LockWaiters,
    LongTransactions,
    MaxRowsPerSecond,
    ReplicaLag,
    RetryPolicy,
    RunContext,
    VacuumRunning,
    Wait,
)
from backfill.schema.check import add_check_constraint, drop_check_constraint, validate_check_constraint
from backfill.schema.constraint import ChangeResult, ViolationError
from backfill.schema.foreign_key import add_foreign_key, drop_foreign_key, validate_foreign_key
from backfill.schema.index import DuplicateKeyError, add_index_concurrently, drop_index_concurrently
from backfill.schema.notnull import (
    ConstraintError,
    LockUnavailableError,
    NullValuesError,
    add_not_null_constraint,
    drop_not_null_constraint,
    validate_not_null_constraint,
)
from backfill.schema.sequence import KeyHeadroom, key_headroom
from backfill.schema.type_change import TypeChangeResult
from backfill.settings import LIVE_SETTINGS, RunSettings, SettingsError
from backfill.spec import DEFAULT_BATCH_SIZE, BackfillSpec
from backfill.state import OperatorAction, RunOutcome, RunState
from backfill.status import BackfillStatus, LiveRunner
from backfill.store import BackfillRecord, BatchRecord, SliceRecord

__all__ = [
    "BackfillSpec",
    "BatchRecord",
    "LiveRunner",
    "LIVE_SETTINGS",
    "batch_history",
    "set_backfill_settings",
    "DEFAULT_BATCH_SIZE",
    "RunSettings",
    "RunReport",
    "RunOutcome",
    "OperatorAction",
    "RunState",
    "RunContext",
    "RetryPolicy",
    "Wait",
    "FixedSleep",
    "MaxRowsPerSecond",
    "ReplicaLag",
    "VacuumRunning",
    "CustomCheck",
    "LongTransactions",
    "LockWaiters",
    "FixedSize",
    "AdaptiveSize",
    "PostgresHealth",
    "BackfillRecord",
    "SliceRecord",
    "init_control_tables",
    "register_backfill",
    "run_backfill",
    "run_backfills",
    "RunAllReport",
    "plan_backfill",
    "get_backfill",
    "get_slices",
    "held_slices",
    "revert_backfill",
    "RevertReport",
    "purge_backfill",
    "list_backfills",
    "pause_backfill",
    "resume_backfill",
    "cancel_backfill",
    "retry_backfill",
    "delete_backfill",
    "drop_backfill_trigger",
    "backfill_status",
    "preview_backfill",
    "BackfillStatus",
    "BatchPreview",
    "add_not_null_constraint",
    "validate_not_null_constraint",
    "drop_not_null_constraint",
    "ConstraintError",
    "NullValuesError",
    "LockUnavailableError",
    "add_check_constraint",
    "validate_check_constraint",
    "drop_check_constraint",
    "add_foreign_key",
    "validate_foreign_key",
    "drop_foreign_key",
    "add_index_concurrently",
    "drop_index_concurrently",
    "ChangeResult",
    "ViolationError",
    "DuplicateKeyError",
    "key_headroom",
    "start_column_type_change",
    "finish_column_type_change",
    "cleanup_column_type_change",
    "cancel_column_type_change",
    "TypeChangeResult",
    "TypeChangeError",
    "KeyHeadroom",
    "BackfillError",
    "BackfillBusyError",
    "NotReversibleError",
    "BackfillFailedError",
    "SettingsError",
    "ConnectError",
    "PoolerError",
    "UnknownRoleError",
    "UntrustedControlTablesError",
    "KeyChangedError",
    "KeyRoundTripError",
    "ControlTablesMissingError",
    "ControlTablesOutdatedError",
    "PlanError",
    "SpecError",
    "SpecMismatchError",
    "StateTransitionError",
    "UnknownBackfillError",
]
