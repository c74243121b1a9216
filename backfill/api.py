"""The Python API: one plain function per thing an operator does. The CLI and the Alembic ops call these."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import structlog

from backfill.errors import SpecError
from backfill.executor import Executor, RunReport
from backfill.parallel import run_parallel
from backfill.pg.catalog import resolve
from backfill.pg.connect import Bind, Database
from backfill.pg.health import PostgresHealth
from backfill.pg.preview import BatchPreview, preview_next_batch
from backfill.pg.store import PostgresStore
from backfill.plan import Plan
from backfill.retrying import Timing
from backfill.settings import RunSettings
from backfill.spec import BackfillSpec
from backfill.state import OperatorAction
from backfill.status import BackfillStatus
from backfill.store import BackfillRecord, RunnerStore, SliceRecord

__all__ = [
    "init_control_tables",
    "register_backfill",
    "run_backfill",
    "get_backfill",
    "get_slices",
    "list_backfills",
    "plan_backfill",
    "pause_backfill",
    "resume_backfill",
    "cancel_backfill",
    "retry_backfill",
    "backfill_status",
    "preview_backfill",
]

DEFAULT_CONTROL_SCHEMA = "public"

log = structlog.get_logger("backfill")

T = TypeVar("T")


@contextlib.contextmanager
def open_store(
    bind: Bind, control_schema: str = DEFAULT_CONTROL_SCHEMA, application_name: str = "backfill"
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
    return PostgresHealth(lambda: postgres.conn, plan.target.schema, plan.target.table)


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
    with open_store(bind, control_schema) as store:
        plan = resolve(store.conn, spec)
        store.init()
        return store.register(plan, force=force)


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
            never inside the caller's transaction.
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
    for label, count in (("workers", workers), ("slices", slices if slices is not None else 1)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise SpecError(f"{label} must be a positive integer, got {count!r}")
    settings = settings or RunSettings()
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
        parts = max(workers, slices or 1)
        if parts > 1 and record.state.runnable:
            # Split once, before any worker starts, so no worker finds the whole range claimed by the splitter.
            step("start", lambda: store.start(record, plan))
            step("split", lambda: store.split(plan, record.id, parts))
        if workers == 1:
            executor = Executor(
                store, plan, record.name, settings, should_stop=should_stop, health=_health(store, plan)
            )
            return executor.run(max_runtime=max_runtime, max_batches=max_batches)
    return run_parallel(
        lambda: PostgresStore(database, control_schema),
        plan,
        record.name,
        settings,
        workers=workers,
        max_runtime=max_runtime,
        max_batches=max_batches,
        should_stop=should_stop,
        clock=time.monotonic,
        health_for=lambda store: _health(store, plan),
    )


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
    :class:`StateTransitionError` unless the backfill failed."""
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
        return [BackfillStatus(record, tuple(store.slices(record.id))) for record in records]


def preview_backfill(
    bind: Bind, name: str, *, batch_size: int | None = None, control_schema: str = DEFAULT_CONTROL_SCHEMA
) -> BatchPreview:
    """A dry run of the next batch of backfill ``name``: its SQL with values, its EXPLAIN, and the planner's
    estimate of the rows and batches left. Writes nothing.

    Raises:
        UnknownBackfillError, PlanError: no such backfill, or its spec no longer fits the table.
    """
    with open_store(bind, control_schema) as store:
        record = store.get(name)
        plan = resolve(store.conn, record.spec)
        size = batch_size or record.spec.initial_batch_size
        return preview_next_batch(store.conn, plan, record.name, record.state, store.slices(record.id), size)
