"""Where the database is: turn what a user hands us (URL string, SQLAlchemy URL/Engine/Connection) into psycopg
connections of our own, each with the session settings a runner needs. Passwords never leave this module in text."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Union

import psycopg
import sqlalchemy
from sqlalchemy.engine import make_url

from backfill.errors import ConnectError

__all__ = ["Bind", "Database"]

#: Anything that says which database to use.
Bind = Union[str, sqlalchemy.URL, sqlalchemy.Engine, sqlalchemy.Connection, "Database"]

_PASSWORD_KV = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)

#: Session settings of every runner connection. Custom plans each time: a prepared batch statement with a generic
#: plan can lose the index range scan. Keepalives let the server notice a runner whose machine vanished, so its
#: advisory lock (the "one runner per backfill" guard) is released within a minute instead of hours.
_SESSION_SETTINGS = (
    "SET plan_cache_mode = force_custom_plan; SET tcp_keepalives_idle = 30; "
    "SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3"
)


@dataclass(frozen=True)
class Database:
    """Connection parameters, and a display form with the password masked."""

    conninfo: str
    display: str
    application_name: str = "backfill"

    @classmethod
    def from_bind(cls, bind: Bind, application_name: str = "backfill") -> Database:
        """Accept a URL string (SQLAlchemy form or ``postgresql://``), a ``sqlalchemy.URL``, an ``Engine`` or a
        ``Connection``. Only the URL is taken from an engine: ``connect_args`` and ``creator`` are not seen.

        Raises:
            ConnectError: the URL is malformed or not a PostgreSQL URL.
        """
        if isinstance(bind, Database):
            return bind
        if isinstance(bind, sqlalchemy.Connection):
            bind = bind.engine
        if isinstance(bind, sqlalchemy.Engine):
            bind = bind.url
        if isinstance(bind, str) and "://" not in bind:
            # A libpq key=value string.
            return cls(bind, _PASSWORD_KV.sub(r"\1***", bind), application_name)
        try:
            url = make_url(bind)
        except Exception:  # ArgumentError or ValueError; their text repeats the URL, password included
            raise ConnectError("not a valid database URL (expected e.g. postgresql://user@host:5432/dbname)") from None
        if url.get_backend_name() not in ("postgresql", "postgres"):
            raise ConnectError(f"backfill needs PostgreSQL, got a {url.get_backend_name()} URL")
        url = url.set(drivername="postgresql")
        return cls(
            url.render_as_string(hide_password=False), url.render_as_string(hide_password=True), application_name
        )

    def with_application_name(self, name: str) -> Database:
        return Database(self.conninfo, self.display, name)

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """A new autocommit connection with the runner's session settings.

        Raises:
            ConnectError: the server cannot be reached or refuses us.
        """
        try:
            conn = psycopg.connect(
                self.conninfo,
                autocommit=True,
                application_name=self.application_name,
                connect_timeout=10,
                **kwargs,
            )
        except psycopg.Error as exc:
            reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
            raise ConnectError(f"cannot connect to {self.display}: {reason}") from None
        conn.execute(_SESSION_SETTINGS)
        return conn
