"""One broken backfill does not stop the others: ``run --all`` (and ``api.run_backfills``) marks a backfill whose
spec no longer fits its table failed, with the reason stored, runs the rest, and exits with the worst outcome's
code. The whole run works on one connection, not several per backfill."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import structlog
from click.testing import CliRunner

import backfill
from backfill import BackfillSpec, RunOutcome, RunState
from backfill.api import run_backfills
from backfill.cli import EXIT_FAILED, EXIT_USAGE, cli
from backfill.pg.connect import Database


@pytest.fixture
def three(conn: psycopg.Connection[Any], db_url: str) -> psycopg.Connection[Any]:
    """Backfills a, b and c (registered in that order) on tables a, b and c; b's table is then dropped."""
    for table in ("a", "b", "c"):
        conn.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
        conn.execute(f"INSERT INTO {table} (id) SELECT generate_series(1, 500)")
        backfill.register_backfill(db_url, BackfillSpec(table, table, {"n": "n + 1"}, batch_size=100))
    conn.execute("DROP TABLE b")
    return conn


def done(conn: psycopg.Connection[Any], table: str) -> list[tuple[int, int]]:
    return conn.execute(f"SELECT n, count(*) FROM {table} GROUP BY n").fetchall()


def test_run_all_stores_the_error_on_the_broken_backfill_and_runs_the_others(
    three: psycopg.Connection[Any], db_url: str
) -> None:
    result = CliRunner().invoke(cli, ["--url", db_url, "--log-format", "json", "run", "--all"])
    structlog.reset_defaults()

    assert result.exit_code == EXIT_FAILED
    assert done(three, "a") == done(three, "c") == [(1, 500)]
    broken = backfill.get_backfill(db_url, "b")
    assert broken.state is RunState.FAILED
    assert broken.last_error == "table public.b does not exist"
    assert {r.name: r.state for r in backfill.list_backfills(db_url)} == {
        "a": RunState.SUCCEEDED,
        "b": RunState.FAILED,
        "c": RunState.SUCCEEDED,
    }
    # The next cron run leaves the failed one alone until someone fixes it and runs `backfill retry b`.
    again = CliRunner().invoke(cli, ["--url", db_url, "run", "--all"])
    structlog.reset_defaults()
    assert again.exit_code == 0


def test_naming_the_broken_one_stores_the_error_too(three: psycopg.Connection[Any], db_url: str) -> None:
    result = CliRunner().invoke(cli, ["--url", db_url, "run", "b", "c"])
    structlog.reset_defaults()

    assert result.exit_code == EXIT_FAILED
    assert done(three, "c") == [(1, 500)]
    assert backfill.get_backfill(db_url, "b").state is RunState.FAILED


def test_an_unknown_name_is_still_bad_input_and_nothing_runs(three: psycopg.Connection[Any], db_url: str) -> None:
    result = CliRunner().invoke(cli, ["--url", db_url, "run", "a", "nope"])
    structlog.reset_defaults()

    assert result.exit_code == EXIT_USAGE
    assert "no backfill named 'nope'" in result.stderr
    assert done(three, "a") == [(0, 500)]


def test_run_backfills_shares_one_budget_and_one_connection(
    three: psycopg.Connection[Any], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[int] = []
    connect = Database.connect

    def counting(self: Database, *args: Any, **kwargs: Any) -> psycopg.Connection[Any]:
        opened.append(1)
        return connect(self, *args, **kwargs)

    monkeypatch.setattr(Database, "connect", counting)

    report = run_backfills(db_url, max_batches=7)

    assert [(r.name, r.outcome) for r in report.reports] == [
        ("a", RunOutcome.FINISHED),
        ("b", RunOutcome.FAILED),
        ("c", RunOutcome.WORK_LEFT),
    ]
    assert sum(r.batches for r in report.reports) == 7  # 5 for a, none for b, 2 for c
    assert report.not_run == ()
    assert len(opened) == 1


def test_a_budget_spent_before_a_backfill_leaves_it_not_run(three: psycopg.Connection[Any], db_url: str) -> None:
    report = run_backfills(db_url, ["a", "c"], max_batches=5)

    assert [r.name for r in report.reports] == ["a"]
    assert report.not_run == ("c",)
    assert done(three, "c") == [(0, 500)]


def test_a_backfill_whose_table_is_locked_is_left_for_the_next_run_not_failed(
    three: psycopg.Connection[Any], db_url: str
) -> None:
    with psycopg.connect(db_url) as holder:
        holder.execute("LOCK TABLE a IN ACCESS EXCLUSIVE MODE")  # a schema change holding the table
        report = run_backfills(db_url, ["a", "c"])

    assert [(r.name, r.outcome) for r in report.reports] == [("a", RunOutcome.BUSY), ("c", RunOutcome.FINISHED)]
    assert report.reports[0].reason is not None and "could not lock the table" in report.reports[0].reason
    assert backfill.get_backfill(db_url, "a").state is RunState.PENDING
    assert done(three, "a") == [(0, 500)]
