"""The state machine of a backfill, and how one run of it ended."""

from __future__ import annotations

import enum

__all__ = ["RunState", "RunOutcome", "OperatorAction", "TRANSITIONS"]


class RunState(str, enum.Enum):
    """The state of a backfill, as stored in the control table's ``state`` column."""

    #: Registered, no batch run yet (``defer=True``, ``backfill add``, or put back by ``retry``).
    PENDING = "pending"
    #: Started: its key bounds are fixed and work remains. A runner may or may not be working on it right now
    #: (see the slices' owner and heartbeat); ``run`` continues it from its checkpoint.
    RUNNING = "running"
    #: Stopped by an operator; runners stop after their current batch and ``run`` leaves it alone until ``resume``.
    PAUSED = "paused"
    #: Every key range has been processed. Terminal.
    SUCCEEDED = "succeeded"
    #: A batch failed with an error that retrying cannot fix (see ``last_error``); ``retry`` puts it back to pending,
    #: and the next run continues from the checkpoint.
    FAILED = "failed"
    #: Stopped for good by an operator. Terminal.
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.CANCELLED)

    @property
    def runnable(self) -> bool:
        """Whether ``run`` works on a backfill in this state."""
        return self in (RunState.PENDING, RunState.RUNNING)


class OperatorAction(str, enum.Enum):
    """What an operator can do to a backfill (``backfill pause NAME``, :func:`backfill.pause_backfill`, ...)."""

    #: Runners stop after their current batch; ``run`` leaves the backfill alone until it is resumed.
    PAUSE = "pause"
    #: A paused backfill runs again (or is pending again, if it never started).
    RESUME = "resume"
    #: Stopped for good.
    CANCEL = "cancel"
    #: A failed backfill is put back to pending; the next run continues from its checkpoint.
    RETRY = "retry"


#: Operator actions -> (states they apply to, state they lead to). RUNNING is entered by a run, SUCCEEDED and FAILED
#: by a batch; an operator only moves a backfill along these edges.
TRANSITIONS: dict[OperatorAction, tuple[frozenset[RunState], RunState]] = {
    OperatorAction.PAUSE: (frozenset({RunState.PENDING, RunState.RUNNING}), RunState.PAUSED),
    OperatorAction.RESUME: (frozenset({RunState.PAUSED}), RunState.RUNNING),
    OperatorAction.CANCEL: (
        frozenset({RunState.PENDING, RunState.RUNNING, RunState.PAUSED, RunState.FAILED}),
        RunState.CANCELLED,
    ),
    OperatorAction.RETRY: (frozenset({RunState.FAILED}), RunState.PENDING),
}


class RunOutcome(str, enum.Enum):
    """How one call of the runner ended."""

    #: The backfill has succeeded (now, or it already had).
    FINISHED = "finished"
    #: Stopped with work left: the time or batch budget ran out, or a stop was requested (signal).
    WORK_LEFT = "work_left"
    #: The backfill is paused; nothing more runs until ``resume``.
    PAUSED = "paused"
    #: Another runner holds the backfill; this one did nothing.
    BUSY = "busy"
    #: A batch failed permanently; the backfill is now ``failed`` with the error stored.
    FAILED = "failed"
    #: The backfill is cancelled.
    CANCELLED = "cancelled"
