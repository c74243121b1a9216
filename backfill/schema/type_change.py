"""A column's type changed on a live table, in three steps like the NOT NULL pattern: the DDL and catalog reads of
:func:`backfill.start_column_type_change`, :func:`backfill.finish_column_type_change` and
:func:`backfill.cleanup_column_type_change` (the copy of existing rows is a backfill: the API wires it in).

``ALTER TABLE ... ALTER COLUMN ... TYPE`` rewrites the whole table (and rebuilds every index) while it holds ACCESS
EXCLUSIVE: every read and write of the application waits. Instead:

* **start**: ``ADD COLUMN`` a shadow column of the new type (an instant of ACCESS EXCLUSIVE: no rewrite), a mirror
  trigger (:mod:`backfill.schema.sync`) that gives it ``using`` on every row the application inserts or updates,
  then a resumable backfill copies the existing rows.
* **finish**: once the copy is done, NOT NULL on the shadow column (the three-phase machinery: no scan under
  ACCESS EXCLUSIVE), copies of the column's indexes built ``CONCURRENTLY`` (a unique one for a primary key; operator
  classes, collations, order, ``INCLUDE``, expressions and predicates kept), its CHECK constraints and the foreign
  keys from and to the column added ``NOT VALID`` and validated (definitions rewritten for the shadow column by
  PostgreSQL: :mod:`backfill.schema.carry_over`); then one short transaction under
  ``lock_timeout`` with retries swaps them: old constraints and indexes dropped, default, sequence ownership
  (``AS bigint`` for an integer sequence) or identity moved, the names of the two columns exchanged, the primary
  key added ``USING INDEX`` (no scan: NOT NULL is proven), the copies renamed to the old names.
* **cleanup**: the old column (renamed ``<column>_old``) dropped, once no application code reads it.
* **the way back** (:func:`undo_state`): a finished change undone is a change of the column back into
  ``<column>_old`` (added back, empty, after cleanup), run by finish's own steps; its swap renames the column to
  ``<column>_new`` again and installs the change's trigger, as start left it.

Every step is planned from the catalog, so a change that died between two steps is finished by running it again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from psycopg import sql

from backfill.errors import describe
from backfill.executor import RunReport
from backfill.fragments import fragment_problem
from backfill.pg import statements
from backfill.plan import Target
from backfill.schema import ddl, sync
from backfill.schema.carry_over import Carried, read_carried, refuse_problems
from backfill.schema.constraint import ChangeResult
from backfill.schema.foreign_key import ForeignKey
from backfill.schema.index import IndexPlan, plan_add_index_as, read_index_of_table
from backfill.schema.notnull import ConstraintError, DDLSession, InTable, Step, StepAction, find_table

__all__ = [
    "TypeChangeResult",
    "ColumnInfo",
    "IndexCopy",
    "CheckCopy",
    "ForeignKeyCopy",
    "TypeChangeState",
    "backfill_name",
    "undo_name",
    "shadow_name",
    "retired_name",
    "copy_name",
    "default_using",
    "read_column",
    "read_type_change",
    "check_start",
    "check_using",
    "offline_state",
    "undo_state",
    "out_of_range",
    "shadow_comment",
    "owns_shadow",
    "add_shadow_column",
    "mirror_target",
    "mirror_statements",
    "index_plans",
    "index_copies",
    "check_copies",
    "carried_over",
    "foreign_key_copies",
    "swap_statement",
    "drop_retired_column",
    "drop_shadow_column",
]

#: pg_constraint.confdeltype -> the ON DELETE action.
_ON_DELETE = {"a": None, "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}


@dataclass(frozen=True)
class TypeChangeResult(ChangeResult):
    """What a step of a column type change did: the DDL steps that ran (empty when everything was done already)
    and, for ``start`` and ``finish``, the report of the run that copied the rows (None when deferred, or when
    the copy had finished before)."""

    copy: RunReport | None = field(default=None, compare=False)


def _clip_with_digest(name: str, whole: str) -> str:
    if len(name.encode()) <= ddl._MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha256(whole.encode()).hexdigest()[:8]
    room = ddl._MAX_IDENTIFIER_BYTES - len(digest) - 1
    return name.encode()[:room].decode(errors="ignore") + "_" + digest


def backfill_name(schema: str, table: str, column: str) -> str:
    """The name of the backfill that copies ``column`` into its shadow column (``backfill status NAME``)."""
    return f"type_change:{schema}.{table}.{column}"[:200]


def undo_name(schema: str, table: str, column: str) -> str:
    """The name of the backfill that copies ``column`` back into ``<column>_old`` when a finished change is undone
    (:func:`backfill.unfinish_column_type_change`)."""
    return f"type_change_undo:{schema}.{table}.{column}"[:200]


def shadow_name(column: str, name: str | None = None) -> str:
    """The shadow column: ``name``, or ``<column>_new``."""
    return name or _clip_with_digest(f"{column}_new", column)


def retired_name(column: str) -> str:
    """What the old column is called after the swap, until cleanup drops it: ``<column>_old``."""
    return _clip_with_digest(f"{column}_old", column)


def copy_name(name: str) -> str:
    """The name of an index or constraint's copy on the shadow column, until the swap gives it the old name:
    ``<name>_tc``, or ``tc_`` and a digest when that is too long (the offline script derives it the same way)."""
    copy = f"{name}_tc"
    if len(copy.encode()) <= ddl._MAX_IDENTIFIER_BYTES:
        return copy
    return "tc_" + hashlib.md5(name.encode(), usedforsecurity=False).hexdigest()


def default_using(column: str, new_type: str) -> str:
    """``"column"::new_type``: PostgreSQL's own conversion, as ``ALTER COLUMN ... TYPE`` would use."""
    return f"{sql.Identifier(column).as_string(None)}::{new_type}"


