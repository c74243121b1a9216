"""Keys that move: a key a trigger rewrites on UPDATE is refused; a key that is not the primary key is walked
with a warning, since the application may change it during the run (see the README's guarantee)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

import backfill
from backfill import BackfillSpec, PlanError, RunOutcome

TRIGGER = """
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.n = OLD.n THEN RETURN NEW; END IF;
  {body}
  RETURN NEW;
END $$;
CREATE TRIGGER touch BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION touch();
"""


def _items(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "CREATE TABLE items (id integer PRIMARY KEY, seq bigint NOT NULL UNIQUE, n integer NOT NULL DEFAULT 0, "
        "touched timestamptz)"
    )
    conn.execute("INSERT INTO items (id, seq) SELECT g, g FROM generate_series(1, 500) g")


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("NEW.seq := NEW.seq + 1000000;", ("seq",)),
        ('new."seq" = (SELECT max(seq) + 1 FROM items);', ("seq",)),
        ("NEW.id := NEW.id + 1000;", None),
    ],
)
def test_a_key_that_a_before_update_trigger_sets_is_refused(
    conn: psycopg.Connection[Any], db_url: str, body: str, key: tuple[str, ...] | None
) -> None:
    _items(conn)
    conn.execute(TRIGGER.format(body=body))
    column = (key or ("id",))[0]

    with pytest.raises(PlanError) as caught:
        backfill.run_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, key=key, batch_size=50))

    assert str(caught.value) == (
        f"trigger touch on public.items (touch()) sets key column {column!r} on UPDATE: rows would move across the "
        "checkpoint and be skipped or updated twice; walk a key no trigger changes"
    )
    assert conn.execute("SELECT to_regclass('public.backfills')").fetchone() == (None,)
    assert conn.execute("SELECT sum(n) FROM items").fetchone() == (0,)


def test_triggers_that_only_read_the_key_or_set_other_columns_are_fine(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _items(conn)
    conn.execute(TRIGGER.format(body="IF NEW.seq = OLD.seq THEN NEW.touched := now(); END IF;"))

    report = backfill.run_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, key=("seq",), batch_size=50))

    assert report.outcome is RunOutcome.FINISHED
    assert conn.execute("SELECT count(*) FROM items WHERE n = 1 AND touched IS NOT NULL").fetchone() == (500,)


def test_a_key_other_than_the_primary_key_is_walked_with_a_warning(conn: psycopg.Connection[Any], db_url: str) -> None:
    _items(conn)

    with capture_logs() as logs:
        report = backfill.run_backfill(
            db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, key=("seq",), batch_size=50)
        )
        backfill.run_backfill(db_url, BackfillSpec("pk", "items", {"n": "n + 1"}, key=("id",), batch_size=50))

    warnings = [entry for entry in logs if entry["event"] == "key_not_primary_key"]
    assert report.outcome is RunOutcome.FINISHED
    assert [(w["table"], w["key"], w["log_level"]) for w in warnings] == [("public.items", ["seq"], "warning")]


def test_a_key_changed_by_an_on_update_cascade_is_walked_with_a_warning(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    conn.execute("CREATE TABLE parents (id integer PRIMARY KEY)")
    conn.execute(
        "CREATE TABLE items (parent integer REFERENCES parents ON UPDATE CASCADE, id integer, "
        "n integer NOT NULL DEFAULT 0, PRIMARY KEY (parent, id))"
    )
    conn.execute("INSERT INTO parents SELECT generate_series(1, 5)")
    conn.execute("INSERT INTO items (parent, id) SELECT p, g FROM generate_series(1, 5) p, generate_series(1, 40) g")

    with capture_logs() as logs:
        report = backfill.run_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=50))

    assert report.outcome is RunOutcome.FINISHED
    assert [e["constraint"] for e in logs if e["event"] == "key_updated_by_cascade"] == ["items_parent_fkey"]
