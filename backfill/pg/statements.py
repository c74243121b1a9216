"""Every SQL statement ``backfill`` runs, composed with :mod:`psycopg.sql`: identifiers quoted, values bound.

Three families: catalog look-ups (plan), the control tables (store), and the batch statements on the target table.
The only text that is not composed from identifiers is what the spec's author wrote on purpose (SET expressions and
the filter) and type names read back from the catalog (``format_type``, which quotes them itself).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from backfill.errors import PlanError
from backfill.fragments import ends_in_line_comment, fragment_problem
from backfill.plan import Target
from backfill.state import RunState

__all__ = ["TargetSQL", "for_target", "ControlTables", "CONTROL_VERSION", "HISTORY_PER_SLICE", "state_literal"]

#: Version of the control tables' layout; stored in ``backfill_meta``. ``init`` upgrades older tables in place
#: (:meth:`ControlTables.upgrade`); version 2 added the batch history, the counters and the live settings.
CONTROL_VERSION = 2

#: Batches of each slice kept in the history table: a ring of this many rows per slice, the newest batch
#: overwriting the oldest, so each batch writes one row (no trimming query) and slices never touch each other's rows.
HISTORY_PER_SLICE = 500

#: Columns added to the slices after version 1's first release (the claim, then version 2's counters), with their
#: types: created with the table, and added by the upgrade of older tables.
_SLICE_COLUMNS_ADDED = (
    ("claim_pid", "integer"),
    ("claim_role", "oid"),
    ("claim_started", "timestamptz"),
    # Seconds waited on throttles and retried attempts, by reason: they only grow (Prometheus counters), whatever
    # the history ring forgets.
    ("throttle_seconds", "jsonb NOT NULL DEFAULT '{}'"),
    ("retries", "jsonb NOT NULL DEFAULT '{}'"),
    # The throttle this slice's runner waits on now (set when a long wait starts, cleared by the next batch).
    ("waiting_for", "text"),
    ("waiting_since", "timestamptz"),
)
#: Columns version 2 added to the backfills: the live setting overrides (``backfill set``).
_BACKFILL_COLUMNS_ADDED = (("overrides", "jsonb NOT NULL DEFAULT '{}'"),)


def _fragment(text: str) -> sql.SQL:
    # The author's SQL goes into statements with placeholders: a literal % must not read as one. (So every
    # statement holding a fragment is executed with a parameter sequence, if only an empty one.) A -- comment at
    # its end would swallow whatever follows on the line, such as the parenthesis around it: end the line first.
    return sql.SQL(text.replace("%", "%%") + ("\n" if ends_in_line_comment(text) else ""))


def _ident(*names: str) -> sql.SQL:
    # A table or column name goes into statements with placeholders too: a % in a name must not read as one.
    return sql.SQL(sql.Identifier(*names).as_string(None).replace("%", "%%"))


def _literal(text: str) -> sql.SQL:
    # A literal built from a name (the control schema's) goes into statements with placeholders too.
    return sql.SQL(sql.Literal(text).as_string(None).replace("%", "%%"))


def _columns(columns: Sequence[tuple[str, str]], prefix: str = "") -> list[sql.Composable]:
    # Column definitions: a quoted name and its type (fixed text of this module, not formatted: a DEFAULT '{}'
    # holds braces).
    return [sql.Composed([sql.SQL(prefix), sql.Identifier(name), sql.SQL(" " + kind)]) for name, kind in columns]


def _text_array(values: tuple[str, ...]) -> sql.Composable:
    return sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(_literal(value) for value in values))


def undo_columns(keys: int, values: int) -> list[str]:
    """The undo log's columns: the key (``k_1``...), the overwritten values (``o_1``...) and the values the backfill
    wrote (``n_1``...), in the order of the key and of :func:`undo_order`. Positional names, so no column of the
    target can collide with them."""
    return [
        *(f"k_{i}" for i in range(1, keys + 1)),
        *(f"o_{i}" for i in range(1, values + 1)),
        *(f"n_{i}" for i in range(1, values + 1)),
    ]


def undo_order(values: Sequence[tuple[str, str]]) -> list[str]:
    """The value columns in the undo log's order: by name, so that a spec read back from the control table (whose
    JSON keeps no key order) lines up with the log its first registration created."""
    return sorted(column for column, _ in values)


def _row_equal(left: Sequence[sql.Composable], right: Sequence[sql.Composable]) -> sql.Composable:
    return sql.SQL(" AND ").join(sql.SQL("{} = {}").format(a, b) for a, b in zip(left, right, strict=True))


def undo_table(backfill_id: int) -> str:
    """The name of a reversible backfill's undo log in the control schema."""
    return f"backfill_undo_{backfill_id}"


#: The undo logs' names, as a LIKE pattern (written for statements with placeholders).
_UNDO_PATTERN = "'backfill\\_undo\\_%%'"

#: Whether a batch goes ahead: the slice was as the runner expected, and the end key reads back exactly.
_GUARD = sql.SQL("(SELECT ok FROM _backfill_go) AND (SELECT same FROM _backfill_end)")


def _add_counts(column: sql.SQL, kind: str) -> sql.Composed:
    """``column`` (a jsonb object of numbers by reason) plus the jsonb object of the next parameter, key by key."""
    return sql.SQL(
        "{c} || (SELECT coalesce(jsonb_object_agg(d.k, coalesce(({c} ->> d.k)::{t}, 0) + d.v::{t}), '{{}}') "
        "FROM jsonb_each_text(%s::jsonb) AS d(k, v))"
    ).format(c=column, t=sql.SQL(kind))


# --- catalog -----------------------------------------------------------------------------------------------------

#: The relation a (schema, table) pair names, or NULL; with schema NULL, the search path decides.
FIND_TABLE = sql.SQL(
    """
    SELECT c.oid::bigint AS oid, n.nspname AS schema, c.relname AS name, c.relkind::text AS kind,
           c.reltuples::bigint AS estimated_rows
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = CASE WHEN %(schema)s::text IS NULL THEN pg_catalog.to_regclass(pg_catalog.quote_ident(%(table)s))
                        ELSE pg_catalog.to_regclass(pg_catalog.quote_ident(%(schema)s) || '.'
                                                     || pg_catalog.quote_ident(%(table)s)) END
    """
)

#: What a key value of column ``a`` (a ``pg_attribute`` row) means: its type with modifier and its collation, as
#: ``text COLLATE pg_catalog."C"``. Stored with a backfill's spec, and compared again by every batch.
_SIGNATURE = """pg_catalog.format_type(a.atttypid, a.atttypmod) || coalesce(' COLLATE ' || (
               SELECT pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname)
                 FROM pg_catalog.pg_collation co JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
                WHERE co.oid = a.attcollation), '')"""

#: Columns of a relation: name, type name with its modifier (``character(6)``, quoted by PostgreSQL), NOT NULL,
#: generated or identity-always, its signature (``_SIGNATURE``), and whether the type, looked at
#: through domains and arrays, is an OID alias (``regclass``...: its text form depends on ``search_path``).
TABLE_COLUMNS = sql.SQL(
    """
    SELECT a.attname AS name, pg_catalog.format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS not_null,
           a.attgenerated <> '' OR a.attidentity = 'a' AS generated, {signature} AS signature,
           EXISTS (WITH RECURSIVE under(oid) AS (
                       SELECT a.atttypid
                       UNION
                       SELECT CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.typelem END
                         FROM under u JOIN pg_catalog.pg_type t ON t.oid = u.oid
                        WHERE t.typtype = 'd' OR t.typelem <> 0)
                   SELECT 1 FROM under u JOIN pg_catalog.pg_type t ON t.oid = u.oid
                    WHERE t.typnamespace = 'pg_catalog'::regnamespace AND t.typname LIKE 'reg%%'
                      AND t.typcategory = 'N') AS oid_alias
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
     ORDER BY a.attnum
    """
).format(signature=sql.SQL(_SIGNATURE))

#: The primary key's columns, in index order (not its INCLUDE columns: they are neither unique nor NOT NULL).
PRIMARY_KEY = sql.SQL(
    """
    SELECT a.attname
      FROM pg_catalog.pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = %s AND i.indisprimary AND k.ord <= i.indnkeyatts
     ORDER BY k.ord
    """
)

