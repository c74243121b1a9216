"""Reversible backfills: each batch keeps what it overwrote in an undo log (in the batch's own statement), and
``revert_backfill`` puts it back exactly, batch by batch, leaving alone (and counting) the rows the application
changed since the backfill wrote them."""

from __future__ import annotations

import os
import pathlib
import random
import threading
from typing import Any

import psycopg
import psycopg.sql
import pytest
from alembic import command
from click.testing import CliRunner, Result
from structlog.testing import capture_logs
from support import kill_runners_at_random_instants, run_until, wait_for
from test_alembic_ops import alembic_config, make_project

import backfill
from backfill import BackfillSpec, NotReversibleError, RunOutcome, StateTransitionError
from backfill.alembic import BackfillOp, DropBackfillOp, MigrationContextError, RevertBackfillOp
from backfill.cli import cli
from backfill.pg.catalog import resolve
from backfill.pg.statements import ControlTables, for_target

#: Old values of every kind a revert must put back exactly: NULLs, quotes, json text as written (spacing, key
#: order, duplicate keys), jsonb, arrays with NULLs and quotes, numerics with trailing zeros, timestamps.
ROWS = """
INSERT INTO docs (tenant, id, label, doc, docb, tags, amount, seen) VALUES
  ('a', 0.1, NULL, NULL, NULL, NULL, NULL, NULL),
  ('a', 1e-300, 'it''s "quoted" \\ back', '{"b": 1,  "a": [1, 2], "a": 3}', '{"x": {"y": null}}',
   ARRAY['x''y', NULL, '"z"'], 1.500, '2024-02-29 23:59:59.999999+00'),
  ('b', -0.3333333333333333, '', '[]', '[]', '{}', -0.0, 'infinity'),
  ('it''s', 1.7976931348623157e308, E'tab\\there\\nnewline', '"str"', '"str"', ARRAY[''], 0, '-infinity')
"""

VALUES = {
    "label": "'new ' || tenant",
    "doc": "json_build_object('id', id)",
    "docb": "jsonb_build_object('id', id)",
    "tags": "ARRAY[tenant]",
    "amount": "42.42",
    "seen": "'2000-01-01 00:00:00+00'::timestamptz",
}


