"""The Python API: one plain function per thing an operator does. The CLI and the Alembic ops call these."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy
import structlog

from backfill.errors import (
    LOCK_ERRORS,
    BackfillBusyError,
    ControlTablesMissingError,
    NotReversibleError,
    PlanError,
    SpecError,
    UnknownBackfillError,
)
from backfill.executor import BackfillFailedError, Executor, RunReport
from backfill.parallel import run_parallel
from backfill.pg.borrowed import qualify
from backfill.pg.catalog import resolve
from backfill.pg.connect import Bind, Database
from backfill.pg.health import PostgresHealth
from backfill.pg.preview import BatchPreview, preview_next_batch
from backfill.pg.statements import undo_table
from backfill.pg.store import PostgresStore
from backfill.pg.walk import check_walk
from backfill.plan import Plan
from backfill.retrying import Timing
from backfill.schema import check, constraint, ddl, foreign_key, index, notnull, sync, type_change
from backfill.schema.notnull import (
    ConstraintError,
    DDLSession,
    LockRetry,
    LockUnavailableError,
    PsycopgSession,
    Step,
    StepAction,
    StepResult,
    find_table,
    lock_retry,
    named_by_caller,
    own_session,
    run_step,
    run_steps,
)
from backfill.schema.type_change import TypeChangeResult, TypeChangeState
from backfill.settings import LIVE_SETTINGS, RunSettings, SettingsError
from backfill.spec import MAX_BATCH_SIZE, REVERT_SUFFIX, BackfillSpec
from backfill.state import OperatorAction, RunOutcome, RunState
from backfill.status import BackfillStatus
from backfill.store import BackfillRecord, BatchRecord, RunnerStore, SliceRecord

if TYPE_CHECKING:
    from psycopg import sql

__all__ = [
    "init_control_tables",
    "register_backfill",
    "run_backfill",
    "run_backfills",
    "RunAllReport",
    "get_backfill",
    "get_slices",
    "list_backfills",
    "plan_backfill",
    "pause_backfill",
    "resume_backfill",
    "cancel_backfill",
    "retry_backfill",
    "backfill_status",
    "batch_history",
    "set_backfill_settings",
    "preview_backfill",
    "delete_backfill",
    "drop_backfill_trigger",
    "held_slices",
    "revert_backfill",
    "RevertReport",
    "purge_backfill",
    "TypeChangeError",
    "start_column_type_change",
    "finish_column_type_change",
    "cleanup_column_type_change",
    "cancel_column_type_change",
    "unfinish_column_type_change",
    "restore_column_type_change",
]

DEFAULT_CONTROL_SCHEMA = "public"


class TypeChangeError(ConstraintError):
    """Raised when a step of a column type change cannot run in the state the change is in (not started, not
    finished, swapped already, its copy not finished); the message says what state is left and what to run."""


log = structlog.get_logger("backfill")

T = TypeVar("T")

#: Each worker is a thread with a connection of its own: more than this is a typo, not a plan.
_MAX_WORKERS = 1_000
#: Slices are numbered with an integer and each costs a look-ahead to cut.
_MAX_SLICES = 100_000


@contextlib.contextmanager
def open_store(
    bind: Bind, control_schema: str = DEFAULT_CONTROL_SCHEMA, application_name: str | None = None
) -> Iterator[PostgresStore]:
    """A :class:`PostgresStore` on a connection of its own, closed on exit."""
    store = PostgresStore(Database.from_bind(bind, application_name), control_schema)
    try:
        yield store
    finally:
        store.close()


def _health(store: RunnerStore, plan: Plan) -> PostgresHealth | None:
    # Probes share the runner's connection: between batches it is idle, and no second session is opened.
    if not isinstance(store, PostgresStore):
        return None
    postgres = store
    # A revert walks the undo log but writes the backfill's table: that is the table to watch.
    watched = plan.target.reverts or plan.target
    return PostgresHealth(lambda: postgres.conn, watched.schema, watched.table)


def _named_by_caller(bind: Bind, spec: BackfillSpec) -> BackfillSpec:
    # An unqualified table means what the caller's own connection (its search_path) makes of it. Batches run on
    # connections of their own, where it may mean another table: resolve it here and pin the schema in the spec.
    if not isinstance(bind, sqlalchemy.Connection):
        return spec
    schema, table = qualify(bind, spec.table, spec.schema)
    return spec.with_changes(schema=schema, table=table)


def init_control_tables(
    bind: Bind, *, control_schema: str = DEFAULT_CONTROL_SCHEMA, grant: str | Sequence[str] = ()
) -> None:
    """Create the control tables in ``control_schema`` if they do not exist, and grant each role in ``grant``
    exactly what a runner needs on them (it still needs SELECT and UPDATE on the tables it backfills). Idempotent;
    access is revoked from PUBLIC. Tables that exist but were not made by backfill are refused, not adopted.

    Raises:
        ConnectError: the database cannot be reached.
        UntrustedControlTablesError: the tables exist with an owner, trigger, rule, policy or PUBLIC grant that
            backfill did not make (or that a role in ``grant`` would refuse).
        UnknownRoleError: a role in ``grant`` does not exist.
    """
    roles = [grant] if isinstance(grant, str) else list(grant)
    with open_store(bind, control_schema) as store:
        store.init(grant=roles)


def plan_backfill(bind: Bind, spec: BackfillSpec) -> Plan:
    """Check ``spec`` against the database and resolve its schema and key, writing nothing.

    Raises:
        PlanError: unknown table or column, no usable key, an expression or filter PostgreSQL rejects.
    """
    spec = _named_by_caller(bind, spec)
    database = Database.from_bind(bind)
    with database.connect() as conn:
        return resolve(conn, spec)


def register_backfill(
    bind: Bind, spec: BackfillSpec, *, force: bool = False, control_schema: str = DEFAULT_CONTROL_SCHEMA
) -> BackfillRecord:
    """Check ``spec`` and store it (state ``pending``) so any process can run it later; a no-op if the same spec
    is already registered under its name. Creates the control tables if needed.

    Raises:
        PlanError: the spec does not fit the database (nothing is written).
        SpecMismatchError: the name holds a different spec and ``force`` is false.
    """
    spec = _named_by_caller(bind, spec)
    with open_store(bind, control_schema) as store:
        plan = resolve(store.conn, spec)
        store.init()
        record = store.register(plan, force=force)
        _keep_in_sync(store, plan, record, refresh=True)
        return record


def _keep_in_sync(
    store: PostgresStore, plan: Plan, record: BackfillRecord, *, refresh: bool, lock_timeout: float | None = None
) -> None:
    """Install the keep_in_sync trigger of a backfill that has not finished, before its key range is fixed.

    On registration (``refresh``) the trigger function is rewritten from the spec; a run by name only puts back a
    trigger that is missing, so runs that poll (``ensure_backfill_finished``) write no catalog rows.
    """
    if not (plan.spec.keep_in_sync and record.state.runnable):
        return
    session = PsycopgSession(store.conn)
    target = plan.target
    if not refresh and sync.trigger_exists(session, target.schema, target.table, record.name):
        return
    retry = LockRetry() if lock_timeout is None else LockRetry(lock_timeout=lock_timeout)
    sync.install_sync_trigger(session, target, record.name, retry)


def run_backfill(
    bind: Bind,
    backfill: BackfillSpec | str,
    *,
    max_runtime: float | None = None,
    max_batches: int | None = None,
    settings: RunSettings | None = None,
    workers: int = 1,
    slices: int | None = None,
    force: bool = False,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
    should_stop: Callable[[], bool] | None = None,
) -> RunReport:
    """Run a backfill from its checkpoint until it finishes or a budget ends the run.

    Args:
        bind: the database (URL, SQLAlchemy URL, Engine or Connection). Batches run on connections of their own,
            never inside the caller's transaction; a Connection's search_path decides which table an unqualified
            name means (its schema is pinned in the stored spec; a temporary table is refused).
        backfill: a spec (registered first, or checked against the registered one), or the name of a registered
            backfill (its stored spec is used: no application code is needed to resume it).
        max_runtime: seconds after which no new batch starts.
        max_batches: batches after which the run stops (shared out between workers).
        settings: batch size, timeouts, throttles and retry policy for this run.
        workers: runners in this process, each on its own connection (one database core each).
        slices: split the backfill's unfinished key range into at least this many slices first (default:
            ``workers``), so that runners in other processes or on other machines find work too.
        force: replace a different stored spec of the same name.
        control_schema: where the control tables live.
        should_stop: polled between batches; True stops the run after the current batch.

    Returns:
        A :class:`RunReport`; its ``outcome`` says whether the backfill finished, has work left, is paused, is held
        by another runner, failed (the error is stored) or is cancelled.

    Raises:
        PlanError, SpecMismatchError, UnknownBackfillError, ConnectError: before any batch runs.
        SpecError: ``workers`` or ``slices`` is not a positive integer.
    """
    _check_counts(workers, slices)
    settings = settings or RunSettings()
    if isinstance(backfill, BackfillSpec):
        backfill = _named_by_caller(bind, backfill)
    database = Database.from_bind(bind, settings.application_name)
    with PostgresStore(database, control_schema) as store:
        store.conn  # noqa: B018 -- the first connection is not retried: a wrong URL or a server down fails now
        step = _stepper(settings)
        if isinstance(backfill, BackfillSpec):
            spec = backfill
            plan = step("resolve", lambda: resolve(store.conn, spec))
            step("init", store.init)
            record = step("register", lambda: store.register(plan, force=force))
        else:
            name = backfill
            record = step("get", lambda: store.get(name))
            plan = step("resolve", lambda: resolve(store.conn, record.spec))
            record = step("check key", lambda: store.check_key(record, plan))
        # Before the run fixes its upper key: from then on, rows the application writes are the trigger's job.
        refresh = isinstance(backfill, BackfillSpec)
        _keep_in_sync(store, plan, record, refresh=refresh, lock_timeout=settings.lock_timeout)
        run = _Run(database, control_schema, settings, workers, slices, should_stop, step)
        return run(store, record, plan, max_runtime, max_batches)


@dataclass(frozen=True)
class _Run:
    """How one process runs resolved backfills: shared by :func:`run_backfill` and :func:`run_backfills`."""

    database: Database
    control_schema: str
    settings: RunSettings
    workers: int
    slices: int | None
    should_stop: Callable[[], bool] | None
    step: Callable[[str, Callable[[], Any]], Any]

    def __call__(
        self,
        store: PostgresStore,
        record: BackfillRecord,
        plan: Plan | None,
        max_runtime: float | None,
        max_batches: int | None,
    ) -> RunReport:
        parts = max(self.workers, self.slices or 1)
        if plan is not None and parts > 1 and record.state.runnable:
            # Split once, before any worker starts, so no worker finds the whole range claimed by the splitter.
            self.step("start", lambda: store.start(record, plan))
            self.step("split", lambda: store.split(plan, record.id, parts))
        if self.workers == 1 or plan is None:
            executor = Executor(
                store,
                plan,
                record.name,
                self.settings,
                should_stop=self.should_stop,
                health=_health(store, plan) if plan is not None else None,
                check_walk=_walk_checker(store, plan),
            )
            return executor.run(max_runtime=max_runtime, max_batches=max_batches)
        resolved = plan
        return run_parallel(
            lambda: PostgresStore(self.database, self.control_schema),
            resolved,
            record.name,
            self.settings,
            workers=self.workers,
            max_runtime=max_runtime,
            max_batches=max_batches,
            should_stop=self.should_stop,
            clock=time.monotonic,
            health_for=lambda worker: _health(worker, resolved),
            check_walk_for=lambda worker: _walk_checker(worker, resolved),
        )


@dataclass(frozen=True)
class RunAllReport:
    """What :func:`run_backfills` did: one report per backfill it ran, in order, and the ones it did not reach."""

    reports: tuple[RunReport, ...]
    #: backfills not started: the time or batch budget was spent, or a stop was requested, before their turn
    not_run: tuple[str, ...] = ()
    #: the backfill whose running batch a KeyboardInterrupt (a second signal) rolled back, if any
    aborted: str | None = None


def run_backfills(
    bind: Bind,
    names: Sequence[str] | None = None,
    *,
    max_runtime: float | None = None,
    max_batches: int | None = None,
    settings: RunSettings | None = None,
    workers: int = 1,
    slices: int | None = None,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
    should_stop: Callable[[], bool] | None = None,
    on_start: Callable[[BackfillRecord, Plan | None], None] | None = None,
) -> RunAllReport:
    """Run registered backfills one after another under one time and batch budget (what ``backfill run`` does).

    A backfill that is broken (its table or a column was dropped, its index no longer serves the walk: its spec
    no longer resolves) is marked failed with the error stored, and the others still run. All of it runs on one
    connection (plus one per extra worker).

    Args:
        bind: the database.
        names: the backfills to run, in this order; None runs every pending or running backfill, oldest first.
        max_runtime: seconds after which no new batch starts, over all the backfills.
        max_batches: batches after which the whole run stops.
        settings, workers, slices, control_schema, should_stop: as for :func:`run_backfill`.
        on_start: called with each backfill's record and plan (None when it is not runnable) before it runs.

    Returns:
        A :class:`RunAllReport`. A ``KeyboardInterrupt`` (a second signal) aborts the running batch, which rolls
        back; the report names that backfill as ``aborted`` and the rest as not run.

    Raises:
        UnknownBackfillError: a named backfill does not exist (checked before any runs).
        ControlTablesMissingError, ConnectError: no control tables, or the database cannot be reached.
        SpecError: ``workers`` or ``slices`` is not a positive integer.
    """
    _check_counts(workers, slices)
    settings = settings or RunSettings()
    database = Database.from_bind(bind, settings.application_name)
    clock = time.monotonic
    started = clock()
    reports: list[RunReport] = []
    not_run: list[str] = []
    with PostgresStore(database, control_schema) as store:
        store.conn  # noqa: B018 -- the first connection is not retried: a wrong URL or a server down fails now
        step = _stepper(settings)
        if names is None:
            todo = [record.name for record in step("list", store.list_all) if record.state.runnable]
        else:
            todo = [step("get", functools.partial(store.get, name)).name for name in dict.fromkeys(names)]
        run = _Run(database, control_schema, settings, workers, slices, should_stop, step)
        for index, name in enumerate(todo):
            time_left = None if max_runtime is None else max_runtime - (clock() - started)
            batches_left = None if max_batches is None else max_batches - sum(r.batches for r in reports)
            stop = should_stop is not None and should_stop()
            if stop or (time_left is not None and time_left <= 0) or batches_left == 0:
                not_run.append(name)
                continue
            try:
                reports.append(_run_by_name(store, run, name, time_left, batches_left, on_start))
            except KeyboardInterrupt:
                # The second signal: psycopg has cancelled the running statement and the batch's transaction
                # rolled back, so the checkpoint still matches the data.
                log.warning("run_aborted", backfill=name, detail="second signal: the running batch was rolled back")
                return RunAllReport(tuple(reports), (*not_run, *todo[index + 1 :]), name)
    return RunAllReport(tuple(reports), tuple(not_run))


def _run_by_name(
    store: PostgresStore,
    run: _Run,
    name: str,
    max_runtime: float | None,
    max_batches: int | None,
    on_start: Callable[[BackfillRecord, Plan | None], None] | None,
) -> RunReport:
    record: BackfillRecord = run.step("get", functools.partial(store.get, name))
    plan: Plan | None = None
    if record.state.runnable:
        try:
            plan = run.step("resolve", lambda: resolve(store.conn, record.spec))
            resolved = plan
            record = run.step("check key", lambda: store.check_key(record, resolved))
        except PlanError as exc:
            message = str(exc)
            if isinstance(exc.__cause__, LOCK_ERRORS):
                # Its table is busy (a schema change holds or waits for it): nothing is wrong with the backfill,
                # and the next run tries again.
                log.warning("backfill_skipped", backfill=name, reason=message)
                return RunReport(name, RunOutcome.BUSY, record.state, reason=message)
            # This backfill no longer fits its table: it fails, with the reason stored for `status`; the others go on.
            run.step("fail", lambda: store.fail(record.id, message))
            log.error("backfill_failed", backfill=name, error=message, checkpoint_kept=True)
            return RunReport(name, RunOutcome.FAILED, RunState.FAILED, error=message)
    if plan is not None:
        _keep_in_sync(store, plan, record, refresh=False, lock_timeout=run.settings.lock_timeout)
    if on_start is not None:
        on_start(record, plan)
    return run(store, record, plan, max_runtime, max_batches)


def _check_counts(workers: int, slices: int | None) -> None:
    for label, count, most in (("workers", workers, _MAX_WORKERS), ("slices", slices or 1, _MAX_SLICES)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise SpecError(f"{label} must be a positive integer, got {count!r}")
        if count > most:
            raise SpecError(f"{label} must be at most {most:,}, got {count:,}")


def _walk_checker(store: RunnerStore, plan: Plan | None) -> Callable[[], None] | None:
    if not isinstance(store, PostgresStore) or plan is None or plan.target.reverts is not None:
        # A revert walks its undo log by the log's own primary key.
        return None
    postgres, target = store, plan.target
    return lambda: check_walk(postgres.conn, target)


def _stepper(settings: RunSettings) -> Callable[[str, Callable[[], T]], T]:
    """Runs a step of a run outside its batches (resolve, register, start, split) through the run's retry policy,
    so a lost connection or a server restart is ridden out there too."""
    policy, timing = settings.retry_policy(), Timing()

    def step(name: str, work: Callable[[], T]) -> T:
        return policy.call(name, work, timing, log)

    return step


def get_backfill(bind: Bind, name: str, *, control_schema: str = DEFAULT_CONTROL_SCHEMA) -> BackfillRecord:
    """The backfill ``name`` with its progress. Raises :class:`UnknownBackfillError` if there is none."""
    with open_store(bind, control_schema) as store:
        return store.get(name)


def get_slices(bind: Bind, name: str, *, control_schema: str = DEFAULT_CONTROL_SCHEMA) -> list[SliceRecord]:
    """The key ranges of backfill ``name`` with their checkpoints (empty before its first run)."""
    with open_store(bind, control_schema) as store:
        return store.slices(store.get(name).id)


def list_backfills(bind: Bind, *, control_schema: str = DEFAULT_CONTROL_SCHEMA) -> list[BackfillRecord]:
    """Every registered backfill, oldest first."""
    with open_store(bind, control_schema) as store:
        return store.list_all()


def _transition(bind: Bind, name: str, action: OperatorAction, control_schema: str) -> BackfillRecord:
    with open_store(bind, control_schema) as store:
        if action in (OperatorAction.RETRY, OperatorAction.RESUME):
            # Refuse now, not at the next run, when the table no longer fits the stored checkpoint.
            record = store.get(name)
            store.check_key(record, resolve(store.conn, record.spec))
        return store.transition(name, action)


def pause_backfill(bind: Bind, name: str, *, control_schema: str = DEFAULT_CONTROL_SCHEMA) -> BackfillRecord:
    """Pause: a runner working on it stops after its current batch; ``run`` leaves it alone until resumed.

    Raises:
        UnknownBackfillError, StateTransitionError: no such backfill, or it is not pending or running.
    """
    return _transition(bind, name, OperatorAction.PAUSE, control_schema)


def resume_backfill(bind: Bind, name: str, *, control_schema: str = DEFAULT_CONTROL_SCHEMA) -> BackfillRecord:
    """Undo a pause; the next ``run`` continues from the checkpoint. Raises :class:`StateTransitionError` unless
    the backfill is paused."""
    return _transition(bind, name, OperatorAction.RESUME, control_schema)


def cancel_backfill(bind: Bind, name: str, *, control_schema: str = DEFAULT_CONTROL_SCHEMA) -> BackfillRecord:
    """Stop a backfill for good (rows already updated stay updated). Raises :class:`StateTransitionError` if it
    has already succeeded or been cancelled."""
    return _transition(bind, name, OperatorAction.CANCEL, control_schema)


def retry_backfill(bind: Bind, name: str, *, control_schema: str = DEFAULT_CONTROL_SCHEMA) -> BackfillRecord:
    """Put a failed backfill back to pending; the next ``run`` continues from its checkpoint. Raises
    :class:`StateTransitionError` unless the backfill failed, :class:`PlanError` (:class:`KeyChangedError`) if its
    spec no longer fits the table or the key changed under its checkpoint."""
    return _transition(bind, name, OperatorAction.RETRY, control_schema)


def backfill_status(
    bind: Bind, name: str | None = None, *, control_schema: str = DEFAULT_CONTROL_SCHEMA
) -> list[BackfillStatus]:
    """Progress of backfill ``name``, or of every backfill (oldest first), with slices, rate and ETA.

    Raises:
        UnknownBackfillError: ``name`` is given and no backfill has it.
        ControlTablesMissingError: the control tables do not exist.
    """
    with open_store(bind, control_schema) as store:
        records = [store.get(name)] if name is not None else store.list_all()
        sizes = store.undo_sizes()
        statuses = []
        for record in records:
            recent = tuple(store.history(record.id, _STATUS_HISTORY))
            slices = tuple(store.slices(record.id))
            statuses.append(BackfillStatus(record, slices, sizes.get(record.id), recent, store.now()))
        return statuses


#: Batches ``status`` reads from the history: enough to cover its rate window at hundreds of batches per second.
_STATUS_HISTORY = 2_000


def batch_history(
    bind: Bind, name: str, *, limit: int = 500, control_schema: str = DEFAULT_CONTROL_SCHEMA
) -> list[BatchRecord]:
    """The latest ``limit`` batches of backfill ``name`` over all its slices, oldest first: when each finished
    (database time), its slice, rows, duration, batch size, retries, and the throttle wait before it with its
    reason. The history keeps the last ``HISTORY_PER_SLICE`` (500) batches of each slice.

    Raises:
        UnknownBackfillError: there is no such backfill.
        SpecError: ``limit`` is not a positive integer.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise SpecError(f"limit must be a positive integer, got {limit!r}")
    with open_store(bind, control_schema) as store:
        return store.history(store.get(name).id, limit)


