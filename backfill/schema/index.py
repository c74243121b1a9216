"""Indexes on live tables: ``CREATE INDEX CONCURRENTLY`` and ``DROP INDEX CONCURRENTLY``.

Both take SHARE UPDATE EXCLUSIVE on the table, which blocks neither reads nor writes, and must run outside any
transaction block. A concurrent build waits twice: for the transactions that might still write the table without
maintaining the new index, and before it is marked valid, for every transaction holding an older snapshot. Those
waits block no application query, so the build runs without ``lock_timeout`` or ``statement_timeout`` (a timeout
ending a wait would leave an INVALID index and throw the build's work away); instead a watcher on a second connection
names the sessions it waits for (``index_build_waiting``: pid, application name, age of their transaction).

A build that fails leaves an INVALID index behind, which PostgreSQL still maintains on every write (and, if unique,
still enforces): it is dropped at once, and one found by a later run (its build was killed) is dropped and rebuilt. A
unique build that fails on duplicates names one duplicated key.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import sql

from backfill.errors import database_error, describe
from backfill.fragments import fragment_problem
from backfill.pg.connect import Bind, Database
from backfill.schema import ddl
from backfill.schema.constraint import ChangeResult, server_detail
from backfill.schema.notnull import (
    ConstraintError,
    DDLSession,
    Step,
    StepAction,
    StepResult,
    column_names,
    find_table,
    own_session,
    run_steps,
)
from backfill.spec import split_table

__all__ = [
    "DuplicateKeyError",
    "IndexState",
    "IndexPlan",
    "index_name",
    "read_index",
    "read_index_of_table",
    "offline_index",
    "plan_add_index",
    "plan_add_index_as",
    "plan_drop_index",
    "apply_index_plan",
    "render_index_plan",
    "BuildWatcher",
    "add_index_concurrently",
    "drop_index_concurrently",
]

log = structlog.get_logger("backfill")

_INDEX_KINDS = ("i", "I")


class DuplicateKeyError(ConstraintError):
    """Raised when a unique index cannot be built because rows share a key; ``key`` names one duplicated key, as
    PostgreSQL reported it. The INVALID index the build left is dropped again."""

    def __init__(self, message: str, *, index: str, key: str | None) -> None:
        super().__init__(message)
        self.index = index
        self.key = key


@dataclass(frozen=True)
class IndexState:
    """An index name as the catalog has it. ``table`` is the table it is on (or is to be built on)."""

    #: the index's schema (always its table's); None only offline for an unqualified name
    schema: str | None
    name: str
    table: str | None
    exists: bool = False
    valid: bool = False
    unique: bool = False
    #: the constraint (primary key, unique, exclusion) the index backs
    constraint: str | None = None
    definition: str | None = None

    @property
    def index(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name) if self.schema else sql.Identifier(self.name)

    @property
    def relation(self) -> sql.Identifier:
        assert self.table is not None
        return sql.Identifier(self.schema, self.table) if self.schema else sql.Identifier(self.table)

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}" if self.schema else str(self.table)


@dataclass(frozen=True)
class IndexPlan:
    """The statements left, each outside any transaction block."""

    state: IndexState
    steps: tuple[Step, ...]


def index_name(table: str, columns: str | Sequence[str], name: str | None = None) -> str:
    """``name``, or PostgreSQL's own pattern ``table_col_idx``."""
    return name or ddl.derived_name(split_table(table)[1], column_names(columns), "idx")


def read_index(session: DDLSession, name: str, *, schema: str | None) -> IndexState:
    """The index ``name`` (``schema.name``, or found on the search path).

    Raises:
        ConstraintError: a relation of that name exists and is not an index.
    """
    schema, name = split_table(name, schema)
    rows = session.fetchall(ddl.INDEX, {"schema": schema, "name": name})
    if not rows:
        return IndexState(schema, name, None)
    kind, _, table_schema, table, valid, unique, constraint, definition, own_schema = rows[0]
    if kind not in _INDEX_KINDS:
        raise ConstraintError(f"{own_schema}.{name} exists and is not an index")
    return IndexState(str(table_schema), name, str(table), True, bool(valid), bool(unique), constraint, str(definition))


