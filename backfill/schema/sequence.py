"""How far an integer key is from its type's limit: the question that decides when an ``integer`` primary key must
become ``bigint`` (nextval fails with "reached maximum value" and every insert of the application with it).

Reads the catalog and the key's sequence (serial or identity), or, for a key without one, its largest value through
its index; writes nothing and takes no lock beyond ACCESS SHARE for an instant.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from backfill.pg import statements
from backfill.pg.connect import Bind
from backfill.schema.notnull import ConstraintError, DDLSession, find_table, own_session

__all__ = ["KeyHeadroom", "read_key_headroom", "key_headroom"]

#: The largest value of each integer type.
TYPE_LIMITS = {"smallint": 2**15 - 1, "integer": 2**31 - 1, "bigint": 2**63 - 1}

#: (relation oid, column): the column's type and its sequence (serial or identity), qualified, or NULL.
_COLUMN_SEQUENCE = sql.SQL(
    """
    SELECT pg_catalog.format_type(a.atttypid, NULL),
           pg_catalog.pg_get_serial_sequence(a.attrelid::regclass::text, a.attname)
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = %s AND a.attname = %s AND a.attnum > 0 AND NOT a.attisdropped
    """
)

#: (sequence, qualified): its last value (NULL before its first nextval) and its own maximum.
_SEQUENCE = sql.SQL(
    """
    SELECT s.last_value, s.max_value, s.increment_by
      FROM pg_catalog.pg_sequences s
     WHERE pg_catalog.to_regclass(pg_catalog.quote_ident(s.schemaname) || '.' || pg_catalog.quote_ident(s.sequencename))
           = pg_catalog.to_regclass(%s)
    """
)


@dataclass(frozen=True)
class KeyHeadroom:
    """An integer key and how much room its values have left."""

    table: str
    column: str
    #: ``smallint``, ``integer`` or ``bigint``
    column_type: str
    #: the key's sequence, qualified; None when values come from elsewhere
    sequence: str | None
    #: the sequence's last value, or the column's largest value when there is no sequence; None when nothing was
    #: handed out yet
    current: int | None
    #: the largest value the key can take: the type's limit, or the sequence's own maximum if lower
    limit: int

    @property
    def remaining(self) -> int:
        return self.limit - (self.current or 0)

    @property
    def used(self) -> float:
        """The fraction of the positive range handed out, 0.0 to 1.0."""
        return max(0.0, min(1.0, (self.current or 0) / self.limit))

    def describe(self) -> str:
        """One line, e.g. ``public.orders.id (integer, sequence public.orders_id_seq): 2,000,000,000 of
        2,147,483,647 used (93.1%), 147,483,647 left``."""
        source = f", sequence {self.sequence}" if self.sequence else ", no sequence: its largest value"
        return (
            f"{self.table}.{self.column} ({self.column_type}{source}): {self.current or 0:,} of {self.limit:,} "
            f"used ({self.used:.1%}), {self.remaining:,} left"
        )


def read_key_headroom(session: DDLSession, table: str, column: str | None = None, *, schema: str | None) -> KeyHeadroom:
    """The headroom of ``column`` of ``table`` (default: its primary key, which must be one integer column).

    Raises:
        ConstraintError: no such table or column, no single-column primary key, or not an integer column.
    """
    oid, schema, table = find_table(session, table, schema)
    qualified = f"{schema}.{table}"
    if column is None:
        key = [row[0] for row in session.fetchall(statements.PRIMARY_KEY, (oid,))]
        if len(key) != 1:
            raise ConstraintError(f"{qualified} has no single-column primary key: name the column")
        column = str(key[0])
    found = session.fetchall(_COLUMN_SEQUENCE, (oid, column))
    if not found:
        raise ConstraintError(f"column {column!r} does not exist in table {qualified}")
    column_type, sequence = str(found[0][0]), found[0][1]
    if column_type not in TYPE_LIMITS:
        raise ConstraintError(f"{qualified}.{column} is {column_type}, not an integer column")
    limit = TYPE_LIMITS[column_type]
    current: int | None = None
    if sequence is not None:
        rows = session.fetchall(_SEQUENCE, (sequence,))
        if rows:
            last, maximum, increment = rows[0]
            current = None if last is None else int(last)
            if int(increment) > 0:
                limit = min(limit, int(maximum))
    else:
        relation = sql.Identifier(schema, table)
        largest = session.fetchall(sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(column), relation))
        current = None if largest[0][0] is None else int(largest[0][0])
    return KeyHeadroom(qualified, column, column_type, None if sequence is None else str(sequence), current, limit)


def key_headroom(bind: Bind, table: str, column: str | None = None, *, schema: str | None = None) -> KeyHeadroom:
    """How far an integer key (default: the primary key) is from its type's limit, from its sequence's last value
    (serial or identity) or, without a sequence, its largest value. ``describe()`` says it in one line.

    Raises:
        ConstraintError: no such table or column, no single-column primary key, or not an integer column.
    """
    with own_session(bind) as session:
        return read_key_headroom(session, table, column, schema=schema)
