"""Where the database is: turn what a user hands us (a URL or conninfo string, a SQLAlchemy URL, Engine or
Connection) into psycopg 3 connections of our own, each with the session settings a runner needs. Passwords never
leave this module in text: not in messages, not in reprs.

What is taken from where:

- A ``postgresql+psycopg`` Engine or Connection: connections come from the engine's own machinery (a fresh pool
  made by ``Pool.recreate()``, detached at once), so its ``connect_args``, ``creator`` and events (``do_connect``,
  ``connect``) apply exactly as for the application; the connection is then the runner's own, never a pooled one.
- Any other driver's Engine or Connection (asyncpg, psycopg2, ...): only its URL, translated to libpq keywords
  (asyncpg's ``ssl=`` becomes ``sslmode=``; its statement-cache and client-timeout options are driver-side and
  dropped). An engine whose connections come from a ``creator`` or a ``do_connect`` event is refused: backfill
  cannot call them for another driver.
- A ``postgresql://`` URI or a ``key=value`` string: parsed by libpq (psycopg's own parser), so every libpq keyword
  and environment variable (``PGPASSWORD``, ``~/.pgpass``, ...) works as it does for ``psql``.
- A ``postgresql+driver://`` URL (string or ``sqlalchemy.URL``): its parts and query, translated as for engines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Union

import psycopg
import sqlalchemy
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy.engine import make_url

from backfill.errors import ConnectError
from backfill.pg.session import pin_session

__all__ = ["Bind", "Database"]

#: Anything that says which database to use.
Bind = Union[str, sqlalchemy.URL, sqlalchemy.Engine, sqlalchemy.Connection, "Database"]

#: Session settings of every runner connection. Custom plans each time: a prepared batch statement with a generic
#: plan can lose the index range scan. Keepalives let the server notice a runner whose machine vanished, so its
#: claims (the "one runner per slice" guard) are released within a minute instead of hours.
_SESSION_SETTINGS = (
    "SET plan_cache_mode = force_custom_plan; SET tcp_keepalives_idle = 30; "
    "SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3"
)

#: asyncpg's ``ssl=`` values and the libpq ``sslmode`` each means.
_ASYNCPG_SSL = {
    "disable": "disable",
    "allow": "allow",
    "prefer": "prefer",
    "require": "require",
    "verify-ca": "verify-ca",
    "verify-full": "verify-full",
    "true": "require",
    "false": "disable",
}
#: asyncpg options with the same meaning under another libpq name.
_ASYNCPG_RENAMED = {"database": "dbname", "timeout": "connect_timeout"}
#: Driver-side options with no libpq meaning: client statement caches and client-side timeouts (backfill sets its
#: own ``statement_timeout`` per batch). Dropped.
_DRIVER_ONLY = frozenset(
    {
        "prepared_statement_cache_size",
        "statement_cache_size",
        "max_cached_statement_lifetime",
        "max_cacheable_statement_size",
        "command_timeout",
    }
)


def _display(params: Mapping[str, Any]) -> str:
    # Built from an allow-list of parts, never by masking: whatever else the input carried cannot show.
    # "***" says a password was given, without a single character of it.
    secret = ":***" if params.get("password") else ""
    user = f"{params.get('user') or ''}{secret}@" if params.get("user") or secret else ""
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    port = f":{params['port']}" if params.get("port") else ""
    dbname = f"/{params['dbname']}" if params.get("dbname") else ""
    return f"postgresql://{user}{host}{port}{dbname}"


def _parse_libpq(text: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(text)
    except psycopg.ProgrammingError as exc:
        # libpq's parse errors quote pieces of the string (which may be the password); only an unknown option's
        # name is repeated, and only from the part of the message that names it.
        message = str(exc)
        for marker in ("invalid connection option", "invalid URI query parameter"):
            if marker in message:
                name = message.split(marker, 1)[1].strip(' :"\n').split('"')[0]
                raise ConnectError(f"not a valid connection string: {marker} {name!r}") from None
        raise ConnectError(
            "not a valid connection string (expected postgresql://user@host:5432/dbname or key=value pairs; a "
            "value with spaces or quotes needs single quotes, and a quote inside one a backslash)"
        ) from None


def _translate_url(url: sqlalchemy.URL) -> dict[str, Any]:
    """libpq keywords for a SQLAlchemy URL of any PostgreSQL driver; one-line refusal for what has none."""
    query: dict[str, Any] = {}
    for key, value in url.query.items():
        if key in _DRIVER_ONLY:
            continue
        if key == "ssl":
            mode = _ASYNCPG_SSL.get(str(value).lower())
            if mode is None:
                raise ConnectError(f"the URL's ssl={value!r} has no libpq sslmode equivalent")
            query["sslmode"] = mode
            continue
        query[_ASYNCPG_RENAMED.get(key, key)] = value
    # The psycopg dialect's own reading of a URL (multi-host query strings included), on the translated query.
    psycopg_url = url.set(drivername="postgresql+psycopg", query=query)
    try:
        _, params = psycopg_url.get_dialect()().create_connect_args(psycopg_url)
    except Exception:  # ArgumentError for a malformed multi-host URL; its text may repeat the URL
        raise ConnectError("the URL's host list cannot be read (expected ?host=h1:5432&host=h2:5432)") from None
    params = {key: value for key, value in params.items() if value is not None}
    try:
        make_conninfo("", **params)
    except psycopg.ProgrammingError:
        unknown = sorted(key for key in params if not _is_libpq_keyword(key))
        raise ConnectError(
            f"the URL's option {unknown[0] if unknown else '?'!r} has no libpq equivalent "
            "(backfill connects with psycopg 3): remove it from the URL backfill gets"
        ) from None
    return params


def _is_libpq_keyword(key: str) -> bool:
    try:
        make_conninfo("", **{key: "x"})
    except psycopg.ProgrammingError:
        return False
    return True


def _uses_own_connect(engine: sqlalchemy.Engine) -> bool:
    """Whether the engine makes its connections with a ``creator`` or a ``do_connect`` event."""
    if engine.dialect.dispatch.do_connect:
        return True
    # create_engine's own connect function, unless the caller gave a creator; private, so read defensively.
    creator = getattr(engine.pool, "_creator", None)
    return creator is not None and getattr(creator, "__qualname__", "") != "create_engine.<locals>.connect"


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)  # a SQLAlchemy DBAPIError wraps the driver's error
    if isinstance(orig, BaseException):
        exc = orig
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


@dataclass(frozen=True)
class Database:
    """Where to connect, with a display form that carries no secret. The connection parameters and the engine
    are kept out of ``repr``: error trackers that record locals must not capture a password."""

    display: str
    application_name: str = "backfill"
    _params: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _engine: sqlalchemy.Engine | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_bind(cls, bind: Bind, application_name: str | None = None) -> Database:
        """Accept a URL string (SQLAlchemy form or ``postgresql://``), a libpq ``key=value`` string, a
        ``sqlalchemy.URL``, an ``Engine`` or a ``Connection`` (see the module docstring for what is taken from
        each). ``application_name`` (default ``backfill``) replaces a given
        :class:`Database`'s only when given.

        Raises:
            ConnectError: the URL is malformed, not a PostgreSQL URL, carries an option libpq has no equivalent
                for, or the engine's connections come from code backfill cannot call for its driver.
        """
        if isinstance(bind, Database):
            return bind if application_name is None else replace(bind, application_name=application_name)
        application_name = application_name or "backfill"
        if isinstance(bind, sqlalchemy.Connection):
            bind = bind.engine
        if isinstance(bind, sqlalchemy.Engine):
            return cls._from_engine(bind, application_name)
        if isinstance(bind, str) and not bind.lower().startswith(("postgresql+", "postgres+")):
            if "://" in bind and not bind.lower().startswith(("postgresql://", "postgres://")):
                scheme = bind.split("://", 1)[0]
                raise ConnectError(f"backfill needs PostgreSQL, got a {scheme.split('+')[0]} URL")
            params = _parse_libpq(bind)
            return cls(_display(params), application_name, params)
        try:
            url = make_url(bind)
        except Exception:  # ArgumentError or ValueError; their text repeats the URL, password included
            raise ConnectError("not a valid database URL (expected e.g. postgresql://user@host:5432/dbname)") from None
        if url.get_backend_name() not in ("postgresql", "postgres"):
            raise ConnectError(f"backfill needs PostgreSQL, got a {url.get_backend_name()} URL")
        params = _translate_url(url)
        return cls(_display(params), application_name, params)

    @classmethod
    def _from_engine(cls, engine: sqlalchemy.Engine, application_name: str) -> Database:
        if engine.dialect.name != "postgresql":
            raise ConnectError(f"backfill needs PostgreSQL, got a {engine.dialect.name} engine")
        driver = engine.dialect.driver
        if driver == "psycopg" and not engine.dialect.is_async:
            params = engine.url.translate_connect_args(username="user", database="dbname")
            return cls(_display(params), application_name, params, engine)
        if _uses_own_connect(engine):
            raise ConnectError(
                f"the engine makes its connections with a creator or a do_connect event for the {driver} driver, "
                "which backfill cannot use (it needs psycopg 3): give backfill a postgresql+psycopg engine made "
                "the same way, or a URL"
            )
        params = _translate_url(engine.url)
        return cls(_display(params), application_name, params)

    @property
    def has_password(self) -> bool:
        """Whether a password is part of what was given (in the URL, the string or the engine's URL)."""
        if self._engine is not None:
            return self._engine.url.password is not None
        return bool(self._params.get("password"))

    @property
    def conninfo(self) -> str:
        """The libpq connection string, password included: for code that opens its own plain connections (the
        demo's simulated application). Never print it."""
        return make_conninfo("", **self._params)

    def _secret_free(self, text: str) -> str:
        password = self._params.get("password")
        if self._engine is not None:
            password = self._engine.url.password
        return text.replace(str(password), "***") if password else text

    def _open(self, **kwargs: Any) -> psycopg.Connection[Any]:
        if self._engine is None:
            return psycopg.connect(
                make_conninfo("", **self._params),
                autocommit=True,
                application_name=self.application_name,
                connect_timeout=self._params.get("connect_timeout", 10),
                **kwargs,
            )
        # A pool of our own with the engine's creator and events, so the application's pool is never touched and
        # the connection, once detached, is ours alone.
        pool = self._engine.pool.recreate()
        try:
            fairy = pool.connect()
            fairy.detach()
            conn = fairy.dbapi_connection
        finally:
            pool.dispose()
        if not isinstance(conn, psycopg.Connection):
            raise ConnectError(f"the engine gave a {type(conn).__name__} connection, not a psycopg 3 one")
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.commit()  # a connect event ran statements (SET search_path, ...): keep what they set
        conn.autocommit = True
        conn.execute("SELECT set_config('application_name', %s, false)", (self.application_name,))
        return conn

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """A new autocommit connection with the runner's session settings.

        Raises:
            ConnectError: the server cannot be reached or refuses us.
        """
        try:
            conn = self._open(**kwargs)
        except ConnectError:
            raise
        except Exception as exc:  # psycopg.Error, or whatever an engine's creator or event raised
            reason = self._secret_free(_reason(exc))
            raise ConnectError(f"cannot connect to {self.display}: {reason}") from None
        conn.execute(_SESSION_SETTINGS)
        pin_session(conn)
        return conn
