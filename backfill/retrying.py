"""Retries, built in one place: every retry loop of the package (a batch, a control-table step, a NOT NULL step, the
demo's DDL) is a :class:`tenacity.Retrying` made by :func:`retrying` from the pieces below.

The pieces are tenacity's own kinds (a ``wait_base`` and a ``stop_base``), with time and chance injected: the
clock the budget is measured on, the sleep between attempts, and the random source of the jitter. A unit test
hands in a fake clock, a sleep that only records, and a fixed random number, and knows every wait exactly.
"""

from __future__ import annotations

import random as _random
import time
from collections.abc import Callable
from dataclasses import dataclass

import tenacity
from tenacity.stop import stop_base
from tenacity.wait import wait_base

__all__ = ["Timing", "ExponentialBackoff", "StopAfterBudget", "retrying"]


@dataclass(frozen=True)
class Timing:
    """Where time and chance come from: ``clock`` (seconds, monotonic), ``sleep`` and ``random`` (a float in
    [0, 1) per call, for jitter)."""

    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    random: Callable[[], float] = _random.random


class ExponentialBackoff(wait_base):
    """Wait ``initial * 2 ** (attempt - 1)`` seconds, at most ``maximum``, plus up to ``jitter`` seconds drawn from
    ``random`` (so runners that failed together do not retry together)."""

    def __init__(self, initial: float, maximum: float, jitter: float, random: Callable[[], float]) -> None:
        self.initial, self.maximum, self.jitter, self.random = initial, maximum, jitter, random

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exponent = min(retry_state.attempt_number - 1, 62)  # 2**63 s is forever already; keep the float finite
        return min(self.maximum, self.initial * 2.0**exponent) + self.jitter * self.random()


class StopAfterBudget(stop_base):
    """Stop once ``seconds`` have passed on ``clock`` since this object was made (just before the first attempt),
    or after ``max_attempts`` attempts."""

    def __init__(self, seconds: float, clock: Callable[[], float], *, max_attempts: int | None = None) -> None:
        self.seconds, self.clock, self.max_attempts = seconds, clock, max_attempts
        self.started = clock()

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        if self.max_attempts is not None and retry_state.attempt_number >= self.max_attempts:
            return True
        return self.clock() - self.started >= self.seconds


def retrying(
    retry_if: Callable[[BaseException], bool],
    *,
    wait: wait_base | Callable[[tenacity.RetryCallState], float],
    stop: stop_base,
    sleep: Callable[[float], None],
    before_sleep: Callable[[tenacity.RetryCallState], None] | None = None,
) -> tenacity.Retrying:
    """A retry loop: call it with a function; an exception ``retry_if`` accepts is retried after ``wait`` until
    ``stop`` says enough, then raised as it is (never wrapped in ``tenacity.RetryError``)."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(retry_if),
        wait=wait,
        stop=stop,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