# --- the catalog ---------------------------------------------------------------------------------------------------

#: (relation oid, column): attnum, attnotnull, attidentity, attgenerated, the type with modifiers, the default's
#: expression, the column's sequence (serial or identity, qualified), that sequence's type and increment.
_COLUMN = sql.SQL(
    """
    SELECT a.attnum, a.attnotnull, a.attidentity::text, a.attgenerated::text,
           pg_catalog.format_type(a.atttypid, a.atttypmod), pg_catalog.pg_get_expr(d.adbin, d.adrelid),
           s.seq, pg_catalog.format_type(q.seqtypid, NULL), q.seqincrement,
           pg_catalog.col_description(a.attrelid, a.attnum::int)
      FROM pg_catalog.pg_attribute a
      LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
      LEFT JOIN LATERAL (SELECT pg_catalog.pg_get_serial_sequence(a.attrelid::regclass::text, a.attname) AS seq) s
             ON true
      LEFT JOIN pg_catalog.pg_sequence q ON q.seqrelid = s.seq::regclass
     WHERE a.attrelid = %s AND a.attname = %s AND a.attnum > 0 AND NOT a.attisdropped
    """
)

#: (relation oid, attnum): the indexes that use the column: name, unique, primary, method, key column names (NULL
#: for an expression), whether expressions or a predicate are involved, the constraint it backs and its kind.
_INDEXES = sql.SQL(
    """
    SELECT ic.relname, i.indisunique, i.indisprimary, am.amname,
           (SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord)
              FROM pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
              LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum),
           i.indexprs IS NOT NULL OR i.indpred IS NOT NULL, con.conname, con.contype::text
      FROM pg_catalog.pg_index i
      JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
      JOIN pg_catalog.pg_am am ON am.oid = ic.relam
      LEFT JOIN pg_catalog.pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
                                             AND con.contype IN ('p', 'u', 'x')
     WHERE i.indrelid = %(oid)s
       AND (%(attnum)s = ANY (i.indkey::int2[])
            OR EXISTS (SELECT 1 FROM pg_catalog.pg_depend dep
                        WHERE dep.classid = 'pg_catalog.pg_class'::regclass AND dep.objid = i.indexrelid
                          AND dep.refobjid = i.indrelid AND dep.refobjsubid = %(attnum)s))
     ORDER BY ic.relname
    """
)