def set_backfill_settings(
    bind: Bind,
    name: str,
    *,
    max_rows_per_second: float | None = None,
    sleep: float | None = None,
    target_batch_time: float | None = None,
    min_batch_size: int | None = None,
    max_batch_size: int | None = None,
    max_replica_lag: int | None = None,
    max_replica_lag_time: float | None = None,
    reset: bool = False,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
) -> BackfillRecord:
    """Change settings of backfill ``name`` on every live runner (any process, any machine) without restarting
    them: stored as overrides in the control tables, read by each runner with every batch and every few seconds
    while it waits, and applied on top of the settings it was started with (until ``reset``). A runner started
    later applies them from its first batch. ``status`` shows them.

    Args:
        max_rows_per_second: rate cap for the whole backfill (0: no cap).
        sleep: seconds between two batches of a runner.
        target_batch_time: seconds adaptive sizing aims each batch at (0: keep the batch size fixed).
        min_batch_size, max_batch_size: bounds of adaptive sizing.
        max_replica_lag, max_replica_lag_time: wait while a replica lags more bytes of WAL, or more seconds.
        reset: clear every override first (alone: back to each runner's own settings).

    Returns:
        The backfill's record, its ``overrides`` as now stored.

    Raises:
        SettingsError: no setting given (and no ``reset``), or a value out of range; nothing is stored.
        UnknownBackfillError: there is no such backfill.
    """
    given = {
        "max_rows_per_second": max_rows_per_second,
        "sleep": sleep,
        "target_batch_time": target_batch_time,
        "min_batch_size": min_batch_size,
        "max_batch_size": max_batch_size,
        "max_replica_lag": max_replica_lag,
        "max_replica_lag_time": max_replica_lag_time,
    }
    values = {key: value for key, value in given.items() if value is not None}
    assert set(values) <= set(LIVE_SETTINGS)
    if not values and not reset:
        raise SettingsError(f"nothing to set for backfill {name!r}: give a setting, or reset")
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise SettingsError(f"{key} must be a number >= 0, got {value!r}")
    with open_store(bind, control_schema) as store:
        current = {} if reset else dict(store.get(name).overrides)
        # Checked whole, as a runner will apply them (batch size bounds only against each other: each runner
        # applies them against its own).
        RunSettings(min_batch_size=1, max_batch_size=MAX_BATCH_SIZE).with_overrides({**current, **values})
        return store.set_overrides(name, values, reset=reset)


