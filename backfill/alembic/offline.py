"""What the Alembic ops render offline (``alembic upgrade --sql``): PL/pgSQL blocks a DBA runs with psql.

The backfill script is assembled from the runner's own batch statements (``backfill.pg.statements``), so a
backfill run by psql walks the table exactly as the runner does.
"""

from __future__ import annotations

import json
import re

from psycopg import sql

from backfill.pg.session import PINNED_SETTINGS
from backfill.pg.statements import ControlTables, TargetSQL, state_literal
from backfill.schema import carry_over, ddl, sync
from backfill.schema.ddl import not_null_name, timeout_literal
from backfill.schema.type_change import TypeChangeState, shadow_comment
from backfill.settings import RunSettings
from backfill.spec import BackfillSpec
from backfill.state import RunState

__all__ = [
    "batched_script",
    "finished_gate",
    "drop_backfill",
    "cleanup_type_change",
    "finish_type_change",
    "cancel_guard",
]

_PLACEHOLDER = re.compile(r"%(%|s)")


def _positional(text: str, first: int = 1) -> str:
    """psycopg's ``%s`` placeholders as ``$1, $2, ...`` for PL/pgSQL's EXECUTE ... USING, ``%%`` back to ``%``."""
    counter = iter(range(first, 10_000))
    return _PLACEHOLDER.sub(lambda m: "%" if m.group(1) == "%" else f"${next(counter)}", text)


def _type_marker(position: int) -> str:
    # Stands in for a key column's type in the statement templates; the script swaps in the type it reads from
    # the catalog when it runs (offline, nothing is known about the database).
    return f"__backfill_key_type_{position}__"


def _column_marker(position: int) -> str:
    # Stands in for a key column's name when the revision leaves the key to the primary key: the script reads it
    # from the catalog when it runs and swaps in its quoted name.
    return f"__backfill_key_column_{position}__"


#: The key a spec holds in its fingerprint text until the script has found the primary key.
_KEY_MARKER = "__backfill_key__"


def _pin_settings() -> sql.Composed:
    # Session-wide (not local): the script commits every batch, and each new transaction must see them too. The
    # client encoding is the client's (psql's) business, and the script's text never leaves the server anyway.
    pairs = [(name, value) for name, value in PINNED_SETTINGS if name != "client_encoding"]
    rows = sql.SQL(", ").join(sql.SQL("({}, {})").format(sql.Literal(n), sql.Literal(v)) for n, v in pairs)
    return sql.SQL("PERFORM pg_catalog.set_config(s.name, s.value, false) FROM (VALUES {}) AS s(name, value);").format(
        rows
    )