def read_index_of_table(session: DDLSession, table: str, name: str, *, schema: str | None) -> IndexState:
    """The index ``name`` in ``table``'s schema, as it stands before a build on ``table``.

    Raises:
        ConstraintError: no such table; the name belongs to another relation, or to an index of another table.
    """
    _, schema, table = find_table(session, table, schema)
    state = read_index(session, name, schema=schema)
    if state.exists and state.table != table:
        raise ConstraintError(
            f"index {schema}.{name} already exists on table {state.qualified_table}, not {schema}.{table}: "
            "choose another name"
        )
    return IndexState(schema, name, table, *_rest(state))


def _rest(state: IndexState) -> tuple[bool, bool, bool, str | None, str | None]:
    return state.exists, state.valid, state.unique, state.constraint, state.definition


def offline_index(table: str | None, name: str, *, schema: str | None) -> IndexState:
    """The state assumed without a database (an unqualified name stays unqualified: the search path decides)."""
    if table is not None:
        schema, table = split_table(table, schema)
    schema, name = split_table(name, schema)
    return IndexState(schema, name, table)


def plan_add_index(
    state: IndexState,
    columns: str | Sequence[str],
    *,
    unique: bool = False,
    where: str | None = None,
    using: str | None = None,
    if_not_exists: bool = False,
) -> IndexPlan:
    """Nothing if a valid index of that name is on the table; ``DROP`` then ``CREATE`` if it is INVALID (a build
    that failed or was killed); ``CREATE`` if there is none. ``if_not_exists`` is for offline scripts.

    Raises:
        ConstraintError: a valid index of that name is unique where a plain one is asked for, or the reverse.
    """
    names = column_names(columns)
    if where is not None and not where.strip():
        raise ConstraintError("where must be a non-empty SQL expression (or None)")
    if where is not None and (problem := fragment_problem(where)):
        raise ConstraintError(f"the where of an index must be one SQL expression: {problem}")
    create = ddl.create_index_concurrently(
        state.relation, state.name, names, unique=unique, where=where, using=using, if_not_exists=if_not_exists
    )
    return _plan_create(state, create, unique)


def plan_add_index_as(state: IndexState, definition: str, *, unique: bool) -> IndexPlan:
    """:func:`plan_add_index` for a definition PostgreSQL printed (``pg_get_indexdef`` from ``USING`` on: method,
    keys with their operator classes, collations and order, ``INCLUDE``, storage parameters, predicate), as the
    copies of a column type change are built.

    Raises:
        ConstraintError: a valid index of that name is unique where a plain one is asked for, or the reverse.
    """
    return _plan_create(state, ddl.create_index_concurrently_as(state.relation, state.name, definition, unique), unique)


def _plan_create(state: IndexState, create: sql.Composed, unique: bool) -> IndexPlan:
    if state.exists and state.valid:
        if state.unique != unique:
            asked = "unique" if unique else "not unique"
            raise ConstraintError(
                f"index {state.name!r} on {state.qualified_table} exists ({state.definition}) but the one asked for "
                f"is {asked}: drop it first (op.drop_index_concurrently) or choose another name"
            )
        return IndexPlan(state, ())
    steps = [Step(StepAction.CREATE_INDEX, create, False)]
    if state.exists:
        steps.insert(0, Step(StepAction.DROP_INVALID_INDEX, ddl.drop_index_concurrently(state.index), False))
    return IndexPlan(state, tuple(steps))


def plan_drop_index(state: IndexState) -> IndexPlan:
    """``DROP INDEX CONCURRENTLY`` if the index exists.

    Raises:
        ConstraintError: it backs a constraint (drop the constraint instead).
    """
    if not state.exists:
        return IndexPlan(state, ())
    if state.constraint:
        raise ConstraintError(
            f"index {state.schema}.{state.name} backs constraint {state.constraint!r} of {state.qualified_table}: "
            "drop the constraint instead"
        )
    return IndexPlan(state, (Step(StepAction.DROP_INDEX, ddl.drop_index_concurrently(state.index), False),))


def render_index_plan(plan: IndexPlan) -> list[str]:
    """The plan as SQL for psql, outside a transaction block: an INVALID index left by a failed build is dropped
    first (a psql ``\\gexec`` line: it is only known when the script runs), then ``CREATE ... IF NOT EXISTS``."""
    out: list[str] = []
    for step in plan.steps:
        if step.action is StepAction.CREATE_INDEX:
            out.append(ddl.render(ddl.drop_invalid_index_gexec(plan.state.schema, plan.state.name)))
        out.append(ddl.render(step.statement))
    return out


# --- watching a build ------------------------------------------------------------------------------------------