#: (relation oid, attnum): the foreign keys from or to the column: name, kind of end ('from' or 'to'), the
#: referencing table (schema, name), its columns, the referenced table (schema, name), its columns, ON DELETE.
_FOREIGN_KEYS = sql.SQL(
    """
    SELECT c.conname, CASE WHEN c.conrelid = %(oid)s AND %(attnum)s = ANY (c.conkey) THEN 'from' ELSE 'to' END,
           fn.nspname, f.relname,
           (SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord)
              FROM pg_catalog.unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
              JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum),
           rn.nspname, r.relname,
           (SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord)
              FROM pg_catalog.unnest(c.confkey) WITH ORDINALITY AS k(attnum, ord)
              JOIN pg_catalog.pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.attnum),
           c.confdeltype::text, c.confupdtype::text, c.condeferrable OR c.confmatchtype <> 's'
      FROM pg_catalog.pg_constraint c
      JOIN pg_catalog.pg_class f ON f.oid = c.conrelid
      JOIN pg_catalog.pg_namespace fn ON fn.oid = f.relnamespace
      JOIN pg_catalog.pg_class r ON r.oid = c.confrelid
      JOIN pg_catalog.pg_namespace rn ON rn.oid = r.relnamespace
     WHERE c.contype = 'f'
       AND ((c.conrelid = %(oid)s AND %(attnum)s = ANY (c.conkey))
            OR (c.confrelid = %(oid)s AND %(attnum)s = ANY (c.confkey)))
     ORDER BY c.conname
    """
)

#: (relation oid, attnum): the views and rules that use the column.
_UNSUPPORTED = sql.SQL(
    """
    SELECT DISTINCT 'view or rule ' || r.ev_class::regclass::text
      FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
     WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.refobjid = %(oid)s AND d.refobjsubid = %(attnum)s
       AND r.ev_class <> %(oid)s
    """
)


@dataclass(frozen=True)
class ColumnInfo:
    """A column as the catalog has it."""

    attnum: int
    not_null: bool
    #: ``a`` GENERATED ALWAYS, ``d`` BY DEFAULT, empty: no identity
    identity: str
    generated: bool
    type: str
    default: str | None
    #: the serial or identity sequence, qualified as ``regclass`` prints it
    sequence: str | None
    sequence_type: str | None
    sequence_increment: int | None
    comment: str | None = None


@dataclass(frozen=True)
class IndexCopy:
    """An index on the old column and the copy to build on the shadow column."""

    name: str
    copy: str
    #: the copy's definition from ``USING`` on, as PostgreSQL printed it for the shadow column and the new type
    definition: str
    unique: bool
    #: what had to change (an operator class that does not accept the new type replaced by its default)
    note: str | None
    #: the constraint the index backs (primary key or unique), re-added ``USING INDEX`` on the copy at the swap
    constraint: str | None
    constraint_kind: str | None


@dataclass(frozen=True)
class CheckCopy:
    """A CHECK constraint on the old column and its copy on the shadow column (NOT VALID if the old one is)."""

    name: str
    copy: str
    #: the condition for the shadow column, as PostgreSQL printed it
    condition: str
    validated: bool


@dataclass(frozen=True)
class ForeignKeyCopy(InTable):
    """A foreign key from or to the old column, and its copy on the shadow column."""

    name: str
    copy: str
    schema: str
    table: str
    columns: tuple[str, ...]
    referent: sql.Identifier
    referent_columns: tuple[str, ...]
    on_delete: str | None

    @property
    def key(self) -> ForeignKey:
        return ForeignKey(self.columns, "", self.referent_columns, self.on_delete)


@dataclass(frozen=True)
class TypeChangeState(InTable):
    """Where a column type change of ``schema.table.column`` stands, read from the catalog."""

    oid: int
    schema: str
    table: str
    column: str
    shadow: str
    retired: str
    #: the column (before the swap: the old one; after it: the new one)
    current: ColumnInfo
    #: the shadow column, None once swapped (or before start)
    shadow_info: ColumnInfo | None
    #: the old column after the swap, None before it (or after cleanup)
    retired_info: ColumnInfo | None
    #: the change undone (:func:`undo_state`): ``<column>_old`` is the shadow column, ``<column>_new`` the name the
    #: column takes at the swap back
    undo: bool = False

    @property
    def swapped(self) -> bool:
        return self.shadow_info is None and self.retired_info is not None

    @property
    def backfill(self) -> str:
        return (undo_name if self.undo else backfill_name)(self.schema, self.table, self.column)


