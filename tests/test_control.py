"""The control tables: created idempotently, private, versioned; they hold the spec, the state and the checkpoint."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from support import make_items

import backfill
from backfill import (
    BackfillSpec,
    ControlTablesMissingError,
    RunOutcome,
    RunState,
    SpecMismatchError,
    StateTransitionError,
    UnknownBackfillError,
)


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    return make_items(conn, 300, "n integer NOT NULL DEFAULT 0, label text")


SPEC = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=50)


def _counts(conn: psycopg.Connection[Any]) -> dict[int, int]:
    return dict(conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall())


def test_init_is_idempotent_and_safe_to_race(conn: psycopg.Connection[Any], db_url: str) -> None:
    errors: list[BaseException] = []

    def init() -> None:
        try:
            backfill.init_control_tables(db_url)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=init) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    backfill.init_control_tables(db_url)

    assert errors == []
    assert conn.execute("SELECT version FROM backfill_meta").fetchall() == [(2,)]


def test_the_state_column_accepts_exactly_the_run_states(items: psycopg.Connection[Any], db_url: str) -> None:
    backfill.register_backfill(db_url, SPEC)

    assert ("pending",) == items.execute("SELECT state FROM backfills").fetchone()
    for state in RunState:
        items.execute("UPDATE backfills SET state = %s", (state.value,))
    with pytest.raises(psycopg.errors.CheckViolation):
        items.execute("UPDATE backfills SET state = 'done'")


def test_control_tables_are_not_readable_by_public(conn: psycopg.Connection[Any], db_url: str) -> None:
    backfill.init_control_tables(db_url)
    conn.execute("CREATE ROLE app_reader NOLOGIN")
    try:
        granted = conn.execute(
            "SELECT has_table_privilege('app_reader', t, 'SELECT') FROM unnest(%s::text[]) t",
            (["public.backfills", "public.backfill_slices", "public.backfill_meta"],),
        ).fetchall()
    finally:
        conn.execute("DROP ROLE app_reader")

    assert granted == [(False,), (False,), (False,)]


def test_control_schema_is_configurable(items: psycopg.Connection[Any], db_url: str) -> None:
    report = backfill.run_backfill(db_url, SPEC, control_schema="ops")

    assert report.outcome is RunOutcome.FINISHED
    assert items.execute("SELECT name, state FROM ops.backfills").fetchall() == [("inc", "succeeded")]
    assert items.execute("SELECT to_regclass('public.backfills')").fetchone() == (None,)


def test_missing_control_tables_are_named_with_the_fix(db_url: str) -> None:
    with pytest.raises(ControlTablesMissingError, match="run `backfill init`"):
        backfill.get_backfill(db_url, "anything")


def test_unknown_backfill_name(db_url: str) -> None:
    backfill.init_control_tables(db_url)

    with pytest.raises(UnknownBackfillError, match="no backfill named 'nope'"):
        backfill.run_backfill(db_url, "nope")


def test_the_spec_is_stored_whole_so_a_name_alone_resumes_it(items: psycopg.Connection[Any], db_url: str) -> None:
    spec = BackfillSpec("lbl", "items", {"label": "'n' || id"}, where="id > 100", batch_size=40)
    backfill.run_backfill(db_url, spec, max_batches=1)

    report = backfill.run_backfill(db_url, "lbl")

    assert report.outcome is RunOutcome.FINISHED
    assert items.execute("SELECT count(*) FROM items WHERE label = 'n' || id").fetchone() == (200,)
    stored = items.execute("SELECT spec FROM backfills WHERE name = 'lbl'").fetchone()
    assert stored is not None
    assert BackfillSpec.from_dict(stored[0]) == spec.with_changes(schema="public", key=("id",))


def test_resuming_with_a_different_spec_is_refused_and_changes_nothing(
    items: psycopg.Connection[Any], db_url: str
) -> None:
    backfill.run_backfill(db_url, SPEC, max_batches=2)
    before = items.execute("SELECT spec, fingerprint FROM backfills").fetchall()

    with pytest.raises(SpecMismatchError, match=r"'inc' already exists with a different spec \(values changed\)"):
        backfill.run_backfill(db_url, SPEC.with_changes(values={"n": "n + 2"}))

    assert items.execute("SELECT spec, fingerprint FROM backfills").fetchall() == before
    assert _counts(items) == {1: 100, 0: 200}


def test_force_replaces_the_spec_and_keeps_the_checkpoint(items: psycopg.Connection[Any], db_url: str) -> None:
    backfill.run_backfill(db_url, SPEC, max_batches=2)

    report = backfill.run_backfill(db_url, SPEC.with_changes(values={"n": "n + 2"}), force=True)

    assert report.rows_updated == 200
    assert _counts(items) == {1: 100, 2: 200}


def test_force_cannot_carry_a_checkpoint_to_another_key(items: psycopg.Connection[Any], db_url: str) -> None:
    items.execute("CREATE UNIQUE INDEX ON items (n, id)")
    backfill.run_backfill(db_url, BackfillSpec("lbl", "items", {"label": "'x'"}), max_batches=1)

    with pytest.raises(SpecMismatchError, match="cannot carry over"):
        backfill.run_backfill(db_url, BackfillSpec("lbl", "items", {"label": "'x'"}, key=("n", "id")), force=True)


def test_batch_size_may_change_on_resume(items: psycopg.Connection[Any], db_url: str) -> None:
    backfill.run_backfill(db_url, SPEC, max_batches=1)

    report = backfill.run_backfill(db_url, SPEC.with_changes(batch_size=125))

    assert report.batches == 2
    assert _counts(items) == {1: 300}


def test_a_finished_backfill_is_a_no_op(items: psycopg.Connection[Any], db_url: str) -> None:
    backfill.run_backfill(db_url, SPEC)

    again = backfill.run_backfill(db_url, SPEC)

    assert (again.outcome, again.batches) == (RunOutcome.FINISHED, 0)
    assert _counts(items) == {1: 300}


def test_registered_backfill_is_pending_until_run(items: psycopg.Connection[Any], db_url: str) -> None:
    record = backfill.register_backfill(db_url, SPEC)

    assert (record.state, record.rows_updated, record.started_at, record.upper_bound) == (
        RunState.PENDING,
        0,
        None,
        None,
    )
    assert _counts(items) == {0: 300}


def test_pause_stops_a_run_and_resume_lets_the_next_one_finish(items: psycopg.Connection[Any], db_url: str) -> None:
    backfill.run_backfill(db_url, SPEC, max_batches=1)
    assert backfill.pause_backfill(db_url, "inc").state is RunState.PAUSED

    paused = backfill.run_backfill(db_url, "inc")
    assert (paused.outcome, paused.batches) == (RunOutcome.PAUSED, 0)

    assert backfill.resume_backfill(db_url, "inc").state is RunState.RUNNING
    finished = backfill.run_backfill(db_url, "inc")

    assert (finished.outcome, finished.rows_updated) == (RunOutcome.FINISHED, 250)
    assert _counts(items) == {1: 300}


def test_pause_from_another_session_stops_the_runner_after_its_current_batch(
    items: psycopg.Connection[Any], db_url: str
) -> None:
    spec = SPEC.with_changes(batch_size=10)
    paused_after: list[int] = []

    def should_stop() -> bool:
        # Pause from another connection once two batches have committed, as an operator would.
        record = backfill.get_backfill(db_url, "inc")
        if record.batches == 2 and not paused_after:
            backfill.pause_backfill(db_url, "inc")
            paused_after.append(record.batches)
        return False

    report = backfill.run_backfill(db_url, spec, should_stop=should_stop)

    assert report.outcome is RunOutcome.PAUSED
    assert report.batches == 2
    assert _counts(items) == {1: 20, 0: 280}


@pytest.mark.parametrize(
    ("setup", "action", "message"),
    [
        (None, "resume", "cannot resume backfill 'inc': it is pending"),
        (None, "retry", "cannot retry backfill 'inc': it is pending"),
        ("finish", "pause", "cannot pause backfill 'inc': it is succeeded"),
        ("finish", "cancel", "cannot cancel backfill 'inc': it is succeeded"),
        ("finish", "resume", "cannot resume backfill 'inc': it is succeeded"),
    ],
)
def test_state_changes_that_make_no_sense_are_refused(
    items: psycopg.Connection[Any], db_url: str, setup: str | None, action: str, message: str
) -> None:
    backfill.register_backfill(db_url, SPEC)
    if setup == "finish":
        backfill.run_backfill(db_url, "inc")
    before = items.execute("SELECT state, updated_at FROM backfills").fetchall()
    act = {
        "pause": backfill.pause_backfill,
        "resume": backfill.resume_backfill,
        "cancel": backfill.cancel_backfill,
        "retry": backfill.retry_backfill,
    }[action]

    with pytest.raises(StateTransitionError) as caught:
        act(db_url, "inc")

    assert str(caught.value) == message
    assert items.execute("SELECT state, updated_at FROM backfills").fetchall() == before


def test_cancelled_backfill_does_not_run(items: psycopg.Connection[Any], db_url: str) -> None:
    backfill.run_backfill(db_url, SPEC, max_batches=1)
    backfill.cancel_backfill(db_url, "inc")

    report = backfill.run_backfill(db_url, "inc")

    assert (report.outcome, report.state, report.batches) == (RunOutcome.CANCELLED, RunState.CANCELLED, 0)
    assert backfill.get_backfill(db_url, "inc").finished_at is not None


def test_failing_batch_rolls_back_whole_and_keeps_the_last_checkpoint(
    items: psycopg.Connection[Any], db_url: str
) -> None:
    # Row 160 divides by zero: batch 4 (rows 151-200) fails; batches 1-3 stay committed, nothing of batch 4 does.
    spec = SPEC.with_changes(values={"n": "n + 1 + 0 / (id - 160)"})

    report = backfill.run_backfill(db_url, spec)

    record = backfill.get_backfill(db_url, "inc")
    assert report.outcome is RunOutcome.FAILED
    assert record.state is RunState.FAILED
    assert record.last_error is not None and "division by zero" in record.last_error and "22012" in record.last_error
    assert record.rows_updated == 150
    assert [s.checkpoint for s in backfill.get_slices(db_url, "inc")] == [["150"]]
    assert _counts(items) == {1: 150, 0: 150}

    # The operator fixes the expression, puts the backfill back with retry, and it resumes from the checkpoint.
    backfill.retry_backfill(db_url, "inc")
    fixed = backfill.run_backfill(db_url, SPEC, force=True)

    assert (fixed.outcome, fixed.rows_updated) == (RunOutcome.FINISHED, 150)
    assert _counts(items) == {1: 300}
    assert backfill.get_backfill(db_url, "inc").last_error is None
