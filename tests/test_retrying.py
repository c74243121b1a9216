"""Retries are built in one place (backfill.retrying) from tenacity's stop and wait pieces, with the clock, the
sleep and the jitter's random source injected: every wait here is known exactly, and nothing really sleeps."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import sqlalchemy.exc

from backfill.errors import ConnectError, describe, transient_reason
from backfill.policies import ErrorKind, RetryPolicy
from backfill.retrying import ExponentialBackoff, StopAfterBudget, Timing, retrying
from backfill.testing import FakeClock


class Flaky:
    """Fails with the given errors, in order, then returns "done"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def lock_timeout() -> psycopg.Error:
    return psycopg.errors.LockNotAvailable("canceling statement due to lock timeout")


def loop(clock: FakeClock, budget: float, *, max_attempts: int | None = None, retry: bool = True) -> Any:
    """Retries (or not, per ``retry``) every error after 1 s, doubling up to 8 s, within ``budget`` seconds."""
    return retrying(
        lambda exc: retry,
        wait=ExponentialBackoff(1, 8, 0, lambda: 0.0),
        stop=StopAfterBudget(budget, clock, max_attempts=max_attempts),
        sleep=clock.sleep,
    )


def test_backoff_doubles_up_to_the_maximum_plus_jitter_from_the_injected_random_source() -> None:
    clock = FakeClock()
    jittered = retrying(
        lambda exc: True,
        wait=ExponentialBackoff(0.5, 3.0, 0.2, lambda: 0.5),
        stop=StopAfterBudget(1_000, clock),
        sleep=clock.sleep,
    )

    assert jittered(Flaky(*(lock_timeout() for _ in range(6)))) == "done"
    assert clock.sleeps == pytest.approx([0.6, 1.1, 2.1, 3.1, 3.1, 3.1])


def test_the_budget_is_measured_on_the_injected_clock_and_the_last_error_is_raised_as_it_is() -> None:
    clock = FakeClock()
    work = Flaky(*(lock_timeout() for _ in range(1_000)))

    with pytest.raises(psycopg.errors.LockNotAvailable):
        loop(clock, 30)(work)

    assert clock.sleeps == [1, 2, 4, 8, 8, 8]  # 31 s: the attempt after the 30th second is the last
    assert work.calls == 7


def test_max_attempts_stops_before_the_budget() -> None:
    clock = FakeClock()
    work = Flaky(*(lock_timeout() for _ in range(10)))

    with pytest.raises(psycopg.errors.LockNotAvailable):
        loop(clock, 1_000, max_attempts=3)(work)
    assert work.calls == 3


def test_errors_the_predicate_refuses_are_raised_at_once() -> None:
    clock = FakeClock()
    work = Flaky(psycopg.errors.UniqueViolation("duplicate key"))

    with pytest.raises(psycopg.errors.UniqueViolation):
        loop(clock, 9, retry=False)(work)
    assert (work.calls, clock.sleeps) == (1, [])


def test_a_control_step_rides_out_lost_connections_and_logs_each_retry() -> None:
    clock = FakeClock()
    logged: list[tuple[str, dict[str, object]]] = []

    class Logger:
        def warning(self, event: str, **fields: object) -> None:
            logged.append((event, fields))

    work = Flaky(psycopg.errors.AdminShutdown("terminating connection"), psycopg.OperationalError("server closed"))
    policy = RetryPolicy(initial_wait=0.5, max_wait=4)

    assert policy.call("claim", work, Timing(clock, clock.sleep, lambda: 0.0), Logger()) == "done"
    assert clock.sleeps == [0.5, 1.0]
    assert [(event, fields["step"], fields["reason"]) for event, fields in logged] == [
        ("step_retry", "claim", "server_shutdown"),
        ("step_retry", "claim", "connection_lost"),
    ]


def test_a_control_step_does_not_retry_a_permanent_error_or_a_statement_timeout() -> None:
    clock = FakeClock()
    for error in (
        psycopg.errors.UndefinedTable('relation "items" does not exist'),
        psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
    ):
        work = Flaky(error)
        with pytest.raises(type(error)):
            RetryPolicy().call("start", work, Timing(clock, clock.sleep, lambda: 0.0), None)
        assert work.calls == 1
    assert clock.sleeps == []


# --- the error vocabulary -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (psycopg.errors.LockNotAvailable("x"), "lock_timeout"),
        (psycopg.errors.DeadlockDetected("x"), "deadlock"),
        (psycopg.errors.SerializationFailure("x"), "serialization_failure"),
        (psycopg.errors.AdminShutdown("x"), "server_shutdown"),
        (psycopg.errors.CrashShutdown("x"), "server_crash"),
        (psycopg.errors.CannotConnectNow("x"), "server_unavailable"),
        (psycopg.errors.IdleSessionTimeout("x"), "idle_session_timeout"),
        (psycopg.errors.ConnectionFailure("x"), "connection_lost"),
        (psycopg.errors.ProtocolViolation("x"), "connection_lost"),
        (psycopg.OperationalError("server closed the connection unexpectedly"), "connection_lost"),
        (ConnectError("cannot connect to db"), "cannot_connect"),
        (psycopg.errors.UniqueViolation("x"), None),
        (psycopg.errors.QueryCanceled("x"), None),
        (psycopg.errors.DiskFull("x"), None),
        (ValueError("bug"), None),
    ],
)
def test_one_vocabulary_says_which_errors_are_transient_and_why(error: BaseException, reason: str | None) -> None:
    assert transient_reason(error) == reason
    expected = ErrorKind.TRANSIENT if reason else ErrorKind.PERMANENT
    if not isinstance(error, psycopg.errors.QueryCanceled):
        assert RetryPolicy().classify(error) is expected


def test_errors_wrapped_by_sqlalchemy_are_seen_through() -> None:
    wrapped = sqlalchemy.exc.OperationalError("ALTER TABLE ...", {}, psycopg.errors.LockNotAvailable("lock timeout"))

    assert transient_reason(wrapped) == "lock_timeout"
    assert describe(wrapped) == "lock timeout [SQLSTATE 55P03]"


def test_describe_is_the_first_line_with_the_sqlstate() -> None:
    assert describe(psycopg.errors.UniqueViolation("duplicate key\nDETAIL: Key (id)=(1)")) == (
        "duplicate key [SQLSTATE 23505]"
    )
    assert describe(ValueError("first\nsecond")) == "first"
    assert describe(ValueError()) == "ValueError"
