"""Smaller holes: a % in the control schema's name, numbers too large for PostgreSQL refused up front (exit 2,
nothing written), and the CLI's --application-name reaching the runner's connections."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from support import make_items

import backfill
from backfill import BackfillSpec, RunOutcome, RunSettings, SettingsError, SpecError
from backfill.cli import EXIT_OK, EXIT_USAGE, cli

pytestmark = pytest.mark.usefixtures("no_ambient_database")


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    return make_items(conn, 300, "n integer NOT NULL DEFAULT 0, label text")


def invoke(url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--url", url, *args], catch_exceptions=False)


@pytest.mark.parametrize("schema", ["ops%s", "50% done", "%(name)s"])
def test_a_percent_sign_in_the_control_schema_name_is_a_name(
    items: psycopg.Connection[Any], db_url: str, schema: str
) -> None:
    spec = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100)

    backfill.init_control_tables(db_url, control_schema=schema)
    first = backfill.run_backfill(db_url, spec, control_schema=schema, max_batches=1)
    backfill.pause_backfill(db_url, "inc", control_schema=schema)
    backfill.resume_backfill(db_url, "inc", control_schema=schema)
    second = backfill.run_backfill(db_url, "inc", control_schema=schema, workers=2)
    status = invoke(db_url, "--control-schema", schema, "status", "inc")

    assert (first.outcome, second.outcome) == (RunOutcome.WORK_LEFT, RunOutcome.FINISHED)
    assert status.exit_code == EXIT_OK, status.output
    assert [s.record.rows_updated for s in backfill.backfill_status(db_url, control_schema=schema)] == [300]
    assert items.execute("SELECT count(*) FROM items WHERE n = 1").fetchone() == (300,)


HUGE = "99999999999999999999"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "inc", "--table", "items", "--set", "n=n + 1", "--batch-size", HUGE], "at most 1,000,000,000"),
        (["run", "inc", "--batch-size", HUGE], "at most 1,000,000,000"),
        (["run", "inc", "--max-batch-size", "2000000000"], "at most 1,000,000,000"),
        (["run", "inc", "--lock-timeout", "30d"], "PostgreSQL's limit"),
        (["run", "inc", "--statement-timeout", "100000h"], "PostgreSQL's limit"),
        (["run", "inc", "--workers", "5000"], "at most 1,000"),
    ],
)
def test_numbers_postgresql_cannot_take_are_refused_before_anything_runs(
    items: psycopg.Connection[Any], db_url: str, args: list[str], message: str
) -> None:
    if args[0] == "run":
        backfill.register_backfill(db_url, BackfillSpec("inc", "items", {"n": "n + 1"}))

    result = invoke(db_url, *args)

    assert result.exit_code == EXIT_USAGE, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert items.execute("SELECT sum(n) FROM items").fetchone() == (0,)
    if args[0] == "add":
        assert items.execute("SELECT to_regclass('public.backfills')").fetchone() == (None,)


def test_the_api_refuses_the_same_numbers() -> None:
    with pytest.raises(SpecError, match="batch_size must be at most 1,000,000,000"):
        BackfillSpec("b", "items", {"n": "1"}, batch_size=10**20)
    with pytest.raises(SettingsError, match="batch_size must be at most"):
        RunSettings(batch_size=10**20)
    with pytest.raises(SettingsError, match="lock_timeout must be at most 2,147,483 seconds"):
        RunSettings(lock_timeout=10**7)


def test_the_cli_application_name_reaches_the_runner(items: psycopg.Connection[Any], db_url: str) -> None:
    added = invoke(db_url, "add", "tag", "--table", "items", "--set", "label=current_setting('application_name')")
    ran = invoke(db_url, "run", "tag", "--application-name", "nightly-fill")

    assert (added.exit_code, ran.exit_code) == (EXIT_OK, EXIT_OK), ran.output
    assert items.execute("SELECT label, count(*) FROM items GROUP BY label").fetchall() == [("nightly-fill", 300)]