class BuildWatcher(threading.Thread):
    """Polls, on a connection of its own, which sessions the build's backend ``pid`` waits for, and logs
    ``index_build_waiting`` each time that set changes (and every ``log_every`` seconds while it lasts)."""

    def __init__(
        self,
        database: Database,
        pid: int,
        index: str,
        table: str,
        *,
        interval: float = 1.0,
        log_every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name=f"backfill-index-watch-{pid}", daemon=True)
        self.database = dataclasses.replace(database, application_name="backfill-index-watch")
        self.pid, self.index, self.table = pid, index, table
        self.interval, self.log_every, self.clock = interval, log_every, clock
        self.finished = threading.Event()
        #: pid -> (pid, application name, longest age seen in seconds)
        self.seen: dict[int, tuple[int, str, float]] = {}

    def run(self) -> None:
        try:
            conn = self.database.connect()
        except Exception as exc:  # watching is a courtesy: the build goes on without it
            log.warning("index_watch_unavailable", index=self.index, error=str(exc))
            return
        last: tuple[int, ...] = ()
        logged_at = 0.0
        started = self.clock()
        with conn:
            while not self.finished.wait(self.interval):
                try:
                    rows = conn.execute(ddl.BLOCKING_SESSIONS, (self.pid,)).fetchall()
                except psycopg.Error:
                    return
                pids = tuple(sorted(int(row[0]) for row in rows))
                for pid, application, age, _ in rows:
                    previous = self.seen.get(int(pid))
                    age = max(float(age or 0.0), previous[2] if previous else 0.0)
                    self.seen[int(pid)] = (int(pid), str(application or ""), round(age, 1))
                if pids and (pids != last or self.clock() - logged_at >= self.log_every):
                    logged_at = self.clock()
                    log.warning(
                        "index_build_waiting",
                        index=self.index,
                        table=self.table,
                        waited_s=round(self.clock() - started, 1),
                        sessions=[
                            {"pid": int(p), "application_name": a or "", "age_s": round(float(g or 0.0), 1), "state": s}
                            for p, a, g, s in rows
                        ],
                    )
                last = pids

    def stop(self) -> tuple[tuple[int, str, float], ...]:
        self.finished.set()
        self.join(10)
        return tuple(self.seen.values())


# --- running ---------------------------------------------------------------------------------------------------


def _cleanup_after_failure(session: DDLSession, state: IndexState) -> str:
    """Drop the INVALID index a failed build left (PostgreSQL keeps maintaining it on every write, and a unique one
    keeps rejecting duplicates). Returns what was left behind, for the message."""
    try:
        left = read_index(session, state.name, schema=state.schema)
        if not left.exists:
            return "no index was left behind"
        if left.valid:
            return "the index is there and valid"
        session.execute(ddl.drop_index_concurrently(state.index))
    except Exception as exc:
        return (
            f"an INVALID index {state.name!r} may be left behind ({describe(exc)}); the next run drops and rebuilds it"
        )
    return "the INVALID index the build left was dropped again"


def _failed(session: DDLSession, state: IndexState, step: Step, exc: BaseException) -> ConstraintError:
    where = f"index {state.name!r} on {state.qualified_table}"
    if step.action is not StepAction.CREATE_INDEX:
        return ConstraintError(f"cannot drop {where}: {describe(exc)}; nothing was changed, run again")
    left = _cleanup_after_failure(session, state)
    if isinstance(database_error(exc), psycopg.errors.UniqueViolation):
        detail = server_detail(exc)
        key = detail.removesuffix(" is duplicated") if detail else None
        shown = f": {key[0].lower()}{key[1:]} is duplicated" if key else ""
        log.error("index_duplicate_key", index=state.name, table=state.qualified_table, key=key)
        return DuplicateKeyError(
            f"cannot build unique {where}, rows share a key{shown}; {left}. Remove the duplicates and run again",
            index=state.name,
            key=key,
        )
    return ConstraintError(f"cannot build {where}: {describe(exc)}; {left}")


