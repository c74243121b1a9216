"""``keep_in_sync``: a row trigger that applies a backfill's values to the rows the application writes.

During a rolling deploy, code that does not know a new column keeps inserting rows with it empty, after the
backfill has fixed its key range (and after the column becomes NOT NULL, when those inserts would fail). The
trigger fills the column for them, exactly as the backfill fills it, so the backfill's end state holds for every row
whoever wrote it.

The rule, per column the backfill sets:

* the application **left the column empty** when, on INSERT, it is NULL in the new row (the statement did not
  name it and its default is NULL, or it wrote NULL); on UPDATE, it is NULL in the new row and was NULL in the old
  one (the statement did not set it, and nothing had filled it yet);
* the column then gets the backfill's value, computed from the new row, if the backfill's ``where`` holds for the
  new row as the application wrote it;
* any non-NULL value is the application's and is never overwritten: new code's writes always win, and so do
  values the backfill already wrote. A column with a non-NULL default counts as written on INSERT.

The trigger's ``WHEN (col IS NULL ...)`` clause is checked before the function is called, so a write that sets every
column (new code, and the backfill's own batches, which set the same values) costs one NULL test and no function
call. The function body is plain PL/pgSQL: its one query is planned once per session and cached.

**Mirror mode** (``mirror=True``, for a column type change's shadow column): every INSERT and every UPDATE gets the
backfill's values, whatever the application wrote into those columns, so the shadow column always holds what the
expressions make of the row as it is now (an UPDATE of the old column is mirrored too, not only rows left NULL).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from psycopg import sql

from backfill.plan import Target
from backfill.schema.ddl import _MAX_IDENTIFIER_BYTES, dollar_quote
from backfill.schema.notnull import DDLSession, LockRetry, Step, StepAction, run_step

__all__ = [
    "trigger_name",
    "create_function",
    "create_trigger",
    "trigger_statement",
    "drop_trigger",
    "drop_function",
    "install_steps",
    "drop_steps",
    "trigger_exists",
    "install_sync_trigger",
    "drop_sync_trigger",
]

_PREFIX = "backfill_sync_"


def trigger_name(backfill: str) -> str:
    """The trigger's (and its function's) name for backfill ``backfill``: ``backfill_sync_<name>``, or, when that
    is longer than PostgreSQL's 63 bytes, its first bytes and a digest of the whole name, so two long names that
    share a beginning never collide."""
    name = _PREFIX + backfill
    if len(name.encode()) <= _MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha256(backfill.encode()).hexdigest()[:10]
    room = _MAX_IDENTIFIER_BYTES - len(digest) - 1
    return name.encode()[:room].decode(errors="ignore") + "_" + digest


def _function(target: Target, backfill: str) -> sql.Identifier:
    return sql.Identifier(target.schema, trigger_name(backfill))


def _all(prefix: str, columns: Sequence[str], test: str, joiner: str) -> sql.Composable:
    tests = (sql.SQL("{}.{} {}").format(sql.SQL(prefix), sql.Identifier(c), sql.SQL(test)) for c in columns)
    return sql.SQL(joiner).join(tests)


def create_function(target: Target, backfill: str, *, mirror: bool = False) -> sql.Composed:
    """``CREATE OR REPLACE FUNCTION`` of the trigger function (no lock on the table); ``mirror``: every write gets
    the values, not only the columns the application left NULL."""
    columns = [column for column, _ in target.values]
    # The author's expressions and filter see the new row's columns by name, as in the batch's UPDATE (the subquery
    # carries the table's name, so a qualified ``events.payload`` resolves too); #variable_conflict lets a column
    # that shares a name with a PL/pgSQL variable mean the column.
    computed = sql.SQL(", ").join(
        sql.SQL("({}) AS {}").format(sql.SQL(expression), sql.Identifier(f"c{i}"))
        for i, (_, expression) in enumerate(target.values, start=1)
    )
    where = sql.SQL(" WHERE ({})").format(sql.SQL(target.where)) if target.where else sql.SQL("")

    def fills(condition: str) -> sql.Composable:
        return sql.SQL("\n    ").join(
            sql.SQL("IF {cond} THEN NEW.{col} := filled.{c}; END IF;").format(
                cond=sql.SQL(condition.format(col=sql.Identifier(column).as_string(None))),
                col=sql.Identifier(column),
                c=sql.Identifier(f"c{i}"),
            )
            for i, column in enumerate(columns, start=1)
        )

    if mirror:
        body = sql.SQL(
            """#variable_conflict use_column
DECLARE
  filled record;
BEGIN
  SELECT {computed} INTO filled FROM (SELECT NEW.*) AS {alias}{where};
  IF FOUND THEN
    {assign}
  END IF;
  RETURN NEW;
END"""
        ).format(computed=computed, alias=sql.Identifier(target.table), where=where, assign=fills("TRUE"))
        return _function_statement(target, backfill, body)
    body = sql.SQL(
        """#variable_conflict use_column
DECLARE
  filled record;
BEGIN
  IF TG_OP = 'UPDATE' THEN
    -- Every column the backfill sets had a value before this statement: nothing of ours to fill.
    IF {old_all_set} THEN RETURN NEW; END IF;
  END IF;
  SELECT {computed} INTO filled FROM (SELECT NEW.*) AS {alias}{where};
  IF NOT FOUND THEN RETURN NEW; END IF;
  IF TG_OP = 'INSERT' THEN
    {insert_fills}
  ELSE
    {update_fills}
  END IF;
  RETURN NEW;
