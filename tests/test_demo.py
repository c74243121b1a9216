"""The demo end to end on a small table, on the test server through --url; and it never touches what it did not
create."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import psycopg
import pytest
import structlog
from click.testing import CliRunner

from backfill.cli import EXIT_OK, EXIT_USAGE, cli
from backfill.tools.demo import DEMO_SCHEMA, run_demo

#: Large enough that the plain UPDATE holds its row locks several times longer than one online batch (the first
#: batch is 10,000 rows): at 20,000 rows both stalls are about the same.
ROWS = 60_000


def _schema_exists(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", (DEMO_SCHEMA,)).fetchone()
    return bool(row and row[0])


def _number(report: str, label: str) -> tuple[float, float]:
    """The two measured columns of one report row."""
    match = re.search(rf"^\s+{re.escape(label)}\s+([\d,.]+)\s+([\d,.]+)$", report, re.MULTILINE)
    assert match, f"no row {label!r} in:\n{report}"
    first, second = (float(group.replace(",", "")) for group in match.groups())
    return first, second


def test_the_demo_changes_every_row_under_load_reports_both_ways_and_cleans_up(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "backfill.cli", "--url", db_url, "demo", "--rows", str(ROWS)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )

    assert EXIT_OK == result.returncode, result.stdout + result.stderr
    report = result.stdout
    changed_online, changed_plain = _number(report, "rows changed")
    # Old code's updates of rows the backfill had not reached yet had them filled by the keep_in_sync trigger, so
    # the backfill itself changes fewer; every row ends up with the backfill's value whoever wrote it.
    assert changed_online > 0
    assert "rows unlike the backfill's value: 0." in report
    assert re.search(r"keep_in_sync trigger filled: [1-9][\d,]*;", report)
    assert ROWS == changed_plain
    online_writes, plain_writes = _number(report, "app writes done")
    assert online_writes > 0 and plain_writes > 0
    # The demo's claim: the application's longest stall is shorter during the online change than during the plain
    # UPDATE, and it never saw an error; the column ends NOT NULL with no NULL left.
    stall_online, stall_plain = _number(report, "app longest stall, ms")
    assert 0 < stall_online < stall_plain
    assert (0, 0) == _number(report, "app errors")
    assert re.search(r"^\s+new code errors\s+0\s+-$", report, re.MULTILINE)
    assert "NULLs left in events.kind: 0; NOT NULL: yes;" in report
    assert re.search(r"longest write stall was [\d,]+ ms during the online change", report)
    assert "batch_committed" in result.stderr  # the backfill's progress, as JSON lines off a terminal
    assert not _schema_exists(conn)


def test_the_demo_refuses_a_schema_it_did_not_create_and_leaves_it_alone(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    conn.execute(f"CREATE SCHEMA {DEMO_SCHEMA}")
    conn.execute(f"CREATE TABLE {DEMO_SCHEMA}.precious (id int)")

    try:
        result = CliRunner().invoke(cli, ["--url", db_url, "demo", "--rows", "100"], catch_exceptions=False)
    finally:
        structlog.reset_defaults()

    assert EXIT_USAGE == result.exit_code
    assert f"schema '{DEMO_SCHEMA}' already exists" in result.stderr
    assert 1 == len(result.stderr.strip().splitlines())
    assert conn.execute(f"SELECT to_regclass('{DEMO_SCHEMA}.precious') IS NOT NULL").fetchone() == (True,)


def test_the_demo_with_serve_shows_its_backfill_on_the_dashboard_while_it_runs(db_url: str) -> None:
    seen: dict[str, str] = {}
    address: list[str] = []

    def echo(line: str) -> None:
        if found := re.search(r"dashboard \(read-only\) on (http://\S+/),", line):
            address.append(found.group(1))
        if line.startswith("phase 2: backfill run"):  # registered, about to run: read the page and the metrics now
            for path in ("", "metrics"):
                with urllib.request.urlopen(address[0] + path, timeout=30) as response:  # noqa: S310 -- 127.0.0.1
                    seen[path] = response.read().decode()

    assert run_demo(db_url, rows=5_000, writers=1, echo=echo, serve=("127.0.0.1", 0)) == EXIT_OK
    assert 'data-backfill="events_kind"' in seen[""] and "Read-only" in seen[""]
    assert 'backfill_state{backfill="events_kind",state="pending"} 1.0' in seen["metrics"]
    with pytest.raises(urllib.error.URLError):  # the dashboard stopped with the demo
        urllib.request.urlopen(address[0], timeout=5)  # noqa: S310
