"""What a column type change carries over to the new column, on real PostgreSQL: CHECK constraints (multi-column,
NOT VALID, string literals and similar column names left alone) and indexes with their operator classes,
collations, sort order, INCLUDE columns, storage parameters, expressions, predicates, method and uniqueness, all
the same after the swap as before it while the application writes; and what cannot hold on the new type fails,
naming it, before anything is swapped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs
from test_alembic_ops import alembic_config, make_project, scalar
from test_offline import offline_script, psql
from test_type_change import column_type

import backfill
from backfill.tools.appsim import AppSimulator

PRODUCTS = (
    "CREATE TABLE products (id serial PRIMARY KEY, price integer NOT NULL, price_cap integer NOT NULL "
    "DEFAULT 1000000, label text NOT NULL, "
    "CONSTRAINT products_price_positive CHECK (price > 0), "
    "CONSTRAINT products_price_below_cap CHECK (price < price_cap AND label <> 'price < price_cap'))",
    "INSERT INTO products (price, label) SELECT 2 * g, 'p' || g FROM generate_series(1, 2000) g",
    "ALTER TABLE products ADD CONSTRAINT products_price_even CHECK (price % 2 = 0) NOT VALID",
    'CREATE INDEX products_price_label_idx ON products (price DESC NULLS LAST, label COLLATE "C" text_pattern_ops) '
    "INCLUDE (price_cap) WITH (fillfactor = 80) WHERE price > 10 AND label <> 'price'",
    "CREATE INDEX products_expr_idx ON products ((price * 2), lower(label))",
    "CREATE UNIQUE INDEX products_label_price_key ON products (label, price) NULLS NOT DISTINCT",
    "CREATE INDEX products_price_hash ON products USING hash (price)",
    "CREATE INDEX products_cap_idx ON products (price_cap) WHERE price IS NOT NULL",
    "CREATE INDEX products_price_brin ON products USING brin (price int4_minmax_multi_ops)",
)

APP_UPDATE = "UPDATE products SET price = price + 2 WHERE id = %s"
APP_INSERT = "INSERT INTO products (price, label) VALUES (2 + 2 * (random() * 100)::int, 'n' || gen_random_uuid())"


def catalog(conn: psycopg.Connection[Any], table: str) -> dict[str, Any]:
    """A table's columns (name, type, not null, default, identity), indexes and constraints with their definitions,
    triggers, and the sequences it owns with their types: what an interrupted change must end in as well."""
    oid = scalar(conn, "SELECT %s::regclass::oid", (table,))
    queries = {
        "columns": "SELECT attname, format_type(atttypid, atttypmod), attnotnull, pg_get_expr(d.adbin, d.adrelid), "
        "attidentity FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
        "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attname",
        "indexes": "SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisvalid FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s ORDER BY 1",
        "constraints": "SELECT conname, contype, pg_get_constraintdef(oid), convalidated FROM pg_constraint "
        "WHERE conrelid = %s ORDER BY 1",
        "triggers": "SELECT tgname FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal ORDER BY 1",
        "sequences": "SELECT s.relname, a.attname, format_type(q.seqtypid, NULL) FROM pg_depend d "
        "JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' JOIN pg_sequence q ON q.seqrelid = s.oid "
        "JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid "
        "WHERE d.refobjid = %s AND d.classid = 'pg_class'::regclass ORDER BY 1",
    }
    return {what: [tuple(row) for row in conn.execute(query, (oid,)).fetchall()] for what, query in queries.items()}


def test_check_constraints_and_indexes_come_through_the_change_as_they_were_while_the_application_writes(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    for statement in PRODUCTS:
        conn.execute(statement)
    before = catalog(conn, "products")

    with AppSimulator(db_url, update_sql=APP_UPDATE, insert_sql=APP_INSERT, key_range=(1, 2000), seed=5) as app:
        app.wait_until_writing()
        started = backfill.start_column_type_change(db_url, "products", "price", "bigint")
        with capture_logs() as logs:
            finished = backfill.finish_column_type_change(db_url, "products", "price")
        again = backfill.finish_column_type_change(db_url, "products", "price")
        backfill.cleanup_column_type_change(db_url, "products", "price")
        stats = app.stop()
    after = catalog(conn, "products")

    assert stats.errors == 0, stats.last_error
    assert started.copy is not None and started.copy.outcome is backfill.RunOutcome.FINISHED
    assert again.steps == ()
    assert column_type(conn, "products", "price") == "bigint"
    # Every CHECK constraint is back under its name, rewritten for the new column and nothing else (the string
    # literal and price_cap are untouched), validated as before: the NOT VALID one stays NOT VALID.
    # PostgreSQL parsed them again for bigint, as ALTER COLUMN ... TYPE would: `2` became a bigint in one of them.
    even = ("products_price_even", "c", "CHECK (((price % (2)::bigint) = 0)) NOT VALID", False)
    assert after["constraints"] == [even if c[0] == even[0] else c for c in before["constraints"]]
    # Every index too, with its operator classes, collation, order, INCLUDE, storage parameters, expressions and
    # predicate, except the operator class that does not accept bigint: the copy has bigint's default, and says so.
    brin = "CREATE INDEX products_price_brin ON public.products USING brin (price)"
    expected = [(n, brin if n == "products_price_brin" else d, v) for n, d, v in before["indexes"]]
    assert after["indexes"] == expected
    changed = [e for e in logs if e["event"] == "index_copy_changed"]
    assert [(e["index"], e["log_level"]) for e in changed] == [("products_price_brin", "warning")]
    assert "int4_minmax_multi_ops does not accept bigint" in changed[0]["note"]
    assert [a for a in finished.actions if a in ("add", "validate")].count("validate") >= 2
    # The copies are enforced and used.
    with pytest.raises(psycopg.errors.CheckViolation, match="products_price_positive"):
        conn.execute("INSERT INTO products (price, label) VALUES (-2, 'neg')")
    with pytest.raises(psycopg.errors.CheckViolation, match="products_price_below_cap"):
        conn.execute("INSERT INTO products (price, price_cap, label) VALUES (10, 4, 'over')")
    with pytest.raises(psycopg.errors.CheckViolation, match="products_price_even"):
        conn.execute("INSERT INTO products (price, label) VALUES (13, 'odd')")
    conn.execute("SET enable_seqscan = off")
    plan = "\n".join(str(r[0]) for r in conn.execute("EXPLAIN SELECT label FROM products WHERE price * 2 = 8"))
    assert "products_expr_idx" in plan


def finish_fails_until_fixed(
    conn: psycopg.Connection[Any], db_url: str, column: str, error: type[Exception], fix: str
) -> tuple[str, bool]:
    """Finish the change of ``table.column``, which must fail with ``error``; run ``fix``, then finish again.
    Returns the message and whether the failed finish left the table's catalog as it found it."""
    table, name = column.split(".")
    before = catalog(conn, table)
    with pytest.raises(error) as raised:
        backfill.finish_column_type_change(db_url, table, name)
    left = catalog(conn, table)
    conn.execute(fix)
    backfill.finish_column_type_change(db_url, table, name)
    return str(raised.value), left == before


