"""Every batch costs O(batch size) whatever the table size: both batch statements walk the key's index.

The plans are checked on a table big enough that a sequential scan would be the planner's choice for any statement
that is not bounded by the key range, with fresh statistics, at the start and in the middle of the key range.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from backfill import BackfillSpec
from backfill.pg.catalog import resolve
from backfill.pg.statements import ControlTables, for_target

ROWS = 200_000


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(_plan_nodes(child))
    return nodes


def _explain(conn: psycopg.Connection[Any], statement: psycopg.sql.Composed, params: list[Any]) -> list[dict[str, Any]]:
    query = psycopg.sql.SQL("EXPLAIN (FORMAT JSON) {}").format(statement)
    row = conn.execute(query, params).fetchone()
    assert row is not None
    document = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    return _plan_nodes(document[0]["Plan"])


@pytest.fixture
def big_table(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute("CREATE TABLE events (id bigint PRIMARY KEY, tenant integer, payload text, kind text)")
    conn.execute(
        "INSERT INTO events (id, tenant, payload) SELECT g, mod(g, 50), md5(g::text) FROM generate_series(1, %s) g",
        (ROWS,),
    )
    conn.execute("VACUUM ANALYZE events")
    return conn


@pytest.mark.parametrize("lower", [None, "100000"], ids=["first-batch", "mid-table"])
def test_lookahead_and_update_use_the_key_index_never_a_sequential_scan(
    big_table: psycopg.Connection[Any], lower: str | None
) -> None:
    spec = BackfillSpec("p", "events", {"kind": "upper(payload)"}, where="kind IS NULL", batch_size=10_000)
    target = for_target(resolve(big_table, spec).target)
    bounds = [lower] if lower else []

    lookahead = _explain(big_table, target.lookahead(lower is not None), [*bounds, str(ROWS), 9_999])
    update = _explain(big_table, target.update(lower is not None), [*bounds, "110000"])

    lookahead_scans = {n["Node Type"] for n in lookahead if "Scan" in n["Node Type"]}
    update_scans = {n["Node Type"] for n in update if "Scan" in n["Node Type"]}
    assert lookahead_scans == {"Index Only Scan"}
    assert update_scans <= {"Index Scan", "Bitmap Heap Scan", "Bitmap Index Scan"}
    assert update_scans
    assert all(n.get("Index Name") in (None, "events_pkey") for n in lookahead + update)


def test_composite_key_range_is_an_index_range_scan(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE items (tenant integer, seq integer, n integer, PRIMARY KEY (tenant, seq))")
    conn.execute("INSERT INTO items SELECT t, s, 0 FROM generate_series(1, 100) t, generate_series(1, 2000) s")
    conn.execute("VACUUM ANALYZE items")
    target = for_target(resolve(conn, BackfillSpec("p", "items", {"n": "n + 1"})).target)

    lookahead = _explain(conn, target.lookahead(True), ["50", "7", "100", "2000", 9_999])
    update = _explain(conn, target.update(True), ["50", "7", "55", "7"])

    assert not any(n["Node Type"] == "Seq Scan" for n in lookahead + update)
    # The row comparison must be an index condition, not a filter applied after reading everything.
    index_nodes = [n for n in lookahead if n["Node Type"] == "Index Only Scan"]
    assert index_nodes
    assert "ROW" in index_nodes[0]["Index Cond"] or "(tenant, seq)" in index_nodes[0]["Index Cond"]


@pytest.mark.parametrize("lower", [None, "100000"], ids=["first-batch", "mid-table"])
def test_the_one_statement_batch_walks_the_key_index_never_a_sequential_scan(
    big_table: psycopg.Connection[Any], lower: str | None
) -> None:
    """The whole batch in one statement (look-ahead, update, checkpoint): the end key reaches the UPDATE as a
    parameter the planner does not know, and the range must still be an index condition on the key."""
    tables = ControlTables("public")
    with big_table.transaction():
        for statement in tables.create():
            big_table.execute(statement)
    spec = BackfillSpec("p", "events", {"kind": "upper(payload)"}, where="kind IS NULL")
    target = for_target(resolve(big_table, spec).target)
    checkpoint = [lower] if lower else None
    params = target.batch_params(1, 0, checkpoint, [str(ROWS)], True, 10_000, "me")

    nodes = _explain(big_table, target.batch(tables, lower is not None), params)

    on_events = [n for n in nodes if n.get("Relation Name") == "events"]
    scans = [n["Node Type"] for n in on_events if "Scan" in n["Node Type"]]
    assert "Index Only Scan" in scans  # the look-ahead
    assert set(scans) <= {"Index Only Scan", "Index Scan", "Bitmap Heap Scan"}
    assert all(n.get("Index Name") in (None, "events_pkey") for n in nodes if n.get("Relation Name") == "events")
    updates = [n for n in on_events if n["Node Type"] == "ModifyTable"]
    assert len(updates) == 1
    range_scans = [n for n in _plan_nodes(updates[0]) if n["Node Type"] in ("Index Scan", "Bitmap Index Scan")]
    assert range_scans and all("<=" in n["Index Cond"] for n in range_scans)
