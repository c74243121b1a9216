"""The NOT NULL pattern as plain functions: no ACCESS EXCLUSIVE scan, idempotent from the catalog, bounded lock
waits, and nothing half-applied when NULLs remain. Planner and retry logic are also tested without a database."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from psycopg import sql
from support import wait_for

from backfill.schema import ddl
from backfill.schema import notnull as constraints
from backfill.schema.notnull import (
    ColumnState,
    ConstraintError,
    LockRetry,
    LockUnavailableError,
    NullValuesError,
    PsycopgSession,
    Step,
)
from backfill.tools.appsim import AppSimulator


def server_version(conn: psycopg.Connection[Any]) -> int:
    return conn.info.server_version


# --- catalog helpers -------------------------------------------------------------------------------------------


def _make_events(conn: psycopg.Connection[Any], rows: int = 5_000, nulls: int = 0) -> None:
    conn.execute("CREATE TABLE events (id bigint PRIMARY KEY, kind text)")
    conn.execute(
        "INSERT INTO events SELECT g, CASE WHEN g <= %s THEN NULL ELSE 'k' END FROM generate_series(1, %s) g",
        (nulls, rows),
    )


def _not_null(conn: psycopg.Connection[Any], column: str = "kind") -> bool:
    row = conn.execute(
        "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'events'::regclass AND attname = %s", (column,)
    ).fetchone()
    assert row is not None
    return bool(row[0])


def _constraints(conn: psycopg.Connection[Any]) -> set[tuple[str, str, bool]]:
    """Constraints of events other than the primary key's: (name, type, validated)."""
    rows = conn.execute(
        "SELECT conname, contype::text, convalidated FROM pg_constraint "
        "WHERE conrelid = 'events'::regclass AND contype IN ('c', 'n') AND conname NOT LIKE 'events_id_%'"
    ).fetchall()
    return {(name, kind, valid) for name, kind, valid in rows}


def _expected_actions(conn: psycopg.Connection[Any]) -> list[str]:
    if server_version(conn) >= constraints.PG18:
        return ["add", "validate"]
    return ["add", "validate", "set_not_null", "drop_check"]


def _final_constraints(conn: psycopg.Connection[Any]) -> set[tuple[str, str, bool]]:
    # PostgreSQL 18 keeps NOT NULL as a named, validated constraint; 12-17 only as attnotnull (the CHECK is gone).
    return {("events_kind_not_null", "n", True)} if server_version(conn) >= constraints.PG18 else set()


# --- the happy path ----------------------------------------------------------------------------------------------


def test_add_not_null_runs_each_step_and_leaves_a_valid_not_null(conn: psycopg.Connection[Any], db_url: str) -> None:
    _make_events(conn)

    results = constraints.add_not_null_constraint(db_url, "events", "kind")

    assert [r.action for r in results] == _expected_actions(conn)
    assert _not_null(conn)
    assert _constraints(conn) == _final_constraints(conn)
    with pytest.raises(psycopg.errors.NotNullViolation):
        conn.execute("INSERT INTO events VALUES (0, NULL)")


def test_set_not_null_is_proved_by_the_valid_check_without_a_scan(conn: psycopg.Connection[Any], db_url: str) -> None:
    """The CHECK path (the only path on 12-17, and what offline scripts use on every version): the server reports
    at DEBUG1 that the valid CHECK is 'sufficient to prove' the column has no NULL, i.e. SET NOT NULL skipped its
    table scan under ACCESS EXCLUSIVE."""
    _make_events(conn)
    with psycopg.connect(db_url, autocommit=True) as own:
        session = PsycopgSession(own)
        state = constraints.read_state(session, "events", "kind", schema=None, name=None)
        check_path = dataclasses.replace(state, server_version=170000)  # take the 12-17 path on any server
        results = constraints.apply_steps(session, constraints.plan_add(check_path))

    assert [(r.action, r.proved_by_check) for r in results] == [
        ("add", None),
        ("validate", None),
        ("set_not_null", True),
        ("drop_check", None),
    ]
    assert _not_null(conn)


