"""CHECK constraints, foreign keys and concurrent indexes as plain functions on real PostgreSQL: NOT VALID then
VALIDATE, idempotent from the catalog, violations named with nothing half-applied, INVALID indexes rebuilt, the
sessions a build waits for named. Planning is also tested without a database."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import make_url
from structlog.testing import capture_logs
from support import constraint_state, index_state, wait_for

import backfill
from backfill.schema import check, ddl, foreign_key, index
from backfill.schema.constraint import ConstraintState
from backfill.schema.notnull import ConstraintError, PsycopgSession

E = TypeVar("E", bound=BaseException)


def _make_orders(conn: psycopg.Connection[Any], rows: int = 2_000) -> None:
    conn.execute("CREATE TABLE customers (id integer PRIMARY KEY, email text)")
    conn.execute("INSERT INTO customers SELECT g, 'c' || g || '@example.com' FROM generate_series(1, 100) g")
    conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, customer_id integer, amount integer NOT NULL)")
    conn.execute("INSERT INTO orders SELECT g, g %% 100 + 1, g FROM generate_series(1, %s) g", (rows,))


def _refused(
    conn: psycopg.Connection[Any], db_url: str, error: type[E], spoil: str, change: Callable[[str], object]
) -> E:
    """What ``change`` (given the URL) raises on the orders tables once ``spoil`` left rows it cannot accept."""
    _make_orders(conn)
    conn.execute(spoil)
    with pytest.raises(error) as caught:
        change(db_url)
    return caught.value


# --- CHECK ---------------------------------------------------------------------------------------------------------


def test_check_is_added_not_valid_then_validated_and_a_second_call_does_nothing(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _make_orders(conn)

    first = backfill.add_check_constraint(db_url, "orders", "orders_amount_positive", "amount > 0")
    second = backfill.add_check_constraint(db_url, "orders", "orders_amount_positive", "amount > 0")

    assert first.actions == ["add", "validate"]
    assert second.actions == []
    assert constraint_state(conn, "orders_amount_positive") == ("c", True)
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO orders VALUES (0, 1, -5)")


def test_check_validate_false_checks_new_rows_and_validate_finishes_it(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _make_orders(conn)

    added = backfill.add_check_constraint(db_url, "orders", "amount_positive", "amount > 0", validate=False)

    assert added.actions == ["add"]
    assert constraint_state(conn, "amount_positive") == ("c", False)
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO orders VALUES (0, 1, -5)")
    assert backfill.validate_check_constraint(db_url, "orders", "amount_positive").actions == ["validate"]
    assert backfill.validate_check_constraint(db_url, "orders", "amount_positive").actions == []
    assert constraint_state(conn, "amount_positive") == ("c", True)


def test_check_validate_with_violations_keeps_the_not_valid_constraint(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _make_orders(conn)
    backfill.add_check_constraint(db_url, "orders", "amount_large", "amount > 10", validate=False)

    with pytest.raises(backfill.ViolationError, match=r"\(id\)=\(\d+\); the CHECK constraint stays NOT VALID"):
        backfill.validate_check_constraint(db_url, "orders", "amount_large")

    assert constraint_state(conn, "amount_large") == ("c", False)


def test_check_condition_keeps_percent_signs_and_a_trailing_comment(conn: psycopg.Connection[Any], db_url: str) -> None:
    _make_orders(conn)

    backfill.add_check_constraint(db_url, "orders", "amount_even_or_big", "amount % 1 = 0 -- every integer")

    assert constraint_state(conn, "amount_even_or_big") == ("c", True)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda url: backfill.add_check_constraint(url, "nope", "c", "true"),
            "table nope does not exist",
        ),
        (
            lambda url: backfill.add_check_constraint(url, "orders", "orders_pkey", "true"),
            "public.orders already has a primary key named 'orders_pkey' (PRIMARY KEY (id)), not a CHECK constraint: "
            "choose another name",
        ),
        (
            lambda url: backfill.add_check_constraint(url, "orders", "c", "   "),
            "a CHECK constraint needs a condition: a non-empty SQL expression",
        ),
        (
            lambda url: backfill.add_check_constraint(
                url, "orders", "c", "amount > 0) NOT VALID; DROP TABLE orders; --"
            ),
            "the condition of a CHECK constraint must be one SQL expression: syntax error: a ')' closes a parenthesis "
            "the fragment did not open",
        ),
        (
            lambda url: backfill.validate_check_constraint(url, "orders", "nope"),
            "public.orders has no CHECK constraint named 'nope' to validate: add it first",
        ),
        (
            lambda url: backfill.add_check_constraint(url, "orders", "c", "nope > 0"),
            "cannot add CHECK constraint 'c' on public.orders: column \"nope\" does not exist [SQLSTATE 42703] "
            "(nothing was changed)",
        ),
    ],
    ids=["table", "other-kind", "empty", "escapes", "validate-missing", "bad-expression"],
)
def test_check_bad_input_is_one_line_and_changes_nothing(
    conn: psycopg.Connection[Any], db_url: str, call: Any, message: str
) -> None:
    _make_orders(conn)

    with pytest.raises(ConstraintError) as caught:
        call(db_url)

    assert str(caught.value) == message
    assert conn.execute(
        "SELECT count(*) FROM pg_constraint WHERE contype = 'c' AND conrelid = 'orders'::regclass"
    ).fetchone() == (0,)


def test_drop_check_drops_a_valid_or_not_valid_constraint_and_is_idempotent(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _make_orders(conn)
    backfill.add_check_constraint(db_url, "orders", "amount_positive", "amount > 0", validate=False)

    assert backfill.drop_check_constraint(db_url, "orders", "amount_positive").actions == ["drop"]
    assert backfill.drop_check_constraint(db_url, "orders", "amount_positive").actions == []
    assert constraint_state(conn, "amount_positive") is None


# --- foreign keys --------------------------------------------------------------------------------------------------


def test_foreign_key_is_added_not_valid_then_validated_and_advises_the_missing_index(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _make_orders(conn)

    with capture_logs() as logs:
        first = backfill.add_foreign_key(db_url, "orders", ["customer_id"], "customers", ["id"], on_delete="cascade")
    second = backfill.add_foreign_key(db_url, "orders", "customer_id", "customers", "id", on_delete="CASCADE")

    assert first.actions == ["add", "validate"]
    assert second.actions == []
    assert constraint_state(conn, "orders_customer_id_fkey") == ("f", True)
    advice = (
        "no index on public.orders (customer_id): every delete or key update on customers scans public.orders to "
        "check foreign key 'orders_customer_id_fkey'; build one with op.add_index_concurrently('orders', "
        "'customer_id')"
    )
    assert first.advice == (advice,)
    assert [e["advice"] for e in logs if e["event"] == "foreign_key_unindexed"] == [advice]
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("INSERT INTO orders VALUES (0, 999, 1)")
    conn.execute("DELETE FROM customers WHERE id = 5")
    assert conn.execute("SELECT count(*) FROM orders WHERE customer_id = 5").fetchone() == (0,)


def test_an_index_leading_with_the_columns_silences_the_advice(conn: psycopg.Connection[Any], db_url: str) -> None:
    _make_orders(conn)
    conn.execute("CREATE INDEX ON orders (customer_id, amount)")

    result = backfill.add_foreign_key(db_url, "orders", "customer_id", "customers", "id", name="orders_customer")

    assert result.advice == ()
    assert constraint_state(conn, "orders_customer") == ("f", True)


@pytest.mark.parametrize(
    ("spoil", "change", "name", "message"),
    [
        (
            "UPDATE orders SET amount = -1 WHERE id = 1234",
            lambda url: backfill.add_check_constraint(url, "orders", "amount_positive", "amount > 0"),
            "amount_positive",
            "cannot validate CHECK constraint 'amount_positive' on public.orders, existing rows violate it: e.g. the "
            "row with (id)=(1234); the CHECK constraint this call added was dropped again, nothing changed. Fix those "
            "rows and run again",
        ),
        (
            "UPDATE orders SET customer_id = 4242 WHERE id = 17",
            lambda url: backfill.add_foreign_key(url, "orders", "customer_id", "customers", "id"),
            "orders_customer_id_fkey",
            "cannot validate foreign key 'orders_customer_id_fkey' on public.orders, existing rows violate it: e.g. "
            'key (customer_id)=(4242) is not present in table "customers"; the foreign key this call added was '
            "dropped again, nothing changed. Fix those rows and run again",
        ),
    ],
    ids=["check", "foreign-key"],
)
def test_a_violated_constraint_names_a_row_and_drops_what_it_added(
    conn: psycopg.Connection[Any], db_url: str, spoil: str, change: Callable[[str], object], name: str, message: str
) -> None:
    violation = _refused(conn, db_url, backfill.ViolationError, spoil, change)

    assert str(violation) == message
    assert constraint_state(conn, name) is None


@pytest.mark.parametrize("change", ["add", "drop"])
def test_a_foreign_key_change_never_queues_for_one_table_while_holding_the_other(
    conn: psycopg.Connection[Any], db_url: str, change: str
) -> None:
    """An application transaction writes the referenced table, then the referencing one. The ADD (and the DROP)
    used to take the referencing table and queue for the referenced one: the application's second write then
    closed a deadlock cycle, and the deadlock detector could abort the application's transaction. Now the step
    queues holding nothing, and the application's transaction goes through."""
    _make_orders(conn)
    if change == "drop":
        conn.execute(
            "ALTER TABLE orders ADD CONSTRAINT orders_customer_id_fkey FOREIGN KEY (customer_id) REFERENCES customers"
        )
    app = psycopg.connect(db_url)
    # The application's side runs the deadlock check first: it would be the victim of a cycle.
    app.execute("SET deadlock_timeout = '20ms'")
    app.execute("SET statement_timeout = '20s'")
    app.execute("INSERT INTO customers VALUES (1000, 'new@example.com')")
    outcome: list[Any] = []

    def add() -> None:
        try:
            if change == "add":
                outcome.append(backfill.add_foreign_key(db_url, "orders", "customer_id", "customers", "id"))
            else:
                outcome.append(backfill.drop_foreign_key(db_url, "orders", "orders_customer_id_fkey"))
        except BaseException as exc:
            outcome.append(exc)

    adder = threading.Thread(target=add, daemon=True)
    adder.start()
    try:

        def queued() -> bool:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE relation = 'customers'::regclass AND NOT granted AND pid <> %s",
                (app.info.backend_pid,),
            ).fetchone()
            return row is not None and row[0] > 0

        wait_for(queued, "the change to queue for the referenced table")
        app.execute("INSERT INTO orders VALUES (100000, 1000, 1)")
        app.commit()
    finally:
        app.close()
        adder.join(60)

    [result] = outcome
    assert isinstance(result, backfill.ChangeResult), result
    assert result.actions == (["add", "validate"] if change == "add" else ["drop"])
    assert constraint_state(conn, "orders_customer_id_fkey") == (("f", True) if change == "add" else None)
    assert conn.execute("SELECT customer_id FROM orders WHERE id = 100000").fetchone() == (1000,)


