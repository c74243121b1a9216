"""What the ``op.`` helpers do, online (on the migration's connection) and offline (``alembic upgrade --sql``)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy
import structlog
from alembic.operations import Operations
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.sql.elements import ClauseElement

from backfill import api
from backfill.alembic import offline, ops
from backfill.alembic.ops import SQLText
from backfill.errors import BackfillError, ControlTablesMissingError, UnknownBackfillError
from backfill.executor import RunReport
from backfill.pg.borrowed import SQLAlchemySession
from backfill.pg.connect import Database
from backfill.plan import Target
from backfill.schema import check, constraint, ddl, foreign_key, index, sync, type_change
from backfill.schema import notnull as constraints
from backfill.settings import RunSettings
from backfill.spec import BackfillSpec, split_table
from backfill.state import RunOutcome, RunState
from backfill.status import BackfillStatus
from backfill.store import BackfillRecord

if TYPE_CHECKING:
    # Only for annotations: this module is imported while Alembic itself is still being imported (the plugin
    # entry point), when alembic.runtime.migration is not complete yet.
    from alembic.runtime.migration import MigrationContext

__all__ = ["MigrationContextError", "BackfillNotFinishedError"]

log = structlog.get_logger("backfill")


class MigrationContextError(BackfillError):
    """Raised when an op cannot run in this migration: the database is not PostgreSQL, or env.py runs the
    migrations inside a transaction of its own, which the op would have to commit."""


class BackfillNotFinishedError(BackfillError):
    """Raised by ``op.ensure_backfill_finished`` when the backfill has not finished and is not finished inline; the
    message names its progress and the CLI command that finishes it."""


# --- the migration's connection ------------------------------------------------------------------------------------


def _context(operations: Operations, what: str) -> MigrationContext:
    ctx = operations.get_context()
    if ctx.dialect.name != "postgresql":
        raise MigrationContextError(f"op.{what} needs PostgreSQL; this migration runs on {ctx.dialect.name}")
    return ctx


@contextlib.contextmanager
def _outside_transaction(ctx: MigrationContext, what: str) -> Iterator[sqlalchemy.Connection]:
    """Commit what the migration did so far and yield its connection in autocommit mode.

    Work on other connections (the backfill's batches) must not wait for the migration's uncommitted DDL: that
    would wait forever, since the migration waits for the work.
    """
    if getattr(ctx, "_in_external_transaction", False):
        raise MigrationContextError(
            f"op.{what} must commit the migration's work so far, but env.py runs the migrations inside a "
            "transaction of its own (connection.begin() around context.run_migrations()); let Alembic manage "
            "the transaction (context.begin_transaction()) instead"
        )
    if not ctx.as_sql and getattr(ctx, "_transaction", None) is None and ctx._in_connection_transaction():
        # Alembic would fail an assertion in autocommit_block(); and nothing would ever commit the migration.
        raise MigrationContextError(
            f"op.{what} must commit the migration's work so far, but env.py runs context.run_migrations() outside "
            "context.begin_transaction(), where nothing commits it; wrap it in `with context.begin_transaction():`"
        )
    _StampOnCommit.arm(ctx)
    with ctx.autocommit_block():
        assert ctx.connection is not None
        yield ctx.connection


class _StampOnCommit:
    """Commits a revision's version stamp as soon as Alembic writes it, once an op has committed part of that
    revision.

    With the env.py that ``alembic init`` writes, every pending revision runs in one transaction and each one's
    stamp is written into it after its upgrade() returns. An op that commits mid-revision (everything up to it)
    leaves the rest of the run in a new transaction: if a later revision failed, that rollback would take this
    revision's stamp with it but not its committed work, and every later upgrade would replay the revision on top
    of it (``DuplicateColumn``). Committing right after the stamp keeps work and stamp together; the revisions that
    follow stay all-or-nothing as env.py asked. Hooked in as an ``on_version_apply`` callback, which Alembic calls
    right after each stamp, inside the transaction.
    """

    def __init__(self) -> None:
        self.armed = False

    @classmethod
    def arm(cls, ctx: MigrationContext) -> None:
        if ctx.opts.get("transaction_per_migration"):
            return  # every revision commits with its stamp already
        hook = next((c for c in ctx.on_version_apply_callbacks if isinstance(c, cls)), None)
        if hook is None:
            hook = cls()
            ctx.on_version_apply_callbacks = (*ctx.on_version_apply_callbacks, hook)
        hook.armed = True

    def __call__(self, *, ctx: MigrationContext, **_: Any) -> None:
        if self.armed:
            self.armed = False
            with ctx.autocommit_block():
                pass  # entering commits the transaction holding the stamp; leaving begins the next one


def _output(ctx: MigrationContext, text: str) -> None:
    text = text.strip()
    # psql's meta-commands (\\gexec) and comments take no terminator.
    ctx.impl.static_output(
        text if text.startswith("--") or text.endswith("\\gexec") else text + ctx.impl.command_terminator
    )


_Result = TypeVar("_Result")


def _change(
    operations: Operations,
    operation: ops.Op[_Result],
    offline: Callable[[], Sequence[str]],
    online: Callable[[sqlalchemy.Connection], _Result],
) -> _Result | None:
    """Run ``operation`` outside the migration's transaction: online on the migration's connection, offline
    (``alembic upgrade --sql``) as the lines ``offline`` renders (None). Offline too the lines follow the
    migration's COMMIT and each statement commits on its own (psql's autocommit): an instant ACCESS EXCLUSIVE step
    does not keep its lock through a validating scan, and CONCURRENTLY refuses to run in a transaction block."""
    what = operation.op_name
    ctx = _context(operations, what)
    if ctx.as_sql:
        lines = offline()
        with _outside_transaction(ctx, what):
            for line in lines:
                _output(ctx, line)
        return None
    with _outside_transaction(ctx, what) as connection:
        return online(connection)


def _lock_retry(operation: ops._NotNullOp | ops._TableOp | ops.AddForeignKeyOp) -> constraints.LockRetry:
    return constraints.LockRetry(lock_timeout=operation.lock_timeout, budget_seconds=operation.lock_retry_seconds)


# --- op.backfill -------------------------------------------------------------------------------------------------


def _sql_text(value: SQLText) -> str:
    """An expression as the SQL that runs. SQLAlchemy expressions are compiled with their values inlined, for a
    dialect without ``%`` placeholders: a pyformat dialect would double every ``%`` (in ``'100% done'``, in the
    modulo operator), and nothing downstream undoes that."""
    if isinstance(value, ClauseElement):
        dialect = PGDialect(paramstyle="named")  # type: ignore[no-untyped-call]
        return str(value.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    return value


def _spec(operation: ops.BackfillOp) -> BackfillSpec:
    key = operation.key
    return BackfillSpec(
        name=operation.name,
        table=operation.table,
        values={column: _sql_text(expression) for column, expression in operation.values.items()},
        where=_sql_text(operation.where) if operation.where is not None else None,
        key=(key,) if isinstance(key, str) else key,
        batch_size=operation.batch_size,
        schema=operation.schema,
        keep_in_sync=operation.keep_in_sync,
        skip_unchanged=operation.skip_unchanged,
        reversible=operation.reversible,
    )


@Operations.implementation_for(ops.BackfillOp)
def backfill(operations: Operations, operation: ops.BackfillOp) -> RunReport | None:
    spec = _spec(operation)

    def online(connection: sqlalchemy.Connection) -> RunReport | None:
        if operation.defer:
            api.register_backfill(connection, spec, force=operation.force, control_schema=operation.control_schema)
            return None
        report = api.run_backfill(
            connection,
            spec,
            settings=operation.settings,
            force=operation.force,
            control_schema=operation.control_schema,
        )
        return _finished(report, Database.from_bind(connection), operation.control_schema)

    return _change(operations, operation, lambda: _render_backfill(spec, operation), online)


def _render_backfill(spec: BackfillSpec, operation: ops.BackfillOp) -> list[str]:
    if spec.reversible:
        raise MigrationContextError(_NOT_OFFLINE.format(what=f"op.backfill({spec.name!r}, reversible=True)"))
    settings = operation.settings or RunSettings()
    schema = spec.schema or "public"
    batch_size = settings.batch_size or spec.initial_batch_size
    script = offline.batched_script(spec, settings, control_schema=operation.control_schema)
    lines: list[str] = []
    if spec.keep_in_sync:
        target = Target(
            schema=schema,
            table=spec.table,
            key=spec.key or (),
            key_types=(),
            values=tuple(spec.values.items()),
            where=spec.where,
        )
        lines.append(f"-- backfill {spec.name}: keep_in_sync trigger, before the key range is fixed")
        lines += constraints.render_steps(sync.install_steps(target, spec.name), settings.lock_timeout)
    note = " (defer=True: run here inline; cut it out to run it separately)" if operation.defer else ""
    lines.append(
        f"-- backfill {spec.name}: {batch_size} rows per transaction, checkpoint in "
        f"{operation.control_schema}.backfill_slices: run again after an interruption to continue{note}"
    )
    lines.append(ddl.render(script))
    return lines


def _finished(report: RunReport, database: Database, control_schema: str) -> RunReport:
    report.raise_for_outcome()
    if report.outcome is not RunOutcome.FINISHED:
        raise BackfillNotFinishedError(
            f"backfill {report.name!r} did not finish ({report.outcome.value}: "
            f"{report.reason or report.state.value}); "
            + _how_to_finish(report.name, report.state, database, control_schema)
        )
    return report


def _how_to_finish(name: str, state: RunState, database: Database, control_schema: str) -> str:
    schema = f" --control-schema {control_schema}" if control_schema != api.DEFAULT_CONTROL_SCHEMA else ""
    run = f"backfill{schema} run {name}"
    if state is RunState.FAILED:
        command = f"backfill{schema} retry {name} && {run}"
    elif state is RunState.PAUSED:
        command = f"backfill{schema} resume {name} && {run}"
    elif state is RunState.CANCELLED:
        return "it was cancelled: register a new backfill under another name"
    else:
        command = run
    return f"finish it with `{command}` (--url / DATABASE_URL: {database.display}), then run the upgrade again"


# --- op.ensure_backfill_finished ---------------------------------------------------------------------------------


@Operations.implementation_for(ops.EnsureBackfillFinishedOp)
def ensure_backfill_finished(operations: Operations, operation: ops.EnsureBackfillFinishedOp) -> BackfillRecord | None:
    ctx = _context(operations, "ensure_backfill_finished")
    if ctx.as_sql:
        _output(ctx, ddl.render(offline.finished_gate(operation.name, operation.control_schema)))
        return None
    assert ctx.connection is not None
    database = Database.from_bind(ctx.connection)
    name, schema = operation.name, operation.control_schema
    try:
        record = api.get_backfill(database, name, control_schema=schema)
    except (UnknownBackfillError, ControlTablesMissingError):
        raise BackfillNotFinishedError(
            f"no backfill named {name!r} on {database.display}: the revision that registers it (op.backfill) "
            "has not run on this database"
        ) from None
    if record.state is RunState.SUCCEEDED:
        return record
    if not operation.finish or not record.state.runnable:
        raise _not_finished(record, database, schema)
    with _outside_transaction(ctx, "ensure_backfill_finished"):
        return _finish_here(database, operation, time.monotonic, time.sleep)


#: Seconds between two looks at a backfill other runners hold, and between two ``backfill_wait`` log lines.
_POLL_SECONDS = 1.0
_LOG_EVERY_SECONDS = 30.0


def _finish_here(
    database: Database,
    operation: ops.EnsureBackfillFinishedOp,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> BackfillRecord:
    """Work every slice no runner holds; while runners elsewhere hold the rest, wait for them (taking over any
    slice they let go) until the backfill succeeds or ``operation.timeout`` runs out."""
    name, schema = operation.name, operation.control_schema
    started = clock()
    logged: float | None = None
    while True:
        report = api.run_backfill(database, name, settings=operation.settings, control_schema=schema)
        if report.outcome not in (RunOutcome.BUSY, RunOutcome.WORK_LEFT) or report.reason == "stop requested":
            _finished(report, database, schema)
            return api.get_backfill(database, name, control_schema=schema)
        # Other runners hold what is left: wait until they finish it, or let a slice go for us to take.
        while True:
            record = api.get_backfill(database, name, control_schema=schema)
            if record.state is RunState.SUCCEEDED:
                return record
            if not record.state.runnable:
                raise _not_finished(record, database, schema)
            held = api.held_slices(database, name, control_schema=schema)
            waited = clock() - started
            if not held and (report.batches > 0 or waited < operation.timeout):
                if report.batches == 0:
                    sleep(_POLL_SECONDS)  # nothing was free a moment ago: no hot loop if that keeps happening
                break
            if waited >= operation.timeout:
                raise BackfillNotFinishedError(
                    f"backfill {name!r} is not finished after waiting {waited:.0f}s (timeout={operation.timeout:g}) "
                    f"for the runners that hold {len(held)} of its slices ({record.owner or 'owner unknown'}): "
                    f"{_progress(record)}; watch them with `backfill status {name}` (--url / DATABASE_URL: "
                    f"{database.display}) and run the upgrade again once it is finished, or give "
                    "op.ensure_backfill_finished a longer timeout="
                )
            if logged is None or clock() - logged >= _LOG_EVERY_SECONDS:
                logged = clock()
                log.info(
                    "backfill_wait",
                    backfill=name,
                    reason="other runners hold the remaining slices",
                    held_slices=len(held),
                    owners=record.owner,
                    rows_updated=record.rows_updated,
                    estimated_rows=record.estimated_rows,
                    waited_s=round(waited, 1),
                    timeout_s=operation.timeout,
                )
            sleep(_POLL_SECONDS)


def _not_finished(record: BackfillRecord, database: Database, schema: str) -> BackfillNotFinishedError:
    return BackfillNotFinishedError(
        f"backfill {record.name!r} is {record.state.value}: {_progress(record)}"
        + (f"; last error: {record.last_error}" if record.last_error else "")
        + f"; {_how_to_finish(record.name, record.state, database, schema)}"
    )


def _progress(record: BackfillRecord) -> str:
    done = f"{record.rows_updated:,} rows updated in {record.batches:,} batches"
    percent = BackfillStatus(record, ()).percent
    if percent is not None and record.estimated_rows:
        done += f" (~{percent:.0f}% of ~{record.estimated_rows:,} rows)"
    return done


# --- the NOT NULL ops --------------------------------------------------------------------------------------------


Planner = Callable[[constraints.ColumnState], constraints.NotNullPlan]


def _not_null(
    operations: Operations,
    operation: ops._NotNullOp,
    assumed: constraints.AssumedState,
    planner: Planner,
    validate_timeout: float | None = None,
) -> None:
    def render() -> list[str]:
        state = constraints.offline_state(operation.table, operation.column, schema=operation.schema, assumed=assumed)
        return constraints.render_steps(planner(state), operation.lock_timeout)

    def online(connection: sqlalchemy.Connection) -> None:
        session = SQLAlchemySession(connection)
        state = constraints.read_state(
            session, operation.table, operation.column, schema=operation.schema, name=operation.name
        )
        constraints.apply_steps(session, planner(state), _lock_retry(operation), validate_timeout=validate_timeout)

    _change(operations, operation, render, online)


@Operations.implementation_for(ops.AddNotNullConstraintOp)
def add_not_null_constraint(operations: Operations, operation: ops.AddNotNullConstraintOp) -> None:
    def planner(state: constraints.ColumnState) -> constraints.NotNullPlan:
        return constraints.plan_add(state, operation.name, validate=operation.validate)

    _not_null(operations, operation, constraints.AssumedState.NOTHING, planner, operation.validate_timeout)


@Operations.implementation_for(ops.ValidateNotNullConstraintOp)
def validate_not_null_constraint(operations: Operations, operation: ops.ValidateNotNullConstraintOp) -> None:
    def planner(state: constraints.ColumnState) -> constraints.NotNullPlan:
        return constraints.plan_validate(state, operation.name)

    _not_null(operations, operation, constraints.AssumedState.NOT_VALID, planner, operation.validate_timeout)


@Operations.implementation_for(ops.DropNotNullConstraintOp)
def drop_not_null_constraint(operations: Operations, operation: ops.DropNotNullConstraintOp) -> None:
    def planner(state: constraints.ColumnState) -> constraints.NotNullPlan:
        return constraints.plan_drop(state, operation.name)

    _not_null(operations, operation, constraints.AssumedState.ANY, planner)


# --- CHECK constraints and foreign keys ------------------------------------------------------------------------------


def _constraint_change(
    operations: Operations,
    operation: ops._TableOp | ops.AddForeignKeyOp,
    name: str,
    planner: constraint.Planner,
    existing: constraint.ConstraintKind | None,
) -> constraint.ChangeResult | None:
    """Plan and run a change of the constraint ``name``; offline, it is taken to be a NOT VALID constraint of
    kind ``existing`` (None: there is none yet)."""

    def render() -> list[str]:
        state = constraint.offline_constraint(operation.table, name, schema=operation.schema, existing=existing)
        return constraints.render_steps(planner(state, None).steps, operation.lock_timeout)

    def online(connection: sqlalchemy.Connection) -> constraint.ChangeResult:
        session = SQLAlchemySession(connection)
        retry = _lock_retry(operation)
        return constraint.change(session, operation.table, name, planner, schema=operation.schema, retry=retry)

    return _change(operations, operation, render, online)


@Operations.implementation_for(ops.AddCheckConstraintOp)
def add_check_constraint(operations: Operations, operation: ops.AddCheckConstraintOp) -> constraint.ChangeResult | None:
    planner = check.add_planner(_sql_text(operation.condition), validate=operation.validate)
    return _constraint_change(operations, operation, operation.name, planner, None)


@Operations.implementation_for(ops.AddForeignKeyOp)
def add_foreign_key(operations: Operations, operation: ops.AddForeignKeyOp) -> constraint.ChangeResult | None:
    key = foreign_key.foreign_key(
        operation.columns, operation.referent_table, operation.referent_columns, on_delete=operation.on_delete
    )
    planner = foreign_key.add_planner(key, validate=operation.validate)
    return _constraint_change(operations, operation, operation.constraint_name(), planner, None)


#: The kind of constraint each validate and drop op changes.
_KINDS: dict[type[ops._TableOp], constraint.ConstraintKind] = {
    ops.ValidateCheckConstraintOp: check.CHECK,
    ops.DropCheckConstraintOp: check.CHECK,
    ops.ValidateForeignKeyOp: foreign_key.FOREIGN_KEY,
    ops.DropForeignKeyOp: foreign_key.FOREIGN_KEY,
}


@Operations.implementation_for(ops.ValidateCheckConstraintOp)
@Operations.implementation_for(ops.ValidateForeignKeyOp)
def validate_constraint(operations: Operations, operation: ops._TableOp) -> constraint.ChangeResult | None:
    kind = _KINDS[type(operation)]
    return _constraint_change(operations, operation, operation.name, kind.plan_validate, kind)


@Operations.implementation_for(ops.DropCheckConstraintOp)
@Operations.implementation_for(ops.DropForeignKeyOp)
def drop_constraint(operations: Operations, operation: ops._TableOp) -> constraint.ChangeResult | None:
    kind = _KINDS[type(operation)]
    return _constraint_change(operations, operation, operation.name, kind.plan_drop, kind)


# --- indexes -------------------------------------------------------------------------------------------------------


def _watch(connection: sqlalchemy.Connection) -> Database:
    """Where an index build's waits are watched from: a connection of its own to the migration's database."""
    return Database.from_bind(connection, "backfill-ddl")


@Operations.implementation_for(ops.AddIndexConcurrentlyOp)
def add_index_concurrently(
    operations: Operations, operation: ops.AddIndexConcurrentlyOp
) -> constraint.ChangeResult | None:
    where = _sql_text(operation.where) if operation.where is not None else None
    options: dict[str, Any] = {"unique": operation.unique, "where": where, "using": operation.using}
    name = operation.index_name()

    def render() -> list[str]:
        state = index.offline_index(operation.table, name, schema=operation.schema)
        return index.render_index_plan(index.plan_add_index(state, operation.columns, if_not_exists=True, **options))

    def online(connection: sqlalchemy.Connection) -> constraint.ChangeResult:
        session = SQLAlchemySession(connection)
        state = index.read_index_of_table(session, operation.table, name, schema=operation.schema)
        plan = index.plan_add_index(state, operation.columns, **options)
        return index.apply_index_plan(session, plan, watch=_watch(connection))

    return _change(operations, operation, render, online)


@Operations.implementation_for(ops.DropIndexConcurrentlyOp)
def drop_index_concurrently(
    operations: Operations, operation: ops.DropIndexConcurrentlyOp
) -> constraint.ChangeResult | None:
    def render() -> list[str]:
        # Offline the index may or may not exist: DROP ... IF EXISTS covers both.
        state = index.offline_index(operation.table, operation.name, schema=operation.schema)
        return index.render_index_plan(index.plan_drop_index(dataclasses.replace(state, exists=True)))

    def online(connection: sqlalchemy.Connection) -> constraint.ChangeResult:
        session = SQLAlchemySession(connection)
        schema = operation.schema
        if schema is None and "." not in operation.name and operation.table is not None:
            _, schema, _ = constraints.find_table(session, operation.table, None)
        state = index.read_index(session, operation.name, schema=schema)
        return index.apply_index_plan(session, index.plan_drop_index(state), watch=_watch(connection))

    return _change(operations, operation, render, online)


# --- op.drop_backfill and op.drop_backfill_trigger -------------------------------------------------------------------


@Operations.implementation_for(ops.DropBackfillOp)
def drop_backfill(operations: Operations, operation: ops.DropBackfillOp) -> None:
    def online(connection: sqlalchemy.Connection) -> None:
        database = Database.from_bind(connection)
        try:
            api.delete_backfill(
                database, operation.name, force=operation.force, control_schema=operation.control_schema
            )
        except (UnknownBackfillError, ControlTablesMissingError):
            log.info("backfill_not_found", backfill=operation.name, action="drop_backfill")

    _change(operations, operation, lambda: _render_drop(operation.name, operation.control_schema, True), online)


#: Offline scripts keep no undo log (a reversible batch's statement needs the runner).
_NOT_OFFLINE = "{what} cannot run offline (--sql): a reversible backfill's undo log needs a live connection"


@Operations.implementation_for(ops.RevertBackfillOp)
def revert_backfill(operations: Operations, operation: ops.RevertBackfillOp) -> None:
    name, schema = operation.name, operation.control_schema

    def online(connection: sqlalchemy.Connection) -> None:
        database = Database.from_bind(connection)
        try:
            report = api.revert_backfill(database, name, settings=operation.settings, control_schema=schema)
        except (UnknownBackfillError, ControlTablesMissingError):
            log.info("backfill_not_found", backfill=name, action="revert_backfill")
            return
        _finished(report.run, database, schema)
        api.delete_backfill(database, name, control_schema=schema)

    def render() -> list[str]:
        raise MigrationContextError(_NOT_OFFLINE.format(what=f"op.revert_backfill({name!r})"))

    _change(operations, operation, render, online)


@Operations.implementation_for(ops.DropBackfillTriggerOp)
def drop_backfill_trigger(operations: Operations, operation: ops.DropBackfillTriggerOp) -> None:
    def online(connection: sqlalchemy.Connection) -> None:
        api.drop_backfill_trigger(
            Database.from_bind(connection),
            operation.name,
            lock_timeout=operation.lock_timeout,
            control_schema=operation.control_schema,
        )

    _change(operations, operation, lambda: _render_drop(operation.name, operation.control_schema, False), online)


def _render_drop(name: str, control_schema: str, delete: bool) -> list[str]:
    return [ddl.render(offline.drop_backfill(name, control_schema, delete=delete))]


# --- column type changes -------------------------------------------------------------------------------------------


def _type_text(value: ops.TypeText) -> str:
    """A type as SQL text: SQLAlchemy types compiled for PostgreSQL."""
    if isinstance(value, str):
        return value
    return str(value.compile(dialect=PGDialect()))  # type: ignore[no-untyped-call]


def _offline_type_change(operation: ops._TypeChangeOp, shadow: str = "") -> type_change.TypeChangeState:
    # Offline an unqualified table is taken to be in schema public, as op.backfill takes it.
    schema, table = split_table(operation.table, operation.schema)
    return type_change.offline_state(schema or "public", table, operation.column, shadow)


def _type_change(
    operations: Operations,
    operation: ops._TypeChangeOp,
    render: Callable[[], Sequence[str]],
    change: Callable[..., type_change.TypeChangeResult],
    *args: Any,
    **arguments: Any,
) -> type_change.TypeChangeResult | None:
    """Run a type change op: offline, the lines ``render`` gives; online, ``change`` (the API function of the op's
    name) on the migration's connection with the table, column, schema and lock settings every type change op has,
    then ``args`` and ``arguments``."""

    def online(connection: sqlalchemy.Connection) -> type_change.TypeChangeResult:
        return change(
            connection,
            operation.table,
            operation.column,
            *args,
            schema=operation.schema,
            lock_timeout=operation.lock_timeout,
            retry_seconds=operation.lock_retry_seconds,
            control_schema=operation.control_schema,
            **arguments,
        )

    return _change(operations, operation, render, online)


@Operations.implementation_for(ops.StartColumnTypeChangeOp)
def start_column_type_change(
    operations: Operations, operation: ops.StartColumnTypeChangeOp
) -> type_change.TypeChangeResult | None:
    new_type = _type_text(operation.new_type)
    using = _sql_text(operation.using) if operation.using is not None else None

    def render() -> list[str]:
        state = _offline_type_change(operation, type_change.shadow_name(operation.column, operation.name))
        expression = using or type_change.default_using(operation.column, new_type)
        steps = [
            type_change.add_shadow_column(state, new_type),
            *sync.install_steps(type_change.mirror_target(state, expression), state.backfill, mirror=True),
        ]
        copy = ops.BackfillOp(
            state.backfill,
            state.table,
            {state.shadow: expression},
            schema=state.schema,
            defer=operation.defer,
            settings=operation.settings,
            control_schema=operation.control_schema,
        )
        return [
            f"-- start_column_type_change {state.qualified}.{state.column}: shadow column {state.shadow} and the "
            "trigger that mirrors every write into it",
            *constraints.render_steps(steps, operation.lock_timeout),
            *_render_backfill(_spec(copy), copy),
        ]

    arguments = {"using": using, "name": operation.name, "defer": operation.defer, "settings": operation.settings}
    return _type_change(operations, operation, render, api.start_column_type_change, new_type, **arguments)


@Operations.implementation_for(ops.FinishColumnTypeChangeOp)
def finish_column_type_change(
    operations: Operations, operation: ops.FinishColumnTypeChangeOp
) -> type_change.TypeChangeResult | None:
    def render() -> list[str]:
        return offline.finish_type_change(
            _offline_type_change(operation), operation.control_schema, operation.lock_timeout
        )

    arguments = {"settings": operation.settings, "timeout": operation.timeout}
    return _type_change(operations, operation, render, api.finish_column_type_change, **arguments)


@Operations.implementation_for(ops.CleanupColumnTypeChangeOp)
def cleanup_column_type_change(
    operations: Operations, operation: ops.CleanupColumnTypeChangeOp
) -> type_change.TypeChangeResult | None:
    def render() -> list[str]:
        state = _offline_type_change(operation)
        return [ddl.render(offline.cleanup_type_change(state, operation.control_schema, operation.lock_timeout))]

    return _type_change(operations, operation, render, api.cleanup_column_type_change)


@Operations.implementation_for(ops.CancelColumnTypeChangeOp)
def cancel_column_type_change(
    operations: Operations, operation: ops.CancelColumnTypeChangeOp
) -> type_change.TypeChangeResult | None:
    def render() -> list[str]:
        state = _offline_type_change(operation, type_change.shadow_name(operation.column, operation.name))
        return [
            ddl.render(offline.cancel_guard(state)),
            *_render_drop(state.backfill, operation.control_schema, True),
            ddl.render(offline.drop_own_shadow(state, operation.lock_timeout)),
        ]

    return _type_change(operations, operation, render, api.cancel_column_type_change, name=operation.name)


@Operations.implementation_for(ops.UnfinishColumnTypeChangeOp)
def unfinish_column_type_change(
    operations: Operations, operation: ops.UnfinishColumnTypeChangeOp
) -> type_change.TypeChangeResult | None:
    def render() -> list[str]:
        raise MigrationContextError(
            f"op.unfinish_column_type_change({operation.table!r}, {operation.column!r}) cannot run offline (--sql): "
            "it runs online only (it copies rows back and plans its steps from the catalog)"
        )

    using = _sql_text(operation.using) if operation.using is not None else None
    change = api.unfinish_column_type_change
    return _type_change(operations, operation, render, change, using=using, settings=operation.settings)


@Operations.implementation_for(ops.RestoreColumnTypeChangeOp)
def restore_column_type_change(
    operations: Operations, operation: ops.RestoreColumnTypeChangeOp
) -> type_change.TypeChangeResult | None:
    old_type = _type_text(operation.old_type)

    def render() -> list[str]:
        state = type_change.undo_state(_offline_type_change(operation, type_change.shadow_name(operation.column)))
        return [
            f"-- restore_column_type_change {state.qualified}.{state.column}: {state.shadow} added back, empty",
            *constraints.render_steps([type_change.add_shadow_column(state, old_type)], operation.lock_timeout),
        ]

    return _type_change(operations, operation, render, api.restore_column_type_change, old_type)
