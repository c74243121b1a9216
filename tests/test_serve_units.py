"""The dashboard's pure parts, without a database or a browser: charts, slice progress, the duration histogram's
bookkeeping, the token rule, and the one-line error when the serve extra is missing."""

from __future__ import annotations

import datetime as dt
import sys

import click
import pytest

from backfill.cli import commands
from backfill.state import RunState
from backfill.store import SliceRecord
from backfill.web import MIN_TOKEN_LENGTH, TokenError, create_app
from backfill.web.charts import HEIGHT, WIDTH, HistoryPoint, duration_points, line_chart, rate_points
from backfill.web.metrics import DURATION_BUCKETS, _Tally
from backfill.web.views import _actions, slice_fraction

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _at(seconds: float, rows: int = 100, duration: float = 0.05, slice: int = 0) -> HistoryPoint:
    return HistoryPoint(T0 + dt.timedelta(seconds=seconds), rows, duration, slice)


def _piece(lower: list[str] | None, upper: list[str], checkpoint: list[str] | None, done: bool = False) -> SliceRecord:
    return SliceRecord(0, lower, upper, checkpoint, done, 0, 0, None, None)


def test_the_rate_chart_counts_rows_per_second_and_adds_up_runners() -> None:
    # Two runners, each 100 rows every second for 10 s: 200 rows/s, whatever the bucketing.
    history = [_at(second, slice=runner) for second in range(1, 11) for runner in (0, 1)]
    points = rate_points(history)
    assert points and all(value == pytest.approx(200.0, rel=0.25) for _, value in points)
    assert sum(value * (points[0][0]) for _, value in points) == pytest.approx(2_000)
    assert rate_points([]) == []


def test_the_duration_chart_has_one_point_per_batch_in_milliseconds() -> None:
    assert duration_points([_at(2, duration=0.2), _at(1, duration=0.01)]) == [(0.0, 10.0), (1.0, 200.0)]


def test_a_line_chart_puts_the_peak_at_the_top_and_zero_at_the_bottom() -> None:
    chart = line_chart([(0.0, 0.0), (5.0, 50.0), (10.0, 100.0)], "ms")
    assert chart.points == f"0.0,{HEIGHT:.1f} {WIDTH / 2:.1f},{HEIGHT / 2:.1f} {WIDTH:.1f},0.0"
    assert (chart.peak, chart.span_seconds, chart.count, chart.empty) == (100.0, 10.0, 3, False)
    assert line_chart([], "ms").empty and line_chart([(1.0, 5.0)], "ms").empty  # one point draws no line


def test_slice_progress_is_the_checkpoints_place_in_an_integer_key_range() -> None:
    assert slice_fraction(_piece(["100"], ["200"], ["150"])) == 0.5
    assert slice_fraction(_piece(None, ["200"], ["50"])) == 0.25  # the first slice counts from 0
    assert slice_fraction(_piece(["100"], ["200"], None)) == 0.0
    assert slice_fraction(_piece(["a"], ["z"], ["m"], done=True)) == 1.0
    assert slice_fraction(_piece(["a"], ["z"], ["m"])) is None  # text keys: no measure
    assert slice_fraction(_piece(None, ["1", "2"], ["1", "1"])) is None  # composite keys: none either


def test_the_buttons_are_the_actions_the_state_allows() -> None:
    assert _actions(RunState.RUNNING) == ("pause", "cancel")
    assert _actions(RunState.PAUSED) == ("resume", "cancel")
    assert _actions(RunState.FAILED) == ("cancel", "retry")
    assert _actions(RunState.SUCCEEDED) == ()


def test_the_duration_histogram_only_grows_when_the_history_is_trimmed() -> None:
    tally = _Tally()
    tally.add([_at(1, duration=0.004), _at(2, duration=0.2), _at(2, duration=0.3, slice=1)])
    assert tally.buckets()[-1] == ("+Inf", 3.0)
    assert tally.buckets()[0] == (str(DURATION_BUCKETS[0]), 1.0)
    # The next scrape reads a history whose oldest batch was trimmed and one new batch added: counted once each.
    tally.add([_at(2, duration=0.2), _at(2, duration=0.3, slice=1), _at(3, duration=40.0)])
    assert tally.buckets()[-1] == ("+Inf", 4.0)
    assert tally.buckets()[-2] == (str(DURATION_BUCKETS[-1]), 3.0)  # 40 s is above every finite bound
    assert tally.total == pytest.approx(0.004 + 0.2 + 0.3 + 40.0)
    tally.add([])
    assert tally.buckets()[-1] == ("+Inf", 4.0)


def test_a_short_token_is_refused_in_one_line() -> None:
    with pytest.raises(TokenError, match=f"at least {MIN_TOKEN_LENGTH} characters"):
        create_app("postgresql://u@localhost/db", token="short")


def test_serve_without_the_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in [name for name in sys.modules if name == "backfill.web" or name.startswith("backfill.web.")]:
        monkeypatch.delitem(sys.modules, module)
    for module in [name for name in sys.modules if name == "starlette" or name.startswith("starlette.")]:
        monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    monkeypatch.setitem(sys.modules, "starlette", None)
    with pytest.raises(click.ClickException) as caught:
        commands._serve_extra()
    message = caught.value.format_message()
    assert message == "backfill serve needs the serve extra (starlette is missing): pip install 'backfill[serve]'"