def test_a_check_constraint_that_cannot_hold_on_the_new_type_stops_finish_before_the_swap_naming_it(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    conn.execute("CREATE TABLE events (id integer PRIMARY KEY, payload text, kind text)")
    conn.execute("CREATE INDEX events_kind_idx ON events (kind)")
    conn.execute("INSERT INTO events SELECT g, '{\"n\": ' || g || '}', 'k' FROM generate_series(1, 500) g")
    backfill.start_column_type_change(db_url, "events", "payload", "jsonb", using="payload::jsonb")
    conn.execute("ALTER TABLE events ADD CONSTRAINT events_payload_short CHECK (length(payload) < 100)")

    fix = "ALTER TABLE events DROP CONSTRAINT events_payload_short"
    message, unchanged = finish_fails_until_fixed(conn, db_url, "events.payload", backfill.ConstraintError, fix)

    assert message == (
        "CHECK constraint events_payload_short of public.events cannot be carried over to the new type jsonb: "
        "function length(jsonb) does not exist; nothing was swapped: drop or change it, then run finish again"
    )
    assert unchanged
    assert column_type(conn, "events", "payload") == "jsonb"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            "ALTER TABLE accounts ADD CONSTRAINT accounts_email_at CHECK (email LIKE '%@%')",
            "CHECK constraint accounts_email_at of public.accounts cannot be carried over to the new type jsonb: "
            "operator does not exist: jsonb ~~ text; nothing was changed",
        ),
        (
            "CREATE INDEX accounts_email_lower ON accounts (lower(email))",
            "index accounts_email_lower of public.accounts cannot be carried over to the new type jsonb: "
            "function lower(jsonb) does not exist; nothing was changed",
        ),
        (
            "ALTER TABLE accounts ADD CONSTRAINT accounts_email_set CHECK (email IS NOT NULL) NO INHERIT",
            "CHECK constraint accounts_email_set of public.accounts cannot be carried over to the new type jsonb: a NO "
            "INHERIT constraint is not carried over; nothing was changed",
        ),
    ],
    ids=["check", "expression_index", "no_inherit"],
)
def test_start_refuses_what_cannot_hold_on_the_new_type_before_writing_anything(
    conn: psycopg.Connection[Any], db_url: str, setup: str, message: str
) -> None:
    conn.execute("CREATE TABLE accounts (id integer PRIMARY KEY, email text)")
    conn.execute(setup)
    before = catalog(conn, "accounts")

    with pytest.raises(backfill.ConstraintError) as raised:
        backfill.start_column_type_change(db_url, "accounts", "email", "jsonb", using="to_jsonb(email)")

    assert str(raised.value) == message
    assert catalog(conn, "accounts") == before


