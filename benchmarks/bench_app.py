"""What the application feels: single-row writes next to (a) nothing, (b) one plain UPDATE of the whole table,
(c) the backfill with default settings.

    uv run python benchmarks/bench_app.py                        # 1,000,000 rows on a throwaway embedded server
    uv run python benchmarks/bench_app.py --rows 200000 --writers 4 --pg-bin /usr/lib/postgresql/15/bin
    uv run python benchmarks/bench_app.py --url postgresql://...  # an existing server (tables bench_app_*)

For each phase it prints the application's writes/s, p50/p99 latency and longest stall, and for (b) and (c) the
change's own rows/s. Targets with defaults: the backfill keeps the longest stall <= 100 ms and reaches >= 0.8 of
the plain UPDATE's rows/s while the application writes. The server keeps fsync on (the default): a realistic commit.
"""

from __future__ import annotations

import argparse
import time

import psycopg
from common import EXPRESSION, checkpoint, database, drop_control_tables, fill, parse_args, server_version

import backfill
from backfill.tools.appsim import AppSimulator, AppStats


def simulator(url: str, table: str, rows: int, writers: int) -> AppSimulator:
    return AppSimulator(
        url,
        update_sql=f"UPDATE {table} SET touched = touched + 1 WHERE id = %s",
        insert_sql=f"INSERT INTO {table} (id, payload) VALUES (nextval('{table}_ids'), md5(random()::text))",
        writers=writers,
        key_range=(1, rows),
        seed=42,
    )


def idle(url: str, table: str, rows: int, writers: int, seconds: float) -> AppStats:
    with simulator(url, table, rows, writers) as sim:
        sim.wait_until_writing()
        time.sleep(seconds)  # a benchmark's measuring window, not synchronisation
        return sim.stop()


def plain_update(url: str, table: str, rows: int, writers: int) -> tuple[AppStats, float]:
    with psycopg.connect(url, autocommit=True) as conn, simulator(url, table, rows, writers) as sim:
        sim.wait_until_writing()
        started = time.perf_counter()
        conn.execute(f"UPDATE {table} SET kind = {EXPRESSION}")
        elapsed = time.perf_counter() - started
        return sim.stop(), elapsed


def backfill_run(
    url: str, table: str, rows: int, writers: int, settings: backfill.RunSettings
) -> tuple[AppStats, float, backfill.RunReport]:
    spec = backfill.BackfillSpec(f"{table}_fill_{time.time_ns()}", table, {"kind": EXPRESSION})
    with simulator(url, table, rows, writers) as sim:
        sim.wait_until_writing()
        started = time.perf_counter()
        report = backfill.run_backfill(url, spec, settings=settings)
        elapsed = time.perf_counter() - started
        stats = sim.stop()
    if not report.finished:
        raise SystemExit(f"the backfill did not finish: {report}")
    return stats, elapsed, report


def line(label: str, stats: AppStats, extra: str = "") -> str:
    errors = f", {stats.errors} errors ({stats.last_error})" if stats.errors else ""
    return (
        f"{label:<16} app {stats.writes_per_second:8,.0f} writes/s  p50 {stats.p50_ms:6.2f} ms  "
        f"p99 {stats.p99_ms:7.2f} ms  longest stall {stats.max_stall_ms:8.1f} ms{errors}{extra}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--writers", type=int, default=2, help="application connections")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="length of phase (a)")
    parser.add_argument(
        "--target-batch-ms", type=float, help="override target_batch_seconds (default: the library's default)"
    )
    args = parse_args(parser)

    with database(args.url, args.pg_bin) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            target = args.target_batch_ms or backfill.RunSettings().target_batch_seconds * 1000  # type: ignore[operator]
            print(
                f"PostgreSQL {server_version(conn)}, {args.rows:,} rows, {args.writers} app writers, "
                f"backfill target batch {target:.0f} ms"
            )
            fill(conn, "bench_app_plain", args.rows)
            fill(conn, "bench_app_batched", args.rows)

        quiet = idle(url, "bench_app_batched", args.rows, args.writers, args.idle_seconds)
        print(line("(a) nothing", quiet))

        checkpoint(url)
        plain_stats, plain_s = plain_update(url, "bench_app_plain", args.rows, args.writers)
        plain_rate = args.rows / plain_s
        print(line("(b) plain UPDATE", plain_stats, f"  | UPDATE {plain_rate:,.0f} rows/s ({plain_s:.2f} s)"))

        checkpoint(url)
        settings = backfill.RunSettings()
        if args.target_batch_ms is not None:
            settings = backfill.RunSettings(target_batch_seconds=args.target_batch_ms / 1000)
        batched_stats, batched_s, report = backfill_run(url, "bench_app_batched", args.rows, args.writers, settings)
        batched_rate = report.rows_updated / batched_s
        print(
            line(
                "(c) backfill",
                batched_stats,
                f"  | backfill {batched_rate:,.0f} rows/s ({batched_s:.2f} s, {report.batches} batches, longest "
                f"{report.longest_batch_seconds * 1000:.0f} ms, throttled {report.throttled_seconds:.2f} s, "
                f"{report.retries} retries)",
            )
        )

        with psycopg.connect(url, autocommit=True) as conn:
            left = conn.execute("SELECT count(*) FROM bench_app_batched WHERE kind IS NULL AND id <= %s", (args.rows,))
            assert left.fetchone() == (0,), "the backfill missed rows"
            conn.execute("DROP TABLE IF EXISTS bench_app_plain, bench_app_batched")
            conn.execute("DROP SEQUENCE IF EXISTS bench_app_plain_ids, bench_app_batched_ids")
            drop_control_tables(conn)

    ratio = batched_rate / plain_rate
    stall_ok = batched_stats.max_stall_ms <= 100
    print(
        f"backfill/plain throughput: {ratio:.2f} (target >= 0.80: {'met' if ratio >= 0.8 else 'MISSED'}); "
        f"longest stall {batched_stats.max_stall_ms:.0f} ms vs {plain_stats.max_stall_ms:.0f} ms for the plain "
        f"UPDATE (target <= 100 ms: {'met' if stall_ok else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
