"""Does an index serve the walk? Asked of the planner, not only of the catalog.

The catalog says an index leads with the key's columns; only the planner knows whether the batch statements can use
it: an index of another collation (``(k COLLATE "C")`` over a column of the database's collation) or another operator
class (``text_pattern_ops``) cannot serve ``k > $1 ORDER BY k``, and a dropped index serves nothing. Then every batch
scans the whole table. :func:`check_walk` plans the batch statements (EXPLAIN, no row read or written) with
sequential scans disabled, and refuses a plan that still reads the table without an index condition.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.sql

from backfill.errors import PlanError, describe
from backfill.pg import statements as sql
from backfill.plan import Target

__all__ = ["check_walk"]

#: Plan nodes that read a relation through an index; they walk a range only with an "Index Cond".
_INDEX_SCANS = {"Index Scan", "Index Only Scan"}


def check_walk(conn: psycopg.Connection[Any], target: Target) -> None:
    """Refuse, with :class:`PlanError`, a target whose batch statements would scan the whole table.

    Runs in a transaction of its own on ``conn`` (autocommit): reads one key of the table (a one-page read), then
    EXPLAINs the look-ahead and the update of a batch ending at that key. An empty table passes (nothing to walk).
    """
    try:
        _check_walk(conn, target)
    except psycopg.errors.LockNotAvailable as exc:
        # Chained: the table is busy, not the spec wrong (``run_backfills`` tries it again next run).
        name = f"{target.schema}.{target.table}"
        raise PlanError(f"could not lock {name} to check its batches' plan ({describe(exc)})") from exc


def _check_walk(conn: psycopg.Connection[Any], target: Target) -> None:
    statements = sql.for_target(target)
    with conn.transaction():
        conn.execute(sql.SET_TIMEOUTS, ("5s", "60s"))
        row = conn.execute(statements.any_key(), ()).fetchone()
        if row is None:
            return
        key = list(row)
        relations = {(schema, name) for schema, name in conn.execute(sql.RELATIONS_OF, (target.schema, target.table))}
        # With sequential scans priced out, the planner takes any index that can serve the range: a plan that still
        # reads the table without an index condition has none.
        conn.execute(sql.NO_SEQSCAN)
        for what, statement, params in (
            ("look-ahead", statements.lookahead(False), [*key, 0]),
            ("update", statements.update(False), key),
        ):
            found = conn.execute(sql.explain_json(statement), params).fetchone()
            assert found is not None
            for node in _nodes(found[0][0]["Plan"]):
                if (node.get("Schema"), node.get("Relation Name")) in relations and _reads_it_all(node):
                    raise PlanError(_message(target, what, node))


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)


def _reads_it_all(node: dict[str, Any]) -> bool:
    kind = node["Node Type"]
    if kind == "Bitmap Heap Scan":
        # Fed by bitmap index scans; one without an Index Cond reads its whole index.
        bitmaps = [n for n in _nodes(node) if n["Node Type"] == "Bitmap Index Scan"]
        return any("Index Cond" not in n for n in bitmaps)
    return kind == "Seq Scan" or (kind in _INDEX_SCANS and "Index Cond" not in node)


def _message(target: Target, what: str, node: dict[str, Any]) -> str:
    index = node.get("Index Name") or next((n["Index Name"] for n in _nodes(node) if "Index Name" in n), None)
    how = node["Node Type"] + (f" of index {index}" if index else "")
    return (
        f"no index of {target.schema}.{target.table} serves the walk by ({', '.join(target.key)}): the batch {what} "
        f"would read {node['Relation Name']} by {how} without a key range, i.e. scan it whole on every batch. "
        "An index must lead with the key's columns, with their collation and the default operator class "
        f"({_index_advice(target)})"
    )


def _index_advice(target: Target) -> str:
    # Quoted as SQL, so the advice can be pasted whatever the names hold.
    return (
        psycopg.sql.SQL("CREATE INDEX CONCURRENTLY ON {} ({})")
        .format(
            psycopg.sql.Identifier(target.schema, target.table),
            psycopg.sql.SQL(", ").join(psycopg.sql.Identifier(column) for column in target.key),
        )
        .as_string(None)
    )
