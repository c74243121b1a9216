"""Slice claims only privileged roles can make or hold: a role with no privilege on the control tables cannot make a
runner stop or report busy, whatever locks it takes; who holds a claim is named; a claim that moves to another
backend under the same connection (a pooler in transaction mode) is refused."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import structlog
from click.testing import CliRunner
from psycopg import sql
from sqlalchemy.engine import make_url
from support import make_items

import backfill
from backfill import BackfillSpec, RunSettings
from backfill.cli import EXIT_OK, EXIT_WORK_LEFT, cli
from backfill.pg.connect import Database
from backfill.pg.store import PostgresStore

SPEC = BackfillSpec("fill", "items", {"n": "id * 2"}, batch_size=100)


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    return make_items(conn, 1000, "n integer")


@pytest.fixture
def low_url(conn: psycopg.Connection[Any], db_url: str) -> Iterator[str]:
    """A login role with no privilege at all on the control tables."""
    name = f"low_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    yield make_url(db_url).set(username=name).render_as_string(hide_password=False)
    conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _filled(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM items WHERE n = id * 2").fetchone()
    return int(row[0]) if row else 0


def test_a_role_without_privileges_cannot_make_a_runner_busy(
    items: psycopg.Connection[Any], db_url: str, low_url: str
) -> None:
    backfill.register_backfill(db_url, SPEC)
    backfill.run_backfill(db_url, "fill", max_batches=1, slices=4)
    with psycopg.connect(low_url, autocommit=True) as squatter:
        # Every advisory lock key anyone can compute for the first backfills and slices, held for the whole run.
        squatter.execute(
            """SELECT pg_advisory_lock(hashtextextended('backfill:public:' || b || ':' || s, 0)),
                      pg_advisory_lock(b, s)
                 FROM generate_series(1, 20) b, generate_series(0, 15) s"""
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            squatter.execute("UPDATE backfill_slices SET owner = 'me'")

        report = backfill.run_backfill(db_url, "fill", workers=2)

        assert "finished" == report.outcome.value
        assert 1000 == _filled(items)


def test_busy_names_who_holds_the_claim(items: psycopg.Connection[Any], db_url: str) -> None:
    backfill.register_backfill(db_url, SPEC)
    backfill.run_backfill(db_url, "fill", max_batches=1)
    record = backfill.get_backfill(db_url, "fill")
    with PostgresStore(Database.from_bind(db_url, "night-shift")) as holder:
        assert holder.try_claim(record.id, 0)
        pid = holder.conn.info.backend_pid

        with structlog.testing.capture_logs() as logs:
            report = backfill.run_backfill(db_url, "fill")
        assert "busy" == report.outcome.value
        expected = f"pid {pid}, role postgres, application night-shift"
        assert report.reason is not None and expected in report.reason
        assert any(expected in str(event.get("reason")) for event in logs if event["event"] == "run_finished")

        [piece] = backfill.get_slices(db_url, "fill")
        assert expected == piece.holder
        shown = CliRunner().invoke(cli, ["--url", db_url, "status"], env={"DATABASE_URL": None})
        assert EXIT_OK == shown.exit_code, shown.output
        assert f"held by {expected}" in shown.stdout
        as_json = CliRunner().invoke(cli, ["--url", db_url, "status", "--json"], env={"DATABASE_URL": None})
        assert expected in as_json.stdout
        ran = CliRunner().invoke(cli, ["--url", db_url, "run", "fill"], env={"DATABASE_URL": None})
        assert EXIT_WORK_LEFT == ran.exit_code

    # The holder's session ended: its claim counts for nothing and the next runner takes the slice over.
    assert "finished" == backfill.run_backfill(db_url, "fill").outcome.value
    assert [None] == [piece.holder for piece in backfill.get_slices(db_url, "fill")]


def test_a_claim_that_moves_to_another_backend_is_refused_as_a_pooler(
    items: psycopg.Connection[Any], db_url: str
) -> None:
    """What PgBouncer in transaction mode does: the next transaction of the same client connection runs on
    another server backend. The test moves the claim to another live backend between two batches."""
    backfill.register_backfill(db_url, SPEC)
    other_pid = items.info.backend_pid

    def pooler(ctx: Any) -> float:
        if ctx.batches == 2:
            items.execute("UPDATE backfill_slices SET claim_pid = %s", (other_pid,))
        return 0.0

    report = backfill.run_backfill(db_url, "fill", settings=RunSettings(throttle=pooler))

    assert "failed" == report.outcome.value
    assert report.error is not None and "connection pooler in transaction mode" in report.error
    assert 200 == _filled(items)