def preview_backfill(
    bind: Bind, name: str, *, batch_size: int | None = None, control_schema: str = DEFAULT_CONTROL_SCHEMA
) -> BatchPreview:
    """A dry run of the next batch of backfill ``name``: its SQL with values, its EXPLAIN, and the planner's
    estimate of the rows and batches left. Writes nothing.

    Raises:
        UnknownBackfillError, PlanError: no such backfill, its spec no longer fits the table, or it is a revert.
    """
    with open_store(bind, control_schema) as store:
        record = store.get(name)
        if record.spec.reverts is not None:
            original = name.removesuffix(REVERT_SUFFIX)
            raise PlanError(
                f"backfill {name!r} is the revert of {original!r}: its batches put back the undo log's values, "
                f"which a preview does not show; `backfill status {name}` shows its progress"
            )
        plan = resolve(store.conn, record.spec)
        size = batch_size or record.spec.initial_batch_size
        return preview_next_batch(store.conn, plan, record.name, record.state, store.slices(record.id), size)


def held_slices(bind: Bind, name: str, *, control_schema: str = DEFAULT_CONTROL_SCHEMA) -> list[int]:
    """The unfinished slices of backfill ``name`` that a live runner holds right now (empty: nobody is on it)."""
    with open_store(bind, control_schema) as store:
        return store.held_slices(store.get(name).id)


