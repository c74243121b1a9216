"""What CHECK constraints and foreign keys share: a named constraint's state read from the catalog, the two steps
``ADD ... NOT VALID`` and ``VALIDATE CONSTRAINT`` planned from it, and running them with the NOT NULL family's step
runner (:func:`backfill.schema.notnull.run_step`).

``ADD CONSTRAINT ... NOT VALID`` checks no existing row, so it holds its lock (ACCESS EXCLUSIVE for a CHECK, SHARE
ROW EXCLUSIVE on both tables for a foreign key) for an instant; it runs under a short ``lock_timeout`` and is
retried with backoff, so the application never queues behind it for longer than that. ``VALIDATE CONSTRAINT``
scans under SHARE UPDATE EXCLUSIVE (and ROW SHARE on a referenced table), which blocks neither reads nor writes.
Each step is its own transaction; what is done is read back from the catalog, so a change that died between the
two steps resumes with the second.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec

import psycopg
import structlog
from psycopg import errors as pg_errors

from backfill.errors import database_error, describe
from backfill.pg.connect import Bind
from backfill.schema import ddl
from backfill.schema.notnull import (
    ConstraintError,
    DDLSession,
    LockRetry,
    LockUnavailableError,
    Step,
    StepAction,
    StepResult,
    TableName,
    find_table,
    lock_retry,
    own_session,
    run_step,
    run_steps,
)
from backfill.spec import split_table

__all__ = [
    "ViolationError",
    "ChangeResult",
    "ConstraintState",
    "ConstraintKind",
    "ConstraintPlan",
    "Planner",
    "read_constraint",
    "offline_constraint",
    "change",
    "change_on_own_session",
    "named_change",
    "apply_plan",
    "server_detail",
]

log = structlog.get_logger("backfill")

_P = ParamSpec("_P")

#: What a validating scan raises when a row breaks the constraint.
_VIOLATIONS = (pg_errors.CheckViolation, pg_errors.ForeignKeyViolation)

_KINDS = {"c": "CHECK constraint", "f": "foreign key", "p": "primary key", "u": "unique constraint", "n": "not-null"}


class ViolationError(ConstraintError):
    """Raised when existing rows violate a CHECK constraint or foreign key being validated. ``example`` names one
    such row. A constraint the failing call added itself is dropped again; one added earlier stays NOT VALID (rows
    written from now on are still checked)."""

    def __init__(self, message: str, *, table: str, constraint: str, example: str | None) -> None:
        super().__init__(message)
        self.table = table
        self.constraint = constraint
        self.example = example


@dataclass(frozen=True)
class ChangeResult:
    """What an online schema change did: the steps that ran (empty when everything was done already), advice on
    what else the schema needs, and the sessions an index build had to wait for."""

    steps: tuple[StepResult, ...] = ()
    advice: tuple[str, ...] = ()
    #: (pid, application_name, seconds its transaction had been open) of each session a build waited for
    waited_for: tuple[tuple[int, str, float], ...] = field(default=())

    @property
    def actions(self) -> list[str]:
        return [step.action for step in self.steps]


@dataclass(frozen=True)
class ConstraintState(TableName):
    """A named constraint of a table, as the catalog has it (``kind`` None: there is none of that name)."""

    name: str
    #: pg_constraint.contype: ``c`` CHECK, ``f`` foreign key, ...; None when the constraint does not exist
    kind: str | None
    validated: bool
    oid: int | None = None
    #: the table a foreign key references (its oid), 0 otherwise
    references: int = 0
    definition: str | None = None


#: Names one row that violates the constraint, for the error (None if it cannot).
Describe = Callable[["DDLSession", ConstraintState, BaseException], "str | None"]


@dataclass(frozen=True)
class ConstraintPlan:
    """The steps left, whether this plan adds the constraint itself (then a failed validation drops it), and advice
    on what else the schema needs."""

    state: ConstraintState
    steps: tuple[Step, ...]
    kind: ConstraintKind
    adds: bool = False
    advice: tuple[str, ...] = ()

    @property
    def what(self) -> str:
        return self.kind.what


#: Plans a change from the constraint's state; the session (None offline) reads what else the plan needs.
Planner = Callable[[ConstraintState, "DDLSession | None"], ConstraintPlan]


def read_constraint(session: DDLSession, table: str, name: str, *, schema: str | None) -> ConstraintState:
    """The constraint ``name`` of ``table`` (optionally ``schema.table``).

    Raises:
        ConstraintError: the table does not exist.
    """
    oid, schema, table = find_table(session, table, schema)
    rows = session.fetchall(ddl.CONSTRAINT, (oid, name))
    if not rows:
        return ConstraintState(schema, table, name, None, False, oid)
    kind, validated, references, definition = rows[0]
    return ConstraintState(schema, table, name, str(kind), bool(validated), oid, int(references), str(definition))


def offline_constraint(
    table: str, name: str, *, schema: str | None, existing: ConstraintKind | None
) -> ConstraintState:
    """The state assumed without a database: nothing yet (before an add: ``existing`` None) or a NOT VALID
    constraint of kind ``existing`` (before a validate or a drop). An unqualified table stays unqualified: the
    search path decides when the script runs."""
    schema, table = split_table(table, schema)
    return ConstraintState(schema, table, name, existing.code if existing else None, False)


def _validate_step(state: ConstraintState) -> Step:
    return Step(StepAction.VALIDATE, ddl.validate_constraint(state.relation, state.name), False)


def _other_kind(state: ConstraintState, what: str) -> ConstraintError:
    found = _KINDS.get(state.kind or "", f"constraint of type {state.kind!r}")
    return ConstraintError(
        f"{state.qualified} already has a {found} named {state.name!r} ({state.definition}), not a {what}: "
        "choose another name"
    )


@dataclass(frozen=True)
class ConstraintKind:
    """What differs between the constraints changed in two steps (CHECK, foreign key): how the catalog and the
    messages name them, and how a row that violates one is found. Its ``plan_`` methods plan a change of such a
    constraint from its state; ``plan_validate`` and ``plan_drop`` are :data:`Planner`\\ s."""

    #: pg_constraint.contype: ``c`` CHECK, ``f`` foreign key
    code: str
    #: "CHECK constraint" or "foreign key", for messages
    what: str
    describe: Describe

    def plan_add(self, state: ConstraintState, add: Step, *, validate: bool) -> ConstraintPlan:
        """``add`` unless a constraint of that name and kind exists, then ``VALIDATE`` unless ``validate`` is false
        or it is validated already.

        Raises:
            ConstraintError: a constraint of another kind has the name.
        """
        if state.kind is not None and state.kind != self.code:
            raise _other_kind(state, self.what)
        steps: list[Step] = []
        if state.kind is None:
            steps.append(add)
        if validate and not state.validated:
            steps.append(_validate_step(state))
        return ConstraintPlan(state, tuple(steps), self, adds=state.kind is None)

    def plan_validate(self, state: ConstraintState, session: DDLSession | None = None) -> ConstraintPlan:
        """``VALIDATE`` if the constraint is NOT VALID, nothing if it is valid.

        Raises:
            ConstraintError: there is no such constraint, or it is of another kind.
        """
        if state.kind is None:
            raise ConstraintError(
                f"{state.qualified} has no {self.what} named {state.name!r} to validate: add it first"
            )
        if state.kind != self.code:
            raise _other_kind(state, self.what)
        return ConstraintPlan(state, () if state.validated else (_validate_step(state),), self)

    def plan_drop(self, state: ConstraintState, session: DDLSession | None = None) -> ConstraintPlan:
        """``DROP CONSTRAINT IF EXISTS`` (ACCESS EXCLUSIVE for an instant) if the constraint exists, valid or
        not."""
        return ConstraintPlan(state, () if state.kind is None else (_drop_step(state),), self)


def _drop_step(state: ConstraintState) -> Step:
    drop = ddl.drop_constraint(state.relation, state.name, if_exists=True)
    if state.kind == "f":
        # ACCESS EXCLUSIVE on both tables of the key: taken in either order first, never queueing while holding one.
        drop = ddl.locked_with_related(drop, state.relation, ddl.foreign_key_tables(state.relation, name=state.name))
    return Step(StepAction.DROP, drop, True)


def server_detail(exc: BaseException) -> str | None:
    """The server's DETAIL line of a database error, e.g. ``Key (id)=(7) is duplicated``."""
    error = database_error(exc)
    detail = error.diag.message_detail if isinstance(error, psycopg.Error) else None
    return detail.rstrip(".") if detail else None


