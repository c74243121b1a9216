"""Connecting the way the application's engine does, on a server that really asks for passwords, and passwords that
never show: in errors, logs at every level, status output, reprs and Alembic messages."""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
import structlog
from click.testing import CliRunner, Result
from psycopg import sql
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine

import backfill
from backfill import BackfillSpec, ConnectError
from backfill.cli import EXIT_OK, cli
from backfill.pg.connect import Database
from backfill.tools.embedded import EmbeddedServer

#: A password libpq and URLs both have to quote: a space, both quotes, a backslash, an @ and a %.
PASSWORD = "s3cr et'\"\\@%x"
SPEC = BackfillSpec(name="fill_n", table="items", values={"n": "id * 2"})


@pytest.fixture(scope="module")
def password_server() -> Iterator[EmbeddedServer]:
    """A server of its own where every connection authenticates with SCRAM (the suite's server trusts all)."""
    server = EmbeddedServer.create(os.environ.get("BACKFILL_TEST_PG_BIN") or None, password="postgres-pw")
    try:
        server.start()
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE app LOGIN PASSWORD {}").format(sql.Literal(PASSWORD)))
            conn.execute("CREATE DATABASE appdb OWNER app")
        yield server
    finally:
        server.destroy()


@pytest.fixture
def app_db(password_server: EmbeddedServer) -> Iterator[dict[str, Any]]:
    """Connection parameters of role ``app`` (password required) on a fresh ``items`` table."""
    params = {"host": "127.0.0.1", "port": password_server.port, "user": "app", "dbname": "appdb"}
    with psycopg.connect(**params, password=PASSWORD, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS backfill_batches, backfill_slices, backfills, backfill_meta, items")
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer)")
        conn.execute("INSERT INTO items (id) SELECT generate_series(1, 500)")
    yield params


def _filled(params: dict[str, Any]) -> int:
    with psycopg.connect(**params, password=PASSWORD) as conn:
        row = conn.execute("SELECT count(*) FROM items WHERE n = id * 2").fetchone()
        return int(row[0]) if row else 0


def _url(params: dict[str, Any], driver: str, query: str = "", password: bool = True) -> str:
    secret = ":" + urllib.parse.quote(PASSWORD, safe="") if password else ""
    return f"postgresql+{driver}://app{secret}@{params['host']}:{params['port']}/appdb{query}"


def test_the_server_really_asks_for_the_password(app_db: dict[str, Any]) -> None:
    with pytest.raises(ConnectError, match="no password supplied|password authentication failed") as raised:
        Database.from_bind(_url(app_db, "psycopg", password=False)).connect()
    assert PASSWORD not in str(raised.value)


def test_engine_with_a_password_in_connect_args(app_db: dict[str, Any]) -> None:
    engine = sa.create_engine(_url(app_db, "psycopg", password=False), connect_args={"password": PASSWORD})
    report = backfill.run_backfill(engine, SPEC)
    assert "finished" == report.outcome.value
    assert 500 == _filled(app_db)


def test_alembic_style_connection_of_such_an_engine(app_db: dict[str, Any]) -> None:
    engine = sa.create_engine(_url(app_db, "psycopg", password=False), connect_args={"password": PASSWORD})
    with engine.connect() as connection:
        report = backfill.run_backfill(connection, SPEC)
    assert "finished" == report.outcome.value


def test_url_object_with_a_password_holding_a_space_and_quotes(app_db: dict[str, Any]) -> None:
    url = sa.URL.create("postgresql+psycopg", "app", PASSWORD, app_db["host"], app_db["port"], "appdb")
    assert "finished" == backfill.run_backfill(url, SPEC).outcome.value
    assert "finished" == backfill.run_backfill(url.set(drivername="postgresql"), SPEC).outcome.value


def test_engine_with_a_creator(app_db: dict[str, Any]) -> None:
    made: list[psycopg.Connection[Any]] = []

    def creator() -> psycopg.Connection[Any]:
        made.append(psycopg.connect(**app_db, password=PASSWORD))
        return made[-1]

    engine = sa.create_engine("postgresql+psycopg://", creator=creator)
    assert "finished" == backfill.run_backfill(engine, SPEC).outcome.value
    assert made, "the runner's connections come from the engine's creator"


