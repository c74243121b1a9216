"""The backfill at scale, with the default throttles: per-batch time, time spent waiting, and the runner's memory.

    uv run python benchmarks/bench_scale.py                      # 1,000,000 and 10,000,000 rows (slow: run it aside)
    uv run python benchmarks/bench_scale.py --rows 1000000,10000000 --pg-bin /usr/lib/postgresql/15/bin

For each size it fills a fresh table and runs the backfill in a process of its own (so that its peak RSS is the
runner's alone), with batches pinned at ``--batch-size`` (10,000; the per-batch time is then comparable across
sizes) and every other setting at its default, on an otherwise idle server: autovacuum triggered by the backfill's
own updates is the only other activity. Prints run time, time waiting in throttles (by reason) and its share of the
run (target < 10%), the median batch time (target: at the largest size <= 1.2x the smallest) and peak RSS
(target <= 100 MB, flat).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import MutableMapping
from typing import Any

import psycopg
import structlog
from common import EXPRESSION, checkpoint, database, drop_control_tables, fill, server_options, server_version

import backfill


def child(url: str, table: str, batch_size: int) -> None:
    """Run the backfill here and print what it did as JSON (this process is the runner: its RSS is the figure)."""
    batch_ms: list[float] = []
    waits: Counter[str] = Counter()

    def collect(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if event["event"] == "batch_committed":
            batch_ms.append(event["ms"])
        elif event["event"] == "throttle_wait":
            waits[event["reason"]] += 1
        if method in ("warning", "error"):
            return event
        raise structlog.DropEvent

    structlog.configure(
        processors=[collect, structlog.dev.ConsoleRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    spec = backfill.BackfillSpec(f"scale_{time.time_ns()}", table, {"kind": EXPRESSION}, batch_size=batch_size)
    report = backfill.run_backfill(url, spec)
    print(
        json.dumps(
            {
                "outcome": report.outcome.value,
                "rows": report.rows_updated,
                "seconds": report.seconds,
                "throttled": report.throttled_seconds,
                "wait_polls": dict(waits),
                "median_ms": statistics.median(batch_ms),
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1000000,10000000", help="comma-separated table sizes")
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--child", nargs=2, metavar=("URL", "TABLE"), help=argparse.SUPPRESS)
    server_options(parser)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.batch_size)
        return

    with database(args.url, args.pg_bin) as url, psycopg.connect(url, autocommit=True) as conn:
        print(f"PostgreSQL {server_version(conn)}, batches pinned at {args.batch_size:,}, default throttles")
        medians = {}
        for rows in (int(n) for n in args.rows.split(",")):
            fill(conn, "bench_scale", rows)
            checkpoint(url)
            argv = [sys.executable, __file__, "--batch-size", str(args.batch_size), "--child", url, "bench_scale"]
            done = subprocess.run(argv, check=True, capture_output=True, text=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            medians[rows] = result["median_ms"]
            print(
                f"{rows:>12,} rows: {result['seconds']:7.1f} s ({result['outcome']}), throttled "
                f"{result['throttled']:.1f} s = {result['throttled'] / result['seconds']:.1%} of the run "
                f"(polls by reason: {result['wait_polls'] or 'none'}), median batch {result['median_ms']:.1f} ms, "
                f"runner peak RSS {result['rss_mb']:.0f} MB"
            )
        sizes = sorted(medians)
        if len(sizes) > 1:
            print(f"median batch at {sizes[-1]:,} / at {sizes[0]:,} rows: {medians[sizes[-1]] / medians[sizes[0]]:.2f}")
        conn.execute("DROP TABLE IF EXISTS bench_scale")
        conn.execute("DROP SEQUENCE IF EXISTS bench_scale_ids")
        drop_control_tables(conn)


if __name__ == "__main__":
    main()