#: Key-column lists of the valid, non-partial btree indexes of a relation, in index order. A column shows as NULL
#: where the index cannot serve a walk by that column: an expression, a collation other than the column's, or an
#: operator class other than the type's default (``text_pattern_ops`` orders by bytes, not by the column's ``<``).
#: INCLUDE columns are not listed: they are not ordered.
BTREE_INDEXES = sql.SQL(
    """
    SELECT array_agg(CASE WHEN a.attcollation = k.coll AND opc.opcdefault THEN a.attname END ORDER BY k.ord)
      FROM pg_catalog.pg_index i
      JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
      JOIN pg_catalog.pg_am am ON am.oid = ic.relam AND am.amname = 'btree'
      CROSS JOIN LATERAL unnest(i.indkey::int2[], i.indcollation::oid[], i.indclass::oid[])
                 WITH ORDINALITY AS k(attnum, coll, opclass, ord)
      LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
      LEFT JOIN pg_catalog.pg_opclass opc ON opc.oid = k.opclass
     WHERE i.indrelid = %s AND i.indisvalid AND i.indpred IS NULL AND k.ord <= i.indnkeyatts
     GROUP BY i.indexrelid
    """
)

#: Key-column lists of the valid, non-partial unique indexes (primary key included) of a relation; NULL for an
#: expression column. A key holding all the columns of one of them is unique.
UNIQUE_INDEXES = sql.SQL(
    """
    SELECT array_agg(a.attname ORDER BY k.ord)
      FROM pg_catalog.pg_index i
      CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
      LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = %s AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND k.ord <= i.indnkeyatts
     GROUP BY i.indexrelid
    """
)

#: (schema, table): the table and every partition under it, as (schema, name) pairs.
RELATIONS_OF = sql.SQL(
    """
    WITH t AS (SELECT (pg_catalog.quote_ident(%s) || '.' || pg_catalog.quote_ident(%s))::regclass AS oid)
    SELECT n.nspname, c.relname
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = (SELECT oid FROM t)
        OR c.oid IN (SELECT p.relid FROM pg_catalog.pg_partition_tree((SELECT oid FROM t)) p)
    """
)

#: Prices sequential scans out for the rest of the transaction (see ``backfill.pg.walk``).
NO_SEQSCAN = sql.SQL("SELECT set_config('enable_seqscan', 'off', true)")

#: (oid): whether row-level security is enabled and forced on the table, whether the current role owns it (or
#: inherits its owner's rights), whether it bypasses RLS (superuser or BYPASSRLS), and its name.
ROW_SECURITY = sql.SQL(
    """
    SELECT c.relrowsecurity, c.relforcerowsecurity,
           pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE'),
           r.rolsuper OR r.rolbypassrls, current_user::text
      FROM pg_catalog.pg_class c, pg_catalog.pg_roles r
     WHERE c.oid = %s AND r.rolname = current_user
    """
)

#: (oid): enabled BEFORE UPDATE row triggers of the table with a PL/pgSQL or SQL function: name, function, source.
BEFORE_UPDATE_TRIGGERS = sql.SQL(
    """
    SELECT t.tgname, p.oid::regprocedure::text, p.prosrc
      FROM pg_catalog.pg_trigger t
      JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
      JOIN pg_catalog.pg_language l ON l.oid = p.prolang
     WHERE t.tgrelid = %s AND NOT t.tgisinternal AND t.tgenabled <> 'D'
       AND t.tgtype::int & 1 = 1 AND t.tgtype::int & 2 = 2 AND t.tgtype::int & 16 = 16
       AND l.lanname IN ('plpgsql', 'sql')
     ORDER BY t.tgname
    """
)

#: (oid, key columns): foreign keys of the table over key columns whose ON UPDATE action changes them.
CASCADING_KEY_UPDATES = sql.SQL(
    """
    SELECT con.conname
      FROM pg_catalog.pg_constraint con
     WHERE con.conrelid = %s AND con.contype = 'f' AND con.confupdtype IN ('c', 'n', 'd')
       AND EXISTS (SELECT 1 FROM unnest(con.conkey) AS k(attnum)
                     JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
                    WHERE a.attname::text = ANY(%s::text[]))
     ORDER BY con.conname
    """
)

SERVER_VERSION = sql.SQL("SELECT current_setting('server_version_num')::int")