def test_validate_false_adds_a_not_valid_constraint_that_checks_new_rows(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    _make_events(conn)

    added = constraints.add_not_null_constraint(db_url, "events", "kind", validate=False)

    assert [r.action for r in added] == ["add"]
    assert all(not valid for _, _, valid in _constraints(conn))
    with pytest.raises((psycopg.errors.NotNullViolation, psycopg.errors.CheckViolation)):
        conn.execute("INSERT INTO events VALUES (0, NULL)")

    finished = constraints.validate_not_null_constraint(db_url, "events", "kind")

    assert [r.action for r in finished] == _expected_actions(conn)[1:]
    assert _not_null(conn)
    assert _constraints(conn) == _final_constraints(conn)


def test_a_column_already_not_null_needs_no_step(conn: psycopg.Connection[Any], db_url: str) -> None:
    _make_events(conn)
    constraints.add_not_null_constraint(db_url, "events", "kind")

    assert constraints.add_not_null_constraint(db_url, "events", "kind") == []
    assert constraints.validate_not_null_constraint(db_url, "events", "kind") == []


def test_a_change_that_died_between_steps_resumes_with_the_steps_left(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    """For every point between two steps: run the plan's first steps by hand (as if the process died there), then
    a second call reads the catalog and runs exactly the rest."""
    _make_events(conn)
    with psycopg.connect(db_url, autocommit=True) as own:
        session = PsycopgSession(own)
        plan = constraints.plan_add(constraints.read_state(session, "events", "kind", schema=None, name=None))
    for done in range(1, len(plan.steps)):
        conn.execute("DROP TABLE events")
        _make_events(conn)
        for step in plan.steps[:done]:
            conn.execute(step.statement)

        results = constraints.add_not_null_constraint(db_url, "events", "kind")

        assert [r.action for r in results] == [s.action for s in plan.steps[done:]]
        assert _not_null(conn)
        assert _constraints(conn) == _final_constraints(conn)


def test_drop_not_null_undoes_a_finished_or_half_done_change(conn: psycopg.Connection[Any], db_url: str) -> None:
    _make_events(conn)
    constraints.add_not_null_constraint(db_url, "events", "kind")

    constraints.drop_not_null_constraint(db_url, "events", "kind")

    assert not _not_null(conn)
    assert _constraints(conn) == set()

    constraints.add_not_null_constraint(db_url, "events", "kind", validate=False)
    constraints.drop_not_null_constraint(db_url, "events", "kind")

    assert not _not_null(conn)
    assert _constraints(conn) == set()
    conn.execute("INSERT INTO events VALUES (0, NULL)")


def test_schema_and_long_names_are_quoted_and_clipped_like_the_server(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    table = "Événements " + "x" * 60  # clipped to 63 bytes by the server, on a character boundary
    conn.execute('CREATE SCHEMA "App"')
    conn.execute(sql.SQL('CREATE TABLE "App".{} (id int PRIMARY KEY, "Kind" text)').format(sql.Identifier(table)))
    conn.execute(sql.SQL("INSERT INTO \"App\".{} VALUES (1, 'a')").format(sql.Identifier(table)))

    constraints.add_not_null_constraint(db_url, table, "Kind", schema="App")
    again = constraints.add_not_null_constraint(db_url, f"App.{table}", "Kind")

    assert again == []
    row = conn.execute(
        sql.SQL("SELECT attnotnull FROM pg_attribute WHERE attrelid = {}::regclass AND attname = 'Kind'").format(
            sql.Literal(sql.Identifier("App", table).as_string(conn))
        )
    ).fetchone()
    assert row == (True,)


# --- bad input -----------------------------------------------------------------------------------------------------


def test_nulls_left_fail_with_their_count_and_nothing_half_applied(conn: psycopg.Connection[Any], db_url: str) -> None:
    _make_events(conn, nulls=3)

    with pytest.raises(NullValuesError) as caught:
        constraints.add_not_null_constraint(db_url, "events", "kind")

    assert caught.value.null_rows == 3
    assert "public.events.kind" in str(caught.value) and "3 row(s)" in str(caught.value)
    assert not _not_null(conn)
    assert _constraints(conn) == set()


def test_validate_with_nulls_keeps_the_earlier_not_valid_constraint(conn: psycopg.Connection[Any], db_url: str) -> None:
    _make_events(conn, nulls=2)
    constraints.add_not_null_constraint(db_url, "events", "kind", validate=False)

    with pytest.raises(NullValuesError) as caught:
        constraints.validate_not_null_constraint(db_url, "events", "kind")

    assert caught.value.null_rows == 2
    assert [valid for _, _, valid in _constraints(conn)] == [False]


@pytest.mark.parametrize(
    ("table", "column", "message"),
    [
        ("nope", "kind", "table nope does not exist"),
        ("events", "nope", "column 'nope' does not exist in table public.events"),
    ],
)
def test_unknown_table_or_column_is_a_clear_error(
    conn: psycopg.Connection[Any], db_url: str, table: str, column: str, message: str
) -> None:
    _make_events(conn)

    with pytest.raises(ConstraintError) as caught:
        constraints.add_not_null_constraint(db_url, table, column)

    assert str(caught.value) == message


def test_validate_without_a_not_valid_constraint_is_a_clear_error(conn: psycopg.Connection[Any], db_url: str) -> None:
    _make_events(conn)

    with pytest.raises(ConstraintError, match="no NOT VALID not-null constraint to validate"):
        constraints.validate_not_null_constraint(db_url, "events", "kind")


# --- lock waits ----------------------------------------------------------------------------------------------------


def test_a_long_lock_holder_makes_steps_retry_while_writers_wait_at_most_the_lock_timeout(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    """A long transaction holds ACCESS SHARE on the table. Queued behind it, an ALTER TABLE would block every
    writer for as long as the transaction lasts; with a short lock_timeout the step gives up, backs off and tries
    again, so each write waits at most about lock_timeout."""
    _make_events(conn)
    lock_timeout, margin = 0.3, 1.5
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    holder = psycopg.connect(db_url)
    holder.execute("SELECT count(*) FROM events")  # ACCESS SHARE until commit
    held_since = time.monotonic()
    app = AppSimulator(db_url, update_sql="UPDATE events SET kind = kind WHERE id = %s", writers=1, key_range=(1, 1000))
    app.start()
    held = 0.0

    def release_after_retries() -> None:
        nonlocal held
        wait_for(lambda: len(waits) >= 3, "three lock retries")
        held = time.monotonic() - held_since
        holder.commit()

    releaser = threading.Thread(target=release_after_retries, daemon=True)
    releaser.start()
    try:
        results = constraints.add_not_null_constraint(db_url, "events", "kind", lock_timeout=lock_timeout, sleep=sleep)
    finally:
        releaser.join(30)
        writes = app.stop()
        holder.close()

    assert (writes.errors, writes.last_error) == (0, None)
    assert results[0].action == "add" and results[0].attempts >= 4
    assert _not_null(conn)
    assert held > lock_timeout + margin, "the holder must outlast the bound for the bound to mean anything"
    assert writes.writes > 0
    assert writes.max_stall_ms / 1000 < lock_timeout + margin


def test_a_lock_never_granted_within_the_budget_fails_cleanly(conn: psycopg.Connection[Any], db_url: str) -> None:
    _make_events(conn)
    with psycopg.connect(db_url) as holder:
        holder.execute("SELECT count(*) FROM events")

        with pytest.raises(LockUnavailableError, match="could not lock the table for add"):
            constraints.add_not_null_constraint(
                db_url, "events", "kind", lock_timeout=0.1, retry_seconds=0.5, sleep=lambda s: time.sleep(0.05)
            )

        waiting = conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()
        holder.rollback()
    assert waiting == (0,)
    assert _constraints(conn) == set()


# --- planning and retrying without a database ---------------------------------------------------------------------


def _state(**changes: Any) -> ColumnState:
    base = ColumnState(
        schema="public",
        table="events",
        column="kind",
        not_null=False,
        not_null_constraint=None,
        check=None,
        server_version=170004,
    )
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("state", "actions"),
    [
        (_state(), ["add", "validate", "set_not_null", "drop_check"]),
        (_state(check=False), ["validate", "set_not_null", "drop_check"]),
        (_state(check=True), ["set_not_null", "drop_check"]),
        (_state(not_null=True, check=True), ["drop_check"]),
        (_state(not_null=True), []),
        (_state(server_version=180001), ["add", "validate"]),
        (_state(server_version=180001, not_null=True, not_null_constraint=("nn", False)), ["validate"]),
        (_state(server_version=180001, not_null=True, not_null_constraint=("nn", True)), []),
        # A CHECK of ours on 18 (an offline script or an earlier run took the CHECK path): finish that path.
        (_state(server_version=180001, check=True), ["set_not_null", "drop_check"]),
        (_state(server_version=None), ["add", "validate", "set_not_null", "drop_check"]),
    ],
)
def test_plan_add_runs_only_what_the_catalog_says_is_left(state: ColumnState, actions: list[str]) -> None:
    assert [s.action for s in constraints.plan_add(state).steps] == actions


def test_plan_marks_access_exclusive_steps_and_names_the_constraint_it_adds() -> None:
    check_plan = constraints.plan_add(_state())
    native_plan = constraints.plan_add(_state(server_version=180001), name="kind_required")

    assert [(s.action, s.exclusive) for s in check_plan.steps] == [
        ("add", True),
        ("validate", False),
        ("set_not_null", True),
        ("drop_check", True),
    ]
    assert check_plan.adds == "events_kind_not_null_check"
    assert native_plan.adds == "kind_required"
    assert ddl.render(native_plan.steps[0].statement) == (
        'ALTER TABLE "public"."events" ADD CONSTRAINT "kind_required" NOT NULL "kind" NOT VALID'
    )


def test_plan_validate_without_a_not_valid_constraint_raises() -> None:
    with pytest.raises(ConstraintError, match="has no NOT VALID not-null constraint"):
        constraints.plan_validate(_state())


def test_plan_drop_covers_every_stage() -> None:
    assert [s.action for s in constraints.plan_drop(_state(not_null=True, check=True)).steps] == [
        "drop_check",
        "drop_not_null",
    ]
    assert constraints.plan_drop(_state()).steps == ()


class _FlakySession:
    """Fails the first ``failures`` transactions with ``error``; records what ran."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.transactions: list[list[str]] = []

    def fetchall(self, statement: sql.Composable, params: Any = (), before: Any = ()) -> list[tuple[Any, ...]]:
        # Only the look for NULLs that precedes adding a NOT VALID constraint is expected: there are none.
        assert ddl.render(statement).startswith("SELECT EXISTS (SELECT 1 FROM"), ddl.render(statement)
        return [(False,)]

    def run(self, statements: Sequence[sql.Composable], *, capture_notices: bool = False) -> list[str]:
        self.transactions.append([ddl.render(s) for s in statements])
        if len(self.transactions) <= self.failures:
            raise self.error
        return []


def _one_step_plan() -> constraints.NotNullPlan:
    statement = ddl.add_check_not_valid(sql.Identifier("public", "events"), "c", "kind")
    return constraints.NotNullPlan(_state(), (Step("add", statement, True),))


def test_a_lock_timeout_is_retried_with_backoff_under_a_short_lock_timeout() -> None:
    session = _FlakySession(3, psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"))
    sleeps: list[float] = []

    results = constraints.apply_steps(
        session, _one_step_plan(), LockRetry(lock_timeout=0.25, initial_wait=1.0, sleep=sleeps.append)
    )

    assert results[0].attempts == 4
    assert len(sleeps) == 3 and sleeps[0] < sleeps[2]
    assert session.transactions[0][0] == "SET LOCAL lock_timeout = '250ms'"


def test_the_retry_budget_is_measured_on_the_injected_clock() -> None:
    now = [0.0]
    session = _FlakySession(100, psycopg.errors.LockNotAvailable("lock timeout"))

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(LockUnavailableError):
        constraints.apply_steps(
            session, _one_step_plan(), LockRetry(budget_seconds=60, sleep=sleep, clock=lambda: now[0])
        )
    assert 60 <= now[0] < 60 + 15 + 1
    assert len(session.transactions) < 100


def test_other_errors_are_not_retried_and_become_a_constraint_error_naming_what_is_left() -> None:
    session = _FlakySession(1, psycopg.errors.InsufficientPrivilege("must be owner of table events"))

    with pytest.raises(ConstraintError) as caught:
        constraints.apply_steps(session, _one_step_plan(), LockRetry(sleep=lambda s: None))
    assert len(session.transactions) == 1
    assert str(caught.value) == (
        "add step on public.events.kind failed: must be owner of table events [SQLSTATE 42501] (nothing changed); "
        "run it again: it continues from what the catalog shows"
    )


class _ScanCancelledSession(_FlakySession):
    """The validating scan is cancelled (a timeout); every other transaction succeeds."""

    def __init__(self) -> None:
        super().__init__(0, psycopg.errors.QueryCanceled("canceling statement due to statement timeout"))

    def run(self, statements: Sequence[sql.Composable], *, capture_notices: bool = False) -> list[str]:
        self.transactions.append([ddl.render(s) for s in statements])
        if any("VALIDATE" in line for line in self.transactions[-1]):
            raise self.error
        return []


def test_a_cancelled_scan_drops_the_constraint_this_call_added_and_says_so() -> None:
    session = _ScanCancelledSession()

    with pytest.raises(ConstraintError) as caught:
        constraints.apply_steps(session, constraints.plan_add(_state()), validate_timeout=0.5)

    assert str(caught.value) == (
        "validate step on public.events.kind failed: canceling statement due to statement timeout [SQLSTATE 57014] "
        "(the constraint added by this call was dropped again, nothing changed); run it again: it continues from "
        "what the catalog shows"
    )
    validate, undo = session.transactions[1:]
    assert validate[0] == "SET LOCAL statement_timeout = '500ms'"
    assert undo[-1] == 'ALTER TABLE "public"."events" DROP CONSTRAINT IF EXISTS "events_kind_not_null_check"'


def test_every_step_sets_its_own_statement_timeout_so_a_role_default_cannot_cancel_it() -> None:
    session = _FlakySession(0, RuntimeError("unused"))

    constraints.apply_steps(session, constraints.plan_add(_state()))

    timeouts = [next(s for s in t if "statement_timeout" in s) for t in session.transactions]
    assert timeouts == ["SET LOCAL statement_timeout = '0'"] * 4