def test_a_role_that_may_only_reference_the_other_table_adds_and_drops_its_foreign_key(
    conn: psycopg.Connection[Any], db_url: str, roles: Callable[[str], str]
) -> None:
    """The role owns orders and holds only REFERENCES on customers: PostgreSQL lets it add and drop the key, taking
    the locks itself, while ``LOCK TABLE customers`` would need UPDATE, DELETE or TRUNCATE on it. The step skips the
    explicit lock it may not take instead of failing."""
    _make_orders(conn)
    url = roles("owner")
    role = sql.Identifier(str(make_url(url).username))
    conn.execute(sql.SQL("ALTER TABLE orders OWNER TO {}").format(role))
    conn.execute(sql.SQL("GRANT REFERENCES ON customers TO {}").format(role))

    added = backfill.add_foreign_key(url, "orders", "customer_id", "customers", "id")
    assert added.actions == ["add", "validate"]
    assert constraint_state(conn, "orders_customer_id_fkey") == ("f", True)

    dropped = backfill.drop_foreign_key(url, "orders", "orders_customer_id_fkey")
    assert dropped.actions == ["drop"]
    assert constraint_state(conn, "orders_customer_id_fkey") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"referent_columns": ["id", "email"]},
            "a foreign key needs as many referent_columns as columns: ['customer_id'] -> ['id', 'email']",
        ),
        (
            {"on_delete": "explode"},
            "on_delete must be one of CASCADE, SET NULL, SET DEFAULT, RESTRICT, NO ACTION (or None), got 'explode'",
        ),
        ({"referent_table": "nope"}, "table nope does not exist"),
        ({"columns": "nope"}, "column 'nope' does not exist in table public.orders"),
        (
            {"referent_columns": "email"},
            "cannot add foreign key 'orders_customer_id_fkey' on public.orders: there is no unique constraint "
            'matching given keys for referenced table "customers" [SQLSTATE 42830] (nothing was changed)',
        ),
    ],
    ids=["arity", "on-delete", "referent", "column", "no-unique"],
)
def test_foreign_key_bad_input_is_one_line_and_changes_nothing(
    conn: psycopg.Connection[Any], db_url: str, kwargs: dict[str, Any], message: str
) -> None:
    _make_orders(conn)
    arguments = {"columns": "customer_id", "referent_table": "customers", "referent_columns": "id", **kwargs}

    with pytest.raises(ConstraintError) as caught:
        backfill.add_foreign_key(db_url, "orders", **arguments)

    assert str(caught.value) == message
    assert conn.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f'").fetchone() == (0,)


