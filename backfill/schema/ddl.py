"""The DDL of the online schema changes and the catalog look-ups that decide it, composed with :mod:`psycopg.sql`."""

from __future__ import annotations

from psycopg import sql

__all__ = [
    "not_null_name",
    "check_name",
    "set_lock_timeout",
    "reset_lock_timeout",
    "add_not_null_not_valid",
    "add_check_not_valid",
    "validate_constraint",
    "set_not_null",
    "drop_not_null",
    "drop_constraint",
    "count_nulls",
    "render",
]

#: PostgreSQL keeps the first 63 bytes of an identifier (NAMEDATALEN - 1).
_MAX_IDENTIFIER_BYTES = 63


def _clip(name: str) -> str:
    # Clipped the way the server clips (whole characters), so a catalog look-up by name finds what DDL created.
    encoded = name.encode()
    if len(encoded) <= _MAX_IDENTIFIER_BYTES:
        return name
    return encoded[:_MAX_IDENTIFIER_BYTES].decode(errors="ignore")


def not_null_name(table: str, column: str, name: str | None = None) -> str:
    """The name of a not-null constraint (PostgreSQL 18+): ``name``, or the one PostgreSQL itself would choose."""
    return _clip(name or f"{table}_{column}_not_null")


def check_name(table: str, column: str, name: str | None = None) -> str:
    """The name of the temporary ``CHECK (col IS NOT NULL)`` of the PostgreSQL 12-17 path.

    It differs from :func:`not_null_name` by default: on PostgreSQL 18, ``SET NOT NULL`` creates a not-null
    constraint with that name while the CHECK still exists.
    """
    return _clip(name or f"{table}_{column}_not_null_check")


# --- catalog -----------------------------------------------------------------------------------------------------

#: (relation oid, column name): the column's attnum and attnotnull, or no row.
COLUMN = sql.SQL(
    """
    SELECT a.attnum, a.attnotnull
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = %s AND a.attname = %s AND a.attnum > 0 AND NOT a.attisdropped
    """
)

#: (relation oid, attnum, check name): the column's not-null constraint (contype 'n', PostgreSQL 18+) and the CHECK
#: of that name, each with whether it is validated.
CONSTRAINTS = sql.SQL(
    """
    SELECT c.conname, c.contype::text, c.convalidated
      FROM pg_catalog.pg_constraint c
     WHERE c.conrelid = %s
       AND ((c.contype = 'n' AND c.conkey = ARRAY[%s]::int2[]) OR (c.contype = 'c' AND c.conname = %s))
    """
)


def count_nulls(relation: sql.Identifier, column: str) -> sql.Composed:
    """Rows whose ``column`` is NULL: only run after a validation failed, to say how many."""
    return sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(relation, sql.Identifier(column))


# --- DDL -----------------------------------------------------------------------------------------------------------


def timeout_literal(seconds: float) -> sql.Literal:
    return sql.Literal(f"{max(int(seconds * 1000), 1)}ms")


def set_lock_timeout(seconds: float, *, local: bool) -> sql.Composed:
    """``SET [LOCAL] lock_timeout``: LOCAL inside a step's own transaction, plain in an offline script."""
    return sql.SQL("SET {}lock_timeout = {}").format(sql.SQL("LOCAL " if local else ""), timeout_literal(seconds))


def reset_lock_timeout() -> sql.SQL:
    return sql.SQL("RESET lock_timeout")


#: Makes the server report (at DEBUG1) that a valid CHECK proved SET NOT NULL needs no table scan.
SHOW_PROOF = sql.SQL("SET LOCAL client_min_messages = debug1")


def add_not_null_not_valid(relation: sql.Identifier, name: str, column: str) -> sql.Composed:
    """PostgreSQL 18+: ACCESS EXCLUSIVE for an instant, no scan; new rows are checked from now on."""
    return sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} NOT NULL {} NOT VALID").format(
        relation, sql.Identifier(name), sql.Identifier(column)
    )


def add_check_not_valid(relation: sql.Identifier, name: str, column: str) -> sql.Composed:
    """PostgreSQL 12-17: ACCESS EXCLUSIVE for an instant, no scan; new rows are checked from now on."""
    return sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID").format(
        relation, sql.Identifier(name), sql.Identifier(column)
    )


def validate_constraint(relation: sql.Identifier, name: str) -> sql.Composed:
    """Scans the table under SHARE UPDATE EXCLUSIVE, which does not block reads or writes."""
    return sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(relation, sql.Identifier(name))


def set_not_null(relation: sql.Identifier, column: str) -> sql.Composed:
    """ACCESS EXCLUSIVE; skips its scan when a valid ``CHECK (col IS NOT NULL)`` proves the column has no NULL."""
    return sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(relation, sql.Identifier(column))


def drop_not_null(relation: sql.Identifier, column: str) -> sql.Composed:
    """ACCESS EXCLUSIVE for an instant; on PostgreSQL 18 it drops the column's not-null constraint, valid or not."""
    return sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL").format(relation, sql.Identifier(column))


def drop_constraint(relation: sql.Identifier, name: str, *, if_exists: bool = False) -> sql.Composed:
    return sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}{}").format(
        relation, sql.SQL("IF EXISTS " if if_exists else ""), sql.Identifier(name)
    )


def render(statement: sql.Composable) -> str:
    """A composed statement as text, without a connection (for offline scripts and log lines)."""
    return statement.as_string(None)
