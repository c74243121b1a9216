"""A connection we were handed (a SQLAlchemy ``Connection``, e.g. Alembic's): what its search_path makes of a
table name, and a session that runs composed statements on it whatever its driver (psycopg, psycopg2, asyncpg).

Batches and DDL steps run on connections of our own, which know nothing of the caller's session: so a name is
resolved here, on the caller's connection, and the schema it found is pinned. Statements reach the driver as text
with their values inlined and no parameters: asyncpg has no ``%s`` placeholders, and psycopg2 would read a ``%`` in
a name or a literal as one.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy
from psycopg import sql

from backfill.errors import PlanError
from backfill.pg import statements
from backfill.spec import split_table

__all__ = ["qualify", "SQLAlchemySession"]

_TEMP_SCHEMA_PREFIX = "pg_temp_"

_BEGIN, _COMMIT, _ROLLBACK = "BEGIN", "COMMIT", "ROLLBACK"


#: psycopg's placeholders (``%s``, ``%(name)s``) and its escaped ``%%``.
_PLACEHOLDER = re.compile(r"%(?:(%)|s|\((\w+)\)s)")

Params = Sequence[Any] | Mapping[str, Any]


def _render(statement: sql.Composable, params: Params = ()) -> str:
    """The statement as text with ``params`` bound client-side, as psycopg binds them: without parameters the text
    is left as it is (a ``%`` stays a ``%``)."""
    text = statement.as_string(None)
    if not params:
        return text
    positional = iter(params) if not isinstance(params, Mapping) else iter(())

    def bind(match: re.Match[str]) -> str:
        if match.group(1):
            return "%"
        name = match.group(2)
        value = params[name] if name is not None and isinstance(params, Mapping) else next(positional)
        return sql.Literal(value).as_string(None)

    return _PLACEHOLDER.sub(bind, text)


def _rows(connection: sqlalchemy.Connection, statement: sql.Composable, params: Params = ()) -> list[tuple[Any, ...]]:
    raw = connection.execution_options(no_parameters=True)
    return [tuple(row) for row in raw.exec_driver_sql(_render(statement, params))]


def qualify(connection: sqlalchemy.Connection, table: str, schema: str | None = None) -> tuple[str | None, str]:
    """``(schema, table)`` of the table that ``table`` (optionally ``schema.table``) names on ``connection``, as its
    search_path resolves it; unchanged when there is no such table (the caller's own checks then report it).

    Raises:
        PlanError: it is a temporary table: connections other than ``connection`` cannot see it.
    """
    schema, table = split_table(table, schema)
    opened = not connection.in_transaction()
    try:
        found = _rows(connection, statements.FIND_TABLE, {"schema": schema, "table": table})
    finally:
        if opened:
            # Leave the caller's connection as we found it: no transaction of ours left open on it.
            connection.rollback()
    if not found:
        return schema, table
    _, found_schema, found_table, _, _ = found[0]
    if str(found_schema).startswith(_TEMP_SCHEMA_PREFIX):
        raise PlanError(
            f"table {table} is a temporary table of this session: backfill works on connections of its own, which "
            "cannot see it; use a regular (or UNLOGGED) table"
        )
    return str(found_schema), str(found_table)


class SQLAlchemySession:
    """A :class:`backfill.schema.notnull.DDLSession` on a SQLAlchemy connection in autocommit mode (Alembic's,
    inside ``autocommit_block()``): each call is an explicit transaction of its own, so ``SET LOCAL`` ends with
    it. Server notices (the proof that SET NOT NULL skipped its scan) are seen on psycopg 3 only."""

    def __init__(self, connection: sqlalchemy.Connection) -> None:
        self.connection = connection.execution_options(no_parameters=True)

    def _psycopg(self) -> Any:
        dbapi = self.connection.connection.dbapi_connection
        return dbapi if hasattr(dbapi, "add_notice_handler") else None

    def _transaction(self, statements: Sequence[sql.Composable], params: Params = ()) -> list[tuple[Any, ...]]:
        """Run ``statements`` in one transaction, ``params`` bound into the last; return its rows."""
        self.connection.exec_driver_sql(_BEGIN)
        rows: list[tuple[Any, ...]] = []
        try:
            for number, statement in enumerate(statements, 1):
                text = _render(statement, params if number == len(statements) else ())
                result = self.connection.exec_driver_sql(text)
                rows = [tuple(row) for row in result] if result.returns_rows else []
        except BaseException:
            with contextlib.suppress(Exception):  # a lost connection: the error above says so
                self.connection.exec_driver_sql(_ROLLBACK)
            raise
        self.connection.exec_driver_sql(_COMMIT)
        return rows

    def fetchall(
        self, statement: sql.Composable, params: Params = (), *, before: Sequence[sql.Composable] = ()
    ) -> list[tuple[Any, ...]]:
        return self._transaction([*before, statement], params)

    def run(self, statements: Sequence[sql.Composable], *, capture_notices: bool = False) -> list[str]:
        seen: list[str] = []
        raw = self._psycopg() if capture_notices else None

        def handler(diag: Any) -> None:
            seen.append(diag.message_primary or "")

        if raw is not None:
            raw.add_notice_handler(handler)
        try:
            self._transaction(statements)
        finally:
            if raw is not None:
                raw.remove_notice_handler(handler)
        return seen

    def execute(self, statement: sql.Composable) -> None:
        # Inside Alembic's autocommit block no BEGIN is sent: this runs outside any transaction block (CREATE
        # INDEX CONCURRENTLY needs that).
        self.connection.exec_driver_sql(_render(statement))
