"""What a column type change carries from the old column to the new one: its CHECK constraints and its indexes,
each definition rewritten by PostgreSQL itself for the shadow column and the new type.

The definitions come from the catalog as text (``pg_get_constraintdef``, ``pg_get_indexdef``), and a textual
rename of the column in them could touch a string literal, a field of a composite, a function or another column
with a similar name. Instead, for each constraint and index, a ``DO`` block builds it on a scratch temporary copy of
the table (``CREATE TEMP TABLE ... (LIKE t)``: the same column names and types, no rows), renames the column there
to the shadow column's name and changes its type (``ALTER COLUMN ... TYPE``, which re-parses every dependent
definition for the new type, as it would on the real table), then reads the definition back. Everything done to the
scratch table is rolled back (a subtransaction per item); the real table is only read (no lock beyond ACCESS SHARE).

What PostgreSQL keeps of an index this way: method, uniqueness (and ``NULLS NOT DISTINCT``), each key's operator
class, collation and sort order (``DESC``, ``NULLS FIRST``), ``INCLUDE`` columns, storage parameters, expressions
and the partial predicate. A default operator class becomes the new type's default. A non-default one that does not
accept the new type (``int4_minmax_multi_ops`` for ``bigint``) is replaced by the new type's default, with a note
(only for an index whose keys are all columns); anything else PostgreSQL rejects for the new type (a CHECK calling a
function that does not exist for it) is a *problem*, which the caller reports naming the constraint or index.

The same block runs online (``start`` checks it before writing anything, ``finish`` builds the copies from it) and
in the offline finish script. It reads its arguments from transaction-local settings, so the text is a constant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from backfill.schema.notnull import ConstraintError, DDLSession

__all__ = ["Carried", "COPIES_BLOCK", "COPIES_TABLE", "arguments", "read_carried", "refuse_problems"]

#: The results of :data:`COPIES_BLOCK`, a temporary table dropped when the transaction ends.
COPIES_TABLE = "pg_temp.backfill_type_change_copies"

#: Reads ``backfill.type_change_relation`` (quoted, qualified), ``_column``, ``_shadow`` and ``_type`` (the new
#: type; empty: the shadow column's) and fills :data:`COPIES_TABLE` with one row per CHECK constraint and per index
#: that uses the column (exclusion constraints aside): kind (``check`` or ``index``), name, the definition for the
#: shadow column (a CHECK's condition, or an index's text from ``USING``), whether the constraint is validated,
#: whether the index is unique, a note, and the problem that keeps it from being carried over.
COPIES_BLOCK = sql.SQL(
    r"""DO $copies$
DECLARE
  rel regclass := pg_catalog.current_setting('backfill.type_change_relation')::regclass;
  col text := pg_catalog.current_setting('backfill.type_change_column');
  shadow text := pg_catalog.current_setting('backfill.type_change_shadow');
  new_type text := NULLIF(pg_catalog.current_setting('backfill.type_change_type'), '');
  col_num int2;
  item record;
  found_def text; note text; problem text; prefix text; scratch_ix regclass; rebuilt text;
