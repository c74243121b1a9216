"""What the application feels while an ``integer`` primary key referenced by another table's foreign key becomes
``bigint``: the plain ``ALTER COLUMN ... TYPE`` next to backfill's start and finish (the copy, the index and
foreign key copies, the swap), each under the same simulated application.

    uv run python benchmarks/bench_type_change.py                          # 1,000,000 accounts, as many payments
    uv run python benchmarks/bench_type_change.py --rows 200000 --pg-bin /usr/lib/postgresql/15/bin
    uv run python benchmarks/bench_type_change.py --url postgresql://...   # an existing server (tables bench_tc_*)
    uv run python benchmarks/bench_type_change.py --back                   # and the way back (alembic downgrade)

The application inserts accounts and payments for them, and updates payments, from ``--writers`` threads throughout.
For each way it prints the application's failed writes, writes/s and longest stall (its longest single write), the
change's own seconds and, online, how long the swap transaction took. Target: zero failed writes and a longest stall
of the order of one ordinary write online, where the plain ALTER stalls every writer for its whole rewrite.
``--back`` then measures the way back to ``integer`` the same way: restore, unfinish and cancel (the downgrades of
cleanup, finish and start, every id copied back) next to a plain ``ALTER COLUMN id TYPE integer``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from bench_schema_ops import plain, report
from common import checkpoint, database, quiet_logs, server_version

import backfill
from backfill.tools.appsim import AppSimulator, AppStats

T = TypeVar("T")

ACCOUNTS, PAYMENTS = "bench_tc_accounts", "bench_tc_payments"


def fill(conn: psycopg.Connection[Any], rows: int) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {PAYMENTS}, {ACCOUNTS}")
    conn.execute(f"CREATE TABLE {ACCOUNTS} (id serial PRIMARY KEY, email text NOT NULL)")
    conn.execute(
        f"INSERT INTO {ACCOUNTS} (email) SELECT 'a' || g || '@example.com' FROM generate_series(1, %s) g", (rows,)
    )
    conn.execute(
        f"CREATE TABLE {PAYMENTS} (id bigserial PRIMARY KEY, account_id integer NOT NULL REFERENCES {ACCOUNTS}, "
        "amount integer NOT NULL)"
    )
    conn.execute(
        f"INSERT INTO {PAYMENTS} (account_id, amount) SELECT g, g %% 97 + 1 FROM generate_series(1, %s) g", (rows,)
    )
    conn.execute(f"CREATE INDEX {PAYMENTS}_account_idx ON {PAYMENTS} (account_id)")
    conn.execute(f"VACUUM ANALYZE {ACCOUNTS}, {PAYMENTS}")
    conn.execute("CHECKPOINT")


def simulator(url: str, rows: int, writers: int) -> AppSimulator:
    return AppSimulator(
        url,
        update_sql=f"UPDATE {PAYMENTS} SET amount = amount + 1 WHERE id = %s",
        insert_sql=(
            f"WITH a AS (INSERT INTO {ACCOUNTS} (email) VALUES ('n' || gen_random_uuid() || '@example.com') "
            f"RETURNING id) INSERT INTO {PAYMENTS} (account_id, amount) SELECT id, 1 FROM a"
        ),
        writers=writers,
        key_range=(1, rows),
        seed=42,
    )


def measure(url: str, rows: int, writers: int, change: Callable[[], T]) -> tuple[AppStats, float, T]:
    checkpoint(url)
    with simulator(url, rows, writers) as sim:
        sim.wait_until_writing()
        time.sleep(0.5)  # a benchmark's measuring window before the change, not synchronisation
        started = time.perf_counter()
        result = change()
        elapsed = time.perf_counter() - started
        time.sleep(0.5)
        return sim.stop(), elapsed, result


def online(url: str) -> list[backfill.TypeChangeResult]:
    return [
        backfill.start_column_type_change(url, ACCOUNTS, "id", "bigint"),
        backfill.finish_column_type_change(url, ACCOUNTS, "id"),
    ]


def back(url: str) -> list[backfill.TypeChangeResult]:
    return [
        backfill.restore_column_type_change(url, ACCOUNTS, "id", "integer"),
        backfill.unfinish_column_type_change(url, ACCOUNTS, "id"),
        backfill.cancel_column_type_change(url, ACCOUNTS, "id"),
    ]


def report_swap(results: list[backfill.TypeChangeResult]) -> None:
    swap = next(step for result in results for step in result.steps if step.action == "swap")
    print(f"{'':<31} the swap transaction: {swap.seconds * 1000:.0f} ms, {swap.attempts} attempt(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="accounts (and payments)")
    parser.add_argument("--writers", type=int, default=4, help="application threads")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of plain then online")
    parser.add_argument("--url", help="an existing database (default: a throwaway embedded server)")
    parser.add_argument("--pg-bin", help="server binaries for the throwaway server")
    parser.add_argument("--back", action="store_true", help="then the way back to integer, online and plain")
    args = parser.parse_args()
    quiet_logs()

    with database(args.url, args.pg_bin) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            version = server_version(conn)
        print(f"PostgreSQL {version}, {args.rows:,} accounts and payments, {args.writers} writers")
        print(f"{'change':<22} {'how':<8} {'seconds':>8} {'errors':>7} {'writes/s':>9} {'longest stall':>14}")
        for _ in range(args.rounds):
            with psycopg.connect(url, autocommit=True) as conn:
                fill(conn, args.rows)
            statement = f"ALTER TABLE {ACCOUNTS} ALTER COLUMN id TYPE bigint"
            stats, seconds, _ = measure(url, args.rows, args.writers, plain(url, statement))
            report("integer -> bigint", "plain", seconds, stats)
            with psycopg.connect(url, autocommit=True) as conn:
                fill(conn, args.rows)
            stats, seconds, results = measure(url, args.rows, args.writers, lambda: online(url))
            report("integer -> bigint", "online", seconds, stats)
            report_swap(results)
            backfill.cleanup_column_type_change(url, ACCOUNTS, "id")
            if args.back:
                stats, seconds, results = measure(url, args.rows, args.writers, lambda: back(url))
                report("bigint -> integer", "online", seconds, stats)
                report_swap(results)
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(f"ALTER TABLE {ACCOUNTS} ALTER COLUMN id TYPE bigint")  # to go back from again
                statement = f"ALTER TABLE {ACCOUNTS} ALTER COLUMN id TYPE integer"
                stats, seconds, _ = measure(url, args.rows, args.writers, plain(url, statement))
                report("bigint -> integer", "plain", seconds, stats)


if __name__ == "__main__":
    main()
