"""Several runners on one backfill in one process: one executor per worker thread, each on its own connection.

Workers coordinate through PostgreSQL only, exactly as runners on different machines do: each claims an unfinished
slice (a claim in its control row), works it to its end and claims the next, so a slice is never worked twice and a
slice left by a runner that died is taken over from its checkpoint. The rate cap is shared through the control table
(``MaxRowsPerSecond`` divides it by the live runners); replica-lag and vacuum checks run in every worker.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

import structlog

from backfill.executor import Executor, RunReport
from backfill.plan import Plan
from backfill.policies import HealthProbes
from backfill.retrying import Timing
from backfill.settings import RunSettings
from backfill.state import RunOutcome, RunState
from backfill.store import RunnerStore

__all__ = ["run_parallel", "combine_reports"]

log = structlog.get_logger("backfill")

_FIRST_WINS = (RunOutcome.FAILED, RunOutcome.CANCELLED, RunOutcome.PAUSED)


def combine_reports(name: str, reports: Sequence[RunReport], state: RunState, seconds: float) -> RunReport:
    """One report for several workers' runs of the same backfill, ``state`` being where the backfill ended."""
    outcomes = [report.outcome for report in reports]
    outcome = next((o for o in _FIRST_WINS if o in outcomes), None)
    if outcome is None:
        if state is RunState.SUCCEEDED:
            outcome = RunOutcome.FINISHED
        elif outcomes and all(o is RunOutcome.BUSY for o in outcomes):
            outcome = RunOutcome.BUSY
        else:
            outcome = RunOutcome.WORK_LEFT
    first = next((r for r in reports if r.outcome is outcome), None)
    return RunReport(
        name=name,
        outcome=outcome,
        state=state,
        rows_updated=sum(r.rows_updated for r in reports),
        batches=sum(r.batches for r in reports),
        seconds=seconds,
        longest_batch_seconds=max((r.longest_batch_seconds for r in reports), default=0.0),
        reason=first.reason if first else None,
        error=first.error if first else None,
        retries=sum(r.retries for r in reports),
        throttled_seconds=sum(r.throttled_seconds for r in reports),
    )


def run_parallel(
    make_store: Callable[[], RunnerStore],
    plan: Plan,
    name: str,
    settings: RunSettings,
    *,
    workers: int,
    max_runtime: float | None = None,
    max_batches: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    clock: Callable[[], float],
    health_for: Callable[[RunnerStore], HealthProbes | None] = lambda store: None,
    check_walk_for: Callable[[RunnerStore], Callable[[], None] | None] = lambda store: None,
) -> RunReport:
    """Run ``workers`` executors on backfill ``name`` until none finds a slice to work on.

    Each worker gets a store of its own from ``make_store``, and the health probes and walk check (see
    :class:`Executor`) ``health_for`` and ``check_walk_for`` give for it.
    ``max_batches`` is shared out between the workers. A ``KeyboardInterrupt`` in the calling thread (a second
    signal) cancels every worker's running statement, so their batches roll back, and is raised again.
    """
    started = clock()
    aborted = threading.Event()
    stores = [make_store() for _ in range(workers)]
    reports: list[RunReport | None] = [None] * workers
    errors: list[BaseException] = []
    per_worker = None if max_batches is None else math.ceil(max_batches / workers)

    def stop() -> bool:
        return aborted.is_set() or bool(should_stop and should_stop())

    def work(index: int) -> None:
        try:
            store = stores[index]
            executor = Executor(
                store,
                plan,
                name,
                settings,
                should_stop=stop,
                health=health_for(store),
                check_walk=check_walk_for(store),
            )
            reports[index] = executor.run(max_runtime=max_runtime, max_batches=per_worker)
        except BaseException as exc:  # re-raised in the calling thread below
            errors.append(exc)
            aborted.set()

    threads = [threading.Thread(target=work, args=(i,), name=f"backfill-{name}-{i}") for i in range(workers)]
    log.info("workers_started", backfill=name, workers=workers)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    except KeyboardInterrupt:
        aborted.set()
        for store in stores:
            store.cancel()
        for thread in threads:
            thread.join()
        raise
    finally:
        for store in stores:
            store.close()
    if errors:
        raise errors[0]
    done = [report for report in reports if report is not None]
    last = make_store()
    try:
        state = settings.retry_policy().call("get", lambda: last.get(name), Timing(clock=clock), log).state
    finally:
        last.close()
    return combine_reports(name, done, state, clock() - started)
