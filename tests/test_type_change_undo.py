"""The downgrades of a column type change on real PostgreSQL: ``alembic downgrade`` through cleanup, finish and
start gives an integer primary key referenced by a foreign key its old type back while the application writes to
both tables; a value beyond the old type refuses the downgrade, changing nothing; each reverse op run twice; a
plain column round trip text -> jsonb -> text; the ``reverse()`` of every op of the family."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from structlog.testing import capture_logs
from support import wait_for
from test_alembic_ops import alembic_config, at_first_revision, make_project, operations, scalar
from test_alembic_schema_ops import _kill, _upgrading, _waiting
from test_alembic_type_change import REVISIONS, shape
from test_offline import offline
from test_type_change import APP_INSERT, APP_UPDATE, PARENT_CHILD, column_type, constraints

import backfill
import backfill.alembic
from backfill.alembic import ops
from backfill.tools.appsim import AppSimulator

#: start, finish and cleanup of accounts.id and payments.account_id, each with its downgrade: finish's written out,
#: cleanup's built by the ops' reverse() as autogenerate would.
UNDOABLE = (
    REVISIONS[0],
    REVISIONS[1],
    (
        REVISIONS[2][0],
        """
        op.unfinish_column_type_change("payments", "account_id")
        op.unfinish_column_type_change("accounts", "id")
        """,
    ),
    (
        """
        op.cleanup_column_type_change("accounts", "id", old_type=sa.Integer())
        op.cleanup_column_type_change("payments", "account_id", old_type="integer")
        """,
        """
        import backfill.alembic
        op.invoke(backfill.alembic.CleanupColumnTypeChangeOp("payments", "account_id", old_type="integer").reverse())
        op.invoke(backfill.alembic.CleanupColumnTypeChangeOp("accounts", "id", old_type=sa.Integer()).reverse())
        """,
    ),
)

#: The accounts that existed before the change, as a digest of their keys and emails.
ACCOUNTS_DIGEST = "SELECT md5(string_agg(id::text || email, ',' ORDER BY id)) FROM accounts WHERE id <= 3000"


DOCS = (
    "CREATE TABLE docs (id serial PRIMARY KEY, payload text NOT NULL)",
    "CREATE INDEX docs_payload_idx ON docs (payload)",
    """INSERT INTO docs (payload) SELECT '{"n": ' || g || '}' FROM generate_series(1, 2000) g""",
)

NOTES = (
    "CREATE TABLE notes (id serial PRIMARY KEY, body jsonb)",
    "INSERT INTO notes (body) SELECT jsonb_build_object('n', g) FROM generate_series(1, 500) g",
)

TAGS = (
    "CREATE TABLE tags (id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY, label text)",
    "INSERT INTO tags (label) SELECT 't' || g FROM generate_series(1, 500) g",
)

#: The records of copies back (none once an undo is done or has given up).
UNDO_RECORDS = "SELECT count(*) FROM backfills WHERE starts_with(name, 'type_change_undo:')"


def user_triggers(conn: psycopg.Connection[Any]) -> int:
    return int(scalar(conn, "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal"))


def test_alembic_downgrade_through_cleanup_finish_and_start_gives_the_integer_key_back_while_the_application_writes(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str
) -> None:
    config = at_first_revision(db_url, make_project(tmp_path, *UNDOABLE))
    before, digest = shape(conn), scalar(conn, ACCOUNTS_DIGEST)
    command.upgrade(config, "head")
    upgraded = (column_type(conn, "accounts", "id"), column_type(conn, "payments", "account_id"))

    with AppSimulator(
        db_url, update_sql=APP_UPDATE, insert_sql=APP_INSERT, key_range=(1, 6000), writers=2, seed=5
    ) as app:
        app.wait_until_writing()
        with capture_logs() as logs:
            command.downgrade(config, "0001")
        stats = app.stop()

    assert upgraded == ("bigint", "bigint")
    assert stats.errors == 0, stats.last_error
    assert stats.writes > 50
    assert column_type(conn, "accounts", "id") == "integer"
    assert column_type(conn, "payments", "account_id") == "integer"
    assert scalar(conn, "SELECT version_num FROM alembic_version") == "0001"
    # The same primary key, foreign key, indexes and columns as before the change, on the integer columns again.
    assert shape(conn) == before
    assert user_triggers(conn) == 0
    assert scalar(conn, "SELECT count(*) FROM backfills") == 0
    assert len([e for e in logs if e["event"] == "ddl_step" and e["action"] == "swap"]) == 2
    # Nothing lost: the old accounts as they were, every payment's account there.
    assert scalar(conn, ACCOUNTS_DIGEST) == digest
    orphans = "SELECT count(*) FROM payments p LEFT JOIN accounts a ON a.id = p.account_id WHERE a.id IS NULL"
    assert scalar(conn, orphans) == 0

    # The sequence is an integer one again and continues; the foreign key is enforced, CASCADE included.
    assert scalar(conn, "SELECT data_type FROM pg_sequences WHERE sequencename = 'accounts_id_seq'") == "integer"
    highest = scalar(conn, "SELECT max(id) FROM accounts")
    key = scalar(conn, "INSERT INTO accounts (email) VALUES ('after@example.com') RETURNING id")
    conn.execute("INSERT INTO payments (account_id, amount) VALUES (%s, 5)", (key,))
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("INSERT INTO payments (account_id, amount) VALUES (%s, 5)", (key + 1000,))
    conn.execute("DELETE FROM accounts WHERE id = %s", (key,))
    assert key > highest
    assert scalar(conn, "SELECT count(*) FROM payments WHERE account_id = %s", (key,)) == 0


def finished(
    conn: psycopg.Connection[Any], url: str, tables: Sequence[str], column: str, new_type: str, using: str | None = None
) -> None:
    """``tables`` made, then the change of ``column`` (``table.column``) started and finished."""
    for statement in tables:
        conn.execute(statement)
    table, column = column.split(".")
    backfill.start_column_type_change(url, table, column, new_type, using=using)
    backfill.finish_column_type_change(url, table, column)


def _untouched(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    return (
        column_type(conn, "accounts", "id"),
        column_type(conn, "accounts", "id_old"),
        scalar(conn, "SELECT count(id_old) FROM accounts"),
        user_triggers(conn),
        scalar(conn, "SELECT count(*) FROM backfills"),
    )


def test_the_downgrade_is_refused_naming_a_row_or_the_sequence_beyond_the_old_type_and_nothing_changes(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    finished(conn, db_url, PARENT_CHILD, "accounts.id", "bigint")
    backfill.cleanup_column_type_change(db_url, "accounts", "id")
    backfill.restore_column_type_change(db_url, "accounts", "id", "integer")
    conn.execute("INSERT INTO accounts (id, email) VALUES (3000000000, 'big@example.com')")

    with pytest.raises(backfill.BackfillError) as by_row:
        backfill.unfinish_column_type_change(db_url, "accounts", "id")
    after_row = _untouched(conn)
    conn.execute("DELETE FROM accounts WHERE id = 3000000000")
    conn.execute("SELECT setval('accounts_id_seq', 2147483648)")
    with pytest.raises(backfill.BackfillError) as by_sequence:
        backfill.unfinish_column_type_change(db_url, "accounts", "id")
    after_sequence = _untouched(conn)
    conn.execute("SELECT setval('accounts_id_seq', 3000)")
    undone = backfill.unfinish_column_type_change(db_url, "accounts", "id")

    for raised in (by_row, by_sequence):
        assert "\n" not in str(raised.value)
        assert str(raised.value).startswith("cannot change public.accounts.id back to integer: ")
        assert str(raised.value).endswith("(nothing was changed)")
    assert "the row (id)=(3000000000) of public.accounts holds id = 3000000000, beyond integer" in str(by_row.value)
    assert (
        "the sequence public.accounts_id_seq of public.accounts.id is at 2147483648, beyond integer's 2147483647"
        in str(by_sequence.value)
    )
    assert after_row == after_sequence == ("bigint", "integer", 0, 0, 0)
    assert "swap" in undone.actions
    assert column_type(conn, "accounts", "id") == "integer"


def test_each_reverse_op_run_twice_does_its_work_once_and_the_change_can_be_made_again(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    for statement in PARENT_CHILD:
        conn.execute(statement)
    with operations(db_url) as op:
        op.start_column_type_change("accounts", "id", "bigint")
        op.finish_column_type_change("accounts", "id")
        late = scalar(conn, "INSERT INTO accounts (email) VALUES ('late@example.com') RETURNING id")
        runs = {
            "unfinish": op.unfinish_column_type_change("accounts", "id"),
            "unfinish again": op.unfinish_column_type_change("accounts", "id"),
        }
        shadow = (column_type(conn, "accounts", "id"), column_type(conn, "accounts", "id_new"))
        runs["finish"] = op.finish_column_type_change("accounts", "id")
        runs["cleanup"] = op.cleanup_column_type_change("accounts", "id")
        runs["restore"] = op.restore_column_type_change("accounts", "id", "integer")
        runs["restore again"] = op.restore_column_type_change("accounts", "id", "integer")
        runs["cleanup after restore"] = op.cleanup_column_type_change("accounts", "id")
        runs["restore once more"] = op.restore_column_type_change("accounts", "id", "integer")
        runs["unfinish after restore"] = op.unfinish_column_type_change("accounts", "id")
        runs["unfinish after restore again"] = op.unfinish_column_type_change("accounts", "id")
        runs["cancel"] = op.cancel_column_type_change("accounts", "id")

    actions = {what: result.actions for what, result in runs.items()}
    assert shadow == ("integer", "bigint")
    assert actions["unfinish"][:2] == ["create_sync_function", "create_sync_trigger"]
    assert actions["unfinish"][-1] == "swap"
    assert actions["unfinish after restore"][:2] == ["create_sync_function", "create_sync_trigger"]
    assert actions["unfinish after restore"][-1] == "swap"
    assert actions["finish"][-1] == "swap"
    assert actions["restore"] == actions["restore once more"] == ["add_shadow_column"]
    assert actions["cleanup"] == actions["cleanup after restore"] == ["drop_old_column"]
    assert actions["unfinish again"] == actions["restore again"] == actions["unfinish after restore again"] == []
    # The first copy back wrote only the row written since the swap; after restore, every row.
    assert runs["unfinish"].copy is not None and runs["unfinish"].copy.rows_updated == 1
    assert runs["unfinish after restore"].copy is not None
    assert runs["unfinish after restore"].copy.rows_updated == 3001
    assert column_type(conn, "accounts", "id") == "integer"
    assert column_type(conn, "accounts", "id_new") is None
    assert scalar(conn, "SELECT email FROM accounts WHERE id = %s", (late,)) == "late@example.com"
    assert user_triggers(conn) == 0
    assert scalar(conn, "SELECT count(*) FROM backfills") == 0


def test_a_plain_column_goes_text_to_jsonb_and_back_keeping_not_null_its_index_and_the_later_writes(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    finished(conn, db_url, DOCS, "docs.payload", "jsonb", using="payload::jsonb")
    backfill.cleanup_column_type_change(db_url, "docs", "payload")
    conn.execute("""UPDATE docs SET payload = '{"n": -5, "b": [1, 2]}' WHERE id = 5""")
    conn.execute("""INSERT INTO docs (payload) VALUES ('{"late": true}')""")

    backfill.restore_column_type_change(db_url, "docs", "payload", "text")
    undone = backfill.unfinish_column_type_change(db_url, "docs", "payload")
    conn.execute("""INSERT INTO docs (payload) VALUES ('{"later": 1}')""")
    mirrored = scalar(conn, "SELECT payload_new->>'later' FROM docs WHERE payload = '{\"later\": 1}'")
    backfill.cancel_column_type_change(db_url, "docs", "payload")

    assert undone.copy is not None and undone.copy.rows_updated == 2001
    assert mirrored == "1"
    assert column_type(conn, "docs", "payload") == "text"
    assert column_type(conn, "docs", "payload_new") is None
    assert scalar(conn, "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'docs'::regclass AND attname = 'payload'")
    assert scalar(conn, "SELECT pg_get_indexdef('docs_payload_idx'::regclass)") == (
        "CREATE INDEX docs_payload_idx ON public.docs USING btree (payload)"
    )
    assert scalar(conn, "SELECT payload FROM docs WHERE id = 5") == '{"b": [1, 2], "n": -5}'
    assert scalar(conn, "SELECT payload FROM docs WHERE id = 1") == '{"n": 1}'
    assert scalar(conn, "SELECT count(*) FROM docs WHERE payload::jsonb->>'late' = 'true'") == 1


def test_every_op_of_the_family_has_a_reverse() -> None:
    finish = ops.FinishColumnTypeChangeOp("accounts", "id", schema="app", lock_timeout=1.0)
    cleanup = ops.CleanupColumnTypeChangeOp("accounts", "id", old_type="integer", lock_retry_seconds=9.0)

    unfinish = finish.reverse()
    restore = cleanup.reverse()
    with pytest.raises(ValueError, match="cannot be reversed without old_type=") as raised:
        ops.CleanupColumnTypeChangeOp("accounts", "id").reverse()

    assert isinstance(unfinish, ops.UnfinishColumnTypeChangeOp)
    assert (unfinish.table, unfinish.column, unfinish.schema, unfinish.lock_timeout) == ("accounts", "id", "app", 1.0)
    assert isinstance(unfinish.reverse(), ops.FinishColumnTypeChangeOp)
    assert isinstance(restore, ops.RestoreColumnTypeChangeOp)
    assert (restore.old_type, restore.lock_retry_seconds) == ("integer", 9.0)
    back = restore.reverse()
    assert isinstance(back, ops.CleanupColumnTypeChangeOp) and back.old_type == "integer"
    assert "\n" not in str(raised.value)
    start = ops.StartColumnTypeChangeOp("events", "payload", "jsonb", using="payload::jsonb", name="doc")
    again = start.reverse().reverse()
    assert isinstance(again, ops.StartColumnTypeChangeOp)
    assert (again.new_type, again.using, again.name) == ("jsonb", "payload::jsonb", "doc")
    with pytest.raises(ValueError, match=r"cancel_column_type_change\('events', 'payload'\) cannot be reversed"):
        ops.CancelColumnTypeChangeOp("events", "payload").reverse()


def test_offline_restore_renders_its_add_column_and_unfinish_says_it_runs_online_only() -> None:
    op, buffer = offline()

    op.restore_column_type_change("events", "payload", "text", lock_timeout=1.5)
    with pytest.raises(backfill.BackfillError) as raised:
        op.unfinish_column_type_change("events", "payload")

    text = buffer.getvalue()
    assert "SET lock_timeout = '1500ms'" in text
    assert 'ALTER TABLE "public"."events" ADD COLUMN IF NOT EXISTS "payload_old" text;' in text
    assert str(raised.value) == (
        "op.unfinish_column_type_change('events', 'payload') cannot run offline (--sql): it runs online only (it "
        "copies rows back and plans its steps from the catalog)"
    )
    assert isinstance(backfill.alembic.unfinish_column_type_change, object)


def test_an_unfinish_killed_while_building_an_index_copy_then_while_waiting_to_swap_back_completes_when_run_again(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str
) -> None:
    """As finish's own kill test, the other way round: an old snapshot holds the concurrent build of the first
    index copy on ``id_old`` back (killed there, an INVALID copy is left), then a reader of the referencing table
    holds the swap back (killed there, nothing is swapped); the third run only swaps."""
    revisions = (
        REVISIONS[0],
        'op.start_column_type_change("accounts", "id", "bigint")\nop.finish_column_type_change("accounts", "id")',
        ('op.unfinish_column_type_change("accounts", "id", lock_timeout=30)', "pass"),
    )
    project = make_project(tmp_path, *revisions)
    command.upgrade(alembic_config(db_url, project), "0002")
    conn.execute("INSERT INTO accounts (email) VALUES ('after-the-swap@example.com')")
    left = []
    # An old snapshot (repeatable read) holds back a concurrent build; any open reader holds back the swap.
    for begin, waits in (("BEGIN ISOLATION LEVEL REPEATABLE READ", "CREATE %INDEX CONCURRENTLY"), ("BEGIN", "DO")):
        with psycopg.connect(db_url, autocommit=True) as holder:
            holder.execute(begin)
            holder.execute("SELECT count(*) FROM payments")
            with _upgrading(project, db_url) as process:
                wait_for(lambda waits=waits: _waiting(conn, waits), f"{waits} to wait for the open transaction")
                _kill(process, conn, _waiting(conn, waits))
        left.append(
            (
                scalar(conn, "SELECT count(*) FROM pg_index WHERE NOT indisvalid"),
                column_type(conn, "accounts", "id"),
                column_type(conn, "accounts", "id_old"),
            )
        )

    with capture_logs() as logs:
        command.upgrade(alembic_config(db_url, project), "head")

    assert left == [(1, "bigint", "integer"), (0, "bigint", "integer")]
    assert [e["action"] for e in logs if e["event"] == "ddl_step"] == ["swap"]
    assert (column_type(conn, "accounts", "id"), column_type(conn, "accounts", "id_new")) == ("integer", "bigint")
    assert scalar(conn, "SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 0
    assert constraints(conn, "accounts") == {"accounts_pkey": "PRIMARY KEY (id)"}
    assert scalar(conn, "SELECT count(*) FROM accounts WHERE id_new IS DISTINCT FROM id") == 0
    assert scalar(conn, UNDO_RECORDS) == 0


def test_a_copy_back_that_fails_on_a_row_drops_its_trigger_so_the_application_goes_on_then_runs_again(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    finished(conn, db_url, NOTES, "notes.body", "text")
    conn.execute("UPDATE notes SET body = 'not json' WHERE id = 42")

    with pytest.raises(backfill.BackfillError) as raised:
        backfill.unfinish_column_type_change(db_url, "notes", "body")
    conn.execute("UPDATE notes SET body = 'still not json' WHERE id = 43")  # no trigger left to fail it
    left = (
        user_triggers(conn),
        scalar(conn, UNDO_RECORDS),
    )
    conn.execute("""UPDATE notes SET body = '{"fixed": true}' WHERE id IN (42, 43)""")
    undone = backfill.unfinish_column_type_change(db_url, "notes", "body")

    message = str(raised.value)
    assert "\n" not in message
    assert "invalid input syntax for type json" in message
    assert message.endswith(
        "nothing was swapped, the copy back and its trigger were dropped ('body_old' stays): fix those rows and run "
        "unfinish_column_type_change again"
    )
    assert left == (0, 0)
    assert undone.actions[-1] == "swap"
    assert column_type(conn, "notes", "body") == "jsonb"
    assert scalar(conn, "SELECT body->>'fixed' FROM notes WHERE id = 43") == "true"
    assert scalar(conn, "SELECT count(*) FROM notes WHERE body::text IS DISTINCT FROM body_new") == 0


def test_an_integer_identity_goes_to_bigint_and_back_and_continues_from_its_next_value(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    finished(conn, db_url, TAGS, "tags.id", "bigint")
    conn.execute("INSERT INTO tags (label) VALUES ('while bigint')")

    backfill.unfinish_column_type_change(db_url, "tags", "id")
    backfill.cancel_column_type_change(db_url, "tags", "id")
    key = scalar(conn, "INSERT INTO tags (label) VALUES ('back') RETURNING id")

    assert key == 502
    assert column_type(conn, "tags", "id") == "integer"
    assert scalar(conn, "SELECT attidentity FROM pg_attribute WHERE attrelid = 'tags'::regclass AND attname = 'id'")
    assert scalar(conn, "SELECT data_type FROM pg_sequences WHERE sequencename = 'tags_id_seq'") == "integer"
    assert scalar(conn, "SELECT count(*) FROM tags") == 502
