"""The ``backfill`` command: a thin shell over :mod:`backfill.api` for operators, cron and Kubernetes.

Each command parses its options, calls one API function, renders the result and maps it to an exit code. Library
errors become one-line messages in one place (:meth:`BackfillGroup.invoke`); ``-v`` adds tracebacks and the SQL.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from types import FrameType
from typing import Any, TypeVar

import click
import psycopg
import structlog
from click.core import ParameterSource

from backfill import api
from backfill.cli.durations import format_duration
from backfill.cli.params import (
    BYTES,
    DURATION,
    DURATION_OFF,
    DURATION_ZERO,
    NUMBER_OFF,
    OFF,
    POSITIVE_INT,
    POSITIVE_NUMBER,
)
from backfill.cli.progress import LOG_FORMATS, Progress, configure_logging
from backfill.errors import BackfillError, describe
from backfill.executor import RunReport
from backfill.pg import statements
from backfill.pg.connect import Database
from backfill.pg.health import PostgresHealth
from backfill.plan import Plan
from backfill.settings import RunSettings, SettingsError
from backfill.spec import BackfillSpec
from backfill.state import RunOutcome
from backfill.status import BackfillStatus, live_owner
from backfill.store import BackfillRecord

__all__ = ["main", "cli", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_WORK_LEFT", "OUTCOME_EXIT_CODES"]

log = structlog.get_logger("backfill.cli")

#: Every named backfill has finished (or ``run --all`` found nothing to do).
EXIT_OK = 0
#: A backfill failed, or is cancelled: it will not finish without a person, so cron should alert.
EXIT_FAILED = 1
#: Bad input or usage: unknown command, option or backfill, malformed value, a state change that makes no sense.
EXIT_USAGE = 2
#: Stopped with work left: a time or batch budget ran out, a signal stopped it, a backfill is paused or another
#: runner holds it. The next run continues. (75 is EX_TEMPFAIL in sysexits.h: "try again later".)
EXIT_WORK_LEFT = 75

#: How one backfill's run outcome maps to the process exit code; the worst over all backfills wins.
OUTCOME_EXIT_CODES: dict[RunOutcome, int] = {
    RunOutcome.FINISHED: EXIT_OK,
    RunOutcome.WORK_LEFT: EXIT_WORK_LEFT,
    RunOutcome.PAUSED: EXIT_WORK_LEFT,
    RunOutcome.BUSY: EXIT_WORK_LEFT,
    RunOutcome.FAILED: EXIT_FAILED,
    RunOutcome.CANCELLED: EXIT_FAILED,
}
_SEVERITY = {EXIT_OK: 0, EXIT_WORK_LEFT: 1, EXIT_FAILED: 2}

F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """A one-line error about the operator's input: exit code 2."""

    exit_code = EXIT_USAGE


class DatabaseError(click.ClickException):
    """A one-line error the database raised while a command ran: exit code 1."""

    exit_code = EXIT_FAILED


@dataclass
class CliContext:
    """What every command shares. Nothing here connects until a command asks for :attr:`database`."""

    url: str | None
    url_from_env: bool
    control_schema: str
    verbose: bool
    progress: Progress = field(default_factory=Progress)
    _warned: bool = False

    @property
    def database(self) -> Database:
        if not self.url:
            raise CliError("no database given: pass --url or set DATABASE_URL")
        database = Database.from_bind(self.url)  # ConnectError (exit 2) for a malformed URL; the password stays hidden
        if database.has_password and not self.url_from_env and not self._warned:
            self._warned = True
            click.echo(
                "Warning: a password in --url is visible to every user of this machine (ps); set DATABASE_URL, "
                "PGPASSWORD or ~/.pgpass instead",
                err=True,
            )
        return database


pass_cli = click.make_pass_decorator(CliContext)


class BackfillGroup(click.Group):
    """The command group: errors become one line on stderr and an exit code, in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BackfillError as exc:
            _show_traceback(ctx)
            raise CliError(str(exc)) from None
        except psycopg.Error as exc:
            _show_traceback(ctx)
            raise DatabaseError(f"database error: {describe(exc)}") from None

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Run the command line; with ``standalone_mode`` (the default) exit with the command's code."""
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        # The library never configures structlog; this entry point does, and puts back what it found, so calling
        # the CLI in-process (tests, the demo) leaves the host's logging as it was.
        saved = structlog.get_config() if structlog.is_configured() else None
        try:
            code = super().main(*args, **kwargs)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(EXIT_FAILED)
        finally:
            if saved is not None:
                structlog.configure(**saved)
            else:
                structlog.reset_defaults()
        sys.exit(code if isinstance(code, int) else EXIT_OK)


