"""The exception hierarchy: every error this library raises on purpose is a :class:`BackfillError`."""

from __future__ import annotations

__all__ = [
    "BackfillError",
    "SpecError",
    "PlanError",
    "SpecMismatchError",
    "UnknownBackfillError",
    "ControlTablesMissingError",
    "StateTransitionError",
    "ConnectError",
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


class StateTransitionError(BackfillError):
    """Raised for a state change that makes no sense, such as resuming a backfill that has succeeded."""


class ConnectError(BackfillError):
    """Raised when the database cannot be reached. The message never contains the password."""