@pytest.fixture
def docs(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute(
        "CREATE TABLE docs (tenant text, id double precision, label text, doc json, docb jsonb, tags text[], "
        "amount numeric(12, 4), seen timestamptz, PRIMARY KEY (tenant, id))"
    )
    conn.execute(ROWS)
    conn.execute(
        "INSERT INTO docs (tenant, id, label, amount) SELECT 't' || (g % 7), g / 3.0, 'row ' || g, g FROM "
        "generate_series(1, 1500) g"
    )
    return conn


def snapshot(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """Every row in its exact text form (json keeps its text; floats all their digits)."""
    return conn.execute(
        "SELECT tenant, id::text, label, doc::text, docb::text, tags::text, amount::text, seen::text FROM docs "
        "ORDER BY tenant, id"
    ).fetchall()


def test_a_revert_restores_every_row_to_its_exact_old_value(docs: psycopg.Connection[Any], db_url: str) -> None:
    before = snapshot(docs)
    run = backfill.run_backfill(db_url, BackfillSpec("fill", "docs", VALUES, batch_size=100, reversible=True))
    assert (run.outcome, run.rows_updated) == (RunOutcome.FINISHED, 1504)
    assert snapshot(docs) != before
    status = backfill.backfill_status(db_url, "fill")[0]
    assert status.undo_bytes is not None and status.undo_bytes > 0
    assert status.to_json()["undo_bytes"] == status.undo_bytes

    report = backfill.revert_backfill(db_url, "fill", settings=backfill.RunSettings(batch_size=70))

    assert (report.run.outcome, report.run.rows_updated, report.rows_kept) == (RunOutcome.FINISHED, 1504, 0)
    assert report.run.batches > 20
    assert snapshot(docs) == before
    assert backfill.get_backfill(db_url, "fill:revert").state is backfill.RunState.SUCCEEDED


def test_rows_the_application_changed_after_the_backfill_are_kept_and_counted(
    docs: psycopg.Connection[Any], db_url: str
) -> None:
    before = dict((row[:2], row) for row in snapshot(docs))
    backfill.run_backfill(db_url, BackfillSpec("fill", "docs", VALUES, batch_size=100, reversible=True))
    docs.execute("UPDATE docs SET label = 'by the app' WHERE tenant = 't3' AND id < 100")  # after the backfill
    docs.execute("UPDATE docs SET docb = '{\"app\": 1}' WHERE tenant = 'a'")
    docs.execute("DELETE FROM docs WHERE tenant = 'b'")
    changed = docs.execute("SELECT count(*) FROM docs WHERE label = 'by the app' OR docb = '{\"app\": 1}'").fetchone()
    assert changed is not None and changed[0] > 10

    report = backfill.revert_backfill(db_url, "fill", settings=backfill.RunSettings(batch_size=90))

    assert report.rows_kept == changed[0] + 1  # and the deleted row
    after = dict((row[:2], row) for row in snapshot(docs))
    kept = {k for k, row in after.items() if row[2] == "by the app" or row[4] == '{"app": 1}'}
    assert len(kept) == changed[0]
    for k, row in after.items():
        if k in kept:
            assert row[2] in ("by the app", f"new {k[0]}")  # left as the application wrote it
        else:
            assert row == before[k]
    assert report.run.rows_updated == len(after) - len(kept)


def test_a_revert_resumes_from_its_checkpoint(docs: psycopg.Connection[Any], db_url: str) -> None:
    before = snapshot(docs)
    backfill.run_backfill(db_url, BackfillSpec("fill", "docs", VALUES, batch_size=100, reversible=True))
    settings = backfill.RunSettings(batch_size=100)

    first = backfill.revert_backfill(db_url, "fill", max_batches=4, settings=settings)
    assert (first.run.outcome, first.run.rows_updated, first.rows_kept) == (RunOutcome.WORK_LEFT, 400, None)
    second = backfill.revert_backfill(db_url, "fill", settings=settings)

    assert (second.run.outcome, second.run.rows_updated, second.rows_kept) == (RunOutcome.FINISHED, 1104, 0)
    assert snapshot(docs) == before


def test_a_backfill_that_is_not_reversible_cannot_be_reverted(docs: psycopg.Connection[Any], db_url: str) -> None:
    backfill.run_backfill(db_url, BackfillSpec("fill", "docs", VALUES))
    with pytest.raises(NotReversibleError, match="'fill' is not reversible"):
        backfill.revert_backfill(db_url, "fill")
    assert not docs.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'backfill_undo%'").fetchone()[0]


def test_purge_drops_the_undo_log_once_nothing_will_use_it(docs: psycopg.Connection[Any], db_url: str) -> None:
    spec = BackfillSpec("fill", "docs", VALUES, batch_size=100, reversible=True)
    assert backfill.run_backfill(db_url, spec, max_batches=2).outcome is RunOutcome.WORK_LEFT
    with pytest.raises(StateTransitionError, match="'fill' is running"):
        backfill.purge_backfill(db_url, "fill")
    backfill.run_backfill(db_url, "fill")

    size = backfill.purge_backfill(db_url, "fill")

    assert size > 0
    assert backfill.backfill_status(db_url, "fill")[0].undo_bytes is None
    with pytest.raises(NotReversibleError, match="purged"):
        backfill.revert_backfill(db_url, "fill")
    with pytest.raises(NotReversibleError, match="purged"):
        backfill.purge_backfill(db_url, "fill")


# --- through Alembic -----------------------------------------------------------------------------------------------

REVERSIBLE_REVISION = (
    """
    op.execute("ALTER TABLE docs ADD COLUMN shout text")
    op.backfill("shout", "docs", {"shout": "upper(label)", "label": "label || '!'"}, reversible=True,
                settings=backfill.RunSettings(batch_size=200))
    """,
    """
    op.revert_backfill("shout")
    op.execute("ALTER TABLE docs DROP COLUMN shout")
    """,
)


def test_alembic_upgrade_downgrade_upgrade_again(
    docs: psycopg.Connection[Any], db_url: str, tmp_path: pathlib.Path
) -> None:
    project = make_project(tmp_path, "pass", REVERSIBLE_REVISION)
    config = alembic_config(db_url, project)
    before = snapshot(docs)
    command.upgrade(config, "head")
    assert docs.execute("SELECT count(*) FROM docs WHERE label LIKE '%!'").fetchone() == (1503,)
    docs.execute("UPDATE docs SET label = 'app' WHERE tenant = 't1'")  # written by the application since

    with capture_logs() as logs:
        command.downgrade(config, "0001")

    app = {row[:2] for row in before if row[0] == "t1"}
    assert [row for row in snapshot(docs) if row[:2] not in app] == [row for row in before if row[:2] not in app]
    assert [event["rows_kept"] for event in logs if event["event"] == "revert_finished"] == [len(app)]
    assert docs.execute("SELECT count(*) FROM backfills").fetchone() == (0,)
    assert docs.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'backfill_undo%'").fetchone() == (0,)

    command.upgrade(config, "head")
    assert backfill.get_backfill(db_url, "shout").rows_updated == 1503  # one label is NULL: unchanged
    assert docs.execute("SELECT count(*) FROM docs WHERE shout IS NOT NULL").fetchone() == (1503,)


def test_the_reverse_of_a_reversible_backfill_op_reverts_it() -> None:
    plain = BackfillOp("fill", "docs", VALUES)
    reversible = BackfillOp("fill", "docs", VALUES, reversible=True, control_schema="ops")
    assert isinstance(plain.reverse(), DropBackfillOp)
    reverse = reversible.reverse()
    assert isinstance(reverse, RevertBackfillOp) and (reverse.name, reverse.control_schema) == ("fill", "ops")


def test_offline_a_reversible_backfill_is_refused(
    docs: psycopg.Connection[Any], db_url: str, tmp_path: pathlib.Path
) -> None:
    project = make_project(tmp_path, "pass", REVERSIBLE_REVISION)
    with pytest.raises(MigrationContextError, match="cannot run offline"):
        command.upgrade(alembic_config(db_url, project), "head", sql=True)


# --- exactly once under SIGKILL, and under concurrent writes ---------------------------------------------------------


def test_sigkill_at_random_instants_during_the_run_and_the_revert_each_row_exactly_once(db_url: str) -> None:
    rows, kills_wanted = 5_000, 6
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0, note text)")
        conn.execute(
            "INSERT INTO items (id, note) SELECT g, CASE WHEN g %% 3 = 0 THEN $$x'$$ || g END "
            "FROM generate_series(1, %s) g",
            (rows,),
        )
        # Every UPDATE of a row, by the run or the revert, leaves a mark: exactly once is one mark per row and pass.
        conn.execute("CREATE TABLE marks (id integer, n integer)")
        conn.execute(
            "CREATE FUNCTION mark() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN INSERT INTO marks VALUES (NEW.id, NEW.n); RETURN NEW; END $$"
        )
        conn.execute("CREATE TRIGGER mark AFTER UPDATE ON items FOR EACH ROW EXECUTE FUNCTION mark()")
        before = conn.execute("SELECT id, n, note FROM items ORDER BY id").fetchall()
    seed = int(os.environ.get("BACKFILL_FAULT_SEED", random.randrange(1_000_000)))
    rng = random.Random(seed)
    spec = BackfillSpec("inc", "items", {"n": "n + 1", "note": "'new'"}, batch_size=50, reversible=True)

    run_kills = kill_runners_at_random_instants(
        db_url, spec, rows=rows, rng=rng, kills=kills_wanted, rounds=kills_wanted * 2, max_delay=0.03
    )
    assert run_until(db_url, "inc").outcome is RunOutcome.FINISHED, f"seed {seed}"
    first = backfill.revert_backfill(db_url, "inc", max_batches=1, settings=backfill.RunSettings(batch_size=50))
    assert first.run.rows_updated == 50
    revert = backfill.BackfillSpec.from_dict(backfill.get_backfill(db_url, "inc:revert").spec.to_dict())
    revert_kills = kill_runners_at_random_instants(
        db_url, revert, rows=2 * rows, rng=rng, kills=kills_wanted, rounds=kills_wanted * 2, max_delay=0.03
    )
    final = run_until(db_url, "inc:revert", done=lambda report: report.outcome is RunOutcome.FINISHED)

    assert (run_kills, revert_kills) == (kills_wanted, kills_wanted), f"seed {seed}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT id, n, note FROM items ORDER BY id").fetchall() == before, f"seed {seed}"
        marks = conn.execute("SELECT n, count(*), count(DISTINCT id) FROM marks GROUP BY n ORDER BY n").fetchall()
        assert marks == [(0, rows, rows), (1, rows, rows)], f"seed {seed}"
        assert conn.execute("SELECT count(*) FROM backfill_undo_1 WHERE kept").fetchone() == (0,)
    assert final.state is backfill.RunState.SUCCEEDED
    assert backfill.get_backfill(db_url, "inc:revert").rows_updated == rows