def _show_traceback(ctx: click.Context) -> None:
    obj = ctx.find_object(CliContext)
    if obj is not None and obj.verbose:
        traceback.print_exc(file=sys.stderr)


@click.group(name="backfill", cls=BackfillGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    envvar="DATABASE_URL",
    metavar="URL",
    help="Database URL (SQLAlchemy form, postgresql:// or key=value); default: $DATABASE_URL. Prefer "
    "DATABASE_URL: a password on the command line shows in ps.",
)
@click.option(
    "--control-schema",
    envvar="BACKFILL_CONTROL_SCHEMA",
    default=api.DEFAULT_CONTROL_SCHEMA,
    show_default=True,
    help="Schema of the control tables.",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="auto",
    show_default=True,
    help="auto: console lines and a live progress line on a terminal, JSON lines otherwise.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug events, the SQL of the batches, tracebacks on errors.")
@click.version_option(package_name="backfill", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, url: str | None, control_schema: str, log_format: str, verbose: bool) -> None:
    """Batched, resumable online data migrations for PostgreSQL.

    \b
    Exit codes:  0  every named backfill finished
                75  stopped with work left (budget spent, signal, paused, or another runner holds it)
                 1  a backfill failed or is cancelled
                 2  bad input or usage
    """
    from_env = ctx.get_parameter_source("url") is ParameterSource.ENVIRONMENT
    progress = configure_logging(log_format, verbose=verbose)
    ctx.obj = CliContext(url, from_env, control_schema, verbose, progress)


# --- init, add ------------------------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--grant",
    "roles",
    multiple=True,
    metavar="ROLE",
    help="Grant ROLE exactly what a runner needs on the control tables (repeatable).",
)
@pass_cli
def init(obj: CliContext, roles: tuple[str, ...]) -> None:
    """Create the control tables (idempotent); refuse tables backfill did not create."""
    api.init_control_tables(obj.database, control_schema=obj.control_schema, grant=roles)
    click.echo(f"control tables ready in schema {obj.control_schema!r}")
    for role in roles:
        click.echo(f"granted role {role!r} what a runner needs on them")


