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

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from psycopg import errors as pg_errors
from psycopg import sql

from backfill.errors import database_error, describe
from backfill.schema import ddl
from backfill.schema.notnull import (
    ConstraintError,
    DDLSession,
    LockRetry,
    LockUnavailableError,
    Step,
    StepResult,
    find_table,
    run_step,
)
from backfill.spec import split_table

__all__ = [
    "ViolationError",
    "ChangeResult",
    "ConstraintState",
    "ConstraintPlan",
    "read_constraint",
    "offline_constraint",
    "plan_add",
    "plan_validate",
    "plan_drop",
    "apply_plan",
    "server_detail",
]

log = structlog.get_logger("backfill")

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
class ConstraintState:
    """A named constraint of a table, as the catalog has it (``kind`` None: there is none of that name)."""

    #: None only offline, for an unqualified table: the search path decides
    schema: str | None
    table: str
    name: str
    #: pg_constraint.contype: ``c`` CHECK, ``f`` foreign key, ...; None when the constraint does not exist
    kind: str | None
    validated: bool
    oid: int | None = None
    #: the table a foreign key references (its oid), 0 otherwise
    references: int = 0
    definition: str | None = None

    @property
    def relation(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table) if self.schema else sql.Identifier(self.table)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}" if self.schema else self.table


@dataclass(frozen=True)
class ConstraintPlan:
    """The steps left, and whether this plan adds the constraint itself (then a failed validation drops it)."""

    state: ConstraintState
    steps: tuple[Step, ...]
    adds: bool = False
    #: "CHECK constraint" or "foreign key", for messages
    what: str = "constraint"


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


def offline_constraint(table: str, name: str, *, schema: str | None, existing: bool, kind: str) -> ConstraintState:
    """The state assumed without a database: nothing yet (before an add) or a NOT VALID constraint (before a
    validate or a drop). An unqualified table stays unqualified: the search path decides when the script runs."""
    schema, table = split_table(table, schema)
    return ConstraintState(schema, table, name, kind if existing else None, False)


def _validate_step(state: ConstraintState) -> Step:
    return Step("validate", ddl.validate_constraint(state.relation, state.name), False)


def _other_kind(state: ConstraintState, what: str) -> ConstraintError:
    found = _KINDS.get(state.kind or "", f"constraint of type {state.kind!r}")
    return ConstraintError(
        f"{state.qualified} already has a {found} named {state.name!r} ({state.definition}), not a {what}: "
        "choose another name"
    )


def plan_add(state: ConstraintState, add: Step, *, kind: str, what: str, validate: bool) -> ConstraintPlan:
    """``add`` unless a constraint of that name and kind exists, then ``VALIDATE`` unless ``validate`` is false or
    it is validated already.

    Raises:
        ConstraintError: a constraint of another kind has the name.
    """
    if state.kind is not None and state.kind != kind:
        raise _other_kind(state, what)
    steps: list[Step] = []
    if state.kind is None:
        steps.append(add)
    if validate and not state.validated:
        steps.append(_validate_step(state))
    return ConstraintPlan(state, tuple(steps), adds=state.kind is None, what=what)


def plan_validate(state: ConstraintState, *, kind: str, what: str) -> ConstraintPlan:
    """``VALIDATE`` if the constraint is NOT VALID, nothing if it is valid.

    Raises:
        ConstraintError: there is no such constraint, or it is of another kind.
    """
    if state.kind is None:
        raise ConstraintError(f"{state.qualified} has no {what} named {state.name!r} to validate: add it first")
    if state.kind != kind:
        raise _other_kind(state, what)
    return ConstraintPlan(state, () if state.validated else (_validate_step(state),), what=what)


def plan_drop(state: ConstraintState, *, what: str) -> ConstraintPlan:
    """``DROP CONSTRAINT IF EXISTS`` (ACCESS EXCLUSIVE for an instant) if the constraint exists, valid or not."""
    if state.kind is None:
        return ConstraintPlan(state, (), what=what)
    return ConstraintPlan(
        state, (Step("drop", ddl.drop_constraint(state.relation, state.name, if_exists=True), True),), what=what
    )


def server_detail(exc: BaseException) -> str | None:
    """The server's DETAIL line of a database error, e.g. ``Key (id)=(7) is duplicated``."""
    error = database_error(exc)
    detail = error.diag.message_detail if isinstance(error, psycopg.Error) else None
    return detail.rstrip(".") if detail else None


def _left(done: Sequence[str], plan: ConstraintPlan) -> str:
    if "add" in done:
        return f"the {plan.what} was added NOT VALID and stays (rows written from now on are checked); run again"
    return "nothing was changed"


Describe = Callable[[DDLSession, ConstraintState, BaseException], "str | None"]


def apply_plan(
    session: DDLSession, plan: ConstraintPlan, retry: LockRetry, example: Describe, advice: Sequence[str] = ()
) -> ChangeResult:
    """Run the plan's steps in order, each in its own transaction.

    Raises:
        ViolationError: existing rows violate the constraint (``example`` names one); a constraint this plan
            added is dropped again.
        LockUnavailableError: a step did not get its lock within the retry budget; the steps before it stay done.
        ConstraintError: PostgreSQL refused a step (its message, and what was left behind).
    """
    state = plan.state
    results: list[StepResult] = []
    for step in plan.steps:
        started = time.monotonic()
        try:
            attempts = run_step(session, step, retry)
        except LockUnavailableError:
            raise
        except Exception as exc:
            error = database_error(exc)
            if step.action == "validate" and isinstance(error, _VIOLATIONS):
                raise _violated(session, plan, retry, example(session, state, exc)) from None
            if not isinstance(error, psycopg.Error):
                raise
            raise ConstraintError(
                f"cannot {step.action} {plan.what} {state.name!r} on {state.qualified}: {describe(exc)} "
                f"({_left([r.action for r in results], plan)})"
            ) from None
        result = StepResult(step.action, ddl.render(step.statement), attempts, time.monotonic() - started)
        results.append(result)
        log.info(
            "ddl_step",
            table=state.qualified,
            constraint=state.name,
            action=step.action,
            attempts=attempts,
            ms=round(result.seconds * 1000, 1),
        )
    return ChangeResult(tuple(results), tuple(advice))


def _violated(session: DDLSession, plan: ConstraintPlan, retry: LockRetry, example: str | None) -> ViolationError:
    state = plan.state
    if plan.adds:
        # Leave nothing half-applied: the NOT VALID constraint added by this very call goes again.
        undo = Step("drop", ddl.drop_constraint(state.relation, state.name, if_exists=True), True)
        run_step(session, undo, retry)
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
