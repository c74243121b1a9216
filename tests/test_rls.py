"""Rows the runner cannot see: row-level security that would hide rows from the runner's role is refused before
anything is written, naming the cause; security enabled under a running backfill fails it loudly."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url
from support import at_poll

import backfill
from backfill import BackfillSpec, PlanError, RunOutcome, RunState


@pytest.fixture
def role(conn: psycopg.Connection[Any], db_url: str) -> Iterator[tuple[str, str]]:
    """A plain login role (no superuser, no BYPASSRLS) with its own control schema, and a URL for it."""
    name = f"r_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE ROLE {name} LOGIN")
    conn.execute(f"GRANT CREATE ON DATABASE {conn.info.dbname} TO {name}")
    conn.execute(f"CREATE SCHEMA ctl AUTHORIZATION {name}")
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO items (id) SELECT generate_series(1, 1001)")
    conn.execute(f"GRANT SELECT, UPDATE ON items TO {name}")
    conn.execute("CREATE POLICY even_only ON items USING (id % 2 = 0)")
    try:
        yield name, make_url(db_url).set(username=name, password=None).render_as_string(hide_password=False)
    finally:
        conn.execute(f"DROP OWNED BY {name}")
        conn.execute(f"DROP ROLE {name}")


SPEC = BackfillSpec("inc", "items", {"n": "n + 1"}, batch_size=100)


def _untouched(conn: psycopg.Connection[Any]) -> bool:
    control = conn.execute("SELECT to_regclass('ctl.backfills')").fetchone()
    return control == (None,) and conn.execute("SELECT sum(n) FROM items").fetchone() == (0,)


def test_row_level_security_hiding_rows_from_the_role_is_refused(
    conn: psycopg.Connection[Any], role: tuple[str, str]
) -> None:
    name, url = role
    conn.execute("ALTER TABLE items ENABLE ROW LEVEL SECURITY")

    with pytest.raises(PlanError) as caught:
        backfill.run_backfill(url, SPEC, control_schema="ctl")

    assert str(caught.value) == (
        f"row-level security on public.items would hide rows from role {name} (the role is not its owner): "
        "run the backfill as a role with BYPASSRLS or as the table's owner"
    )
    assert _untouched(conn)


def test_forced_row_level_security_is_refused_even_for_the_owner(
    conn: psycopg.Connection[Any], role: tuple[str, str]
) -> None:
    name, url = role
    conn.execute(f"ALTER TABLE items OWNER TO {name}")
    conn.execute("ALTER TABLE items ENABLE ROW LEVEL SECURITY")
    conn.execute("ALTER TABLE items FORCE ROW LEVEL SECURITY")

    with pytest.raises(PlanError, match="FORCE ROW LEVEL SECURITY applies it even to the owner"):
        backfill.register_backfill(url, SPEC, control_schema="ctl")

    assert _untouched(conn)


@pytest.mark.parametrize("how", ["owner", "bypassrls"])
def test_roles_that_see_every_row_update_every_row_once(
    conn: psycopg.Connection[Any], role: tuple[str, str], how: str
) -> None:
    name, url = role
    conn.execute("ALTER TABLE items ENABLE ROW LEVEL SECURITY")
    if how == "owner":
        conn.execute(f"ALTER TABLE items OWNER TO {name}")
    else:
        conn.execute(f"ALTER ROLE {name} BYPASSRLS")
        conn.execute("ALTER TABLE items FORCE ROW LEVEL SECURITY")

    report = backfill.run_backfill(url, SPEC, control_schema="ctl")

    assert report.outcome is RunOutcome.FINISHED
    assert dict(conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall()) == {1: 1001}


def test_row_level_security_enabled_during_the_run_fails_it_instead_of_skipping_rows(
    conn: psycopg.Connection[Any], role: tuple[str, str]
) -> None:
    _, url = role
    # After two batches, the policy starts to apply under a runner that planned without it.
    enable = at_poll(3, lambda: conn.execute("ALTER TABLE items ENABLE ROW LEVEL SECURITY"))

    report = backfill.run_backfill(url, SPEC, control_schema="ctl", should_stop=enable)

    assert (report.outcome, report.state, report.batches) == (RunOutcome.FAILED, RunState.FAILED, 2)
    assert report.error is not None and "row-level security" in report.error
    assert conn.execute("SELECT count(*) FROM items WHERE n = 1").fetchone() == (200,)
    with pytest.raises(PlanError, match="row-level security on public.items would hide rows"):
        backfill.retry_backfill(url, "inc", control_schema="ctl")