def _parse_assignments(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> dict[str, str]:
    assignments: dict[str, str] = {}
    for value in values:
        column, sep, expression = value.partition("=")
        column, expression = column.strip(), expression.strip()
        if not sep or not column or not expression:
            raise click.BadParameter(f"expected COL=SQL, got {value!r}", ctx, param)
        if column in assignments:
            raise click.BadParameter(f"column {column!r} is set twice", ctx, param)
        assignments[column] = expression
    return assignments


def _parse_key(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    columns = tuple(part.strip() for part in value.split(","))
    if not all(columns):
        raise click.BadParameter(f"expected COL[,COL...], got {value!r}", ctx, param)
    return columns


@cli.command()
@click.argument("name")
@click.option("--table", required=True, help="Target table, optionally schema-qualified (app.events).")
@click.option(
    "--set",
    "values",
    multiple=True,
    required=True,
    metavar="COL=SQL",
    callback=_parse_assignments,
    help="Column and the SQL expression computing it per row; repeat for more columns.",
)
@click.option("--where", help="SQL filter: only matching rows are updated.")
@click.option("--key", callback=_parse_key, metavar="COL[,COL]", help="Columns to walk (default: primary key).")
@click.option("--batch-size", type=POSITIVE_INT, help="Rows of key range per batch.")
@click.option(
    "--keep-in-sync",
    is_flag=True,
    help="Install a trigger that applies the same values to rows the application writes with the column left NULL.",
)
@click.option(
    "--skip-unchanged/--no-skip-unchanged",
    default=True,
    help="Update only rows whose values differ; --no-: rewrite every matching row (volatile SQL) [on].",
)
@click.option(
    "--reversible",
    is_flag=True,
    help="Keep what each batch overwrites in an undo log, so `backfill revert NAME` can put it back.",
)
@click.option("--force", is_flag=True, help="Replace a different spec already registered under NAME.")
@pass_cli
def add(
    obj: CliContext,
    name: str,
    table: str,
    values: dict[str, str],
    where: str | None,
    key: tuple[str, ...] | None,
    batch_size: int | None,
    keep_in_sync: bool,
    skip_unchanged: bool,
    reversible: bool,
    force: bool,
) -> None:
    """Register backfill NAME (state pending) for `run` to work through.

    The spec is checked against the database first; nothing is written if it does not fit. With --keep-in-sync
    the trigger is installed now, before the run fixes its key range; it stays until the backfill is deleted.
    """
    spec = BackfillSpec(
        name,
        table,
        values,
        where,
        key,
        batch_size,
        keep_in_sync=keep_in_sync,
        skip_unchanged=skip_unchanged,
        reversible=reversible,
    )
    record = api.register_backfill(obj.database, spec, force=force, control_schema=obj.control_schema)
    stored = record.spec
    click.echo(
        f"backfill {record.name!r} on {stored.qualified_table} (key {', '.join(stored.key or ())}, "
        f"batch size {stored.batch_size or 'adaptive'}"
        + (", kept in sync by a trigger" if stored.keep_in_sync else "")
        + (", reversible" if stored.reversible else "")
        + f"): {record.state.value}"
    )


# --- run -----------------------------------------------------------------------------------------------------

#: Options of ``run`` that set a :class:`RunSettings` field: (flag, field, type, help). One line per flag; a flag
#: left out keeps RunSettings' default. ``off`` (where accepted) turns a check off: the field becomes None. A
#: ``bool`` flag comes with its ``--no-`` twin.
# fmt: off
RUN_SETTING_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--batch-size", "batch_size", POSITIVE_INT, "Rows of key range per batch; pins the size [the spec's]."),
    ("--sleep", "sleep_between", DURATION, "Pause between batches, e.g. 200ms."),
    ("--lock-timeout", "lock_timeout", DURATION, "How long a batch waits for a row lock before retrying [2s]."),
    ("--statement-timeout", "statement_timeout", DURATION, "Longest statement of a batch before it shrinks [30s]."),
    ("--target-batch-time", "target_batch_seconds", DURATION_OFF, "Adaptive size aims at this; 0/off: fixed [50ms]."),
    ("--min-batch-size", "min_batch_size", POSITIVE_INT, "Smallest batch adaptive sizing may use [100]."),
    ("--max-batch-size", "max_batch_size", POSITIVE_INT, "Largest batch adaptive sizing may use [100000]."),
    ("--max-rows-per-second", "max_rows_per_second", POSITIVE_NUMBER, "Rows/s cap shared by live runners [none]."),
    ("--max-replica-lag", "max_replica_lag_bytes", BYTES, "Wait while a replica lags more bytes (1GiB; off) [64MB]."),
    ("--max-replica-lag-time", "max_replica_lag_seconds", DURATION_OFF, "Wait while a replica lags longer; off [10s]."),
    ("--wait-for-vacuum", "wait_for_vacuum", bool, "Wait for any vacuum on the table; --no-: none [anti-wraparound]."),
    ("--health-check", "health_check_sql", str, "SQL of yours: wait while it returns true (tried once first)."),
    ("--max-transaction-age", "max_transaction_age", DURATION_OFF, "Wait while an older transaction pins xmin [off]."),
    ("--wait-for-lock-waiters", "wait_for_lock_waiters", bool, "Wait while sessions queue to lock the table [off]."),
    ("--health-check-interval", "health_check_interval", DURATION, "Time between two health probes [1s]."),
    ("--max-retry-time", "max_retry_seconds", DURATION_ZERO, "How long one batch may keep failing transiently [15m]."),
    ("--application-name", "application_name", str, "application_name of the runner's connections [backfill]."),
]
# fmt: on
_METAVARS = {"health_check_sql": "SQL", "application_name": "NAME"}
#: Settings a runner has but no flag can express: policy objects, for the Python API only.
_API_ONLY_FIELDS = {"throttle", "sizer", "retry"}
_SETTING_FIELDS = {f.name for f in fields(RunSettings)}
assert {opt[1] for opt in RUN_SETTING_OPTIONS} <= _SETTING_FIELDS - _API_ONLY_FIELDS
#: Field names in SettingsError messages, as the operator typed them.
_FLAG_OF_FIELD = {name: flag for flag, name, _, _ in RUN_SETTING_OPTIONS}
_FIELD_NAME = re.compile(r"\b(" + "|".join(_FLAG_OF_FIELD) + r")\b")


def run_setting_options(func: F) -> F:
    for flag, name, kind, text in reversed(RUN_SETTING_OPTIONS):
        if kind is bool:
            func = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=text)(func)
        else:
            metavar = "N" if kind in (POSITIVE_INT, POSITIVE_NUMBER) else _METAVARS.get(name)
            func = click.option(flag, name, type=kind, default=None, metavar=metavar, help=text)(func)
    return func


def run_settings(values: dict[str, Any], *, no_replica_lag_check: bool = False) -> RunSettings:
    """RunSettings from the values of the setting flags: a flag not given (None) keeps the default, ``off``
    becomes None. ``no_replica_lag_check`` turns both replica-lag limits off.

    Raises:
        CliError: a value RunSettings rejects, named by its flag; or the lag check both off and given a limit.
    """
    given_values = {name: value for name, value in values.items() if value is not None}
    chosen: dict[str, Any] = {name: None if value is OFF else value for name, value in given_values.items()}
    if no_replica_lag_check:
        given = [_FLAG_OF_FIELD[n] for n in ("max_replica_lag_bytes", "max_replica_lag_seconds") if n in chosen]
        if given:
            raise CliError(f"--no-replica-lag-check turns off the limit {' and '.join(given)} sets: give one of them")
        chosen.update(max_replica_lag_bytes=None, max_replica_lag_seconds=None)
    try:
        return RunSettings(**chosen)
    except SettingsError as exc:
        raise CliError(_FIELD_NAME.sub(lambda m: _FLAG_OF_FIELD[m[1]], str(exc))) from None


class StopSignals:
    """SIGINT/SIGTERM: the first asks the run to stop after the current batch (it commits and checkpoints); the
    second raises KeyboardInterrupt, on which psycopg cancels the running statement and the batch rolls back."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._event = threading.Event()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # No logging here: a write to stderr that the signal interrupted would be re-entered. A thread announces it.
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self._event.set()

    def _announce(self) -> None:
        self._event.wait()
        if self.requested is not None:
            log.warning(
                "stop_requested",
                signal=self.requested,
                detail="stopping after the current batch; send the signal again to abort it (rolled back)",
            )

    def should_stop(self) -> bool:
        return self.requested is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        announcer = threading.Thread(target=self._announce, name="backfill-stop-announcer", daemon=True)
        announcer.start()
        previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._event.set()
            announcer.join()


def _log_batch_sql(name: str, plan: Plan) -> None:
    log.debug(
        "batch_sql",
        backfill=name,
        lookahead=statements.for_target(plan.target).lookahead(True).as_string(),
        update=statements.for_target(plan.target).update(True).as_string(),
    )


@cli.command()
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--all", "run_all", is_flag=True, help="Run every pending or running backfill, oldest first.")
@click.option("--max-runtime", type=DURATION, help="Start no batch after this long, e.g. 50m (whole invocation).")
@click.option("--max-batches", type=POSITIVE_INT, help="Stop after this many batches (whole invocation).")
@click.option("--workers", type=POSITIVE_INT, default=1, metavar="N", help="Runners in this process [1].")
@click.option("--slices", type=POSITIVE_INT, metavar="N", help="Split what is left into at least N slices [--workers].")
@run_setting_options
@click.option("--no-replica-lag-check", is_flag=True, help="Do not wait for replicas (no lag limit at all).")
@pass_cli
def run(
    obj: CliContext,
    /,
    names: tuple[str, ...],
    run_all: bool,
    max_runtime: float | None,
    max_batches: int | None,
    workers: int,
    slices: int | None,
    no_replica_lag_check: bool,
    **setting_values: Any,
) -> None:
    """Run backfills from their checkpoints until done or a budget ends the run.

    Safe to overlap (cron): a backfill another runner holds is left alone and the run exits 75. SIGINT or SIGTERM
    stops after the current batch (exit 75); a second signal aborts the running batch, which rolls back.

    Scale out: --workers N runs N runners here, each on its own connection (one database core each). To share a
    backfill between machines, run `backfill run NAME --slices N` on each: the range is split into N slices and
    every runner claims free ones. The --max-rows-per-second cap is shared by all live runners.

    Throttles are on by default (replica lag, vacuum on the table); each --FLAG [default] below overrides one.
    """
    ctx = click.get_current_context()
    if run_all and names:
        raise click.UsageError("give backfill names or --all, not both", ctx)
    if not run_all and not names:
        raise click.UsageError("name the backfills to run, or pass --all", ctx)
    settings = run_settings(setting_values, no_replica_lag_check=no_replica_lag_check)
    database = obj.database
    if settings.health_check_sql is not None:
        _try_health_check(database, settings.health_check_sql)

    def begin(record: BackfillRecord, plan: Plan | None) -> None:
        estimate = record.estimated_rows
        if plan is not None:
            estimate = plan.estimated_rows if estimate is None else estimate
            if obj.verbose:
                _log_batch_sql(record.name, plan)
        obj.progress.begin(record.name, record.rows_updated, estimate)

    started = time.monotonic()
    stop = StopSignals()
    with stop.installed():
        result = api.run_backfills(
            database,
            None if run_all else names,
            max_runtime=max_runtime,
            max_batches=max_batches,
            settings=settings,
            workers=workers,
            slices=slices,
            control_schema=obj.control_schema,
            should_stop=stop.should_stop,
            on_start=begin,
        )
    reports = result.reports
    code = _exit_code(reports, work_left=bool(result.not_run) or result.aborted is not None)
    log.info(
        "run_summary",
        outcomes={report.name: report.outcome.value for report in reports},
        not_run=list(result.not_run) or None,
        aborted=result.aborted,
        rows=sum(report.rows_updated for report in reports),
        batches=sum(report.batches for report in reports),
        seconds=round(time.monotonic() - started, 3),
        exit_code=code,
    )
    ctx.exit(code)


def _try_health_check(database: Database, query: str) -> None:
    """Run the operator's health query once, so a typo is bad input now rather than a failed backfill later."""
    with database.connect() as conn:
        try:
            PostgresHealth(lambda: conn, "", "").custom_check(query)
        except psycopg.Error as exc:
            raise CliError(f"--health-check query failed: {describe(exc)}") from None


def _exit_code(reports: Sequence[RunReport], *, work_left: bool) -> int:
    codes = [OUTCOME_EXIT_CODES[report.outcome] for report in reports]
    if work_left:
        codes.append(EXIT_WORK_LEFT)
    return max(codes, key=_SEVERITY.__getitem__, default=EXIT_OK)


# --- status, plan -------------------------------------------------------------------------------------------


def _status_row(status: BackfillStatus) -> list[str]:
    record = status.record
    percent, rate, eta = status.percent, status.rows_per_second, status.eta_seconds
    error = (record.last_error or "").splitlines()[0] if record.last_error else ""
    return [
        record.name,
        record.spec.qualified_table,
        record.state.value,
        f"{record.rows_updated:,}",
        f"{percent:.1f}%" if percent is not None else "-",
        f"{rate:,.0f}/s" if rate is not None else "-",
        format_duration(eta) if eta is not None else "-",
        error[:80],
    ]


def _slice_lines(status: BackfillStatus) -> list[str]:
    """One indented line per slice of a split backfill (or of one whose claim is held): its range, where it stands,
    its counters, who works it and which session holds it."""
    if len(status.slices) < 2 and not any(piece.holder for piece in status.slices):
        return []
    columns = status.record.spec.key or ("key",)
    name = columns[0] if len(columns) == 1 else "(" + ", ".join(columns) + ")"
    rows = []
    for piece in status.slices:
        lower = f"{_key(piece.lower_bound)} < " if piece.lower_bound is not None else ""
        started = piece.checkpoint is not None and piece.checkpoint != piece.lower_bound
        where = "done" if piece.done else f"at {_key(piece.checkpoint)}" if started else "not started"
        owner = live_owner(piece)
        rows.append([
            f"slice {piece.slice}", f"{lower}{name} <= {_key(piece.upper_bound)}", where,
            f"{piece.rows_updated:,} rows", f"{piece.batches:,} batches", f"owner {owner}" if owner else "",
            f"held by {piece.holder}" if piece.holder else "",
        ])  # fmt: skip
    return ["  " + line for line in _align(rows, right={3, 4})]


def _align(rows: list[list[str]], *, right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(_align([header, *rows], right={3, 4, 5, 6}))


@cli.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="A JSON list, one object per backfill (stable keys).")
@pass_cli
def status(obj: CliContext, name: str | None, as_json: bool) -> None:
    """Show backfills: state, rows done, % of the estimate, rate, ETA, last error.

    Rate and ETA are over the last minute, shown only while a runner works on it. Below a backfill: its live
    runners (host:pid) and the throttle holding them back, and its live settings (`backfill set`). A backfill split
    into slices gets one indented line per slice below it: its key range, done or its checkpoint,
    rows, batches and the live runner working on it. Rate and ETA are the backfill's, over all its slices.
    """
    statuses = api.backfill_status(obj.database, name, control_schema=obj.control_schema)
    if as_json:
        click.echo(json.dumps([s.to_json() for s in statuses], indent=2))
        return
    if not statuses:
        click.echo("no backfills registered")
        return
    header = ["NAME", "TABLE", "STATE", "ROWS", "%", "RATE", "ETA", "LAST ERROR"]
    table = _table(header, [_status_row(s) for s in statuses]).splitlines()
    click.echo(table[0])
    for line, backfill_status in zip(table[1:], statuses, strict=True):
        click.echo(line)
        for detail in _details(backfill_status):
            click.echo(detail)
        for slice_line in _slice_lines(backfill_status):
            click.echo(slice_line)
        if backfill_status.undo_bytes is not None:
            click.echo(f"  undo log: {_size(backfill_status.undo_bytes)}")


def _size(count: int) -> str:
    """Bytes in the unit pg_size_pretty would choose (kB, MB, GB: powers of 1024)."""
    value, unit = float(count), "bytes"
    for larger in ("kB", "MB", "GB", "TB"):
        if value < 10 * 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:,.0f} {unit}"


