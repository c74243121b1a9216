"""The exception hierarchy (every error this library raises on purpose is a :class:`BackfillError`), and the one
vocabulary for the database's errors: which ones go away when the work is tried again, the word logged for each, and
how an error is shown in one line (:func:`describe`).
"""

from __future__ import annotations

import psycopg
from psycopg import errors as pg_errors

__all__ = [
    "BackfillError",
    "SpecError",
    "PlanError",
    "SpecMismatchError",
    "UnknownBackfillError",
    "ControlTablesMissingError",
    "ControlTablesOutdatedError",
    "StateTransitionError",
    "ConnectError",
    "BatchTooSlowError",
    "TRANSIENT_ERRORS",
    "LOCK_ERRORS",
    "VIOLATION_ERRORS",
    "database_error",
    "database_error_class",
    "transient_reason",
    "describe",
    "UntrustedControlTablesError",
    "UnknownRoleError",
    "PoolerError",
    "KeyChangedError",
    "KeyRoundTripError",
    "BackfillBusyError",
    "NotReversibleError",
]


class BackfillError(Exception):
    """Base class of every error raised by ``backfill``; its message is meant for the operator as it is."""


class SpecError(BackfillError, ValueError):
    """Raised when a backfill spec is malformed on its own: empty name, no values, batch size <= 0, ..."""


class PlanError(BackfillError):
    """Raised when a spec does not fit the database: unknown table or column, no usable key or index, an
    expression or filter that PostgreSQL rejects. Raised before anything is written."""


class SpecMismatchError(BackfillError):
    """Raised when a backfill is registered or resumed under a name that already holds a different spec."""


class UnknownBackfillError(BackfillError, LookupError):
    """Raised when no backfill of the given name is registered."""


class ControlTablesMissingError(BackfillError):
    """Raised when the control tables do not exist (run ``backfill init``) or are newer than this release."""


class ControlTablesOutdatedError(BackfillError):
    """Raised when the control tables are of an older layout than this release uses: ``backfill init``
    (:func:`backfill.init_control_tables`) upgrades them in place."""


class StateTransitionError(BackfillError):
    """Raised for a state change that makes no sense, such as resuming a backfill that has succeeded."""


class ConnectError(BackfillError):
    """Raised when the database cannot be reached. The message never contains the password."""


class BatchTooSlowError(BackfillError):
    """Raised (and stored on the backfill, which fails) when a batch of the smallest size still exceeds
    ``statement_timeout`` again and again: shrinking cannot help, and retrying would only hold row locks for the
    whole timeout each time. The message says which setting to change."""


class KeyChangedError(PlanError):
    """Raised when the key a backfill walks is no longer what its checkpoint was written in: a key column's type,
    type modifier or collation changed since the backfill was registered, so the stored checkpoint would be read
    in a different order and rows skipped or updated twice."""


class KeyRoundTripError(PlanError):
    """Raised when a key's text form (the checkpoint is stored as text) does not read back as the same key, so the
    walk could skip or repeat rows; the batch it happens in rolls back."""


# --- the database's errors -----------------------------------------------------------------------------------------

#: Errors that go away when the same work is tried again a little later (reconnecting if needed), each with the
#: stable word logged for it: a lock wait that timed out, a deadlock or serialization failure, the server shutting
#: down, crashing or starting up, an idle session closed by the server, and every connection exception (class 08).
TRANSIENT_ERRORS: dict[type[psycopg.Error], str] = {
    pg_errors.LockNotAvailable: "lock_timeout",
    pg_errors.DeadlockDetected: "deadlock",
    pg_errors.SerializationFailure: "serialization_failure",
    pg_errors.AdminShutdown: "server_shutdown",
    pg_errors.CrashShutdown: "server_crash",
    pg_errors.CannotConnectNow: "server_unavailable",
    pg_errors.IdleSessionTimeout: "idle_session_timeout",
    pg_errors.ConnectionException: "connection_lost",
    pg_errors.ConnectionDoesNotExist: "connection_lost",
    pg_errors.ConnectionFailure: "connection_lost",
    pg_errors.SqlclientUnableToEstablishSqlconnection: "connection_lost",
    pg_errors.SqlserverRejectedEstablishmentOfSqlconnection: "connection_lost",
    pg_errors.TransactionResolutionUnknown: "connection_lost",
    pg_errors.ProtocolViolation: "connection_lost",
}

