"""Offline mode (``alembic upgrade --sql``): DDL renders with its SET lock_timeout outside the migration's
transaction, a backfill renders as a batched DO block, and the example's whole script runs with psql to the same
schema and data as the online upgrade."""

from __future__ import annotations

import io
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from psycopg import sql
from sqlalchemy.dialects.postgresql import JSONB
from test_alembic_ops import alembic_config

from backfill import BackfillSpec, RunSettings
from backfill.alembic import offline as offline_sql
from backfill.tools.embedded import find_bindir

CONTROL_TABLES = ("backfills", "backfill_slices", "backfill_meta", "backfill_batches")


def offline() -> tuple[Operations, io.StringIO]:
    """Operations that write SQL to a buffer, as ``alembic upgrade --sql`` does (no database)."""
    buffer = io.StringIO()
    context = MigrationContext.configure(
        dialect_name="postgresql", opts={"as_sql": True, "output_buffer": buffer, "literal_binds": True}
    )
    return Operations(context), buffer


def statements(buffer: io.StringIO) -> list[str]:
    return [part.strip() for part in buffer.getvalue().split(";\n\n") if part.strip()]


# --- rendering, without a database -----------------------------------------------------------------------------------


def test_add_not_null_renders_the_check_path_outside_the_transaction_with_its_lock_timeout() -> None:
    op, buffer = offline()

    op.add_not_null_constraint("events", "kind", lock_timeout=1.5)

    assert statements(buffer) == [
        "COMMIT",
        "SET lock_timeout = '1500ms'",
        'ALTER TABLE "events" ADD CONSTRAINT "events_kind_not_null_check" CHECK ("kind" IS NOT NULL) NOT VALID',
        "RESET lock_timeout",
        'ALTER TABLE "events" VALIDATE CONSTRAINT "events_kind_not_null_check"',
        "SET lock_timeout = '1500ms'",
        'ALTER TABLE "events" ALTER COLUMN "kind" SET NOT NULL',
        'ALTER TABLE "events" DROP CONSTRAINT "events_kind_not_null_check"',
        "RESET lock_timeout",
        "BEGIN",
    ]


def test_validate_false_then_validate_render_the_two_halves() -> None:
    op, buffer = offline()

    op.add_not_null_constraint("events", "kind", schema="app", name="kind_required", validate=False)
    op.validate_not_null_constraint("events", "kind", schema="app", name="kind_required")

    assert statements(buffer) == [
        "COMMIT",
        "SET lock_timeout = '2000ms'",
        'ALTER TABLE "app"."events" ADD CONSTRAINT "kind_required" CHECK ("kind" IS NOT NULL) NOT VALID',
        "RESET lock_timeout",
        "BEGIN",
        "COMMIT",
        'ALTER TABLE "app"."events" VALIDATE CONSTRAINT "kind_required"',
        "SET lock_timeout = '2000ms'",
        'ALTER TABLE "app"."events" ALTER COLUMN "kind" SET NOT NULL',
        'ALTER TABLE "app"."events" DROP CONSTRAINT "kind_required"',
        "RESET lock_timeout",
        "BEGIN",
    ]


def test_drop_not_null_renders_both_drops_whatever_stage_was_reached() -> None:
    op, buffer = offline()

    op.drop_not_null_constraint("events", "kind")

    assert statements(buffer) == [
        "COMMIT",
        "SET lock_timeout = '2000ms'",
        'ALTER TABLE "events" DROP CONSTRAINT IF EXISTS "events_kind_not_null_check"',
        'ALTER TABLE "events" ALTER COLUMN "kind" DROP NOT NULL',
        "RESET lock_timeout",
        "BEGIN",
    ]


def test_a_backfill_renders_as_a_do_block_committing_each_batch_outside_the_transaction() -> None:
    op, buffer = offline()

    op.backfill(
        "events_fill_kind",
        "events",
        {"kind": sa.func.coalesce(sa.column("payload", JSONB)["kind"].astext, "unknown")},
        where="kind IS NULL",
        key="id",
        batch_size=500,
    )

    rendered = statements(buffer)
    assert rendered[0] == "COMMIT"
    assert rendered[1].startswith("-- backfill events_fill_kind: 500 rows per transaction")
    assert rendered[1].splitlines()[-1] == "$backfill$"
    assert rendered[2] == "BEGIN"
    script = rendered[1]
    assert "\n      COMMIT;\n" in script  # one per batch, inside the loop over slices
    assert "USING up_1, 500 - 1" in script
    # The same batch statements the runner uses, with positional parameters and the key type filled in at run time.
    assert (
        """'UPDATE "public"."events" SET "kind" = (coalesce(payload ->> ''kind'', ''unknown'')) """
        """WHERE "id" > CAST($1 AS __backfill_key_type_1__) AND "id" <= CAST($2 AS __backfill_key_type_1__) """
        """AND (kind IS NULL) """
        """AND ("kind"::text IS DISTINCT FROM (coalesce(payload ->> ''kind'', ''unknown''))::text)'"""
    ) in script


def test_ensure_backfill_finished_renders_a_gate_on_the_control_table() -> None:
    op, buffer = offline()

    op.ensure_backfill_finished("events_fill_kind")

    (gate,) = statements(buffer)
    assert gate.startswith("DO $gate$")
    assert "WHERE name = 'events_fill_kind' AND state <> 'succeeded'" in gate


# --- running the rendered SQL ------------------------------------------------------------------------------------


def offline_script(config: Config, path: Path, revision: str = "head", *, downgrade: bool = False) -> Path:
    """Write to ``path`` the SQL script that ``alembic upgrade REVISION --sql`` (or ``downgrade``) prints for
    ``config``, as an operator would hand it to psql."""
    buffer = io.StringIO()
    config.output_buffer = buffer
    (command.downgrade if downgrade else command.upgrade)(config, revision, sql=True)
    path.write_text(buffer.getvalue())
    return path


