"""The DDL of the online schema changes and the catalog look-ups that decide it, composed with :mod:`psycopg.sql`."""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import sql

#: Seconds a step that needs a strong lock may wait for it, per attempt: kept short because the application's
#: queries queue behind a waiting ACCESS EXCLUSIVE request.
DEFAULT_LOCK_TIMEOUT = 2.0
#: Seconds to keep retrying such a step (with backoff) before giving up.
DEFAULT_LOCK_RETRY_SECONDS = 300.0

__all__ = [
    "not_null_name",
    "check_name",
    "set_statement_timeout",
    "set_lock_timeout",
    "reset_lock_timeout",
    "add_not_null_not_valid",
    "add_check_not_valid",
    "validate_constraint",
    "set_not_null",
    "drop_not_null",
    "drop_constraint",
    "has_nulls",
    "count_nulls",
    "render",
    "derived_name",
    "add_check_expression_not_valid",
    "first_violation",
    "add_foreign_key_not_valid",
    "create_index_concurrently",
    "create_index_concurrently_as",
    "drop_index_concurrently",
    "drop_invalid_index_gexec",
    "ACCESS_EXCLUSIVE",
    "SHARE_ROW_EXCLUSIVE",
    "dollar_quote",
    "lock_without_waiting",
    "lock_in_either_order",
    "locked_in_either_order",
    "locked_with_related",
    "foreign_key_tables",
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


def has_nulls(relation: sql.Identifier, column: str) -> sql.Composed:
    """Whether any row has ``column`` NULL: stops at the first one; a read that blocks no writer."""
    return sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {} IS NULL)").format(relation, sql.Identifier(column))


def count_nulls(relation: sql.Identifier, column: str) -> sql.Composed:
    """Rows whose ``column`` is NULL: only run after a validation failed, to say how many."""
    return sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(relation, sql.Identifier(column))


# --- DDL -----------------------------------------------------------------------------------------------------------


def timeout_literal(seconds: float) -> sql.Literal:
    return sql.Literal(f"{max(int(seconds * 1000), 1)}ms")


def set_statement_timeout(seconds: float | None) -> sql.Composed:
    """``SET LOCAL statement_timeout``, ``0`` (no limit) for None: a role's default must not cancel a step."""
    value = timeout_literal(seconds) if seconds is not None else sql.Literal("0")
    return sql.SQL("SET LOCAL statement_timeout = {}").format(value)


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


# --- CHECK constraints and foreign keys ------------------------------------------------------------------------------

#: (relation oid, constraint name): its type, whether it is validated, the table it references (0 for none) and its
#: definition as PostgreSQL prints it.
CONSTRAINT = sql.SQL(
    """
    SELECT c.contype::text, c.convalidated, c.confrelid::bigint, pg_catalog.pg_get_constraintdef(c.oid)
      FROM pg_catalog.pg_constraint c
     WHERE c.conrelid = %s AND c.conname = %s
    """
)

#: (relation oid, number of columns, column names): whether a valid, non-partial index of the relation starts with
#: exactly these columns, in any order (what the foreign key's checks on deletes and key updates of the referenced
#: table look rows up with).
INDEX_LEADS_WITH = sql.SQL(
    """
    SELECT EXISTS (
      SELECT 1 FROM pg_catalog.pg_index i
       WHERE i.indrelid = %(oid)s AND i.indisvalid AND i.indpred IS NULL
         AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text)
                FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
               WHERE k.ord <= %(n)s)
             = (SELECT array_agg(c ORDER BY c) FROM unnest(%(columns)s::text[]) AS c))
    """
)

#: The referential actions ``ON DELETE`` accepts, as the SQL that says them.
ON_DELETE_ACTIONS = {
    "CASCADE": "CASCADE",
    "SET NULL": "SET NULL",
    "SET DEFAULT": "SET DEFAULT",
    "RESTRICT": "RESTRICT",
    "NO ACTION": "NO ACTION",
}


def derived_name(table: str, columns: Sequence[str], suffix: str) -> str:
    """``table_col1_col2_suffix`` (PostgreSQL's own pattern for ``fkey`` and ``idx``), clipped like the server."""
    return _clip("_".join([table, *columns, suffix]))


def _columns(columns: Sequence[str]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(column) for column in columns)


def _expression(fragment: str) -> sql.Composed:
    # The author's expression on lines of its own, so a trailing -- comment cannot swallow the closing parenthesis.
    return sql.SQL("(\n{}\n)").format(sql.SQL(fragment))


def add_check_expression_not_valid(relation: sql.Identifier, name: str, condition: str) -> sql.Composed:
    """ACCESS EXCLUSIVE for an instant, no scan; rows written from now on are checked."""
    return sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK {} NOT VALID").format(
        relation, sql.Identifier(name), _expression(condition)
    )


