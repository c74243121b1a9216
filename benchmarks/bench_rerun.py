"""WAL written by a re-run: a backfill over rows that already hold their values, against the first, full run.

    uv run python benchmarks/bench_rerun.py                      # 1,000,000 rows, 3 rounds
    uv run python benchmarks/bench_rerun.py --rows 200000 --repeat 1 --pg-bin /usr/lib/postgresql/15/bin

Each round fills a fresh table, runs the backfill (a full rewrite), vacuums the table (as autovacuum would before
any later re-run: otherwise the re-run's reads prune the first run's dead rows and log that), then registers the
same change under a new name and runs it again, measuring the WAL each run wrote (``pg_current_wal_lsn()`` before
and after; nothing else writes meanwhile). Target: the re-run writes under 1% of the full run's WAL
(``skip_unchanged``, the default). With ``--no-skip-unchanged`` both runs rewrite every row, for comparison.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import psycopg
from common import EXPRESSION, checkpoint, database, drop_control_tables, fill, parse_args, server_version

import backfill


def wal_of(conn: psycopg.Connection[Any], url: str, spec: backfill.BackfillSpec) -> tuple[int, backfill.RunReport]:
    checkpoint(url)
    before = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
    report = backfill.run_backfill(url, spec)
    after = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", before).fetchone()
    assert after is not None and report.finished, report
    return int(after[0]), report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-skip-unchanged", dest="skip", action="store_false", help="rewrite every row")
    args = parse_args(parser)

    with database(args.url, args.pg_bin) as url, psycopg.connect(url, autocommit=True) as conn:
        print(f"PostgreSQL {server_version(conn)}, {args.rows:,} rows, skip_unchanged={args.skip}")
        shares = []
        for round_no in range(args.repeat):
            fill(conn, "bench_rerun", args.rows)
            name = f"rerun_{round_no}_{time.time_ns()}"
            first = backfill.BackfillSpec(name, "bench_rerun", {"kind": EXPRESSION}, skip_unchanged=args.skip)
            full_wal, full = wal_of(conn, url, first)
            conn.execute("VACUUM bench_rerun")
            again_wal, again = wal_of(conn, url, first.with_changes(name=f"{name}_again"))
            share = again_wal / full_wal
            shares.append(share)
            print(
                f"round {round_no + 1}: full run {full_wal / 2**20:,.1f} MiB WAL ({full.rows_updated:,} rows) | "
                f"re-run {again_wal / 2**20:,.2f} MiB WAL ({again.rows_updated:,} rows, {again.seconds:.2f} s) | "
                f"{share:.2%} of the full run"
            )
        conn.execute("DROP TABLE IF EXISTS bench_rerun")
        conn.execute("DROP SEQUENCE IF EXISTS bench_rerun_ids")
        drop_control_tables(conn)
        print(f"re-run WAL / full run WAL: {min(shares):.2%}-{max(shares):.2%} (target < 1%)")


if __name__ == "__main__":
    main()
