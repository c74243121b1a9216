"""Bad input gets one clear error naming the problem, and nothing is written: not even the control tables."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import backfill
from backfill import BackfillSpec, ConnectError, PlanError


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0, tag text, ts timestamptz)")
    conn.execute("CREATE TABLE nokey (id integer, n integer)")
    conn.execute("CREATE TABLE noindex (id integer NOT NULL, n integer)")
    conn.execute("CREATE TABLE nullkey (id integer, n integer)")
    conn.execute("CREATE INDEX ON nullkey (id)")
    conn.execute(
        "CREATE TABLE gen (id integer PRIMARY KEY, n integer, twice integer GENERATED ALWAYS AS (n * 2) STORED)"
    )
    conn.execute("CREATE VIEW items_view AS SELECT * FROM items")
    conn.execute("INSERT INTO items (id) SELECT generate_series(1, 10)")
    return conn


CASES = [
    (BackfillSpec("b", "missing", {"n": "1"}), "table missing does not exist"),
    (BackfillSpec("b", "other.items", {"n": "1"}), "table other.items does not exist"),
    (BackfillSpec("b", "items_view", {"n": "1"}), "public.items_view is not a table"),
    (BackfillSpec("b", "items", {"nope": "1"}), "column 'nope' does not exist in table public.items"),
    (BackfillSpec("b", "gen", {"twice": "1"}), "column 'twice' of public.gen is generated"),
    (BackfillSpec("b", "nokey", {"n": "1"}), "table public.nokey has no primary key"),
    (BackfillSpec("b", "noindex", {"n": "1"}, key=("id",)), "no btree index of public.noindex leads with (id)"),
    (BackfillSpec("b", "nullkey", {"n": "1"}, key=("id",)), "key column 'id' of public.nullkey is nullable"),
    (BackfillSpec("b", "items", {"n": "1"}, key=("zz",)), "key column 'zz' does not exist"),
    (BackfillSpec("b", "items", {"id": "id + 1"}), "column 'id' is part of the key"),
    (
        BackfillSpec("b", "items", {"n": "n +* 1"}),
        "expression for column 'n' of public.items is not valid: operator does not exist",
    ),
    (
        BackfillSpec("b", "items", {"n": "(n + 1"}),
        "expression for column 'n' of public.items is not valid: syntax error",
    ),
    (BackfillSpec("b", "items", {"n": "no_such_column"}), 'column "no_such_column" does not exist'),
    (BackfillSpec("b", "items", {"ts": "'not a time'"}), "invalid input syntax for type timestamp with time zone"),
    (
        BackfillSpec("b", "items", {"n": "1"}, where="tag = "),
        "filter (where) on public.items is not valid: syntax error",
    ),
    (BackfillSpec("b", "items", {"n": "1"}, where="n"), "argument of WHERE must be type boolean"),
    (BackfillSpec("b", "items", {"n": "1; DROP TABLE items"}), "is not valid: syntax error"),
]


@pytest.mark.parametrize(("spec", "message"), CASES, ids=[m[:40] for _, m in CASES])
def test_specs_that_do_not_fit_the_database_are_refused_before_anything_is_written(
    items: psycopg.Connection[Any], db_url: str, spec: BackfillSpec, message: str
) -> None:
    for attempt in (backfill.run_backfill, backfill.register_backfill):
        with pytest.raises(PlanError) as caught:
            attempt(db_url, spec)

        assert message in str(caught.value)
        assert "\n" not in str(caught.value)
    assert items.execute("SELECT to_regclass('public.backfills')").fetchone() == (None,)
    assert items.execute("SELECT count(*), sum(n) FROM items").fetchone() == (10, 0)


def test_unreachable_database_is_named_without_its_password() -> None:
    with pytest.raises(ConnectError) as caught:
        backfill.run_backfill("postgresql://app:s3cret-pw@127.0.0.1:9/app", "anything")

    message = str(caught.value)
    assert message.startswith("cannot connect to postgresql://app:***@127.0.0.1:9/app:")
    assert "s3cret-pw" not in message


def test_sqlalchemy_urls_are_accepted_and_other_databases_refused(db_url: str, items: psycopg.Connection[Any]) -> None:
    sqlalchemy_url = db_url.replace("postgresql://", "postgresql+psycopg://", 1)

    report = backfill.run_backfill(sqlalchemy_url, BackfillSpec("b", "items", {"n": "n + 1"}))

    assert report.rows_updated == 10
    with pytest.raises(ConnectError, match="backfill needs PostgreSQL, got a sqlite URL"):
        backfill.run_backfill("sqlite:///x.db", "b")


def test_malformed_url_does_not_echo_the_password() -> None:
    with pytest.raises(ConnectError) as caught:
        backfill.run_backfill("postgresql+psycopg://app:pw-123@host:notaport/db", "b")

    assert "pw-123" not in str(caught.value)
