"""A filter that matches few rows: the backfill against one ``UPDATE ... WHERE filter``, on fresh copies of the
same data (5,000,000 rows, 1% of them matching, spread evenly over the key range).

    uv run python benchmarks/bench_sparse.py                     # 5,000,000 rows, 1% matching, 3 rounds
    uv run python benchmarks/bench_sparse.py --rows 1000000 --every 100 --pg-bin /usr/lib/postgresql/15/bin

Default settings. Prints both times, the backfill's batches, and backfill time / UPDATE time (target <= 1.5): the
backfill walks the whole key range, and sizing its batches by time rather than by rows lets it cost about one pass
over the key's index.
"""

from __future__ import annotations

import argparse
import statistics
import time

import psycopg
from common import EXPRESSION, checkpoint, database, drop_control_tables, fill, parse_args, server_version

import backfill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--every", type=int, default=100, help="one row in this many matches the filter")
    parser.add_argument("--repeat", type=int, default=3)
    args = parse_args(parser)
    kind = f"CASE WHEN mod(g, {args.every}) = 0 THEN NULL ELSE 'done' END"

    with database(args.url, args.pg_bin) as url, psycopg.connect(url, autocommit=True) as conn:
        print(f"PostgreSQL {server_version(conn)}, {args.rows:,} rows, 1 in {args.every} matching kind IS NULL")
        ratios = []
        for round_no in range(args.repeat):
            fill(conn, "bench_plain", args.rows, kind=kind)
            fill(conn, "bench_sparse", args.rows, kind=kind)
            spec = backfill.BackfillSpec(
                f"sparse_{round_no}_{time.time_ns()}", "bench_sparse", {"kind": EXPRESSION}, where="kind IS NULL"
            )
            timings: dict[str, float] = {}
            for contender in ("plain", "backfill") if round_no % 2 == 0 else ("backfill", "plain"):
                checkpoint(url)
                started = time.perf_counter()
                if contender == "plain":
                    conn.execute(f"UPDATE bench_plain SET kind = {EXPRESSION} WHERE kind IS NULL")
                else:
                    report = backfill.run_backfill(url, spec)
                    if not report.finished:
                        raise SystemExit(f"backfill did not finish: {report}")
                timings[contender] = time.perf_counter() - started
            left = conn.execute("SELECT count(*) FROM bench_sparse WHERE kind IS NULL").fetchone()
            assert left == (0,), "the backfill missed rows"
            ratio = timings["backfill"] / timings["plain"]
            ratios.append(ratio)
            print(
                f"round {round_no + 1}: UPDATE ... WHERE {timings['plain']:.2f} s | "
                f"backfill {timings['backfill']:.2f} s "
                f"({report.rows_updated:,} rows, {report.batches} batches, longest "
                f"{report.longest_batch_seconds * 1000:.0f} ms) | backfill/UPDATE {ratio:.2f}"
            )
        conn.execute("DROP TABLE IF EXISTS bench_plain, bench_sparse")
        conn.execute("DROP SEQUENCE IF EXISTS bench_plain_ids, bench_sparse_ids")
        drop_control_tables(conn)
        print(
            f"backfill/UPDATE: {min(ratios):.2f}-{max(ratios):.2f} (median {statistics.median(ratios):.2f}; "
            "target <= 1.5)"
        )


if __name__ == "__main__":
    main()