def batched_script(
    spec: BackfillSpec, settings: RunSettings, *, control_schema: str = "public", max_attempts: int = 20
) -> sql.Composed:
    """A ``DO`` block that runs backfill ``spec`` in batches of ``settings.batch_size`` rows (else the spec's),
    committing each one with its checkpoint in the control tables, exactly as the runner does. An unqualified
    table is taken to be in schema public. Of the settings, those that mean something in SQL apply: the timeouts,
    the pause between batches and the rate cap (replica lag, vacuum and health checks need the runner).

    It registers the backfill (creating the control tables if needed) unless it is registered already, fixes its
    upper key on the first run, and then works every unfinished slice no live runner holds (the same claim in
    the slice's control row as the runner): each batch locks its slice's control row, reads the checkpoint, finds
    the key ``batch_size`` rows ahead, updates that closed key range and writes the new checkpoint, in one
    transaction. So a script interrupted at any point and run again continues where the last committed batch ended
    and never repeats one; a backfill that has succeeded is left alone. Without a key in the spec the script finds
    the table's primary key when it runs (a single column; a composite key must be named). Between batches it
    sleeps ``sleep_between`` seconds and as long as ``max_rows_per_second`` needs. A batch that meets a lock
    timeout or a deadlock is retried with backoff. Must run outside a transaction block (COMMIT inside DO needs
    that).
    """
    name, schema, batch_size = spec.name, spec.schema or "public", settings.batch_size or spec.initial_batch_size
    known = spec.key is not None
    columns = spec.key if spec.key is not None else (_column_marker(1),)
    n = len(columns)
    target = TargetSQL(
        schema=schema,
        table=spec.table,
        key=columns,
        key_types=tuple(_type_marker(i) for i in range(1, n + 1)),
        values=tuple(spec.values.items()),
        where=spec.where,
        skip_unchanged=spec.skip_unchanged,
    )
    tables = ControlTables(control_schema)

    def template(statement: sql.Composable) -> str:
        return _positional(statement.as_string(None))

    def names(prefix: str) -> str:
        return ", ".join(f"{prefix}_{i}" for i in range(1, n + 1))

    def typed(text: str) -> sql.Composable:
        # The statement text as a literal, with each key type (and unknown column name) replaced at run time.
        composed: sql.Composable = sql.Literal(text)
        for i in range(1, n + 1):
            composed = sql.SQL("replace({}, {}, t_{})").format(composed, sql.Literal(_type_marker(i)), sql.SQL(str(i)))
            if not known:
                marker = sql.Literal(sql.Identifier(_column_marker(i)).as_string(None))
                composed = sql.SQL("replace({}, {}, pg_catalog.quote_ident(k_{}))").format(
                    composed, marker, sql.SQL(str(i))
                )
        return composed

    def array(prefix: str) -> sql.SQL:
        return sql.SQL(f"pg_catalog.jsonb_build_array({names(prefix)})")

    def unpack(source: str, prefix: str) -> sql.SQL:
        return sql.SQL(" ".join(f"{prefix}_{i} := {source}->>{i - 1};" for i in range(1, n + 1)))

    lower, upper, end = names("lo"), names("up"), names("en")
    relation = sql.Literal(sql.Identifier(schema, spec.table).as_string(None))
    declarations = [f"t_{i} text; k_{i} text; lo_{i} text; up_{i} text; en_{i} text;" for i in range(1, n + 1)]
    if known:
        find_key = sql.SQL(" ").join(
            sql.SQL("k_{} := {};").format(sql.SQL(str(i)), sql.Literal(column)) for i, column in enumerate(columns, 1)
        )
    else:
        find_key = sql.SQL(
            """SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord) INTO pk
    FROM pg_catalog.pg_index i
    CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
   WHERE i.indrelid = pg_catalog.to_regclass({rel}) AND i.indisprimary AND k.ord <= i.indnkeyatts;
  IF pk IS NULL THEN
    RAISE EXCEPTION 'backfill %: % has no primary key: pass key= to op.backfill', {bf}, {rel};
  ELSIF pg_catalog.cardinality(pk) <> 1 THEN
    RAISE EXCEPTION 'backfill %: the primary key of % has % columns (%): pass key= to op.backfill', {bf}, {rel},
      pg_catalog.cardinality(pk), pg_catalog.array_to_string(pk, ', ');
  END IF;
  k_1 := pk[1];"""
        ).format(rel=relation, bf=sql.Literal(name))
    type_lookups = sql.SQL("\n  ").join(
        sql.SQL(
            "SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) INTO t_{i} FROM pg_catalog.pg_attribute a "
            "WHERE a.attrelid = pg_catalog.to_regclass({rel}) AND a.attname = k_{i} AND NOT a.attisdropped;\n  "
            "IF t_{i} IS NULL THEN RAISE EXCEPTION 'backfill %: no key column % in %', {bf}, k_{i}, {rel}; END IF;"
        ).format(i=sql.SQL(str(i)), rel=relation, bf=sql.Literal(name))
        for i in range(1, n + 1)
    )
    stored = spec.with_changes(schema=schema, key=(_KEY_MARKER,))
    key_json = sql.SQL(
        "'[' || (SELECT pg_catalog.string_agg(pg_catalog.to_json(c)::text, ', ' ORDER BY o) "
        "FROM pg_catalog.unnest(ARRAY[{}]) WITH ORDINALITY AS u(c, o)) || ']'"
    ).format(sql.SQL(names("k")))
    marker_json = json.dumps([_KEY_MARKER])
    if known:
        fingerprint: sql.Composable = sql.Literal(spec.with_changes(schema=schema).fingerprint())
    else:
        fingerprint = sql.SQL(
            "pg_catalog.left(pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to("
            "pg_catalog.replace({}, {}, key_json), 'UTF8')), 'hex'), 16)"
        ).format(sql.Literal(stored.fingerprint_text()), sql.Literal(marker_json))
    done = " AND ".join(f"en_{i} = up_{i}" for i in range(1, n + 1))
    pace = []
    if settings.sleep_between > 0:
        pace.append(sql.SQL("PERFORM pg_catalog.pg_sleep({});").format(sql.Literal(settings.sleep_between)))
    if settings.max_rows_per_second:
        pace.append(
            sql.SQL(
                "PERFORM pg_catalog.pg_sleep(greatest(0, total / {}::float8 "
                "- extract(epoch FROM pg_catalog.clock_timestamp() - began)));"
            ).format(sql.Literal(float(settings.max_rows_per_second)))
        )
    create = sql.SQL("\n    ").join(sql.SQL("{};").format(statement) for statement in tables.create())
    body = sql.SQL(
        """DECLARE
  {declarations}
  pk text[]; key_json text; fp text; stored_fp text;
  bf_id bigint; bf_state text; sl integer; cp jsonb; ub jsonb; sl_done boolean; mine boolean; claimed integer;
  busy integer := 0;
  q_max text; q_first text; q_next text; u_first text; u_next text;
  batch_rows bigint; total bigint := 0; batches bigint := 0; attempt int;
  began timestamptz := pg_catalog.clock_timestamp();
  owner text := 'psql:' || pg_catalog.pg_backend_pid();
BEGIN
  -- The session settings every runner pins, for this psql session: keys travel as their text form.
  {pin}
  {find_key}
  {type_lookups}
  q_max := {q_max};
  q_first := {q_first};
  q_next := {q_next};
  u_first := {u_first};
  u_next := {u_next};
  key_json := {key_json};
  fp := {fingerprint};
  -- Register it as the runner does (the control tables first, with the DDL of `backfill init`).
  IF pg_catalog.to_regclass({meta_name}) IS NULL THEN
    PERFORM pg_catalog.set_config('client_min_messages', 'warning', true);
    {create}
  END IF;
  EXECUTE {q_insert} USING {bf}, pg_catalog.jsonb_set({spec}::jsonb, '{{key}}', key_json::jsonb), fp;
  SELECT id, state, fingerprint INTO bf_id, bf_state, stored_fp FROM {backfills} WHERE name = {bf} FOR UPDATE;
  IF stored_fp <> fp THEN
    RAISE EXCEPTION 'backfill % already exists with a different spec: use a new name', {bf};
  ELSIF bf_state = {succeeded} THEN
    RAISE NOTICE 'backfill %: finished before, nothing to do', {bf};
    RETURN;
  ELSIF bf_state NOT IN ({pending}, {running}) THEN
    RAISE EXCEPTION 'backfill % is %: see `backfill status %`', {bf}, bf_state, {bf};
  END IF;
  IF NOT EXISTS (SELECT 1 FROM {slices} WHERE backfill_id = bf_id) THEN
    -- First run: fix the upper key (rows inserted later are the application's, or the trigger's, job).
    EXECUTE q_max INTO {upper};
    IF up_1 IS NULL THEN
      EXECUTE {q_set_state} USING {succeeded}, NULL::text, true, bf_id;
      COMMIT;
      RAISE NOTICE 'backfill %: the table is empty', {bf};
      RETURN;
    END IF;
    EXECUTE {q_start} USING {upper_array}, NULL::bigint, bf_id;
    EXECUTE {q_insert_slice} USING bf_id, 0, NULL::jsonb, {upper_array}, NULL::jsonb;
  ELSIF bf_state = {pending} THEN
    EXECUTE {q_start} USING NULL::jsonb, NULL::bigint, bf_id;
  END IF;
  COMMIT;
  sl := -1;
  LOOP
    SELECT min(slice) INTO sl FROM {slices} WHERE backfill_id = bf_id AND NOT done AND slice > sl;
    EXIT WHEN sl IS NULL;
    -- The runner's claim on the slice, committed: a live runner working on it keeps this script out, and back;
    -- it dies with this session if the script is killed.
    EXECUTE {q_claim} INTO claimed USING bf_id, sl, NULL::text;
    COMMIT;
    IF claimed IS NULL THEN
      busy := busy + 1;
      CONTINUE;
    END IF;
    LOOP
      attempt := 0;
      LOOP
        BEGIN
          PERFORM pg_catalog.set_config('lock_timeout', {lock_timeout}, true);
          PERFORM pg_catalog.set_config('statement_timeout', {statement_timeout}, true);
          EXECUTE {q_lock} INTO bf_state, cp, ub, sl_done, mine USING bf_id, sl;
          IF NOT mine THEN
            RAISE EXCEPTION 'backfill %: another runner took slice % over', {bf}, sl;
          END IF;
          IF bf_state <> {running} OR sl_done THEN
            batch_rows := NULL;
            EXIT;
          END IF;
          {unpack_upper}
          IF cp IS NULL THEN
            EXECUTE q_first INTO {end} USING {upper}, {batch_size} - 1;
            IF en_1 IS NULL THEN SELECT {upper} INTO {end}; END IF;
            EXECUTE u_first USING {end};
          ELSE
            {unpack_lower}
            EXECUTE q_next INTO {end} USING {lower}, {upper}, {batch_size} - 1;
            IF en_1 IS NULL THEN SELECT {upper} INTO {end}; END IF;
            EXECUTE u_next USING {lower}, {end};
          END IF;
          GET DIAGNOSTICS batch_rows = ROW_COUNT;
          sl_done := {done};
          -- The checkpoint in the batch's own transaction: a crash loses or repeats nothing.
          EXECUTE {q_checkpoint} USING {end_array}, sl_done, batch_rows, owner, bf_id, sl;
          IF sl_done THEN
            EXECUTE {q_lock_backfill} USING bf_id;
            EXECUTE {q_finish} USING bf_id, bf_id;
          END IF;
          EXIT;
        EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
          attempt := attempt + 1;
          IF attempt >= {max_attempts} THEN RAISE; END IF;
          PERFORM pg_catalog.pg_sleep(least(0.25 * 2 ^ attempt, 30));
        END;
      END LOOP;
      -- One transaction per batch: row locks last one batch and a crash loses at most one.
      COMMIT;
      EXIT WHEN batch_rows IS NULL;
      total := total + batch_rows;
      batches := batches + 1;
      EXIT WHEN sl_done;
      {pace}
    END LOOP;
    EXECUTE {q_release} USING NULL::text, bf_id, sl;
    COMMIT;
    IF bf_state <> {running} THEN
      RAISE EXCEPTION 'backfill % is %: % rows updated in % batches by this script; see `backfill status %`',
        {bf}, bf_state, total, batches, {bf};
    END IF;
  END LOOP;
  IF busy > 0 THEN
    RAISE EXCEPTION 'backfill %: % slice(s) held by another runner (% rows updated here): %', {bf}, busy, total,
      {busy_hint};
  END IF;
  RAISE NOTICE 'backfill %: % rows updated in % batches', {bf}, total, batches;
END"""
    ).format(
        declarations=sql.SQL("\n  ".join(declarations)),
        pin=_pin_settings(),
        find_key=find_key,
        type_lookups=type_lookups,
        q_max=typed(template(target.max_key())),
        q_first=typed(template(target.lookahead(False))),
        q_next=typed(template(target.lookahead(True))),
        u_first=typed(template(target.update(False))),
        u_next=typed(template(target.update(True))),
        key_json=key_json if not known else sql.Literal(json.dumps(list(columns))),
        fingerprint=fingerprint,
        meta_name=sql.Literal(tables.meta.as_string(None)),
        create=create,
        q_insert=sql.Literal(template(tables.insert())),
        spec=sql.Literal(json.dumps(stored.to_dict())),
        backfills=tables.backfills,
        slices=tables.slices,
        q_set_state=sql.Literal(template(tables.set_state())),
        q_start=sql.Literal(template(tables.start())),
        q_insert_slice=sql.Literal(template(tables.insert_slice())),
        q_lock=sql.Literal(template(tables.lock_slice())),
        q_checkpoint=sql.Literal(template(tables.checkpoint())),
        q_lock_backfill=sql.Literal(template(tables.lock_backfill())),
        q_finish=sql.Literal(template(tables.finish_if_done())),
        q_claim=sql.Literal(template(tables.claim())),
        q_release=sql.Literal(template(tables.release_slice())),
        upper=sql.SQL(upper),
        lower=sql.SQL(lower),
        end=sql.SQL(end),
        upper_array=array("up"),
        end_array=array("en"),
        unpack_upper=unpack("ub", "up"),
        unpack_lower=unpack("cp", "lo"),
        done=sql.SQL(done),
        bf=sql.Literal(name),
        lock_timeout=timeout_literal(settings.lock_timeout),
        statement_timeout=timeout_literal(settings.statement_timeout),
        batch_size=sql.Literal(batch_size),
        max_attempts=sql.Literal(max_attempts),
        pace=sql.SQL("\n      ").join(pace),
        succeeded=state_literal(RunState.SUCCEEDED),
        pending=state_literal(RunState.PENDING),
        running=state_literal(RunState.RUNNING),
        busy_hint=sql.Literal(f"run this again once it has stopped; see `backfill status {name}`"),
    )
    text = body.as_string(None)
    return sql.SQL("DO {}").format(ddl.dollar_quote(text, "backfill"))


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
    return sql.SQL("DO {}").format(ddl.dollar_quote(body.as_string(None), "gate"))