def test_the_undo_log_holds_the_value_each_row_had_when_the_batch_overwrote_it(db_url: str) -> None:
    rows = 6_000
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, v bigint NOT NULL DEFAULT 1)")
        conn.execute("INSERT INTO items (id) SELECT generate_series(1, %s)", (rows,))
    stop = threading.Event()
    writes = 0

    def application() -> None:
        # Bumps rows all over the table while the batches run: some between a batch's snapshot and its write.
        nonlocal writes
        rng = random.Random(7)
        with psycopg.connect(db_url, autocommit=True) as conn:
            while not stop.is_set():
                first = rng.randrange(1, rows - 20)
                conn.execute("UPDATE items SET v = v + 1 WHERE id BETWEEN %s AND %s", (first, first + 20))
                writes += 1

    writer = threading.Thread(target=application)
    writer.start()
    try:
        wait_for(lambda: writes > 5, "the application to write")
        spec = BackfillSpec("tenfold", "items", {"v": "v * 10"}, batch_size=40, reversible=True)
        report = backfill.run_backfill(db_url, spec)
        wait_for(lambda: writes > 50, "more application writes")
    finally:
        stop.set()
        writer.join()

    assert report.rows_updated == rows
    with psycopg.connect(db_url, autocommit=True) as conn:
        # What the batch wrote is ten times what it overwrote, in every row: the old value is the one replaced.
        wrong = conn.execute("SELECT count(*) FROM backfill_undo_1 WHERE n_1 <> o_1 * 10").fetchone()
        assert wrong == (0,)
        assert conn.execute("SELECT count(*), count(DISTINCT k_1) FROM backfill_undo_1").fetchone() == (rows, rows)


