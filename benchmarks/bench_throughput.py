"""Throughput of the batched backfill against one plain UPDATE of the whole table, on fresh copies of the same data.

    uv run python benchmarks/bench_throughput.py                 # 1,000,000 rows on a throwaway embedded server
    uv run python benchmarks/bench_throughput.py --rows 200000 --repeat 3 --url postgresql://...
    uv run python benchmarks/bench_throughput.py --pg-bin /usr/lib/postgresql/15/bin

Prints rows/s of each, their ratio (target >= 0.9) and the longest batch (target < 250 ms), with the default settings
or with every batch pinned to a size (``--batch-size 10000``).
Each round times the plain UPDATE and the backfill back to back in one process, alternating which goes first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import psycopg
from common import EXPRESSION, checkpoint, database, drop_control_tables, fill, parse_args, server_version

import backfill


def plain_update(conn: psycopg.Connection[Any], table: str) -> float:
    conn.execute("CHECKPOINT")  # neither contender pays for the other's dirty buffers
    started = time.perf_counter()
    conn.execute(f"UPDATE {table} SET kind = {EXPRESSION}")
    return time.perf_counter() - started


def batched(url: str, table: str, name: str, batch_size: int | None) -> tuple[float, backfill.RunReport]:
    spec = backfill.BackfillSpec(name, table, {"kind": EXPRESSION}, batch_size=batch_size)
    checkpoint(url)
    started = time.perf_counter()
    report = backfill.run_backfill(url, spec)
    elapsed = time.perf_counter() - started
    if not report.finished:
        raise SystemExit(f"backfill did not finish: {report}")
    return elapsed, report


def one_round(
    setup: psycopg.Connection[Any],
    conn: psycopg.Connection[Any],
    url: str,
    rows: int,
    round_no: int,
    batch_size: int | None = None,
) -> tuple[float, float, backfill.RunReport]:
    """Fresh copies of the same data, then the plain UPDATE (on ``conn``) and the backfill (through ``url``), which
    goes first alternating by round. Returns (plain seconds, backfill seconds, the backfill's report)."""
    fill(setup, "bench_plain", rows)
    fill(setup, "bench_batched", rows)
    name = f"bench_{round_no}_{time.time_ns()}"
    if round_no % 2 == 0:
        plain_s = plain_update(conn, "bench_plain")
        batched_s, report = batched(url, "bench_batched", name, batch_size)
    else:
        batched_s, report = batched(url, "bench_batched", name, batch_size)
        plain_s = plain_update(conn, "bench_plain")
    assert setup.execute("SELECT count(*) FROM bench_batched WHERE kind IS NULL").fetchone() == (0,)
    return plain_s, batched_s, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the median ratio is reported")
    parser.add_argument(
        "--batch-size", type=int, help="pin every batch to this size (default: adaptive, the default settings)"
    )
    args = parse_args(parser)

    with database(args.url, args.pg_bin) as url, psycopg.connect(url, autocommit=True) as conn:
        server = server_version(conn)
        sizing = f"batches pinned at {args.batch_size:,}" if args.batch_size else "default settings (adaptive batches)"
        print(f"PostgreSQL {server}, {args.rows:,} rows, {sizing}")
        ratios = []
        for round_no in range(args.repeat):
            plain_s, batched_s, report = one_round(conn, conn, url, args.rows, round_no, args.batch_size)
            ratio = plain_s / batched_s
            ratios.append(ratio)
            print(
                f"round {round_no + 1}: plain UPDATE {args.rows / plain_s:,.0f} rows/s ({plain_s:.2f} s) | "
                f"backfill {args.rows / batched_s:,.0f} rows/s ({batched_s:.2f} s, {report.batches} batches, "
                f"longest batch {report.longest_batch_seconds * 1000:.0f} ms) | ratio {ratio:.2f}"
            )
        conn.execute("DROP TABLE IF EXISTS bench_plain, bench_batched")
        conn.execute("DROP SEQUENCE IF EXISTS bench_plain_ids, bench_batched_ids")
        drop_control_tables(conn)
        print(f"median ratio backfill/plain: {statistics.median(ratios):.2f} (target >= 0.90)")


if __name__ == "__main__":
    main()
