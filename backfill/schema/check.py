"""CHECK constraints on a live table: ``ADD CONSTRAINT ... CHECK (...) NOT VALID`` (ACCESS EXCLUSIVE for an instant,
under a short ``lock_timeout``, retried with backoff), then ``VALIDATE CONSTRAINT`` (a scan under SHARE UPDATE
EXCLUSIVE: reads and writes go on). ``ADD CONSTRAINT ... CHECK`` without NOT VALID would scan the whole table while
holding ACCESS EXCLUSIVE. Steps are planned from the catalog (see :mod:`backfill.schema.constraint`), so a change that
died between them is finished by running it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from psycopg import sql

from backfill.fragments import fragment_problem
from backfill.pg import statements
from backfill.pg.connect import Bind
from backfill.schema import constraint, ddl
from backfill.schema.notnull import ConstraintError, DDLSession, Step, StepAction, lock_retry

__all__ = [
    "CHECK",
    "checked_condition",
    "plan_add_check",
    "add_planner",
    "describe_violation",
    "add_check_constraint",
    "validate_check_constraint",
    "drop_check_constraint",
]

#: (relation oid, name): the CHECK constraint's expression as PostgreSQL prints it.
_EXPRESSION = sql.SQL(
    "SELECT pg_catalog.pg_get_expr(c.conbin, c.conrelid) FROM pg_catalog.pg_constraint c "
    "WHERE c.conrelid = %s AND c.conname = %s"
)


def checked_condition(condition: str) -> str:
    """``condition`` if it is one non-empty SQL expression (see :mod:`backfill.fragments`).

    Raises:
        ConstraintError: it is empty, or not one self-contained expression.
    """
    if not isinstance(condition, str) or not condition.strip():
        raise ConstraintError("a CHECK constraint needs a condition: a non-empty SQL expression")
    if problem := fragment_problem(condition):
        raise ConstraintError(f"the condition of a CHECK constraint must be one SQL expression: {problem}")
    return condition


def plan_add_check(
    state: constraint.ConstraintState, condition: str, *, validate: bool = True
) -> constraint.ConstraintPlan:
    """``ADD CONSTRAINT ... CHECK (condition) NOT VALID`` unless it exists, then ``VALIDATE`` (unless
    ``validate`` is false or it is valid already). An existing constraint of that name is taken as this one (its
    condition is not compared)."""
    statement = ddl.add_check_expression_not_valid(state.relation, state.name, checked_condition(condition))
    return CHECK.plan_add(state, Step(StepAction.ADD, statement, True), validate=validate)


def add_planner(condition: str, *, validate: bool) -> constraint.Planner:
    """Plans :func:`plan_add_check` (the condition is checked at once, before any catalog is read)."""
    checked_condition(condition)
    return lambda state, _: plan_add_check(state, condition, validate=validate)


def describe_violation(session: DDLSession, state: constraint.ConstraintState, exc: BaseException) -> str | None:
    """One row that violates the CHECK constraint, by primary key when the table has one (VALIDATE does not say)."""
    del exc
    expression = session.fetchall(_EXPRESSION, (state.oid, state.name))
    if not expression or expression[0][0] is None:
        return None
    key = [row[0] for row in session.fetchall(statements.PRIMARY_KEY, (state.oid,))] or ["ctid"]
    found = session.fetchall(ddl.first_violation(state.relation, key, str(expression[0][0])))
    return f"e.g. the row with {constraint.key_text(key, found[0])}" if found else None


CHECK = constraint.ConstraintKind("c", "CHECK constraint", describe_violation)


def add_check_constraint(
    bind: Bind,
    table: str,
    name: str,
    condition: str,
    *,
    schema: str | None = None,
    validate: bool = True,
    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT,
    retry_seconds: float = ddl.DEFAULT_LOCK_RETRY_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> constraint.ChangeResult:
    """Add ``CHECK (condition)`` to ``table`` without an ACCESS EXCLUSIVE table scan: ``NOT VALID`` first (an
    instant), then ``VALIDATE CONSTRAINT`` (a scan that blocks neither reads nor writes).

    Idempotent: what is done already (read from the catalog) is skipped, so a call that died between the two
    steps can simply be repeated. Runs on a connection of its own: do not call it while your own transaction holds
    locks on the table.

    Args:
        bind: the database (URL, SQLAlchemy URL, Engine or Connection: only its URL is used).
        table: the table, optionally ``schema.table``.
        name: the constraint's name.
        condition: one SQL expression over the table's columns, e.g. ``"amount >= 0"``.
        schema: the table's schema; defaults to the search path.
        validate: False stops after ``NOT VALID`` (rows written from now on are checked; existing rows are checked
            later by :func:`validate_check_constraint`).
        lock_timeout: seconds the ``ADD`` may wait for its lock per attempt (the longest the application's queries
            can queue behind it).
        retry_seconds: how long to keep retrying it.
        sleep: injected for tests.

    Returns:
        A :class:`ChangeResult` with the steps that ran (none if the constraint was there and valid already).

    Raises:
        ConstraintError: no such table, an empty condition, a condition PostgreSQL rejects, or another kind of
            constraint with that name (nothing is changed).
        ViolationError: existing rows violate the condition (one is named); the constraint is dropped again.
        LockUnavailableError: a lock could not be taken within ``retry_seconds``.
    """
    planner = add_planner(condition, validate=validate)
    return constraint.change_on_own_session(
        bind, table, name, planner, schema, lock_retry(lock_timeout, retry_seconds, sleep)
    )


validate_check_constraint = constraint.named_change(
    CHECK.plan_validate,
    "validate_check_constraint",
    """Validate the NOT VALID CHECK constraint ``name`` (from ``add_check_constraint(..., validate=False)``): a
    scan under SHARE UPDATE EXCLUSIVE, which blocks neither reads nor writes. Nothing to do if it is valid.
    Arguments as for :func:`add_check_constraint`.

    Raises:
        ConstraintError: there is no CHECK constraint of that name.
        ViolationError: existing rows violate it (one is named); it stays NOT VALID.
    """,
)

drop_check_constraint = constraint.named_change(
    CHECK.plan_drop,
    "drop_check_constraint",
    """Drop the constraint ``name`` if it exists, valid or not (the downgrade of :func:`add_check_constraint`):
    ACCESS EXCLUSIVE for an instant, under ``lock_timeout`` with retries. Arguments as for
    :func:`add_check_constraint`.""",
)
