"""What keep_in_sync's trigger costs the application: writes/s with the trigger next to writes/s without it.

    uv run python benchmarks/bench_trigger.py                     # throwaway embedded server, 5 rounds
    uv run python benchmarks/bench_trigger.py --rounds 9 --seconds 3 --pg-bin /usr/lib/postgresql/15/bin
    uv run python benchmarks/bench_trigger.py --url postgresql://...  # an existing server (tables bench_trigger_*)

Two copies of a table, one with the trigger, and two workloads of single-row autocommit writes by application code
that does not know the new column: ``insert`` (every write an INSERT leaving ``kind`` NULL: the trigger function
runs and fills it) and ``update`` (UPDATEs of rows already filled: the trigger's WHEN clause is false, so the
function is not called). Each round measures both tables in ABBA order and prints the ratio of writes/s (with /
without); quote the median and range over rounds (the machine is shared and noisy). synchronous_commit is off by
default, so a write costs its CPU and not a WAL flush: the ratio is the trigger's share at its largest.
"""

from __future__ import annotations

import argparse
import statistics
import time

import psycopg
from common import database, fill, parse_args, require_none, server_version
from psycopg import sql

import backfill
from backfill.schema import sync
from backfill.schema.notnull import PsycopgSession
from backfill.tools.appsim import AppSimulator

PLAIN, SYNCED = "bench_trigger_plain", "bench_trigger_synced"


def spec(table: str) -> backfill.BackfillSpec:
    return backfill.BackfillSpec(f"{table}_kind", table, {"kind": "upper(payload)"}, where="kind IS NULL")


def simulator(url: str, table: str, workload: str, rows: int, writers: int) -> AppSimulator:
    update = f"UPDATE {table} SET touched = touched + 1 WHERE id = %s"
    if workload == "insert":
        insert = f"INSERT INTO {table} (id, payload) VALUES (nextval('{table}_ids'), md5(random()::text))"
        return AppSimulator(url, update_sql=update, insert_sql=insert, insert_every=1, writers=writers, seed=3)
    return AppSimulator(url, update_sql=update, writers=writers, key_range=(1, rows), seed=3)


def writes_per_second(url: str, table: str, workload: str, rows: int, writers: int, seconds: float) -> float:
    with simulator(url, table, workload, rows, writers) as sim:
        sim.wait_until_writing()
        started, began = sim.writes, time.perf_counter()
        time.sleep(seconds)  # the measuring window, not synchronisation
        counted, elapsed = sim.writes - started, time.perf_counter() - began
    stats = sim.stats
    if stats is None or stats.errors:
        raise SystemExit(f"the application failed: {stats.last_error if stats else '?'}")
    return counted / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5, help="measuring window per workload and contender")
    parser.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        default="off",
        help="for the application's writes; off (default) leaves the CPU cost of a write, the trigger's share of it",
    )
    args = parse_args(parser)

    with database(args.url, args.pg_bin) as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET synchronous_commit = {}").format(
                sql.Identifier(str(conn.info.dbname)), sql.Literal(args.synchronous_commit)
            )
        )
        for table in (PLAIN, SYNCED):
            fill(conn, table, args.rows)
            conn.execute(f"UPDATE {table} SET kind = upper(payload)")  # the update workload touches filled rows
        synced = backfill.plan_backfill(url, spec(SYNCED)).target
        sync.install_sync_trigger(PsycopgSession(conn), synced, spec(SYNCED).name)
        print(
            f"PostgreSQL {server_version(conn)}; {args.rows:,} rows; {args.writers} writers; windows of "
            f"{args.seconds:g} s; synchronous_commit {args.synchronous_commit}"
        )
        ratios: dict[str, list[float]] = {"insert": [], "update": []}
        for round_no in range(1, args.rounds + 1):
            for workload in ("insert", "update"):
                # ABBA order, so a drift of the machine's load during the round cancels out.
                measured = {PLAIN: 0.0, SYNCED: 0.0}
                for table in (PLAIN, SYNCED, SYNCED, PLAIN):
                    measured[table] += writes_per_second(url, table, workload, args.rows, args.writers, args.seconds)
                ratio = measured[SYNCED] / measured[PLAIN] if measured[PLAIN] else 0.0
                ratios[workload].append(ratio)
                print(
                    f"round {round_no} {workload:6}: {measured[PLAIN] / 2:8,.0f} writes/s without the trigger, "
                    f"{measured[SYNCED] / 2:8,.0f} with it: ratio {ratio:.3f}"
                )
        # The trigger did its job in the measured runs: every row inserted into the synced table has kind set.
        require_none(conn, SYNCED, "kind IS DISTINCT FROM upper(payload)", "lack the kind the trigger computes")
        for workload, values in ratios.items():
            middle = statistics.median(values)
            print(
                f"{workload:6}: writes/s with / without the trigger: median {middle:.3f}, range {min(values):.3f} "
                f"..{max(values):.3f}"
            )


if __name__ == "__main__":
    main()
