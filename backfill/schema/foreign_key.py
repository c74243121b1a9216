"""Foreign keys on live tables: ``ADD CONSTRAINT ... FOREIGN KEY ... NOT VALID`` (SHARE ROW EXCLUSIVE on both tables
for an instant, under a short ``lock_timeout``, retried with backoff), then ``VALIDATE CONSTRAINT`` (a scan of the
referencing table under SHARE UPDATE EXCLUSIVE, ROW SHARE on the referenced one: reads and writes go on). A plain
``ADD FOREIGN KEY`` would hold SHARE ROW EXCLUSIVE on both tables, blocking every write to either, for the whole scan.

Without an index on the referencing columns, every delete (and key update) on the referenced table scans the
referencing table: the plan says so, with the index to build.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from psycopg import sql

from backfill.pg.connect import Bind
from backfill.schema import ddl
from backfill.schema.constraint import (
    ChangeResult,
    ConstraintKind,
    ConstraintPlan,
    ConstraintState,
    Planner,
    change_on_own_session,
    named_change,
    server_detail,
)
from backfill.schema.notnull import ConstraintError, DDLSession, Step, StepAction, column_names, find_table, lock_retry
from backfill.spec import split_table

__all__ = [
    "ForeignKey",
    "foreign_key",
    "fk_name",
    "plan_add_foreign_key",
    "add_planner",
    "FOREIGN_KEY",
    "index_advice",
    "describe_violation",
    "add_foreign_key",
    "validate_foreign_key",
    "drop_foreign_key",
]

log = structlog.get_logger("backfill")


@dataclass(frozen=True)
class ForeignKey:
    """A foreign key as asked for: ``columns`` of the table reference ``referent_columns`` of ``referent``."""

    columns: tuple[str, ...]
    referent: str
    referent_columns: tuple[str, ...]
    on_delete: str | None = None
    referent_schema: str | None = None


def foreign_key(
    columns: str | Sequence[str],
    referent_table: str,
    referent_columns: str | Sequence[str],
    *,
    on_delete: str | None = None,
) -> ForeignKey:
    """Check the arguments of a foreign key.

    Raises:
        ConstraintError: no columns, different numbers of columns on both sides, or an unknown ON DELETE action.
    """
    local = column_names(columns)
    remote = column_names(referent_columns, "referent_columns")
    if len(local) != len(remote):
        raise ConstraintError(
            f"a foreign key needs as many referent_columns as columns: {list(local)} -> {list(remote)}"
        )
    action = None
    if on_delete is not None:
        action = " ".join(str(on_delete).upper().split())
        if action not in ddl.ON_DELETE_ACTIONS:
            raise ConstraintError(
                f"on_delete must be one of {', '.join(ddl.ON_DELETE_ACTIONS)} (or None), got {on_delete!r}"
            )
    schema, referent_table = split_table(referent_table)
    return ForeignKey(local, referent_table, remote, action, schema)


def fk_name(table: str, columns: str | Sequence[str], name: str | None = None) -> str:
    """``name``, or PostgreSQL's own pattern ``table_col_fkey``."""
    return name or ddl.derived_name(split_table(table)[1], column_names(columns), "fkey")


def _referent(session: DDLSession, state: ConstraintState, key: ForeignKey) -> sql.Identifier:
    """The referenced table, once it and the columns on both sides are found to exist.

    Raises:
        ConstraintError: a table or column does not exist.
    """
    _check_columns(session, state.oid, state.qualified, key.columns)
    oid, ref_schema, ref_table = find_table(session, key.referent, key.referent_schema)
    _check_columns(session, oid, f"{ref_schema}.{ref_table}", key.referent_columns)
    return sql.Identifier(ref_schema, ref_table)


def _check_columns(session: DDLSession, oid: int | None, table: str, columns: Sequence[str]) -> None:
    for column in columns:
        if not session.fetchall(ddl.COLUMN, (oid, column)):
            raise ConstraintError(f"column {column!r} does not exist in table {table}")


def plan_add_foreign_key(
    state: ConstraintState, key: ForeignKey, referent: sql.Identifier, *, validate: bool = True
) -> ConstraintPlan:
    """``ADD CONSTRAINT ... FOREIGN KEY ... NOT VALID`` unless it exists, then ``VALIDATE`` (unless ``validate``
    is false or it is valid already)."""
    add = ddl.add_foreign_key_not_valid(
        state.relation, state.name, key.columns, referent, key.referent_columns, key.on_delete
    )
    statement = ddl.locked_in_either_order(add, state.relation, [referent], ddl.SHARE_ROW_EXCLUSIVE)
    return FOREIGN_KEY.plan_add(state, Step(StepAction.ADD, statement, True), validate=validate)