def _details(status: BackfillStatus) -> list[str]:
    """Indented lines under a backfill: its live runners and what they wait on, and its live settings."""
    lines = []
    runners = status.live_runners
    if runners:
        names = ", ".join(f"{r.host}:{r.pid}" if r.host else f"pid {r.pid}" for r in runners)
        waiting = f"; throttled by {status.throttle_reason}" if status.throttle_reason else ""
        lines.append(f"  live runners: {names}{waiting}")
    if status.overrides:
        lines.append(f"  live settings: {_overrides(status.overrides)}")
    return lines


@cli.command()
@click.argument("name")
@click.option("--batch-size", type=POSITIVE_INT, help="Preview with this batch size instead of the spec's.")
@pass_cli
def plan(obj: CliContext, name: str, batch_size: int | None) -> None:
    """Dry run: the SQL of the next batch, its EXPLAIN, and the rows and batches left. Writes nothing."""
    preview = api.preview_backfill(obj.database, name, batch_size=batch_size, control_schema=obj.control_schema)
    click.echo(f"backfill {preview.name!r} ({preview.state.value})")
    if preview.statement is None:
        click.echo("nothing left to do: no key range remains")
        return
    start = f"after key {_key(preview.lower)}" if preview.lower is not None else "from the first key"
    click.echo(f"next batch ({preview.batch_size:,} rows of key range): {start} up to {_key(preview.batch_end)}")
    click.echo(f"\n{preview.statement};\n")
    click.echo("\n".join(["EXPLAIN:", *("  " + line for line in preview.explain)]))
    click.echo(
        f"\nleft (planner estimate): ~{preview.rows_left:,} rows of key range up to {_key(preview.upper)}, "
        f"~{preview.rows_to_update:,} to update, ~{preview.batches_left:,} batches"
    )