def delete_backfill(
    bind: Bind,
    name: str,
    *,
    force: bool = False,
    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
) -> BackfillRecord:
    """Forget backfill ``name``: drop its keep_in_sync trigger (if any) and delete its control rows, so that
    registering it again starts from scratch (e.g. after a downgrade dropped the column it filled). The data it
    changed stays as it is.

    Args:
        force: delete it even while a runner holds it (that runner then fails at its next batch).
        lock_timeout: how long dropping the trigger may wait for its lock per attempt (retried with backoff).

    Returns:
        The record as it was before the deletion.

    Raises:
        UnknownBackfillError: there is no such backfill.
        BackfillBusyError: a live runner holds it and ``force`` is false; nothing is changed.
        LockUnavailableError: the trigger could not be dropped (the table stayed locked); nothing is deleted.
    """
    with open_store(bind, control_schema) as store:
        record = store.get(name)
        held = store.held_slices(record.id)
        if held and not force:
            owners = {piece.owner for piece in store.slices(record.id) if piece.slice in held and piece.owner}
            raise BackfillBusyError(
                f"backfill {name!r} is being run right now ({len(held)} slice(s) held by "
                f"{', '.join(sorted(owners)) or 'a live runner'}): stop that runner first (`backfill pause {name}` "
                "stops it after its current batch), or delete it anyway with --force (force=True)"
            )
        spec = record.spec
        if spec.schema is not None and spec.reverts is None:
            session = PsycopgSession(store.conn)
            sync.drop_sync_trigger(session, spec.schema, spec.table, name, LockRetry(lock_timeout=lock_timeout))
        if spec.reversible:
            # Its revert walks the undo log that goes with it.
            with contextlib.suppress(UnknownBackfillError):
                store.delete(store.get(name + REVERT_SUFFIX).id)
        store.delete(record.id)
        return record


@dataclass(frozen=True)
class RevertReport:
    """What :func:`revert_backfill` did."""

    #: the revert's run (its ``name`` is the revert's: the backfill's name + ``:revert``); ``rows_updated`` counts
    #: the rows this run put back
    run: RunReport
    #: once the revert has finished: rows left as the application wrote them since the backfill changed them
    #: (their undo rows are marked ``kept`` in the undo log, until it is purged); None while work is left
    rows_kept: int | None = None

    @property
    def finished(self) -> bool:
        return self.run.finished


def _reversible(store: PostgresStore, name: str) -> BackfillRecord:
    record = store.get(name)
    if not record.spec.reversible:
        raise NotReversibleError(
            f"backfill {name!r} is not reversible: it keeps no undo log (register a backfill with reversible=True, "
            "CLI: add --reversible, to be able to revert it)"
        )
    if record.id not in store.undo_sizes():
        raise NotReversibleError(f"backfill {name!r} has no undo log any more: it was purged")
    return record