# --- the target table --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetSQL(Target):
    """The batch statements for one resolved table, key and set of expressions. Execute them with a parameter
    sequence, if only an empty one: their % signs are escaped for psycopg's placeholder parsing."""

    def __post_init__(self) -> None:
        # Every statement built from a target puts its fragments between parentheses: each must stay inside them.
        name = f"{self.schema}.{self.table}"
        for column, expression in self.values:
            if problem := fragment_problem(expression):
                raise PlanError(f"expression for column {column!r} of {name} is not valid: {problem}")
        if self.where is not None and (problem := fragment_problem(self.where)):
            raise PlanError(f"filter (where) on {name} is not valid: {problem}")

    @property
    def relation(self) -> sql.SQL:
        return _ident(self.schema, self.table)

    def _key_row(self) -> sql.Composable:
        cols = [_ident(c) for c in self.key]
        return cols[0] if len(cols) == 1 else sql.SQL("({})").format(sql.SQL(", ").join(cols))

    def _key_param_list(self) -> sql.Composable:
        return sql.SQL(", ").join(sql.SQL("CAST(%s AS {})").format(sql.SQL(t)) for t in self.key_types)

    def _key_params(self) -> sql.Composable:
        if len(self.key_types) == 1:
            return self._key_param_list()
        return sql.SQL("({})").format(self._key_param_list())

    def _order(self, direction: str = "") -> sql.Composable:
        # Qualified on purpose: a bare ORDER BY "id" would sort by the output column "id"::text, as text.
        return sql.SQL(", ").join(
            sql.SQL("{}{}").format(_ident(self.schema, self.table, c), sql.SQL(direction)) for c in self.key
        )

    def _key_text(self) -> sql.Composable:
        # Keys travel as PostgreSQL's own text form (exact for every type, floats included since PG 12) and are
        # cast back to the column type on the way in, so a checkpoint stored as JSON round-trips any key type.
        return sql.SQL(", ").join(sql.SQL("{}::text").format(_ident(c)) for c in self.key)

    def _round_trip(self) -> sql.Composable:
        # Whether the key's text form reads back as the same key: the checkpoint is that text, so a form that loses
        # anything (a rounded float, a truncating cast) would silently skip or repeat rows. Checked on every key
        # the walk keeps (one row per batch), so a type or setting nobody thought of fails loudly instead.
        return sql.SQL(" AND ").join(
            sql.SQL("CAST({c}::text AS {t}) = {c}").format(c=_ident(c), t=sql.SQL(t))
            for c, t in zip(self.key, self.key_types, strict=True)
        )

    def _range(self, has_lower: bool) -> sql.Composable:
        upper = sql.SQL("{} <= {}").format(self._key_row(), self._key_params())
        if not has_lower:
            return upper
        return sql.SQL("{} > {} AND {}").format(self._key_row(), self._key_params(), upper)

    def _unchanged(self) -> sql.Composable:
        # Whether the key columns still have the types and collations the checkpoint was written in. A column
        # altered since the run planned would make this statement walk in another order (a collation change
        # parses and plans as before); the catalog is read after the statement locked the table, so no ALTER
        # can slip in between this check and the batch's UPDATE.
        if not self.key_signature:
            return sql.SQL("true")
        return sql.SQL(
            "(SELECT array_agg({signature} ORDER BY k.ord)"
            " FROM unnest({names}) WITH ORDINALITY AS k(name, ord)"
            " JOIN pg_catalog.pg_attribute a ON a.attrelid = {relation}::regclass AND a.attname = k.name"
            " AND NOT a.attisdropped) IS NOT DISTINCT FROM {signatures}"
        ).format(
            signature=sql.SQL(_SIGNATURE),
            names=_text_array(self.key),
            relation=_literal(sql.Identifier(self.schema, self.table).as_string(None)),
            signatures=_text_array(self.key_signature),
        )

    def _keys(self, verified: bool) -> sql.Composable:
        if not verified:
            return self._key_text()
        return sql.SQL("{}, {}, {}").format(self._key_text(), self._round_trip(), self._unchanged())

    def key_unchanged(self) -> sql.Composed:
        """Whether the key columns still have the planned types and collations (one boolean)."""
        return sql.SQL("SELECT {}").format(self._unchanged())

    def max_key(self, *, verified: bool = False) -> sql.Composed:
        """The largest key: where the run's range ends (rows inserted later are not the backfill's job). With
        ``verified``, two more columns as in :meth:`lookahead`."""
        return sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT 1").format(
            self._keys(verified), self.relation, self._order(" DESC")
        )

    def any_key(self) -> sql.Composed:
        """The key of some row: the first one a sequential read meets (one page), a value to plan batches with."""
        return sql.SQL("SELECT {} FROM {} LIMIT 1").format(self._key_text(), self.relation)

    def min_key(self, *, verified: bool = False) -> sql.Composed:
        """The smallest key (as :meth:`max_key`)."""
        return sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT 1").format(
            self._keys(verified), self.relation, self._order()
        )

    def lookahead(self, has_lower: bool, *, verified: bool = False) -> sql.Composed:
        """The key ``n`` rows ahead (params: [lower...], upper..., offset): an index-only walk of n index entries.
        With ``verified``, a last column says whether its text form reads back as the same key.

        Deciding the batch's upper key first and then updating a closed key range keeps both statements on the
        key's index; an ``UPDATE ... WHERE id IN (SELECT ... LIMIT n)`` is often planned as a hash join over a
        sequential scan of the whole table.
        """
        return sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {} OFFSET %s LIMIT 1").format(
            self._keys(verified), self.relation, self._range(has_lower), self._order()
        )

    def _assignments(self) -> sql.Composable:
        return sql.SQL(", ").join(
            sql.SQL("{} = ({})").format(_ident(col), _fragment(expr)) for col, expr in self.values
        )

    def _rows_to_change(self, condition: sql.Composable) -> sql.Composable:
        """The key range ``condition``, narrowed by the filter and (with ``skip_unchanged``) to rows whose values
        differ from the expressions' results. Compared as text: exact for every type (floats included since PG 12),
        including types without an equality operator (json) and expressions of another type than the column."""
        if self.where:
            condition = sql.SQL("{} AND ({})").format(condition, _fragment(self.where))
        if self.skip_unchanged:
            differs = sql.SQL(" OR ").join(
                sql.SQL("{}::text IS DISTINCT FROM ({})::text").format(_ident(col), _fragment(expr))
                for col, expr in self.values
            )
            condition = sql.SQL("{} AND ({})").format(condition, differs)
        return condition

    def update(self, has_lower: bool) -> sql.Composed:
        """Apply the expressions to one closed key range (params: [lower...], upper...)."""
        return sql.SQL("UPDATE {} SET {} WHERE {}").format(
            self.relation, self._assignments(), self._rows_to_change(self._range(has_lower))
        )

    def batch(
        self,
        tables: ControlTables,
        has_lower: bool,
        undo: sql.Composable | None = None,
        returning_old: bool = False,
        *,
        history: bool = True,
    ) -> sql.Composed:
        """A whole batch in one statement, so it costs one round trip whatever the network (params: see
        :meth:`batch_params`). Run it after :meth:`ControlTables.lock_slice` in the same transaction.

        It goes ahead only if the slice, read under that lock, is still running at the checkpoint and upper bound
        the runner expects, and (``claimed``) still claimed by this session (otherwise it changes nothing and the
        runner re-reads the slice), and only if the end key's text form (the checkpoint) reads back as the same
        key and the key columns still have the types and collations the run planned with (:meth:`key_unchanged`
        tells which of the two stopped it). It finds the batch's end key with the index-only look-ahead, updates
        the closed key range ``(checkpoint, end]`` and writes the new checkpoint, returning it with the rows
        changed, the slice's rows so far and the seconds the transaction has spent in the database (what adaptive
        sizing measures: the network's share is not the batch's cost). The same statement adds the throttle waits
        and retries that led up to the batch to the slice's counters and writes the batch into the history ring
        (``history=False`` leaves that row out, for the benchmark of its cost; the parameters stay the same).
        The range conditions stay index conditions: the end key reaches the UPDATE as an InitPlan parameter.

        With ``undo`` (a reversible backfill's undo log), the same statement also stores each changed row's key,
        old values and new values there (see :meth:`_write_reversibly`); a revert's target writes the old values
        back instead (see :meth:`_write_back`). Either way, a batch's rows, undo rows and checkpoint commit or
        roll back together.
        """
        ends = [sql.Identifier(f"end_{i}") for i in range(len(self.key))]
        end_row = ends[0] if len(ends) == 1 else sql.SQL("({})").format(sql.SQL(", ").join(ends))
        lower = sql.SQL("{} > {} AND ").format(self._key_row(), self._key_params()) if has_lower else sql.SQL("")
        return sql.SQL(
            """WITH _backfill_go AS (
    SELECT true AS ok FROM {s} s JOIN {b} b ON b.id = s.backfill_id
     WHERE s.backfill_id = %s AND s.slice = %s AND b.state = {running} AND NOT s.done
       AND s.checkpoint IS NOT DISTINCT FROM %s::jsonb AND s.upper_bound = %s::jsonb
       AND (NOT %s OR s.claim_pid IS NOT DISTINCT FROM pg_catalog.pg_backend_pid())
), _backfill_end AS (
    SELECT {ends}, {same} AS same FROM (
        (SELECT 0, {key_columns} FROM {t} WHERE (SELECT ok FROM _backfill_go) AND {range}
          ORDER BY {order} OFFSET %s LIMIT 1)
        UNION ALL SELECT 1, {key_param_list}
    ) k (o, {ends}) ORDER BY o LIMIT 1
), {write}, _backfill_slice AS (
UPDATE {s} SET checkpoint = (SELECT jsonb_build_array({ends_text}) FROM _backfill_end),
       done = (SELECT {end_row} = {key_params} FROM _backfill_end),
       rows_updated = rows_updated + (SELECT count(*) FROM _backfill_changed), batches = batches + 1,
       owner = %s, heartbeat_at = now(), updated_at = now(),
       throttle_seconds = {add_waits}, retries = {add_retries}, waiting_for = NULL, waiting_since = NULL
 WHERE backfill_id = %s AND slice = %s AND (SELECT ok FROM _backfill_go) AND (SELECT same FROM _backfill_end)
RETURNING checkpoint, done, (SELECT count(*) FROM _backfill_changed) AS rows, rows_updated AS slice_rows,
          batches, extract(epoch FROM clock_timestamp() - now())::float8 AS seconds
){history}
SELECT checkpoint, done, rows, slice_rows, seconds FROM _backfill_slice"""
        ).format(
            history=tables.history_insert(written=history),
            add_waits=_add_counts(sql.SQL("throttle_seconds"), "float8"),
            add_retries=_add_counts(sql.SQL("retries"), "bigint"),
            s=tables.slices,
            b=tables.backfills,
            running=state_literal(RunState.RUNNING),
            t=self.relation,
            ends=sql.SQL(", ").join(ends),
            same=sql.SQL(" AND ").join(
                [
                    *(
                        sql.SQL("CAST({e}::text AS {t}) = {e}").format(e=e, t=sql.SQL(t))
                        for e, t in zip(ends, self.key_types, strict=True)
                    ),
                    self._unchanged(),
                ]
            ),
            end_row=end_row,
            ends_text=sql.SQL(", ").join(sql.SQL("{}::text").format(end) for end in ends),
            key_columns=self._order(),
            key_params=self._key_params(),
            key_param_list=self._key_param_list(),
            range=self._range(has_lower),
            order=self._order(),
            write=self._write(has_lower, lower, ends, undo, returning_old),
        )

    def _write(
        self,
        has_lower: bool,
        lower: sql.Composable,
        ends: list[sql.Identifier],
        undo: sql.Composable | None,
        returning_old: bool,
    ) -> sql.Composable:
        """The batch's CTEs that change rows; the last one, ``_backfill_changed``, returns a row per changed row.
        Each consumes the lower key's parameters once, where the plain UPDATE does."""
        if self.reverts is not None:
            return self._write_back(has_lower)
        if undo is not None:
            return self._write_reversibly(has_lower, undo, returning_old)
        changes = self._rows_to_change(
            sql.SQL("{}{} <= (SELECT {} FROM _backfill_end)").format(lower, self._key_row(), sql.SQL(", ").join(ends))
        )
        return sql.SQL(
            """_backfill_changed AS (
    UPDATE {t} SET {assignments} WHERE {guard} AND {changes} RETURNING 1
)"""
        ).format(t=self.relation, assignments=self._assignments(), guard=_GUARD, changes=changes)

    def _lower_cte(self, has_lower: bool) -> sql.Composable:
        # The lower key, bound once and used by several CTEs (a row comparison with a one-row subquery stays an
        # index condition, as the end key's does).
        if not has_lower:
            return sql.SQL("")
        return sql.SQL("_backfill_low AS (SELECT {}), ").format(
            sql.SQL(", ").join(
                sql.SQL("{} AS {}").format(p, sql.Identifier(f"low_{i}"))
                for i, p in enumerate(sql.SQL("CAST(%s AS {})").format(sql.SQL(t)) for t in self.key_types)
            )
        )

    def _between(self, has_lower: bool, columns: Sequence[sql.Composable]) -> sql.Composable:
        """``columns`` (a key) within the batch's range: after the lower key, up to the end key."""
        row = columns[0] if len(columns) == 1 else sql.SQL("({})").format(sql.SQL(", ").join(columns))
        n = len(columns)
        upto = sql.SQL("{} <= (SELECT {} FROM _backfill_end)").format(
            row, sql.SQL(", ").join(sql.Identifier(f"end_{i}") for i in range(n))
        )
        if not has_lower:
            return upto
        return sql.SQL("{} > (SELECT {} FROM _backfill_low) AND {}").format(
            row, sql.SQL(", ").join(sql.Identifier(f"low_{i}") for i in range(n)), upto
        )

    def _undo_columns(self) -> sql.Composable:
        return sql.SQL(", ").join(sql.Identifier(name) for name in undo_columns(len(self.key), len(self.values)))

    def _write_reversibly(self, has_lower: bool, undo: sql.Composable, returning_old: bool) -> sql.Composable:
        """The UPDATE, returning each changed row's key, the values it overwrote and the values it wrote, and the
        INSERT of those into the undo log.

        PostgreSQL 18 returns the overwritten values itself (``RETURNING old.col``), as they were in the row
        version the UPDATE replaced. Before 18, the rows are first locked and read (``SELECT ... FOR UPDATE``,
        which reads the newest version of a row another transaction changed meanwhile, and keeps it so until the
        batch commits), and the UPDATE joins them by key: it changes exactly the rows that were read."""
        key = [_ident(c) for c in self.key]
        columns = [_ident(c) for c in undo_order(self.values)]
        qualified = [sql.SQL("{}.{}").format(self.relation, c) for c in key]
        if returning_old:
            returning = sql.SQL(", ").join(
                [
                    *(sql.SQL("_backfill_new.{}").format(c) for c in key),
                    *(sql.SQL("_backfill_old.{}").format(c) for c in columns),
                    *(sql.SQL("_backfill_new.{}").format(c) for c in columns),
                ]
            )
            change = sql.SQL(
                """UPDATE {t} SET {assignments} WHERE {guard} AND {changes}
    RETURNING WITH (OLD AS _backfill_old, NEW AS _backfill_new) {returning}"""
            ).format(
                t=self.relation,
                assignments=self._assignments(),
                guard=_GUARD,
                changes=self._rows_to_change(self._between(has_lower, qualified)),
                returning=returning,
            )
            read: sql.Composable = sql.SQL("")
        else:
            read_keys = [sql.Identifier(f"_backfill_k_{i}") for i in range(len(key))]
            read_old = [sql.Identifier(f"_backfill_o_{i}") for i in range(len(columns))]
            read = sql.SQL(
                """_backfill_read AS (
    SELECT {selected} FROM {t} WHERE {guard} AND {changes} FOR UPDATE
), """
            ).format(
                selected=sql.SQL(", ").join(
                    sql.SQL("{} AS {}").format(c, name)
                    for c, name in zip([*key, *columns], [*read_keys, *read_old], strict=True)
                ),
                t=self.relation,
                guard=_GUARD,
                changes=self._rows_to_change(self._between(has_lower, qualified)),
            )
            change = sql.SQL(
                """UPDATE {t} SET {assignments} FROM _backfill_read
     WHERE {same_key} AND {range}
    RETURNING {returning}"""
            ).format(
                t=self.relation,
                assignments=self._assignments(),
                same_key=_row_equal(qualified, [sql.SQL("_backfill_read.{}").format(k) for k in read_keys]),
                range=self._between(has_lower, qualified),
                returning=sql.SQL(", ").join(
                    [
                        *(sql.SQL("_backfill_read.{}").format(k) for k in read_keys),
                        *(sql.SQL("_backfill_read.{}").format(o) for o in read_old),
                        *(sql.SQL("{}.{}").format(self.relation, c) for c in columns),
                    ]
                ),
            )
        names = self._undo_columns()
        return sql.SQL(
            """{low}{read}_backfill_changed AS (
    {change}
), _backfill_undo AS (
    INSERT INTO {undo} ({names}) SELECT * FROM _backfill_changed
)"""
        ).format(low=self._lower_cte(has_lower), read=read, change=change, undo=undo, names=names)

    def _write_back(self, has_lower: bool) -> sql.Composable:
        """A revert's batch: this target is the undo log. Each of its rows in the range whose table row still
        holds the values the backfill wrote (compared as text, as ``skip_unchanged`` compares) gets its old
        values back; a row the application changed (or deleted) since is left as it is, and its undo row is
        marked ``kept`` (unless the row holds its old values already: put back by an earlier walk, or by the
        application). Those are rare: marking them costs a look at the range, where deleting every reverted undo
        row would cost a write per row."""
        reverts = self.reverts
        assert reverts is not None
        n, m = len(self.key), len(self.values)
        names = undo_columns(n, m)
        keys, old, new = names[:n], names[n : n + m], names[n + m :]
        dest = _ident(reverts.schema, reverts.table)
        dest_key = [sql.SQL("{}.{}").format(dest, _ident(c)) for c in reverts.key]
        undo_key = [sql.SQL("_backfill_undo.{}").format(sql.Identifier(k)) for k in keys]
        still_written = sql.SQL(" AND ").join(
            sql.SQL("{}.{}::text IS NOT DISTINCT FROM _backfill_undo.{}::text").format(
                dest, _ident(c), sql.Identifier(written)
            )
            for c, written in zip(reverts.columns, new, strict=True)
        )
        marked = [sql.SQL("_backfill_mark.{}").format(sql.Identifier(k)) for k in keys]
        return sql.SQL(
            """{low}_backfill_undo AS (
    SELECT {names} FROM {undo} WHERE {guard} AND {range}
), _backfill_changed AS (
    UPDATE {dest} SET {assignments} FROM _backfill_undo
     WHERE {same_key} AND {dest_range} AND {still_written}
    RETURNING {undo_key}
), _backfill_kept AS (
    UPDATE {undo} _backfill_mark SET kept = true
     WHERE {mark_range} AND NOT EXISTS (SELECT FROM _backfill_changed WHERE {mark_key})
       AND NOT EXISTS (SELECT FROM {dest} WHERE {dest_marked} AND {dest_range} AND {holds_old})
)"""
        ).format(
            low=self._lower_cte(has_lower),
            names=sql.SQL(", ").join(sql.Identifier(c) for c in names),
            undo=self.relation,
            guard=_GUARD,
            range=self._between(has_lower, [sql.Identifier(k) for k in keys]),
            dest=dest,
            assignments=sql.SQL(", ").join(
                sql.SQL("{} = _backfill_undo.{}").format(_ident(c), sql.Identifier(o))
                for c, o in zip(reverts.columns, old, strict=True)
            ),
            same_key=_row_equal(dest_key, undo_key),
            dest_range=self._between(has_lower, dest_key),
            still_written=still_written,
            undo_key=sql.SQL(", ").join(undo_key),
            mark_key=_row_equal(marked, [sql.SQL("_backfill_changed.{}").format(sql.Identifier(k)) for k in keys]),
            mark_range=self._between(has_lower, marked),
            dest_marked=_row_equal(dest_key, marked),
            holds_old=sql.SQL(" AND ").join(
                sql.SQL("{}.{}::text IS NOT DISTINCT FROM _backfill_mark.{}::text").format(
                    dest, _ident(c), sql.Identifier(o)
                )
                for c, o in zip(reverts.columns, old, strict=True)
            ),
        )

    @staticmethod
    def batch_params(
        backfill_id: int,
        slice: int,
        checkpoint: Sequence[str] | None,
        upper: Sequence[str | None],
        claimed: bool,
        size: int,
        owner: str,
        *,
        waits: Mapping[str, float] | None = None,
        retries: Mapping[str, int] | None = None,
    ) -> list[Any]:
        """The parameters of :meth:`batch` (with ``has_lower = checkpoint is not None``), in their order. An
        ``upper`` of NULLs matches no slice: the batch then only takes the slice's lock and reads it. ``waits``
        (seconds by throttle reason) and ``retries`` (attempts by reason) are what led up to this batch."""
        lower = list(checkpoint or [])
        checkpoint_json = Jsonb(checkpoint) if checkpoint is not None else None
        head = [backfill_id, slice, checkpoint_json, Jsonb(upper), claimed]
        waits, retries = dict(waits or {}), dict(retries or {})
        counters = [Jsonb(waits), Jsonb(retries)]
        waited = sum(waits.values())
        reason = max(waits, key=waits.__getitem__) if waited > 0 else None
        history = [backfill_id, slice, size, sum(retries.values()), waited, reason]
        return [*head, *lower, *upper, size - 1, *upper, *lower, *upper, owner, *counters, backfill_id, slice, *history]

    def sample_keys(self, has_lower: bool) -> sql.Composed:
        """Sorted keys of a random sample of the table's pages within a key range (params: percent, [lower...],
        upper...): split points for a range too large to walk, read from a small fraction of the table."""
        return sql.SQL("SELECT {} FROM {} TABLESAMPLE SYSTEM (%s) WHERE {} ORDER BY {}").format(
            self._keys(True), self.relation, self._range(has_lower), self._order()
        )

    def check_expression(self, column: str, expression: str) -> sql.Composed:
        """Parse, resolve and type-check one SET expression without touching a row."""
        return sql.SQL("EXPLAIN UPDATE {} SET {} = ({}) WHERE false").format(
            self.relation, _ident(column), _fragment(expression)
        )

    def check_where(self) -> sql.Composed:
        """Parse, resolve and type-check the filter without reading a row."""
        return sql.SQL("EXPLAIN SELECT 1 FROM {} WHERE ({})").format(self.relation, _fragment(self.where or "true"))

    def estimate_range(self, has_lower: bool, *, filtered: bool) -> sql.Composed:
        """The planner's row estimate for a key range (params: [lower...], upper...), optionally with the filter:
        a plan in JSON, no row read, so it is cheap on any table size (used by ``backfill plan``)."""
        condition = self._range(has_lower)
        if filtered and self.where:
            condition = sql.SQL("{} AND ({})").format(condition, _fragment(self.where))
        return sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {} WHERE {}").format(self.relation, condition)


