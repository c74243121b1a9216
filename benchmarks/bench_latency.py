"""Throughput of the backfill against one plain UPDATE across a network: both through a proxy that adds a fixed
delay each way (0, 1 and 2 ms by default; 1 ms each way is a 2 ms round trip, a same-region cloud network).

    uv run python benchmarks/bench_latency.py                    # 1,000,000 rows, 3 rounds per delay
    uv run python benchmarks/bench_latency.py --rows 200000 --delays 0,2 --repeat 1 --pg-bin /usr/lib/postgresql/15/bin

For each delay it prints the measured round trip (median of ``SELECT 1``), then per round the rows/s of the plain
UPDATE and of the backfill (default settings) and their ratio; each round fills fresh copies of the same data and
alternates which contender goes first. Target: ratio >= 0.9 through a 2 ms round trip.
"""

from __future__ import annotations

import argparse
import statistics
import time
from urllib.parse import urlsplit

import psycopg
from bench_throughput import one_round
from common import database, drop_control_tables, parse_args, server_version
from latency_proxy import DelayProxy


def round_trip_ms(url: str) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        samples = []
        for _ in range(30):
            started = time.perf_counter()
            conn.execute("SELECT 1")
            samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--delays", default="0,1,2", help="comma-separated delays each way, in ms")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per delay")
    args = parse_args(parser)

    with database(args.url, args.pg_bin) as url, psycopg.connect(url, autocommit=True) as setup:
        print(f"PostgreSQL {server_version(setup)}, {args.rows:,} rows, default settings, {args.repeat} round(s)")
        target = urlsplit(url)
        summary = []
        for delay_ms in (float(d) for d in args.delays.split(",")):
            with DelayProxy(target.hostname or "127.0.0.1", target.port or 5432, delay_ms / 1000) as proxy:
                proxied = proxy.rewrite(url)
                print(f"delay {delay_ms:g} ms each way: round trip {round_trip_ms(proxied):.2f} ms")
                ratios = []
                with psycopg.connect(proxied, autocommit=True) as conn:
                    for round_no in range(args.repeat):
                        plain_s, batched_s, report = one_round(setup, conn, proxied, args.rows, round_no)
                        ratio = plain_s / batched_s
                        ratios.append(ratio)
                        print(
                            f"  round {round_no + 1}: plain UPDATE {args.rows / plain_s:,.0f} rows/s | backfill "
                            f"{args.rows / batched_s:,.0f} rows/s ({report.batches} batches, throttled "
                            f"{report.throttled_seconds:.1f} s) | ratio {ratio:.2f}"
                        )
                summary.append((delay_ms, min(ratios), statistics.median(ratios), max(ratios)))
        setup.execute("DROP TABLE IF EXISTS bench_plain, bench_batched")
        setup.execute("DROP SEQUENCE IF EXISTS bench_plain_ids, bench_batched_ids")
        drop_control_tables(setup)
    for delay_ms, low, median, high in summary:
        print(f"delay {delay_ms:g} ms each way: backfill/plain {low:.2f}-{high:.2f} (median {median:.2f})")


if __name__ == "__main__":
    main()
