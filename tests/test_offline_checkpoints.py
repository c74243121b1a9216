"""The offline backfill script keeps its checkpoint in the control tables like the runner: killed and run again it
continues and never repeats a batch; it finds the primary key itself; the runner and the script can take over from
each other; and its pacing settings are rendered."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import kill_after_batches, make_items
from test_alembic_ops import operations, scalar
from test_offline import offline, psql, statements

import backfill
from backfill.tools.embedded import find_bindir

ROWS = 3_000


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    return make_items(conn, ROWS)


def render(tmp_path: Path, **settings: Any) -> Path:
    """``op.backfill`` without key=, rendered as ``alembic upgrade --sql`` does, into a file for psql."""
    op, buffer = offline()
    op.backfill(
        "items_inc",
        "items",
        {"n": "n + 1"},
        batch_size=50,
        settings=backfill.RunSettings(**settings) if settings else None,
    )
    script = tmp_path / "backfill.sql"
    script.write_text(";\n\n".join(statements(buffer)) + ";\n")
    return script


def counts(conn: psycopg.Connection[Any]) -> dict[int, int]:
    return dict(conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall())


def test_the_script_finds_the_primary_key_records_its_progress_and_a_second_run_does_nothing(
    tmp_path: Path, items: psycopg.Connection[Any], db_url: str
) -> None:
    script = render(tmp_path)

    first = psql(db_url, script)
    second = psql(db_url, script)

    assert first.returncode == 0, first.stderr
    assert f"backfill items_inc: {ROWS} rows updated in {ROWS // 50} batches" in first.stderr
    assert second.returncode == 0, second.stderr
    assert "backfill items_inc: finished before, nothing to do" in second.stderr
    assert counts(items) == {1: ROWS}
    record = backfill.get_backfill(db_url, "items_inc")
    assert (record.state, record.rows_updated, record.batches) == (backfill.RunState.SUCCEEDED, ROWS, ROWS // 50)
    assert record.spec.key == ("id",)
    # The same spec online: the fingerprints agree, so the op finds it finished instead of a mismatch.
    with operations(db_url) as op:
        report = op.backfill("items_inc", "items", {"n": "n + 1"}, batch_size=50)
    assert report is not None and report.finished and report.batches == 0


def psql_process(url: str, script: Path) -> subprocess.Popen[str]:
    binary = find_bindir(os.environ.get("BACKFILL_TEST_PG_BIN") or None) / "psql"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.Popen(  # noqa: S603
        [str(binary), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(script)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def kill_mid_run(conn: psycopg.Connection[Any], url: str, script: Path) -> None:
    """Run the script with psql and kill it (client and server process) once ten batches have committed."""
    # The script's server process too: killing psql alone leaves its DO block running.
    terminate = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'DO %%backfill%%'"
    kill_after_batches(conn, psql_process(url, script), 10, "psql", lambda: conn.execute(terminate))


def test_a_killed_script_run_again_continues_and_updates_every_row_exactly_once(
    tmp_path: Path, items: psycopg.Connection[Any], db_url: str
) -> None:
    script = render(tmp_path, sleep_between=0.01)
    kill_mid_run(items, db_url, script)
    interrupted = backfill.get_backfill(db_url, "items_inc")
    assert interrupted.state is backfill.RunState.RUNNING
    assert 0 < interrupted.rows_updated < ROWS
    assert counts(items) == {1: interrupted.rows_updated, 0: ROWS - interrupted.rows_updated}

    again = psql(db_url, script)

    assert again.returncode == 0, again.stderr
    assert f"backfill items_inc: {ROWS - interrupted.rows_updated} rows updated" in again.stderr
    assert counts(items) == {1: ROWS}
    finished = backfill.get_backfill(db_url, "items_inc")
    assert (finished.state, finished.rows_updated, finished.batches) == (backfill.RunState.SUCCEEDED, ROWS, ROWS // 50)


def test_the_runner_finishes_what_a_killed_script_started(
    tmp_path: Path, items: psycopg.Connection[Any], db_url: str
) -> None:
    kill_mid_run(items, db_url, render(tmp_path, sleep_between=0.01))

    report = backfill.run_backfill(db_url, "items_inc")

    assert report.finished
    assert counts(items) == {1: ROWS}
    assert backfill.get_backfill(db_url, "items_inc").rows_updated == ROWS


def test_a_composite_primary_key_without_key_is_a_clear_error_and_writes_nothing(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str
) -> None:
    conn.execute("CREATE TABLE items (a integer, b integer, n integer NOT NULL DEFAULT 0, PRIMARY KEY (a, b))")
    conn.execute("INSERT INTO items (a, b) SELECT g, g FROM generate_series(1, 10) g")

    ran = psql(db_url, render(tmp_path))

    assert ran.returncode != 0
    assert 'the primary key of "public"."items" has 2 columns (a, b): pass key= to op.backfill' in ran.stderr
    assert scalar(conn, "SELECT sum(n) FROM items") == 0
    assert scalar(conn, "SELECT to_regclass('backfills') IS NULL")


def test_the_script_leaves_the_include_columns_of_the_primary_key_out_of_the_key(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str
) -> None:
    conn.execute(
        "CREATE TABLE items (id integer, note text, n integer NOT NULL DEFAULT 0, PRIMARY KEY (id) INCLUDE (note))"
    )
    conn.execute("INSERT INTO items (id) SELECT g FROM generate_series(1, 120) g")

    ran = psql(db_url, render(tmp_path))

    assert ran.returncode == 0, ran.stderr
    assert counts(conn) == {1: 120}
    assert backfill.get_backfill(db_url, "items_inc").spec.key == ("id",)


def test_the_script_paces_itself_with_the_sleep_and_the_rate_cap() -> None:
    op, buffer = offline()
    settings = backfill.RunSettings(sleep_between=0.2, max_rows_per_second=500, lock_timeout=1, statement_timeout=9)

    op.backfill("items_inc", "items", {"n": "n + 1"}, settings=settings)

    script = statements(buffer)[1]
    assert "PERFORM pg_catalog.pg_sleep(0.2);" in script
    assert "pg_catalog.pg_sleep(greatest(0, total / 500.0::float8 " in script
    assert "set_config('lock_timeout', '1000ms', true)" in script
    assert "set_config('statement_timeout', '9000ms', true)" in script