# --- the control tables ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def for_target(target: Target) -> TargetSQL:
    """The batch statements of a resolved target (composed once per target, not once per batch)."""
    if isinstance(target, TargetSQL):
        return target
    # Field by field: asdict() would turn a nested dataclass (a revert's Reverted) into a dict.
    return TargetSQL(**{field.name: getattr(target, field.name) for field in dataclasses.fields(target)})


def state_literal(value: RunState) -> sql.Literal:
    """A state as the control table stores it: the enum's value, never retyped in SQL text."""
    return sql.Literal(value.value)


class _ControlTable:
    """One control table's name, qualified with the schema of the :class:`ControlTables` it is read from."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, tables: ControlTables, owner: type[ControlTables] | None = None) -> sql.SQL:
        return tables._t(self.name)


@dataclass(frozen=True)
class ControlTables:
    """Statements on the control tables in one schema. Execute each with a parameter sequence, if only an empty
    one: a % in the schema name is escaped for psycopg's placeholder parsing (as in the batch statements)."""

    schema: str

    backfills = _ControlTable("backfills")
    slices = _ControlTable("backfill_slices")
    meta = _ControlTable("backfill_meta")
    history = _ControlTable("backfill_batches")

    def _t(self, name: str) -> sql.SQL:
        return _ident(self.schema, name)

    def _format(self) -> dict[str, sql.Composable]:
        return {"b": self.backfills, "s": self.slices, "m": self.meta, "h": self.history}

    def create(self) -> list[sql.Composed]:
        """Idempotent DDL for the current version, run in one transaction (retried if a concurrent ``init`` wins a
        race on the catalog: see the store). Tables of an older version are left as they are: see :meth:`upgrade`."""
        f = {
            "schema": _ident(self.schema),
            "schema_name": _literal(sql.Identifier(self.schema).as_string(None)),
            **self._format(),
            "version": sql.Literal(CONTROL_VERSION),
            "backfill_added": sql.SQL(",\n                 ").join(_columns(_BACKFILL_COLUMNS_ADDED)),
            "slice_added": sql.SQL(",\n                 ").join(_columns(_SLICE_COLUMNS_ADDED)),
            "pending": state_literal(RunState.PENDING),
            "states": sql.SQL(", ").join(state_literal(value) for value in RunState),
        }
        statements = [
            # Only where the schema is missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even
            # when the schema exists, which a runner role does not have.
            "DO $$ BEGIN IF pg_catalog.to_regnamespace({schema_name}) IS NULL THEN CREATE SCHEMA {schema}; END IF; "
            "END $$",
            """CREATE TABLE IF NOT EXISTS {m} (
                 singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
                 version integer NOT NULL)""",
            # Serialises concurrent inits from here on (concurrent GRANT/REVOKE on one table fail with "tuple
            # concurrently updated"). A table lock, not an advisory lock: only roles with privileges on the
            # table can take it, so no other role can hold every init back.
            "LOCK TABLE {m} IN SHARE ROW EXCLUSIVE MODE",
            """CREATE TABLE IF NOT EXISTS {b} (
                 id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 name text NOT NULL UNIQUE,
                 spec jsonb NOT NULL,
                 fingerprint text NOT NULL,
                 state text NOT NULL DEFAULT {pending} CHECK (state IN ({states})),
                 upper_bound jsonb,
                 estimated_rows bigint,
                 last_error text,
                 created_at timestamptz NOT NULL DEFAULT now(),
                 started_at timestamptz,
                 updated_at timestamptz NOT NULL DEFAULT now(),
                 finished_at timestamptz,
                 {backfill_added})""",
            """CREATE TABLE IF NOT EXISTS {s} (
                 backfill_id bigint NOT NULL REFERENCES {b} (id) ON DELETE CASCADE,
                 slice integer NOT NULL,
                 lower_bound jsonb,
                 upper_bound jsonb NOT NULL,
                 checkpoint jsonb,
                 done boolean NOT NULL DEFAULT false,
                 rows_updated bigint NOT NULL DEFAULT 0,
                 batches bigint NOT NULL DEFAULT 0,
                 owner text,
                 heartbeat_at timestamptz,
                 updated_at timestamptz NOT NULL DEFAULT now(),
                 {slice_added},
                 PRIMARY KEY (backfill_id, slice))""",
            # The batch history: one ring of HISTORY_PER_SLICE rows per slice (slot = the slice's batch number
            # modulo that), written by the batch statement itself.
            """CREATE TABLE IF NOT EXISTS {h} (
                 backfill_id bigint NOT NULL,
                 slice integer NOT NULL,
                 slot integer NOT NULL,
                 batch bigint NOT NULL,
                 finished_at timestamptz NOT NULL,
                 rows bigint NOT NULL,
                 duration float8 NOT NULL,
                 batch_size bigint NOT NULL,
                 retries integer NOT NULL,
                 throttle_wait float8 NOT NULL,
                 throttle_reason text,
                 PRIMARY KEY (backfill_id, slice, slot),
                 FOREIGN KEY (backfill_id, slice) REFERENCES {s} (backfill_id, slice) ON DELETE CASCADE)""",
            "INSERT INTO {m} (version) VALUES ({version}) ON CONFLICT DO NOTHING",
            "REVOKE ALL ON {m}, {b}, {s}, {h} FROM PUBLIC",
        ]
        return [sql.SQL(s).format(**f) for s in statements]

    def undo(self, backfill_id: int) -> sql.SQL:
        """The undo log of a reversible backfill (in the control schema, named by the backfill's id)."""
        return self._t(undo_table(backfill_id))

    def create_undo(self, backfill_id: int, key_types: Sequence[str], value_types: Sequence[str]) -> list[sql.Composed]:
        """The undo log's DDL: the key, then each value column twice (old, written), each of its column's own type,
        modifier and collation (exact for every type, as text forms may not be), keyed by the key (which also
        orders a revert's walk), and whether a revert left the row as the application wrote it (``kept``). Access
        as the control tables': none for PUBLIC."""
        names = undo_columns(len(key_types), len(value_types))
        types = [*key_types, *value_types, *value_types]
        keys = sql.SQL(", ").join(sql.Identifier(name) for name in names[: len(key_types)])
        return [
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, kept boolean, PRIMARY KEY ({}))").format(
                self.undo(backfill_id),
                sql.SQL(", ").join(
                    sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind.replace("%", "%%")))
                    for name, kind in zip(names, types, strict=True)
                ),
                keys,
            ),
            sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(self.undo(backfill_id)),
        ]

    def drop_undo(self, backfill_id: int) -> sql.Composed:
        return sql.SQL("DROP TABLE IF EXISTS {}").format(self.undo(backfill_id))

    def vacuum_undo(self, backfill_id: int) -> sql.Composed:
        return sql.SQL("VACUUM (ANALYZE) {}").format(self.undo(backfill_id))

    def count_kept(self, backfill_id: int) -> sql.Composed:
        """Rows a revert left as the application wrote them."""
        return sql.SQL("SELECT count(*) FROM {} WHERE kept").format(self.undo(backfill_id))

    def undo_tables(self) -> sql.Composed:
        """(schema): the undo logs in the control schema: table name and total size in bytes (indexes and TOAST
        included)."""
        return sql.SQL(
            """SELECT c.relname::text, pg_catalog.pg_total_relation_size(c.oid)
                 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = %s AND c.relkind = 'r' AND c.relname LIKE {pattern}"""
        ).format(pattern=sql.SQL(_UNDO_PATTERN))

    def runner_roles(self) -> sql.Composed:
        """The roles granted UPDATE on the slices (``init --grant``): a new undo log is granted to them too."""
        return sql.SQL(
            """SELECT DISTINCT r.rolname::text
                 FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
                 JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
                WHERE c.oid = {slices}::regclass AND a.privilege_type = 'UPDATE' AND a.grantee <> c.relowner"""
        ).format(slices=_literal(sql.Identifier(self.schema, "backfill_slices").as_string(None)))

    def grant_undo(self, table: str, role: str) -> sql.Composed:
        """What a runner needs on an undo log: write it (a run), read it and mark what it kept (a revert)."""
        return sql.SQL("GRANT SELECT, INSERT, UPDATE ON {} TO {}").format(self._t(table), _ident(role))

    def upgrade(self) -> list[sql.Composed]:
        """DDL that brings tables of an older version to the current one, in place: run after :meth:`create` in
        the same transaction, only when the stored version is older (its ALTERs lock the tables for an instant)."""
        f = {
            **self._format(),
            "version": sql.Literal(CONTROL_VERSION),
            "backfill_added": sql.SQL(", ").join(_columns(_BACKFILL_COLUMNS_ADDED, "ADD COLUMN IF NOT EXISTS ")),
            "slice_added": sql.SQL(", ").join(_columns(_SLICE_COLUMNS_ADDED, "ADD COLUMN IF NOT EXISTS ")),
        }
        statements = [
            "ALTER TABLE {b} {backfill_added}",
            "ALTER TABLE {s} {slice_added}",
            "UPDATE {m} SET version = {version} WHERE version < {version}",
        ]
        return [sql.SQL(s).format(**f) for s in statements]

    def history_insert(self, *, written: bool = True) -> sql.Composable:
        """The batch statement's CTE that writes the batch into its slice's history ring (params: backfill id,
        slice, batch size, retries, throttle wait, throttle reason). Not ``written``: the same expressions in a
        CTE nothing reads, which PostgreSQL never runs (the benchmark's batch without history)."""
        select = sql.SQL(
            "SELECT %s::bigint, %s::integer, (n.batches %% {ring})::integer, n.batches, clock_timestamp(), n.rows, "
            "n.seconds, %s::bigint, %s::integer, %s::float8, %s::text FROM _backfill_slice n"
        ).format(ring=sql.Literal(HISTORY_PER_SLICE))
        if not written:
            return sql.SQL(", _backfill_history AS ({})").format(select)
        return sql.SQL(
            """, _backfill_history AS (
INSERT INTO {h} (backfill_id, slice, slot, batch, finished_at, rows, duration, batch_size, retries, throttle_wait,
                 throttle_reason)
{select}
ON CONFLICT (backfill_id, slice, slot) DO UPDATE
   SET batch = EXCLUDED.batch, finished_at = EXCLUDED.finished_at, rows = EXCLUDED.rows,
       duration = EXCLUDED.duration, batch_size = EXCLUDED.batch_size, retries = EXCLUDED.retries,
       throttle_wait = EXCLUDED.throttle_wait, throttle_reason = EXCLUDED.throttle_reason
)"""
        ).format(h=self.history, select=select)

    def select_history(self) -> sql.Composed:
        """(backfill_id, limit): the backfill's latest batches over all its slices, oldest first."""
        return sql.SQL(
            """SELECT slice, finished_at, rows, duration, batch_size, retries, throttle_wait, throttle_reason
                 FROM (SELECT * FROM {h} WHERE backfill_id = %s ORDER BY finished_at DESC, slice LIMIT %s) latest
                ORDER BY finished_at, slice"""
        ).format(h=self.history)

    def add_counters(self) -> sql.Composed:
        """(waits, retries, backfill_id, slice): add throttle waits and retries that no batch carried (the run
        ended after them) to the slice's counters."""
        return sql.SQL(
            "UPDATE {s} SET throttle_seconds = {waits}, retries = {retries} WHERE backfill_id = %s AND slice = %s"
        ).format(
            s=self.slices,
            waits=_add_counts(sql.SQL("throttle_seconds"), "float8"),
            retries=_add_counts(sql.SQL("retries"), "bigint"),
        )

    def note_wait(self) -> sql.Composed:
        """(reason, backfill_id, slice): the slice's runner waits on this throttle from now (until its next batch)."""
        return sql.SQL(
            "UPDATE {s} SET waiting_for = %s, waiting_since = now() WHERE backfill_id = %s AND slice = %s"
        ).format(s=self.slices)

    def set_overrides(self) -> sql.Composed:
        """(reset, overrides, name): replace (reset) or extend the live setting overrides; returns the id."""
        return sql.SQL(
            """UPDATE {b} SET overrides = CASE WHEN %s THEN '{{}}'::jsonb ELSE overrides END || %s::jsonb,
                      updated_at = now()
                WHERE name = %s RETURNING id"""
        ).format(b=self.backfills)

    def overrides(self) -> sql.Composed:
        """(id): the live setting overrides of a backfill (read by runners during long waits)."""
        return sql.SQL("SELECT overrides FROM {} WHERE id = %s").format(self.backfills)

    def clock(self) -> sql.SQL:
        """The database's time, which the history's timestamps are in."""
        return sql.SQL("SELECT clock_timestamp()")

    def distrust(self) -> sql.Composed:
        """(schema=, role=): one line per reason for ``role`` (NULL: the current user) not to trust the control
        tables that exist in ``schema``; no row when there is none.

        A control table's triggers, rules, policies, column defaults and spec rows all run as whoever uses it, so a
        table some other role made (say, a low-privilege role that could create in ``public``) would run that
        role's code with the runner's privileges. An owner is trusted when it gains nothing by that: ``role``
        itself, a superuser, the database owner or a member of it, or a role that can already act as ``role``.
        """
        return sql.SQL(
            """
            WITH me AS (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = coalesce(%(role)s, current_user)),
            trusted AS (
                SELECT r.oid FROM pg_catalog.pg_roles r, pg_catalog.pg_database d, me
                 WHERE d.datname = pg_catalog.current_database()
                   AND (r.oid = me.oid OR r.rolsuper OR r.rolname = 'pg_database_owner'
                        OR pg_catalog.pg_has_role(r.oid, d.datdba, 'MEMBER')
                        OR pg_catalog.pg_has_role(r.oid, me.oid, 'MEMBER'))
            ),
            t AS (
                SELECT c.oid, n.nspname, c.relname, c.relkind, c.relowner, c.relrowsecurity, c.relacl,
                       pg_catalog.format('%%I.%%I', n.nspname, c.relname) AS label
                  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = %(schema)s
                   AND (c.relname IN ('backfills', 'backfill_slices', 'backfill_meta', 'backfill_batches')
                        OR (c.relname LIKE {pattern} AND c.relkind <> 'i'))
            )
            SELECT pg_catalog.format('schema %%I is owned by role %%I', n.nspname, n.nspowner::regrole::text)
              FROM pg_catalog.pg_namespace n
             WHERE n.nspname = %(schema)s AND n.nspowner NOT IN (SELECT oid FROM trusted)
            UNION ALL
            SELECT t.label || ' is not a plain table' FROM t WHERE t.relkind <> 'r'
            UNION ALL
            SELECT pg_catalog.format('%%s is owned by role %%I', t.label, t.relowner::regrole::text)
              FROM t WHERE t.relowner NOT IN (SELECT oid FROM trusted)
            UNION ALL
            SELECT pg_catalog.format('%%s has trigger %%I', t.label, g.tgname)
              FROM t JOIN pg_catalog.pg_trigger g ON g.tgrelid = t.oid AND NOT g.tgisinternal
            UNION ALL
            SELECT pg_catalog.format('%%s has rule %%I', t.label, w.rulename)
              FROM t JOIN pg_catalog.pg_rewrite w ON w.ev_class = t.oid
            UNION ALL
            SELECT t.label || ' has row-level security' FROM t
             WHERE t.relrowsecurity OR EXISTS (SELECT 1 FROM pg_catalog.pg_policy p WHERE p.polrelid = t.oid)
            UNION ALL
            SELECT pg_catalog.format('%%s grants %%s to PUBLIC', t.label, pg_catalog.string_agg(a.privilege_type, ', '))
              FROM t, pg_catalog.aclexplode(t.relacl) a WHERE a.grantee = 0 GROUP BY t.label
            UNION ALL
            SELECT pg_catalog.format('%%s grants %%s on column %%I to PUBLIC', t.label, a.privilege_type, c.attname)
              FROM t JOIN pg_catalog.pg_attribute c ON c.attrelid = t.oid, pg_catalog.aclexplode(c.attacl) a
             WHERE a.grantee = 0
            """
        ).format(pattern=sql.SQL(_UNDO_PATTERN))

    def grant(self, role: str) -> list[sql.Composed]:
        """What a runner needs on the control tables, and nothing more: read every table; add backfills (``run``
        with a spec registers it) and slices (splitting); update both (state, checkpoints, claims). No DELETE,
        no TRUNCATE, no DDL."""
        f: dict[str, sql.Composable] = {"schema": _ident(self.schema), "role": _ident(role), **self._format()}
        return [
            sql.SQL(text).format(**f)
            for text in (
                "GRANT USAGE ON SCHEMA {schema} TO {role}",
                "GRANT SELECT, INSERT, UPDATE ON {b}, {s}, {h} TO {role}",
                "GRANT SELECT ON {m} TO {role}",
            )
        ]

    def role_exists(self) -> sql.SQL:
        return sql.SQL("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s)")

    def complete(self) -> sql.SQL:
        """(schema): whether all four control tables exist (then ``init`` has nothing to create, unless they are of
        an older version)."""
        return sql.SQL(
            """SELECT count(*) = 4 FROM pg_catalog.pg_class c
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = %s
                  AND c.relname IN ('backfills', 'backfill_slices', 'backfill_meta', 'backfill_batches')"""
        )

    def exists(self) -> sql.SQL:
        """Whether the control tables exist (checked before reading them, so a missing one is no error)."""
        return sql.SQL("SELECT to_regclass(pg_catalog.quote_ident(%s) || '.backfill_meta') IS NOT NULL")

    def version(self) -> sql.Composed:
        return sql.SQL("SELECT version FROM {}").format(self.meta)

    _COLUMNS = (
        "b.id, b.name, b.spec, b.fingerprint, b.state, b.upper_bound, b.estimated_rows, b.last_error, "
        "b.created_at, b.started_at, b.updated_at, b.finished_at, b.overrides"
    )

    def select(self, *, one: bool, lock: bool = False) -> sql.Composed:
        parts: list[sql.Composable] = [sql.SQL("SELECT {} FROM {} b").format(sql.SQL(self._COLUMNS), self.backfills)]
        parts.append(sql.SQL("WHERE b.name = %s") if one else sql.SQL("ORDER BY b.created_at, b.id"))
        if lock:
            parts.append(sql.SQL("FOR UPDATE"))
        return sql.SQL(" ").join(parts)

    def insert(self) -> sql.Composed:
        return sql.SQL(
            "INSERT INTO {} (name, spec, fingerprint) VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING id"
        ).format(self.backfills)

    def replace_spec(self) -> sql.Composed:
        return sql.SQL("UPDATE {} SET spec = %s, fingerprint = %s, updated_at = now() WHERE id = %s").format(
            self.backfills
        )

    def set_state(self) -> sql.Composed:
        """(state, last_error, id): finished_at is stamped on entering a terminal or failed state."""
        return sql.SQL(
            """UPDATE {} SET state = %s, last_error = %s, updated_at = now(),
                      finished_at = CASE WHEN %s THEN now() END
                WHERE id = %s"""
        ).format(self.backfills)

    def start(self) -> sql.Composed:
        """(upper_bound, estimated_rows, id): fix the run's key range on its first start."""
        return sql.SQL(
            """UPDATE {b} SET state = {running}, upper_bound = coalesce(upper_bound, %s),
                      estimated_rows = coalesce(estimated_rows, %s),
                      started_at = coalesce(started_at, now()), updated_at = now()
                WHERE id = %s"""
        ).format(b=self.backfills, running=state_literal(RunState.RUNNING))

    def delete(self) -> sql.Composed:
        """(id): forget a backfill; its slices go with it (ON DELETE CASCADE)."""
        return sql.SQL("DELETE FROM {} WHERE id = %s").format(self.backfills)

    def insert_slice(self) -> sql.Composed:
        return sql.SQL(
            "INSERT INTO {} (backfill_id, slice, lower_bound, upper_bound, checkpoint) VALUES (%s, %s, %s, %s, %s)"
        ).format(self.slices)

    def select_slices(self) -> sql.Composed:
        """(backfill_id): every slice, with who holds its claim (pid, role, application) if that session lives."""
        return sql.SQL(
            """SELECT s.slice, s.lower_bound, s.upper_bound, s.checkpoint, s.done, s.rows_updated, s.batches,
                      s.owner, s.heartbeat_at, s.throttle_seconds, s.retries, s.waiting_for, s.waiting_since,
                      (SELECT pg_catalog.format('pid %%s, role %%s, application %%s', a.pid, r.rolname,
                                                coalesce(nullif(a.application_name, ''), '-'))
                         FROM pg_catalog.pg_stat_activity a LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.usesysid
                        WHERE {holder}) AS holder
                 FROM {s} s WHERE s.backfill_id = %s ORDER BY s.slice"""
        ).format(s=self.slices, holder=_HOLDER)

    def slice_totals(self) -> sql.Composed:
        """Per backfill id: rows updated, batches, and the freshest heartbeat, summed over its slices."""
        return sql.SQL(
            """SELECT backfill_id, sum(rows_updated)::bigint AS rows_updated, sum(batches)::bigint AS batches,
                      max(heartbeat_at) AS heartbeat_at, string_agg(DISTINCT owner, ', ') AS owner
                 FROM {} GROUP BY backfill_id"""
        ).format(self.slices)

    def lock_slice(self) -> sql.Composed:
        """(backfill_id, slice): the batch's first statement. The row lock serialises any two runners that ever
        reach the same slice, and the checkpoint is read under it, so a batch always starts where the last
        committed one ended, whatever the runner believes. The last column says whether this backend holds the
        slice's claim, and the backfill's live setting overrides come along (no extra round trip to read them)."""
        return sql.SQL(
            """SELECT b.state, s.checkpoint, s.upper_bound, s.done,
                      s.claim_pid IS NOT DISTINCT FROM pg_catalog.pg_backend_pid() AS mine, b.overrides
                 FROM {s} s JOIN {b} b ON b.id = s.backfill_id
                WHERE s.backfill_id = %s AND s.slice = %s
                  FOR UPDATE OF s"""
        ).format(s=self.slices, b=self.backfills)

    def checkpoint(self) -> sql.Composed:
        """(checkpoint, done, rows, owner, backfill_id, slice): a batch's checkpoint written in its own transaction,
        for the offline script (the runner's one-statement batch writes its own); returns the slice's rows so far."""
        return sql.SQL(
            """UPDATE {} SET checkpoint = %s, done = %s, rows_updated = rows_updated + %s, batches = batches + 1,
                      owner = %s, heartbeat_at = now(), updated_at = now()
                WHERE backfill_id = %s AND slice = %s
            RETURNING rows_updated"""
        ).format(self.slices)

    def finish_if_done(self) -> sql.Composed:
        """(id, id): mark the backfill succeeded once no slice is left; in the last batch's transaction, after
        :meth:`lock_backfill` (see :meth:`PostgresStore.finish_if_done`)."""
        return sql.SQL(
            """UPDATE {b} SET state = {succeeded}, finished_at = now(), updated_at = now(), last_error = NULL
                WHERE id = %s AND state = {running}
                  AND NOT EXISTS (SELECT 1 FROM {s} WHERE backfill_id = %s AND NOT done)"""
        ).format(
            b=self.backfills,
            s=self.slices,
            succeeded=state_literal(RunState.SUCCEEDED),
            running=state_literal(RunState.RUNNING),
        )

    def lock_slices(self) -> sql.Composed:
        """(backfill_id): every slice of a backfill, locked (waits for the batches running on them to end)."""
        return sql.SQL("SELECT slice FROM {} WHERE backfill_id = %s ORDER BY slice FOR UPDATE").format(self.slices)

    def lock_backfill(self) -> sql.Composed:
        """(id): serialises changes to a backfill's set of slices (slice numbers are taken under this lock)."""
        return sql.SQL("SELECT id FROM {} WHERE id = %s FOR UPDATE").format(self.backfills)

    def lock_backfill_if_done(self) -> sql.Composed:
        """(id, id, slice): :meth:`lock_backfill`, taken only once the batch has finished its slice (it sees its
        own transaction's checkpoint), so that batches of parallel runners do not queue on the backfill's row."""
        return sql.SQL(
            """SELECT id FROM {b} WHERE id = %s
                  AND EXISTS (SELECT 1 FROM {s} WHERE backfill_id = %s AND slice = %s AND done)
                  FOR UPDATE"""
        ).format(b=self.backfills, s=self.slices)

    def live_runners(self) -> sql.Composed:
        """(backfill_id): sessions holding a claim on an unfinished slice, alive now (see :meth:`claim`): a runner
        waiting on a long throttle counts, one that died does not, however recent its last batch."""
        return sql.SQL(
            """SELECT count(DISTINCT s.claim_pid) FROM {s} s
                WHERE s.backfill_id = %s AND NOT s.done AND s.claim_pid IS NOT NULL
                  AND EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE {holder})"""
        ).format(s=self.slices, holder=_HOLDER)

    def next_slice(self) -> sql.Composed:
        return sql.SQL("SELECT coalesce(max(slice), -1) + 1 FROM {} WHERE backfill_id = %s").format(self.slices)

    def lock_slice_for_split(self) -> sql.Composed:
        """(backfill_id, slice): the slice's checkpoint and bounds, locked, to split off the rest of its range."""
        return sql.SQL(
            """SELECT checkpoint, lower_bound, upper_bound, done FROM {}
                WHERE backfill_id = %s AND slice = %s FOR UPDATE"""
        ).format(self.slices)

    def shrink_slice(self) -> sql.Composed:
        """(upper_bound, backfill_id, slice): the slice now ends earlier; new slices take the rest."""
        return sql.SQL(
            "UPDATE {} SET upper_bound = %s, updated_at = now() WHERE backfill_id = %s AND slice = %s"
        ).format(self.slices)

    def claim(self) -> sql.Composed:
        """(backfill_id, slice, owner): claim the slice for this session unless a live session holds it, naming the
        runner (``owner``, if not NULL) on it; one row if it did. Only roles that may UPDATE the slices can
        claim, and a claim counts only while the session that made it lives (its pid, role and start time in
        ``pg_stat_activity``), so it dies with a crashed runner's connection, and no other role can hold it.
        (Advisory locks could be taken by any role that can connect.) SKIP LOCKED: a slice whose row a batch or a
        split holds is busy, not worth waiting for."""
        return sql.SQL(
            """WITH me AS (SELECT a.pid, a.usesysid, a.backend_start FROM pg_catalog.pg_stat_activity a
                             WHERE a.pid = pg_catalog.pg_backend_pid()),
                    free AS (SELECT s.backfill_id, s.slice FROM {s} s
                              WHERE s.backfill_id = %s AND s.slice = %s
                                AND (s.claim_pid IS NULL OR s.claim_pid = pg_catalog.pg_backend_pid()
                                     OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE {holder}))
                                FOR UPDATE OF s SKIP LOCKED)
               UPDATE {s} s SET claim_pid = me.pid, claim_role = me.usesysid, claim_started = me.backend_start,
                      owner = coalesce(%s, s.owner)
                 FROM free, me
                WHERE s.backfill_id = free.backfill_id AND s.slice = free.slice
               RETURNING s.claim_pid"""
        ).format(s=self.slices, holder=_HOLDER)

    def claim_is_mine(self) -> sql.Composed:
        """(backfill_id, slice): whether this statement's backend holds the slice's claim."""
        return sql.SQL(
            "SELECT claim_pid IS NOT DISTINCT FROM pg_catalog.pg_backend_pid() FROM {} "
            "WHERE backfill_id = %s AND slice = %s"
        ).format(self.slices)

    def release_slice(self) -> sql.Composed:
        """(owner, backfill_id, slice): give up this session's claim (and the owner name, if it is ours)."""
        return sql.SQL(
            """UPDATE {} SET owner = CASE WHEN owner = %s THEN NULL ELSE owner END,
                      claim_pid = NULL, claim_role = NULL, claim_started = NULL
                WHERE backfill_id = %s AND slice = %s AND claim_pid = pg_catalog.pg_backend_pid()"""
        ).format(self.slices)


