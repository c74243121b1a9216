"""The DDL of the NOT NULL helpers and the SQL the Alembic ops render offline, composed with :mod:`psycopg.sql`.

Batch statements are not here: the offline backfill script is assembled from :class:`backfill.sql.Target`'s own
statements, so a backfill run by psql walks the table exactly as the runner does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from psycopg import sql

from backfill.sql import ControlTables, Target

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
    "batched_script",
    "finished_gate",
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


def _timeout_literal(seconds: float) -> sql.Literal:
    return sql.Literal(f"{max(int(seconds * 1000), 1)}ms")


def set_lock_timeout(seconds: float, *, local: bool) -> sql.Composed:
    """``SET [LOCAL] lock_timeout``: LOCAL inside a step's own transaction, plain in an offline script."""
    return sql.SQL("SET {}lock_timeout = {}").format(sql.SQL("LOCAL " if local else ""), _timeout_literal(seconds))


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


# --- offline scripts ---------------------------------------------------------------------------------------------

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
    target = Target(
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
            "SELECT pg_catalog.format_type(a.atttypid, NULL) INTO t_{i} FROM pg_catalog.pg_attribute a "
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
        lock_timeout=_timeout_literal(lock_timeout),
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
    tables = ControlTables(control_schema)
    # The inner IF is planned only when reached, so a database without control tables never resolves the table.
    body = sql.SQL(
        """BEGIN
  IF pg_catalog.to_regclass({backfills_name}) IS NOT NULL THEN
    IF EXISTS (SELECT 1 FROM {backfills} WHERE name = {name} AND state <> 'succeeded') THEN
      RAISE EXCEPTION 'backfill % is not finished: run `backfill run %` first', {name}, {name};
    END IF;
  END IF;
END"""
    ).format(
        backfills_name=sql.Literal(tables.backfills.as_string(None)),
        backfills=tables.backfills,
        name=sql.Literal(name),
    )
    return sql.SQL("DO {}").format(_dollar_quote(body.as_string(None), "gate"))


def render(statement: sql.Composable) -> str:
    """A composed statement as text, without a connection (for offline scripts and log lines)."""
    return statement.as_string(None)
