"""The key changes under the backfill: its checkpoint was written in the key's old type or collation, so runs,
retries and resumes refuse with one line naming the change instead of walking in a different order."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest
from support import at_poll

import backfill
from backfill import BackfillSpec, KeyChangedError, RunOutcome, RunState

SPEC = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100)


def _items(conn: psycopg.Connection[Any], key: str = "id integer PRIMARY KEY", expr: str = "g") -> None:
    conn.execute(f"CREATE TABLE items ({key}, n integer NOT NULL DEFAULT 0)")
    conn.execute(f"INSERT INTO items SELECT {expr} FROM generate_series(1, 1000) g")


def _counts(conn: psycopg.Connection[Any]) -> dict[int, int]:
    return dict(conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall())


def test_a_key_type_changed_mid_run_fails_the_batch_and_retry_refuses(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _items(conn)
    # After three batches, the key's type changes under a runner that planned the old one.
    alter = at_poll(4, lambda: conn.execute("ALTER TABLE items ALTER COLUMN id TYPE text"))

    report = backfill.run_backfill(db_url, SPEC, should_stop=alter)

    with pytest.raises(KeyChangedError) as caught:
        backfill.retry_backfill(db_url, "inc")
    assert str(caught.value) == (
        "backfill 'inc': the key (id) of public.items was integer when it started and is "
        'text COLLATE pg_catalog."default" now; its checkpoint would be read in a different order: '
        "register the backfill again under a new name"
    )
    assert (report.outcome, report.batches) == (RunOutcome.FAILED, 3)
    assert backfill.get_backfill(db_url, "inc").state is RunState.FAILED
    assert _counts(conn) == {1: 300, 0: 700}


def test_a_key_type_changed_between_runs_is_refused_before_any_batch(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _items(conn)
    backfill.run_backfill(db_url, SPEC, max_batches=3)
    conn.execute("ALTER TABLE items ALTER COLUMN id TYPE text")

    for attempt in (
        lambda: backfill.run_backfill(db_url, "inc"),
        lambda: backfill.run_backfill(db_url, SPEC),
        lambda: backfill.run_backfill(db_url, SPEC, force=True),
        lambda: backfill.register_backfill(db_url, SPEC, force=True),
    ):
        with pytest.raises(KeyChangedError, match="was integer when it started and is text"):
            attempt()

    assert _counts(conn) == {1: 300, 0: 700}
    assert backfill.get_backfill(db_url, "inc").state is RunState.RUNNING


@pytest.mark.parametrize(
    ("key", "expr", "change", "was"),
    [
        ('k text COLLATE "C" PRIMARY KEY', "CASE WHEN g % 2 = 0 THEN 'A' ELSE 'a' END || g",
         'TYPE text COLLATE "POSIX"', 'text COLLATE pg_catalog."C"'),
        ("k character(6) PRIMARY KEY", "lpad(g::text, 6, '0')", "TYPE character(8)",
         'character(6) COLLATE pg_catalog."default"'),
        ("k numeric(10, 2) PRIMARY KEY", "g / 3.0", "TYPE numeric(10, 1)", "numeric(10,2)"),
    ],
)  # fmt: skip
def test_collation_and_type_modifier_changes_are_refused(
    conn: psycopg.Connection[Any], db_url: str, key: str, expr: str, change: str, was: str
) -> None:
    _items(conn, key, expr)
    backfill.run_backfill(db_url, SPEC, max_batches=2)
    conn.execute(f"ALTER TABLE items ALTER COLUMN k {change}")

    with pytest.raises(KeyChangedError, match=re.escape(f"was {was} when it started")):
        backfill.run_backfill(db_url, "inc")

    assert _counts(conn) == {1: 200, 0: 800}


def test_a_key_changed_before_the_first_run_is_taken_as_it_is(conn: psycopg.Connection[Any], db_url: str) -> None:
    # No checkpoint exists yet: the backfill walks the key as it is when it starts.
    _items(conn)
    backfill.register_backfill(db_url, SPEC)
    conn.execute("ALTER TABLE items ALTER COLUMN id TYPE bigint")

    report = backfill.run_backfill(db_url, "inc")

    assert report.outcome is RunOutcome.FINISHED
    assert _counts(conn) == {1: 1000}
    assert backfill.get_backfill(db_url, "inc").key_signature == ("bigint",)


@pytest.mark.parametrize(
    ("key", "change"),
    [
        ('k text COLLATE "C" PRIMARY KEY', 'TYPE text COLLATE "POSIX"'),
        ("k varchar(10) PRIMARY KEY", "TYPE varchar(20)"),
    ],
)
def test_a_collation_or_modifier_changed_under_a_running_runner_fails_its_next_batch(
    conn: psycopg.Connection[Any], db_url: str, key: str, change: str
) -> None:
    # The statements still parse and plan after such a change; every batch checks the key's types and collations
    # after it has locked the table, so the walk never continues in a different order.
    _items(conn, key, "lpad(g::text, 6, '0')")
    alter = at_poll(3, lambda: conn.execute(f"ALTER TABLE items ALTER COLUMN k {change}"))

    report = backfill.run_backfill(db_url, SPEC, should_stop=alter)

    assert (report.outcome, report.batches) == (RunOutcome.FAILED, 2)
    assert report.error is not None and "its type or collation changed during the run" in report.error
    assert _counts(conn) == {1: 200, 0: 800}
    with pytest.raises(KeyChangedError):
        backfill.retry_backfill(db_url, "inc")
