"""From spec to plan: check a spec against the catalog and resolve what it leaves open (schema, key, key types).

Everything a spec can get wrong is found here, before anything is written: an unknown table or column, a key that
is not unique or cannot be walked cheaply (asked of the planner too: ``backfill.pg.walk``), an expression or filter
PostgreSQL rejects.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg.rows import class_row

from backfill.errors import KeyChangedError, KeyRoundTripError, PlanError, describe
from backfill.pg import statements as sql
from backfill.pg.walk import check_walk
from backfill.plan import Plan, Reverted, Target
from backfill.spec import REVERT_SUFFIX, BackfillSpec

__all__ = ["resolve", "checked_key"]

log = structlog.get_logger("backfill")


@dataclass(frozen=True)
class _Relation:
    """A row of ``FIND_TABLE``."""

    oid: int
    schema: str
    name: str
    kind: str
    estimated_rows: int


@dataclass(frozen=True)
class _Column:
    """A row of ``TABLE_COLUMNS``."""

    name: str
    type: str
    not_null: bool
    generated: bool
    signature: str
    oid_alias: bool


def resolve(conn: psycopg.Connection[Any], spec: BackfillSpec, *, lock_timeout: str = "5s") -> Plan:
    """Check ``spec`` against the catalog and return its plan.

    Args:
        conn: an autocommit connection.
        spec: the backfill.
        lock_timeout: how long the expression checks may wait for a lock on the table (planning an UPDATE takes
            ROW EXCLUSIVE, which queues behind a pending ALTER TABLE).

    Raises:
        PlanError: the spec does not fit the database; the message names the table, column or expression.
    """
    if spec.reverts is not None:
        return _resolve_revert(conn, spec, lock_timeout)
    name = spec.qualified_table
    with conn.transaction():
        conn.execute(sql.SET_TIMEOUTS, (lock_timeout, "60s"))
        found = (
            conn.cursor(row_factory=class_row(_Relation))
            .execute(sql.FIND_TABLE, {"schema": spec.schema, "table": spec.table})
            .fetchone()
        )
        if found is None:
            raise PlanError(f"table {name} does not exist")
        oid, schema, table = found.oid, found.schema, found.name
        name = f"{schema}.{table}"
        if found.kind not in ("r", "p"):
            raise PlanError(f"{name} is not a table (a view, sequence or foreign table cannot be backfilled)")
        _check_row_security(conn, oid, name)
        columns = {c.name: c for c in conn.cursor(row_factory=class_row(_Column)).execute(sql.TABLE_COLUMNS, (oid,))}
        for column in spec.values:
            if column not in columns:
                raise PlanError(f"column {column!r} does not exist in table {name}")
            if columns[column].generated:
                raise PlanError(f"column {column!r} of {name} is generated and cannot be set")

        key = spec.key or tuple(row[0] for row in conn.execute(sql.PRIMARY_KEY, (oid,)))
        if not key:
            raise PlanError(
                f"table {name} has no primary key: pass key= naming NOT NULL columns that lead a btree index"
            )
        for column in key:
            if column not in columns:
                raise PlanError(f"key column {column!r} does not exist in table {name}")
            if not columns[column].not_null:
                raise PlanError(f"key column {column!r} of {name} is nullable: rows with a NULL key would be skipped")
            if column in spec.values:
                raise PlanError(f"column {column!r} is part of the key and cannot be set by the backfill")
            if columns[column].oid_alias:
                raise PlanError(
                    f"key column {column!r} of {name} is of type {columns[column].type}, whose text form depends on "
                    "search_path: a checkpoint could name a different object later; walk another key"
                )
        indexes = [tuple(row[0]) for row in conn.execute(sql.BTREE_INDEXES, (oid,))]
        if not any(index[: len(key)] == key for index in indexes):
            raise PlanError(
                f"no btree index of {name} leads with ({', '.join(key)}) (in the columns' own collation and "
                "default operator class): every batch would scan the whole table"
            )
        _check_unique(conn, oid, name, key)

        target = Target(
            schema=schema,
            table=table,
            key=key,
            key_types=tuple(columns[c].type for c in key),
            values=tuple(spec.values.items()),
            where=spec.where,
            key_signature=tuple(columns[c].signature for c in key),
            skip_unchanged=spec.skip_unchanged,
            value_types=tuple(columns[c].signature for c in sorted(spec.values)),
        )
        statements = sql.for_target(target)
        for column, expression in spec.values.items():
            _check(conn, statements.check_expression(column, expression), f"expression for column {column!r} of {name}")
        if spec.where is not None:
            _check(conn, statements.check_where(), f"filter (where) on {name}")
        _check_key_round_trip(conn, target)
        _check_moving_keys(conn, oid, name, key, spec.key is not None)
        version = conn.execute(sql.SERVER_VERSION).fetchone()
    assert version is not None
    # The catalog says an index leads with the key; only the planner says whether the batches can use it.
    check_walk(conn, target)
    return Plan(
        spec=spec.with_changes(schema=schema, table=table, key=key),
        target=target,
        estimated_rows=found.estimated_rows if found.estimated_rows >= 0 else None,
        server_version=int(version[0]),
        key_signature=target.key_signature,
    )


def _find(conn: psycopg.Connection[Any], schema: str | None, table: str) -> _Relation | None:
    return (
        conn.cursor(row_factory=class_row(_Relation))
        .execute(sql.FIND_TABLE, {"schema": schema, "table": table})
        .fetchone()
    )


def _resolve_revert(conn: psycopg.Connection[Any], spec: BackfillSpec, lock_timeout: str) -> Plan:
    """The plan of a revert: walk the undo log by its key, writing back into the backfill's table (see
    ``TargetSQL._write_back``)."""
    assert spec.reverts is not None and spec.schema is not None and spec.key is not None
    undo_schema, undo_name = spec.reverts
    original = spec.name.removesuffix(REVERT_SUFFIX)
    with conn.transaction():
        conn.execute(sql.SET_TIMEOUTS, (lock_timeout, "60s"))
        undo = _find(conn, undo_schema, undo_name)
        if undo is None:
            raise PlanError(f"backfill {original!r} has no undo log any more ({undo_schema}.{undo_name} was purged)")
        table = _find(conn, spec.schema, spec.table)
        if table is None:
            raise PlanError(f"table {spec.qualified_table} does not exist")
        present = {row[0] for row in conn.execute(sql.TABLE_COLUMNS, (table.oid,))}
        for column in (*spec.key, *spec.values):
            if column not in present:
                raise PlanError(f"column {column!r} does not exist in table {spec.qualified_table}")
        columns = list(conn.cursor(row_factory=class_row(_Column)).execute(sql.TABLE_COLUMNS, (undo.oid,)))
        keys = columns[: len(spec.key)]
        version = conn.execute(sql.SERVER_VERSION).fetchone()
    assert version is not None
    target = Target(
        schema=undo_schema,
        table=undo_name,
        key=tuple(c.name for c in keys),
        key_types=tuple(c.type for c in keys),
        values=tuple((column, f"o_{i}") for i, column in enumerate(sorted(spec.values), start=1)),
        where=None,
        key_signature=tuple(c.signature for c in keys),
        skip_unchanged=False,
        reverts=Reverted(spec.schema, spec.table, spec.key, tuple(sorted(spec.values))),
    )
    return Plan(
        spec=spec,
        target=target,
        estimated_rows=undo.estimated_rows if undo.estimated_rows >= 0 else None,
        server_version=int(version[0]),
        key_signature=target.key_signature,
    )


def _check_unique(conn: psycopg.Connection[Any], oid: int, name: str, key: tuple[str, ...]) -> None:
    # A batch walks a range of N keys; with duplicate keys one "batch of N" can hold any number of rows, all locked
    # until it commits (three distinct values on 300k rows made batches of 100,000 rows).
    uniques = [row[0] for row in conn.execute(sql.UNIQUE_INDEXES, (oid,))]
    if any(None not in columns and set(columns) <= set(key) for columns in uniques):
        return
    primary = [row[0] for row in conn.execute(sql.PRIMARY_KEY, (oid,))]
    suggestion = tuple(dict.fromkeys((*key, *primary)))
    hint = (
        f": use key=({', '.join(suggestion)}) with an index leading with those columns"
        if primary and suggestion != key
        else ": add a unique index on the key's columns, or choose a unique key"
    )
    raise PlanError(
        f"key ({', '.join(key)}) of {name} is not unique (no primary key or unique index is made of its columns), "
        f"so a batch of N keys could update any number of rows{hint}"
    )


def _check_row_security(conn: psycopg.Connection[Any], oid: int, name: str) -> None:
    # Row-level security filters a batch's look-ahead and UPDATE without an error: the rows it hides would be
    # skipped and the backfill reported done. (Runner connections also pin row_security = off, which makes
    # PostgreSQL raise instead of filter if policies appear later.)
    row = conn.execute(sql.ROW_SECURITY, (oid,)).fetchone()
    assert row is not None
    enabled, forced, owner, bypass, role = row
    if enabled and not bypass and (forced or not owner):
        why = "FORCE ROW LEVEL SECURITY applies it even to the owner" if forced else "the role is not its owner"
        raise PlanError(
            f"row-level security on {name} would hide rows from role {role} ({why}): run the backfill as a role "
            "with BYPASSRLS" + ("" if forced else " or as the table's owner")
        )


def _check_key_round_trip(conn: psycopg.Connection[Any], target: Target) -> None:
    # The smallest and largest keys stand for the rest: a type whose text form loses information fails here,
    # before anything is written (every key the walk keeps is checked again in its batch).
    statements = sql.for_target(target)
    for statement in (statements.min_key(verified=True), statements.max_key(verified=True)):
        row = conn.execute(statement, ()).fetchone()
        if row is not None:
            checked_key(target, row)


def _check_moving_keys(conn: psycopg.Connection[Any], oid: int, name: str, key: tuple[str, ...], chosen: bool) -> None:
    # A row whose key changes during the run can move across the checkpoint: updated twice if it moves ahead,
    # skipped if it moves behind. What can be seen in the catalog is checked; the rest is the README's contract.
    for trigger, function, source in conn.execute(sql.BEFORE_UPDATE_TRIGGERS, (oid,)):
        for column in key:
            if _assigns(source, column):
                raise PlanError(
                    f"trigger {trigger} on {name} ({function}) sets key column {column!r} on UPDATE: rows would "
                    "move across the checkpoint and be skipped or updated twice; walk a key no trigger changes"
                )
    if chosen and tuple(row[0] for row in conn.execute(sql.PRIMARY_KEY, (oid,))) != key:
        log.warning(
            "key_not_primary_key",
            table=name,
            key=list(key),
            detail="rows whose key the application changes during the run may be skipped or updated twice",
        )
    for (constraint,) in conn.execute(sql.CASCADING_KEY_UPDATES, (oid, list(key))):
        log.warning(
            "key_updated_by_cascade",
            table=name,
            key=list(key),
            constraint=constraint,
            detail="ON UPDATE CASCADE changes key columns: rows whose key moves during the run may be skipped or "
            "updated twice",
        )


def _check(conn: psycopg.Connection[Any], statement: psycopg.sql.Composed, what: str) -> None:
    # A savepoint keeps the surrounding transaction usable after PostgreSQL rejects the statement.
    try:
        with conn.transaction():
            conn.execute(statement, ())
    except psycopg.errors.LockNotAvailable as exc:
        # Chained: the table is busy, not the spec wrong (``run_backfills`` tries it again next run).
        raise PlanError(f"{what}: could not lock the table to check it ({describe(exc, hint=True)})") from exc
    except psycopg.Error as exc:
        raise PlanError(f"{what} is not valid: {describe(exc, hint=True)}") from None


def checked_key(target: Target, row: Sequence[Any]) -> list[str]:
    """The key of a row read with a ``verified=True`` statement (its text form, whether that form reads back as
    the same key, whether the key columns are still of the planned types and collations).

    Raises:
        KeyRoundTripError: the text form does not read back; the caller's transaction must roll back.
        KeyChangedError: a key column's type or collation changed since the run planned.
    """
    *key, same, unchanged = row
    if not unchanged:
        raise key_changed_error(target)
    if not same:
        raise KeyRoundTripError(
            f"key ({', '.join(target.key)}) of {target.schema}.{target.table}: the text form {key} does not read "
            f"back as the same value of type {', '.join(target.key_types)}, so a checkpoint cannot hold it exactly"
        )
    return [str(part) for part in key]


def key_changed_error(target: Target) -> KeyChangedError:
    """The error for a key column whose type, modifier or collation changed since the run planned."""
    return KeyChangedError(
        f"the key ({', '.join(target.key)}) of {target.schema}.{target.table} is no longer "
        f"{', '.join(target.key_signature)}: its type or collation changed during the run, so the checkpoint "
        "would be read in a different order; register the backfill again under a new name"
    )


def _assigns(source: str, column: str) -> bool:
    """Whether a PL/pgSQL or SQL function body has a statement assigning ``NEW.column`` (a heuristic: statements
    start after ``;``, ``BEGIN``, ``THEN``, ``ELSE`` or ``LOOP``; an ``IF NEW.col = ...`` test is not one)."""
    quoted = '"' + column.replace('"', '""') + '"'
    names = [re.escape(quoted)] + ([re.escape(column)] if re.fullmatch(r"[a-z_][a-z0-9_$]*", column) else [])
    pattern = r"(?:^|;|\bbegin\b|\bthen\b|\belse\b|\bloop\b)\s*new\s*\.\s*(?:" + "|".join(names) + r")\s*(?::=|=(?!=))"
    return re.search(pattern, source, re.IGNORECASE | re.MULTILINE) is not None