def _key(key: Sequence[str] | None) -> str:
    if key is None:
        return "-"
    return key[0] if len(key) == 1 else "(" + ", ".join(key) + ")"


# --- operator actions -----------------------------------------------------------------------------------------


def _operator_action(command: str, action: Callable[..., Any], done: str, help_text: str) -> None:
    """The command ``command NAME``: ``action`` on the backfill NAME, then its new state."""

    @cli.command(name=command, help=help_text)
    @click.argument("name")
    @pass_cli
    def run_action(obj: CliContext, name: str) -> None:
        record = action(obj.database, name, control_schema=obj.control_schema)
        click.echo(f"backfill {record.name!r} {done}: now {record.state.value}")


_operator_action(
    "pause",
    api.pause_backfill,
    "paused",
    "Pause NAME: a runner working on it stops after its current batch; `run` skips it until resumed.",
)
_operator_action(
    "resume", api.resume_backfill, "resumed", "Resume a paused NAME: the next `run` continues from its checkpoint."
)
_operator_action(
    "cancel", api.cancel_backfill, "cancelled", "Cancel NAME for good (rows already updated stay updated)."
)
_operator_action(
    "retry",
    api.retry_backfill,
    "put back",
    "Put a failed NAME back to pending; the next `run` continues from its checkpoint.",
)