def read_column(session: DDLSession, oid: int, column: str) -> ColumnInfo | None:
    rows = session.fetchall(_COLUMN, (oid, column))
    if not rows:
        return None
    attnum, not_null, identity, generated, type_, default, sequence, sequence_type, increment, comment = rows[0]
    return ColumnInfo(
        int(attnum),
        bool(not_null),
        str(identity or ""),
        bool(generated),
        str(type_),
        None if default is None else str(default),
        None if sequence is None else str(sequence),
        None if sequence_type is None else str(sequence_type),
        None if increment is None else int(increment),
        None if comment is None else str(comment),
    )


def read_type_change(
    session: DDLSession, table: str, column: str, *, schema: str | None, shadow: str
) -> TypeChangeState:
    """The state of the change of ``column`` whose shadow column is ``shadow``.

    Raises:
        ConstraintError: no such table or column.
    """
    oid, schema, table = find_table(session, table, schema)
    current = read_column(session, oid, column)
    if current is None:
        raise ConstraintError(f"column {column!r} does not exist in table {schema}.{table}")
    retired = retired_name(column)
    return TypeChangeState(
        oid,
        schema,
        table,
        column,
        shadow,
        retired,
        current,
        read_column(session, oid, shadow),
        read_column(session, oid, retired),
    )


def check_start(session: DDLSession, state: TypeChangeState, new_type: str) -> None:
    """Refuse, before anything is written, what the change cannot carry over.

    Raises:
        ConstraintError: a generated column; a view or rule, an exclusion constraint or a foreign key with ON
            UPDATE, DEFERRABLE or MATCH FULL that uses the column; ``<column>_old`` taken.
    """
    where = f"{state.qualified}.{state.column}"
    if not new_type.strip() or fragment_problem(new_type):
        raise ConstraintError(f"new_type must be one SQL type name, got {new_type!r}")
    if state.current.generated:
        raise ConstraintError(f"{where} is a generated column: change its expression instead")
    if state.retired_info is not None:
        raise ConstraintError(
            f"{state.qualified} already has a column {state.retired!r} (the name the old column takes at the swap): "
            "drop or rename it first"
        )
    foreign_key_copies(session, state)
    found = session.fetchall(_UNSUPPORTED, {"oid": state.oid, "attnum": state.current.attnum})
    for index in _indexes(session, state):
        if index[7] == "x":
            found.append((f"exclusion constraint {index[6]}",))
    if found:
        listed = ", ".join(str(row[0]) for row in found)
        raise ConstraintError(
            f"{where} is used by {listed}, which a type change cannot carry over to the new column: drop it first "
            "and create it again after finish_column_type_change"
        )


def check_using(session: DDLSession, state: TypeChangeState, new_type: str, using: str) -> None:
    """Check that ``using`` gives values of ``new_type`` for the table's rows, reading none.

    Raises:
        ConstraintError: it is not one expression, or PostgreSQL rejects it.
    """
    if not using.strip() or (problem := fragment_problem(using)):
        raise ConstraintError(f"using must be one SQL expression over the row: {problem or 'it is empty'}")
    probe = sql.SQL("SELECT ({})::{} FROM {} AS {} WHERE false").format(
        sql.SQL(using), sql.SQL(new_type), state.relation, sql.Identifier(state.table)
    )
    try:
        session.fetchall(probe)
    except Exception as exc:
        raise ConstraintError(
            f"cannot change {state.qualified}.{state.column} to {new_type} using {using}: {describe(exc)} "
            "(nothing was changed)"
        ) from None


def offline_state(schema: str, table: str, column: str, shadow: str) -> TypeChangeState:
    """The state assumed without a database (offline rendering): nothing started yet."""
    nothing = ColumnInfo(0, False, "", False, "", None, None, None, None)
    return TypeChangeState(0, schema, table, column, shadow, retired_name(column), nothing, None, None)