def drop_backfill(name: str, control_schema: str, *, delete: bool, lock_timeout: float = 2.0) -> sql.Composed:
    """A ``DO`` block that drops backfill ``name``'s keep_in_sync trigger and function, found through the spec in
    the control tables, and with ``delete`` its control rows too. Nothing happens for a backfill the control tables
    do not know."""
    tables = ControlTables(control_schema)
    trigger = sync.trigger_name(name)
    forget = (
        sql.SQL("\n      DELETE FROM {} WHERE name = {};").format(tables.backfills, sql.Literal(name))
        if delete
        else sql.SQL("")
    )
    body = sql.SQL(
        """DECLARE
  target jsonb;
BEGIN
  IF pg_catalog.to_regclass({backfills_name}) IS NOT NULL THEN
    SELECT spec INTO target FROM {backfills} WHERE name = {name};
    IF FOUND THEN
      PERFORM pg_catalog.set_config('lock_timeout', {lock_timeout}, true);
      IF pg_catalog.to_regclass(pg_catalog.format('%I.%I', target->>'schema', target->>'table')) IS NOT NULL THEN
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %I.%I', {trigger}, target->>'schema',
                                  target->>'table');
      END IF;
      EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS %I.%I()', target->>'schema', {trigger});{forget}
    END IF;
  END IF;
END"""
    ).format(
        backfills_name=sql.Literal(tables.backfills.as_string(None)),
        backfills=tables.backfills,
        name=sql.Literal(name),
        trigger=sql.Literal(trigger),
        lock_timeout=timeout_literal(lock_timeout),
        forget=forget,
    )
    return sql.SQL("DO {}").format(ddl.dollar_quote(body.as_string(None), "drop"))


