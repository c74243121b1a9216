"""Pure logic behind the CLI: durations, exit codes, status arithmetic, the progress line. No database."""

from __future__ import annotations

import datetime as dt
import io
import json
import sys

import pytest
import structlog

from backfill import BackfillSpec, RunOutcome, RunState
from backfill.cli import EXIT_FAILED, EXIT_OK, EXIT_WORK_LEFT, OUTCOME_EXIT_CODES
from backfill.cli.commands import _exit_code
from backfill.cli.durations import format_duration, parse_duration
from backfill.cli.progress import Progress, configure_logging
from backfill.executor import RunReport
from backfill.status import BackfillStatus
from backfill.store import BackfillRecord, BatchRecord, SliceRecord


@pytest.fixture(autouse=True)
def _reset_structlog() -> object:
    yield
    structlog.reset_defaults()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("5m", 300.0), ("1h", 3600.0), ("1h30m", 5400.0), ("250ms", 0.25), ("1.5h", 5400.0),
     ("2d", 172800.0), ("45", 45.0), (" 10 m ", 600.0), ("0.5", 0.5)],
)  # fmt: skip
def test_durations_in_operator_forms_parse_to_seconds(text: str, seconds: float) -> None:
    assert seconds == parse_duration(text)


@pytest.mark.parametrize("text", ["", "5x", "m5", "1h30", "-5s", "5 minutes", "1.2.3s", "s"])
def test_malformed_durations_are_rejected_with_the_value_quoted(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.42, "0.4s"), (42, "42s"), (307, "5m07s"), (7380, "2h03m"), (273600, "3d04h"), (-1, "?")],
)
def test_durations_print_short(seconds: float, text: str) -> None:
    assert text == format_duration(seconds)


def _report(outcome: RunOutcome, name: str = "b") -> RunReport:
    return RunReport(name=name, outcome=outcome, state=RunState.RUNNING)


def test_every_outcome_has_an_exit_code_and_cancelled_counts_as_failed() -> None:
    assert set(RunOutcome) == set(OUTCOME_EXIT_CODES)
    assert EXIT_FAILED == OUTCOME_EXIT_CODES[RunOutcome.CANCELLED]
    assert {RunOutcome.WORK_LEFT, RunOutcome.PAUSED, RunOutcome.BUSY} == {
        outcome for outcome, code in OUTCOME_EXIT_CODES.items() if code == EXIT_WORK_LEFT
    }


def test_the_worst_outcome_decides_the_exit_code() -> None:
    finished, left, failed = (_report(o) for o in (RunOutcome.FINISHED, RunOutcome.BUSY, RunOutcome.FAILED))
    assert EXIT_OK == _exit_code([finished, finished], work_left=False)
    assert EXIT_OK == _exit_code([], work_left=False)
    assert EXIT_WORK_LEFT == _exit_code([finished, left], work_left=False)
    assert EXIT_WORK_LEFT == _exit_code([finished], work_left=True)
    assert EXIT_FAILED == _exit_code([failed, left, finished], work_left=True)


_T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _record(state: RunState, rows: int, estimated: int | None, seconds: float, **changes: object) -> BackfillRecord:
    started = _T0 if state is not RunState.PENDING else None
    fields: dict[str, object] = dict(
        id=1,
        name="fill",
        spec=BackfillSpec("fill", "app.events", {"kind": "'x'"}, key=("id",)),
        fingerprint="f",
        state=state,
        upper_bound=["1000"],
        estimated_rows=estimated,
        last_error=None,
        created_at=_T0,
        started_at=started,
        updated_at=_T0,
        finished_at=None,
        rows_updated=rows,
        batches=rows // 100,
        heartbeat_at=_T0 + dt.timedelta(seconds=seconds) if started else None,
    )
    fields.update(changes)
    return BackfillRecord(**fields)  # type: ignore[arg-type]


def test_status_derives_percent_from_the_record_and_rate_and_eta_from_the_recent_batches() -> None:
    piece = SliceRecord(0, None, ["1000"], ["250"], False, 250, 3, "h:1:a", _T0, holder="pid 9, role r, application a")
    now = _T0 + dt.timedelta(seconds=5)
    # Two batches of the last five seconds, the first started at _T0: 100 rows in 5 s.
    recent = tuple(BatchRecord(0, _T0 + dt.timedelta(seconds=end), 50, 0.5, 50, 0, 0.0, None) for end in (0.5, 4.0))
    status = BackfillStatus(_record(RunState.RUNNING, 250, 1000, 5.0), (piece,), recent=recent, as_of=now)

    assert 25.0 == status.percent
    assert 20.0 == status.rows_per_second
    assert 750 / 20.0 == status.eta_seconds
    assert ["250"] == status.checkpoint
    assert _T0 + dt.timedelta(seconds=5) == status.updated_at


