"""A dry run of a backfill's next batch: its SQL with the values bound, its EXPLAIN, and what is left to do.

Only reads: the batch's end key is found with the same index walk a batch uses, the row counts are planner
estimates (EXPLAIN, no rows read), so ``backfill plan`` is cheap on a table of any size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import psycopg

from backfill.pg import statements as sql
from backfill.plan import Plan
from backfill.state import RunState
from backfill.store import Key, SliceRecord

__all__ = ["BatchPreview", "preview_next_batch"]


@dataclass(frozen=True)
class BatchPreview:
    """The next batch of a backfill, or ``statement is None`` when no key range is left."""

    name: str
    state: RunState
    batch_size: int
    #: the key range left: after ``lower`` (None = from the first key) up to and including ``upper``
    lower: Key | None
    upper: Key | None
    #: the last key the next batch covers
    batch_end: Key | None
    #: the next batch's UPDATE with its values rendered as literals, and its EXPLAIN (not executed)
    statement: str | None
    explain: tuple[str, ...]
    #: planner estimates for the range left: rows walked, rows matching the filter, batches
    rows_left: int
    rows_to_update: int
    batches_left: int


def _estimate(conn: psycopg.Connection[Any], statement: psycopg.sql.Composed, params: list[str]) -> int:
    row = conn.execute(statement, params).fetchone()
    assert row is not None
    return int(row[0][0]["Plan"]["Plan Rows"])


def preview_next_batch(
    conn: psycopg.Connection[Any],
    plan: Plan,
    name: str,
    state: RunState,
    slices: list[SliceRecord],
    batch_size: int,
) -> BatchPreview:
    """Describe the next batch of backfill ``name`` without running it.

    Args:
        conn: an autocommit connection.
        plan: the backfill's resolved spec.
        slices: its slices (empty before its first run: the range then ends at today's largest key, as a run
            starting now would fix it).
        batch_size: rows of key range per batch.
    """
    target = sql.for_target(plan.target)
    empty = BatchPreview(name, state, batch_size, None, None, None, None, (), 0, 0, 0)
    with conn.transaction():
        # Planning an UPDATE takes ROW EXCLUSIVE on the table, which queues behind a pending ALTER TABLE.
        conn.execute(sql.SET_TIMEOUTS, ("5s", "60s"))
        if slices:
            pending = [piece for piece in slices if not piece.done]
            if not pending:
                return empty
            lower, upper = pending[0].checkpoint or pending[0].lower_bound, pending[0].upper_bound
        else:
            top = conn.execute(target.max_key(), ()).fetchone()
            if top is None:
                return empty
            lower, upper = None, list(top)
        has_lower = lower is not None
        bounds = [*(lower or []), *upper]
        ahead = conn.execute(target.lookahead(has_lower), [*bounds, batch_size - 1]).fetchone()
        end = list(ahead) if ahead is not None else upper
        update = target.update(has_lower)
        params = [*(lower or []), *end]
        statement = psycopg.ClientCursor(conn).mogrify(update, params)
        explain = tuple(row[0] for row in conn.execute(sql.explain(update), params))
        rows_left = _estimate(conn, target.estimate_range(has_lower, filtered=False), bounds)
        rows_to_update = _estimate(conn, target.estimate_range(has_lower, filtered=True), bounds)
    return BatchPreview(
        name=name,
        state=state,
        batch_size=batch_size,
        lower=lower,
        upper=upper,
        batch_end=end,
        statement=statement,
        explain=explain,
        rows_left=rows_left,
        rows_to_update=min(rows_to_update, rows_left),
        batches_left=max(1, math.ceil(rows_left / batch_size)),
    )