# --- the command line --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_ambient_database")
def test_cli_add_reversible_run_status_revert_purge(docs: psycopg.Connection[Any], db_url: str) -> None:
    def cli_run(*argv: str) -> Result:
        return CliRunner().invoke(cli, ["--url", db_url, "--log-format", "json", *argv], catch_exceptions=False)

    before = snapshot(docs)
    added = cli_run(
        "add", "fill", "--table", "docs", "--set", "label=upper(tenant)", "--batch-size", "500", "--reversible"
    )
    assert added.exit_code == 0 and "reversible" in added.output
    assert cli_run("run", "fill").exit_code == 0
    docs.execute("UPDATE docs SET label = 'app' WHERE tenant = 'a'")
    status = cli_run("status", "fill")
    assert status.exit_code == 0 and "undo log:" in status.output

    reverted = cli_run("revert", "fill", "--batch-size", "300")

    assert reverted.exit_code == 0, reverted.output
    assert (
        "1,502 rows put back (finished); 2 rows the application changed since were left as they are" in reverted.output
    )
    assert [row for row in snapshot(docs) if row[0] != "a"] == [row for row in before if row[0] != "a"]
    purged = cli_run("purge", "fill")
    assert purged.exit_code == 0 and "undo log dropped" in purged.output
    again = cli_run("revert", "fill")
    assert again.exit_code == 2 and "Error: backfill 'fill' has no undo log any more: it was purged" in again.output


