"""NOT NULL on a live table without an ACCESS EXCLUSIVE table scan, as plain functions and as a step planner.

``ALTER TABLE ... ALTER COLUMN ... SET NOT NULL`` scans the whole table while it holds ACCESS EXCLUSIVE: every read
and write of the application waits for the scan. Instead:

* PostgreSQL 18+: ``ADD CONSTRAINT name NOT NULL col NOT VALID`` (an instant), then ``VALIDATE CONSTRAINT`` (the
  scan, under SHARE UPDATE EXCLUSIVE, which blocks neither reads nor writes).
* PostgreSQL 12-17: ``ADD CONSTRAINT name CHECK (col IS NOT NULL) NOT VALID``, ``VALIDATE CONSTRAINT``, then
  ``SET NOT NULL``, which skips its scan because the valid CHECK proves there is no NULL, then drop the CHECK.

Every step is its own statement in its own transaction. Steps that need ACCESS EXCLUSIVE run with a short
``lock_timeout`` and are retried with backoff: queued behind a long query, a waiting ALTER TABLE would otherwise
block every later reader and writer of the table for as long as it waits.

The steps are planned from the catalog (:func:`plan_add`, :func:`plan_validate`, :func:`plan_drop`), so a change
that died between two steps resumes where it stopped. One plan is run three ways: by :func:`apply_steps` on a
connection of our own (the plain functions below), on Alembic's connection (``backfill.alembic``), or rendered as
SQL for ``alembic upgrade --sql``.
"""

from __future__ import annotations

import contextlib
import enum
import random as _random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
import sqlalchemy
import structlog
import tenacity
from psycopg import sql

from backfill.errors import LOCK_ERRORS, VIOLATION_ERRORS, BackfillError, database_error, database_error_class, describe
from backfill.pg import statements
from backfill.pg.borrowed import qualify
from backfill.pg.connect import Bind, Database
from backfill.retrying import ExponentialBackoff, StopAfterBudget, retrying
from backfill.schema import ddl
from backfill.spec import split_table

__all__ = [
    "ConstraintError",
    "NullValuesError",
    "LockUnavailableError",
    "LockRetry",
    "AssumedState",
    "StepAction",
    "Step",
    "StepResult",
    "TableName",
    "ColumnState",
    "NotNullPlan",
    "DDLSession",
    "PsycopgSession",
    "column_names",
    "find_table",
    "named_by_caller",
    "read_state",
    "offline_state",
    "plan_add",
    "plan_validate",
    "plan_drop",
    "apply_steps",
    "run_step",
    "run_steps",
    "render_steps",
    "add_not_null_constraint",
    "validate_not_null_constraint",
    "drop_not_null_constraint",
]

log = structlog.get_logger("backfill")

#: First PostgreSQL release with NOT VALID not-null constraints.
PG18 = 180_000

Params = Sequence[Any] | Mapping[str, Any]
#: A statement psycopg can run.
Query = sql.SQL | sql.Composed


class ConstraintError(BackfillError):
    """Raised when an online schema change (NOT NULL, CHECK, foreign key, index) cannot be made: unknown table,
    column, constraint or index, nothing to validate, a statement PostgreSQL rejects, or an op used where it cannot
    run (not PostgreSQL, or inside a transaction it may not commit). The message says what was left behind."""


class NullValuesError(ConstraintError):
    """Raised when the column still has NULLs, so the constraint cannot be validated. Anything the failing call
    added is dropped again; ``null_rows`` says how many rows are NULL."""

    def __init__(self, message: str, *, table: str, column: str, null_rows: int) -> None:
        super().__init__(message)
        self.table = table
        self.column = column
        self.null_rows = null_rows


class LockUnavailableError(ConstraintError):
    """Raised when a step that needs ACCESS EXCLUSIVE could not get it within the retry budget (some long
    transaction keeps the table locked). Nothing is left waiting; the steps done so far stay done."""


