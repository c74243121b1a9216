"""A simulated application: threads doing single-row writes in a tight loop, timing every one.

The demo and the benchmarks run it next to a change to see what the application feels: how many writes it got
through, and its longest stall (the longest single write, which is how long a lock held it up).

    with AppSimulator(url, update_sql="UPDATE events SET seen = seen + 1 WHERE id = %s", key_range=(1, 10_000)) as sim:
        sim.wait_until_writing()
        ...  # the change under test
    print(sim.stats.max_stall_ms)
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from backfill.pg.connect import Bind, Database

__all__ = ["AppSimulator", "AppStats"]


@dataclass(frozen=True)
class AppStats:
    """What the simulated application saw while it ran.

    ``max_stall_ms`` is the longest single write, including one still blocked when the simulator was stopped.
    """

    writes: int
    seconds: float
    writes_per_second: float
    p50_ms: float
    p99_ms: float
    max_stall_ms: float
    #: failed writes, and the text of the last failure
    errors: int = 0
    last_error: str | None = None


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class _Writer:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    last_error: str | None = None
    #: perf_counter() when the write in flight started, or None between writes
    in_flight_since: float | None = None
    #: how long a write cut short by stop() had waited
    cut_short: float = 0.0
    conn: psycopg.Connection[Any] | None = None


class AppSimulator:
    """``writers`` threads, each on its own autocommit connection, writing one row at a time until stopped.

    Args:
        url: the database (URL string, SQLAlchemy URL or Engine).
        update_sql: a single-row write with one ``%s`` placeholder for the key, e.g.
            ``UPDATE events SET touched = now() WHERE id = %s``; keys are drawn at random from ``key_range``.
        insert_sql: optional statement without placeholders, run instead of the update every ``insert_every``-th
            write (the application keeps inserting rows too).
        writers: number of threads.
        insert_every: how often an insert replaces an update (per thread).
        key_range: inclusive (low, high) range of keys the updates pick from.
        seed: seed of the key choice, for repeatable runs.
    """

    def __init__(
        self,
        url: Bind,
        *,
        update_sql: str,
        insert_sql: str | None = None,
        writers: int = 2,
        insert_every: int = 5,
        key_range: tuple[int, int] = (1, 1_000),
        seed: int | None = None,
    ) -> None:
        if writers < 1:
            raise ValueError("writers must be at least 1")
        if insert_every < 1:
            raise ValueError("insert_every must be at least 1")
        if key_range[0] > key_range[1]:
            raise ValueError(f"key_range must be (low, high) with low <= high, got {key_range!r}")
        self.database = Database.from_bind(url, "backfill-appsim")
        self.update_sql = update_sql
        self.insert_sql = insert_sql
        self.insert_every = insert_every
        self.key_range = key_range
        self.seed = seed
        self._writers = [_Writer() for _ in range(writers)]
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._started_at: float | None = None
        self._stopped_at: float | None = None
        self.stats: AppStats | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> AppSimulator:
        """Open the connections and start writing. Raises ConnectError if a connection fails."""
        if self._threads:
            raise RuntimeError("the simulator has already been started")
        for writer in self._writers:
            # Connected here, not in the thread, so a bad URL fails the caller at once.
            writer.conn = psycopg.connect(
                self.database.conninfo, autocommit=True, application_name="backfill-appsim", connect_timeout=10
            )
        self._started_at = time.perf_counter()
        for number, writer in enumerate(self._writers):
            rng = random.Random(None if self.seed is None else self.seed + number)
            thread = threading.Thread(
                target=self._loop, args=(writer, rng), name=f"appsim-writer-{number}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> AppStats:
        """Stop writing and return the stats. A writer still blocked after ``timeout`` seconds has its statement
        cancelled; its wait so far counts as a stall."""
        if self.stats is not None:
            return self.stats
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread, writer in zip(self._threads, self._writers, strict=True):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive() and writer.conn is not None:
                # cancel_safe() from psycopg 3.2 on; cancel() before.
                getattr(writer.conn, "cancel_safe", writer.conn.cancel)()
                thread.join(5.0)
        self._stopped_at = time.perf_counter()
        self.stats = self.snapshot()
        for writer in self._writers:
            if writer.conn is not None:
                writer.conn.close()
        return self.stats

    def __enter__(self) -> AppSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- measuring ---------------------------------------------------------------------------------------------

    @property
    def writes(self) -> int:
        return sum(len(writer.latencies) for writer in self._writers)

    def wait_until_writing(self, timeout: float = 30.0) -> None:
        """Block until every writer has finished at least one write (so a measurement covers a working app).

        Raises:
            TimeoutError: a writer has not written within ``timeout`` seconds (its last error is quoted).
        """
        deadline = time.monotonic() + timeout
        while not all(writer.latencies for writer in self._writers):
            if time.monotonic() > deadline:
                errors = [w.last_error for w in self._writers if w.last_error]
                detail = f": {errors[-1]}" if errors else ""
                raise TimeoutError(f"the simulated application did not write within {timeout:g}s{detail}")
            time.sleep(0.01)

    def snapshot(self) -> AppStats:
        """The stats so far (or final, once stopped)."""
        now = self._stopped_at or time.perf_counter()
        seconds = now - self._started_at if self._started_at is not None else 0.0
        latencies: list[float] = []
        longest = 0.0
        for writer in self._writers:
            latencies.extend(writer.latencies[: len(writer.latencies)])
            since = writer.in_flight_since
            longest = max(longest, writer.cut_short, now - since if since is not None else 0.0)
        latencies.sort()
        longest = max(longest, latencies[-1] if latencies else 0.0)
        errors = [w for w in self._writers if w.last_error]
        return AppStats(
            writes=len(latencies),
            seconds=seconds,
            writes_per_second=len(latencies) / seconds if seconds > 0 else 0.0,
            p50_ms=_percentile(latencies, 0.50) * 1000,
            p99_ms=_percentile(latencies, 0.99) * 1000,
            max_stall_ms=longest * 1000,
            errors=sum(w.errors for w in self._writers),
            last_error=errors[-1].last_error if errors else None,
        )

    # --- the writers ---------------------------------------------------------------------------------------------

    def _loop(self, writer: _Writer, rng: random.Random) -> None:
        low, high = self.key_range
        count = 0
        while not self._stop.is_set():
            count += 1
            conn = writer.conn
            if conn is None or conn.closed:
                if not self._reconnect(writer):
                    continue
                conn = writer.conn
                assert conn is not None
            inserting = self.insert_sql is not None and count % self.insert_every == 0
            started = time.perf_counter()
            writer.in_flight_since = started
            try:
                if inserting:
                    assert self.insert_sql is not None
                    conn.execute(self.insert_sql.encode())
                else:
                    conn.execute(self.update_sql.encode(), (rng.randint(low, high),))
            except psycopg.Error as exc:
                if self._stop.is_set():
                    # Cancelled by stop(): not the application's failure, but its wait was a stall.
                    writer.cut_short = time.perf_counter() - started
                    break
                writer.errors += 1
                writer.last_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if conn.broken:
                    conn.close()
                self._stop.wait(0.05)  # no hot loop on a persistent error
            else:
                writer.latencies.append(time.perf_counter() - started)
            finally:
                writer.in_flight_since = None

    def _reconnect(self, writer: _Writer) -> bool:
        try:
            writer.conn = psycopg.connect(
                self.database.conninfo, autocommit=True, application_name="backfill-appsim", connect_timeout=10
            )
            return True
        except psycopg.Error as exc:
            writer.errors += 1
            writer.last_error = str(exc).strip().splitlines()[0]
            self._stop.wait(0.2)
            return False