def first_violation(relation: sql.Identifier, key: Sequence[str], condition: str) -> sql.Composed:
    """The key of one row for which ``condition`` is false (a CHECK passes on NULL): only run after a validation
    failed, to name a row."""
    return sql.SQL("SELECT {} FROM {} WHERE {} IS FALSE LIMIT 1").format(
        _columns(key) if key else sql.SQL("ctid"), relation, _expression(condition)
    )


def add_foreign_key_not_valid(
    relation: sql.Identifier,
    name: str,
    columns: Sequence[str],
    referent: sql.Identifier,
    referent_columns: Sequence[str],
    on_delete: str | None,
) -> sql.Composed:
    """SHARE ROW EXCLUSIVE on both tables for an instant, no scan; rows written from now on are checked."""
    action = sql.SQL(" ON DELETE {}").format(sql.SQL(ON_DELETE_ACTIONS[on_delete])) if on_delete else sql.SQL("")
    return sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({}){} NOT VALID").format(
        relation, sql.Identifier(name), _columns(columns), referent, _columns(referent_columns), action
    )


# --- locks on more than one table ---------------------------------------------------------------------------------

ACCESS_EXCLUSIVE = "ACCESS EXCLUSIVE"
#: What ``ADD FOREIGN KEY`` takes on both tables: it conflicts with every write.
SHARE_ROW_EXCLUSIVE = "SHARE ROW EXCLUSIVE"

#: How many times, a millisecond apart, a step tries to lock each further table without waiting.
_NOWAIT_TRIES = 50


def dollar_quote(body: str, tag: str = "backfill") -> sql.Composed:
    """``body`` between dollar quotes whose tag it does not contain."""
    while f"${tag}$" in body:
        tag += "_"
    return sql.SQL("${tag}$\n{body}\n${tag}$").format(tag=sql.SQL(tag), body=sql.SQL(body))


def lock_without_waiting(relation: str, mode: str = ACCESS_EXCLUSIVE, *, dynamic: bool = False) -> str:
    """PL/pgSQL that takes ``mode`` on ``relation`` (quoted SQL text, or with ``dynamic`` a PL/pgSQL expression
    giving it) without ever queueing for it: up to ``_NOWAIT_TRIES`` ``NOWAIT`` attempts a millisecond apart, then
    ``lock_not_available`` (the step is retried).

    The caller holds another table's lock by then: queueing for this one could close a cycle with an application
    transaction that holds this table and waits for the other, and the deadlock detector may pick the
    application's transaction as the victim. Never waiting leaves no cycle. A table the role may not lock is
    skipped (see :func:`_lock`)."""
    lock = _lock(relation, mode, dynamic=dynamic, nowait=True)
    return (
        f"FOR attempt IN 1..{_NOWAIT_TRIES} LOOP BEGIN {lock} EXIT; "
        f"EXCEPTION WHEN lock_not_available THEN IF attempt = {_NOWAIT_TRIES} THEN RAISE; END IF; "
        "PERFORM pg_catalog.pg_sleep(0.001); WHEN insufficient_privilege THEN EXIT; END; END LOOP;"
    )


def _lock(relation: str, mode: str, *, dynamic: bool = False, nowait: bool = False, other: bool = False) -> str:
    tail = f" IN {mode} MODE{' NOWAIT' if nowait else ''}"
    lock = f"EXECUTE 'LOCK TABLE ' || {relation} || '{tail}';" if dynamic else f"LOCK TABLE {relation}{tail};"
    # Another table than the one the statement alters: the role may be allowed the statement but not LOCK TABLE
    # (a foreign key needs REFERENCES on the table it references, LOCK TABLE needs UPDATE, DELETE or TRUNCATE).
    # That table is then left to the statement, which takes its lock itself, as it did before these locks.
    return f"BEGIN {lock} EXCEPTION WHEN insufficient_privilege THEN NULL; END;" if other else lock


def lock_in_either_order(main: str, others: Sequence[str], mode: str = ACCESS_EXCLUSIVE) -> str:
    """PL/pgSQL that takes ``mode`` on ``main`` and ``others`` (quoted SQL text) with at most one queued wait, never
    while holding another of them: ``main`` first (waiting up to lock_timeout), the others without waiting; if one
    is busy (an application transaction holding it may be queued behind our lock on ``main``), everything is let
    go (the block is a subtransaction) and the other order is tried: the first other table waiting, then the rest
    without waiting. ``lock_not_available`` when neither order gets them all (the step is retried with backoff).
    Needs a variable ``attempt int`` declared."""
    first = _lock(main, mode)
    if not others:
        return first
    then = " ".join(lock_without_waiting(other, mode) for other in others)
    second = _lock(others[0], mode, other=True)
    rest = " ".join(lock_without_waiting(other, mode) for other in [*others[1:], main])
    return f"BEGIN {first} {then} EXCEPTION WHEN lock_not_available THEN {second} {rest} END;"


