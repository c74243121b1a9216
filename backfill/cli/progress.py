"""Logging and progress for the command line: the only place ``backfill`` configures structlog.

On a terminal the executor's per-batch events become one live line (rows, percent of the estimate, rows/s, ETA)
and every other event prints as a console line. Off a terminal (cron, CI, Kubernetes) every event is a JSON line;
batch events gain the same progress fields so a log pipeline can chart them.
"""

from __future__ import annotations

import collections
import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import structlog

from backfill.cli.durations import format_duration

__all__ = ["LOG_FORMATS", "Progress", "configure_logging"]

LOG_FORMATS = ("auto", "json", "console")

#: The rate is measured over the batches of the last few seconds, so it follows throttling and load changes.
_RATE_WINDOW_SECONDS = 10.0
#: Redraw the live line at most this often: tiny batches would otherwise spend their time painting the terminal.
_REDRAW_SECONDS = 0.1
_BAR_WIDTH = 20


class _StderrLogger:
    """Writes each rendered event as a line to whatever ``sys.stderr`` is at the time (so a test runner that swaps
    the stream, then closes it, never leaves the logger writing to a closed file)."""

    def msg(self, message: str) -> None:
        stream = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg


def _stderr_logger(*args: Any) -> _StderrLogger:
    return _StderrLogger()


@dataclass
class Progress:
    """Follows one run through the executor's ``batch_committed`` events (a structlog processor).

    Args:
        live: draw a live line on stderr instead of passing batch events on (a terminal only).
        clock: injected time.
    """

    live: bool = False
    clock: Callable[[], float] = time.monotonic
    name: str | None = None
    done: int = 0
    estimated: int | None = None
    _window: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    _line_shown: bool = False
    _drawn_at: float = float("-inf")
    #: parallel workers log from their own threads: one at a time counts and draws
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self, name: str, done: int, estimated: int | None) -> None:
        """Start following backfill ``name``, which has ``done`` rows updated so far out of about ``estimated``."""
        self.name, self.done, self.estimated = name, done, estimated
        self._window = collections.deque([(self.clock(), done)])
        self._drawn_at = float("-inf")

    @property
    def percent(self) -> float | None:
        if not self.estimated:
            return None
        return min(99.9, 100.0 * self.done / self.estimated)

    @property
    def rows_per_second(self) -> float | None:
        if len(self._window) < 2:
            return None
        (t0, rows0), (t1, rows1) = self._window[0], self._window[-1]
        return (rows1 - rows0) / (t1 - t0) if t1 > t0 else None

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rows_per_second
        if not rate or not self.estimated:
            return None
        return max(self.estimated - self.done, 0) / rate

    def record(self, rows: int) -> None:
        now = self.clock()
        self.done += rows
        self._window.append((now, self.done))
        while len(self._window) > 2 and now - self._window[0][0] > _RATE_WINDOW_SECONDS:
            self._window.popleft()

    def line(self) -> str:
        """The live line: ``name [#####-----] 41.2% 412,000/~1,000,000 rows 85,300 rows/s ETA 6.9s``."""
        parts = [self.name or "backfill"]
        percent, rate, eta = self.percent, self.rows_per_second, self.eta_seconds
        if percent is not None:
            filled = int(_BAR_WIDTH * percent / 100)
            parts.append(f"[{'#' * filled}{'-' * (_BAR_WIDTH - filled)}] {percent:4.1f}%")
        parts.append(f"{self.done:,}" + (f"/~{self.estimated:,}" if self.estimated else "") + " rows")
        if rate is not None:
            parts.append(f"{rate:,.0f} rows/s")
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return " ".join(parts)

    def _draw(self, text: str, *, final: bool = False) -> None:
        stream = sys.stderr
        width = shutil.get_terminal_size((100, 24)).columns - 1
        stream.write("\r\x1b[K" + text[:width] + ("\n" if final else ""))
        stream.flush()
        self._line_shown = not final

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
        with self._lock:
            return self._process(event_dict)

    def _process(self, event_dict: MutableMapping[str, Any]) -> Any:
        event = event_dict.get("event")
        mine = self.name is not None and event_dict.get("backfill") == self.name
        if mine and event == "batch_committed":
            self.record(int(event_dict.get("rows", 0)))
            if self.live:
                now = self.clock()
                if now - self._drawn_at >= _REDRAW_SECONDS:
                    self._drawn_at = now
                    self._draw(self.line())
                raise structlog.DropEvent
            event_dict["done"] = self.done
            percent, rate, eta = self.percent, self.rows_per_second, self.eta_seconds
            event_dict["percent"] = round(percent, 2) if percent is not None else None
            event_dict["rows_per_second"] = round(rate, 1) if rate is not None else None
            event_dict["eta_s"] = round(eta, 1) if eta is not None else None
            return event_dict
        if self.live and self._line_shown:
            # Any other event ends the live line where it stands, so the last progress stays on screen above it.
            self._draw(self.line(), final=True)
        return event_dict


def _wants_console(log_format: str, stream: TextIO) -> bool:
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    return log_format == "console" or (log_format == "auto" and stream.isatty())


def configure_logging(log_format: str = "auto", *, verbose: bool = False) -> Progress:
    """Configure structlog for the command line and return the progress tracker it feeds.

    Args:
        log_format: ``console`` (human lines; a live progress line on a terminal), ``json`` (one JSON object per
            line) or ``auto`` (console on a terminal, JSON otherwise).
        verbose: include debug events (the SQL of the batches among them).
    """
    stream = sys.stderr
    console = _wants_console(log_format, stream)
    tty = stream.isatty()
    progress = Progress(live=console and tty)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        progress,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if console:
        processors.append(structlog.dev.ConsoleRenderer(colors=tty))
    else:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    return progress