def revert_backfill(
    bind: Bind,
    name: str,
    *,
    max_runtime: float | None = None,
    max_batches: int | None = None,
    settings: RunSettings | None = None,
    workers: int = 1,
    slices: int | None = None,
    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
    should_stop: Callable[[], bool] | None = None,
) -> RevertReport:
    """Put back every value the reversible backfill ``name`` overwrote, batch by batch, from its undo log.

    The backfill is stopped for good first (cancelled, unless it had succeeded) and its keep_in_sync trigger
    dropped (it would fill the columns again). The revert is a backfill of its own, ``NAME:revert``, walking the
    undo log by key: resumable from its checkpoint (call again, or ``backfill run NAME:revert``), exactly once,
    under the same settings (throttles, retries, budgets, workers) as a run, and paused, resumed or cancelled by
    that name. A row whose columns no longer hold what the backfill wrote (the application changed it since) is
    left as it is and counted in ``rows_kept`` (its undo row is marked ``kept``). The undo log stays until
    :func:`purge_backfill` (or deleting the backfill) drops it.

    Args:
        bind, max_runtime, max_batches, settings, workers, slices, control_schema, should_stop: as for
            :func:`run_backfill`.
        lock_timeout: how long dropping the keep_in_sync trigger may wait for its lock per attempt.

    Returns:
        A :class:`RevertReport`.

    Raises:
        UnknownBackfillError: there is no such backfill.
        NotReversibleError: it keeps no undo log (not reversible, or purged).
        BackfillBusyError: a live runner is working on the backfill; nothing is changed.
    """
    _check_counts(workers, slices)
    with open_store(bind, control_schema) as store:
        record = _reversible(store, name)
        held = store.held_slices(record.id)
        if held:
            raise BackfillBusyError(
                f"backfill {name!r} is being run right now ({len(held)} slice(s) held): stop that runner first "
                f"(`backfill pause {name}` stops it after its current batch), then revert it"
            )
        spec = record.spec
        if spec.keep_in_sync and spec.schema is not None:
            session = PsycopgSession(store.conn)
            sync.drop_sync_trigger(session, spec.schema, spec.table, name, LockRetry(lock_timeout=lock_timeout))
        revert = spec.with_changes(
            name=name + REVERT_SUFFIX,
            where=None,
            skip_unchanged=False,
            keep_in_sync=False,
            reversible=False,
            reverts=(control_schema, undo_table(record.id)),
        )
        store.begin_revert(record, revert)
    report = run_backfill(
        bind,
        revert.name,
        max_runtime=max_runtime,
        max_batches=max_batches,
        settings=settings,
        workers=workers,
        slices=slices,
        control_schema=control_schema,
        should_stop=should_stop,
    )
    kept = None
    if report.finished:
        with open_store(bind, control_schema) as store:
            kept = store.kept_rows(record.id)
        log.info("revert_finished", backfill=name, rows_kept=kept)
    return RevertReport(report, kept)


def purge_backfill(bind: Bind, name: str, *, control_schema: str = DEFAULT_CONTROL_SCHEMA) -> int:
    """Drop the undo log of the reversible backfill ``name``, once the team is sure it stays: the backfill can no
    longer be reverted. Only a backfill that no run will continue (succeeded or cancelled), with no revert under
    way, can be purged.

    Returns:
        The bytes the undo log took.

    Raises:
        UnknownBackfillError: there is no such backfill.
        NotReversibleError: it keeps no undo log (not reversible, or purged already).
        StateTransitionError: the backfill or its revert may still run (nothing is dropped).
    """
    with open_store(bind, control_schema) as store:
        record = _reversible(store, name)
        return store.purge(record, name + REVERT_SUFFIX)


def drop_backfill_trigger(
    bind: Bind,
    name: str,
    *,
    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
) -> bool:
    """Drop the keep_in_sync trigger of backfill ``name`` and its function (once no code that does not know the
    column writes to the table any more). Idempotent: returns whether the trigger existed.

    Raises:
        UnknownBackfillError: there is no such backfill.
        LockUnavailableError: the table stayed locked for the whole retry budget.
    """
    with open_store(bind, control_schema) as store:
        spec = store.get(name).spec
        if spec.schema is None:
            return False
        session = PsycopgSession(store.conn)
        return sync.drop_sync_trigger(session, spec.schema, spec.table, name, LockRetry(lock_timeout=lock_timeout))


# --- column type changes -------------------------------------------------------------------------------------------

#: Seconds between two looks at a copy that runners elsewhere hold.
_COPY_POLL_SECONDS = 1.0


def _ddl_steps(
    session: DDLSession, steps: Sequence[Step], retry: LockRetry, state: TypeChangeState
) -> list[StepResult]:
    def run(step: Step) -> tuple[int, None]:
        return run_step(session, step, retry), None

    return run_steps(steps, run, lambda step, done, exc: exc, table=state.qualified, column=state.column)


def _type_change_record(
    bind: Bind, session: DDLSession, table: str, column: str, schema: str | None, control_schema: str
) -> tuple[BackfillRecord | None, str, str]:
    """The backfill record of the change of ``column`` (None: none was started), and the table's schema and name."""
    schema, table = named_by_caller(bind, table, schema)
    _, schema, table = find_table(session, table, schema)
    return _copy_record(bind, type_change.backfill_name(schema, table, column), control_schema), schema, table


def _read_change(
    bind: Bind,
    session: DDLSession,
    table: str,
    column: str,
    schema: str | None,
    control_schema: str,
    name: str | None = None,
) -> tuple[BackfillRecord | None, TypeChangeState]:
    """The change's record (None: never started, or cleaned up) and its state, the shadow column named by the
    record (or ``name``, or ``<column>_new``)."""
    record, schema, table = _type_change_record(bind, session, table, column, schema, control_schema)
    shadow = next(iter(record.spec.values)) if record is not None else type_change.shadow_name(column, name)
    return record, type_change.read_type_change(session, table, column, schema=schema, shadow=shadow)


