"""What the Alembic ops render offline (``alembic upgrade --sql``): PL/pgSQL blocks a DBA runs with psql.

The backfill script is assembled from the runner's own batch statements (``backfill.pg.statements``), so a
backfill run by psql walks the table exactly as the runner does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from psycopg import sql

from backfill.pg.statements import TargetSQL, state_literal
from backfill.schema.ddl import timeout_literal
from backfill.state import RunState

__all__ = ["batched_script", "finished_gate"]

_PLACEHOLDER = re.compile(r"%(%|s)")


def _positional(text: str, first: int = 1) -> str:
    """psycopg's ``%s`` placeholders as ``$1, $2, ...`` for PL/pgSQL's EXECUTE ... USING, ``%%`` back to ``%``."""
    counter = iter(range(first, 10_000))
    return _PLACEHOLDER.sub(lambda m: "%" if m.group(1) == "%" else f"${next(counter)}", text)


def _type_marker(position: int) -> str:
    # Stands in for a key column's type in the statement templates; the script swaps in the type it reads from
    # the catalog when it runs (offline, nothing is known about the database).
    return f"__backfill_key_type_{position}__"


def _dollar_quote(body: str, tag: str) -> sql.Composed:
    while f"${tag}$" in body:
        tag += "_"
    return sql.SQL("${tag}$\n{body}\n${tag}$").format(tag=sql.SQL(tag), body=sql.SQL(body))


def batched_script(
    *,
    name: str,
    schema: str,
    table: str,
    key: Sequence[str],
    values: Sequence[tuple[str, str]],
    where: str | None,
    batch_size: int,
    lock_timeout: float,
    max_attempts: int = 20,
) -> sql.Composed:
    """A ``DO`` block that runs a backfill in batches of ``batch_size`` rows, committing each one.

    It walks the key exactly like the runner (upper bound fixed first, look-ahead to the batch's last key, update of
    the closed key range), retries a batch that meets a lock timeout with backoff, and must run outside a
    transaction block (COMMIT inside DO needs that). No control table is involved: a DBA runs it from psql.
    """
    n = len(key)
    target = TargetSQL(
        schema=schema,
        table=table,
        key=tuple(key),
        key_types=tuple(_type_marker(i) for i in range(1, n + 1)),
        values=tuple(values),
        where=where,
    )

    def template(statement: sql.Composable) -> str:
        return _positional(statement.as_string(None))

    def names(prefix: str) -> str:
        return ", ".join(f"{prefix}_{i}" for i in range(1, n + 1))

    def typed(text: str) -> sql.Composable:
        # The statement text as a literal, with each key type marker replaced at run time.
        composed: sql.Composable = sql.Literal(text)
        for i in range(1, n + 1):
            composed = sql.SQL("replace({}, {}, t_{})").format(composed, sql.Literal(_type_marker(i)), sql.SQL(str(i)))
        return composed

    lower, upper, end = names("lo"), names("up"), names("en")
    relation = sql.Literal(sql.Identifier(schema, table).as_string(None))
    declarations = [f"t_{i} text; lo_{i} text; up_{i} text; en_{i} text;" for i in range(1, n + 1)]
    type_lookups = sql.SQL("\n  ").join(
        sql.SQL(
            "SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) INTO t_{i} FROM pg_catalog.pg_attribute a "
            "WHERE a.attrelid = pg_catalog.to_regclass({rel}) AND a.attname = {col} AND NOT a.attisdropped;\n  "
            "IF t_{i} IS NULL THEN RAISE EXCEPTION 'backfill %: no key column % in %', {bf}, {col}, {rel}; END IF;"
        ).format(i=sql.SQL(str(i)), rel=relation, col=sql.Literal(column), bf=sql.Literal(name))
        for i, column in enumerate(key, start=1)
    )
    done = " AND ".join(f"en_{i} = up_{i}" for i in range(1, n + 1))
    body = sql.SQL(
        """DECLARE
  {declarations}
  q_max text := {q_max};
  q_first text; q_next text; u_first text; u_next text;
  batch_rows bigint; total bigint := 0; batches bigint := 0; attempt int;