@cli.command(name="set")
@click.argument("name")
@click.option("--max-rows-per-second", type=NUMBER_OFF, metavar="N", help="Rows/s cap of the backfill; off: none.")
@click.option("--sleep", type=DURATION_ZERO, help="Pause between two batches of a runner, e.g. 200ms.")
@click.option("--target-batch-time", type=DURATION_OFF, help="Adaptive size aims at this; off: keep the size.")
@click.option("--min-batch-size", type=POSITIVE_INT, metavar="N", help="Smallest batch adaptive sizing may use.")
@click.option("--max-batch-size", type=POSITIVE_INT, metavar="N", help="Largest batch adaptive sizing may use.")
@click.option("--max-replica-lag", type=BYTES, help="Wait while a replica lags more bytes, e.g. 64MB.")
@click.option("--max-replica-lag-time", type=DURATION, help="Wait while a replica lags longer, e.g. 10s.")
@click.option("--reset", is_flag=True, help="Clear every live setting first (alone: runners use their own).")
@pass_cli
def set_(obj: CliContext, /, name: str, reset: bool, **values: Any) -> None:
    """Change NAME's pace on every live runner, on any machine, without restarting them.

    Stored in the control tables; each runner applies them with its next batch (and within a few seconds while it
    waits), on top of the settings it was started with, until `set NAME --reset`. `status` shows them.
    """
    if values.get("max_replica_lag") is OFF:
        raise CliError("--max-replica-lag: give a size (--reset goes back to each runner's own limit)")
    chosen = {key: 0 if value is OFF else value for key, value in values.items() if value is not None}
    record = api.set_backfill_settings(obj.database, name, reset=reset, control_schema=obj.control_schema, **chosen)
    click.echo(f"backfill {record.name!r}: {_overrides(record.overrides) or 'no live settings'}")


