"""Column type changes (start, finish, cleanup) through the Python API on real PostgreSQL: an integer primary key
referenced by another table's foreign key becomes bigint while the application writes to both tables, plain
columns change type with ``using``, each step run twice, and what the change refuses before writing anything."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from psycopg import sql
from support import wait_for
from test_alembic_ops import scalar

import backfill
from backfill.tools.appsim import AppSimulator

PARENT_CHILD = (
    "CREATE TABLE accounts (id serial PRIMARY KEY, email text NOT NULL)",
    "CREATE UNIQUE INDEX accounts_email_idx ON accounts (email)",
    "CREATE INDEX accounts_id_email_idx ON accounts (id, email)",
    "INSERT INTO accounts (email) SELECT 'a' || g || '@example.com' FROM generate_series(1, 3000) g",
    "CREATE TABLE payments (id bigserial PRIMARY KEY, account_id integer NOT NULL REFERENCES accounts (id) "
    "ON DELETE CASCADE, amount integer NOT NULL)",
    "CREATE INDEX payments_account_id_idx ON payments (account_id)",
    "INSERT INTO payments (account_id, amount) SELECT g % 3000 + 1, g % 50 + 1 FROM generate_series(1, 6000) g",
)

APP_UPDATE = "UPDATE payments SET amount = amount + 1 WHERE id = %s"
APP_INSERT = (
    "WITH a AS (INSERT INTO accounts (email) VALUES ('new-' || gen_random_uuid() || '@example.com') RETURNING id) "
    "INSERT INTO payments (account_id, amount) SELECT id, 1 + (random() * 9)::int FROM a"
)


def column_type(conn: psycopg.Connection[Any], table: str, column: str) -> str | None:
    row = conn.execute(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s "
        "AND NOT attisdropped",
        (table, column),
    ).fetchone()
    return None if row is None else str(row[0])


#: A table's primary key, unique and foreign key constraints: name and definition.
CONSTRAINTS = (
    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass "
    "AND contype IN ('p', 'u', 'f') ORDER BY conname"
)
#: A table's valid indexes: name and definition.
INDEXES = (
    "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
    "WHERE i.indrelid = %s::regclass AND i.indisvalid ORDER BY 1"
)


def _definitions(conn: psycopg.Connection[Any], query: str, table: str) -> dict[str, str]:
    return {str(name): str(definition) for name, definition in conn.execute(query, (table,)).fetchall()}


def constraints(conn: psycopg.Connection[Any], table: str) -> dict[str, str]:
    return _definitions(conn, CONSTRAINTS, table)


def indexes(conn: psycopg.Connection[Any], table: str) -> dict[str, str]:
    return _definitions(conn, INDEXES, table)


def test_an_integer_primary_key_referenced_by_a_foreign_key_becomes_bigint_while_the_application_writes(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    for statement in PARENT_CHILD:
        conn.execute(statement)
    before = (constraints(conn, "accounts"), constraints(conn, "payments"), indexes(conn, "accounts"))

    with AppSimulator(
        db_url, update_sql=APP_UPDATE, insert_sql=APP_INSERT, key_range=(1, 6000), writers=2, seed=3
    ) as app:
        app.wait_until_writing()
        started = backfill.start_column_type_change(db_url, "accounts", "id", "bigint")
        started_again = backfill.start_column_type_change(db_url, "accounts", "id", "bigint")
        child = backfill.start_column_type_change(db_url, "payments", "account_id", "bigint")
        finished = backfill.finish_column_type_change(db_url, "accounts", "id")
        finished_again = backfill.finish_column_type_change(db_url, "accounts", "id")
        backfill.finish_column_type_change(db_url, "payments", "account_id")
        stats = app.stop()

    assert stats.errors == 0, stats.last_error
    assert stats.writes > 50
    assert [s.action for s in started.steps] == ["add_shadow_column", "create_sync_function", "create_sync_trigger"]
    assert started.copy is not None and started.copy.rows_updated >= 3000
    assert started_again.steps == () and child.copy is not None
    assert finished_again.steps == ()
    assert "swap" in finished.actions
    assert column_type(conn, "accounts", "id") == "bigint"
    assert column_type(conn, "payments", "account_id") == "bigint"
    assert (constraints(conn, "accounts"), constraints(conn, "payments"), indexes(conn, "accounts")) == before
    # Every row kept its key and its payments; nothing was lost or duplicated.
    assert scalar(conn, "SELECT count(*) FROM accounts WHERE id <> id_old OR id IS NULL") == 0
    assert (
        scalar(conn, "SELECT count(*) FROM payments p LEFT JOIN accounts a ON a.id = p.account_id WHERE a.id IS NULL")
        == 0
    )

    # The sequence goes on, now as bigint, beyond 2^31.
    conn.execute("INSERT INTO accounts (email) VALUES ('next@example.com')")
    assert scalar(conn, "SELECT id_old IS NULL AND id > 3000 FROM accounts WHERE email = 'next@example.com'")
    assert scalar(conn, "SELECT data_type FROM pg_sequences WHERE sequencename = 'accounts_id_seq'") == "bigint"
    conn.execute("SELECT setval('accounts_id_seq', 3000000000)")
    big = scalar(conn, "INSERT INTO accounts (email) VALUES ('big@example.com') RETURNING id")
    conn.execute("INSERT INTO payments (account_id, amount) VALUES (%s, 1)", (big,))
    assert big == 3000000001
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("INSERT INTO payments (account_id, amount) VALUES (4000000000, 1)")
    conn.execute("DELETE FROM accounts WHERE id = %s", (big,))
    assert scalar(conn, "SELECT count(*) FROM payments WHERE account_id = %s", (big,)) == 0

    cleaned = backfill.cleanup_column_type_change(db_url, "accounts", "id")
    cleaned_again = backfill.cleanup_column_type_change(db_url, "accounts", "id")
    assert cleaned.actions == ["drop_old_column"] and cleaned_again.steps == ()
    assert column_type(conn, "accounts", "id_old") is None
    assert (
        scalar(conn, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'accounts'::regclass AND NOT tgisinternal") == 0
    )


def test_odd_names_are_quoted_everywhere(conn: psycopg.Connection[Any], db_url: str) -> None:
    """Upper case, spaces, quotes and % in schema, table and column names; a serial key referenced from another
    schema."""
    conn.execute('CREATE SCHEMA "Sales Dept"')
    conn.execute('CREATE TABLE "Sales Dept"."Cust%" ("Id %" serial PRIMARY KEY, "E""mail" text)')
    conn.execute(
        'CREATE TABLE public.orders (id serial PRIMARY KEY, "cust id" integer REFERENCES "Sales Dept"."Cust%")'
    )
    conn.execute('INSERT INTO "Sales Dept"."Cust%%" ("E""mail") SELECT g::text FROM generate_series(1, 300) g', ())
    conn.execute('INSERT INTO orders ("cust id") SELECT g %% 300 + 1 FROM generate_series(1, 600) g', ())

    backfill.start_column_type_change(db_url, "Cust%", "Id %", "bigint", schema="Sales Dept")
    backfill.finish_column_type_change(db_url, "Cust%", "Id %", schema="Sales Dept")
    backfill.cleanup_column_type_change(db_url, "Cust%", "Id %", schema="Sales Dept")
    conn.execute("SELECT setval(pg_get_serial_sequence('\"Sales Dept\".\"Cust%%\"', 'Id %%'), 2147483647)", ())
    key = scalar(conn, 'INSERT INTO "Sales Dept"."Cust%%" ("E""mail") VALUES (\'x\') RETURNING "Id %%"', ())

    assert key == 2**31
    assert column_type(conn, '"Sales Dept"."Cust%"', "Id %") == "bigint"
    assert constraints(conn, "orders") == {
        "orders_cust id_fkey": 'FOREIGN KEY ("cust id") REFERENCES "Sales Dept"."Cust%"("Id %")',
        "orders_pkey": "PRIMARY KEY (id)",
    }


def test_a_swap_that_cannot_get_its_locks_fails_in_one_line_naming_what_is_left_then_runs_again(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    for statement in PARENT_CHILD:
        conn.execute(statement)
    backfill.start_column_type_change(db_url, "accounts", "id", "bigint")
    reader = psycopg.connect(db_url)
    try:
        reader.execute("SELECT count(*) FROM payments")  # ACCESS SHARE until rollback: only the swap waits for it
        with pytest.raises(backfill.LockUnavailableError) as raised:
            backfill.finish_column_type_change(
                db_url, "accounts", "id", lock_timeout=0.05, retry_seconds=0.3, sleep=lambda _: None
            )
    finally:
        reader.close()
    unswapped = column_type(conn, "accounts", "id")
    again = backfill.finish_column_type_change(db_url, "accounts", "id")

    message = str(raised.value)
    assert "\n" not in message and "DO" not in message
    assert "could not lock public.accounts, public.payments within 0.3s" in message
    assert "nothing was swapped, the copies are built and stay: run finish again" in message
    assert unswapped == "integer"
    assert again.actions == ["swap"]
    assert column_type(conn, "accounts", "id") == "bigint"


def _everything_but_the_swap(url: str, table: str = "accounts", column: str = "id", other: str = "payments") -> None:
    """Run finish with a reader on the other table that only the swap waits for, and a retry budget that gives
    up."""
    reader = psycopg.connect(url)
    try:
        reader.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(other)))
        with pytest.raises(backfill.LockUnavailableError):
            backfill.finish_column_type_change(url, table, column, lock_timeout=0.05, retry_seconds=0.2)
    finally:
        reader.close()


def _lock_waiters(conn: psycopg.Connection[Any], query: str) -> list[int]:
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s", (query + "%",)
    ).fetchall()
    return [row[0] for row in rows]


def test_the_swap_never_waits_for_a_referencing_table_while_holding_its_own_so_no_application_write_deadlocks(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    """A transaction holding payments queues for accounts behind the swap; when the swap then got accounts and
    queued for payments, the application's transaction (which had waited longer) found the deadlock and failed.
    The swap now takes the referencing tables without queueing: it gives up, and is retried, instead."""
    for statement in PARENT_CHILD:
        conn.execute(statement)
    backfill.start_column_type_change(db_url, "accounts", "id", "bigint")
    _everything_but_the_swap(db_url)
    holder, application = psycopg.connect(db_url), psycopg.connect(db_url)
    outcome: dict[str, Any] = {}

    def finish() -> None:
        outcome["finish"] = backfill.finish_column_type_change(db_url, "accounts", "id", lock_timeout=30)

    def write() -> None:
        try:
            application.execute("INSERT INTO accounts (email) VALUES ('late@example.com')")
            outcome["write"] = "ok"
        except psycopg.Error as exc:
            outcome["write"] = type(exc).__name__

    try:
        holder.execute("LOCK TABLE accounts IN ROW EXCLUSIVE MODE")
        application.execute("LOCK TABLE payments IN ROW EXCLUSIVE MODE")
        finisher = threading.Thread(target=finish, daemon=True)
        finisher.start()
        wait_for(lambda: _lock_waiters(conn, "DO"), "the swap to queue for accounts")
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        wait_for(lambda: _lock_waiters(conn, "INSERT INTO accounts"), "the application to queue behind the swap")
        holder.commit()
        writer.join(30)
        application.commit()
        finisher.join(60)
    finally:
        holder.close()
        application.close()

    assert outcome["write"] == "ok"
    assert outcome["finish"].actions[-1] == "swap"
    assert column_type(conn, "accounts", "id") == "bigint"


def test_the_swap_of_a_referencing_column_never_waits_for_the_referenced_table_while_holding_its_own(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    """Dropping the old foreign key in the swap takes ACCESS EXCLUSIVE on the table it references too. An
    application transaction that wrote accounts and then writes payments (what APP_INSERT does in one statement)
    queued for payments behind the swap while the swap, holding payments, queued for accounts: a deadlock that the
    application could lose. The swap now queues holding nothing."""
    for statement in PARENT_CHILD:
        conn.execute(statement)
    backfill.start_column_type_change(db_url, "payments", "account_id", "bigint")
    _everything_but_the_swap(db_url, "payments", "account_id", other="accounts")
    application = psycopg.connect(db_url)
    outcome: dict[str, Any] = {}

    def finish() -> None:
        try:
            outcome["finish"] = backfill.finish_column_type_change(db_url, "payments", "account_id", lock_timeout=30)
        except BaseException as exc:
            outcome["finish"] = exc

    try:
        # The application runs the deadlock check first: it would be the victim of a cycle.
        application.execute("SET deadlock_timeout = '20ms'")
        application.execute("SET statement_timeout = '20s'")
        new = scalar(application, "INSERT INTO accounts (email) VALUES ('late@example.com') RETURNING id")
        finisher = threading.Thread(target=finish, daemon=True)
        finisher.start()
        wait_for(lambda: _lock_waiters(conn, "DO"), "the swap to queue for accounts")
        application.execute("INSERT INTO payments (account_id, amount) VALUES (%s, 1)", (new,))
        application.commit()
    finally:
        application.close()
        finisher.join(60)

    assert isinstance(outcome["finish"], backfill.TypeChangeResult), outcome["finish"]
    assert outcome["finish"].actions[-1] == "swap"
    assert column_type(conn, "payments", "account_id") == "bigint"
    assert scalar(conn, "SELECT count(*) FROM payments WHERE account_id = %s", (new,)) == 1


def test_a_record_left_by_an_earlier_change_of_a_recreated_table_does_not_stand_for_the_copy(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    conn.execute("CREATE TABLE tags (id integer PRIMARY KEY, label text)")
    conn.execute("INSERT INTO tags SELECT g, 't' || g FROM generate_series(1, 200) g")
    backfill.start_column_type_change(db_url, "tags", "id", "bigint")
    backfill.finish_column_type_change(db_url, "tags", "id")
    conn.execute("DROP TABLE tags")  # no cleanup: the copy's record stays
    conn.execute("CREATE TABLE tags (id integer PRIMARY KEY, label text)")
    conn.execute("INSERT INTO tags SELECT g, 't' || g FROM generate_series(1, 300) g")

    started = backfill.start_column_type_change(db_url, "tags", "id", "bigint")

    assert started.copy is not None and started.copy.rows_updated == 300
    assert scalar(conn, "SELECT count(*) FROM tags WHERE id_new IS NULL") == 0


def test_a_primary_key_with_include_columns_changes_its_key_and_its_include_column(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    """The INCLUDE column is not part of the key (it may be NULL): start used to refuse the table naming it."""
    conn.execute("CREATE TABLE notes (id integer, note text, PRIMARY KEY (id) INCLUDE (note))")
    conn.execute("INSERT INTO notes SELECT g, CASE WHEN g % 7 > 0 THEN 'n' || g END FROM generate_series(1, 500) g")
    for column, new_type in (("id", "bigint"), ("note", "varchar(20)")):
        backfill.start_column_type_change(db_url, "notes", column, new_type)
        backfill.finish_column_type_change(db_url, "notes", column)
        backfill.cleanup_column_type_change(db_url, "notes", column)

    assert (column_type(conn, "notes", "id"), column_type(conn, "notes", "note")) == ("bigint", "character varying(20)")
    assert scalar(conn, "SELECT pg_get_indexdef('notes_pkey'::regclass)") == (
        "CREATE UNIQUE INDEX notes_pkey ON public.notes USING btree (id) INCLUDE (note)"
    )
    assert scalar(conn, "SELECT count(*) FROM notes WHERE note IS NULL") == 71
    assert scalar(conn, "SELECT sum(id) FROM notes") == 500 * 501 // 2