def test_engine_with_a_do_connect_event_like_a_cloud_iam_token(app_db: dict[str, Any]) -> None:
    engine = sa.create_engine(_url(app_db, "psycopg", password=False))

    @event.listens_for(engine, "do_connect")
    def token(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        cparams["password"] = PASSWORD

    assert "finished" == backfill.run_backfill(engine, SPEC).outcome.value


def test_runner_connections_are_its_own_not_the_pools(app_db: dict[str, Any]) -> None:
    engine = sa.create_engine(_url(app_db, "psycopg"), pool_size=1, max_overflow=0)
    with engine.connect() as held:  # the application's only pooled connection stays in use throughout
        database = Database.from_bind(engine, "backfill-test")
        with database.connect() as conn:
            assert conn.autocommit
            row = conn.execute("SELECT current_setting('application_name'), current_setting('plan_cache_mode')")
            assert ("backfill-test", "force_custom_plan") == row.fetchone()
            assert held.exec_driver_sql("SELECT 1").scalar() == 1
    assert 0 == engine.pool.checkedout()  # type: ignore[attr-defined]


def test_asyncpg_url_with_driver_options(app_db: dict[str, Any]) -> None:
    url = _url(app_db, "asyncpg", "?ssl=disable&prepared_statement_cache_size=0")
    assert "finished" == backfill.run_backfill(url, SPEC).outcome.value
    with Database.from_bind(url).connect() as conn:
        assert conn.info.get_parameters().get("sslmode", "disable") == "disable"


def test_asyncpg_engine_as_alembic_async_env_hands_it(app_db: dict[str, Any]) -> None:
    engine = create_async_engine(_url(app_db, "asyncpg", "?prepared_statement_cache_size=0"))
    assert "finished" == backfill.run_backfill(engine.sync_engine, SPEC).outcome.value


def test_psycopg2_url_with_libpq_options(app_db: dict[str, Any]) -> None:
    with psycopg.connect(**app_db, password=PASSWORD, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS other")
    url = _url(app_db, "psycopg2", "?sslmode=disable&options=-csearch_path%3Dother")
    with Database.from_bind(url).connect() as conn:
        assert ("other",) == conn.execute("SHOW search_path").fetchone()


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("postgresql+asyncpg://app@h/db?ssl=sometimes", "ssl='sometimes'"),
        ("postgresql+psycopg2://app@h/db?frobnicate=1", "'frobnicate' has no libpq equivalent"),
        ("postgresql://app@h/db?frobnicate=1", "invalid URI query parameter 'frobnicate'"),
        ("sqlite:///x.db", "needs PostgreSQL"),
    ],
)
def test_what_cannot_be_translated_is_refused_in_one_line(bind: str, expected: str) -> None:
    with pytest.raises(ConnectError, match=expected) as raised:
        Database.from_bind(bind)
    assert 1 == len(str(raised.value).splitlines())