BEGIN
  {type_lookups}
  q_first := {q_first};
  q_next := {q_next};
  u_first := {u_first};
  u_next := {u_next};
  EXECUTE q_max INTO {upper};
  IF up_1 IS NULL THEN
    RAISE NOTICE 'backfill %: the table is empty', {bf};
    RETURN;
  END IF;
  LOOP
    attempt := 0;
    LOOP
      BEGIN
        PERFORM pg_catalog.set_config('lock_timeout', {lock_timeout}, true);
        IF lo_1 IS NULL THEN
          EXECUTE q_first INTO {end} USING {upper}, {batch_size} - 1;
          IF en_1 IS NULL THEN SELECT {upper} INTO {end}; END IF;
          EXECUTE u_first USING {end};
        ELSE
          EXECUTE q_next INTO {end} USING {lower}, {upper}, {batch_size} - 1;
          IF en_1 IS NULL THEN SELECT {upper} INTO {end}; END IF;
          EXECUTE u_next USING {lower}, {end};
        END IF;
        GET DIAGNOSTICS batch_rows = ROW_COUNT;
        EXIT;
      EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
        attempt := attempt + 1;
        IF attempt >= {max_attempts} THEN RAISE; END IF;
        PERFORM pg_catalog.pg_sleep(least(0.25 * 2 ^ attempt, 30));
      END;
    END LOOP;
    -- One transaction per batch: row locks last one batch and a crash loses at most one.
    COMMIT;
    total := total + batch_rows;
    batches := batches + 1;
    EXIT WHEN {done};
    SELECT {end} INTO {lower};
  END LOOP;
  RAISE NOTICE 'backfill %: % rows updated in % batches', {bf}, total, batches;
END"""
    ).format(
        declarations=sql.SQL("\n  ".join(declarations)),
        q_max=sql.Literal(template(target.max_key())),
        type_lookups=type_lookups,
        q_first=typed(template(target.lookahead(False))),
        q_next=typed(template(target.lookahead(True))),
        u_first=typed(template(target.update(False))),
        u_next=typed(template(target.update(True))),
        upper=sql.SQL(upper),
        lower=sql.SQL(lower),
        end=sql.SQL(end),
        done=sql.SQL(done),
        bf=sql.Literal(name),
        lock_timeout=timeout_literal(lock_timeout),
        batch_size=sql.Literal(batch_size),
        max_attempts=sql.Literal(max_attempts),
    )
    text = body.as_string(None)
    return sql.SQL("DO {}").format(_dollar_quote(text, "backfill"))


def finished_gate(name: str, control_schema: str) -> sql.Composed:
    """A ``DO`` block that fails unless backfill ``name`` is finished or unknown to the control tables.

    Offline, an inline backfill runs to its end before the script goes on, so only a backfill registered in the
    control tables (deferred, or started by the CLI) can be unfinished here.
    """
    # Rendered text for psql, not a statement psycopg executes: the plain identifier, no % escaping.
    backfills = sql.Identifier(control_schema, "backfills")
    # The inner IF is planned only when reached, so a database without control tables never resolves the table.
    body = sql.SQL(
        """BEGIN
  IF pg_catalog.to_regclass({backfills_name}) IS NOT NULL THEN
    IF EXISTS (SELECT 1 FROM {backfills} WHERE name = {name} AND state <> {succeeded}) THEN
      RAISE EXCEPTION 'backfill % is not finished: run `backfill run %` first', {name}, {name};
    END IF;
  END IF;
END"""
    ).format(
        backfills_name=sql.Literal(backfills.as_string(None)),
        backfills=backfills,
        name=sql.Literal(name),
        succeeded=state_literal(RunState.SUCCEEDED),
    )
    return sql.SQL("DO {}").format(_dollar_quote(body.as_string(None), "gate"))