@dataclass(frozen=True)
class LockRetry:
    """How steps that need ACCESS EXCLUSIVE wait for it.

    Args:
        lock_timeout: seconds one attempt may wait for the lock; also the longest time the application's queries
            can queue behind the waiting step.
        budget_seconds: how long to keep trying before :class:`LockUnavailableError`.
        initial_wait, max_wait: exponential backoff between attempts (with up to ``initial_wait / 2`` of jitter).
        sleep, clock, random: injected time and jitter, so tests count waits instead of sleeping.
    """

    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT
    budget_seconds: float = ddl.DEFAULT_LOCK_RETRY_SECONDS
    initial_wait: float = 0.5
    max_wait: float = 15.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    random: Callable[[], float] = _random.random


class AssumedState(enum.Enum):
    """Offline (no catalog to read), what a NOT NULL op assumes it starts from."""

    #: nothing yet: before ``add_not_null_constraint``
    NOTHING = "nothing"
    #: a NOT VALID CHECK from an earlier ``add_not_null_constraint(validate=False)``
    NOT_VALID = "not_valid"
    #: anything: before a drop (a CHECK may be left and the column may be NOT NULL)
    ANY = "any"


class StepAction(str, enum.Enum):
    """What one step of an online schema change does: ``StepResult.action`` and the ``action`` of its ``ddl_step``
    log line. A ``str``, so it compares equal to (and prints as) its value."""

    #: ``ADD CONSTRAINT ... NOT VALID`` (NOT NULL, CHECK, foreign key)
    ADD = "add"
    #: ``VALIDATE CONSTRAINT``: the scan that blocks neither reads nor writes
    VALIDATE = "validate"
    #: ``SET NOT NULL``, proved without a scan by a valid CHECK (PostgreSQL 12-17)
    SET_NOT_NULL = "set_not_null"
    #: dropping the CHECK of the PostgreSQL 12-17 NOT NULL path
    DROP_CHECK = "drop_check"
    DROP_NOT_NULL = "drop_not_null"
    #: ``DROP CONSTRAINT IF EXISTS`` (CHECK, foreign key)
    DROP = "drop"
    CREATE_INDEX = "create_index"
    #: an INVALID index a failed or killed build left, dropped before building it again
    DROP_INVALID_INDEX = "drop_invalid_index"
    DROP_INDEX = "drop_index"
    CREATE_SYNC_FUNCTION = "create_sync_function"
    CREATE_SYNC_TRIGGER = "create_sync_trigger"
    DROP_SYNC_TRIGGER = "drop_sync_trigger"
    DROP_SYNC_FUNCTION = "drop_sync_function"
    #: a column type change's new column, filled by a backfill before the swap
    ADD_SHADOW_COLUMN = "add_shadow_column"
    #: the column a finished type change renamed aside
    DROP_OLD_COLUMN = "drop_old_column"
    #: the new column of a type change that was cancelled
    DROP_SHADOW_COLUMN = "drop_shadow_column"
    #: a type change's swap: one short transaction that puts the new column in the old one's place
    SWAP = "swap"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Step:
    """One statement of an online schema change."""

    action: StepAction
    statement: sql.Composed
    #: needs ACCESS EXCLUSIVE: runs with a short lock_timeout and is retried
    exclusive: bool


@dataclass(frozen=True)
class StepResult:
    """A step that ran: how many attempts it took, and for ``set_not_null`` whether the server reported that the
    valid CHECK proved the column has no NULL (so it skipped the scan); None when that could not be observed."""

    action: StepAction
    sql: str
    attempts: int
    seconds: float
    proved_by_check: bool | None = None


class InTable:
    """What names a table by ``schema`` and ``table``: the table as one SQL identifier (:attr:`relation`) and as
    text (:attr:`qualified`). ``schema`` is None only offline, for an unqualified name: the search path decides
    when the script runs."""

    schema: str | None
    table: str

    @property
    def relation(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table) if self.schema else sql.Identifier(self.table)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}" if self.schema else self.table


@dataclass(frozen=True)
class TableName(InTable):
    """A table as the catalog names it."""

    schema: str | None
    table: str


