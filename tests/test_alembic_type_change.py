"""The column type change ops under real Alembic on real PostgreSQL: the headline integer-to-bigint conversion of a
primary key referenced by another table's foreign key while the application writes to both tables, each op run
twice, offline scripts run by psql, a revision killed between its steps then run again, plain columns changed with
``using``, and what the ops refuse before writing anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from structlog.testing import capture_logs
from support import wait_for
from test_alembic_ops import alembic_config, at_first_revision, make_project, operations, scalar, upgrade_while_writing
from test_alembic_schema_ops import _kill, _upgrading, _waiting
from test_offline import offline, offline_script, psql, statements
from test_type_change import APP_INSERT, APP_UPDATE, PARENT_CHILD, column_type, constraints, indexes

import backfill
import backfill.alembic
from backfill.tools.appsim import AppSimulator

TABLES = "\n".join(f"op.execute({statement!r})" for statement in PARENT_CHILD)

REVISIONS: tuple[tuple[str, str], ...] = (
    (TABLES, 'op.execute("DROP TABLE payments")\nop.execute("DROP TABLE accounts")'),
    (
        """
        op.start_column_type_change("accounts", "id", sa.BigInteger())
        op.start_column_type_change("payments", "account_id", "bigint")
        """,
        """
        op.cancel_column_type_change("payments", "account_id")
        op.cancel_column_type_change("accounts", "id")
        """,
    ),
    (
        """
        op.finish_column_type_change("accounts", "id")
        op.finish_column_type_change("payments", "account_id")
        """,
        "pass",
    ),
    (
        """
        op.cleanup_column_type_change("accounts", "id")
        op.cleanup_column_type_change("payments", "account_id")
        """,
        "pass",
    ),
)


def shape(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    return (
        constraints(conn, "accounts"),
        constraints(conn, "payments"),
        indexes(conn, "accounts"),
        indexes(conn, "payments"),
        scalar(
            conn,
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'accounts'::regclass AND attnum > 0 "
            "AND NOT attisdropped",
        ),
    )


def test_a_referenced_integer_primary_key_becomes_bigint_while_the_application_writes_both_tables(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str
) -> None:
    config = at_first_revision(db_url, make_project(tmp_path, *REVISIONS))
    before = shape(conn)

    with upgrade_while_writing(config, db_url, APP_UPDATE, APP_INSERT, (1, 6000), seed=11) as (app, logs):
        stats = app.stop()

    assert stats.errors == 0, stats.last_error
    assert stats.writes > 50
    assert column_type(conn, "accounts", "id") == "bigint"
    assert column_type(conn, "payments", "account_id") == "bigint"
    assert column_type(conn, "accounts", "id_old") is None
    assert scalar(conn, "SELECT version_num FROM alembic_version") == "0004"
    # The same primary key, foreign key, indexes and columns as before, now on the bigint columns.
    assert shape(conn) == before
    swaps = [e for e in logs if e["event"] == "ddl_step" and e["action"] == "swap"]
    assert len(swaps) == 2
    assert scalar(conn, "SELECT count(*) FROM backfills") == 0

    # The sequence continues past 2^31, and the foreign key is still enforced, CASCADE included.
    conn.execute("SELECT setval('accounts_id_seq', 2147483647)")
    big = scalar(conn, "INSERT INTO accounts (email) VALUES ('big@example.com') RETURNING id")
    conn.execute("INSERT INTO payments (account_id, amount) VALUES (%s, 5)", (big,))
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("INSERT INTO payments (account_id, amount) VALUES (%s, 5)", (big + 1,))
    conn.execute("DELETE FROM accounts WHERE id = %s", (big,))
    assert big == 2**31
    assert scalar(conn, "SELECT count(*) FROM payments WHERE account_id = %s", (big,)) == 0


def test_the_downgrade_of_start_cancels_it(tmp_path: Path, conn: psycopg.Connection[Any], db_url: str) -> None:
    config = at_first_revision(db_url, make_project(tmp_path, *REVISIONS))
    before = shape(conn)

    command.upgrade(config, "0002")
    started = column_type(conn, "accounts", "id_new")
    command.downgrade(config, "0001")

    assert started == "bigint"
    assert shape(conn) == before
    assert scalar(conn, "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == 0
    assert scalar(conn, "SELECT count(*) FROM backfills") == 0


def test_each_op_run_twice_does_its_work_once(conn: psycopg.Connection[Any], db_url: str) -> None:
    for statement in PARENT_CHILD:
        conn.execute(statement)
    with operations(db_url) as op:
        runs = [
            (op.start_column_type_change("accounts", "id", "bigint"), "start"),
            (op.start_column_type_change("accounts", "id", "bigint"), "start again"),
            (op.finish_column_type_change("accounts", "id"), "finish"),
            (op.finish_column_type_change("accounts", "id"), "finish again"),
            (op.start_column_type_change("accounts", "id", "bigint"), "start after the swap"),
            (op.cleanup_column_type_change("accounts", "id"), "cleanup"),
            (op.cleanup_column_type_change("accounts", "id"), "cleanup again"),
        ]

    actions = {what: result.actions for result, what in runs}
    assert actions == {
        "start": ["add_shadow_column", "create_sync_function", "create_sync_trigger"],
        "start again": [],
        "finish": ["add", "validate", "create_index", "create_index", "add", "validate", "swap"]
        if scalar(conn, "SHOW server_version_num") >= "180000"
        else [
            "add",
            "validate",
            "set_not_null",
            "drop_check",
            "create_index",
            "create_index",
            "add",
            "validate",
            "swap",
        ],
        "finish again": [],
        "start after the swap": [],
        "cleanup": ["drop_old_column"],
        "cleanup again": [],
    }
    copies = [result.copy for result, _ in runs[:2]]
    assert copies[0] is not None and copies[0].rows_updated == 3000
    assert copies[1] is not None and copies[1].rows_updated == 0
    assert column_type(conn, "accounts", "id") == "bigint"


# --- a revision killed between its steps ---------------------------------------------------------------------------


def test_a_finish_killed_while_building_an_index_copy_then_while_waiting_to_swap_completes_when_run_again(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str
) -> None:
    """An old snapshot holds the concurrent build of the first index copy back: killed there, an INVALID copy is
    left. A reader's open transaction on the referencing table (ACCESS SHARE, which only the swap's ACCESS
    EXCLUSIVE waits for) then holds the swap back: killed there, nothing is swapped. The third run only swaps."""
    revisions = (
        REVISIONS[0],
        REVISIONS[1],
        ('op.finish_column_type_change("accounts", "id", lock_timeout=30)', "pass"),
    )
    project = make_project(tmp_path, *revisions)
    command.upgrade(alembic_config(db_url, project), "0002")
    report = psycopg.connect(db_url, application_name="report")
    try:
        report.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        report.execute("SELECT count(*) FROM payments")
        with _upgrading(project, db_url) as process:
            wait_for(lambda: _waiting(conn, "CREATE %INDEX CONCURRENTLY"), "the copy's build to wait")
            _kill(process, conn, _waiting(conn, "CREATE %INDEX CONCURRENTLY"))
    finally:
        report.close()
    invalid = scalar(conn, "SELECT count(*) FROM pg_index WHERE NOT indisvalid")

    reader = psycopg.connect(db_url)
    try:
        reader.execute("SELECT count(*) FROM payments")
        with _upgrading(project, db_url) as process:
            wait_for(lambda: _waiting(conn, "DO"), "the swap to wait for the reader")
            _kill(process, conn, _waiting(conn, "DO"))
        reader.rollback()
    finally:
        reader.close()
    unswapped = (column_type(conn, "accounts", "id"), column_type(conn, "accounts", "id_new"))

    with capture_logs() as logs:
        command.upgrade(alembic_config(db_url, project), "head")

    assert invalid == 1
    assert unswapped == ("integer", "bigint")
    assert [e["action"] for e in logs if e["event"] == "ddl_step"] == ["swap"]
    assert column_type(conn, "accounts", "id") == "bigint"
    assert scalar(conn, "SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 0
    assert constraints(conn, "accounts") == {"accounts_pkey": "PRIMARY KEY (id)"}


# --- offline -------------------------------------------------------------------------------------------------------


def test_start_renders_the_shadow_column_the_trigger_and_the_copy_and_cleanup_a_guarded_drop() -> None:
    op, buffer = offline()

    op.start_column_type_change("events", "payload", "jsonb", using="payload::jsonb", lock_timeout=1.5)
    op.cleanup_column_type_change("events", "payload")

    out = statements(buffer)
    assert out[:3] == [
        "COMMIT",
        "-- start_column_type_change public.events.payload: shadow column payload_new and the trigger that mirrors "
        "every write into it\n\nSET lock_timeout = '1500ms'",
        'ALTER TABLE "public"."events" ADD COLUMN IF NOT EXISTS "payload_new" jsonb; COMMENT ON COLUMN '
        '"public"."events"."payload_new" IS \'backfill: the new payload of type_change:public.events.payload, '
        "until the swap'",
    ]
    text = buffer.getvalue()
    assert 'CREATE OR REPLACE FUNCTION "public"."backfill_sync_type_change:public.events.payload"()' in text
    assert "backfill type_change:public.events.payload: 10000 rows per transaction" in text
    assert 'ALTER TABLE "public"."events" DROP COLUMN IF EXISTS "payload_old";' in text
    assert "run finish_column_type_change" in text
    op.finish_column_type_change("events", "payload")
    plan, run = statements(buffer)[-2:]
    assert plan.startswith("DO $plan$") and "LOCK TABLE %s IN ACCESS EXCLUSIVE MODE" in plan
    assert run == "SELECT stmt FROM pg_temp.backfill_type_change_plan ORDER BY n \\gexec\n\nBEGIN"


def test_the_offline_start_finish_and_cleanup_run_in_psql(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str
) -> None:
    conn.execute("CREATE TABLE events (id integer PRIMARY KEY, payload text)")
    conn.execute("INSERT INTO events SELECT g, '{\"n\": ' || g || '}' FROM generate_series(1, 2000) g")

    def script(body: str) -> Path:
        project = make_project(tmp_path / str(len(list(tmp_path.iterdir()))), body)
        path = offline_script(alembic_config(db_url, project), project / "upgrade.sql")
        conn.execute("DROP TABLE IF EXISTS alembic_version")
        return path

    start = psql(db_url, script('op.start_column_type_change("events", "payload", "jsonb", using="payload::jsonb")'))
    conn.execute("""INSERT INTO events VALUES (2001, '{"n": 2001}')""")
    conn.execute("""UPDATE events SET payload = '{"n": -1}' WHERE id = 1""")
    copied = scalar(conn, "SELECT count(*) FROM events WHERE payload_new = payload::jsonb")
    early = psql(db_url, script('op.cleanup_column_type_change("events", "payload")'))
    cancel = 'op.cancel_column_type_change("events", "payload")'
    finish = psql(db_url, script('op.finish_column_type_change("events", "payload")'))
    again = psql(db_url, script('op.finish_column_type_change("events", "payload")'))
    late_cancel = psql(db_url, script(cancel))
    cleanup = psql(db_url, script('op.cleanup_column_type_change("events", "payload")'))

    assert start.returncode == 0, start.stderr
    assert finish.returncode == 0, finish.stderr
    assert again.returncode == 0 and "swapped before, nothing to do" in again.stderr
    assert copied == 2001
    assert early.returncode != 0 and "is not finished" in early.stderr
    assert late_cancel.returncode != 0 and "was finished (the columns are swapped): cannot cancel" in late_cancel.stderr
    assert cleanup.returncode == 0, cleanup.stderr
    assert column_type(conn, "events", "payload") == "jsonb"
    assert column_type(conn, "events", "payload_old") is None
    assert scalar(conn, "SELECT payload->>'n' FROM events WHERE id = 1") == "-1"


# --- plain columns -------------------------------------------------------------------------------------------------


def test_plain_columns_change_type_with_using_keeping_default_not_null_and_index(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    conn.execute(
        "CREATE TABLE items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, doc text, "
        "price integer NOT NULL DEFAULT 0)"
    )
    conn.execute("CREATE INDEX items_price_idx ON items (price)")
    conn.execute("INSERT INTO items (doc, price) SELECT '[' || g || ']', g FROM generate_series(1, 3000) g")
    conn.execute("INSERT INTO items (doc) VALUES (NULL)")

    with AppSimulator(
        db_url,
        update_sql="UPDATE items SET price = price + 1, doc = '[0]' WHERE id = %s",
        insert_sql="INSERT INTO items (doc) VALUES ('[7]')",
        key_range=(1, 3000),
    ) as app:
        app.wait_until_writing()
        with operations(db_url) as op:
            backfill.alembic.start_column_type_change("items", "doc", "jsonb", using="doc::jsonb", operations=op)
            backfill.alembic.start_column_type_change("items", "price", sa.Numeric(12, 2), operations=op)
            backfill.alembic.finish_column_type_change("items", "doc", operations=op)
            backfill.alembic.finish_column_type_change("items", "price", operations=op)
            backfill.alembic.cleanup_column_type_change("items", "doc", operations=op)
            backfill.alembic.cleanup_column_type_change("items", "price", operations=op)
        stats = app.stop()

    assert stats.errors == 0, stats.last_error
    assert column_type(conn, "items", "doc") == "jsonb"
    assert column_type(conn, "items", "price") == "numeric(12,2)"
    assert scalar(conn, "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'price'")
    assert indexes(conn, "items")["items_price_idx"].endswith("USING btree (price)")
    assert scalar(conn, "INSERT INTO items DEFAULT VALUES RETURNING price") == 0
    assert scalar(conn, "SELECT count(*) FROM items WHERE doc IS NULL") == 2
    assert scalar(conn, "SELECT count(*) FROM items WHERE jsonb_typeof(doc) <> 'array'") == 0


def test_an_identity_primary_key_becomes_bigint_and_its_sequence_continues(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    conn.execute("CREATE TABLE tags (id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY, label text)")
    conn.execute("INSERT INTO tags (label) SELECT 't' || g FROM generate_series(1, 500) g")

    backfill.start_column_type_change(db_url, "tags", "id", "bigint", name="id_wide")
    shadow = column_type(conn, "tags", "id_wide")
    backfill.finish_column_type_change(db_url, "tags", "id")
    following = scalar(conn, "INSERT INTO tags (label) VALUES ('next') RETURNING id")
    identity = scalar(conn, "SELECT attidentity FROM pg_attribute WHERE attrelid = 'tags'::regclass AND attname = 'id'")
    conn.execute("ALTER TABLE tags ALTER COLUMN id RESTART WITH 3000000000")
    beyond = scalar(conn, "INSERT INTO tags (label) VALUES ('big') RETURNING id")
    backfill.cleanup_column_type_change(db_url, "tags", "id")

    assert (shadow, following, identity, beyond) == ("bigint", 501, "a", 3000000000)
    assert column_type(conn, "tags", "id") == "bigint"
    assert constraints(conn, "tags") == {"tags_pkey": "PRIMARY KEY (id)"}


# --- refusals ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "call", "message"),
    [
        (
            "CREATE VIEW account_ids AS SELECT id FROM accounts",
            lambda url: backfill.start_column_type_change(url, "accounts", "id", "bigint"),
            r"public.accounts.id is used by view or rule account_ids, which a type change cannot carry",
        ),
        (
            "SELECT 1",
            lambda url: backfill.start_column_type_change(url, "accounts", "id", "jsonb"),
            r"cannot change public.accounts.id to jsonb using \"id\"::jsonb: cannot cast type integer to jsonb",
        ),
        (
            "SELECT 1",
            lambda url: backfill.start_column_type_change(url, "accounts", "id", "bigint", using="id); DROP TABLE x"),
            r"using must be one SQL expression over the row",
        ),
        (
            "ALTER TABLE payments ADD CONSTRAINT payments_cascade FOREIGN KEY (account_id) REFERENCES accounts "
            "ON UPDATE CASCADE",
            lambda url: backfill.start_column_type_change(url, "accounts", "id", "bigint"),
            r"foreign key payments_cascade of public.payments has ON UPDATE, DEFERRABLE or MATCH FULL",
        ),
        (
            "SELECT 1",
            lambda url: backfill.finish_column_type_change(url, "accounts", "id"),
            r"no type change of public.accounts.id was started",
        ),
        (
            "SELECT 1",
            lambda url: backfill.start_column_type_change(url, "accounts", "nope", "bigint"),
            r"column 'nope' does not exist in table public.accounts",
        ),
    ],
    ids=["view", "bad_cast", "not_one_expression", "on_update", "finish_before_start", "no_column"],
)
def test_refused_before_anything_is_written(
    conn: psycopg.Connection[Any], db_url: str, setup: str, call: Any, message: str
) -> None:
    for statement in PARENT_CHILD:
        conn.execute(statement)
    conn.execute(setup)
    before = shape(conn)

    with pytest.raises(backfill.ConstraintError, match=message) as raised:
        call(db_url)

    assert "\n" not in str(raised.value)
    assert shape(conn) == before
    assert scalar(conn, "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == 0


def test_cleanup_before_finish_drops_nothing(conn: psycopg.Connection[Any], db_url: str) -> None:
    for statement in PARENT_CHILD:
        conn.execute(statement)
    backfill.start_column_type_change(db_url, "accounts", "id", "bigint", defer=True)

    with pytest.raises(backfill.TypeChangeError, match="not finished .* run finish_column_type_change first"):
        backfill.cleanup_column_type_change(db_url, "accounts", "id")

    assert column_type(conn, "accounts", "id_new") == "bigint"
    assert scalar(conn, "SELECT state FROM backfills") == "pending"
    # A deferred copy is finished by the finish itself.
    result = backfill.finish_column_type_change(db_url, "accounts", "id")
    assert result.copy is not None and result.copy.rows_updated == 3000


def test_a_copy_failing_on_rows_using_cannot_convert_names_the_state_left_and_runs_again_once_they_are_fixed(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    conn.execute("CREATE TABLE events (id integer PRIMARY KEY, payload text)")
    conn.execute("INSERT INTO events SELECT g, '{\"n\": ' || g || '}' FROM generate_series(1, 500) g")
    conn.execute("UPDATE events SET payload = 'not json' WHERE id = 250")

    with pytest.raises(backfill.TypeChangeError, match=r"invalid input syntax for type json") as raised:
        backfill.start_column_type_change(db_url, "events", "payload", "jsonb", using="payload::jsonb")
    left = column_type(conn, "events", "payload_new")
    conn.execute("""UPDATE events SET payload = '{"n": 250}' WHERE id = 250""")
    again = backfill.start_column_type_change(db_url, "events", "payload", "jsonb", using="payload::jsonb")

    assert "the shadow column 'payload_new' of public.events and its trigger stay" in str(raised.value)
    assert "cancel_column_type_change" in str(raised.value) and "\n" not in str(raised.value)
    assert left == "jsonb"
    assert again.copy is not None and again.copy.outcome is backfill.RunOutcome.FINISHED
    assert scalar(conn, "SELECT count(*) FROM events WHERE payload_new IS DISTINCT FROM payload::jsonb") == 0


def test_the_headline_offline_script_gives_the_schema_and_data_of_an_online_upgrade(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str, second_db: str
) -> None:
    for statement in PARENT_CHILD:
        conn.execute(statement)
        with psycopg.connect(second_db, autocommit=True) as online:
            online.execute(statement)
    project = make_project(tmp_path, *(upgrade for upgrade, _ in REVISIONS[1:]))
    script = offline_script(alembic_config(db_url, project), tmp_path / "upgrade.sql")

    ran = psql(db_url, script)
    command.upgrade(alembic_config(second_db, project), "head")

    assert ran.returncode == 0, ran.stderr
    with psycopg.connect(second_db, autocommit=True) as online:
        assert shape(conn) == shape(online)
        data = (
            "SELECT md5(string_agg(a.id || ':' || p.id, ',' ORDER BY p.id)) "
            "FROM payments p JOIN accounts a ON a.id = p.account_id"
        )
        assert scalar(conn, data) == scalar(online, data)
        assert [column_type(c, "accounts", "id") for c in (conn, online)] == ["bigint", "bigint"]
        sequence = "SELECT data_type::text FROM pg_sequences WHERE sequencename = 'accounts_id_seq'"
        assert [scalar(c, sequence) for c in (conn, online)] == ["bigint", "bigint"]


def test_the_offline_cancel_drops_the_shadow_column_the_trigger_and_the_record(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str
) -> None:
    conn.execute("CREATE TABLE events (id integer PRIMARY KEY, n integer)")
    conn.execute("INSERT INTO events SELECT g, g FROM generate_series(1, 300) g")
    project = make_project(
        tmp_path,
        ('op.start_column_type_change("events", "n", "bigint")', 'op.cancel_column_type_change("events", "n")'),
    )
    config = alembic_config(db_url, project)
    command.upgrade(config, "head")
    started = column_type(conn, "events", "n_new")
    script = offline_script(config, tmp_path / "downgrade.sql", "0001:base", downgrade=True)

    ran = psql(db_url, script)

    assert ran.returncode == 0, ran.stderr
    assert started == "bigint"
    assert column_type(conn, "events", "n_new") is None
    assert scalar(conn, "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == 0
    assert scalar(conn, "SELECT count(*) FROM backfills") == 0


def test_a_column_of_the_shadow_name_that_the_change_did_not_add_is_refused_and_never_dropped(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    for statement in PARENT_CHILD:
        conn.execute(statement)
    conn.execute("ALTER TABLE accounts ADD COLUMN id_new text, ADD COLUMN id_old text")
    conn.execute("COMMENT ON COLUMN accounts.id IS 'the account'")

    with pytest.raises(backfill.TypeChangeError, match="already has a column 'id_new' that no type change"):
        backfill.start_column_type_change(db_url, "accounts", "id", "bigint")
    backfill.cancel_column_type_change(db_url, "accounts", "id")
    kept = (column_type(conn, "accounts", "id_new"), column_type(conn, "accounts", "id_old"))
    with pytest.raises(backfill.ConstraintError, match="already has a column 'id_old'"):
        backfill.start_column_type_change(db_url, "accounts", "id", "bigint", name="id_wide")
    conn.execute("ALTER TABLE accounts DROP COLUMN id_old")
    backfill.start_column_type_change(db_url, "accounts", "id", "bigint", name="id_wide")
    backfill.finish_column_type_change(db_url, "accounts", "id")

    assert kept == ("text", "text")
    assert column_type(conn, "accounts", "id") == "bigint"
    comment = (
        "SELECT col_description(attrelid, attnum) FROM pg_attribute WHERE attrelid = 'accounts'::regclass "
        "AND attname = %s"
    )
    assert scalar(conn, comment, ("id",)) == "the account"
