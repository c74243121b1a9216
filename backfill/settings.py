"""How a runner runs batches: :class:`RunSettings`, and the throttle, sizer and retry policy they build."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from backfill.errors import BackfillError
from backfill.fragments import fragment_problem
from backfill.policies import (
    AdaptiveSize,
    BatchSizer,
    CustomCheck,
    FixedSize,
    FixedSleep,
    HealthProbes,
    LockWaiters,
    Longest,
    LongTransactions,
    MaxRowsPerSecond,
    ReplicaLag,
    RetryPolicy,
    Throttle,
    VacuumRunning,
    no_throttle,
)
from backfill.spec import MAX_BATCH_SIZE

__all__ = ["RunSettings", "SettingsError", "LIVE_SETTINGS"]

#: The settings an operator may change on live runners (``backfill set``, :func:`backfill.set_backfill_settings`):
#: override name -> the :class:`RunSettings` field it replaces. For ``max_rows_per_second`` and
#: ``target_batch_time``, 0 turns the setting off (no cap; a fixed batch size).
LIVE_SETTINGS: dict[str, str] = {
    "max_rows_per_second": "max_rows_per_second",
    "sleep": "sleep_between",
    "target_batch_time": "target_batch_seconds",
    "min_batch_size": "min_batch_size",
    "max_batch_size": "max_batch_size",
    "max_replica_lag": "max_replica_lag_bytes",
    "max_replica_lag_time": "max_replica_lag_seconds",
}
_OFF_AT_ZERO = {"max_rows_per_second", "target_batch_time"}
_INTEGERS = {"min_batch_size", "max_batch_size", "max_replica_lag"}

#: PostgreSQL takes lock_timeout and statement_timeout in milliseconds up to INT_MAX.
_MAX_TIMEOUT_SECONDS = 2_147_483

#: The accepted values of ``RunSettings.wait_for_vacuum``, and what each means.
_VACUUM_WAITS: dict[bool | str, str] = {
    "wraparound": "wraparound",
    "any": "any",
    "off": "off",
    True: "any",
    False: "off",
}


class SettingsError(BackfillError, ValueError):
    """Raised when :class:`RunSettings` are given a value that makes no sense (a negative timeout, min > max...)."""


@dataclass(frozen=True)
class RunSettings:
    """How a runner runs batches. Everything here may change between runs without touching the stored spec.

    The defaults are meant for a production primary: batches sized to about 50 ms (a batch holds its rows' locks
    until it commits, so its duration is the longest an application write can stall on one), a pause while a
    replica lags more than 64 MiB or 10 s or while an anti-wraparound vacuum works on the table, and a retry
    budget of 15 minutes per batch.

    Args:
        batch_size: rows of key range per batch. Setting it pins the size (no adaptive sizing); so does a spec
            with a ``batch_size``. Otherwise batches start at :data:`DEFAULT_BATCH_SIZE` and adapt.
        lock_timeout: seconds a batch may wait for a row or table lock before it is rolled back and retried.
        statement_timeout: seconds one statement of a batch may run before the batch is retried at half the size.
        sleep_between: seconds to leave between the end of a batch and the start of the next.
        max_rows_per_second: cap on the update rate, paced batch by batch; None for no cap.
        target_batch_seconds: adaptive sizing aims each batch at this duration; None keeps the size fixed.
        min_batch_size, max_batch_size: bounds for adaptive sizing.
        max_replica_lag_bytes, max_replica_lag_seconds: wait while a replica is further behind than this
            (read from ``pg_stat_replication`` on the primary); None disables that measure.
        wait_for_vacuum: which vacuums on the target table make the runner wait: ``"wraparound"`` (the default)
            only an autovacuum run to prevent transaction ID wraparound, which must never be starved; ``"any"``
            (or True) every vacuum, manual or automatic; ``"off"`` (or False) none. An ordinary autovacuum
            cleans up the backfill's own dead rows and may run for hours on a large table: waiting for it would
            stall the backfill for nothing.
        health_check_sql: a query of the user's; wait while it returns true.
        max_transaction_age: wait while another session's transaction older than this many seconds holds back
            the xmin horizon (vacuum cannot clean up behind it); None disables the check.
        wait_for_lock_waiters: wait while other sessions queue for a lock on the target table (e.g. a DDL).
        health_check_interval: seconds between two health probes while the database is healthy; while a throttle
            waits it probes again at this interval until the condition clears.
        max_retry_seconds: how long one batch may keep failing transiently before the run gives up and marks the
            backfill failed (``retry`` resumes it from the checkpoint).
        throttle, sizer, retry: explicit policies; when given they replace the ones built from the fields above.
        application_name: shown in ``pg_stat_activity`` for the runner's connection.

    Raises:
        SettingsError: a value is out of range.
    """

    batch_size: int | None = None
    lock_timeout: float = 2.0
    statement_timeout: float = 30.0
    sleep_between: float = 0.0
    max_rows_per_second: float | None = None
    target_batch_seconds: float | None = 0.05
    min_batch_size: int = 100
    max_batch_size: int = 100_000
    max_replica_lag_bytes: int | None = 64 * 1024 * 1024
    max_replica_lag_seconds: float | None = 10.0
    wait_for_vacuum: bool | str = "wraparound"
    health_check_sql: str | None = None
    max_transaction_age: float | None = None
    wait_for_lock_waiters: bool = False
    health_check_interval: float = 1.0
    max_retry_seconds: float = 900.0
    throttle: Throttle | None = None
    sizer: BatchSizer | None = None
    retry: RetryPolicy | None = None
    application_name: str = "backfill"

    def __post_init__(self) -> None:
        positive = {
            "lock_timeout": self.lock_timeout,
            "statement_timeout": self.statement_timeout,
            "max_rows_per_second": self.max_rows_per_second,
            "target_batch_seconds": self.target_batch_seconds,
            "health_check_interval": self.health_check_interval,
            "max_replica_lag_seconds": self.max_replica_lag_seconds,
            "max_transaction_age": self.max_transaction_age,
            "batch_size": self.batch_size,
            "min_batch_size": self.min_batch_size,
            "max_batch_size": self.max_batch_size,
        }
        for name, value in positive.items():
            if value is not None and not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise SettingsError(f"{name} must be a positive number, got {value!r}")
        for name, value in (
            ("batch_size", self.batch_size),
            ("min_batch_size", self.min_batch_size),
            ("max_batch_size", self.max_batch_size),
        ):
            if value is not None and value > MAX_BATCH_SIZE:
                raise SettingsError(f"{name} must be at most {MAX_BATCH_SIZE:,}, got {value:,}")
        for name, value in (("lock_timeout", self.lock_timeout), ("statement_timeout", self.statement_timeout)):
            if value > _MAX_TIMEOUT_SECONDS:
                raise SettingsError(
                    f"{name} must be at most {_MAX_TIMEOUT_SECONDS:,} seconds (PostgreSQL's limit), got {value!r}"
                )
        for name, value in (("sleep_between", self.sleep_between), ("max_retry_seconds", self.max_retry_seconds)):
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise SettingsError(f"{name} must be a number >= 0, got {value!r}")
        if self.max_replica_lag_bytes is not None and self.max_replica_lag_bytes < 0:
            raise SettingsError(f"max_replica_lag_bytes must be >= 0, got {self.max_replica_lag_bytes!r}")
        if self.min_batch_size > self.max_batch_size:
            raise SettingsError(
                f"min_batch_size ({self.min_batch_size}) is larger than max_batch_size ({self.max_batch_size})"
            )
        if not isinstance(self.wait_for_vacuum, (bool, str)) or self.wait_for_vacuum not in _VACUUM_WAITS:
            raise SettingsError(
                f"wait_for_vacuum must be 'wraparound', 'any' or 'off' (or True/False), got {self.wait_for_vacuum!r}"
            )
        if self.health_check_sql is not None:
            query = self.health_check_sql.strip().rstrip(";").rstrip()
            if not query:
                raise SettingsError("health_check_sql is empty")
            if problem := fragment_problem(query):
                raise SettingsError(f"health_check_sql is not one query: {problem}")

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunSettings:
        """These settings with live overrides (by :data:`LIVE_SETTINGS` name) in place of their fields.

        Raises:
            SettingsError: an override is not a number, or the result is out of range (e.g. min > max).
        """
        changes: dict[str, Any] = {}
        for name, value in overrides.items():
            field = LIVE_SETTINGS.get(name)
            if field is None:
                raise SettingsError(f"{name!r} is not a live setting (one of {', '.join(LIVE_SETTINGS)})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SettingsError(f"{name} must be a number, got {value!r}")
            if name in _OFF_AT_ZERO and value == 0:
                changes[field] = None
            elif name in _INTEGERS:
                if value != int(value):
                    raise SettingsError(f"{name} must be a whole number, got {value!r}")
                changes[field] = int(value)
            else:
                changes[field] = value
        return dataclasses.replace(self, **changes) if changes else self

    def pins_batch_size(self, spec_batch_size: int | None) -> bool:
        """Whether batches keep one size: the run or the spec chose it (like pt-online-schema-change's explicit
        ``--chunk-size``), or adaptive sizing is off."""
        return self.target_batch_seconds is None or self.batch_size is not None or spec_batch_size is not None

    def retry_policy(self) -> RetryPolicy:
        """The retry policy of batches and control-table steps: ``retry``, or one from the fields above."""
        return self.retry or RetryPolicy(budget_seconds=self.max_retry_seconds, min_batch_size=self.min_batch_size)

    def policies(
        self,
        health: HealthProbes | None = None,
        *,
        spec_batch_size: int | None = None,
        sharers: Callable[[], int] | None = None,
    ) -> tuple[Throttle, BatchSizer, RetryPolicy]:
        """The throttle, sizer and retry policy this run uses.

        Args:
            health: where the database throttles read replica lag, vacuums, etc.; without it (an in-memory store)
                only the time-based throttles apply.
            spec_batch_size: the spec's batch size (see :meth:`pins_batch_size`).
            sharers: how many runners work on the backfill now; they split ``max_rows_per_second`` between them.
        """
        retry = self.retry_policy()
        if self.sizer is not None:
            sizer: BatchSizer = self.sizer
        elif self.pins_batch_size(spec_batch_size):
            sizer = FixedSize()
        else:
            assert self.target_batch_seconds is not None
            sizer = AdaptiveSize(self.target_batch_seconds, self.min_batch_size, self.max_batch_size)
        return self.throttle or self._throttle(health, sharers), sizer, retry

    def _throttle(self, health: HealthProbes | None, sharers: Callable[[], int] | None) -> Throttle:
        throttles: list[Throttle] = []
        if self.sleep_between > 0:
            throttles.append(FixedSleep(self.sleep_between))
        if self.max_rows_per_second is not None:
            throttles.append(MaxRowsPerSecond(self.max_rows_per_second, sharers))
        if health is not None:
            every = {"every": self.health_check_interval, "poll": self.health_check_interval}
            if self.max_replica_lag_bytes is not None or self.max_replica_lag_seconds is not None:
                throttles.append(
                    ReplicaLag(
                        health.replica_lag,
                        max_bytes=self.max_replica_lag_bytes,
                        max_seconds=self.max_replica_lag_seconds,
                        **every,
                    )
                )
            vacuums = _VACUUM_WAITS[self.wait_for_vacuum]
            if vacuums != "off":
                throttles.append(VacuumRunning(health.vacuums, only_wraparound=vacuums == "wraparound", **every))
            if self.max_transaction_age is not None:
                throttles.append(LongTransactions(health.oldest_transaction, self.max_transaction_age, **every))
            if self.wait_for_lock_waiters:
                throttles.append(LockWaiters(health.lock_waiters, **every))
            if self.health_check_sql is not None:
                throttles.append(CustomCheck(health.custom_check, self.health_check_sql, **every))
        if not throttles:
            return no_throttle
        return throttles[0] if len(throttles) == 1 else Longest(*throttles)