def test_a_forced_spec_with_other_columns_gets_a_new_undo_log_only_before_it_starts(
    docs: psycopg.Connection[Any], db_url: str
) -> None:
    backfill.register_backfill(db_url, BackfillSpec("fill", "docs", {"label": "'x'"}, reversible=True))
    other = BackfillSpec("fill", "docs", {"amount": "amount + 1"}, batch_size=500, reversible=True)
    before = snapshot(docs)
    backfill.register_backfill(db_url, other, force=True)
    assert backfill.run_backfill(db_url, "fill", max_batches=1).rows_updated == 499  # one amount is NULL

    with pytest.raises(backfill.SpecMismatchError, match="its undo log holds the columns amount"):
        backfill.register_backfill(db_url, BackfillSpec("fill", "docs", {"label": "'y'"}, reversible=True), force=True)
    with pytest.raises(backfill.SpecMismatchError, match="cannot become so or stop being so"):
        backfill.register_backfill(db_url, other.with_changes(reversible=False), force=True)
    assert backfill.revert_backfill(db_url, "fill").rows_kept == 0
    assert snapshot(docs) == before


def test_odd_names_in_the_control_schema_the_table_and_its_columns(conn: psycopg.Connection[Any], db_url: str) -> None:
    conn.execute('CREATE SCHEMA "App %s"')
    conn.execute('CREATE TABLE "App %s"."we""ird" ("K ey" integer PRIMARY KEY, "Val%ue" text, "order" int[])')
    conn.execute("""INSERT INTO "App %s"."we""ird" SELECT g, 'v' || g, ARRAY[g] FROM generate_series(1, 300) g""")
    before = conn.execute('SELECT * FROM "App %s"."we""ird" ORDER BY 1').fetchall()
    spec = BackfillSpec("odd", 'we"ird', {"Val%ue": "'100%'", "order": "NULL"}, schema="App %s", reversible=True)

    assert backfill.run_backfill(db_url, spec, control_schema="Ctl %s").rows_updated == 300
    report = backfill.revert_backfill(
        db_url, "odd", control_schema="Ctl %s", settings=backfill.RunSettings(batch_size=64)
    )

    assert (report.run.rows_updated, report.rows_kept) == (300, 0)
    assert conn.execute('SELECT * FROM "App %s"."we""ird" ORDER BY 1').fetchall() == before


def test_several_workers_run_and_revert_a_reversible_backfill(docs: psycopg.Connection[Any], db_url: str) -> None:
    before = snapshot(docs)
    spec = BackfillSpec("fill", "docs", VALUES, batch_size=60, reversible=True)
    assert backfill.run_backfill(db_url, spec, workers=2, slices=3).rows_updated == 1504
    docs.execute("UPDATE docs SET amount = 7 WHERE tenant = 't5'")

    report = backfill.revert_backfill(db_url, "fill", workers=2, slices=4)

    assert len(backfill.get_slices(db_url, "fill:revert")) >= 4
    t5 = {row[:2] for row in before if row[0] == "t5"}
    assert (report.run.rows_updated, report.rows_kept) == (1504 - len(t5), len(t5))
    assert [row for row in snapshot(docs) if row[:2] not in t5] == [row for row in before if row[:2] not in t5]


# --- plans ---------------------------------------------------------------------------------------------------------


def _scans(conn: psycopg.Connection[Any], statement: psycopg.sql.Composed, params: list[Any]) -> dict[str, set[str]]:
    """Scan node types of a statement's plan, by relation."""
    row = conn.execute(psycopg.sql.SQL("EXPLAIN (FORMAT JSON) {}").format(statement), params).fetchone()
    assert row is not None
    found: dict[str, set[str]] = {}
    todo = [row[0][0]["Plan"]]
    while todo:
        node = todo.pop()
        todo.extend(node.get("Plans", []))
        if "Relation Name" in node and "Scan" in node["Node Type"]:
            found.setdefault(node["Relation Name"], set()).add(node["Node Type"])
    return found