def undo_state(state: TypeChangeState) -> TypeChangeState:
    """The change of ``state`` undone: a type change back, from the column into ``<column>_old`` (its shadow
    column), whose swap renames the column to ``<column>_new`` again. Everything finish does runs on it as it is."""
    return replace(
        state,
        shadow=state.retired,
        retired=state.shadow,
        shadow_info=state.retired_info,
        retired_info=state.shadow_info,
        undo=not state.undo,
    )


def out_of_range(session: DDLSession, state: TypeChangeState, new_type: str) -> str | None:
    """What keeps the column of ``state`` from becoming the smaller integer type ``new_type`` (its sequence, or a
    row and its key, beyond that type's range), or None. Reads the sequence and at most one row; writes nothing."""
    rank = _INTEGER_RANK.get(new_type.strip().lower())
    if rank is None or rank >= _INTEGER_RANK["bigint"]:
        return None
    highest = 2 ** (15 if rank == 1 else 31) - 1
    where = f"{state.qualified}.{state.column}"
    sequence = state.current.sequence
    if sequence is not None:
        (last,), *_ = session.fetchall(sql.SQL("SELECT last_value FROM {}").format(sql.SQL(sequence)))
        if int(last) > highest:
            return f"the sequence {sequence} of {where} is at {last}, beyond {new_type}'s {highest}"
    key = [str(name) for (name,) in session.fetchall(statements.PRIMARY_KEY, (state.oid,))] or [state.column]
    column = sql.Identifier(state.column)
    row = session.fetchall(
        sql.SQL(
            "SELECT ROW({key})::text, {col}::text FROM {rel} WHERE {col} NOT BETWEEN {low} AND {high} LIMIT 1"
        ).format(
            key=sql.SQL(", ").join(map(sql.Identifier, key)),
            col=column,
            rel=state.relation,
            low=sql.Literal(-highest - 1),
            high=sql.Literal(highest),
        )
    )
    if not row:
        return None
    (values, value), *_ = row
    return f"the row ({', '.join(key)})={values} of {state.qualified} holds {state.column} = {value}, beyond {new_type}"


def shadow_comment(state: TypeChangeState) -> str:
    """The comment that marks a shadow column as this change's (a column of that name without it is not ours)."""
    return f"backfill: the new {state.column} of {state.backfill}, until the swap"


def owns_shadow(state: TypeChangeState) -> bool:
    """Whether the shadow column exists and is this change's."""
    return state.shadow_info is not None and state.shadow_info.comment == shadow_comment(state)


def add_shadow_column(state: TypeChangeState, new_type: str) -> Step:
    """``ADD COLUMN IF NOT EXISTS`` the shadow column, nullable without a default (an instant of ACCESS EXCLUSIVE,
    no rewrite), marked as this change's by its comment in the same transaction."""
    statement = sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}; {}").format(
        state.relation, sql.Identifier(state.shadow), sql.SQL(new_type), _mark_shadow(state)
    )
    return Step(StepAction.ADD_SHADOW_COLUMN, statement, True)


def _mark_shadow(state: TypeChangeState) -> sql.Composed:
    return sql.SQL("COMMENT ON COLUMN {}.{} IS {}").format(
        state.relation, sql.Identifier(state.shadow), sql.Literal(shadow_comment(state))
    )


def mirror_statements(state: TypeChangeState, using: str) -> list[sql.Composable]:
    """The mirror trigger of the change ``state`` and the comment that marks its shadow column as the change's, as
    plain statements: the swap of the change undone runs them in its transaction (``then``)."""
    target = mirror_target(state, using)
    return [
        _mark_shadow(state),
        sync.create_function(target, state.backfill, mirror=True),
        sync.drop_trigger(state.schema, state.table, state.backfill),
        sync.trigger_statement(target, state.backfill, mirror=True),
    ]


def mirror_target(state: TypeChangeState, using: str) -> Target:
    """What the mirror trigger and the copy set: the shadow column to ``using``."""
    return Target(
        schema=state.schema,
        table=state.table,
        key=(),
        key_types=(),
        values=((state.shadow, using),),
        where=None,
    )


# --- finish --------------------------------------------------------------------------------------------------------