END"""
    ).format(
        old_all_set=_all("OLD", columns, "IS NOT NULL", " AND "),
        computed=computed,
        alias=sql.Identifier(target.table),
        where=where,
        insert_fills=fills("NEW.{col} IS NULL"),
        update_fills=fills("NEW.{col} IS NULL AND OLD.{col} IS NULL"),
    )
    return _function_statement(target, backfill, body)


def _function_statement(target: Target, backfill: str, body: sql.Composed) -> sql.Composed:
    # SET search_path FROM CURRENT: the author's names resolve as they did where the backfill was registered, not
    # by each writing session's search_path (an application session with another one must never fail its write).
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS {}"
    ).format(_function(target, backfill), dollar_quote(body.as_string(None), "backfill_sync"))


def create_trigger(target: Target, backfill: str, *, mirror: bool = False) -> sql.Composed:
    """A ``DO`` block that creates the trigger unless it exists (idempotent on every version from 12 on, where
    ``CREATE OR REPLACE TRIGGER`` is 14+). CREATE TRIGGER takes SHARE ROW EXCLUSIVE on the table for an instant:
    run it under a short lock_timeout. A ``mirror`` trigger fires on every row written (no ``WHEN``)."""
    relation = sql.Identifier(target.schema, target.table)
    inner = sql.SQL(
        """BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger
                  WHERE tgrelid = pg_catalog.to_regclass({relation_text}) AND tgname = {name_text}) THEN
    {create};
  END IF;
END"""
    ).format(
        relation_text=sql.Literal(relation.as_string(None)),
        name_text=sql.Literal(trigger_name(backfill)),
        create=trigger_statement(target, backfill, mirror=mirror),
    )
    return sql.SQL("DO {}").format(dollar_quote(inner.as_string(None), "backfill_sync"))


def trigger_statement(target: Target, backfill: str, *, mirror: bool = False) -> sql.Composed:
    """The plain ``CREATE TRIGGER`` (fails if it exists: :func:`create_trigger` is the idempotent form)."""
    columns = [column for column, _ in target.values]
    return sql.SQL(
        "CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON {relation} FOR EACH ROW{when}\n"
        "      EXECUTE FUNCTION {function}()"
    ).format(
        name=sql.Identifier(trigger_name(backfill)),
        relation=sql.Identifier(target.schema, target.table),
        when=sql.SQL("") if mirror else sql.SQL(" WHEN ({})").format(_all("NEW", columns, "IS NULL", " OR ")),
        function=_function(target, backfill),
    )


def drop_trigger(schema: str, table: str, backfill: str) -> sql.Composed:
    """``DROP TRIGGER IF EXISTS``: ACCESS EXCLUSIVE on the table for an instant."""
    return sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
        sql.Identifier(trigger_name(backfill)), sql.Identifier(schema, table)
    )


def drop_function(schema: str, backfill: str) -> sql.Composed:
    return sql.SQL("DROP FUNCTION IF EXISTS {}()").format(sql.Identifier(schema, trigger_name(backfill)))


def install_steps(target: Target, backfill: str, *, mirror: bool = False) -> list[Step]:
    """The function (no table lock), then the trigger (an instant of SHARE ROW EXCLUSIVE)."""
    return [
        Step(StepAction.CREATE_SYNC_FUNCTION, create_function(target, backfill, mirror=mirror), False),
        Step(StepAction.CREATE_SYNC_TRIGGER, create_trigger(target, backfill, mirror=mirror), True),
    ]


def drop_steps(schema: str, table: str, backfill: str) -> list[Step]:
    return [
        Step(StepAction.DROP_SYNC_TRIGGER, drop_trigger(schema, table, backfill), True),
        Step(StepAction.DROP_SYNC_FUNCTION, drop_function(schema, backfill), False),
    ]


#: (schema, table, trigger name): whether the trigger exists.
TRIGGER_EXISTS = sql.SQL(
    """
    SELECT count(*) > 0 FROM pg_catalog.pg_trigger t
     WHERE t.tgrelid = pg_catalog.to_regclass(pg_catalog.quote_ident(%s) || '.' || pg_catalog.quote_ident(%s))
       AND t.tgname = %s
    """
)


def trigger_exists(session: DDLSession, schema: str, table: str, backfill: str) -> bool:
    return bool(session.fetchall(TRIGGER_EXISTS, (schema, table, trigger_name(backfill)))[0][0])


def install_sync_trigger(
    session: DDLSession, target: Target, backfill: str, retry: LockRetry | None = None, *, mirror: bool = False
) -> None:
    """Install (or refresh) the keep_in_sync trigger of ``backfill`` on its table (``mirror``: one that gives every
    written row the values, see the module docstring). Idempotent; the trigger step waits at most
    ``retry.lock_timeout`` per attempt for its lock and is retried with backoff.

    Raises:
        LockUnavailableError: the table stayed locked for the whole retry budget.
    """
    for step in install_steps(target, backfill, mirror=mirror):
        run_step(session, step, retry or LockRetry())


def drop_sync_trigger(
    session: DDLSession, schema: str, table: str, backfill: str, retry: LockRetry | None = None
) -> bool:
    """Drop the keep_in_sync trigger of ``backfill`` and its function, if they exist. Returns whether the trigger
    existed. A table that no longer exists took its trigger with it."""
    existed = trigger_exists(session, schema, table, backfill)
    steps = drop_steps(schema, table, backfill)
    if not existed:
        steps = steps[1:]
    for step in steps:
        run_step(session, step, retry or LockRetry())
    return existed