BEGIN
  CREATE TEMP TABLE IF NOT EXISTS backfill_type_change_copies
    (kind text, name text, definition text, validated boolean, is_unique boolean, note text, problem text)
    ON COMMIT DROP;
  TRUNCATE pg_temp.backfill_type_change_copies;
  SELECT a.attnum INTO col_num FROM pg_catalog.pg_attribute a
   WHERE a.attrelid = rel AND a.attname = col AND NOT a.attisdropped;
  IF new_type IS NULL THEN
    SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) INTO new_type FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = rel AND a.attname = shadow AND NOT a.attisdropped;
  END IF;
  FOR item IN
    SELECT 'check' AS kind, c.conname::text AS name, pg_catalog.pg_get_constraintdef(c.oid) AS def,
           c.convalidated AS validated, false AS uniq, c.connoinherit AS noinherit, c.oid AS oid
      FROM pg_catalog.pg_constraint c
     WHERE c.conrelid = rel AND c.contype = 'c' AND col_num = ANY (c.conkey)
    UNION ALL
    SELECT 'index', ic.relname::text, pg_catalog.pg_get_indexdef(i.indexrelid), true, i.indisunique, false,
           i.indexrelid
      FROM pg_catalog.pg_index i
      JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
     WHERE i.indrelid = rel
       AND (col_num = ANY (i.indkey::int2[])
            OR EXISTS (SELECT 1 FROM pg_catalog.pg_depend dep
                        WHERE dep.classid = 'pg_catalog.pg_class'::regclass AND dep.objid = i.indexrelid
                          AND dep.refobjid = i.indrelid AND dep.refobjsubid = col_num))
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint x WHERE x.conindid = i.indexrelid AND x.contype = 'x')
    ORDER BY 1, 2
  LOOP
    found_def := NULL; note := NULL; problem := NULL;
    BEGIN
      EXECUTE pg_catalog.format('CREATE TEMP TABLE backfill_scratch (LIKE %s)', rel);
      EXECUTE pg_catalog.format('ALTER TABLE pg_temp.backfill_scratch DROP COLUMN IF EXISTS %I', shadow);
      IF item.kind = 'check' THEN
        IF item.noinherit THEN
          RAISE EXCEPTION 'a NO INHERIT constraint is not carried over';
        END IF;
        EXECUTE 'ALTER TABLE pg_temp.backfill_scratch ADD CONSTRAINT backfill_scratch_check ' || item.def;
      ELSE
        -- pg_get_indexdef prints 'CREATE [UNIQUE] INDEX name ON [ONLY] schema.table USING ...': the rest is kept.
        SELECT pg_catalog.format('CREATE %sINDEX %I ON %s%I.%I ', CASE WHEN item.uniq THEN 'UNIQUE ' ELSE '' END,
                                 item.name, CASE WHEN t.relkind = 'p' THEN 'ONLY ' ELSE '' END, n.nspname, t.relname)
          INTO prefix
          FROM pg_catalog.pg_class t JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace WHERE t.oid = rel;
        IF pg_catalog.left(item.def, pg_catalog.length(prefix)) <> prefix THEN
          RAISE EXCEPTION 'its definition could not be read (%)', item.def;
        END IF;
        EXECUTE 'CREATE ' || CASE WHEN item.uniq THEN 'UNIQUE ' ELSE '' END
          || 'INDEX backfill_scratch_ix ON pg_temp.backfill_scratch '
          || pg_catalog.substr(item.def, pg_catalog.length(prefix) + 1);
      END IF;
      EXECUTE pg_catalog.format('ALTER TABLE pg_temp.backfill_scratch RENAME COLUMN %I TO %I', col, shadow);
      BEGIN
        EXECUTE pg_catalog.format('ALTER TABLE pg_temp.backfill_scratch ALTER COLUMN %I TYPE %s USING NULL', shadow,
                                  new_type);
      EXCEPTION WHEN datatype_mismatch THEN
        -- An operator class that does not accept the new type: the new type's default instead, for an index of
        -- plain columns (the key list is rebuilt from the catalog with that class left out).
        scratch_ix := 'pg_temp.backfill_scratch_ix'::regclass;
        IF item.kind <> 'index' OR EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                                            WHERE i.indexrelid = scratch_ix AND i.indexprs IS NOT NULL) THEN
          RAISE;
        END IF;
        SELECT 'CREATE ' || CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END
               || 'INDEX backfill_scratch_ix2 ON pg_temp.backfill_scratch USING ' || pg_catalog.quote_ident(am.amname)
               || ' (' || (SELECT pg_catalog.string_agg(
                             pg_catalog.quote_ident(a.attname)
                             || CASE WHEN k.coll <> 0 AND k.coll <> a.attcollation
                                     THEN ' COLLATE ' || pg_catalog.format('%I.%I', cn.nspname, co.collname) ELSE '' END
                             || CASE WHEN a.attname = shadow OR oc.opcdefault THEN ''
                                     ELSE ' ' || pg_catalog.format('%I.%I', ocn.nspname, oc.opcname) END
                             || CASE WHEN k.opt & 1 = 1
                                     THEN ' DESC' || CASE WHEN k.opt & 2 = 2 THEN '' ELSE ' NULLS LAST' END
                                     WHEN k.opt & 2 = 2 THEN ' NULLS FIRST' ELSE '' END,
                             ', ' ORDER BY k.ord)
                             FROM ROWS FROM (pg_catalog.unnest(i.indkey::int2[]), pg_catalog.unnest(i.indclass::oid[]),
                                            pg_catalog.unnest(i.indcollation::oid[]),
                                            pg_catalog.unnest(i.indoption::int2[]))
                                  WITH ORDINALITY AS k(att, cls, coll, opt, ord)
                             JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.att
                             JOIN pg_catalog.pg_opclass oc ON oc.oid = k.cls
                             JOIN pg_catalog.pg_namespace ocn ON ocn.oid = oc.opcnamespace
                             LEFT JOIN pg_catalog.pg_collation co ON co.oid = k.coll
                             LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
                            WHERE k.ord <= i.indnkeyatts) || ')'
               || coalesce((SELECT ' INCLUDE (' || pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', '
                                                                           ORDER BY k.ord) || ')'
                              FROM pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY AS k(att, ord)
                              JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.att
                             WHERE k.ord > i.indnkeyatts), '')
               || CASE WHEN coalesce((pg_catalog.to_jsonb(i) ->> 'indnullsnotdistinct')::boolean, false)
                       THEN ' NULLS NOT DISTINCT' ELSE '' END
               || coalesce(' WITH (' || pg_catalog.array_to_string(ic.reloptions, ', ') || ')', '')
               || coalesce(' WHERE ' || pg_catalog.pg_get_expr(i.indpred, i.indrelid), ''),
               (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(oc.opcname), ', ')
                  FROM ROWS FROM (pg_catalog.unnest(i.indkey::int2[]), pg_catalog.unnest(i.indclass::oid[]))
                       AS k(att, cls)
                  JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.att
                  JOIN pg_catalog.pg_opclass oc ON oc.oid = k.cls
                 WHERE a.attname = shadow AND NOT oc.opcdefault)
          INTO rebuilt, note
          FROM pg_catalog.pg_index i
          JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
          JOIN pg_catalog.pg_am am ON am.oid = ic.relam
         WHERE i.indexrelid = scratch_ix;
        DROP INDEX pg_temp.backfill_scratch_ix;
        EXECUTE rebuilt;
        ALTER INDEX pg_temp.backfill_scratch_ix2 RENAME TO backfill_scratch_ix;
        EXECUTE pg_catalog.format('ALTER TABLE pg_temp.backfill_scratch ALTER COLUMN %I TYPE %s USING NULL', shadow,
                                  new_type);
        note := pg_catalog.format('operator class %s does not accept %s: the copy uses its default', note, new_type);
      END;
      IF item.kind = 'check' THEN
        SELECT pg_catalog.pg_get_expr(c.conbin, c.conrelid) INTO found_def FROM pg_catalog.pg_constraint c
         WHERE c.conrelid = 'pg_temp.backfill_scratch'::regclass AND c.conname = 'backfill_scratch_check';
      ELSE
        found_def := pg_catalog.pg_get_indexdef('pg_temp.backfill_scratch_ix'::regclass);
        found_def := pg_catalog.substr(found_def, pg_catalog.strpos(found_def, '.backfill_scratch USING ')
                                                  + pg_catalog.length('.backfill_scratch '));
      END IF;
      -- Everything done to the scratch table is rolled back with this subtransaction; the variables stay.
      RAISE SQLSTATE 'BFTC0';
    EXCEPTION
      WHEN SQLSTATE 'BFTC0' THEN NULL;
      WHEN OTHERS THEN problem := SQLERRM;
    END;
    INSERT INTO pg_temp.backfill_type_change_copies
      VALUES (item.kind, item.name, found_def, item.validated, item.uniq, note, problem);
  END LOOP;