# --- indexes -----------------------------------------------------------------------------------------------------


def test_index_is_built_concurrently_and_a_second_call_does_nothing(conn: psycopg.Connection[Any], db_url: str) -> None:
    _make_orders(conn)

    first = backfill.add_index_concurrently(db_url, "orders", ["customer_id"], where="amount > 10")
    second = backfill.add_index_concurrently(db_url, "orders", ["customer_id"], where="amount > 10")

    assert first.actions == ["create_index"]
    assert second.actions == []
    assert index_state(conn, "orders_customer_id_idx") == (True, False)
    definition = conn.execute("SELECT pg_get_indexdef('orders_customer_id_idx'::regclass)").fetchone()
    assert definition == (
        "CREATE INDEX orders_customer_id_idx ON public.orders USING btree (customer_id) WHERE (amount > 10)",
    )


def test_an_invalid_index_left_by_a_failed_build_is_dropped_and_rebuilt(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _make_orders(conn)
    conn.execute("INSERT INTO customers VALUES (101, 'c1@example.com')")
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("CREATE UNIQUE INDEX CONCURRENTLY customers_email_idx ON customers (email)")
    assert index_state(conn, "customers_email_idx") == (False, True)
    conn.execute("DELETE FROM customers WHERE id = 101")

    result = backfill.add_index_concurrently(db_url, "customers", "email", unique=True)

    assert result.actions == ["drop_invalid_index", "create_index"]
    assert index_state(conn, "customers_email_idx") == (True, True)


def test_a_unique_build_on_duplicates_names_the_key_and_leaves_no_index(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    duplicate = _refused(
        conn,
        db_url,
        backfill.DuplicateKeyError,
        "INSERT INTO customers VALUES (101, 'c7@example.com')",
        lambda url: backfill.add_index_concurrently(url, "customers", ["email"], unique=True),
    )

    assert str(duplicate) == (
        "cannot build unique index 'customers_email_idx' on public.customers, rows share a key: key "
        "(email)=(c7@example.com) is duplicated; the INVALID index the build left was dropped again. Remove the "
        "duplicates and run again"
    )
    assert duplicate.key == "Key (email)=(c7@example.com)"
    assert index_state(conn, "customers_email_idx") is None
    conn.execute("INSERT INTO customers VALUES (102, 'c7@example.com')")  # nothing enforces it: no index is left


def test_the_build_names_the_sessions_it_waits_for(conn: psycopg.Connection[Any], db_url: str) -> None:
    """A transaction with an old snapshot (a report, say) holds the build back before it is marked valid: the
    watcher names its pid, application name and age, and the build finishes once it commits."""
    _make_orders(conn)
    report = psycopg.connect(db_url, application_name="monthly-report")
    report.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    report.execute("SELECT count(*) FROM customers")
    report_pid = report.info.backend_pid
    outcome: list[Any] = []

    def build() -> None:
        try:
            outcome.append(backfill.add_index_concurrently(db_url, "orders", "amount", watch_interval=0.05))
        except BaseException as exc:
            outcome.append(exc)

    with capture_logs() as logs:
        builder = threading.Thread(target=build, daemon=True)
        builder.start()
        try:
            wait_for(lambda: any(e["event"] == "index_build_waiting" for e in logs), "the build to report its wait")
        finally:
            report.commit()
            report.close()
        builder.join(60)

    waiting = next(e for e in logs if e["event"] == "index_build_waiting")
    assert waiting["index"] == "orders_amount_idx"
    assert [(s["pid"], s["application_name"]) for s in waiting["sessions"]] == [(report_pid, "monthly-report")]
    assert waiting["sessions"][0]["age_s"] >= 0
    [result] = outcome
    assert isinstance(result, backfill.ChangeResult)
    assert [(pid, name) for pid, name, _ in result.waited_for] == [(report_pid, "monthly-report")]
    assert index_state(conn, "orders_amount_idx") == (True, False)


def test_the_build_runs_without_the_session_timeouts_and_puts_them_back(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    """A lock_timeout (of the role, say) would cut the build's waits short and leave an INVALID index."""
    _make_orders(conn)
    report = psycopg.connect(db_url)
    report.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    report.execute("SELECT 1")
    with psycopg.connect(db_url, autocommit=True) as own:
        own.execute("SET lock_timeout = '10ms'")
        session = PsycopgSession(own)
        state = index.read_index_of_table(session, "orders", "orders_amount_idx", schema=None)
        releaser = threading.Timer(0.5, report.commit)
        releaser.start()
        try:
            index.apply_index_plan(session, index.plan_add_index(state, "amount"))
        finally:
            releaser.join()
            report.close()
        after = session.fetchall(ddl.TIMEOUTS)[0]

    assert after == ("10ms", "0")
    assert index_state(conn, "orders_amount_idx") == (True, False)


def test_drop_index_concurrently_is_idempotent_and_refuses_a_constraint_index(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _make_orders(conn)
    conn.execute("CREATE INDEX orders_amount_idx ON orders (amount)")

    assert backfill.drop_index_concurrently(db_url, "orders_amount_idx").actions == ["drop_index"]
    assert backfill.drop_index_concurrently(db_url, "orders_amount_idx", table="orders").actions == []
    assert index_state(conn, "orders_amount_idx") is None
    with pytest.raises(ConstraintError, match=r"backs constraint 'orders_pkey' of public.orders: drop the constraint"):
        backfill.drop_index_concurrently(db_url, "public.orders_pkey")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda url: backfill.add_index_concurrently(url, "orders", "amount", name="customers"),
            "public.customers exists and is not an index",
        ),
        (
            lambda url: backfill.add_index_concurrently(url, "orders", "amount", name="customers_pkey"),
            "index public.customers_pkey already exists on table public.customers, not public.orders: choose another "
            "name",
        ),
        (
            lambda url: backfill.add_index_concurrently(url, "orders", "amount", name="orders_pkey"),
            None,
        ),
        (
            lambda url: backfill.add_index_concurrently(url, "orders", "nope"),
            "cannot build index 'orders_nope_idx' on public.orders: column \"nope\" does not exist [SQLSTATE 42703]; "
            "no index was left "
            "behind",
        ),
        (
            lambda url: backfill.add_index_concurrently(url, "orders", "amount", where="true) WITH (fillfactor=10"),
            "the where of an index must be one SQL expression: syntax error: a ')' closes a parenthesis the fragment "
            "did not open",
        ),
        (
            lambda url: backfill.add_index_concurrently(url, "orders", []),
            "columns must be a column name or a non-empty list of column names, got []",
        ),
    ],
    ids=["a-table", "other-table", "same-name", "column", "escapes", "no-columns"],
)
def test_index_bad_input_is_one_line(
    conn: psycopg.Connection[Any], db_url: str, call: Any, message: str | None
) -> None:
    _make_orders(conn)

    if message is None:
        # A valid unique index of that name (the primary key's) is taken as this one only if uniqueness matches.
        with pytest.raises(ConstraintError, match="exists .* but the one asked for is not unique"):
            call(db_url)
        return
    with pytest.raises(ConstraintError) as caught:
        call(db_url)

    assert str(caught.value) == message


# --- planning, without a database ----------------------------------------------------------------------------------


def _state(kind: str | None, validated: bool) -> ConstraintState:
    return ConstraintState("public", "orders", "c", kind, validated)


@pytest.mark.parametrize(
    ("kind", "validated", "validate", "actions"),
    [
        (None, False, True, ["add", "validate"]),
        (None, False, False, ["add"]),
        ("c", False, True, ["validate"]),
        ("c", False, False, []),
        ("c", True, True, []),
    ],
)
def test_plan_add_runs_only_what_the_catalog_says_is_left(
    kind: str | None, validated: bool, validate: bool, actions: list[str]
) -> None:
    plan = check.plan_add_check(_state(kind, validated), "amount > 0", validate=validate)

    assert [step.action for step in plan.steps] == actions
    assert [step.exclusive for step in plan.steps] == [action == "add" for action in actions]
    assert plan.adds is (kind is None)


def test_plan_drop_only_when_the_constraint_exists() -> None:
    assert [s.action for s in check.CHECK.plan_drop(_state("c", False)).steps] == ["drop"]
    assert check.CHECK.plan_drop(_state(None, False)).steps == ()


def test_foreign_key_arguments_are_checked_before_any_connection() -> None:
    key = foreign_key.foreign_key(["a", "b"], "app.parents", ["x", "y"], on_delete="set  null")

    assert (key.referent_schema, key.referent, key.on_delete) == ("app", "parents", "SET NULL")
    assert foreign_key.fk_name("app.children", key.columns) == "children_a_b_fkey"


@pytest.mark.parametrize(
    ("exists", "valid", "actions"),
    [(False, False, ["create_index"]), (True, False, ["drop_invalid_index", "create_index"]), (True, True, [])],
)
def test_plan_add_index_rebuilds_an_invalid_index(exists: bool, valid: bool, actions: list[str]) -> None:
    state = index.IndexState("public", "orders_amount_idx", "orders", exists, valid)

    assert [step.action for step in index.plan_add_index(state, ["amount"]).steps] == actions


# --- how far an integer key is from its limit ----------------------------------------------------------------------


def test_headroom_of_a_serial_key_near_its_limit(conn: psycopg.Connection[Any], db_url: str) -> None:
    conn.execute("CREATE TABLE tickets (id serial PRIMARY KEY, note text)")
    conn.execute("SELECT setval('tickets_id_seq', 2000000000)")

    headroom = backfill.key_headroom(db_url, "tickets")

    assert (headroom.column, headroom.column_type, headroom.sequence) == ("id", "integer", "public.tickets_id_seq")
    assert (headroom.current, headroom.limit, headroom.remaining) == (2_000_000_000, 2_147_483_647, 147_483_647)
    assert headroom.describe() == (
        "public.tickets.id (integer, sequence public.tickets_id_seq): 2,000,000,000 of 2,147,483,647 used (93.1%), "
        "147,483,647 left"
    )


def test_headroom_of_identity_bigint_and_keys_without_a_sequence(conn: psycopg.Connection[Any], db_url: str) -> None:
    conn.execute('CREATE SCHEMA "App"')
    conn.execute('CREATE TABLE "App"."Big" (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY)')
    conn.execute("CREATE TABLE small (id smallint PRIMARY KEY, n integer)")
    conn.execute("INSERT INTO small VALUES (30000, 1)")

    fresh = backfill.key_headroom(db_url, "Big", schema="App")
    manual = backfill.key_headroom(db_url, "small")

    assert (fresh.sequence, fresh.current, fresh.limit, fresh.used) == ('"App"."Big_id_seq"', None, 2**63 - 1, 0.0)
    assert (manual.sequence, manual.current, manual.limit, manual.remaining) == (None, 30_000, 32_767, 2_767)
    assert "no sequence: its largest value" in manual.describe()


@pytest.mark.parametrize(
    ("table", "column", "message"),
    [
        ("pairs", None, "public.pairs has no single-column primary key: name the column"),
        ("pairs", "label", "public.pairs.label is text, not an integer column"),
        ("pairs", "nope", "column 'nope' does not exist in table public.pairs"),
    ],
)
def test_headroom_of_what_is_not_one_integer_key_is_a_clear_error(
    conn: psycopg.Connection[Any], db_url: str, table: str, column: str | None, message: str
) -> None:
    conn.execute("CREATE TABLE pairs (a integer, b integer, label text, PRIMARY KEY (a, b))")

    with pytest.raises(ConstraintError) as caught:
        backfill.key_headroom(db_url, table, column)

    assert str(caught.value) == message