def _indexes(session: DDLSession, state: TypeChangeState) -> list[tuple[object, ...]]:
    return session.fetchall(_INDEXES, {"oid": state.oid, "attnum": state.current.attnum})


def carried_over(session: DDLSession, state: TypeChangeState, new_type: str | None, left: str) -> list[Carried]:
    """The CHECK constraints and indexes of the old column with their definitions for the shadow column of
    ``new_type`` (None: the shadow column's type), rewritten by PostgreSQL (see :mod:`backfill.schema.carry_over`).

    Raises:
        ConstraintError: one of them cannot hold on the new type (named, followed by ``left``).
    """
    carried = read_carried(session, state.relation, state.column, state.shadow, new_type)
    refuse_problems(carried, state.qualified, new_type or (state.shadow_info.type if state.shadow_info else ""), left)
    return carried


def index_copies(session: DDLSession, state: TypeChangeState, carried: Sequence[Carried]) -> list[IndexCopy]:
    """The indexes that use the old column, each with the copy to build on the shadow column.

    Raises:
        ConstraintError: an exclusion constraint uses the column (added after start).
    """
    definitions = {item.name: item for item in carried if item.kind == "index"}
    copies = []
    for name, unique, _, _, _, _, constraint, kind in _indexes(session, state):
        if kind == "x":
            raise ConstraintError(
                f"exclusion constraint {constraint} of {state.qualified} uses {state.column}, which a type change "
                "cannot carry over: drop it, run finish again, and add it back after"
            )
        item = definitions[str(name)]
        assert item.definition is not None
        copies.append(
            IndexCopy(
                str(name),
                copy_name(str(name)),
                item.definition,
                bool(unique),
                item.note,
                None if constraint is None else str(constraint),
                None if kind is None else str(kind),
            )
        )
    return copies


def check_copies(carried: Sequence[Carried]) -> list[CheckCopy]:
    """The CHECK constraints on the old column, each with its copy on the shadow column."""
    return [
        CheckCopy(item.name, copy_name(item.name), item.definition, item.validated)
        for item in carried
        if item.kind == "check" and item.definition is not None
    ]


def index_plans(session: DDLSession, state: TypeChangeState, copies: Sequence[IndexCopy]) -> list[IndexPlan]:
    """The concurrent builds of the copies (an INVALID copy left by a killed build is dropped and built again)."""
    plans = []
    for index in copies:
        found = read_index_of_table(session, state.table, index.copy, schema=state.schema)
        plans.append(plan_add_index_as(found, index.definition, unique=index.unique))
    return plans


def foreign_key_copies(session: DDLSession, state: TypeChangeState) -> list[ForeignKeyCopy]:
    """The foreign keys from and to the old column, each with its copy on the shadow column."""
    copies = []
    rows = session.fetchall(_FOREIGN_KEYS, {"oid": state.oid, "attnum": state.current.attnum})
    for name, end, schema, table, columns, ref_schema, ref_table, ref_columns, on_delete, on_update, deferrable in rows:
        where = f"foreign key {name} of {schema}.{table}"
        if on_update != "a" or deferrable:
            raise ConstraintError(
                f"{where} has ON UPDATE, DEFERRABLE or MATCH FULL, which a type change does not carry over: drop it "
                "first and add it again after finish_column_type_change"
            )

        def swap(names: object, on: str, end: object = end) -> tuple[str, ...]:
            listed = [str(n) for n in names]  # type: ignore[attr-defined]
            if on != end:
                return tuple(listed)
            return tuple(state.shadow if n == state.column else n for n in listed)

        copies.append(
            ForeignKeyCopy(
                str(name),
                copy_name(str(name)),
                str(schema),
                str(table),
                swap(columns, "from"),
                sql.Identifier(str(ref_schema), str(ref_table)),
                swap(ref_columns, "to"),
                _ON_DELETE[str(on_delete)],
            )
        )
    return copies


def _lock_tables(state: TypeChangeState, keys: Sequence[ForeignKeyCopy]) -> list[sql.Composable]:
    # Both ends of every key: dropping a foreign key takes ACCESS EXCLUSIVE on the table it references too.
    main = state.relation.as_string(None)
    ends = dict.fromkeys(end.as_string(None) for key in keys for end in (key.relation, key.referent))
    return [sql.SQL(ddl.lock_in_either_order(main, [end for end in ends if end != main]))]