@dataclass(frozen=True)
class ColumnState(TableName):
    """What the catalog says about a column's NOT NULL-ness. ``server_version`` is None offline."""

    column: str
    not_null: bool
    #: the column's not-null constraint (PostgreSQL 18+): (name, validated)
    not_null_constraint: tuple[str, bool] | None
    #: the CHECK of the PostgreSQL 12-17 path, by its name: validated?
    check: bool | None
    server_version: int | None
    oid: int | None = None

    @property
    def native(self) -> bool:
        """Whether the server has NOT VALID not-null constraints; offline we take the CHECK path, which works on
        every version from 12 on."""
        return self.server_version is not None and self.server_version >= PG18


@dataclass(frozen=True)
class NotNullPlan:
    """The steps left for one change, and the name of the constraint this plan itself adds (if any): the one to
    drop again when validation finds NULLs."""

    state: ColumnState
    steps: tuple[Step, ...]
    adds: str | None = None
    validates: bool = False


class DDLSession(Protocol):
    """Where steps run: a connection outside any transaction of the caller's. Each call is one transaction."""

    def fetchall(self, statement: Query, params: Params = (), *, before: Sequence[Query] = ()) -> list[tuple[Any, ...]]:
        """``statement``'s rows; with ``before`` (``SET LOCAL``s) run first in the same transaction."""
        ...

    def run(self, statements: Sequence[Query], *, capture_notices: bool = False) -> list[str]:
        """Run ``statements`` in one transaction and return the server notices seen if asked to."""
        ...

    def execute(self, statement: Query) -> None:
        """Run one statement outside any transaction block (``CREATE INDEX CONCURRENTLY`` refuses to run in one)."""
        ...


class PsycopgSession:
    """A :class:`DDLSession` on an autocommit psycopg connection."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def fetchall(self, statement: Query, params: Params = (), *, before: Sequence[Query] = ()) -> list[tuple[Any, ...]]:
        # Without parameters none are parsed (as on Alembic's connection): a % in author SQL stays a %.
        with self.conn.transaction() if before else contextlib.nullcontext():
            for setting in before:
                self.conn.execute(setting)
            return list(self.conn.execute(statement, params or None).fetchall())

    def run(self, statements: Sequence[Query], *, capture_notices: bool = False) -> list[str]:
        seen: list[str] = []

        def handler(diag: psycopg.errors.Diagnostic) -> None:
            seen.append(diag.message_primary or "")

        if capture_notices:
            self.conn.add_notice_handler(handler)
        try:
            with self.conn.transaction():
                for statement in statements:
                    self.conn.execute(statement)
        finally:
            if capture_notices:
                self.conn.remove_notice_handler(handler)
        return seen

    def execute(self, statement: Query) -> None:
        self.conn.execute(statement)


def column_names(value: str | Sequence[str], what: str = "columns") -> tuple[str, ...]:
    """A column name or a list of them, as a tuple.

    Raises:
        ConstraintError: ``value`` is empty or holds something other than non-empty names (``what`` names it).
    """
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConstraintError(f"{what} must be a column name or a non-empty list of column names, got {value!r}")
    return names


# --- reading the catalog -------------------------------------------------------------------------------------------


def find_table(session: DDLSession, table: str, schema: str | None) -> tuple[int, str, str]:
    """The table's (oid, schema, name), ``table`` optionally ``schema.table``; without a schema the search path
    decides.

    Raises:
        ConstraintError: there is no such table, or it is not a table.
    """
    schema, table = split_table(table, schema)
    shown = f"{schema}.{table}" if schema else table
    found = session.fetchall(statements.FIND_TABLE, {"schema": schema, "table": table})
    if not found:
        raise ConstraintError(f"table {shown} does not exist")
    oid, schema, table, relkind, _ = found[0]
    if relkind not in ("r", "p"):
        raise ConstraintError(f"{schema}.{table} is not a table")
    return int(oid), str(schema), str(table)


def read_state(session: DDLSession, table: str, column: str, *, schema: str | None, name: str | None) -> ColumnState:
    """The column's state, read from the catalog.

    Raises:
        ConstraintError: the table or column does not exist.
    """
    oid, schema, table = find_table(session, table, schema)
    attribute = session.fetchall(ddl.COLUMN, (oid, column))
    if not attribute:
        raise ConstraintError(f"column {column!r} does not exist in table {schema}.{table}")
    attnum, attnotnull = attribute[0]
    check = ddl.check_name(table, column, name)
    not_null_constraint: tuple[str, bool] | None = None
    check_valid: bool | None = None
    for conname, contype, validated in session.fetchall(ddl.CONSTRAINTS, (oid, attnum, check)):
        if contype == "n":
            not_null_constraint = (conname, bool(validated))
        else:
            check_valid = bool(validated)
    version = session.fetchall(statements.SERVER_VERSION)[0][0]
    return ColumnState(
        schema=schema,
        table=table,
        column=column,
        not_null=bool(attnotnull),
        not_null_constraint=not_null_constraint,
        check=check_valid,
        server_version=int(version),
        oid=int(oid),
    )


def offline_state(table: str, column: str, *, schema: str | None, assumed: AssumedState) -> ColumnState:
    """The state assumed when rendering SQL without a database. Before a drop (:attr:`AssumedState.ANY`) both
    drops render, the CHECK's with IF EXISTS."""
    schema, table = split_table(table, schema)
    return ColumnState(
        schema=schema,
        table=table,
        column=column,
        not_null=assumed is AssumedState.ANY,
        not_null_constraint=None,
        check=None if assumed is AssumedState.NOTHING else False,
        server_version=None,
    )