def cleanup_type_change(state: TypeChangeState, control_schema: str, lock_timeout: float) -> sql.Composed:
    """A ``DO`` block that drops the old column of a finished column type change and forgets its copy, or fails
    (dropping nothing) while the copy's shadow column still exists: the change is not finished."""
    tables = ControlTables(control_schema)
    relation = state.relation
    body = sql.SQL(
        """DECLARE
  shadow text;
BEGIN
  IF pg_catalog.to_regclass({backfills_name}) IS NULL OR pg_catalog.to_regclass({relation_name}) IS NULL THEN
    RETURN;
  END IF;
  SELECT k INTO shadow FROM {backfills} b, pg_catalog.jsonb_object_keys(b.spec->'values') AS k WHERE b.name = {name};
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = pg_catalog.to_regclass({relation_name})
              AND attname = shadow AND NOT attisdropped) THEN
    RAISE EXCEPTION 'the type change % is not finished (column % still exists): run finish_column_type_change '
      'first; nothing was dropped', {name}, shadow;
  END IF;
  PERFORM pg_catalog.set_config('lock_timeout', {lock_timeout}, true);
  ALTER TABLE {relation} DROP COLUMN IF EXISTS {retired};
  DELETE FROM {backfills} WHERE name = {name};
END"""
    ).format(
        backfills_name=sql.Literal(tables.backfills.as_string(None)),
        relation_name=sql.Literal(relation.as_string(None)),
        backfills=tables.backfills,
        name=sql.Literal(state.backfill),
        lock_timeout=timeout_literal(lock_timeout),
        relation=relation,
        retired=sql.Identifier(state.retired),
    )
    return sql.SQL("DO {}").format(ddl.dollar_quote(body.as_string(None), "cleanup"))


