"""A column type change through ``alembic upgrade``, SIGKILLed after each of its steps in turn (every DDL step of
start and finish, every batch of the copy) and run again each time, while the application writes: it ends in the
same catalog as an uninterrupted upgrade, with no application error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from conftest import server_version
from support import StepKiller, wait_for
from test_alembic_ops import alembic_config, make_project, scalar
from test_type_change import APP_INSERT, APP_UPDATE, PARENT_CHILD
from test_type_change_carry import catalog

from backfill.schema.notnull import PG18
from backfill.tools.appsim import AppSimulator

TABLES = "\n".join(
    f"op.execute({statement!r})"
    for statement in (*PARENT_CHILD, "ALTER TABLE accounts ADD CONSTRAINT accounts_id_positive CHECK (id > 0)")
)
START = """
import backfill
op.start_column_type_change("accounts", "id", "bigint", settings=backfill.RunSettings(batch_size=1000))
"""
FINISH = 'op.finish_column_type_change("accounts", "id")'

#: The steps of the change after its copy, in order, as the runs were killed after them (PostgreSQL 18 proves NOT
#: NULL with a NOT NULL constraint, earlier versions with a CHECK, SET NOT NULL and the CHECK dropped).
AFTER_THE_COPY = [
    ("add", "accounts_id_positive_tc"),
    ("validate", "accounts_id_positive_tc"),
    ("create_index", "accounts_id_email_idx_tc"),
    ("create_index", "accounts_pkey_tc"),
    ("add", "payments_account_id_fkey_tc"),
    ("validate", "payments_account_id_fkey_tc"),
    ("swap", "id"),
]


def _others(conn: psycopg.Connection[Any], kept: set[int]) -> list[int]:
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend'"
    ).fetchall()
    return [pid for (pid,) in rows if pid not in kept]


def test_start_and_finish_killed_after_each_step_then_run_again_end_as_an_uninterrupted_upgrade(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str, second_db: str
) -> None:
    project = make_project(tmp_path, TABLES, START, FINISH)
    command.upgrade(alembic_config(second_db, project), "head")
    with psycopg.connect(second_db, autocommit=True) as uninterrupted:
        expected = (catalog(uninterrupted, "accounts"), catalog(uninterrupted, "payments"))
    command.upgrade(alembic_config(db_url, project), "0001")
    killed_after: list[tuple[str, str | None]] = []

    with AppSimulator(db_url, update_sql=APP_UPDATE, insert_sql=APP_INSERT, key_range=(1, 6000), seed=7) as app:
        app.wait_until_writing()
        kept = {int(pid) for pid in _others(conn, set())}
        killer = StepKiller(project, db_url, tmp_path / "upgrade.log")
        try:
            while (step := killer.run()) is not None:
                killed_after.append(step)
                # The killed run's sessions end once the server sees their sockets closed (at a step boundary
                # none waits for a lock): until then its claim on the copy would make the next run wait.
                wait_for(lambda: not _others(conn, kept), "the killed run's sessions to end")
        finally:
            killer.close()
        stats = app.stop()

    assert stats.errors == 0, stats.last_error
    assert stats.writes > 50
    assert (catalog(conn, "accounts"), catalog(conn, "payments")) == expected
    actions = [action for action, _ in killed_after]
    assert actions[:3] == ["add_shadow_column", "create_sync_function", "create_sync_trigger"]
    batches = actions.index("add") - 3
    assert batches >= 3 and set(actions[3 : 3 + batches]) == {"batch_committed"}
    not_null = ["add", "validate"] + (["set_not_null", "drop_check"] if server_version(conn) < PG18 else [])
    assert killed_after[3 + batches : -len(AFTER_THE_COPY)] == [(action, "id_new") for action in not_null]
    assert killed_after[-len(AFTER_THE_COPY) :] == AFTER_THE_COPY
    assert scalar(conn, "SELECT version_num FROM alembic_version") == "0003"