#: Errors of a statement that waited for a lock and gave up (lock_timeout) or was chosen as a deadlock victim.
LOCK_ERRORS: tuple[type[psycopg.Error], ...] = (pg_errors.LockNotAvailable, pg_errors.DeadlockDetected)

#: Errors of a validating scan that found rows breaking the constraint (a NOT NULL one on PostgreSQL 18+, a CHECK).
VIOLATION_ERRORS: tuple[type[psycopg.Error], ...] = (pg_errors.NotNullViolation, pg_errors.CheckViolation)


def database_error(exc: BaseException) -> BaseException:
    """The psycopg error behind ``exc`` when a layer wrapped it (SQLAlchemy's ``.orig``, a ``__cause__``), else
    ``exc`` itself. Our own errors are never seen through: their message is the one to show."""
    if isinstance(exc, BackfillError):
        return exc
    for candidate in (exc, getattr(exc, "orig", None), exc.__cause__):
        if isinstance(candidate, psycopg.Error):
            return candidate
    return exc


def database_error_class(exc: BaseException) -> type[BaseException]:
    """The psycopg error class behind ``exc``: its own, or, for another driver's error (psycopg2's or asyncpg's,
    usually wrapped by SQLAlchemy: a migration's connection may use any driver), the class psycopg has for its
    SQLSTATE; else ``type(exc)``."""
    error = database_error(exc)
    if isinstance(error, psycopg.Error) or isinstance(exc, BackfillError):
        return type(error)
    for candidate in (exc, getattr(exc, "orig", None), exc.__cause__):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str) and code:
            try:
                return pg_errors.lookup(code)
            except KeyError:
                break
    return type(exc)


def transient_reason(exc: BaseException) -> str | None:
    """The word for why ``exc`` is worth retrying (``lock_timeout``, ``server_shutdown``, ``connection_lost``,
    ``cannot_connect``...), or None when retrying the same work cannot help."""
    if isinstance(exc, ConnectError):
        return "cannot_connect"
    error = database_error(exc)
    reason = next((word for kind, word in TRANSIENT_ERRORS.items() if isinstance(error, kind)), None)
    if reason is not None:
        return reason
    if isinstance(error, psycopg.OperationalError) and not error.sqlstate:
        return "connection_lost"  # the socket broke: no SQLSTATE, no message from the server
    return None


def describe(exc: BaseException, *, hint: bool = False) -> str:
    """``exc`` in one line: the first line of its message (the server's primary message for a database error),
    its server hint in parentheses if ``hint``, and ``[SQLSTATE xxxxx]`` for a database error that has one."""
    error = database_error(exc)
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if not isinstance(error, psycopg.Error):
        return line
    diag = error.diag
    if error is not exc:
        line = str(error).strip().splitlines()[0] if str(error).strip() else line
    line = diag.message_primary or line
    if hint and diag.message_hint:
        line = f"{line} ({diag.message_hint})"
    return f"{line} [SQLSTATE {error.sqlstate}]" if error.sqlstate else line


class UntrustedControlTablesError(BackfillError):
    """Raised when the control tables exist but backfill did not make them so: an owner it does not trust, a
    trigger, rule or row-level security policy, or privileges granted to PUBLIC. Nothing is read or written."""


class UnknownRoleError(BackfillError):
    """Raised when ``init --grant`` names a role that does not exist."""


class PoolerError(BackfillError):
    """Raised when a slice's claim is not held by the server session the runner's connection runs on, as behind a
    connection pooler in transaction mode: claims and session settings would not survive there."""


class BackfillBusyError(BackfillError):
    """Raised when an action needs a backfill that a live runner holds, such as deleting it without ``force``."""


class NotReversibleError(BackfillError):
    """Raised when a revert or a purge names a backfill that keeps no undo log: it was not registered with
    ``reversible=True``, or its undo log was purged."""
