"""Keys whose text form depends on a type modifier: every row in range is updated exactly once, and a key whose
text form cannot hold it exactly fails loudly instead of skipping rows."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import backfill
from backfill import BackfillSpec, KeyRoundTripError, PlanError, RunOutcome, RunSettings
from backfill.alembic import offline as offline_sql
from backfill.pg.catalog import resolve
from backfill.pg.connect import Database
from backfill.pg.store import PostgresStore

ROWS = 2_000

#: key type -> (column type, key expression over g in 1..ROWS). Each key's text form is exact only when it is read
#: back with the column's type modifier (or, for the rest, under the settings every connection pins).
KEYS = {
    "char(6)": ("character(6)", "lpad(g::text, 6, '0')"),
    "char(6) short values": ("character(6)", "g::text"),
    "bit(12)": ("bit(12)", "g::bit(12)"),
    "char(4)[]": ("character(4)[]", "ARRAY[lpad((g / 100)::text, 4, 'x'), lpad(g::text, 4, 'y')]"),
    "varchar(5)": ("varchar(5)", "lpad(g::text, 5, '0')"),
    "numeric(12,4)": ("numeric(12, 4)", "g / 7.0"),
    "timestamp(3)": ("timestamp(3)", "'2020-01-01'::timestamp + g * interval '1.0015 seconds'"),
    "time(2)": ("time(2)", "'00:00'::time + g * interval '1.25 seconds'"),
    "interval": ("interval", "g * interval '1 day 1.5 seconds' - interval '3 months'"),
    "float8": ("float8", "g / 3.0::float8 + 1e-9"),
    "float4": ("real", "(g / 3.0)::real"),
    "money": ("money", "(g / 3.0)::numeric::money"),
    "bytea": ("bytea", "decode(lpad(to_hex(g), 6, '0'), 'hex')"),
    "date": ("date", "'1999-12-25'::date + g"),
    "timestamptz": ("timestamptz", "'1899-12-31 23:00:00+00'::timestamptz + g * interval '1 hour 1 second'"),
    "enum": ("mood", "(ARRAY['sad', 'ok', 'happy']::mood[])[1 + g %% 3]"),  # with a second key column below
    "domain over char(6)": ("code6", "lpad(g::text, 6, '0')"),
}


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_keys_whose_text_form_depends_on_a_type_modifier_update_each_row_once(
    conn: psycopg.Connection[Any], db_url: str, kind: str
) -> None:
    column, expression = KEYS[kind]
    conn.execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')")
    conn.execute("CREATE DOMAIN code6 AS character(6)")
    conn.execute(f"CREATE TABLE items (k {column} NOT NULL, g integer NOT NULL, n integer NOT NULL DEFAULT 0)")
    conn.execute(f"INSERT INTO items (k, g) SELECT {expression}, g FROM generate_series(1, %s) g", (ROWS,))
    conn.execute("CREATE UNIQUE INDEX ON items (k, g)")
    conn.execute("ANALYZE items")
    spec = BackfillSpec("inc", "items", {"n": "n + 1"}, key=("k", "g"), batch_size=100)

    # A budget well above the 21 batches needed: a key read back wrongly ran thousands of empty batches.
    report = backfill.run_backfill(db_url, spec, max_batches=200)

    assert report.outcome is RunOutcome.FINISHED
    assert report.rows_updated == ROWS
    assert dict(conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall()) == {1: ROWS}


def test_char_primary_key_of_the_issue(conn: psycopg.Connection[Any], db_url: str) -> None:
    conn.execute("CREATE TABLE items (id character(6) PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO items (id) SELECT lpad(g::text, 6, '0') FROM generate_series(1, 4000) g")

    spec = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100)

    report = backfill.run_backfill(db_url, spec, max_batches=100)

    assert report.outcome is RunOutcome.FINISHED
    assert dict(conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall()) == {1: 4000}
    assert backfill.get_backfill(db_url, "inc").key_signature == ('character(6) COLLATE pg_catalog."default"',)


def test_parallel_split_points_read_back_exactly(conn: psycopg.Connection[Any], db_url: str) -> None:
    conn.execute("CREATE TABLE items (id character(6) PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO items (id) SELECT lpad(g::text, 6, '0') FROM generate_series(1, 3000) g")
    conn.execute("ANALYZE items")

    report = backfill.run_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100), workers=3)

    assert report.outcome is RunOutcome.FINISHED
    assert len(backfill.get_slices(db_url, "inc")) == 3
    assert dict(conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall()) == {1: 3000}


def test_search_path_dependent_key_types_are_refused(conn: psycopg.Connection[Any], db_url: str) -> None:
    conn.execute("CREATE TABLE items (k regclass PRIMARY KEY, n integer NOT NULL DEFAULT 0)")

    with pytest.raises(PlanError, match="key column 'k' of public.items is of type regclass, whose text form depends"):
        backfill.run_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}))

    assert conn.execute("SELECT to_regclass('public.backfills')").fetchone() == (None,)


def test_a_key_text_form_that_does_not_read_back_fails_the_batch_not_the_data(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    # Every key the walk keeps is checked: a cast that loses information (here the old character(1) reading of a
    # character(6) key) fails the batch it happens in, and the backfill stops with the error stored.
    conn.execute("CREATE TABLE items (id character(6) PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO items (id) SELECT lpad(g::text, 6, '0') FROM generate_series(1, 500) g")
    database = Database.from_bind(db_url)
    with PostgresStore(database) as store:
        plan = resolve(store.conn, BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=50))
        lossy = plan.target.__class__(**{**plan.target.__dict__, "key_types": ("character",)})
        with pytest.raises(KeyRoundTripError, match=r"text form \['000500'\] does not read back"):
            store.init()
            record = store.register(plan)
            store.start(record, plan.__class__(**{**plan.__dict__, "target": lossy}))

    assert conn.execute("SELECT count(*) FROM backfill_slices").fetchone() == (0,)
    assert conn.execute("SELECT sum(n) FROM items").fetchone() == (0,)


def test_the_offline_script_casts_keys_with_their_type_modifier(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE items (id character(6) PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO items (id) SELECT lpad(g::text, 6, '0') FROM generate_series(1, 2000) g")
    spec = BackfillSpec(name="inc", schema="public", table="items", key=("id",), values={"n": "n + 1"}, batch_size=100)
    script = offline_sql.batched_script(spec, RunSettings(lock_timeout=2.0))
    conn.execute("SET statement_timeout = '60s'")  # a key read back as character(1) walks forever

    conn.execute(script)

    assert dict(conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall()) == {1: 2000}