def start_column_type_change(
    bind: Bind,
    table: str,
    column: str,
    new_type: str,
    *,
    using: str | None = None,
    name: str | None = None,
    defer: bool = False,
    schema: str | None = None,
    settings: RunSettings | None = None,
    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT,
    retry_seconds: float = ddl.DEFAULT_LOCK_RETRY_SECONDS,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
    sleep: Callable[[float], None] = time.sleep,
) -> TypeChangeResult:
    """Start changing ``column`` of ``table`` to ``new_type`` without rewriting the table under a lock.

    Adds a shadow column of the new type (``ADD COLUMN``: an instant of ACCESS EXCLUSIVE, no rewrite) and a mirror
    trigger that gives it ``using`` on every row the application inserts or updates, then copies the existing rows
    with a resumable backfill named ``type_change:<schema>.<table>.<column>`` (only rows whose shadow value differs
    are written). Idempotent: run again, it resumes the copy; after the swap it does nothing.

    Args:
        bind: the database (URL, SQLAlchemy URL, Engine or Connection: only its URL is used).
        table: the table, optionally ``schema.table``.
        column: the column to change.
        new_type: the new type, as SQL (``"bigint"``, ``"jsonb"``, ``"numeric(12, 2)"``).
        using: one SQL expression over the row giving the new value (default ``column::new_type``), e.g.
            ``"payload::jsonb"``.
        name: the shadow column's name (default ``<column>_new``).
        defer: only register the copy (state ``pending``) for ``backfill run`` or cron.
        schema: the table's schema; defaults to the search path.
        settings: the copy's :class:`RunSettings`.
        lock_timeout: seconds each ACCESS EXCLUSIVE step may wait for its lock per attempt.
        retry_seconds: how long to keep retrying such a step.
        control_schema: where the control tables live.
        sleep: injected for tests.

    Returns:
        A :class:`TypeChangeResult`: the DDL steps that ran and the copy's report (None when deferred).

    Raises:
        ConstraintError: no such table or column; a ``using`` PostgreSQL rejects; a generated column; a view or
            exclusion constraint on the column; a CHECK constraint or index of it that cannot hold on the new type
            (named; nothing is changed).
        LockUnavailableError: a lock could not be taken within ``retry_seconds``.
        BackfillFailedError: the copy failed (its error is stored; ``backfill retry`` then run again).
    """
    retry = lock_retry(lock_timeout, retry_seconds, sleep)
    with own_session(bind) as session:
        schema, table = named_by_caller(bind, table, schema)
        state = type_change.read_type_change(
            session, table, column, schema=schema, shadow=type_change.shadow_name(column, name)
        )
        if state.swapped and _copy_record(bind, state.backfill, control_schema) is not None:
            return TypeChangeResult()
        if state.shadow_info is not None and not type_change.owns_shadow(state):
            raise TypeChangeError(
                f"{state.qualified} already has a column {state.shadow!r} that no type change of "
                f"{state.column!r} made: pass name= another name for the new column (nothing was changed)"
            )
        using = using or type_change.default_using(column, new_type)
        steps: list[Step] = []
        if state.shadow_info is None:
            _check_change(session, state, new_type, using)
            steps.append(type_change.add_shadow_column(state, new_type))
            # A new shadow column needs a new copy: a record left by an earlier change of a column of that name
            # (its table dropped and made again, say) would report the copy done without copying a row.
            if _copy_record(bind, state.backfill, control_schema) is not None:
                delete_backfill(bind, state.backfill, lock_timeout=lock_timeout, control_schema=control_schema)
        # Before the copy fixes its key range: from then on, every row the application writes is the trigger's.
        if not sync.trigger_exists(session, state.schema, state.table, state.backfill):
            steps.extend(sync.install_steps(type_change.mirror_target(state, using), state.backfill, mirror=True))
        results = _ddl_steps(session, steps, retry, state)
    spec = _copy_spec(state, using)
    _retry_failed_copy(bind, state.backfill, control_schema)
    if defer:
        register_backfill(bind, spec, control_schema=control_schema)
        return TypeChangeResult(tuple(results))
    try:
        report = run_backfill(bind, spec, settings=settings, control_schema=control_schema).raise_for_outcome()
    except BackfillFailedError as exc:
        raise _copy_failed(state, exc) from None
    return TypeChangeResult(tuple(results), copy=report)


def _check_change(session: DDLSession, state: TypeChangeState, new_type: str, using: str) -> None:
    """Refuse, before anything is written, a change of ``state`` to ``new_type`` that cannot be made."""
    type_change.check_start(session, state, new_type)
    type_change.check_using(session, state, new_type, using)
    type_change.carried_over(session, state, new_type, "nothing was changed")


def _copy_spec(state: TypeChangeState, using: str) -> BackfillSpec:
    """The backfill that copies the rows into the shadow column: only rows whose shadow value differs are written."""
    return BackfillSpec(
        name=state.backfill, table=state.table, schema=state.schema, values={state.shadow: using}, skip_unchanged=True
    )


def _copy_record(bind: Bind, name: str, control_schema: str) -> BackfillRecord | None:
    try:
        return get_backfill(bind, name, control_schema=control_schema)
    except (UnknownBackfillError, ControlTablesMissingError):
        return None


def _retry_failed_copy(bind: Bind, name: str, control_schema: str) -> None:
    # Running start again is how an author says "I fixed the rows": a copy that failed on them is retried.
    record = _copy_record(bind, name, control_schema)
    if record is not None and record.state is RunState.FAILED:
        retry_backfill(bind, name, control_schema=control_schema)


def _copy_failed(state: TypeChangeState, exc: BackfillFailedError) -> TypeChangeError:
    return TypeChangeError(
        f"{exc}; the shadow column {state.shadow!r} of {state.qualified} and its trigger stay (the application's "
        "writes of values `using` cannot convert fail too): fix those rows and run start_column_type_change "
        "again, or undo it with cancel_column_type_change"
    )


