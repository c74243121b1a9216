"""The offline script pins the session settings a runner pins: a psql session whose database rounds float output
(``extra_float_digits = 0``) still walks float keys exactly once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from test_offline import offline, psql, statements


def test_the_offline_script_walks_close_float_keys_once_under_a_database_that_rounds_them(
    conn: psycopg.Connection[Any], db_url: str, tmp_path: Path
) -> None:
    # Keys 3e-16 apart print alike with 15 digits: without the pin, a batch's end key read back from its text would
    # land between keys, and the rows in between would be skipped or updated twice.
    conn.execute("CREATE TABLE items (k float8 PRIMARY KEY, n integer NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO items (k) SELECT DISTINCT 1 + g * 3e-16::float8 FROM generate_series(1, 2001) g")
    total = conn.execute("SELECT count(*) FROM items").fetchone()
    database = conn.execute("SELECT current_database()").fetchone()
    assert total is not None and database is not None
    conn.execute(sql.SQL("ALTER DATABASE {} SET extra_float_digits = 0").format(sql.Identifier(database[0])))
    op, buffer = offline()
    op.backfill("inc", "items", {"n": "n + 1"}, batch_size=50)
    script = tmp_path / "backfill.sql"
    script.write_text(";\n\n".join(statements(buffer)) + ";\n")

    result = psql(db_url, script)

    assert result.returncode == 0, result.stderr
    assert conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall() == [(1, total[0])]
