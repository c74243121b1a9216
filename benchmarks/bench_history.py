"""What the batch history costs per batch: the same backfill with and without its history row, side by side.

    uv run python benchmarks/bench_history.py                          # 200,000 rows, batches of 100, 3 rounds
    uv run python benchmarks/bench_history.py --rows 500000 --batch-size 1000 --pg-bin /usr/lib/postgresql/15/bin

Each round fills two fresh copies of the same table and runs the backfill on each, one whose batch statement writes
its row into the history ring (as every runner does) and one whose statement leaves that row out (same parameters,
same counters), alternating which goes first. Small batches make the per-batch cost visible: the figure is the
difference in seconds per batch, and the ratio of the two throughputs (with / without).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import psycopg
from common import EXPRESSION, checkpoint, database, drop_control_tables, fill, parse_args, server_version

import backfill
from backfill.executor import Executor
from backfill.pg.catalog import resolve
from backfill.pg.connect import Database
from backfill.pg.store import PostgresStore


def timed_run(url: str, table: str, batch_size: int, *, history: bool) -> tuple[float, int]:
    """Seconds and batches of one whole backfill of ``table``, its batches writing their history row or not."""
    spec = backfill.BackfillSpec(f"{table}_{time.time_ns()}", table, {"kind": EXPRESSION}, batch_size=batch_size)
    with PostgresStore(Database.from_bind(url), history=history) as store:
        plan = resolve(store.conn, spec)
        store.init()
        store.register(plan)
        checkpoint(url)
        executor = Executor(store, plan, spec.name, backfill.RunSettings(max_replica_lag_bytes=None))
        started = time.perf_counter()
        report = executor.run()
        elapsed = time.perf_counter() - started
    if not report.finished:
        raise SystemExit(f"backfill did not finish: {report}")
    return elapsed, report.batches


def one_round(conn: psycopg.Connection[Any], url: str, rows: int, batch_size: int, round_no: int) -> tuple[float, ...]:
    fill(conn, "bench_with", rows)
    fill(conn, "bench_without", rows)
    runs = [("bench_with", True), ("bench_without", False)]
    timings = {}
    for table, history in runs if round_no % 2 == 0 else reversed(runs):
        timings[history] = timed_run(url, table, batch_size, history=history)
    (with_s, batches), (without_s, _) = timings[True], timings[False]
    return with_s, without_s, float(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="rounds")
    args = parse_args(parser)

    with database(args.url, args.pg_bin) as url, psycopg.connect(url, autocommit=True) as conn:
        print(f"PostgreSQL {server_version(conn)}, {args.rows:,} rows, batches of {args.batch_size:,}")
        ratios, costs = [], []
        for round_no in range(args.repeat):
            with_s, without_s, batches = one_round(conn, url, args.rows, args.batch_size, round_no)
            ratio = (args.rows / with_s) / (args.rows / without_s)
            cost_ms = (with_s - without_s) / batches * 1000
            ratios.append(ratio)
            costs.append(cost_ms)
            print(
                f"round {round_no + 1}: {batches:,.0f} batches | with history {with_s / batches * 1000:.3f} ms/batch, "
                f"without {without_s / batches * 1000:.3f} ms/batch | history {cost_ms:+.3f} ms/batch | "
                f"throughput with/without {ratio:.3f}"
            )
        conn.execute("DROP TABLE IF EXISTS bench_with, bench_without")
        conn.execute("DROP SEQUENCE IF EXISTS bench_with_ids, bench_without_ids")
        drop_control_tables(conn)
    print(
        f"history cost per batch: {min(costs):+.3f} to {max(costs):+.3f} ms (median {statistics.median(costs):+.3f}); "
        f"throughput with/without {min(ratios):.3f}-{max(ratios):.3f} (median {statistics.median(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