def _overrides(overrides: dict[str, float]) -> str:
    """Live settings as flags: ``--max-rows-per-second 100 --sleep 0.5`` (0: off)."""
    return " ".join(f"--{key.replace('_', '-')} {value:g}" for key, value in sorted(overrides.items()))


@cli.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete it even while a runner works on it (that runner then fails).")
@pass_cli
def delete(obj: CliContext, name: str, force: bool) -> None:
    """Forget NAME: drop its keep_in_sync trigger, its control rows and undo log (the data stays as it is).

    Refused while a runner holds it, unless --force. Registering NAME again then starts from scratch.
    """
    record = api.delete_backfill(obj.database, name, force=force, control_schema=obj.control_schema)
    click.echo(f"backfill {record.name!r} deleted (it was {record.state.value})")


@cli.command()
@click.argument("name")
@click.option("--max-runtime", type=DURATION, help="Start no batch after this long, e.g. 50m.")
@click.option("--max-batches", type=POSITIVE_INT, help="Stop after this many batches.")
@click.option("--workers", type=POSITIVE_INT, default=1, metavar="N", help="Runners in this process [1].")
@run_setting_options
@click.option("--no-replica-lag-check", is_flag=True, help="Do not wait for replicas (no lag limit at all).")
@pass_cli
def revert(
    obj: CliContext,
    /,
    name: str,
    max_runtime: float | None,
    max_batches: int | None,
    workers: int,
    no_replica_lag_check: bool,
    **setting_values: Any,
) -> None:
    """Put back what the reversible backfill NAME overwrote, batch by batch, from its undo log.

    NAME is stopped for good first (cancelled unless it succeeded) and its keep_in_sync trigger dropped. The
    revert runs as backfill NAME:revert: resumable (run this again, or `backfill run NAME:revert`), exactly once,
    under the same throttles and budgets as `run` (exit 75 with work left). Rows the application changed since
    the backfill wrote them are left as they are, and counted.
    """
    settings = run_settings(setting_values, no_replica_lag_check=no_replica_lag_check)
    stop = StopSignals()
    with stop.installed():
        report = api.revert_backfill(
            obj.database,
            name,
            max_runtime=max_runtime,
            max_batches=max_batches,
            settings=settings,
            workers=workers,
            control_schema=obj.control_schema,
            should_stop=stop.should_stop,
        )
    run = report.run
    kept = f"; {report.rows_kept:,} rows the application changed since were left as they are" if report.finished else ""
    click.echo(f"backfill {name!r}: {run.rows_updated:,} rows put back ({run.outcome.value}){kept}")
    click.get_current_context().exit(OUTCOME_EXIT_CODES[run.outcome])