def apply_index_plan(
    session: DDLSession,
    plan: IndexPlan,
    *,
    watch: Database | None = None,
    watch_interval: float = 1.0,
) -> ChangeResult:
    """Run the plan's statements outside any transaction block, without lock or statement timeouts (restored
    afterwards), while a :class:`BuildWatcher` on ``watch`` names the sessions each statement waits for.

    Raises:
        DuplicateKeyError: a unique build found rows sharing a key (the INVALID index is dropped again).
        ConstraintError: PostgreSQL refused or cancelled a statement; the message says what was left behind.
    """
    state = plan.state
    if not plan.steps:
        return ChangeResult()
    pid = int(session.fetchall(ddl.BACKEND_PID)[0][0])
    saved = session.fetchall(ddl.TIMEOUTS)[0]
    session.fetchall(ddl.set_timeouts("0", "0"))
    watcher = None
    if watch is not None:
        watcher = BuildWatcher(watch, pid, state.name, state.qualified_table, interval=watch_interval)
        watcher.start()

    def run(step: Step) -> tuple[int, None]:
        session.execute(step.statement)
        return 1, None

    def failed(step: Step, done: Sequence[StepResult], exc: Exception) -> BaseException:
        return _failed(session, state, step, exc) if isinstance(database_error(exc), psycopg.Error) else exc

    try:
        results = run_steps(plan.steps, run, failed, table=state.qualified_table, index=state.name)
    finally:
        waited = watcher.stop() if watcher is not None else ()
        _restore(session, saved)
    return ChangeResult(tuple(results), waited_for=waited)


def _restore(session: DDLSession, saved: Sequence[Any]) -> None:
    try:
        session.fetchall(ddl.set_timeouts(str(saved[0]), str(saved[1])))
    except Exception as exc:  # the connection is gone; so are its settings
        log.debug("timeouts_not_restored", error=str(exc))


# --- the plain functions -----------------------------------------------------------------------------------------


def add_index_concurrently(
    bind: Bind,
    table: str,
    columns: str | Sequence[str],
    *,
    name: str | None = None,
    unique: bool = False,
    where: str | None = None,
    using: str | None = None,
    schema: str | None = None,
    watch_interval: float = 1.0,
) -> ChangeResult:
    """Build an index with ``CREATE INDEX CONCURRENTLY``: reads and writes go on while it builds.

    Idempotent from the catalog: a valid index of that name is left alone; an INVALID one (a build that failed or
    was killed) is dropped and built again. While the build waits for other sessions' transactions, a
    ``index_build_waiting`` warning names them (pid, application name, age); the result lists them too.

    Args:
        bind: the database (URL, SQLAlchemy URL, Engine or Connection: only its URL is used).
        table: the table, optionally ``schema.table``.
        columns: the column(s) to index, in order.
        name: the index's name (default ``table_col_idx``); it lives in the table's schema.
        unique: a unique index.
        where: a partial index's predicate: one SQL expression.
        using: the index method (``btree``, ``gin``, ``gist``, ``brin``, ``hash``, ...).
        schema: the table's schema; defaults to the search path.
        watch_interval: seconds between two looks at what the build waits for.

    Returns:
        A :class:`ChangeResult`: the statements that ran and the sessions the build waited for.

    Raises:
        DuplicateKeyError: a unique build found rows sharing a key (one is named); no index is left.
        ConstraintError: no such table or column, a name used by another relation, a definition PostgreSQL
            rejects; the message says what was left behind.
    """
    names = column_names(columns)
    database = Database.from_bind(bind, "backfill-ddl")
    with own_session(database) as session:
        state = read_index_of_table(session, table, index_name(table, names, name), schema=schema)
        plan = plan_add_index(state, names, unique=unique, where=where, using=using)
        return apply_index_plan(session, plan, watch=database, watch_interval=watch_interval)


def drop_index_concurrently(
    bind: Bind,
    name: str,
    *,
    table: str | None = None,
    schema: str | None = None,
    watch_interval: float = 1.0,
) -> ChangeResult:
    """Drop an index with ``DROP INDEX CONCURRENTLY`` (reads and writes go on), if it exists.

    Args:
        bind: the database.
        name: the index, optionally ``schema.name``.
        table: its table, optionally ``schema.table``: gives the schema when ``name`` has none.
        schema: the index's schema; defaults to ``table``'s, then to the search path.
        watch_interval: seconds between two looks at what the drop waits for.

    Raises:
        ConstraintError: the name is not an index's, or the index backs a constraint.
    """
    database = Database.from_bind(bind, "backfill-ddl")
    with own_session(database) as session:
        if schema is None and "." not in name and table is not None:
            _, schema, _ = find_table(session, table, None)
        state = read_index(session, name, schema=schema)
        return apply_index_plan(session, plan_drop_index(state), watch=database, watch_interval=watch_interval)