def psql(url: str, script: Path) -> subprocess.CompletedProcess[str]:
    binary = find_bindir(os.environ.get("BACKFILL_TEST_PG_BIN") or None) / "psql"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(  # noqa: S603
        [str(binary), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(script)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def snapshot(url: str) -> dict[str, Any]:
    """Schema and data of the database, the control tables left out (only an online run has them)."""
    with psycopg.connect(url) as conn:
        columns = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_schema = 'public' AND NOT table_name = ANY(%s) ORDER BY 1, 2",
            (list(CONTROL_TABLES),),
        ).fetchall()
        constraints = conn.execute(
            "SELECT conrelid::regclass::text, conname, contype::text, convalidated FROM pg_constraint "
            "WHERE connamespace = 'public'::regnamespace AND NOT conrelid::regclass::text = ANY(%s) ORDER BY 1, 2",
            (list(CONTROL_TABLES),),
        ).fetchall()
        version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        events = conn.execute(
            "SELECT count(*), md5(string_agg(id || ':' || payload::text || ':' || kind, ',' ORDER BY id)) FROM events"
        ).fetchone()
    return {"columns": columns, "constraints": constraints, "version": version, "events": events}


def test_the_example_offline_script_runs_in_psql_to_the_same_schema_and_data_as_online(
    tmp_path: Path, db_url: str, second_db: str
) -> None:
    script = offline_script(alembic_config(db_url), tmp_path / "upgrade.sql")

    ran = psql(db_url, script)
    command.upgrade(alembic_config(second_db), "head")

    assert ran.returncode == 0, ran.stderr
    assert "backfill events_fill_kind: 20000 rows updated in 10 batches" in ran.stderr
    offline_result, online_result = snapshot(db_url), snapshot(second_db)
    assert offline_result == online_result
    assert offline_result["version"] == [("0009",)]
    assert ("events", "kind", "text", "NO") in offline_result["columns"]


def _table(conn: psycopg.Connection[Any]) -> None:
    conn.execute('CREATE TABLE "Odd%Items" (tenant integer, "seq no" text, n integer NOT NULL DEFAULT 0, note text)')
    conn.execute('ALTER TABLE "Odd%Items" ADD PRIMARY KEY (tenant, "seq no")')
    conn.execute(
        'INSERT INTO "Odd%%Items" (tenant, "seq no") SELECT t, s::text FROM generate_series(1, 5) t, '
        "generate_series(1, 300) s",
        (),
    )


def _script(batch_size: int, lock_timeout: float = 2.0) -> sql.Composed:
    spec = BackfillSpec(
        name="odd",
        schema="public",
        table="Odd%Items",
        key=("tenant", "seq no"),
        values={"n": "n + 1", "note": "'it''s 100% ' || \"seq no\""},
        where="\"seq no\" LIKE '1%'",
        batch_size=batch_size,
    )
    return offline_sql.batched_script(spec, RunSettings(lock_timeout=lock_timeout))


def test_the_batched_script_walks_a_composite_key_once_with_quotes_and_percent_signs(
    conn: psycopg.Connection[Any],
) -> None:
    _table(conn)
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))

    conn.execute(_script(batch_size=64))

    matching = 5 * len([s for s in range(1, 301) if str(s).startswith("1")])
    counts = dict(conn.execute('SELECT n, count(*) FROM "Odd%%Items" GROUP BY n', ()).fetchall())
    assert counts == {1: matching, 0: 1500 - matching}
    assert conn.execute(
        "SELECT DISTINCT note LIKE 'it''s 100%% %%' FROM \"Odd%%Items\" WHERE n = 1", ()
    ).fetchall() == [(True,)]
    assert notices == [f"backfill odd: {matching} rows updated in {-(-1500 // 64)} batches"]


def test_the_batched_script_on_an_empty_table_does_nothing(conn: psycopg.Connection[Any]) -> None:
    conn.execute('CREATE TABLE "Odd%Items" (tenant integer, "seq no" text, n integer, note text)')
    conn.execute('ALTER TABLE "Odd%Items" ADD PRIMARY KEY (tenant, "seq no")')
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))

    conn.execute(_script(batch_size=10))

    assert notices == ["backfill odd: the table is empty"]


def test_the_batched_script_retries_a_batch_that_meets_a_lock_timeout(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    """A row of the first batch stays locked by another transaction until the script's batch has timed out on it
    twice; the script backs off, retries, and finishes with every row updated once."""
    _table(conn)
    holder = psycopg.connect(db_url)
    holder.execute('SELECT 1 FROM "Odd%%Items" WHERE tenant = 1 AND "seq no" = \'1\' FOR UPDATE', ())

    def release_after_two_timeouts() -> None:
        with psycopg.connect(db_url, autocommit=True) as watcher:
            waits, was_waiting = 0, False
            deadline = time.monotonic() + 60
            while waits < 2 and time.monotonic() < deadline:
                row = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'DO %%'", ()
                ).fetchone()
                waiting = bool(row and row[0])
                waits += waiting and not was_waiting
                was_waiting = waiting
                time.sleep(0.01)
        holder.commit()

    releaser = threading.Thread(target=release_after_two_timeouts, daemon=True)
    releaser.start()
    try:
        conn.execute(_script(batch_size=100, lock_timeout=0.2))
    finally:
        releaser.join(60)
        holder.close()

    matching = 5 * len([s for s in range(1, 301) if str(s).startswith("1")])
    assert dict(conn.execute('SELECT n, count(*) FROM "Odd%%Items" GROUP BY n', ()).fetchall()) == {
        1: matching,
        0: 1500 - matching,
    }
