"""The session settings every connection of ours pins right after connecting, whatever the database or role sets.

Keys travel between batches as PostgreSQL's text form (stored as JSON in the checkpoint) and are cast back on the
way in. Several text forms depend on session settings (``DateStyle``, ``IntervalStyle``, ``extra_float_digits``,
``bytea_output``, ``lc_monetary``), and so do the batch statements themselves (isolation, read-only, row-level
security, whether triggers fire). ``ALTER DATABASE ... SET`` or ``ALTER ROLE ... SET`` can change any of them for
one runner and not another, or between the run that wrote a checkpoint and the run that reads it: a float key
rounded to 15 digits skips rows, a ``DateStyle`` of ``SQL, DMY`` reads 03/04 back as the 3rd of April.

``TimeZone`` and the field order of ``DateStyle`` are left as the database sets them: the key forms carry their
UTC offset and print dates year first, so they do not depend on them, while the author's expressions
(``created_at::date``, ``'01/02/2026'::date``) should mean what they mean in the application's sessions.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

__all__ = ["PINNED_SETTINGS", "pin_session"]

#: (setting, value) pinned on every connection, with why.
PINNED_SETTINGS: tuple[tuple[str, str], ...] = (
    # Year-first output only; the field order used to read ambiguous input stays the database's.
    ("DateStyle", "ISO"),
    ("IntervalStyle", "postgres"),
    # Any value >= 1 prints the shortest text that reads back as the same float (PostgreSQL 12+); 0 rounds.
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
    # money prints and reads with the locale's symbols: every runner must use the same one.
    ("lc_monetary", "C"),
    # Fragments are checked and run under the same reading of backslashes.
    ("standard_conforming_strings", "on"),
    ("client_encoding", "UTF8"),
    # A batch reads its checkpoint, the look-ahead and the rows with a fresh snapshot per statement, and the
    # last batch's finish check relies on it (see PostgresStore._finish_if_done).
    ("default_transaction_isolation", "read committed"),
    ("default_transaction_read_only", "off"),
    # Row-level security that would hide rows from a batch makes PostgreSQL raise an error instead of filtering.
    ("row_security", "off"),
)

_PIN = sql.SQL(
    "SELECT pg_catalog.set_config(s.name, s.value, false)"
    "  FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS s(name, value, ord) ORDER BY s.ord"
)

# Only a superuser may set session_replication_role, and only a superuser's sessions can start with 'replica':
# there, user triggers (and foreign-key checks) would silently not fire for the backfill's updates.
_ORIGIN = sql.SQL(
    "SELECT pg_catalog.set_config('session_replication_role', 'origin', false)"
    " WHERE pg_catalog.current_setting('session_replication_role') <> 'origin'"
)


def pin_session(conn: psycopg.Connection[Any]) -> None:
    """Apply :data:`PINNED_SETTINGS` (and ``session_replication_role = origin``) to a fresh connection."""
    names = [name for name, _ in PINNED_SETTINGS]
    values = [value for _, value in PINNED_SETTINGS]
    conn.execute(_PIN, (names, values))
    conn.execute(_ORIGIN)