def locked_in_either_order(
    statement: sql.Composed, main: sql.Identifier, others: Sequence[sql.Identifier], mode: str
) -> sql.Composed:
    """``statement`` run after :func:`lock_in_either_order` has taken ``mode`` on ``main`` and ``others``, in one
    ``DO`` block (so in the statement's transaction); ``statement`` alone when there is no other table.

    For DDL that locks two tables itself (``ADD FOREIGN KEY`` takes the referencing table, then queues for the
    referenced one): an application transaction that wrote the referenced table and then writes the referencing
    one would close a deadlock cycle with it."""
    others = [other for other in others if other != main]
    if not others:
        return statement
    locks = lock_in_either_order(main.as_string(None), [other.as_string(None) for other in others], mode)
    body = f"DECLARE attempt int;\nBEGIN\n  {locks}\n  {statement.as_string(None)};\nEND"
    return sql.SQL("DO {}").format(dollar_quote(body, "locked"))


def locked_with_related(
    statement: sql.Composed, relation: sql.Identifier, related: sql.Composable, mode: str = ACCESS_EXCLUSIVE
) -> sql.Composed:
    """``statement`` run after ``mode`` is taken on ``relation`` and on the tables ``related`` (a query of their
    oids, run when the statement runs, online or offline) in either order, as :func:`lock_in_either_order` does,
    in one ``DO`` block.

    For DDL whose tables are only known from the catalog: dropping a foreign key, or a column with foreign keys,
    takes ACCESS EXCLUSIVE on the table and then queues for the other table of each key."""
    nowait = sql.SQL(lock_without_waiting("other", mode, dynamic=True))
    body = sql.SQL(
        "DECLARE attempt int; main text := {main}; others text[]; other text;\nBEGIN\n"
        "  others := ARRAY(SELECT DISTINCT r::regclass::text FROM ({related}) AS q(r)\n"
        "                   WHERE r <> main::regclass ORDER BY 1);\n"
        "  IF pg_catalog.cardinality(others) > 0 THEN\n"
        "    BEGIN {lock_main} FOREACH other IN ARRAY others LOOP {nowait} END LOOP;\n"
        "    EXCEPTION WHEN lock_not_available THEN {lock_first}\n"
        "      FOREACH other IN ARRAY others[2:] || main LOOP {nowait} END LOOP;\n"
        "    END;\n"
        "  END IF;\n"
        "  {statement};\nEND"
    ).format(
        main=sql.Literal(relation.as_string(None)),
        related=related,
        lock_main=sql.SQL(_lock("main", mode, dynamic=True)),
        lock_first=sql.SQL(_lock("others[1]", mode, dynamic=True, other=True)),
        nowait=nowait,
        statement=statement,
    )
    return sql.SQL("DO {}").format(dollar_quote(body.as_string(None), "locked"))


def foreign_key_tables(relation: sql.Identifier, *, name: str | None = None, column: str | None = None) -> sql.Composed:
    """A query of the tables at both ends of ``relation``'s foreign keys named ``name``, or of those on or to its
    ``column`` (the catalog is read when the query runs)."""
    rel = sql.SQL("{}::regclass").format(sql.Literal(relation.as_string(None)))
    if name is not None:
        which = sql.SQL("c.conrelid = {rel} AND c.conname = {name}").format(rel=rel, name=sql.Literal(name))
    else:
        which = sql.SQL(
            "EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid = {rel} AND a.attname = {col} "
            "AND ((c.conrelid = {rel} AND a.attnum = ANY (c.conkey)) OR (c.confrelid = {rel} AND a.attnum = ANY "
            "(c.confkey))))"
        ).format(rel=rel, col=sql.Literal(column))
    return sql.SQL(
        "SELECT t FROM pg_catalog.pg_constraint c, LATERAL (VALUES (c.conrelid), (c.confrelid)) AS v(t) "
        "WHERE c.contype = 'f' AND {}"
    ).format(which)


# --- indexes -------------------------------------------------------------------------------------------------------