def finish_type_change(state: TypeChangeState, control_schema: str, lock_timeout: float) -> list[str]:
    """The finish of a column type change for psql: a ``DO`` block that reads the catalog and writes the statements
    left (as :func:`backfill.finish_column_type_change` plans them) into a temporary table, then a ``\\gexec`` line
    that runs them in order, each in its own transaction: NOT NULL by the CHECK path, index copies built
    ``CONCURRENTLY`` (an INVALID one dropped first), foreign key copies ``NOT VALID`` then validated, and the swap
    (one ``DO`` block) under ``lock_timeout``. Run again, it plans only what is left; after the swap, nothing."""
    tables = ControlTables(control_schema)
    relation = state.relation
    body = sql.SQL(
        """DECLARE
  rel regclass := pg_catalog.to_regclass({relation_text});
  rel_text text := {relation_text};
  nsp text := {schema};
  col text := {column};
  retired text := {retired};
  bf text := {backfill};
  trg text := {trigger};
  lt text := {lock_timeout};
  shadow text; bf_state text; chk text; chk_valid boolean; copy text; copy_valid boolean; seq_type text; add_fk text;
  decl text := 'DECLARE not_null text; attempt int; ';
  nn_name text := {not_null_name};
  o record; nw record; ix record; fk record; ck record; problem text;
  steps text[] := ARRAY[]::text[];
  fk_drops text[] := ARRAY[]::text[];
  drops text[] := ARRAY[]::text[];
  moves text[] := ARRAY[]::text[];
  renames text[] := ARRAY[]::text[];
  fk_renames text[] := ARRAY[]::text[];
  check_renames text[] := ARRAY[]::text[];
  locks text;
  others text[] := ARRAY[]::text[];
BEGIN
  CREATE TEMP TABLE IF NOT EXISTS backfill_type_change_plan (n serial, stmt text);
  TRUNCATE backfill_type_change_plan;
  IF rel IS NULL THEN
    RAISE EXCEPTION 'table % does not exist', rel_text;
  END IF;
  IF pg_catalog.to_regclass({backfills_name}) IS NULL THEN
    RAISE EXCEPTION 'no type change of %.% was started (start_column_type_change)', rel_text, col;
  END IF;
  SELECT k, b.state INTO shadow, bf_state
    FROM {backfills} b, pg_catalog.jsonb_object_keys(b.spec->'values') AS k WHERE b.name = bf;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'no type change of %.% was started (start_column_type_change), or it was cleaned up already',
      rel_text, col;
  END IF;
  SELECT a.attnum, a.attnotnull, pg_catalog.format_type(a.atttypid, NULL) AS typ INTO nw
    FROM pg_catalog.pg_attribute a WHERE a.attrelid = rel AND a.attname = shadow AND NOT a.attisdropped;
  IF NOT FOUND THEN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = rel AND attname = retired AND NOT attisdropped)
    THEN
      RAISE NOTICE 'type change %: swapped before, nothing to do', bf;
      RETURN;
    END IF;
    RAISE EXCEPTION 'the shadow column % of % is missing: run start_column_type_change again', shadow, rel_text;
  END IF;
  IF bf_state <> {succeeded} THEN
    RAISE EXCEPTION 'the copy % is %: finish it with `backfill run %`, then run this again; nothing was swapped',
      bf, bf_state, bf;
  END IF;
  SELECT a.attnum, a.attnotnull, a.attidentity::text AS identity, pg_catalog.pg_get_expr(d.adbin, d.adrelid) AS def,
         pg_catalog.pg_get_serial_sequence(rel_text, a.attname) AS seq INTO o
    FROM pg_catalog.pg_attribute a
    LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE a.attrelid = rel AND a.attname = col AND NOT a.attisdropped;
  -- NOT NULL on the new column by the CHECK path (every version): no scan under ACCESS EXCLUSIVE.
  chk := pg_catalog.left({table} || '_' || shadow || '_not_null_check', 63);
  SELECT c.convalidated INTO chk_valid FROM pg_catalog.pg_constraint c
   WHERE c.conrelid = rel AND c.conname = chk AND c.contype = 'c';
  IF o.attnotnull AND NOT nw.attnotnull THEN
    IF chk_valid IS NULL THEN
      steps := steps || pg_catalog.format('SET lock_timeout = %L', lt)
        || pg_catalog.format('ALTER TABLE %s ADD CONSTRAINT %I CHECK (%I IS NOT NULL) NOT VALID', rel_text, chk, shadow)
        || 'RESET lock_timeout'::text;
    END IF;
    IF NOT coalesce(chk_valid, false) THEN
      steps := steps || pg_catalog.format('ALTER TABLE %s VALIDATE CONSTRAINT %I', rel_text, chk);
    END IF;
    steps := steps || pg_catalog.format('SET lock_timeout = %L', lt)
      || pg_catalog.format('ALTER TABLE %s ALTER COLUMN %I SET NOT NULL', rel_text, shadow)
      || pg_catalog.format('ALTER TABLE %s DROP CONSTRAINT %I', rel_text, chk) || 'RESET lock_timeout'::text;
  ELSIF chk_valid IS NOT NULL THEN
    steps := steps || pg_catalog.format('SET lock_timeout = %L', lt)
      || pg_catalog.format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I', rel_text, chk) || 'RESET lock_timeout'::text;
  END IF;
  -- The column's CHECK constraints and indexes, their definitions rewritten for the shadow column by PostgreSQL.
  SELECT pg_catalog.format('exclusion constraint %s of %s uses %s, which a type change cannot carry over: drop it, '
                           'run finish again, and add it back after', c.conname, rel_text, col) INTO problem
    FROM pg_catalog.pg_constraint c WHERE c.conrelid = rel AND c.contype = 'x' AND o.attnum = ANY (c.conkey) LIMIT 1;
  IF problem IS NOT NULL THEN
    RAISE EXCEPTION '%', problem;
  END IF;
  PERFORM pg_catalog.set_config('backfill.type_change_relation', rel_text, true),
          pg_catalog.set_config('backfill.type_change_column', col, true),
          pg_catalog.set_config('backfill.type_change_shadow', shadow, true),
          pg_catalog.set_config('backfill.type_change_type', '', true);
  EXECUTE {copies_block};
  SELECT pg_catalog.format('%s %s of %s cannot be carried over to the new type %s: %s; nothing was swapped: drop or '
                           'change it, then run finish again', CASE c.kind WHEN 'check' THEN 'CHECK constraint'
                           ELSE 'index' END, c.name, rel_text, pg_catalog.format_type(a.atttypid, a.atttypmod),
                           c.problem) INTO problem
    FROM pg_temp.backfill_type_change_copies c, pg_catalog.pg_attribute a
   WHERE c.problem IS NOT NULL AND a.attrelid = rel AND a.attname = shadow ORDER BY c.kind, c.name LIMIT 1;
  IF problem IS NOT NULL THEN
    RAISE EXCEPTION '%', problem;
  END IF;
  -- Copies of the CHECK constraints: NOT VALID, then validated (unless the old one is NOT VALID).
  FOR ck IN SELECT c.name, c.definition, c.validated FROM pg_temp.backfill_type_change_copies c
             WHERE c.kind = 'check' ORDER BY c.name
  LOOP
    copy := CASE WHEN pg_catalog.octet_length(ck.name || '_tc') <= 63 THEN ck.name || '_tc'
                 ELSE 'tc_' || pg_catalog.md5(ck.name) END;
    SELECT c.convalidated INTO copy_valid FROM pg_catalog.pg_constraint c WHERE c.conrelid = rel AND c.conname = copy;
    IF copy_valid IS NULL THEN
      steps := steps || pg_catalog.format('SET lock_timeout = %L', lt)
        || pg_catalog.format('ALTER TABLE %s ADD CONSTRAINT %I CHECK (%s) NOT VALID', rel_text, copy, ck.definition)
        || 'RESET lock_timeout'::text;
    END IF;
    IF ck.validated AND NOT coalesce(copy_valid, false) THEN
      steps := steps || pg_catalog.format('ALTER TABLE %s VALIDATE CONSTRAINT %I', rel_text, copy);
    END IF;
    drops := drops || pg_catalog.format('ALTER TABLE %s DROP CONSTRAINT %I;', rel_text, ck.name);
    check_renames := check_renames || pg_catalog.format('ALTER TABLE %s RENAME CONSTRAINT %I TO %I;', rel_text,
                                                        copy, ck.name);
  END LOOP;
  -- Copies of the column's indexes, built concurrently; the swap drops the old ones and renames the copies.
  FOR ix IN
    SELECT ic.relname::text AS name, i.indisunique AS uniq, con.conname::text AS con, con.contype::text AS kind,
           c.definition AS def, c.note
      FROM pg_temp.backfill_type_change_copies c
      JOIN pg_catalog.pg_index i ON i.indrelid = rel
      JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid AND ic.relname = c.name
      LEFT JOIN pg_catalog.pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
                                             AND con.contype IN ('p', 'u')
     WHERE c.kind = 'index'
     ORDER BY ic.relname
  LOOP
    IF ix.note IS NOT NULL THEN
      RAISE WARNING 'index % of %: %', ix.name, rel_text, ix.note;
    END IF;
    copy := CASE WHEN pg_catalog.octet_length(ix.name || '_tc') <= 63 THEN ix.name || '_tc'
                 ELSE 'tc_' || pg_catalog.md5(ix.name) END;
    SELECT i.indisvalid INTO copy_valid FROM pg_catalog.pg_index i
     WHERE i.indexrelid = pg_catalog.to_regclass(pg_catalog.format('%I.%I', nsp, copy));
    IF copy_valid IS NOT NULL AND NOT copy_valid THEN
      steps := steps || pg_catalog.format('DROP INDEX CONCURRENTLY IF EXISTS %I.%I', nsp, copy);
    END IF;
    IF NOT coalesce(copy_valid, false) THEN
      steps := steps || pg_catalog.format('CREATE %sINDEX CONCURRENTLY %I ON %s %s',
        CASE WHEN ix.uniq THEN 'UNIQUE ' ELSE '' END, copy, rel_text, ix.def);
    END IF;
    IF ix.con IS NOT NULL THEN
      drops := drops || pg_catalog.format('ALTER TABLE %s DROP CONSTRAINT %I;', rel_text, ix.con);
      renames := renames || pg_catalog.format('ALTER TABLE %s ADD CONSTRAINT %I %s USING INDEX %I;', rel_text, ix.con,
        CASE ix.kind WHEN 'p' THEN 'PRIMARY KEY' ELSE 'UNIQUE' END, copy);
    ELSE
      drops := drops || pg_catalog.format('DROP INDEX %I.%I;', nsp, ix.name);
      renames := renames || pg_catalog.format('ALTER INDEX %I.%I RENAME TO %I;', nsp, copy, ix.name);
    END IF;
  END LOOP;
  -- Copies of the foreign keys from and to the column: NOT VALID, then validated.
  FOR fk IN
    SELECT c.conname::text AS name, c.conrelid, c.confrelid, c.conrelid::regclass::text AS tbl,
           c.confrelid::regclass::text AS ref,
           c.confdeltype::text AS del,
           (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(CASE WHEN c.conrelid = rel AND a.attname = col
                                                                     THEN shadow ELSE a.attname::text END),
                                         ', ' ORDER BY k.ord)
              FROM pg_catalog.unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
              JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum) AS cols,
           (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(CASE WHEN c.conrelid <> rel AND a.attname = col
                                                                     THEN shadow ELSE a.attname::text END),
                                         ', ' ORDER BY k.ord)
              FROM pg_catalog.unnest(c.confkey) WITH ORDINALITY AS k(attnum, ord)
              JOIN pg_catalog.pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.attnum) AS refcols
      FROM pg_catalog.pg_constraint c
     WHERE c.contype = 'f' AND ((c.conrelid = rel AND o.attnum = ANY (c.conkey))
                                OR (c.confrelid = rel AND o.attnum = ANY (c.confkey)))
     ORDER BY c.conname
  LOOP
    copy := CASE WHEN pg_catalog.octet_length(fk.name || '_tc') <= 63 THEN fk.name || '_tc'
                 ELSE 'tc_' || pg_catalog.md5(fk.name) END;
    SELECT c.convalidated INTO copy_valid FROM pg_catalog.pg_constraint c
     WHERE c.conrelid = fk.conrelid AND c.conname = copy;
    IF copy_valid IS NULL THEN
      add_fk := pg_catalog.format('ALTER TABLE %s ADD CONSTRAINT %I FOREIGN KEY (%s) REFERENCES %s (%s)%s NOT VALID',
             fk.tbl, copy, fk.cols, fk.ref, fk.refcols,
             CASE fk.del WHEN 'r' THEN ' ON DELETE RESTRICT' WHEN 'c' THEN ' ON DELETE CASCADE'
                         WHEN 'n' THEN ' ON DELETE SET NULL' WHEN 'd' THEN ' ON DELETE SET DEFAULT' ELSE '' END);
      -- Both tables locked in either order first, never queueing while holding one (see locked_in_either_order).
      IF fk.tbl <> fk.ref THEN
        add_fk := pg_catalog.format('DO %L', 'DECLARE attempt int; BEGIN '
          || pg_catalog.format({lock_pair}, fk.tbl, fk.ref) || ' ' || add_fk || '; END');
      END IF;
      steps := steps || pg_catalog.format('SET lock_timeout = %L', lt) || add_fk || 'RESET lock_timeout'::text;
    END IF;
    IF NOT coalesce(copy_valid, false) THEN
      steps := steps || pg_catalog.format('ALTER TABLE %s VALIDATE CONSTRAINT %I', fk.tbl, copy);
    END IF;
    fk_drops := fk_drops || pg_catalog.format('ALTER TABLE %s DROP CONSTRAINT %I;', fk.tbl, fk.name);
    fk_renames := fk_renames || pg_catalog.format('ALTER TABLE %s RENAME CONSTRAINT %I TO %I;', fk.tbl, copy, fk.name);
    -- Both ends of every key: dropping a foreign key takes ACCESS EXCLUSIVE on the table it references too.
    IF fk.conrelid <> rel AND NOT fk.tbl = ANY (others) THEN
      others := others || fk.tbl;
    END IF;
    IF fk.confrelid <> rel AND NOT fk.ref = ANY (others) THEN
      others := others || fk.ref;
    END IF;
  END LOOP;
  -- The locks: at most one queued wait, never while holding another of the tables (see lock_in_either_order).
  IF pg_catalog.cardinality(others) = 0 THEN
    locks := pg_catalog.format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE; ', rel_text);
  ELSE
    locks := 'BEGIN ' || pg_catalog.format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE; ', rel_text)
      || (SELECT pg_catalog.string_agg(pg_catalog.replace({nowait}, '__relation__', t), ' ')
            FROM pg_catalog.unnest(others) AS t)
      || ' EXCEPTION WHEN lock_not_available THEN '
      || pg_catalog.format('BEGIN LOCK TABLE %s IN ACCESS EXCLUSIVE MODE; '
                           'EXCEPTION WHEN insufficient_privilege THEN NULL; END; ', others[1])
      || coalesce((SELECT pg_catalog.string_agg(pg_catalog.replace({nowait}, '__relation__', t), ' ')
                     FROM pg_catalog.unnest(others[2:]) AS t) || ' ', '')
      || pg_catalog.replace({nowait}, '__relation__', rel_text) || ' END; ';
  END IF;
  -- The default, sequence ownership or identity move to the new column.
  IF o.identity <> '' THEN
    decl := 'DECLARE not_null text; attempt int; next_value bigint; ';
    moves := moves
      || pg_catalog.format('SELECT CASE WHEN s.is_called THEN s.last_value + %s ELSE s.last_value END INTO next_value '
                           'FROM %s AS s;', (SELECT q.seqincrement FROM pg_catalog.pg_sequence q
                                              WHERE q.seqrelid = o.seq::regclass), o.seq)
      || pg_catalog.format('ALTER TABLE %s ALTER COLUMN %I DROP IDENTITY;', rel_text, col)
      || pg_catalog.format('EXECUTE %L || next_value || %L;',
           pg_catalog.format('ALTER TABLE %s ALTER COLUMN %I ADD GENERATED %s AS IDENTITY (SEQUENCE NAME %s '
                             'INCREMENT BY %s START WITH ', rel_text, shadow,
                             CASE o.identity WHEN 'a' THEN 'ALWAYS' ELSE 'BY DEFAULT' END, o.seq,
                             (SELECT q.seqincrement FROM pg_catalog.pg_sequence q WHERE q.seqrelid = o.seq::regclass)),
           ')');
  ELSIF o.def IS NOT NULL THEN
    moves := moves || pg_catalog.format('ALTER TABLE %s ALTER COLUMN %I DROP DEFAULT;', rel_text, col)
      || pg_catalog.format('ALTER TABLE %s ALTER COLUMN %I SET DEFAULT %s;', rel_text, shadow, o.def);
    IF o.seq IS NOT NULL THEN
      moves := moves || pg_catalog.format('ALTER SEQUENCE %s OWNED BY %s.%I;', o.seq, rel_text, shadow);
      SELECT pg_catalog.format_type(q.seqtypid, NULL) INTO seq_type FROM pg_catalog.pg_sequence q
       WHERE q.seqrelid = o.seq::regclass;
      IF pg_catalog.array_position(ARRAY['smallint', 'integer', 'bigint'], nw.typ)
         > pg_catalog.array_position(ARRAY['smallint', 'integer', 'bigint'], seq_type) THEN
        moves := moves || pg_catalog.format('ALTER SEQUENCE %s AS %s;', o.seq, nw.typ);
      END IF;
    END IF;
  END IF;
  IF o.attnotnull THEN
    moves := moves || pg_catalog.format('ALTER TABLE %s ALTER COLUMN %I DROP NOT NULL;', rel_text, col);
  END IF;
  -- PostgreSQL 18+: the new column's not-null constraint takes the old column's default name.
  moves := moves || pg_catalog.format(
    'SELECT c.conname INTO not_null FROM pg_catalog.pg_constraint c WHERE c.conrelid = %L::regclass '
    'AND c.contype = %L AND c.conkey = ARRAY[%s]::int2[]; IF not_null IS NOT NULL AND not_null <> %L THEN '
    'EXECUTE pg_catalog.format(%L, %L, not_null, %L); END IF;', rel_text, 'n', nw.attnum, nn_name,
    'ALTER TABLE %s RENAME CONSTRAINT %I TO %I', rel_text, nn_name);
  moves := moves || pg_catalog.format('COMMENT ON COLUMN %s.%I IS %L;', rel_text, shadow,
                                       pg_catalog.col_description(rel, o.attnum::int));
  moves := moves || pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s;', trg, rel_text)
    || pg_catalog.format('DROP FUNCTION IF EXISTS %I.%I();', nsp, trg)
    || pg_catalog.format('ALTER TABLE %s RENAME COLUMN %I TO %I;', rel_text, col, retired)
    || pg_catalog.format('ALTER TABLE %s RENAME COLUMN %I TO %I;', rel_text, shadow, col);
  -- The swap: one transaction of catalog changes under a short lock_timeout.
  steps := steps || pg_catalog.format('SET lock_timeout = %L', lt)
    || ('DO $swap$ ' || decl || 'BEGIN ' || locks
        || pg_catalog.array_to_string(fk_drops || drops || moves || renames || check_renames || fk_renames, ' ')
        || ' END $swap$')
    || 'RESET lock_timeout'::text;
  INSERT INTO backfill_type_change_plan (stmt) SELECT pg_catalog.unnest(steps);
END"""
    ).format(
        relation_text=sql.Literal(relation.as_string(None)),
        schema=sql.Literal(state.schema),
        table=sql.Literal(state.table),
        column=sql.Literal(state.column),
        retired=sql.Literal(state.retired),
        backfill=sql.Literal(state.backfill),
        trigger=sql.Literal(sync.trigger_name(state.backfill)),
        not_null_name=sql.Literal(not_null_name(state.table, state.column)),
        nowait=sql.Literal(ddl.lock_without_waiting("__relation__")),
        copies_block=sql.Literal(carry_over.COPIES_BLOCK.as_string(None)),
        lock_pair=sql.Literal(ddl.lock_in_either_order("%1$s", ["%2$s"], ddl.SHARE_ROW_EXCLUSIVE)),
        lock_timeout=timeout_literal(lock_timeout),
        backfills_name=sql.Literal(tables.backfills.as_string(None)),
        backfills=tables.backfills,
        succeeded=state_literal(RunState.SUCCEEDED),
    )
    plan = sql.SQL("DO {}").format(ddl.dollar_quote(body.as_string(None), "plan"))
    return [plan.as_string(None), "SELECT stmt FROM pg_temp.backfill_type_change_plan ORDER BY n \\gexec"]


