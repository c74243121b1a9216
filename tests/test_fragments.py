"""Author SQL stays one expression: a fragment that would escape its parentheses is refused before anything is
written, and fragments that only look odd (parentheses in strings, comments, dollar quotes) run as written."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import backfill
from backfill import BackfillSpec, PlanError, RunOutcome
from backfill.fragments import fragment_problem


@pytest.fixture
def items(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute("CREATE TABLE items (id integer PRIMARY KEY, a text, n integer NOT NULL DEFAULT 0, label text)")
    conn.execute(
        "INSERT INTO items (id, a) SELECT g, CASE WHEN g <= 10 THEN NULL ELSE 'x' END FROM generate_series(1, 100) g"
    )
    return conn


ESCAPING_FILTERS = [
    ("a IS NULL) OR (true", "closes a parenthesis"),
    ("a IS NULL /* ", "comment (/*) is never closed"),
    ("a IS NULL /* /* */ ) OR (true", "comment (/*) is never closed"),
    ("a IS NULL; UPDATE items SET n = 99", "';' ends the statement"),
    ("a = 'x) OR (true", "quote (') is never closed"),
    ("a = E'x\\') OR (true", "quote (') is never closed"),
    ('a = "x) OR (true', 'quoted identifier (") is never closed'),
    ("a = $q$x) OR (true", "dollar quote ($q$) is never closed"),
    ("(a IS NULL", "'(' is never closed"),
    (")(", "closes a parenthesis"),
]

ESCAPING_VALUES = [
    ({"n": "n+1), id = (id+100000"}, "closes a parenthesis"),
    ({"n": "n+1), label = ('owned'"}, "closes a parenthesis"),
    ({"n": "n + 1; DROP TABLE items"}, "';' ends the statement"),
    ({"label": "'a' || $$b"}, "dollar quote ($$) is never closed"),
]


@pytest.mark.parametrize(("where", "problem"), ESCAPING_FILTERS, ids=lambda v: str(v)[:30])
def test_filters_that_escape_their_parentheses_are_refused_before_anything_is_written(
    items: psycopg.Connection[Any], db_url: str, where: str, problem: str
) -> None:
    spec = BackfillSpec("f", "items", {"n": "n + 1"}, where=where, batch_size=10)

    for attempt in (backfill.run_backfill, backfill.register_backfill, backfill.plan_backfill):
        with pytest.raises(PlanError) as caught:
            attempt(db_url, spec)
        message = str(caught.value)
        assert message.startswith("filter (where) on public.items is not valid: syntax error: ")
        assert problem in message
        assert "\n" not in message

    assert items.execute("SELECT to_regclass('public.backfills')").fetchone() == (None,)
    assert items.execute("SELECT sum(n), max(id) FROM items").fetchone() == (0, 100)


@pytest.mark.parametrize(("values", "problem"), ESCAPING_VALUES, ids=lambda v: str(v)[:30])
def test_expressions_that_escape_their_parentheses_are_refused_before_anything_is_written(
    items: psycopg.Connection[Any], db_url: str, values: dict[str, str], problem: str
) -> None:
    spec = BackfillSpec("v", "items", values, batch_size=10)

    with pytest.raises(PlanError) as caught:
        backfill.run_backfill(db_url, spec)

    column = next(iter(values))
    assert str(caught.value).startswith(f"expression for column {column!r} of public.items is not valid: syntax error")
    assert problem in str(caught.value)
    assert items.execute("SELECT to_regclass('public.backfills')").fetchone() == (None,)
    assert items.execute("SELECT sum(n), max(id), count(label) FROM items").fetchone() == (0, 100, 0)


def test_a_stored_spec_that_escapes_is_refused_when_run_by_name(items: psycopg.Connection[Any], db_url: str) -> None:
    # A spec written into the control table by an older release, or by hand, is checked again on every run.
    backfill.register_backfill(db_url, BackfillSpec("f", "items", {"n": "n + 1"}, where="a IS NULL", batch_size=10))
    items.execute(
        """UPDATE backfills SET spec = jsonb_set(spec, '{where}', '"a IS NULL) OR (true"') WHERE name = 'f'"""
    )

    with pytest.raises(PlanError, match="closes a parenthesis"):
        backfill.run_backfill(db_url, "f")

    assert items.execute("SELECT sum(n) FROM items").fetchone() == (0,)


WORKING = [
    # (values, where, rows updated): parentheses, quotes and comment markers inside literals, comments anywhere.
    ({"n": "n + 1 -- bump it"}, "a IS NULL -- only the empty ones", 10),
    ({"n": "n + length(')')"}, "a IS NULL /* ) OR (true */", 10),
    ({"n": "n + length($$)$$) + length($t$'$t$)"}, "a IS NULL OR a = ')'", 10),
    ({"n": "n + length(E'\\')')"}, "(a IS NULL) AND (id > 0)", 10),
    ({"n": 'n + ("id" > 0)::int'}, "a IS NULL /* nested /* ) */ still a comment ( */", 10),
    ({"n": "n + 1", "label": "'--' || ';' || '/*'"}, "a IS NULL\n-- a comment on the last line", 10),
    ({"n": "n + 1"}, "a IS NULL OR a = 'it''s )'", 10),
]


@pytest.mark.parametrize(("values", "where", "rows"), WORKING, ids=lambda v: str(v)[:30])
def test_fragments_that_only_look_odd_run_as_written(
    items: psycopg.Connection[Any], db_url: str, values: dict[str, str], where: str, rows: int
) -> None:
    report = backfill.run_backfill(db_url, BackfillSpec("ok", "items", values, where=where, batch_size=7))

    assert report.outcome is RunOutcome.FINISHED
    assert report.rows_updated == rows
    assert items.execute("SELECT count(*) FROM items WHERE n > 0").fetchone() == (rows,)
    assert items.execute("SELECT count(*) FROM items WHERE n > 0 AND id > 10").fetchone() == (0,)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a) OR (b", "closes a parenthesis"),
        ("x$a$ ) $a$", "closes a parenthesis"),  # x$a$ is one identifier, not a dollar quote
        ("$1) OR ($2", "closes a parenthesis"),  # $1 is a parameter, not a dollar quote
        ("e'\\') OR (true'", None),  # one E'' string holding ') OR (true
        ("e'\\'') OR (true", "closes a parenthesis"),  # E'\'' is a quote; the ) after it is outside
        ("xe'\\') OR (true", "closes a parenthesis"),  # xe is an identifier: a plain string '\' then ) ...
        ("'a' ; ", "';' ends the statement"),
        ("a --x\n) OR (true", "closes a parenthesis"),
        ("a --x\r) OR (true", "closes a parenthesis"),
        ('"a "" ) " = 1', None),
        ("/* */ 1", None),
    ],
)
def test_the_scanner_reads_fragments_as_postgresql_does(text: str, problem: str | None) -> None:
    found = fragment_problem(text)
    assert (found is None) == (problem is None), found
    if problem is not None:
        assert found is not None and problem in found