#: (schema or NULL, name): the relation of that name (the search path decides without a schema): its kind, and if
#: it is an index its table (oid, schema, name), whether it is valid, whether unique, the constraint it backs (or
#: NULL), and its definition.
INDEX = sql.SQL(
    """
    SELECT c.relkind::text, i.indrelid::bigint, tn.nspname, t.relname, i.indisvalid, i.indisunique,
           (SELECT con.conname FROM pg_catalog.pg_constraint con WHERE con.conindid = c.oid
               AND con.conrelid = i.indrelid LIMIT 1),
           pg_catalog.pg_get_indexdef(c.oid), n.nspname
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      LEFT JOIN pg_catalog.pg_index i ON i.indexrelid = c.oid
      LEFT JOIN pg_catalog.pg_class t ON t.oid = i.indrelid
      LEFT JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
     WHERE c.oid = CASE WHEN %(schema)s::text IS NULL THEN pg_catalog.to_regclass(pg_catalog.quote_ident(%(name)s))
                        ELSE pg_catalog.to_regclass(pg_catalog.quote_ident(%(schema)s) || '.'
                                                     || pg_catalog.quote_ident(%(name)s)) END
    """
)

#: (backend pid): the sessions that the backend waits for (pid, application name, seconds since their transaction
#: or query started, state), oldest first.
BLOCKING_SESSIONS = sql.SQL(
    """
    SELECT a.pid, a.application_name,
           extract(epoch FROM now() - coalesce(a.xact_start, a.query_start, a.backend_start))::float8, a.state
      FROM unnest(pg_catalog.pg_blocking_pids(%s)) AS b(pid)
      JOIN pg_catalog.pg_stat_activity a ON a.pid = b.pid
     ORDER BY 3 DESC
    """
)

BACKEND_PID = sql.SQL("SELECT pg_catalog.pg_backend_pid()")


def create_index_concurrently(
    relation: sql.Identifier,
    name: str,
    columns: Sequence[str],
    *,
    unique: bool,
    where: str | None,
    using: str | None,
    if_not_exists: bool = False,
) -> sql.Composed:
    """SHARE UPDATE EXCLUSIVE on the table (reads and writes go on); waits for the transactions that might still
    use the table without the index, and later for every older snapshot. Runs outside a transaction block."""
    return sql.SQL("CREATE {}INDEX CONCURRENTLY {}{} ON {}{} ({}){}").format(
        sql.SQL("UNIQUE " if unique else ""),
        sql.SQL("IF NOT EXISTS " if if_not_exists else ""),
        sql.Identifier(name),
        relation,
        sql.SQL(" USING {}").format(sql.Identifier(using)) if using else sql.SQL(""),
        _columns(columns),
        sql.SQL(" WHERE {}").format(_expression(where)) if where else sql.SQL(""),
    )


def create_index_concurrently_as(relation: sql.Identifier, name: str, definition: str, unique: bool) -> sql.Composed:
    """:func:`create_index_concurrently` of a definition as ``pg_get_indexdef`` prints it from ``USING`` on."""
    return sql.SQL("CREATE {}INDEX CONCURRENTLY {} ON {} {}").format(
        sql.SQL("UNIQUE " if unique else ""), sql.Identifier(name), relation, sql.SQL(definition)
    )


def drop_index_concurrently(index: sql.Identifier, *, if_exists: bool = True) -> sql.Composed:
    """SHARE UPDATE EXCLUSIVE on the table; waits for the transactions using the index. Outside a transaction."""
    return sql.SQL("DROP INDEX CONCURRENTLY {}{}").format(sql.SQL("IF EXISTS " if if_exists else ""), index)


def drop_invalid_index_gexec(schema: str | None, name: str) -> sql.Composed:
    """For psql (``\\gexec`` runs each row it returns as a statement): ``DROP INDEX CONCURRENTLY`` of the index
    if it exists and is INVALID (left by a failed build), so the ``CREATE ... IF NOT EXISTS`` after it builds it
    anew instead of skipping it."""
    index = sql.Identifier(schema, name) if schema else sql.Identifier(name)
    return sql.SQL(
        "SELECT {drop} FROM pg_catalog.pg_index i WHERE i.indexrelid = pg_catalog.to_regclass({index})"
        " AND NOT i.indisvalid \\gexec"
    ).format(
        drop=sql.Literal(drop_index_concurrently(index).as_string(None)),
        index=sql.Literal(index.as_string(None)),
    )


def set_timeouts(lock_timeout: str, statement_timeout: str) -> sql.Composed:
    """Session-wide (an index build runs outside any transaction, so ``SET LOCAL`` would not last)."""
    return sql.SQL(
        "SELECT pg_catalog.set_config('lock_timeout', {}, false), pg_catalog.set_config('statement_timeout', {}, false)"
    ).format(sql.Literal(lock_timeout), sql.Literal(statement_timeout))


#: The session's lock_timeout and statement_timeout, to put back after an index build.
TIMEOUTS = sql.SQL("SELECT pg_catalog.current_setting('lock_timeout'), pg_catalog.current_setting('statement_timeout')")