def test_the_offline_finish_carries_them_over_as_the_online_one_does(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str, second_db: str
) -> None:
    with psycopg.connect(second_db, autocommit=True) as online:
        for statement in PRODUCTS:
            conn.execute(statement)
            online.execute(statement)
        backfill.start_column_type_change(second_db, "products", "price", "bigint")
        backfill.finish_column_type_change(second_db, "products", "price")
        expected = catalog(online, "products")
    backfill.start_column_type_change(db_url, "products", "price", "bigint")
    project = make_project(tmp_path, 'op.finish_column_type_change("products", "price")')
    script = offline_script(alembic_config(db_url, project), tmp_path / "finish.sql")

    ran = psql(db_url, script)

    assert ran.returncode == 0, ran.stderr
    assert 'index products_price_brin of "public"."products": operator class int4_minmax_multi_ops' in ran.stderr
    assert catalog(conn, "products") == expected


def test_rows_the_new_type_makes_break_a_check_constraint_stop_finish_naming_one_then_it_runs_again(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    """0.4 rounds to 0 as an integer: the copy of CHECK (price > 0) cannot be validated. Finish fails naming the
    row, drops the NOT VALID copy it added (the application's writes are not checked by it meanwhile) and swaps
    nothing; with the row fixed, it runs to the end."""
    conn.execute(
        "CREATE TABLE prices (id integer PRIMARY KEY, price numeric(10, 2) CONSTRAINT prices_positive CHECK "
        "(price > 0))"
    )
    conn.execute("INSERT INTO prices SELECT g, g FROM generate_series(1, 300) g")
    conn.execute("UPDATE prices SET price = 0.4 WHERE id = 7")
    backfill.start_column_type_change(db_url, "prices", "price", "integer")

    fix = "UPDATE prices SET price = 1 WHERE id = 7"
    message, unchanged = finish_fails_until_fixed(conn, db_url, "prices.price", backfill.ViolationError, fix)

    assert "\n" not in message
    assert "e.g. the row with (id)=(7); the CHECK constraint this call added was dropped again" in message
    assert unchanged
    assert column_type(conn, "prices", "price") == "integer"
    with pytest.raises(psycopg.errors.CheckViolation, match="prices_positive"):
        conn.execute("INSERT INTO prices (id, price) VALUES (1000, 0)")