END
$copies$"""
)


@dataclass(frozen=True)
class Carried:
    """A CHECK constraint or an index of the old column, and its definition on the shadow column."""

    #: ``check`` or ``index``
    kind: str
    name: str
    #: a CHECK's condition, or an index's definition from ``USING`` on (None when there is a problem)
    definition: str | None
    #: a CHECK constraint: whether it is validated (a NOT VALID one is copied NOT VALID)
    validated: bool
    unique: bool
    #: what was changed to carry it over (an operator class replaced by the new type's default)
    note: str | None
    #: why it cannot be carried over to the new type
    problem: str | None


def arguments(relation: sql.Identifier, column: str, shadow: str, new_type: str | None) -> list[sql.Composed]:
    """The transaction-local settings :data:`COPIES_BLOCK` reads (``new_type`` None: the shadow column's type)."""
    settings = {
        "relation": relation.as_string(None),
        "column": column,
        "shadow": shadow,
        "type": new_type or "",
    }
    return [
        sql.SQL("SELECT pg_catalog.set_config({}, {}, true)").format(
            sql.Literal(f"backfill.type_change_{key}"), sql.Literal(value)
        )
        for key, value in settings.items()
    ]


_READ = sql.SQL(
    "SELECT kind, name, definition, validated, is_unique, note, problem FROM pg_temp.backfill_type_change_copies "
    "ORDER BY kind, name"
)


def read_carried(
    session: DDLSession, relation: sql.Identifier, column: str, shadow: str, new_type: str | None
) -> list[Carried]:
    """The CHECK constraints and indexes of ``column``, each with its definition on ``shadow`` of ``new_type`` (None:
    the shadow column's type), in one transaction that leaves nothing behind."""
    rows = session.fetchall(_READ, before=[*arguments(relation, column, shadow, new_type), COPIES_BLOCK])
    return [
        Carried(
            str(kind),
            str(name),
            None if definition is None else str(definition),
            bool(validated),
            bool(unique),
            None if note is None else str(note),
            None if problem is None else str(problem),
        )
        for kind, name, definition, validated, unique, note, problem in rows
    ]


def refuse_problems(carried: Sequence[Carried], where: str, new_type: str, left: str) -> None:
    """Raise for the first item that cannot be carried over to ``new_type``: one line naming it, then ``left``.

    Raises:
        ConstraintError: a CHECK constraint or index PostgreSQL rejects for the new type.
    """
    for item in carried:
        if item.problem is not None:
            what = "CHECK constraint" if item.kind == "check" else "index"
            raise ConstraintError(
                f"{what} {item.name} of {where} cannot be carried over to the new type {new_type}: "
                f"{' '.join(item.problem.split())}; {left}"
            )
