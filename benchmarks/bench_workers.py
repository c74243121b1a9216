"""Scale-out: one plain UPDATE, then the backfill with 1, 2 and 4 workers, each on a fresh copy of the same data.

    uv run python benchmarks/bench_workers.py                    # 2,000,000 rows on a throwaway embedded server
    uv run python benchmarks/bench_workers.py --rows 500000 --workers 1,2 --pg-bin /usr/lib/postgresql/15/bin

Prints rows/s of each run, its speed-up over one worker and over the plain UPDATE, and the core count. A plain
UPDATE runs on one core, so parallel batches can beat the very statement that causes the outage. Target on a
2-core machine: 2 workers >= 1.4x the plain UPDATE.
"""

from __future__ import annotations

import argparse
import os
import time

import psycopg
from common import EXPRESSION, checkpoint, database, drop_control_tables, fill, parse_args, server_version

import backfill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--batch-size", type=int, help="pin every batch to this size (default: adaptive)")
    args = parse_args(parser)
    counts = [int(n) for n in args.workers.split(",")]

    with database(args.url, args.pg_bin) as url, psycopg.connect(url, autocommit=True) as conn:
        cores = os.cpu_count() if not args.url else None
        print(
            f"PostgreSQL {server_version(conn)}, {args.rows:,} rows, "
            f"database cores: {cores if cores else 'unknown (remote server)'}"
        )
        fill(conn, "bench_workers", args.rows)
        checkpoint(url)
        started = time.perf_counter()
        conn.execute(f"UPDATE bench_workers SET kind = {EXPRESSION}")
        plain = time.perf_counter() - started
        print(f"plain UPDATE:  {args.rows / plain:>10,.0f} rows/s ({plain:.2f} s)")

        one_worker = None
        for workers in counts:
            fill(conn, "bench_workers", args.rows)
            name = f"bench_workers_{workers}_{time.time_ns()}"
            spec = backfill.BackfillSpec(name, "bench_workers", {"kind": EXPRESSION}, batch_size=args.batch_size)
            checkpoint(url)
            started = time.perf_counter()
            report = backfill.run_backfill(url, spec, workers=workers)
            elapsed = time.perf_counter() - started
            if not report.finished or report.rows_updated != args.rows:
                raise SystemExit(f"backfill did not finish: {report}")
            one_worker = one_worker or elapsed
            print(
                f"{workers} worker(s):   {args.rows / elapsed:>10,.0f} rows/s ({elapsed:.2f} s, "
                f"{report.batches} batches, longest {report.longest_batch_seconds * 1000:.0f} ms) | "
                f"{one_worker / elapsed:.2f}x one worker, {plain / elapsed:.2f}x the plain UPDATE"
            )
        conn.execute("DROP TABLE IF EXISTS bench_workers")
        conn.execute("DROP SEQUENCE IF EXISTS bench_workers_ids")
        drop_control_tables(conn)


if __name__ == "__main__":
    main()