#: The session that made a slice's claim (``s``), as a condition on ``pg_stat_activity a``: same pid and role, and
#: the same start time where we may see it (another role's start time is hidden without pg_read_all_stats), so a
#: recycled pid does not inherit a dead runner's claim.
_HOLDER = sql.SQL(
    "a.pid = s.claim_pid AND a.usesysid = s.claim_role "
    "AND (a.backend_start IS NULL OR a.backend_start = s.claim_started)"
)


#: First statement of a transaction that must not write (the user's health query).
#: A health probe's settings: (lock_timeout, statement_timeout, read only). Read-only may be turned on at any
#: point of a transaction, so it can share the statement (SET TRANSACTION needs an explicit block).
PROBE_SETTINGS = sql.SQL(
    "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true), "
    "CASE WHEN %s THEN set_config('transaction_read_only', 'on', true) END"
)

SET_TIMEOUTS = sql.SQL("SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)")

#: A batch transaction's settings: (lock_timeout, statement_timeout, synchronous_commit). Committing a batch
#: asynchronously is safe here: a server crash can only lose the newest transactions whole, and each carries its
#: own checkpoint, so the lost batches are simply run again. It saves a WAL flush per batch.
BATCH_SETTINGS = sql.SQL(
    "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true), "
    "set_config('synchronous_commit', %s, true)"
)


