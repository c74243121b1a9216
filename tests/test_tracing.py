"""OpenTelemetry: a span per run and per batch when the application configured a tracer provider; nothing otherwise,
and nothing at all without the package."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from support import ROOT

import backfill
from backfill import BackfillSpec, RunOutcome, RunSettings
from backfill.executor import Executor
from backfill.testing import FakeClock, InMemoryStore

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The spans this test records. The application's part: a provider with an in-memory exporter, set once per
    process (OpenTelemetry allows one global provider)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def test_a_run_and_each_batch_are_spans_with_rows_key_range_retries_and_throttle_wait(
    spans: InMemorySpanExporter,
) -> None:
    store, clock = InMemoryStore.for_keys(range(1, 31), batch_size=10), FakeClock()
    store.errors = [psycopg.errors.lookup("40P01")("deadlock detected")]
    executor = Executor(
        store, None, "test", RunSettings(sleep_between=2.0), clock=clock, sleep=clock.sleep, random=lambda: 0.0
    )

    assert executor.run().outcome is RunOutcome.FINISHED

    (run,) = _named(spans, "backfill.run")
    batches = _named(spans, "backfill.batch")
    assert run.attributes is not None
    assert (run.attributes["backfill.name"], run.attributes["backfill.outcome"]) == ("test", "finished")
    assert (run.attributes["backfill.rows"], run.attributes["backfill.batches"]) == (30, 3)
    assert all(b.parent is not None and b.parent.span_id == run.context.span_id for b in batches)
    assert [
        (a.get("backfill.key_from"), a["backfill.key_to"], a["backfill.rows"], a["backfill.retries"])
        for a in (dict(b.attributes or {}) for b in batches)
    ] == [(None, "10", 10, 1), ("10", "20", 10, 0), ("20", "30", 10, 0)]
    assert [(dict(b.attributes or {}).get("backfill.throttle_reason")) for b in batches] == [
        None,
        "sleep_between",
        "sleep_between",
    ]
    assert [dict(b.attributes or {})["backfill.throttle_wait_seconds"] for b in batches] == [0.0, 2.0, 2.0]


def test_a_failed_batch_span_carries_the_error(
    spans: InMemorySpanExporter, conn: psycopg.Connection[Any], db_url: str
) -> None:
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO items (id) SELECT generate_series(1, 100)")
    conn.execute("CREATE FUNCTION boom(i integer) RETURNS integer LANGUAGE plpgsql AS 'BEGIN RETURN 1 / (i - 60); END'")

    report = backfill.run_backfill(db_url, BackfillSpec("inc", "items", {"n": "boom(id)"}, batch_size=25))

    assert report.outcome is RunOutcome.FAILED
    (run,) = _named(spans, "backfill.run")
    batches = _named(spans, "backfill.batch")
    assert [b.status.status_code for b in batches] == [StatusCode.UNSET, StatusCode.UNSET, StatusCode.ERROR]
    assert "division by zero" in (batches[-1].status.description or "")
    assert [dict(b.attributes or {}).get("backfill.key_to") for b in batches] == ["25", "50", None]
    assert dict(run.attributes or {})["backfill.outcome"] == "failed"


_WITHOUT = """
import sys
{block}
import backfill
from backfill import tracing
from backfill.executor import Executor
from backfill.testing import FakeClock, InMemoryStore

store, clock = InMemoryStore.for_keys(range(30), batch_size=10), FakeClock()
report = Executor(store, None, "test", clock=clock, sleep=clock.sleep).run()
provider = type(sys.modules["opentelemetry.trace"].get_tracer_provider()).__name__ if tracing.enabled() else "-"
print(report.outcome.value, tracing.enabled(), provider)
"""


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("sys.modules['opentelemetry'] = None  # as if not installed", "finished False -"),
        ("", "finished True ProxyTracerProvider"),  # installed, not configured: the library sets up nothing
    ],
)
def test_without_the_package_or_a_provider_nothing_is_set_up(block: str, expected: str) -> None:
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-c", _WITHOUT.format(block=block)], capture_output=True, text=True, cwd=ROOT, check=False
    )

    assert result.returncode == 0, result.stderr
    assert expected == result.stdout.strip().splitlines()[-1]  # after the log lines (structlog unconfigured)
