"""Lost connections outside a batch: a backend terminated, or the server restarted, while a run resolves its spec,
registers it, reads it, starts it, splits it, claims or releases a slice. Every such step rides out
the fault as a batch does (retried on a new connection), and the increment backfill still applies every row
exactly once.

The fault is injected at the step itself: the step's first call kills its own connection (``pg_terminate_backend``
from another session, or a server restart) and then runs on it, as if the fault struck at that instant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs
from support import wait_for

import backfill
from backfill import BackfillSpec, RetryPolicy, RunOutcome, RunSettings, RunState
from backfill.pg.store import PostgresStore
from backfill.tools.embedded import EmbeddedServer

QUICK = RunSettings(retry=RetryPolicy(initial_wait=0.02, max_wait=0.25, budget_seconds=60))
ROWS = 2_000

#: step logged -> (owner of the function, its name, how to find the connection it runs on)
STEPS: dict[str, tuple[Any, str, Callable[..., psycopg.Connection[Any] | None]]] = {
    "resolve": (backfill.api, "resolve", lambda conn, *_: conn),
    "register": (PostgresStore, "register", lambda store, *_: store.conn),
    "start": (PostgresStore, "start", lambda store, *_: store.conn),
    "split": (PostgresStore, "split", lambda store, *_: store.conn),
    "claim": (PostgresStore, "try_claim", lambda store, *_: store.conn),
    "release": (PostgresStore, "release", lambda store, *_: store._conn),
    "slices": (PostgresStore, "slices", lambda store, *_: store.conn),
    "get": (PostgresStore, "get", lambda store, *_: store.conn),
}


def make_items(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO items (id) SELECT generate_series(1, %s)", (ROWS,))
        conn.execute("ANALYZE items")


def inject(monkeypatch: pytest.MonkeyPatch, step: str, fault: Callable[[psycopg.Connection[Any]], None]) -> list[int]:
    """Make the first call of ``step`` suffer ``fault`` on its connection just before it runs; returns a list that
    counts the faults injected."""
    owner, attribute, connection_of = STEPS[step]
    original = getattr(owner, attribute)
    injected: list[int] = []

    def faulty(*args: Any, **kwargs: Any) -> Any:
        conn = connection_of(*args)
        if not injected and conn is not None and not conn.closed:
            injected.append(1)
            fault(conn)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, faulty)
    return injected


def terminate_with(admin_url: str) -> Callable[[psycopg.Connection[Any]], None]:
    def terminate(conn: psycopg.Connection[Any]) -> None:
        pid = conn.info.backend_pid
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            wait_for(
                lambda: (
                    admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() == (0,)
                ),
                "the backend to go",
            )

    return terminate


def assert_exactly_once(url: str, step: str, logs: list[dict[str, Any]], report: backfill.RunReport) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall() == [(1, ROWS)]
    record = backfill.get_backfill(url, "inc")
    assert (report.outcome, record.state, record.rows_updated) == (RunOutcome.FINISHED, RunState.SUCCEEDED, ROWS)
    # Retried once, as the step that ran into the fault (a claim inside a split is retried as the split).
    retried = [e for e in logs if e["event"] == "step_retry"]
    assert len(retried) == 1
    assert retried[0]["reason"] in {"server_shutdown", "connection_lost", "cannot_connect"}


@pytest.mark.parametrize("step", list(STEPS))
def test_a_terminated_backend_during_a_control_step_is_ridden_out(
    db_url: str, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_items(db_url)
    spec = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=300)
    if step == "get":
        backfill.register_backfill(db_url, spec)  # then run by name: reading it is the run's first step
    injected = inject(monkeypatch, step, terminate_with(db_url))

    with capture_logs() as logs:
        report = backfill.run_backfill(db_url, spec.name if step == "get" else spec, settings=QUICK, slices=2)

    assert injected == [1]
    assert_exactly_once(db_url, step, logs, report)


@pytest.mark.parametrize("step", ["resolve", "start", "claim"])
def test_a_server_restart_during_a_control_step_is_ridden_out(
    own_server: EmbeddedServer, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = own_server.url
    make_items(url)
    injected = inject(monkeypatch, step, lambda conn: own_server.restart())
    spec = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=300)

    with capture_logs() as logs:
        report = backfill.run_backfill(url, spec, settings=QUICK)

    assert injected == [1]
    assert_exactly_once(url, step, logs, report)