def test_status_never_claims_done_early_and_has_no_eta_when_not_runnable() -> None:
    over = BackfillStatus(_record(RunState.RUNNING, 1500, 1000, 5.0), ())
    paused = BackfillStatus(_record(RunState.PAUSED, 100, 1000, 5.0), ())
    done = BackfillStatus(_record(RunState.SUCCEEDED, 900, 1000, 5.0), ())
    pending = BackfillStatus(_record(RunState.PENDING, 0, None, 0.0), ())

    assert 99.9 == over.percent
    assert (paused.percent, paused.eta_seconds) == (10.0, None)
    assert 100.0 == done.percent
    assert (pending.percent, pending.rows_per_second, pending.eta_seconds, pending.checkpoint) == (None,) * 4


def test_status_json_has_the_documented_keys_first() -> None:
    record = _record(RunState.FAILED, 10, 1000, 1.0, last_error="boom", finished_at=_T0)

    data = BackfillStatus(record, ()).to_json()

    documented = ["name", "table", "state", "rows_updated", "batches", "estimated_rows", "checkpoint", "last_error",
                  "started_at", "updated_at", "finished_at"]  # fmt: skip
    assert documented == list(data)[: len(documented)]
    assert ("fill", "app.events", "failed", "boom") == (data["name"], data["table"], data["state"], data["last_error"])
    assert _T0.isoformat() == data["finished_at"]
    json.dumps(data)  # serialisable as it is


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_shows_rows_percent_rate_and_eta() -> None:
    clock = _Clock()
    progress = Progress(clock=clock)
    progress.begin("fill", 1_000, 10_000)
    for _ in range(4):
        clock.now += 1.0
        progress.record(500)

    assert 3_000 == progress.done
    assert 500.0 == progress.rows_per_second
    assert 14.0 == progress.eta_seconds
    assert "fill [######--------------] 30.0% 3,000/~10,000 rows 500 rows/s ETA 14s" == progress.line()


def test_progress_rate_follows_the_last_ten_seconds() -> None:
    clock = _Clock()
    progress = Progress(clock=clock)
    progress.begin("fill", 0, None)
    for _ in range(20):  # 100 rows/s for 20 s, then 1000 rows/s for 10 s
        clock.now += 1.0
        progress.record(100)
    for _ in range(10):
        clock.now += 1.0
        progress.record(1_000)

    assert 1_000.0 == progress.rows_per_second
    assert None is progress.eta_seconds
    assert "fill 12,000 rows 1,000 rows/s" == progress.line()


def test_json_logs_add_progress_fields_to_batch_events(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    progress = configure_logging("json")
    progress.begin("fill", 0, 400)
    log = structlog.get_logger("backfill").bind(backfill="fill")

    log.info("batch_committed", rows=100)
    log.info("batch_committed", rows=100)
    log.info("run_finished", outcome="work_left")

    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert ["batch_committed", "batch_committed", "run_finished"] == [e["event"] for e in events]
    assert [100, 200] == [e["done"] for e in events[:2]]
    assert 50.0 == events[1]["percent"]


def test_live_progress_replaces_batch_events_with_one_redrawn_line(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    clock = _Clock()
    progress = Progress(live=True, clock=clock)
    progress.begin("fill", 0, 300)
    processor_chain = [progress]

    for _ in range(3):
        clock.now += 1.0
        with pytest.raises(structlog.DropEvent):
            for processor in processor_chain:
                processor(None, "info", {"event": "batch_committed", "backfill": "fill", "rows": 100})
    passed = progress(None, "info", {"event": "backfill_succeeded", "backfill": "fill"})
    progress(None, "info", {"event": "run_finished", "backfill": "fill"})

    output = stream.getvalue()
    assert 4 == output.count("\r\x1b[K")  # three redraws and the final line
    assert output.endswith("300/~300 rows 100 rows/s ETA 0.0s\n")
    assert "backfill_succeeded" == passed["event"]