def explain(statement: sql.Composable) -> sql.Composed:
    """EXPLAIN of a composed statement (used by ``plan`` and by the tests that check batch plans)."""
    return sql.SQL("EXPLAIN {}").format(statement)


def explain_json(statement: sql.Composable) -> sql.Composed:
    """The plan of a composed statement as JSON, with each scanned relation's schema (nothing is executed)."""
    return sql.SQL("EXPLAIN (FORMAT JSON, VERBOSE) {}").format(statement)


# --- health checks -------------------------------------------------------------------------------------------------
# Run by backfill.pg.health between batches on the runner's connection, never inside a batch's transaction. Each reads
# statistics views only (no lock on the target table) and is cheap enough to run every second.

#: (relation oid | NULL) for a (schema, table) pair: the target, resolved once per run.
HEALTH_TABLE_OID = sql.SQL(
    "SELECT pg_catalog.to_regclass(pg_catalog.quote_ident(%s) || '.' || pg_catalog.quote_ident(%s))::oid::bigint"
)

#: Whether the runner's role sees other sessions' statistics (otherwise the views hide lag, xmin and vacuum targets).
HEALTH_CAN_READ_STATS = sql.SQL("SELECT pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')")

#: Replicas streaming from this server: how many, and the largest replay lag in bytes and in seconds.
REPLICA_LAG = sql.SQL(
    """
    SELECT count(*)::int AS replicas,
           max(pg_catalog.pg_wal_lsn_diff(
                 CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()
                      ELSE pg_catalog.pg_current_wal_lsn() END,
                 r.replay_lsn))::bigint AS lag_bytes,
           max(extract(epoch FROM r.replay_lag))::float8 AS lag_seconds
      FROM pg_catalog.pg_stat_replication r
    """
)