def cancel_guard(state: TypeChangeState) -> sql.Composed:
    """A ``DO`` block that fails, before anything is dropped, once a column type change is swapped (the shadow
    column is gone and the old column is there under its retired name): cancelling it then is not possible."""
    relation = sql.Literal(state.relation.as_string(None))
    body = sql.SQL(
        """BEGIN
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = pg_catalog.to_regclass({relation})
              AND attname = {retired} AND NOT attisdropped)
     AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = pg_catalog.to_regclass({relation})
                      AND attname = {shadow} AND NOT attisdropped) THEN
    RAISE EXCEPTION 'the type change of %.% was finished (the columns are swapped): cannot cancel it; change the '
      'column back with another type change', {relation}, {retired};
  END IF;
END"""
    ).format(relation=relation, retired=sql.Literal(state.retired), shadow=sql.Literal(state.shadow))
    return sql.SQL("DO {}").format(ddl.dollar_quote(body.as_string(None), "cancel"))


def drop_own_shadow(state: TypeChangeState, lock_timeout: float) -> sql.Composed:
    """A ``DO`` block that drops the shadow column (CASCADE: the copies built on it) if it carries the comment this
    change gave it (:func:`~backfill.schema.type_change.shadow_comment`): a column of that name that the change did
    not add is left alone."""
    body = sql.SQL(
        """BEGIN
  IF pg_catalog.col_description(pg_catalog.to_regclass({relation_text}),
       (SELECT attnum FROM pg_catalog.pg_attribute WHERE attrelid = pg_catalog.to_regclass({relation_text})
           AND attname = {shadow} AND NOT attisdropped)::int) = {comment} THEN
    PERFORM pg_catalog.set_config('lock_timeout', {lock_timeout}, true);
    ALTER TABLE {relation} DROP COLUMN {column} CASCADE;
  END IF;
END"""
    ).format(
        relation_text=sql.Literal(state.relation.as_string(None)),
        shadow=sql.Literal(state.shadow),
        comment=sql.Literal(shadow_comment(state)),
        lock_timeout=timeout_literal(lock_timeout),
        relation=state.relation,
        column=sql.Identifier(state.shadow),
    )
    return sql.SQL("DO {}").format(ddl.dollar_quote(body.as_string(None), "cancel"))
