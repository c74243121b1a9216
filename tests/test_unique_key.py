"""A key must be unique: a batch walks N keys, and with duplicates one "batch of N" can hold any number of rows
(three distinct created_at values on 300k rows made batches of 100,000 rows, all locked until commit). A key is
unique when it holds every column of a valid, non-partial unique index (the primary key included); anything else is
refused before anything is written, naming the problem."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

import backfill
from backfill import BackfillSpec, PlanError
from backfill.cli import EXIT_USAGE, cli


@pytest.fixture
def events(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute(
        """CREATE TABLE events (id integer PRIMARY KEY, created_at timestamptz NOT NULL, code text NOT NULL,
                                tenant integer NOT NULL, n integer NOT NULL DEFAULT 0)"""
    )
    conn.execute(
        """INSERT INTO events (id, created_at, code, tenant)
           SELECT g, '2026-01-01'::timestamptz + (g % 3) * interval '1 day', 'c' || g, g % 7
             FROM generate_series(1, 3000) g"""
    )
    conn.execute("CREATE INDEX events_created_at ON events (created_at)")
    conn.execute("ANALYZE events")
    return conn


def nothing_written(conn: psycopg.Connection[Any]) -> bool:
    unchanged = conn.execute("SELECT count(*) FROM events WHERE n <> 0").fetchone() == (0,)
    return unchanged and conn.execute("SELECT to_regclass('public.backfills')").fetchone() == (None,)


def test_a_key_without_a_unique_index_is_refused_naming_the_fix(events: psycopg.Connection[Any], db_url: str) -> None:
    spec = BackfillSpec("b", "events", {"n": "n + 1"}, key=("created_at",))

    for attempt in (backfill.run_backfill, backfill.register_backfill, backfill.plan_backfill):
        with pytest.raises(PlanError) as caught:
            attempt(db_url, spec)
        message = str(caught.value)
        assert "key (created_at) of public.events is not unique" in message
        assert "key=(created_at, id)" in message
        assert "\n" not in message
    assert nothing_written(events)


def test_the_cli_refuses_it_with_exit_code_2(events: psycopg.Connection[Any], db_url: str) -> None:
    argv = ["--url", db_url, "add", "b", "--table", "events", "--set", "n=n+1", "--key", "created_at"]
    result = CliRunner().invoke(cli, argv)

    assert result.exit_code == EXIT_USAGE
    assert "is not unique" in result.stderr
    assert nothing_written(events)


@pytest.mark.parametrize(
    ("index", "key"),
    [
        ("CREATE UNIQUE INDEX ON events (code) WHERE tenant > 0", ("code",)),  # partial: does not cover every row
        ("CREATE UNIQUE INDEX ON events (lower(code))", ("code",)),  # an expression, not the column
        ("CREATE UNIQUE INDEX ON events (tenant, code)", ("code",)),  # unique only together with tenant
        ("CREATE INDEX ON events (code) INCLUDE (id)", ("code",)),  # not unique at all
    ],
    ids=["partial", "expression", "wider", "plain"],
)
def test_indexes_that_do_not_make_the_key_unique_are_not_taken_for_unique(
    events: psycopg.Connection[Any], db_url: str, index: str, key: tuple[str, ...]
) -> None:
    events.execute(index)
    events.execute("CREATE INDEX IF NOT EXISTS events_code ON events (code)")

    with pytest.raises(PlanError, match="is not unique"):
        backfill.plan_backfill(db_url, BackfillSpec("b", "events", {"n": "n + 1"}, key=key))


def test_a_unique_index_that_fails_to_build_is_not_taken_for_unique(
    events: psycopg.Connection[Any], db_url: str
) -> None:
    events.execute("CREATE INDEX events_tenant ON events (tenant)")
    with pytest.raises(psycopg.errors.UniqueViolation):
        events.execute("CREATE UNIQUE INDEX CONCURRENTLY events_tenant_unique ON events (tenant)")  # left invalid

    with pytest.raises(PlanError, match="is not unique"):
        backfill.plan_backfill(db_url, BackfillSpec("b", "events", {"n": "n + 1"}, key=("tenant",)))


@pytest.mark.parametrize(
    ("ddl", "key"),
    [
        ("CREATE UNIQUE INDEX ON events (code)", ("code",)),
        ("ALTER TABLE events ADD UNIQUE (code) DEFERRABLE INITIALLY DEFERRED", ("code",)),
        ("CREATE UNIQUE INDEX ON events (created_at, id)", ("created_at", "id")),
        ("CREATE UNIQUE INDEX ON events (code, created_at)", ("created_at", "code")),  # columns in another order
        ("CREATE INDEX ON events (created_at, code)", ("created_at", "code", "id")),  # holds the primary key
    ],
    ids=["unique-index", "unique-constraint", "with-primary-key", "reordered", "superset-of-primary-key"],
)
def test_keys_made_unique_by_an_index_run_exactly_once(
    events: psycopg.Connection[Any], db_url: str, ddl: str, key: tuple[str, ...]
) -> None:
    events.execute(ddl)
    events.execute(f"CREATE INDEX IF NOT EXISTS walk ON events ({', '.join(key)})")

    report = backfill.run_backfill(db_url, BackfillSpec("b", "events", {"n": "n + 1"}, key=key, batch_size=500))

    assert report.finished
    assert events.execute("SELECT n, count(*) FROM events GROUP BY n").fetchall() == [(1, 3000)]
    # Batches of 500 keys are batches of at most 500 rows.
    assert report.batches == 6