@cli.command()
@click.argument("name")
@pass_cli
def purge(obj: CliContext, name: str) -> None:
    """Drop the undo log of the reversible backfill NAME: it can no longer be reverted.

    Refused while NAME or its revert may still run (pending, running, paused or failed).
    """
    size = api.purge_backfill(obj.database, name, control_schema=obj.control_schema)
    click.echo(f"backfill {name!r}: undo log dropped ({_size(size)})")


# --- serve ---------------------------------------------------------------------------------------------------

#: What the ``serve`` extra installs: a missing one means the extra is not installed.
_SERVE_MODULES = {"starlette", "uvicorn", "jinja2", "prometheus_client", "multipart", "python_multipart"}


def _serve_extra() -> Any:
    """The dashboard package, or one line saying how to install it."""
    try:
        import backfill.web as web  # imported late: the other commands never need the serve extra
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in _SERVE_MODULES:
            raise
        raise CliError(
            f"backfill serve needs the serve extra ({missing} is missing): pip install 'backfill[serve]'"
        ) from None
    return web


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free).")
@click.option(
    "--token",
    envvar="BACKFILL_SERVE_TOKEN",
    metavar="TOKEN",
    help="Secret the pause/resume/cancel/retry buttons need; default $BACKFILL_SERVE_TOKEN (prefer it: --token "
    "shows in ps). Without one the dashboard is read-only.",
)
@click.option("--refresh", type=DURATION_ZERO, default=5.0, metavar="DURATION", help="Page reload interval [5s].")
@pass_cli
def serve(obj: CliContext, host: str, port: int, token: str | None, refresh: float) -> None:
    """Serve a dashboard of every backfill and Prometheus /metrics, read from the control tables.

    The page shows each backfill's state, progress per slice, rate and batch duration over time, throttle reason,
    retries, last error and live runners, wherever they run. With a token, its buttons pause, resume, cancel and
    retry (POST only, the token compared in constant time); without one it is read-only. Listens on 127.0.0.1
    unless --host says otherwise: put it behind your own TLS proxy before exposing it.
    """
    web = _serve_extra()
    ctx = click.get_current_context()
    if ctx.get_parameter_source("token") is ParameterSource.COMMANDLINE:
        click.echo("Warning: --token is visible to every user of this machine (ps); set BACKFILL_SERVE_TOKEN", err=True)
    database = obj.database
    database.connect().close()  # a wrong URL or a server down fails now, in one line, not on the first page load
    app = web.create_app(database, token=token or None, control_schema=obj.control_schema, refresh_seconds=refresh)
    try:
        server = web.DashboardServer(app, host, port)
    except OSError as exc:
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    log.info("serve_started", url=server.url, read_only=not token, control_schema=obj.control_schema)
    click.echo(f"dashboard on {server.url} (metrics on {server.url}metrics){'' if token else ', read-only'}", err=True)
    server.run()
    log.info("serve_stopped", url=server.url)


# --- demo ----------------------------------------------------------------------------------------------------


@cli.command()
@click.option("--rows", type=POSITIVE_INT, default=1_000_000, show_default=True, help="Rows in the demo table.")
@click.option("--writers", type=POSITIVE_INT, default=2, show_default=True, help="Simulated application threads.")
@click.option("--serve", "serve_", is_flag=True, help="Show the dashboard (read-only) while the demo runs.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="The dashboard's port.")
@pass_cli
def demo(obj: CliContext, rows: int, writers: int, serve_: bool, port: int) -> None:
    """Fill a NOT NULL column on a live table, next to what one plain UPDATE costs.

    Starts a throwaway PostgreSQL (or uses --url; $DATABASE_URL is ignored here), creates a table with ROWS rows,
    and while a simulated application keeps writing to it: adds a nullable column, backfills it with live
    progress, makes it NOT NULL without a table scan. Then times one plain UPDATE of the same data under the same
    writers and reports both. Everything it created is removed at the end. --serve: the dashboard of `backfill
    serve` on 127.0.0.1:PORT shows the backfill while it runs (needs the serve extra).
    """
    from backfill.tools.demo import run_demo  # imported late: --help and the other commands never load it

    if serve_:
        _serve_extra()
    url = None if obj.url_from_env else obj.url
    serve = ("127.0.0.1", port) if serve_ else None
    code = run_demo(url, rows=rows, writers=writers, progress=obj.progress, echo=click.echo, serve=serve)
    click.get_current_context().exit(code)


def main() -> None:
    """Entry point of the ``backfill`` script."""
    cli(prog_name="backfill")


if __name__ == "__main__":
    main()
