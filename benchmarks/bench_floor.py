"""What batching itself costs, apart from the tool: one plain UPDATE, a hand-written loop of key-range UPDATEs (each
its own transaction, no checkpoint, no look-ahead, no checks: the floor of any batched approach), and the backfill
with the same batch size, on fresh copies of the same data.

    uv run python benchmarks/bench_floor.py                      # 1,000,000 rows, batches of 10,000, 3 rounds
    uv run python benchmarks/bench_floor.py --rows 200000 --batch-size 5000 --pg-bin /usr/lib/postgresql/15/bin

Prints rows/s of each and two ratios per round: the loop's against the plain UPDATE (what batching by key range
costs on one core however it is done) and the backfill's against the loop (what the tool adds: the look-ahead, the
checkpoint, the checks, the history row, the runner's own work between batches). The order rotates by round.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import psycopg
from bench_throughput import batched, plain_update
from common import EXPRESSION, checkpoint, database, drop_control_tables, fill, parse_args, server_version


def hand_loop(url: str, table: str, rows: int, batch_size: int) -> float:
    checkpoint(url)
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        for low in range(0, rows, batch_size):
            conn.execute(f"UPDATE {table} SET kind = {EXPRESSION} WHERE id > %s AND id <= %s", (low, low + batch_size))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parse_args(parser)

    with database(args.url, args.pg_bin) as url, psycopg.connect(url, autocommit=True) as conn:
        print(f"PostgreSQL {server_version(conn)}, {args.rows:,} rows, batches of {args.batch_size:,}")
        loop_ratios, tool_ratios = [], []
        for round_no in range(args.repeat):
            for table in ("bench_plain", "bench_loop", "bench_batched"):
                fill(conn, table, args.rows)
            runs: dict[str, Any] = {
                "plain": lambda: plain_update(conn, "bench_plain"),
                "loop": lambda: hand_loop(url, "bench_loop", args.rows, args.batch_size),
                "backfill": lambda: batched(url, "bench_batched", f"floor_{time.time_ns()}", args.batch_size)[0],
            }
            order = list(runs)[round_no % 3 :] + list(runs)[: round_no % 3]
            seconds = {name: runs[name]() for name in order}
            loop_ratios.append(seconds["plain"] / seconds["loop"])
            tool_ratios.append(seconds["loop"] / seconds["backfill"])
            print(
                f"  round {round_no + 1} ({', '.join(order)}): "
                + " | ".join(f"{name} {args.rows / seconds[name]:,.0f} rows/s" for name in runs)
                + f" | loop/plain {loop_ratios[-1]:.2f}, backfill/loop {tool_ratios[-1]:.2f}"
            )
        for table in ("bench_plain", "bench_loop", "bench_batched"):
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(f"DROP SEQUENCE IF EXISTS {table}_ids")
        drop_control_tables(conn)
    for label, values in (("loop/plain", loop_ratios), ("backfill/loop", tool_ratios)):
        print(f"{label}: {min(values):.2f}-{max(values):.2f} (median {statistics.median(values):.2f})")


if __name__ == "__main__":
    main()