def test_an_asyncpg_engine_with_its_own_connect_code_is_refused(app_db: dict[str, Any]) -> None:
    engine = create_async_engine(_url(app_db, "asyncpg", password=False))

    @event.listens_for(engine.sync_engine, "do_connect")
    def token(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        cparams["password"] = PASSWORD

    with pytest.raises(ConnectError, match="do_connect event for the asyncpg driver"):
        Database.from_bind(engine.sync_engine)


# --- passwords never leave ------------------------------------------------------------------------------------

SECRET = "Sup3rSecret"
LEAKY_BINDS = [
    f"postgresql://app@127.0.0.1:1/db?password={SECRET}",
    f"postgresql://app:{SECRET}@127.0.0.1:1/db",
    f"postgresql+asyncpg://app:{SECRET}@127.0.0.1:1/db?ssl=disable",
    f"host=127.0.0.1 port=1 user=app password='{SECRET[:4]}\\'{SECRET[4:]}' dbname=db",
    f"host=127.0.0.1 port=1 password={SECRET} broken",
]


@pytest.mark.parametrize("bind", LEAKY_BINDS)
def test_no_password_in_connect_errors_or_reprs(bind: str) -> None:
    secret_parts = (SECRET, SECRET[:4], SECRET[4:])
    try:
        database = Database.from_bind(bind)
    except ConnectError as exc:
        assert not any(part in str(exc) for part in secret_parts), exc
        return
    assert not any(part in repr(database) + database.display for part in secret_parts)
    with pytest.raises(ConnectError, match=r"cannot connect to postgresql://app(:\*\*\*)?@127.0.0.1:1") as raised:
        database.connect()
    assert not any(part in str(raised.value) for part in secret_parts)


@pytest.fixture
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("_clean_env")
@pytest.mark.parametrize("bind", LEAKY_BINDS[:4])
@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_cli_cannot_connect_message_holds_no_password(bind: str, verbose: list[str]) -> None:
    result = CliRunner().invoke(cli, ["--url", bind, *verbose, "status"], catch_exceptions=False)
    assert EXIT_OK != result.exit_code
    assert "cannot connect to postgresql://app:***@127.0.0.1:1" in result.stderr
    for part in (SECRET, SECRET[:4], SECRET[4:]):
        assert part not in result.output + result.stderr


def _leak_free_url(params: dict[str, Any]) -> str:
    return f"postgresql://app@{params['host']}:{params['port']}/appdb?password={urllib.parse.quote(PASSWORD)}"


def _assert_no_password(text: str) -> None:
    for part in (PASSWORD, urllib.parse.quote(PASSWORD), urllib.parse.quote(PASSWORD, safe="")):
        assert part not in text


@pytest.mark.usefixtures("_clean_env")
@pytest.mark.parametrize("log_format", ["json", "console"])
@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_every_command_at_every_log_level_keeps_the_password(
    app_db: dict[str, Any], log_format: str, verbose: list[str]
) -> None:
    url = _leak_free_url(app_db)
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        result = runner.invoke(cli, ["--url", url, "--log-format", log_format, *verbose, *args])
        _assert_no_password(result.output + result.stderr + repr(result.exception))
        return result

    assert EXIT_OK == invoke("init").exit_code
    assert EXIT_OK == invoke("add", "fill_n", "--table", "items", "--set", "n=id * 2").exit_code
    for args in (["plan", "fill_n"], ["run", "fill_n"], ["status"], ["status", "--json"], ["pause", "fill_n"]):
        invoke(*args)
    warned = invoke("status")
    assert "Warning: a password in --url" in warned.stderr


@pytest.mark.usefixtures("_clean_env")
def test_no_warning_when_the_url_comes_from_the_environment(
    app_db: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", _leak_free_url(app_db))
    result = CliRunner().invoke(cli, ["init"])
    assert EXIT_OK == result.exit_code, result.output
    assert "Warning" not in result.stderr


def test_library_logs_at_debug_and_statuses_keep_the_password(app_db: dict[str, Any]) -> None:
    url = _leak_free_url(app_db)
    with structlog.testing.capture_logs() as logs:
        backfill.run_backfill(url, SPEC, max_batches=1)
        backfill.run_backfill(url, "fill_n")
    assert logs
    statuses = backfill.backfill_status(url)
    _assert_no_password(json.dumps(logs, default=repr) + repr(statuses) + repr([s.to_json() for s in statuses]))


def test_alembic_messages_name_the_database_without_its_password(app_db: dict[str, Any]) -> None:
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    import backfill.alembic  # noqa: F401 -- registers the ops
    from backfill.alembic import BackfillNotFinishedError

    engine = sa.create_engine(_url(app_db, "psycopg"), poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        op = Operations(MigrationContext.configure(connection))
        with pytest.raises(BackfillNotFinishedError) as unknown:
            op.ensure_backfill_finished("nope")
        backfill.register_backfill(engine, SPEC)
        with pytest.raises(BackfillNotFinishedError) as pending:
            op.ensure_backfill_finished("fill_n", finish=False)
    for raised in (unknown, pending):
        assert f"postgresql://app:***@127.0.0.1:{app_db['port']}/appdb" in str(raised.value)
        _assert_no_password(str(raised.value))