def _finish_copy(
    bind: Bind,
    record: BackfillRecord,
    settings: RunSettings | None,
    control_schema: str,
    timeout: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> RunReport | None:
    """Run what is left of the copy here, waiting for runners elsewhere to finish their slices."""
    if record.state is RunState.SUCCEEDED:
        return None
    started = clock()
    while True:
        report = run_backfill(bind, record.name, settings=settings, control_schema=control_schema)
        report.raise_for_outcome()
        if report.outcome is RunOutcome.FINISHED:
            return report
        if report.outcome not in (RunOutcome.BUSY, RunOutcome.WORK_LEFT) or clock() - started >= timeout:
            raise TypeChangeError(
                f"the copy of the column type change ({record.name!r}) did not finish ({report.outcome.value}: "
                f"{report.reason or report.state.value}); nothing was swapped: finish it with `backfill run "
                f"{record.name}` and run this again"
            )
        if report.batches == 0:
            log.info("backfill_wait", backfill=record.name, reason="other runners hold the remaining slices")
            sleep(_COPY_POLL_SECONDS)


def finish_column_type_change(
    bind: Bind,
    table: str,
    column: str,
    *,
    schema: str | None = None,
    settings: RunSettings | None = None,
    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT,
    retry_seconds: float = ddl.DEFAULT_LOCK_RETRY_SECONDS,
    timeout: float = 3600.0,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
    sleep: Callable[[float], None] = time.sleep,
) -> TypeChangeResult:
    """Finish a change started by :func:`start_column_type_change`: the new column takes the old one's place.

    In order, each step its own transaction: the copy is finished here (or waited for, up to ``timeout`` seconds,
    while runners elsewhere hold it); NOT NULL is proven on the new column without an ACCESS EXCLUSIVE scan; the
    column's indexes are copied ``CONCURRENTLY`` (a unique copy for a primary key; operator classes, collations,
    sort order, ``INCLUDE``, expressions and predicates kept); its CHECK constraints and the foreign keys from and
    to it are copied ``NOT VALID`` then validated; then one short transaction (ACCESS EXCLUSIVE on the table and on the
    tables that reference it, catalog changes only) under ``lock_timeout`` with retries swaps everything: the
    default, sequence ownership (an integer sequence becomes ``AS bigint``) or identity move, the columns swap
    names (the old one becomes ``<column>_old``, nullable), the primary key is added ``USING INDEX``.

    Idempotent from the catalog: a call that died between two steps continues from there; after the swap it does
    nothing. Arguments as for :func:`start_column_type_change`.

    Raises:
        ConstraintError: no change of that column was started; a CHECK constraint or index that cannot hold on the
            new type (named, before any step); a step failed (the message says what is left).
        ViolationError: rows break a copied foreign key (one is named).
        DuplicateKeyError: a unique copy found duplicates.
        LockUnavailableError: the swap could not get its locks within ``retry_seconds`` (nothing was swapped).
    """
    retry = lock_retry(lock_timeout, retry_seconds, sleep)
    with own_session(bind) as session:
        record, schema, table = _type_change_record(bind, session, table, column, schema, control_schema)
        if record is None:
            raise TypeChangeError(
                f"no type change of {schema}.{table}.{column} was started (start_column_type_change), "
                "or it was cleaned up already"
            )
        (shadow, using), *_ = record.spec.values.items()
        state = type_change.read_type_change(session, table, column, schema=schema, shadow=shadow)
        if state.swapped:
            return TypeChangeResult()
        if state.shadow_info is None:
            raise TypeChangeError(
                f"the shadow column {shadow!r} of {state.qualified} is missing: run start_column_type_change again"
            )
    try:
        report = _finish_copy(bind, record, settings, control_schema, timeout, time.monotonic, sleep)
    except BackfillFailedError as exc:
        raise _copy_failed(state, exc) from None
    with own_session(bind) as session:
        results = _copies_and_swap(bind, session, state, retry, "finish")
    return TypeChangeResult(tuple(results), copy=report)


def _copies_and_swap(
    bind: Bind,
    session: DDLSession,
    state: TypeChangeState,
    retry: LockRetry,
    again: str,
    then: Sequence[sql.Composable] = (),
) -> list[StepResult]:
    """Everything of a finish after the copy, each step planned from the catalog: NOT NULL proven on the shadow
    column, the index and foreign key copies built, then the swap (``then`` run last in its transaction)."""
    assert state.shadow_info is not None
    # Before any step: a CHECK constraint or index that cannot hold on the new type stops here.
    carried = type_change.carried_over(
        session, state, None, f"nothing was swapped: drop or change it, then run {again} again"
    )
    checks = type_change.check_copies(carried)
    results: list[StepResult] = []
    if state.current.not_null:
        column_state = notnull.read_state(session, state.table, state.shadow, schema=state.schema, name=None)
        results += notnull.apply_steps(session, notnull.plan_add(column_state), retry)
    for item in checks:
        found = constraint.read_constraint(session, state.table, item.copy, schema=state.schema)
        check_plan = check.plan_add_check(found, item.condition, validate=item.validated)
        results += constraint.apply_plan(session, check_plan, retry).steps
    indexes = type_change.index_copies(session, state, carried)
    watch = Database.from_bind(bind, "backfill-ddl")
    for copy, plan in zip(indexes, type_change.index_plans(session, state, indexes), strict=True):
        if copy.note and plan.steps:
            log.warning("index_copy_changed", table=state.qualified, index=copy.name, note=copy.note)
        results += index.apply_index_plan(session, plan, watch=watch).steps
    keys = type_change.foreign_key_copies(session, state)
    for key in keys:
        found = constraint.read_constraint(session, key.table, key.copy, schema=key.schema)
        key_plan = foreign_key.plan_add_foreign_key(found, key.key, key.referent)
        results += constraint.apply_plan(session, key_plan, retry).steps
    statement = type_change.swap_statement(state, indexes, keys, state.shadow_info.type, checks, then)
    try:
        results += _ddl_steps(session, [Step(StepAction.SWAP, statement, True)], retry, state)
    except LockUnavailableError:
        tables = ", ".join(dict.fromkeys([state.qualified, *(k.qualified for k in keys)]))
        raise LockUnavailableError(
            f"the swap of {state.qualified}.{state.column} could not lock {tables} within {retry.budget_seconds:g}s "
            f"(attempts of {retry.lock_timeout:g}s): a long transaction holds a lock on one of them (see "
            f"pg_stat_activity); nothing was swapped, the copies are built and stay: run {again} again"
        ) from None
    return results


def cleanup_column_type_change(
    bind: Bind,
    table: str,
    column: str,
    *,
    schema: str | None = None,
    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT,
    retry_seconds: float = ddl.DEFAULT_LOCK_RETRY_SECONDS,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
    sleep: Callable[[float], None] = time.sleep,
) -> TypeChangeResult:
    """Drop the old column (``<column>_old``) of a finished type change, and forget its copy, once no
    application code reads the old column: ``DROP COLUMN``, an instant of ACCESS EXCLUSIVE under ``lock_timeout``
    with retries. Idempotent: nothing to do once done. Arguments as for :func:`start_column_type_change`.

    Raises:
        ConstraintError: the change is not finished (the old column is still the one in use).
        LockUnavailableError: the lock could not be taken within ``retry_seconds``.
    """
    retry = lock_retry(lock_timeout, retry_seconds, sleep)
    with own_session(bind) as session:
        record, state = _read_change(bind, session, table, column, schema, control_schema)
        if record is None and not type_change.owns_shadow(type_change.undo_state(state)):
            # Cleaned up already; only a column restore_column_type_change added is dropped without a record.
            return TypeChangeResult()
        if state.shadow_info is not None:
            raise TypeChangeError(
                f"the type change of {state.qualified}.{column} is not finished (the application still uses the old "
                "column): run finish_column_type_change first; nothing was dropped"
            )
        steps = [type_change.drop_retired_column(state)] if state.retired_info is not None else []
        results = _ddl_steps(session, steps, retry, state)
    if record is not None:
        delete_backfill(bind, record.name, force=True, lock_timeout=lock_timeout, control_schema=control_schema)
    return TypeChangeResult(tuple(results))


def cancel_column_type_change(
    bind: Bind,
    table: str,
    column: str,
    *,
    name: str | None = None,
    schema: str | None = None,
    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT,
    retry_seconds: float = ddl.DEFAULT_LOCK_RETRY_SECONDS,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
    sleep: Callable[[float], None] = time.sleep,
) -> TypeChangeResult:
    """Undo :func:`start_column_type_change` before the swap (its downgrade): drop the mirror trigger, the shadow
    column (with any index or foreign key copies a finish built on it) and the copy's record. Idempotent.

    Raises:
        ConstraintError: the columns were swapped already (the new column is in use: change it back with another
            type change).
        LockUnavailableError: a lock could not be taken within ``retry_seconds``.
    """
    retry = lock_retry(lock_timeout, retry_seconds, sleep)
    with own_session(bind) as session:
        record, state = _read_change(bind, session, table, column, schema, control_schema, name)
        if state.swapped:
            raise TypeChangeError(
                f"the type change of {state.qualified}.{column} was finished (the columns are swapped): cannot "
                "cancel it; change the column back with another type change"
            )
        steps = sync.drop_steps(state.schema, state.table, state.backfill)
        if type_change.owns_shadow(state):
            steps.append(type_change.drop_shadow_column(state))
        results = _ddl_steps(session, steps, retry, state)
    if record is not None:
        delete_backfill(bind, record.name, force=True, lock_timeout=lock_timeout, control_schema=control_schema)
    return TypeChangeResult(tuple(results))


def restore_column_type_change(
    bind: Bind,
    table: str,
    column: str,
    old_type: str,
    *,
    schema: str | None = None,
    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT,
    retry_seconds: float = ddl.DEFAULT_LOCK_RETRY_SECONDS,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
    sleep: Callable[[float], None] = time.sleep,
) -> TypeChangeResult:
    """Undo :func:`cleanup_column_type_change` (its downgrade): add ``<column>_old`` of ``old_type`` back, nullable
    and empty (``ADD COLUMN``: an instant of ACCESS EXCLUSIVE under ``lock_timeout`` with retries, no rewrite), so
    that :func:`unfinish_column_type_change` can copy the column back into it. Idempotent: nothing to do while
    ``<column>_old`` exists (cleanup has not run). Other arguments as for :func:`start_column_type_change`.

    Raises:
        ConstraintError: no such table or column; ``old_type`` is not a type the column converts to; the change
            is not finished (``<column>_new`` still exists: cancel it instead). Nothing is changed.
        LockUnavailableError: the lock could not be taken within ``retry_seconds``.
    """
    retry = lock_retry(lock_timeout, retry_seconds, sleep)
    with own_session(bind) as session:
        record, state = _read_change(bind, session, table, column, schema, control_schema)
        if state.retired_info is not None:
            return TypeChangeResult()
        if state.shadow_info is not None:
            raise TypeChangeError(
                f"the type change of {state.qualified}.{column} is not finished ({state.shadow!r} exists): nothing "
                "to restore; undo it with cancel_column_type_change (nothing was changed)"
            )
        undo = type_change.undo_state(state)
        _check_change(session, undo, old_type, type_change.default_using(column, old_type))
        results = _ddl_steps(session, [type_change.add_shadow_column(undo, old_type)], retry, undo)
    return TypeChangeResult(tuple(results))


def unfinish_column_type_change(
    bind: Bind,
    table: str,
    column: str,
    *,
    using: str | None = None,
    schema: str | None = None,
    settings: RunSettings | None = None,
    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT,
    retry_seconds: float = ddl.DEFAULT_LOCK_RETRY_SECONDS,
    control_schema: str = DEFAULT_CONTROL_SCHEMA,
    sleep: Callable[[float], None] = time.sleep,
) -> TypeChangeResult:
    """Undo :func:`finish_column_type_change` (its downgrade), online: ``column`` gets its old type back, with its
    indexes, constraints, foreign keys and default, sequence or identity, and ``<column>_new`` is the shadow
    column again, kept in sync by the change's trigger, as right after :func:`start_column_type_change`.

    It is a type change back, run by finish's own steps on the columns the other way round: a trigger mirrors every
    write of the column into ``<column>_old`` (``using``, default ``column::old_type``); a resumable backfill named
    ``type_change_undo:<schema>.<table>.<column>`` copies the rows (only those changed since the swap, or every
    row after :func:`restore_column_type_change`); NOT NULL is proven, the indexes are copied ``CONCURRENTLY``, the
    foreign keys ``NOT VALID`` then validated; then the swap back, one short transaction (ACCESS EXCLUSIVE on the
    table and the tables that reference it, catalog changes only, under ``lock_timeout`` with retries), which also
    puts an integer sequence back ``AS`` the old type and installs the change's trigger again.

    Refused before anything is written when the column or its sequence holds a value beyond the old integer type
    (the message names the row or the sequence). Idempotent from the catalog: a call that died between two steps
    continues from there; once undone it does nothing. Other arguments as for :func:`finish_column_type_change`.

    Raises:
        ConstraintError: no finished change of the column (after cleanup: run restore_column_type_change first);
            a value beyond the old type; a step failed (the message says what is left).
        BackfillFailedError: the copy back failed on a row (its trigger is dropped and its record deleted: the
            application's writes go on; fix the row and run this again).
        LockUnavailableError: a lock could not be taken within ``retry_seconds``.
    """
    retry = lock_retry(lock_timeout, retry_seconds, sleep)
    with own_session(bind) as session:
        record, state = _read_change(bind, session, table, column, schema, control_schema)
        undo = type_change.undo_state(state)
        if state.retired_info is None and type_change.owns_shadow(state):
            # Undone already (or never finished): the columns are as start left them.
            using_forward = _forward_using(record, state)
            _forget_undo(bind, state, using_forward, settings, lock_timeout, control_schema)
            return TypeChangeResult()
        if not state.swapped or (record is None and not type_change.owns_shadow(undo)):
            raise TypeChangeError(
                f"no finished type change of {state.qualified}.{column} to undo: finish_column_type_change has not "
                f"run, or cleanup_column_type_change dropped {state.retired!r} (restore_column_type_change adds it "
                "back); nothing was changed"
            )
        assert undo.shadow_info is not None
        old_type, using_forward = undo.shadow_info.type, _forward_using(record, state)
        using = using or type_change.default_using(column, old_type)
        steps: list[Step] = []
        # Before the copy fixes its key range: from then on, every row the application writes is the trigger's.
        if not sync.trigger_exists(session, state.schema, state.table, undo.backfill):
            _check_change(session, undo, old_type, using)
            if problem := type_change.out_of_range(session, state, old_type):
                raise TypeChangeError(
                    f"cannot change {state.qualified}.{column} back to {old_type}: {problem} (nothing was changed)"
                )
            # A copy made while no trigger mirrored the writes is stale: it starts again.
            if _copy_record(bind, undo.backfill, control_schema) is not None:
                delete_backfill(
                    bind, undo.backfill, force=True, lock_timeout=lock_timeout, control_schema=control_schema
                )
            steps.extend(sync.install_steps(type_change.mirror_target(undo, using), undo.backfill, mirror=True))
        results = _ddl_steps(session, steps, retry, undo)
    spec = _copy_spec(undo, using)
    try:
        report = run_backfill(bind, spec, settings=settings, control_schema=control_schema).raise_for_outcome()
    except BackfillFailedError as exc:
        # Leave no trigger that fails the application's writes of such values, and no copy to resume: the rows
        # written while no trigger ran would be missed.
        delete_backfill(bind, undo.backfill, force=True, lock_timeout=lock_timeout, control_schema=control_schema)
        raise TypeChangeError(
            f"{exc}; nothing was swapped, the copy back and its trigger were dropped ({undo.shadow!r} stays): "
            "fix those rows and run unfinish_column_type_change again"
        ) from None
    with own_session(bind) as session:
        then = type_change.mirror_statements(state, using_forward)
        results += _copies_and_swap(bind, session, undo, retry, "unfinish", then)
    _forget_undo(bind, state, using_forward, settings, lock_timeout, control_schema)
    return TypeChangeResult(tuple(results), copy=report)


def _forward_using(record: BackfillRecord | None, state: TypeChangeState) -> str:
    """The expression the change's trigger gives its shadow column: its record's, or (its record deleted by cleanup)
    the default cast to the type of the column of the new type."""
    if record is not None:
        return next(iter(record.spec.values.values()))
    new = state.current if state.swapped else state.shadow_info
    assert new is not None
    return type_change.default_using(state.column, new.type)


def _forget_undo(
    bind: Bind,
    state: TypeChangeState,
    using: str,
    settings: RunSettings | None,
    lock_timeout: float,
    control_schema: str,
) -> None:
    """After the swap back: the change's own copy is recorded (done: the trigger keeps its column in sync), and
    the copy back is forgotten."""
    if _copy_record(bind, state.backfill, control_schema) is None:
        # Deleted by cleanup: registered again and run over rows that hold their values already (writes none).
        run_backfill(
            bind, _copy_spec(state, using), settings=settings, control_schema=control_schema
        ).raise_for_outcome()
    undo = type_change.undo_name(state.schema, state.table, state.column)
    if _copy_record(bind, undo, control_schema) is not None:
        delete_backfill(bind, undo, force=True, lock_timeout=lock_timeout, control_schema=control_schema)