def _left(done: Sequence[str], plan: ConstraintPlan) -> str:
    if "add" in done:
        return f"the {plan.what} was added NOT VALID and stays (rows written from now on are checked); run again"
    return "nothing was changed"


def change_on_own_session(
    bind: Bind, table: str, name: str, planner: Planner, schema: str | None, retry: LockRetry
) -> ChangeResult:
    """:func:`change` on a connection of the plain functions' own."""
    with own_session(bind) as session:
        return change(session, table, name, planner, schema=schema, retry=retry)


def _named_constraint(
    bind: Bind,
    table: str,
    name: str,
    *,
    schema: str | None = None,
    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT,
    retry_seconds: float = ddl.DEFAULT_LOCK_RETRY_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Bind, str, str, str | None, LockRetry]:
    """The one signature of the plain functions that validate or drop a named constraint (see
    :data:`named_change`), and what they run with."""
    return bind, table, name, schema, lock_retry(lock_timeout, retry_seconds, sleep)


def _named_changes(
    arguments: Callable[_P, tuple[Bind, str, str, str | None, LockRetry]],
) -> Callable[[Planner, str, str], Callable[_P, ChangeResult]]:
    signature = inspect.signature(arguments).replace(return_annotation="ChangeResult")

    def named_change(planner: Planner, function_name: str, doc: str) -> Callable[_P, ChangeResult]:
        def change(*args: _P.args, **kwargs: _P.kwargs) -> ChangeResult:
            try:
                signature.bind(*args, **kwargs)
            except TypeError as exc:  # said of the function called, not of the signature's template
                raise TypeError(f"{function_name}(): {exc}") from None
            bind, table, name, schema, retry = arguments(*args, **kwargs)
            return change_on_own_session(bind, table, name, planner, schema, retry)

        change.__name__ = change.__qualname__ = function_name
        change.__doc__ = doc
        change.__signature__ = signature  # type: ignore[attr-defined]
        return change

    return named_change


