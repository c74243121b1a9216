"""Rows that already hold their values are not rewritten (``skip_unchanged``, on by default): a re-run writes no new
row versions and fires no UPDATE trigger on them; ``skip_unchanged=False`` rewrites every matching row."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

import backfill
from backfill import BackfillSpec, RunOutcome
from backfill.cli import cli


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, a integer NOT NULL, doubled integer, doc json)")
    conn.execute("INSERT INTO items (id, a) SELECT g, g FROM generate_series(1, 2000) g")
    conn.execute("CREATE TABLE fired (id integer)")
    conn.execute(
        "CREATE FUNCTION note_update() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO fired VALUES (NEW.id); RETURN NEW; END $$"
    )
    conn.execute("CREATE TRIGGER note AFTER UPDATE ON items FOR EACH ROW EXECUTE FUNCTION note_update()")
    return conn


def versions(conn: psycopg.Connection[Any]) -> dict[int, str]:
    """Each row's xmin: a new one means the row was rewritten."""
    return dict(conn.execute("SELECT id, xmin::text FROM items").fetchall())


VALUES = {"doubled": "a * 2", "doc": "json_build_object('a', a)"}


def test_a_rerun_over_rows_that_hold_their_values_rewrites_none(items: psycopg.Connection[Any], db_url: str) -> None:
    first = backfill.run_backfill(db_url, BackfillSpec("fill", "items", VALUES, batch_size=300))
    items.execute("UPDATE items SET doubled = 0 WHERE id IN (7, 1500)")  # two rows the application changed since
    items.execute("TRUNCATE fired")
    before = versions(items)

    again = backfill.run_backfill(db_url, BackfillSpec("fill_again", "items", VALUES, batch_size=300))

    assert (first.rows_updated, again.outcome, again.rows_updated) == (2000, RunOutcome.FINISHED, 2)
    after = versions(items)
    assert sorted(i for i in before if before[i] != after[i]) == [7, 1500]
    assert items.execute("SELECT array_agg(id ORDER BY id) FROM fired").fetchone() == ([7, 1500],)
    assert items.execute("SELECT count(*) FROM items WHERE doubled = a * 2").fetchone() == (2000,)


def test_skip_unchanged_false_rewrites_every_matching_row(items: psycopg.Connection[Any], db_url: str) -> None:
    backfill.run_backfill(db_url, BackfillSpec("fill", "items", VALUES, batch_size=300))
    items.execute("TRUNCATE fired")
    before = versions(items)

    again = backfill.run_backfill(
        db_url, BackfillSpec("fill_again", "items", VALUES, batch_size=300, skip_unchanged=False)
    )

    assert again.rows_updated == 2000
    after = versions(items)
    assert all(before[i] != after[i] for i in before)
    assert items.execute("SELECT count(*) FROM fired").fetchone() == (2000,)


def test_the_default_keeps_the_fingerprint_of_specs_stored_before_the_option_existed() -> None:
    spec = BackfillSpec("fill", "items", VALUES)
    stored_before = {k: v for k, v in spec.to_dict().items() if k != "skip_unchanged"}

    assert BackfillSpec.from_dict(stored_before) == spec
    assert BackfillSpec.from_dict(stored_before).fingerprint() == spec.fingerprint()
    assert spec.with_changes(skip_unchanged=False).fingerprint() != spec.fingerprint()
    with pytest.raises(backfill.SpecError, match="skip_unchanged must be True or False"):
        BackfillSpec("fill", "items", VALUES, skip_unchanged="no")  # type: ignore[arg-type]


def test_cli_add_stores_no_skip_unchanged(items: psycopg.Connection[Any], db_url: str) -> None:
    result = CliRunner().invoke(
        cli, ["--url", db_url, "add", "fill", "--table", "items", "--set", "doubled=a * 2", "--no-skip-unchanged"]
    )
    assert result.exit_code == 0, result.output

    assert backfill.get_backfill(db_url, "fill").spec.skip_unchanged is False
