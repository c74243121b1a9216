"""Fault injection on real PostgreSQL: whatever happens to the runner, its connection or the server, an increment
backfill (``n = n + 1``) ends with every row at exactly 1 and the control table's count agreeing.

Synchronisation is by polling the control table, ``pg_stat_activity`` or the captured log with a deadline; the only
deliberate pause is the random delay that picks a kill instant.
"""

from __future__ import annotations

import os
import random
import threading

import psycopg
from structlog.testing import capture_logs
from support import kill_runners_at_random_instants, run_until, wait_for

import backfill
from backfill import BackfillSpec, RetryPolicy, RunOutcome, RunReport, RunSettings, RunState
from backfill.tools.embedded import EmbeddedServer

#: Quick retries: the faults below heal in well under a second; production defaults wait longer.
QUICK = RetryPolicy(initial_wait=0.02, max_wait=0.25, budget_seconds=60)


def make_items(url: str, rows: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO items (id) SELECT generate_series(1, %s)", (rows,))
        conn.execute("ANALYZE items")


def counts(url: str) -> list[tuple[int, int]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT n, count(*) FROM items GROUP BY n ORDER BY n").fetchall()


def progress(url: str, name: str = "inc") -> tuple[int, str]:
    """(batches committed, state) from the control table; (0, 'none') before the first run registered it."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
            row = conn.execute(
                "SELECT coalesce(sum(s.batches), 0)::int, b.state FROM backfills b "
                "LEFT JOIN backfill_slices s ON s.backfill_id = b.id WHERE b.name = %s GROUP BY b.state",
                (name,),
            ).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0, "none"
    return (row[0], row[1]) if row else (0, "none")


def exactly_once(url: str, rows: int) -> None:
    assert counts(url) == [(1, rows)]
    record = backfill.get_backfill(url, "inc")
    assert (record.state, record.rows_updated) == (RunState.SUCCEEDED, rows)


class Runner:
    """``run_backfill`` on a thread of the test process; ``report`` once it returns."""

    def __init__(self, url: str, spec: BackfillSpec, settings: RunSettings) -> None:
        self.report: RunReport | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(url, spec, settings), daemon=True)
        self.thread.start()

    def _run(self, url: str, spec: BackfillSpec, settings: RunSettings) -> None:
        try:
            self.report = backfill.run_backfill(url, spec, settings=settings)
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def join(self, timeout: float = 60.0) -> RunReport:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the runner did not finish"
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report


# --- the runner process is killed ----------------------------------------------------------------------------------


def test_sigkill_at_random_instants_then_resume_applies_every_row_once(db_url: str) -> None:
    rows, kills_wanted = 40_000, 22
    make_items(db_url, rows)
    seed = int(os.environ.get("BACKFILL_FAULT_SEED", random.randrange(1_000_000)))
    spec = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=50)

    # Each runner is killed once it committed a batch, a random moment later: inside a batch transaction, between
    # two, or while it commits.
    kills = kill_runners_at_random_instants(
        db_url,
        spec,
        rows=rows,
        rng=random.Random(seed),
        kills=kills_wanted,
        rounds=kills_wanted * 2,
        max_delay=0.03,
        what=f"progress (seed {seed})",
    )
    # The last run resumes from the checkpoint. The killed runner's session (and so its claim) may take a
    # moment to go away: until then this run politely reports the backfill busy.
    final = run_until(db_url, "inc")

    assert final.outcome is RunOutcome.FINISHED, f"seed {seed}"
    assert kills == kills_wanted, f"seed {seed}: the backfill finished after only {kills} kills"
    exactly_once(db_url, rows)


# --- the runner's connection is terminated -------------------------------------------------------------------------


def test_terminated_connections_are_reconnected_and_the_run_goes_on(db_url: str) -> None:
    rows, terminations = 2_000, 5
    make_items(db_url, rows)
    # 1 ms of server time per row (40 ms batches) keeps the run going long enough to be hit several times.
    spec = BackfillSpec("inc", "items", {"n": "n + 1 + length(pg_sleep(0.001)::text)"}, batch_size=40)
    settings = RunSettings(retry=QUICK, application_name="backfill-fault-terminate", health_check_interval=0.01)
    done = 0
    with capture_logs() as logs, psycopg.connect(db_url, autocommit=True) as admin:
        runner = Runner(db_url, spec, settings)
        for _ in range(terminations):
            seen = progress(db_url)[0]
            wait_for(lambda seen=seen: progress(db_url)[0] >= seen + 3, "the runner to make progress again")  # type: ignore[misc]
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
                ("backfill-fault-terminate",),
            ).fetchone()
            assert killed == (1,)
            done += 1
        report = runner.join()

    reasons = {e["reason"] for e in logs if e["event"] == "batch_retry"}
    probe_failures = [e for e in logs if e["event"] == "health_check_failed"]
    assert report.outcome is RunOutcome.FINISHED
    assert done == terminations
    # Each termination surfaces in the next batch (retried) or in a health probe (logged; the batch reconnects).
    assert report.retries + len(probe_failures) >= terminations
    assert reasons <= {"server_shutdown", "connection_lost"}
    exactly_once(db_url, rows)


# --- the server restarts -------------------------------------------------------------------------------------------


def test_a_server_restart_during_a_run_is_ridden_out(own_server: EmbeddedServer) -> None:
    url, rows = own_server.url, 2_000
    make_items(url, rows)
    spec = BackfillSpec("inc", "items", {"n": "n + 1 + length(pg_sleep(0.001)::text)"}, batch_size=40)

    with capture_logs() as logs:
        runner = Runner(url, spec, RunSettings(retry=QUICK))
        wait_for(lambda: progress(url)[0] >= 5, "the first batches")
        own_server.stop()  # fast shutdown: the runner's session is terminated, new connections are refused
        down = [e for e in logs if e["event"] == "batch_retry"]
        wait_for(lambda: len([e for e in logs if e["event"] == "batch_retry"]) > len(down) + 2, "failed reconnects")
        assert runner.thread.is_alive()
        own_server.start()
        report = runner.join()

    reasons = {e["reason"] for e in logs if e["event"] == "batch_retry"}
    assert report.outcome is RunOutcome.FINISHED
    assert "cannot_connect" in reasons
    exactly_once(url, rows)


# --- locks and timeouts --------------------------------------------------------------------------------------------


def test_rows_locked_past_lock_timeout_are_retried_until_the_holder_commits(db_url: str) -> None:
    rows = 2_000
    make_items(db_url, rows)
    spec = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100)
    settings = RunSettings(lock_timeout=0.05, retry=QUICK)

    with capture_logs() as logs, psycopg.connect(db_url) as holder:
        # Another transaction holds rows of the sixth batch's range, for far longer than lock_timeout.
        holder.execute("SELECT id FROM items WHERE id BETWEEN 555 AND 560 FOR UPDATE")
        runner = Runner(db_url, spec, settings)
        wait_for(lambda: sum(e.get("reason") == "lock_timeout" for e in logs) >= 3, "the batch to hit lock_timeout")
        assert progress(db_url)[0] == 5  # the batches before the locked range committed; the blocked one did not
        holder.commit()
        report = runner.join()

    assert report.outcome is RunOutcome.FINISHED
    assert report.retries >= 3
    exactly_once(db_url, rows)


def test_a_batch_over_statement_timeout_shrinks_and_the_run_goes_on(db_url: str) -> None:
    rows = 400
    make_items(db_url, rows)
    # 1 ms per row: the default first batch (10,000 rows of key range, so all 400) takes 0.4 s.
    spec = BackfillSpec("inc", "items", {"n": "n + 1 + length(pg_sleep(0.001)::text)"})
    settings = RunSettings(statement_timeout=0.15, target_batch_seconds=0.05, min_batch_size=10, retry=QUICK)

    with capture_logs() as logs:
        report = backfill.run_backfill(db_url, spec, settings=settings)

    retries = [e for e in logs if e["event"] == "batch_retry"]
    committed = [e["batch_size"] for e in logs if e["event"] == "batch_committed"]
    assert report.outcome is RunOutcome.FINISHED
    assert retries and {e["reason"] for e in retries} == {"statement_timeout"}
    assert [e["batch_size"] for e in retries] == sorted((e["batch_size"] for e in retries), reverse=True)
    assert max(committed) < 150  # every committed batch fits in the timeout
    exactly_once(db_url, rows)


def test_a_cancel_by_a_person_fails_the_backfill_and_retry_resumes_it(db_url: str) -> None:
    rows = 1_000
    make_items(db_url, rows)
    spec = BackfillSpec("inc", "items", {"n": "n + 1 + length(pg_sleep(0.002)::text)"}, batch_size=100)
    settings = RunSettings(application_name="backfill-fault-cancel", retry=QUICK)

    with capture_logs() as logs, psycopg.connect(db_url, autocommit=True) as admin:
        runner = Runner(db_url, spec, settings)
        wait_for(lambda: progress(db_url)[0] >= 2, "two batches")
        cancelled = wait_for(
            lambda: admin.execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND state = 'active' AND query LIKE 'WITH _backfill_go%%'",
                ("backfill-fault-cancel",),
            ).fetchall(),
            "an UPDATE to cancel",
        )
        report = runner.join()

    assert cancelled == [(True,)]
    assert (report.outcome, report.retries) == (RunOutcome.FAILED, 0)
    assert not [e for e in logs if e["event"] == "batch_retry"]
    assert report.error is not None and "user request" in report.error
    assert backfill.get_backfill(db_url, "inc").last_error == report.error

    backfill.retry_backfill(db_url, "inc")
    resumed = backfill.run_backfill(db_url, "inc")

    assert resumed.outcome is RunOutcome.FINISHED
    exactly_once(db_url, rows)


def test_a_constraint_violation_fails_at_once_and_retry_resumes_after_the_fix(db_url: str) -> None:
    rows = 1_000
    make_items(db_url, rows)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE items ADD CONSTRAINT not_yet CHECK (id <= 500 OR n = 0)")
    spec = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100)

    failed = backfill.run_backfill(db_url, spec, settings=RunSettings(retry=QUICK))

    assert (failed.outcome, failed.retries) == (RunOutcome.FAILED, 0)
    assert failed.error is not None and "not_yet" in failed.error and "23514" in failed.error
    assert counts(db_url) == [(0, 500), (1, 500)]  # the failing batch rolled back; the ones before stay

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE items DROP CONSTRAINT not_yet")
    backfill.retry_backfill(db_url, "inc")
    resumed = backfill.run_backfill(db_url, "inc")

    assert (resumed.outcome, resumed.rows_updated) == (RunOutcome.FINISHED, 500)
    exactly_once(db_url, rows)
