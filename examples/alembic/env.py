"""Alembic environment of the example project.

The database URL comes from ``-x url=...`` or the DATABASE_URL environment variable. backfill's ``op.`` helpers are
registered by Alembic's plugin entry point (Alembic >= 1.18); with an older Alembic, add ``import backfill.alembic``
here.
"""

from __future__ import annotations

import logging.config
import os

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import make_url

config = context.config
if config.config_file_name and not config.attributes.get("skip_logging_config"):
    logging.config.fileConfig(config.config_file_name)


def database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("no database: pass -x url=postgresql://... or set DATABASE_URL")
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, which backfill depends on
    return parsed.render_as_string(hide_password=False)


def run_migrations_offline() -> None:
    # Offline, backfill's ops render SQL: DDL with its SET lock_timeout, a backfill as a batched DO block.
    context.configure(url=database_url(), literal_binds=True, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        # One transaction per revision: op.backfill and the NOT NULL ops commit the revision's work before they
        # start, so each revision should be small and safe to re-run from where it stopped.
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
