"""Every kind of key walks every row exactly once, in key order, whatever the gaps and types."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import backfill
from backfill import BackfillSpec, RunOutcome, RunState

KEY_TABLES = {
    "integer": ("id integer PRIMARY KEY", "g"),
    "bigint": ("id bigint PRIMARY KEY", "g * 1000000000::bigint"),
    "uuid": ("id uuid PRIMARY KEY", "md5(g::text)::uuid"),
    # Text keys that sort differently as numbers and as text, and a collation-sensitive mix of cases.
    "text": ("id text PRIMARY KEY", "CASE WHEN mod(g, 2) = 0 THEN 'Row-' ELSE 'row-' END || g"),
    "timestamptz": ("id timestamptz PRIMARY KEY", "'2020-01-01'::timestamptz + g * interval '1.5 seconds'"),
    "numeric": ("id numeric PRIMARY KEY", "g / 7.0"),
    # The INCLUDE column is neither unique nor NOT NULL: only id is the key.
    "include": ("id integer, note text, PRIMARY KEY (id) INCLUDE (note)", "g"),
}


def _fill(conn: psycopg.Connection[Any], columns: str, key_expr: str, rows: int) -> None:
    conn.execute(f"CREATE TABLE items ({columns}, n integer NOT NULL DEFAULT 0)")
    conn.execute(f"INSERT INTO items (id) SELECT {key_expr} FROM generate_series(1, %s) g", (rows,))
    conn.execute("ANALYZE items")


def _counts(conn: psycopg.Connection[Any], table: str = "items") -> dict[int, int]:
    return dict(conn.execute(f"SELECT n, count(*) FROM {table} GROUP BY n").fetchall())  # noqa: S608


@pytest.mark.parametrize("kind", sorted(KEY_TABLES))
def test_single_column_keys_of_every_type_update_each_row_once(
    conn: psycopg.Connection[Any], db_url: str, kind: str
) -> None:
    columns, key_expr = KEY_TABLES[kind]
    _fill(conn, columns, key_expr, 2_345)
    spec = BackfillSpec(f"inc_{kind}", "items", {"n": "n + 1"}, batch_size=100)

    report = backfill.run_backfill(db_url, spec)

    assert report.outcome is RunOutcome.FINISHED
    assert report.rows_updated == 2_345
    assert report.batches == 24
    assert _counts(conn) == {1: 2_345}


def test_composite_key_walks_row_values(conn: psycopg.Connection[Any], db_url: str) -> None:
    conn.execute(
        "CREATE TABLE items (tenant integer, seq text, n integer NOT NULL DEFAULT 0, PRIMARY KEY (tenant, seq))"
    )
    # Few tenants, many rows each, and seq values whose text order differs from numeric order.
    conn.execute(
        "INSERT INTO items (tenant, seq) SELECT t, s::text FROM generate_series(1, 7) t, generate_series(1, 300) s"
    )
    spec = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=64)

    report = backfill.run_backfill(db_url, spec)

    assert report.outcome is RunOutcome.FINISHED
    assert _counts(conn) == {1: 2_100}
    assert backfill.get_backfill(db_url, "inc").spec.key == ("tenant", "seq")


def test_sparse_keys_are_walked_by_rows_not_by_key_values(conn: psycopg.Connection[Any], db_url: str) -> None:
    conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    # Dense runs separated by gaps of billions: a batch counts rows, so no batch is empty and none is huge.
    conn.execute(
        "INSERT INTO items (id) SELECT b * 10000000000 + g FROM generate_series(0, 4) b, generate_series(1, 50) g"
    )

    report = backfill.run_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=30))

    assert report.outcome is RunOutcome.FINISHED
    assert report.batches == 9  # ceil(250 / 30)
    assert _counts(conn) == {1: 250}


def test_empty_table_succeeds_at_once(conn: psycopg.Connection[Any], db_url: str) -> None:
    conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0)")

    report = backfill.run_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}))

    assert (report.outcome, report.state, report.batches) == (RunOutcome.FINISHED, RunState.SUCCEEDED, 0)


def test_filter_skips_rows_but_the_walk_goes_on_through_filtered_ranges(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _fill(conn, "id integer PRIMARY KEY, tenant_id integer", "g", 1_000)
    # Only the last 100 rows match: the first nine batches update nothing and must not end the run.
    conn.execute("UPDATE items SET tenant_id = 1 WHERE id <= 900")
    spec = BackfillSpec("fill", "items", {"tenant_id": "0", "n": "n + 1"}, where="tenant_id IS NULL", batch_size=100)

    report = backfill.run_backfill(db_url, spec)

    assert report.outcome is RunOutcome.FINISHED
    assert report.batches == 10
    assert report.rows_updated == 100
    assert conn.execute("SELECT count(*) FROM items WHERE tenant_id = 0 AND n = 1").fetchone() == (100,)
    assert conn.execute("SELECT count(*) FROM items WHERE tenant_id = 1 AND n = 0").fetchone() == (900,)


def test_percent_signs_in_expressions_and_filters_are_sql_not_placeholders(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _fill(conn, "id integer PRIMARY KEY, label text", "g", 50)
    spec = BackfillSpec("pct", "items", {"label": "'x%' || (id % 10)"}, where="id % 2 = 0", batch_size=7)

    backfill.run_backfill(db_url, spec)

    assert conn.execute("SELECT label FROM items WHERE id = 14").fetchone() == ("x%4",)
    assert conn.execute("SELECT count(*) FROM items WHERE label IS NULL").fetchone() == (25,)


def test_rows_inserted_after_the_start_beyond_the_fixed_end_are_left_alone(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _fill(conn, "id integer PRIMARY KEY", "g", 500)
    spec = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100)
    first = backfill.run_backfill(db_url, spec, max_batches=2)
    # The application keeps inserting while the backfill runs: new keys above the end fixed at the start, and a
    # key inside the range not walked yet.
    conn.execute("INSERT INTO items (id) SELECT g FROM generate_series(501, 800) g")
    conn.execute("DELETE FROM items WHERE id = 450")
    conn.execute("INSERT INTO items (id) VALUES (450)")

    second = backfill.run_backfill(db_url, spec)

    assert (first.outcome, second.outcome) == (RunOutcome.WORK_LEFT, RunOutcome.FINISHED)
    assert first.rows_updated + second.rows_updated == 500
    assert conn.execute("SELECT count(*) FROM items WHERE id <= 500 AND n = 1").fetchone() == (500,)
    assert conn.execute("SELECT count(*) FROM items WHERE id > 500 AND n = 0").fetchone() == (300,)
    assert backfill.get_backfill(db_url, "inc").upper_bound == ["500"]


def test_schema_qualified_table_and_quoted_identifiers(conn: psycopg.Connection[Any], db_url: str) -> None:
    # Spaces, capitals, quotes and % signs (which psycopg would otherwise read as placeholders) in every name.
    conn.execute('CREATE SCHEMA "App Data"')
    conn.execute('CREATE TABLE "App Data"."Order %s Items" ("I""d%d" integer PRIMARY KEY, "Total%" integer)')
    conn.execute('INSERT INTO "App Data"."Order %s Items" ("I""d%d") SELECT generate_series(1, 120)')
    spec = BackfillSpec(
        "totals", "Order %s Items", {"Total%": '"I""d%d" * 2'}, schema="App Data", key=('I"d%d',), batch_size=50
    )

    report = backfill.run_backfill(db_url, spec)

    assert report.rows_updated == 120
    assert conn.execute('SELECT sum("Total%") FROM "App Data"."Order %s Items"').fetchone() == (120 * 121,)


def test_explicit_non_primary_key_with_an_index(conn: psycopg.Connection[Any], db_url: str) -> None:
    conn.execute(
        "CREATE TABLE items (created_at timestamptz NOT NULL, seq integer NOT NULL, payload text, "
        "n integer NOT NULL DEFAULT 0)"
    )
    # No primary key; created_at repeats, so the key adds seq to be unique (a non-unique key is refused: see
    # test_unique_key.py), walked through an index leading with both.
    conn.execute(
        "INSERT INTO items (created_at, seq) SELECT '2024-01-01'::timestamptz + (g / 3) * interval '1 minute', g "
        "FROM generate_series(1, 999) g"
    )
    conn.execute("CREATE UNIQUE INDEX ON items (created_at, seq)")
    spec = BackfillSpec("inc", "items", {"n": "n + 1"}, key=("created_at", "seq"), batch_size=10)

    report = backfill.run_backfill(db_url, spec)

    assert report.outcome is RunOutcome.FINISHED
    assert _counts(conn) == {1: 999}