#: ``named_change(planner, function_name, doc)``: the plain function ``function_name(bind, table, name, *,
#: schema=None, lock_timeout=2.0, retry_seconds=300.0, sleep=time.sleep)`` that plans a change of the constraint
#: ``name`` with ``planner`` and runs it on a connection of its own (``validate_check_constraint``,
#: ``drop_foreign_key``, ...): one signature, typed, for all of them.
named_change = _named_changes(_named_constraint)


def change(
    session: DDLSession, table: str, name: str, planner: Planner, *, schema: str | None, retry: LockRetry
) -> ChangeResult:
    """Read the constraint ``name`` of ``table`` from the catalog, plan what is left and run it (see
    :func:`apply_plan`).

    Raises:
        ConstraintError: the table does not exist, or as the planner and :func:`apply_plan` raise.
    """
    state = read_constraint(session, table, name, schema=schema)
    return apply_plan(session, planner(state, session), retry)


def apply_plan(session: DDLSession, plan: ConstraintPlan, retry: LockRetry) -> ChangeResult:
    """Run the plan's steps in order, each in its own transaction.

    Raises:
        ViolationError: existing rows violate the constraint (one is named); a constraint this plan added is
            dropped again.
        LockUnavailableError: a step did not get its lock within the retry budget; the steps before it stay done.
        ConstraintError: PostgreSQL refused a step (its message, and what was left behind).
    """
    state = plan.state

    def failed(step: Step, done: Sequence[StepResult], exc: Exception) -> BaseException:
        if isinstance(exc, LockUnavailableError):
            return exc
        error = database_error(exc)
        if step.action is StepAction.VALIDATE and isinstance(error, _VIOLATIONS):
            return _violated(session, plan, retry, plan.kind.describe(session, state, exc))
        if not isinstance(error, psycopg.Error):
            return exc
        return ConstraintError(
            f"cannot {step.action} {plan.what} {state.name!r} on {state.qualified}: {describe(exc)} "
            f"({_left([r.action for r in done], plan)})"
        )

    results = run_steps(
        plan.steps,
        lambda step: (run_step(session, step, retry), None),
        failed,
        table=state.qualified,
        constraint=state.name,
    )
    return ChangeResult(tuple(results), plan.advice)


def _violated(session: DDLSession, plan: ConstraintPlan, retry: LockRetry, example: str | None) -> ViolationError:
    state = plan.state
    if plan.adds:
        # Leave nothing half-applied: the NOT VALID constraint added by this very call goes again.
        run_step(session, _drop_step(state), retry)
        left = f"the {plan.what} this call added was dropped again, nothing changed"
    else:
        left = f"the {plan.what} stays NOT VALID (rows written from now on are checked)"
    log.error("constraint_violated", table=state.qualified, constraint=state.name, example=example)
    shown = f": {example}" if example else ""
    return ViolationError(
        f"cannot validate {plan.what} {state.name!r} on {state.qualified}, existing rows violate it{shown}; "
        f"{left}. Fix those rows and run again",
        table=state.qualified,
        constraint=state.name,
        example=example,
    )


def key_text(columns: Sequence[str], values: Sequence[Any]) -> str:
    """``(a, b)=(1, x)``, the way PostgreSQL names a row in its messages."""
    return f"({', '.join(columns)})=({', '.join(str(v) for v in values)})"