# --- planning --------------------------------------------------------------------------------------------------


def _check_path(state: ColumnState, name: str | None, *, validate: bool) -> NotNullPlan:
    rel, col = state.relation, state.column
    check = ddl.check_name(state.table, col, name)
    steps: list[Step] = []
    adds = None
    if state.not_null:
        # SET NOT NULL is done; only a CHECK left behind by a run that died before dropping it remains.
        if state.check is not None:
            steps.append(Step(StepAction.DROP_CHECK, ddl.drop_constraint(rel, check), True))
        return NotNullPlan(state, tuple(steps))
    if state.check is None:
        steps.append(Step(StepAction.ADD, ddl.add_check_not_valid(rel, check, col), True))
        adds = check
    if not validate:
        return NotNullPlan(state, tuple(steps), adds)
    if not state.check:
        steps.append(Step(StepAction.VALIDATE, ddl.validate_constraint(rel, check), False))
    steps.append(Step(StepAction.SET_NOT_NULL, ddl.set_not_null(rel, col), True))
    steps.append(Step(StepAction.DROP_CHECK, ddl.drop_constraint(rel, check), True))
    return NotNullPlan(state, tuple(steps), adds, validates=not state.check)


def plan_add(state: ColumnState, name: str | None = None, *, validate: bool = True) -> NotNullPlan:
    """The steps that make the column NOT NULL (or only add the NOT VALID constraint when ``validate`` is false)."""
    if not state.native or state.check is not None:
        # A CHECK of ours on PostgreSQL 18 means an earlier run (or an offline script) took the CHECK path:
        # finish that one rather than start a second constraint.
        return _check_path(state, name, validate=validate)
    rel, col = state.relation, state.column
    steps: list[Step] = []
    adds = None
    if state.not_null_constraint is None:
        constraint = ddl.not_null_name(state.table, col, name)
        steps.append(Step(StepAction.ADD, ddl.add_not_null_not_valid(rel, constraint, col), True))
        adds, validated = constraint, False
    else:
        constraint, validated = state.not_null_constraint
    if validate and not validated:
        steps.append(Step(StepAction.VALIDATE, ddl.validate_constraint(rel, constraint), False))
    return NotNullPlan(state, tuple(steps), adds, validates=validate and not validated)