def test_the_reversible_batch_and_the_revert_batch_walk_indexes_never_a_sequential_scan(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    conn.execute("CREATE TABLE events (id bigint PRIMARY KEY, payload text, kind text)")
    conn.execute("INSERT INTO events (id, payload) SELECT g, md5(g::text) FROM generate_series(1, 100000) g")
    conn.execute("VACUUM ANALYZE events")
    spec = BackfillSpec("p", "events", {"kind": "upper(payload)"}, batch_size=40_000, reversible=True)
    backfill.run_backfill(db_url, spec, max_batches=1)
    backfill.revert_backfill(db_url, "p", max_batches=1, settings=backfill.RunSettings(batch_size=20_000))
    tables = ControlTables("public")
    index_scans = {"Index Only Scan", "Index Scan", "Bitmap Heap Scan", "Bitmap Index Scan"}

    target = for_target(resolve(conn, backfill.get_backfill(db_url, "p").spec).target)
    params = target.batch_params(1, 0, ["50000"], ["100000"], True, 10_000, "me")
    variants = [False, True] if conn.info.server_version >= 180000 else [False]
    for returning_old in variants:
        scans = _scans(conn, target.batch(tables, True, tables.undo(1), returning_old), params)
        assert set(scans["events"]) <= index_scans and scans["events"], (returning_old, scans)

    revert = backfill.get_backfill(db_url, "p:revert")
    walk = for_target(resolve(conn, revert.spec).target)
    params = walk.batch_params(revert.id, 0, ["20000"], ["40000"], True, 10_000, "me")
    scans = _scans(conn, walk.batch(tables, True), params)
    assert set(scans["events"]) <= index_scans and scans["events"], scans
    assert set(scans["backfill_undo_1"]) <= index_scans and scans["backfill_undo_1"], scans


def test_undo_logs_have_the_control_tables_access_rules(docs: psycopg.Connection[Any], db_url: str) -> None:
    role = f"runner_{docs.info.dbname}"
    docs.execute(psycopg.sql.SQL("CREATE ROLE {}").format(psycopg.sql.Identifier(role)))
    try:
        backfill.register_backfill(db_url, BackfillSpec("before", "docs", {"label": "'x'"}, reversible=True))
        backfill.init_control_tables(db_url, grant=role)
        backfill.register_backfill(db_url, BackfillSpec("after", "docs", {"label": "'y'"}, reversible=True))

        for table in ("backfill_undo_1", "backfill_undo_2"):
            granted = "SELECT has_table_privilege(%s, %s, %s)"
            for privilege in ("SELECT", "INSERT", "UPDATE"):
                assert docs.execute(granted, (role, table, privilege)).fetchone() == (True,), (table, privilege)
            assert docs.execute(granted, (role, table, "DELETE")).fetchone() == (False,)
            assert docs.execute(granted, ("public", table, "SELECT")).fetchone() == (False,)
    finally:
        backfill.delete_backfill(db_url, "before")
        backfill.delete_backfill(db_url, "after")
        docs.execute(psycopg.sql.SQL("DROP OWNED BY {}").format(psycopg.sql.Identifier(role)))
        docs.execute(psycopg.sql.SQL("DROP ROLE {}").format(psycopg.sql.Identifier(role)))


def test_a_revert_walked_again_from_the_start_counts_only_the_rows_the_application_changed(
    docs: psycopg.Connection[Any], db_url: str
) -> None:
    before = snapshot(docs)
    backfill.run_backfill(db_url, BackfillSpec("fill", "docs", VALUES, batch_size=100, reversible=True))
    docs.execute("UPDATE docs SET label = 'app' WHERE tenant = 't6'")
    settings = backfill.RunSettings(batch_size=200)
    backfill.revert_backfill(db_url, "fill", max_batches=3, settings=settings)
    backfill.delete_backfill(db_url, "fill:revert")  # its checkpoint is gone: the next revert walks from the start

    report = backfill.revert_backfill(db_url, "fill", settings=settings)

    t6 = {row[:2] for row in before if row[0] == "t6"}
    assert (report.run.rows_updated, report.rows_kept) == (1504 - 600 - len(t6), len(t6))
    assert [row for row in snapshot(docs) if row[:2] not in t6] == [row for row in before if row[:2] not in t6]


@pytest.mark.usefixtures("no_ambient_database")
def test_plan_of_a_revert_is_one_line_saying_what_to_use_instead(docs: psycopg.Connection[Any], db_url: str) -> None:
    backfill.run_backfill(db_url, BackfillSpec("fill", "docs", VALUES, reversible=True))
    backfill.revert_backfill(db_url, "fill", max_batches=1, settings=backfill.RunSettings(batch_size=100))

    result = CliRunner().invoke(cli, ["--url", db_url, "plan", "fill:revert"], catch_exceptions=False)

    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "Error: backfill 'fill:revert' is the revert of 'fill': its batches put back the undo log's values, which "
        "a preview does not show; `backfill status fill:revert` shows its progress"
    ]