def swap_statement(
    state: TypeChangeState,
    indexes: Sequence[IndexCopy],
    keys: Sequence[ForeignKeyCopy],
    new_type: str,
    checks: Sequence[CheckCopy] = (),
    then: Sequence[sql.Composable] = (),
) -> sql.Composed:
    """The swap: one ``DO`` block, so one transaction, that takes ACCESS EXCLUSIVE on the table (and on the tables
    whose foreign keys reference it) and only changes the catalog: no scan, no rewrite.

    The old column's foreign keys, CHECK and other constraints and indexes go; its default, sequence ownership or
    identity move to the shadow column (an integer sequence becomes ``AS`` the new type, so values beyond the old
    type's limit can be handed out); the old column loses NOT NULL (the application no longer writes it); the
    mirror trigger goes; the two columns swap names; the primary key or unique constraint is added ``USING INDEX``
    on the copy and the other copies (indexes, CHECK constraints, foreign keys) take the old names. ``then``:
    statements run last, in the same transaction (undone, the forward change's trigger is installed there, so that
    no write between the swap and it goes unmirrored)."""
    relation, column, shadow = state.relation, sql.Identifier(state.column), sql.Identifier(state.shadow)
    old = state.current
    lines: list[sql.Composable] = _lock_tables(state, keys)
    for key in keys:
        lines.append(sql.SQL("{};").format(ddl.drop_constraint(key.relation, key.name)))
    for check in checks:
        lines.append(sql.SQL("{};").format(ddl.drop_constraint(relation, check.name)))
    for index in indexes:
        if index.constraint:
            lines.append(sql.SQL("{};").format(ddl.drop_constraint(relation, index.constraint)))
        else:
            lines.append(sql.SQL("DROP INDEX {};").format(sql.Identifier(state.schema, index.name)))
    declarations = sql.SQL("DECLARE next_value bigint; not_null text; attempt int;\n")
    if old.identity:
        assert old.sequence is not None
        # The identity's sequence goes with it: its next value is read first and the new identity starts there,
        # under the same name (the table is locked: no insert can take a value in between).
        lines.append(
            sql.SQL(
                "SELECT CASE WHEN s.is_called THEN s.last_value + {inc} ELSE s.last_value END INTO next_value "
                "FROM {seq} AS s;"
            ).format(inc=sql.Literal(old.sequence_increment or 1), seq=sql.SQL(old.sequence))
        )
        lines.append(sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP IDENTITY;").format(relation, column))
        generated = "ALWAYS" if old.identity == "a" else "BY DEFAULT"
        add_identity = sql.SQL(
            "ALTER TABLE {} ALTER COLUMN {} ADD GENERATED " + generated + " AS IDENTITY (SEQUENCE NAME {} "
            "INCREMENT BY {} START WITH "
        ).format(relation, shadow, sql.SQL(old.sequence), sql.Literal(old.sequence_increment or 1))
        lines.append(sql.SQL("EXECUTE {} || next_value || ')';").format(sql.Literal(add_identity.as_string(None))))
    elif old.default is not None:
        lines.append(sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT;").format(relation, column))
        lines.append(
            sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {};").format(relation, shadow, sql.SQL(old.default))
        )
        if old.sequence is not None:
            seq = sql.SQL(old.sequence)
            lines.append(sql.SQL("ALTER SEQUENCE {} OWNED BY {}.{};").format(seq, relation, shadow))
            if old.sequence_type in _INTEGER_RANK and new_type.strip().lower() in _INTEGER_RANK:
                wider = _INTEGER_RANK[new_type.strip().lower()] - _INTEGER_RANK[old.sequence_type]
                # Undone, the sequence goes back to the column's type (out_of_range checked that it fits).
                if wider > 0 or (wider < 0 and state.undo):
                    lines.append(sql.SQL("ALTER SEQUENCE {} AS {};").format(seq, sql.SQL(new_type)))
    if old.not_null:
        lines.append(sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL;").format(relation, column))
    if state.shadow_info is not None:
        lines.append(_take_not_null_name(state, state.shadow_info.attnum))
    lines.append(sql.SQL("{};").format(sync.drop_trigger(state.schema, state.table, state.backfill)))
    lines.append(sql.SQL("{};").format(sync.drop_function(state.schema, state.backfill)))
    comment = sql.Literal(old.comment) if old.comment is not None else sql.SQL("NULL")
    lines.append(sql.SQL("COMMENT ON COLUMN {}.{} IS {};").format(relation, shadow, comment))
    lines.append(
        sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {};").format(relation, column, sql.Identifier(state.retired))
    )
    lines.append(sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {};").format(relation, shadow, column))
    for index in indexes:
        if index.constraint:
            kind = "PRIMARY KEY" if index.constraint_kind == "p" else "UNIQUE"
            lines.append(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} " + kind + " USING INDEX {};").format(
                    relation, sql.Identifier(index.constraint), sql.Identifier(index.copy)
                )
            )
        else:
            lines.append(
                sql.SQL("ALTER INDEX {} RENAME TO {};").format(
                    sql.Identifier(state.schema, index.copy), sql.Identifier(index.name)
                )
            )
    renamed = [(check.copy, check.name, relation) for check in checks]
    for copy, name, table in [*renamed, *((key.copy, key.name, key.relation) for key in keys)]:
        lines.append(
            sql.SQL("ALTER TABLE {} RENAME CONSTRAINT {} TO {};").format(
                table, sql.Identifier(copy), sql.Identifier(name)
            )
        )
    lines.extend(sql.SQL("{};").format(statement) for statement in then)
    body = sql.SQL("{}BEGIN\n  {}\nEND").format(declarations, sql.SQL("\n  ").join(lines))
    return sql.SQL("DO {}").format(ddl.dollar_quote(body.as_string(None), "type_change"))


def _take_not_null_name(state: TypeChangeState, attnum: int) -> sql.Composed:
    # PostgreSQL 18+: the new column's not-null constraint takes the old column's default name, so that no
    # "<column>_new" name is left behind for a later change of the same column to collide with.
    return sql.SQL(
        "SELECT c.conname INTO not_null FROM pg_catalog.pg_constraint c WHERE c.conrelid = {rel}::regclass "
        "AND c.contype = 'n' AND c.conkey = ARRAY[{attnum}]::int2[]; "
        "IF not_null IS NOT NULL AND not_null <> {name} THEN "
        "EXECUTE pg_catalog.format('ALTER TABLE %s RENAME CONSTRAINT %I TO %I', {rel}, not_null, {name}); END IF;"
    ).format(
        rel=sql.Literal(state.relation.as_string(None)),
        attnum=sql.Literal(attnum),
        name=sql.Literal(ddl.not_null_name(state.table, state.column)),
    )


#: The integer types, by size: a sequence of a smaller one becomes ``AS`` the larger one at the swap.
_INTEGER_RANK = {"smallint": 1, "integer": 2, "bigint": 3, "int2": 1, "int4": 2, "int8": 3, "int": 2}


# --- cleanup -------------------------------------------------------------------------------------------------------


def drop_retired_column(state: TypeChangeState) -> Step:
    """``DROP COLUMN IF EXISTS <column>_old``: an instant of ACCESS EXCLUSIVE (the space is reclaimed as rows are
    rewritten later, not now)."""
    statement = sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(state.relation, sql.Identifier(state.retired))
    return Step(StepAction.DROP_OLD_COLUMN, statement, True)


def drop_shadow_column(state: TypeChangeState) -> Step:
    """``DROP COLUMN IF EXISTS`` the shadow column, with the index and foreign key copies a finish that did not
    reach the swap built on it (CASCADE: nothing else can depend on a column the change added)."""
    statement = sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {} CASCADE").format(
        state.relation, sql.Identifier(state.shadow)
    )
    # The foreign key copies' other tables are locked too: taken in either order first, never queueing while
    # holding one.
    related = ddl.foreign_key_tables(state.relation, column=state.shadow)
    return Step(StepAction.DROP_SHADOW_COLUMN, ddl.locked_with_related(statement, state.relation, related), True)