def plan_validate(state: ColumnState, name: str | None = None) -> NotNullPlan:
    """The steps that finish a change started with ``validate=False``.

    Raises:
        ConstraintError: the column has no NOT VALID constraint to validate and is not NOT NULL already.
    """
    nothing = state.check is None and (state.not_null_constraint is None if state.native else not state.not_null)
    if nothing:
        raise ConstraintError(
            f"column {state.column!r} of {state.qualified} has no NOT VALID not-null constraint to validate: "
            "run add_not_null_constraint first"
        )
    return plan_add(state, name, validate=True)


def plan_drop(state: ColumnState, name: str | None = None) -> NotNullPlan:
    """The steps that make the column nullable again (both paths, any stage)."""
    steps: list[Step] = []
    if state.check is not None:
        check = ddl.check_name(state.table, state.column, name)
        steps.append(Step(StepAction.DROP_CHECK, ddl.drop_constraint(state.relation, check, if_exists=True), True))
    if state.not_null:
        steps.append(Step(StepAction.DROP_NOT_NULL, ddl.drop_not_null(state.relation, state.column), True))
    return NotNullPlan(state, tuple(steps))


# --- running ---------------------------------------------------------------------------------------------------


def _error_is(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    return issubclass(database_error_class(exc), kinds)


def _is_lock_error(exc: BaseException) -> bool:
    return _error_is(exc, LOCK_ERRORS)


def _reason(exc: BaseException) -> str:
    # The server's first line, whatever the driver, without SQLAlchemy's "[SQL: ...]" and background link.
    if isinstance(database_error(exc), psycopg.Error) or isinstance(exc, BackfillError):
        return describe(exc)
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return lines[0] if lines else type(orig).__name__


def _run_step(
    session: DDLSession, step: Step, retry: LockRetry, *, capture: bool, validate_timeout: float | None = None
) -> tuple[list[str], int]:
    """One step in its own transaction, retried on lock timeouts and deadlocks. Only ACCESS EXCLUSIVE steps get the
    short lock_timeout: the validating scan's SHARE UPDATE EXCLUSIVE blocks no reader or writer while it waits,
    so it keeps the session's setting (and is retried only if that setting times it out). Every step sets its own
    statement_timeout: a role's default (often tens of milliseconds in production) must not cancel the scan
    (``validate_timeout`` bounds it; none by default), and the ACCESS EXCLUSIVE steps never scan."""
    attempts = 0
    body: list[Query] = [ddl.set_lock_timeout(retry.lock_timeout, local=True)] if step.exclusive else []
    body.append(ddl.set_statement_timeout(validate_timeout if step.action is StepAction.VALIDATE else None))
    if capture:
        body.append(ddl.SHOW_PROOF)
    body.append(step.statement)

    def attempt() -> list[str]:
        nonlocal attempts
        attempts += 1
        return session.run(body, capture_notices=capture)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        log.warning(
            "ddl_lock_retry",
            action=step.action,
            attempt=state.attempt_number,
            wait_s=round(state.upcoming_sleep, 3),
            lock_timeout_s=retry.lock_timeout,
        )

    retry_loop = retrying(
        _is_lock_error,
        wait=ExponentialBackoff(retry.initial_wait, retry.max_wait, retry.initial_wait / 2, retry.random),
        stop=StopAfterBudget(retry.budget_seconds, retry.clock),
        sleep=retry.sleep,
        before_sleep=before_sleep,
    )
    try:
        return retry_loop(attempt), attempts
    except Exception as exc:
        if _is_lock_error(exc):
            raise LockUnavailableError(
                f"could not lock the table for {step.action} ({ddl.render(step.statement)}) within "
                f"{retry.budget_seconds:g}s ({attempts} attempts of {retry.lock_timeout:g}s): a long transaction "
                "holds a lock on it (see pg_stat_activity)"
            ) from None
        raise


def run_step(session: DDLSession, step: Step, retry: LockRetry) -> int:
    """Run one step in its own transaction (an ACCESS EXCLUSIVE one under ``retry``'s lock_timeout, retried with
    backoff) and return how many attempts it took. Used by the other online schema changes (``schema.sync``).

    Raises:
        LockUnavailableError: the lock could not be taken within the retry budget.
    """
    return _run_step(session, step, retry, capture=False)[1]


def apply_steps(
    session: DDLSession, plan: NotNullPlan, retry: LockRetry | None = None, *, validate_timeout: float | None = None
) -> list[StepResult]:
    """Run a plan's steps in order, each in its own transaction.

    Args:
        session: where the steps run.
        plan: the steps.
        retry: how ACCESS EXCLUSIVE steps wait for their lock.
        validate_timeout: seconds the validating scan may run (None: no limit; it blocks no reader or writer).

    Raises:
        NullValuesError: validation found NULLs; a constraint this plan added is dropped again first.
        LockUnavailableError: an ACCESS EXCLUSIVE step did not get its lock within the retry budget.
        ConstraintError: any other failure of a step (a timeout, a lost connection, ...); the message names what
            is left behind, and running the change again continues from there.
    """
    retry = retry or LockRetry()
    state = plan.state
    if plan.adds is not None and plan.validates:
        # Checked before the NOT VALID constraint exists: while it does, every write of a NULL fails, so finding
        # the NULLs only when validating would have broken the application's writes for a whole scan.
        timeout = [ddl.set_statement_timeout(validate_timeout)]
        if session.fetchall(ddl.has_nulls(state.relation, state.column), before=timeout)[0][0]:
            count = ddl.count_nulls(state.relation, state.column)
            nulls = int(session.fetchall(count, before=timeout)[0][0])
            raise _null_values(state, nulls, "nothing was changed")

    def run(step: Step) -> tuple[int, bool | None]:
        capture = step.action is StepAction.SET_NOT_NULL
        notices, attempts = _run_step(session, step, retry, capture=capture, validate_timeout=validate_timeout)
        return attempts, any("sufficient to prove" in n for n in notices) if capture and notices else None

    def failed(step: Step, done: Sequence[StepResult], exc: Exception) -> BaseException:
        if step.action is StepAction.VALIDATE and _error_is(exc, VIOLATION_ERRORS):
            return _nulls_found(session, plan, retry, validate_timeout)
        return _step_failed(session, plan, step, done, retry, exc)

    return run_steps(plan.steps, run, failed, table=state.qualified, column=state.column)


#: Runs one step; returns how many attempts it took and, for ``set_not_null``, whether the server reported that a
#: valid CHECK proved the column has no NULL (None when not observed).
StepRunner = Callable[[Step], "tuple[int, bool | None]"]
#: What a failed step raises, from the step, the steps done before it and its error (the error itself: as it is).
StepFailure = Callable[[Step, Sequence[StepResult], Exception], BaseException]


def run_steps(steps: Sequence[Step], run: StepRunner, failed: StepFailure, **context: Any) -> list[StepResult]:
    """Run ``steps`` in order with ``run``, each timed and logged as ``ddl_step`` with ``context`` (the table, and
    the column, constraint or index); the first that fails raises what ``failed`` makes of its error. Every online
    schema change runs its plan through here."""
    results: list[StepResult] = []
    for step in steps:
        started = time.monotonic()
        try:
            attempts, proved = run(step)
        except Exception as exc:
            error = failed(step, results, exc)
            if error is exc:
                raise
            raise error from None
        result = StepResult(step.action, ddl.render(step.statement), attempts, time.monotonic() - started, proved)
        results.append(result)
        log.info(
            "ddl_step",
            **context,
            action=step.action,
            attempts=attempts,
            ms=round(result.seconds * 1000, 1),
            proved_by_check=proved,
        )
    return results


def _undo_add(session: DDLSession, plan: NotNullPlan, retry: LockRetry) -> str:
    """Drop the NOT VALID constraint this plan added (it checks new rows: the application's inserts of NULLs would
    fail until the change is made again) and say what is left."""
    if plan.adds is None:
        return "the NOT VALID constraint from an earlier call stays (new rows are checked)"
    undo = Step(StepAction.DROP_CHECK, ddl.drop_constraint(plan.state.relation, plan.adds, if_exists=True), True)
    try:
        _run_step(session, undo, retry, capture=False)
    except Exception as exc:
        return f"the NOT VALID constraint {plan.adds} added by this call is left ({_reason(exc)}; new rows are checked)"
    return "the constraint added by this call was dropped again, nothing changed"


def _step_failed(
    session: DDLSession,
    plan: NotNullPlan,
    step: Step,
    done: Sequence[StepResult],
    retry: LockRetry,
    exc: BaseException,
) -> ConstraintError:
    state = plan.state
    reason = str(exc) if isinstance(exc, LockUnavailableError) else _reason(exc)
    if step.action is StepAction.VALIDATE:
        left = _undo_add(session, plan, retry)
    elif done:
        left = "done: " + ", ".join(result.action for result in done)
    else:
        left = "nothing changed"
    log.error("ddl_step_failed", table=state.qualified, column=state.column, action=step.action, error=reason)
    error = LockUnavailableError if isinstance(exc, LockUnavailableError) else ConstraintError
    return error(
        f"{step.action} step on {state.qualified}.{state.column} failed: {reason} ({left}); "
        "run it again: it continues from what the catalog shows"
    )


def _nulls_found(
    session: DDLSession, plan: NotNullPlan, retry: LockRetry, validate_timeout: float | None
) -> NullValuesError:
    state = plan.state
    count = ddl.count_nulls(state.relation, state.column)
    nulls = int(session.fetchall(count, before=[ddl.set_statement_timeout(validate_timeout)])[0][0])
    left = _undo_add(session, plan, retry)
    return _null_values(state, nulls, left)


def _null_values(state: ColumnState, nulls: int, left: str) -> NullValuesError:
    log.error("not_null_violated", table=state.qualified, column=state.column, null_rows=nulls)
    return NullValuesError(
        f"cannot make {state.qualified}.{state.column} NOT NULL: {nulls} row(s) have {state.column} NULL; "
        f"{left}. Backfill them first; if application code that does not know the column still writes rows, "
        "backfill with keep_in_sync=True so a trigger fills the rows it writes",
        table=state.qualified,
        column=state.column,
        null_rows=nulls,
    )


def render_steps(plan: NotNullPlan | Sequence[Step], lock_timeout: float) -> list[str]:
    """The plan (or steps) as SQL for an offline script: each ACCESS EXCLUSIVE step after its ``SET
    lock_timeout``, the others without one (they block nobody), ``RESET lock_timeout`` at the end. Meant to run
    outside a transaction block."""
    out: list[str] = []
    current: bool | None = None
    for step in plan.steps if isinstance(plan, NotNullPlan) else plan:
        if step.exclusive and current is not True:
            out.append(ddl.render(ddl.set_lock_timeout(lock_timeout, local=False)))
        elif not step.exclusive and current is True:
            out.append(ddl.render(ddl.reset_lock_timeout()))
        current = step.exclusive
        out.append(ddl.render(step.statement))
    if current:
        out.append(ddl.render(ddl.reset_lock_timeout()))
    return out


# --- the plain functions -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def own_session(bind: Bind) -> Iterator[PsycopgSession]:
    """A :class:`PsycopgSession` on a new autocommit connection of the plain functions' own, closed on exit."""
    with Database.from_bind(bind, "backfill-ddl").connect() as conn:
        yield PsycopgSession(conn)


def named_by_caller(bind: Bind, table: str, schema: str | None) -> tuple[str | None, str]:
    """``(schema, table)`` as the caller means them: a Connection's own search_path decides which table an
    unqualified name means (the steps then run on a connection of ours, where it may mean another one)."""
    return qualify(bind, table, schema) if isinstance(bind, sqlalchemy.Connection) else split_table(table, schema)


def lock_retry(lock_timeout: float, retry_seconds: float, sleep: Callable[[float], None]) -> LockRetry:
    return LockRetry(lock_timeout=lock_timeout, budget_seconds=retry_seconds, sleep=sleep)


def add_not_null_constraint(
    bind: Bind,
    table: str,
    column: str,
    *,
    schema: str | None = None,
    name: str | None = None,
    validate: bool = True,
    validate_timeout: float | None = None,
    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT,
    retry_seconds: float = ddl.DEFAULT_LOCK_RETRY_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> list[StepResult]:
    """Make ``column`` NOT NULL without an ACCESS EXCLUSIVE table scan (see the module docstring for the steps).

    Idempotent: what is already done (read from the catalog) is skipped, so a call that died between two steps
    can simply be repeated. Runs on a connection of its own: do not call it while your own transaction holds
    locks on the table.

    Args:
        bind: the database (URL, SQLAlchemy URL, Engine or Connection: only its URL is used).
        table: the table, optionally ``schema.table``.
        column: the column.
        schema: the table's schema; defaults to the search path.
        name: the constraint's name (PostgreSQL 18+), or the temporary CHECK's (12-17).
        validate: False stops after the NOT VALID constraint (new rows are checked at once; existing rows are
            checked later by :func:`validate_not_null_constraint`).
        validate_timeout: seconds the validating scan may run; None (the default): no limit, whatever the role's
            statement_timeout (the scan blocks no reader or writer).
        lock_timeout: seconds each ACCESS EXCLUSIVE attempt may wait for its lock.
        retry_seconds: how long to keep retrying such a step.
        sleep: injected for tests.

    Returns:
        The steps that ran (empty if the column was already NOT NULL).

    Raises:
        ConstraintError: no such table or column.
        NullValuesError: the column still has NULLs (names how many); nothing this call added is left behind.
        LockUnavailableError: a lock could not be taken within ``retry_seconds``.
    """
    schema, table = named_by_caller(bind, table, schema)
    with own_session(bind) as session:
        state = read_state(session, table, column, schema=schema, name=name)
        plan = plan_add(state, name, validate=validate)
        return apply_steps(
            session, plan, lock_retry(lock_timeout, retry_seconds, sleep), validate_timeout=validate_timeout
        )


def validate_not_null_constraint(
    bind: Bind,
    table: str,
    column: str,
    *,
    schema: str | None = None,
    name: str | None = None,
    validate_timeout: float | None = None,
    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT,
    retry_seconds: float = ddl.DEFAULT_LOCK_RETRY_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> list[StepResult]:
    """Finish what ``add_not_null_constraint(..., validate=False)`` started: validate the constraint (a scan that
    blocks nobody) and, on PostgreSQL 12-17, SET NOT NULL and drop the CHECK. Arguments as for
    :func:`add_not_null_constraint`.

    Raises:
        ConstraintError: there is no NOT VALID constraint to validate.
        NullValuesError: the column still has NULLs; the NOT VALID constraint stays.
        LockUnavailableError: a lock could not be taken within ``retry_seconds``.
    """
    schema, table = named_by_caller(bind, table, schema)
    with own_session(bind) as session:
        state = read_state(session, table, column, schema=schema, name=name)
        retry = lock_retry(lock_timeout, retry_seconds, sleep)
        return apply_steps(session, plan_validate(state, name), retry, validate_timeout=validate_timeout)


def drop_not_null_constraint(
    bind: Bind,
    table: str,
    column: str,
    *,
    schema: str | None = None,
    name: str | None = None,
    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT,
    retry_seconds: float = ddl.DEFAULT_LOCK_RETRY_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> list[StepResult]:
    """Make ``column`` nullable again, whatever stage a NOT NULL change reached (for downgrades). Each statement
    takes ACCESS EXCLUSIVE for an instant, with the same lock timeout and retries. Arguments as for
    :func:`add_not_null_constraint`.

    Raises:
        ConstraintError: no such table or column.
        LockUnavailableError: a lock could not be taken within ``retry_seconds``.
    """
    schema, table = named_by_caller(bind, table, schema)
    with own_session(bind) as session:
        state = read_state(session, table, column, schema=schema, name=name)
        return apply_steps(session, plan_drop(state, name), lock_retry(lock_timeout, retry_seconds, sleep))