def add_planner(key: ForeignKey, *, validate: bool) -> Planner:
    """Plans :func:`plan_add_foreign_key`: online, once the tables and columns are found (with the advice of
    :func:`index_advice`); offline (no session), with the referenced table as named."""

    def plan(state: ConstraintState, session: DDLSession | None) -> ConstraintPlan:
        if session is None:
            schema = key.referent_schema
            referent = sql.Identifier(schema, key.referent) if schema else sql.Identifier(key.referent)
            return plan_add_foreign_key(state, key, referent, validate=validate)
        plan = plan_add_foreign_key(state, key, _referent(session, state, key), validate=validate)
        advice = index_advice(session, state, key)
        return plan if advice is None else dataclasses.replace(plan, advice=(advice,))

    return plan


def index_advice(session: DDLSession, state: ConstraintState, key: ForeignKey) -> str | None:
    """Advice when no valid index of the referencing table starts with the key's columns (logged as
    ``foreign_key_unindexed``): deletes and key updates on the referenced table would scan this table."""
    if session.fetchall(ddl.INDEX_LEADS_WITH, {"oid": state.oid, "n": len(key.columns), "columns": list(key.columns)})[
        0
    ][0]:
        return None
    columns = key.columns[0] if len(key.columns) == 1 else list(key.columns)
    advice = (
        f"no index on {state.qualified} ({', '.join(key.columns)}): every delete or key update on {key.referent} "
        f"scans {state.qualified} to check foreign key {state.name!r}; build one with "
        f"op.add_index_concurrently({state.table!r}, {columns!r})"
    )
    log.warning("foreign_key_unindexed", table=state.qualified, constraint=state.name, advice=advice)
    return advice


def describe_violation(session: DDLSession, state: ConstraintState, exc: BaseException) -> str | None:
    """The server names the first row it found: ``Key (owner_id)=(7) is not present in table "owners"``."""
    del session, state
    detail = server_detail(exc)
    return f"e.g. {detail[0].lower()}{detail[1:]}" if detail else None


FOREIGN_KEY = ConstraintKind("f", "foreign key", describe_violation)


def add_foreign_key(
    bind: Bind,
    table: str,
    columns: str | Sequence[str],
    referent_table: str,
    referent_columns: str | Sequence[str],
    *,
    name: str | None = None,
    on_delete: str | None = None,
    validate: bool = True,
    schema: str | None = None,
    lock_timeout: float = ddl.DEFAULT_LOCK_TIMEOUT,
    retry_seconds: float = ddl.DEFAULT_LOCK_RETRY_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> ChangeResult:
    """Add a foreign key from ``table`` (``columns``) to ``referent_table`` (``referent_columns``) without blocking
    writes for a scan: ``NOT VALID`` first (an instant of SHARE ROW EXCLUSIVE on both tables), then ``VALIDATE
    CONSTRAINT`` (a scan that blocks neither reads nor writes).

    Idempotent from the catalog: a call that died between the two steps can be repeated. If no index of ``table``
    starts with ``columns``, the result's ``advice`` (and a ``foreign_key_unindexed`` warning) names the index to
    build: without it, deletes on the referenced table scan this one.

    Args:
        bind: the database (URL, SQLAlchemy URL, Engine or Connection: only its URL is used).
        table: the referencing table, optionally ``schema.table``.
        columns: its column(s).
        referent_table: the referenced table, optionally ``schema.table``.
        referent_columns: its column(s), with a primary key or unique constraint over them.
        name: the constraint's name (default ``table_col_fkey``).
        on_delete: ``CASCADE``, ``SET NULL``, ``SET DEFAULT``, ``RESTRICT`` or ``NO ACTION``.
        validate: False stops after ``NOT VALID`` (finish with :func:`validate_foreign_key`).
        schema: ``table``'s schema; defaults to the search path.
        lock_timeout: seconds the ``ADD`` may wait for its locks per attempt.
        retry_seconds: how long to keep retrying it.
        sleep: injected for tests.

    Raises:
        ConstraintError: bad arguments, an unknown table or column, a key PostgreSQL refuses (no unique constraint
            on the referenced columns, types that do not match), or another kind of constraint with that name.
        ViolationError: rows reference keys that do not exist (one is named); the constraint is dropped again.
        LockUnavailableError: a lock could not be taken within ``retry_seconds``.
    """
    key = foreign_key(columns, referent_table, referent_columns, on_delete=on_delete)
    retry = lock_retry(lock_timeout, retry_seconds, sleep)
    name = fk_name(table, key.columns, name)
    return change_on_own_session(bind, table, name, add_planner(key, validate=validate), schema, retry)


validate_foreign_key = named_change(
    FOREIGN_KEY.plan_validate,
    "validate_foreign_key",
    """Validate the NOT VALID foreign key ``name`` of ``table``: a scan that blocks neither reads nor writes.
    Nothing to do if it is valid. Arguments as for :func:`add_foreign_key`.

    Raises:
        ConstraintError: ``table`` has no foreign key of that name.
        ViolationError: rows reference keys that do not exist (one is named); it stays NOT VALID.
    """,
)

drop_foreign_key = named_change(
    FOREIGN_KEY.plan_drop,
    "drop_foreign_key",
    """Drop the foreign key ``name`` of ``table`` if it exists, valid or not (the downgrade of
    :func:`add_foreign_key`): ACCESS EXCLUSIVE on ``table`` for an instant, under ``lock_timeout`` with retries.""",
)