#: (oid=): vacuums of this database working on the table, any of its partitions, or their TOAST tables.
VACUUMS = sql.SQL(
    """
    WITH rels AS (
        -- pg_partition_tree() lists a partitioned table's tree, and nothing for a plain table.
        SELECT c.oid, c.reltoastrelid
          FROM pg_catalog.pg_class c
         WHERE c.oid = %(oid)s::oid
            OR c.oid IN (SELECT t.relid FROM pg_catalog.pg_partition_tree(%(oid)s::oid::regclass) t)
    )
    SELECT p.pid, p.relid::regclass::text AS relation, p.phase,
           coalesce(a.backend_type = 'autovacuum worker', false) AS autovacuum,
           -- An autovacuum worker says why it runs only in its query text ("autovacuum: VACUUM t (to prevent
           -- wraparound)"), the same in every release since 9.x.
           coalesce(a.backend_type = 'autovacuum worker' AND a.query LIKE '%%(to prevent wraparound)', false)
             AS wraparound
      FROM pg_catalog.pg_stat_progress_vacuum p
      LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = p.pid
     WHERE p.datid = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database())
       AND (p.relid IN (SELECT oid FROM rels) OR p.relid IN (SELECT reltoastrelid FROM rels))
     ORDER BY p.pid
    """
)

#: The oldest open transaction of another client session of this database that holds a snapshot or an xid.
OLDEST_TRANSACTION = sql.SQL(
    """
    SELECT a.pid, extract(epoch FROM (pg_catalog.clock_timestamp() - a.xact_start))::float8 AS age_seconds,
           a.state, a.application_name
      FROM pg_catalog.pg_stat_activity a
     WHERE a.backend_type = 'client backend' AND a.pid <> pg_catalog.pg_backend_pid()
       AND a.datname = pg_catalog.current_database()
       AND a.xact_start IS NOT NULL
       AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
     ORDER BY a.xact_start
     LIMIT 1
    """
)

#: (oid): sessions waiting for a lock on the table. Reading pg_locks briefly takes the lock manager's partition
#: locks, which is why this probe is opt-in.
LOCK_WAITERS = sql.SQL(
    """
    SELECT count(*)::int
      FROM pg_catalog.pg_locks l
     WHERE NOT l.granted AND l.locktype = 'relation' AND l.relation = %s::oid
       AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database())
    """
)


def custom_check(query: str) -> sql.Composed:
    """The user's health query as written (execute with an empty parameter sequence: see ``_fragment``)."""
    return sql.Composed([_fragment(query)])
