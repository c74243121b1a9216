"""OpenTelemetry spans of runs and batches, for an application that has set up OpenTelemetry.

The library only asks the OpenTelemetry API for a tracer (``opentelemetry.trace.get_tracer``): it never sets a tracer
provider, an exporter or a sampler. Without a provider configured the API hands out spans that record nothing, at the
cost of a few microseconds per batch; without the package installed (``pip install 'backfill[otel]'`` adds it) every
function here does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

try:
    from opentelemetry import trace as _trace
except ImportError:  # the optional extra is not installed: no spans
    _trace = None  # type: ignore[assignment]

__all__ = ["span", "enabled"]

#: The instrumentation scope the spans are reported under.
TRACER_NAME = "backfill"

Attributes = Mapping[str, "str | int | float | bool | None"]


def enabled() -> bool:
    """Whether the OpenTelemetry API is installed (spans are recorded only if the application configured it)."""
    return _trace is not None


class Span:
    """A span being recorded, or nothing: attributes set on it are dropped unless a provider records them."""

    def __init__(self, inner: Any = None) -> None:
        self._inner = inner if inner is not None and inner.is_recording() else None

    def set(self, **attributes: str | int | float | bool | None) -> None:
        """Set attributes (``backfill.`` is put before each name; None values are left out)."""
        if self._inner is not None:
            self._inner.set_attributes(_named(attributes))

    def fail(self, error: BaseException) -> None:
        """Mark the span failed with ``error``."""
        if self._inner is not None and _trace is not None:
            self._inner.record_exception(error)
            self._inner.set_status(_trace.Status(_trace.StatusCode.ERROR, str(error)))


@contextlib.contextmanager
def span(span_name: str, **attributes: str | int | float | bool | None) -> Iterator[Span]:
    """A span ``span_name``, current for the block (so a batch's span is a child of its run's), with attributes. An
    exception leaving the block is not recorded on it: the caller says what failed with :meth:`Span.fail`."""
    if _trace is None:
        yield Span()
        return
    tracer = _trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        span_name, attributes=_named(attributes), record_exception=False, set_status_on_exception=False
    ) as inner:
        yield Span(inner)


def _named(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {f"backfill.{key}": value for key, value in attributes.items() if value is not None}
