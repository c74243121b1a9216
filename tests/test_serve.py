"""``backfill serve`` in a real browser: headless Chromium (Debian's chromium and chromium-driver, through
selenium) on the dashboard of a backfill that a runner works on, against real PostgreSQL; ``/metrics`` read with
the Prometheus client's own parser and compared with the control tables.

The browser is required: without it these tests fail (``.ci/run`` installs it), they never skip.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import fresh_database
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from sqlalchemy.engine import make_url
from support import wait_for

import backfill
from backfill import BackfillSpec, RunOutcome, RunReport, RunSettings
from backfill.web import DashboardServer, create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "serve-test-token-0123456789"
#: Small batches with a pause between them: the runner is still busy when the tests look at it (it would take
#: minutes to finish; the tests pause it).
RUNNING_SETTINGS = RunSettings(batch_size=50, sleep_between=0.2)
ROWS = 100_000


@dataclass
class Runner:
    """A backfill run in a thread of this process, and how it ended."""

    name: str
    thread: threading.Thread
    report: RunReport | None = None


def _create_table(url: str, table: str, rows: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, v int)")
        conn.execute(f"INSERT INTO {table} SELECT g, NULL FROM generate_series(1, %s) g", (rows,))
        conn.execute(f"ANALYZE {table}")


def _spec(name: str, table: str) -> BackfillSpec:
    return BackfillSpec(name=name, table=table, values={"v": "id % 7"}, where="v IS NULL")


def _state(url: str, name: str) -> str:
    return backfill.get_backfill(url, name).state.value


@pytest.fixture(scope="module")
def url(admin_url: str) -> Iterator[str]:
    with fresh_database(admin_url) as database_url:
        yield database_url


@pytest.fixture(scope="module")
def running(url: str) -> Iterator[Runner]:
    """Backfill ``live_fill`` being worked by a runner in a thread, from the module's start until its end."""
    _create_table(url, "events", ROWS)
    spec = _spec("live_fill", "events")
    runner = Runner("live_fill", threading.Thread(target=lambda: None))

    def work() -> None:
        runner.report = backfill.run_backfill(url, spec, settings=RUNNING_SETTINGS)

    runner.thread = threading.Thread(target=work, name="live_fill-runner", daemon=True)
    runner.thread.start()
    wait_for(lambda: _rows_done(url, "live_fill") > 0, "the runner's first batches")
    try:
        yield runner
    finally:
        if runner.thread.is_alive() and _state(url, "live_fill") in ("running", "pending"):
            backfill.pause_backfill(url, "live_fill")
        runner.thread.join(timeout=60)


def _rows_done(url: str, name: str) -> int:
    try:
        return backfill.get_backfill(url, name).rows_updated
    except backfill.BackfillError:
        return 0


@pytest.fixture(scope="module")
def server(url: str, running: Runner) -> Iterator[DashboardServer]:
    """The dashboard with a token, on a free port of 127.0.0.1, for the whole module."""
    with DashboardServer(create_app(url, token=TOKEN, refresh_seconds=0), port=0) as dashboard:
        yield dashboard


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium. Missing, it fails the test with the packages to install: never a skip."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: apt-get install chromium chromium-driver (.ci/run installs them)",
            pytrace=False,
        )
    profile = tempfile.mkdtemp(prefix="backfill-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",  # the suite may run as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _card(driver: webdriver.Chrome, name: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, f'section.backfill[data-backfill="{name}"]')


def _post(
    url: str, fields: dict[str, str], headers: dict[str, str] | None = None, path: str = "action"
) -> tuple[int, str]:
    request = urllib.request.Request(
        url + path, data=urllib.parse.urlencode(fields).encode(), headers=headers or {}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 -- our own server on 127.0.0.1
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _get(url: str) -> tuple[int, str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 -- our own server on 127.0.0.1
            return response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), error.headers


# --- the page --------------------------------------------------------------------------------------------------


def test_the_page_shows_a_running_backfill_its_state_and_progress(
    browser: webdriver.Chrome, server: DashboardServer, url: str, running: Runner
) -> None:
    # From the second batch on, each batch has waited sleep_between before it.
    wait_for(lambda: backfill.backfill_status(url, "live_fill")[0].throttle_reason, "a batch that waited")
    browser.get(server.url)
    card = _card(browser, "live_fill")
    assert card.find_element(By.CSS_SELECTOR, ".name").text == "live_fill"
    assert card.find_element(By.CSS_SELECTOR, ".state").text == "running"
    percent = card.find_element(By.CSS_SELECTOR, ".percent").text
    assert percent.endswith("%") and 0 < float(percent[:-1]) < 100, percent
    rows_shown = int(card.find_element(By.CSS_SELECTOR, ".rows").text.split()[0].replace(",", ""))
    assert 0 < rows_shown <= _rows_done(url, "live_fill")
    assert float(card.find_element(By.CSS_SELECTOR, ".progress progress").get_attribute("value") or 0) > 0
    runners = card.find_element(By.CSS_SELECTOR, ".runners").text
    assert f"pid {os.getpid()} (slice 0)" in runners, runners  # the runner is a thread of this process
    assert card.find_element(By.CSS_SELECTOR, ".throttle").text == "sleep_between"
    assert card.find_element(By.CSS_SELECTOR, ".charts svg polyline").get_attribute("points")
    assert card.find_element(By.CSS_SELECTOR, "button.pause").is_displayed()


def test_pause_is_refused_without_the_token_and_with_a_wrong_one(
    browser: webdriver.Chrome, server: DashboardServer, url: str, running: Runner
) -> None:
    for typed in ("", "not-the-token-at-all"):
        browser.get(server.url)
        field = browser.find_element(By.ID, "token")
        field.clear()
        if typed:
            field.send_keys(typed)
        _card(browser, "live_fill").find_element(By.CSS_SELECTOR, "button.pause").click()
        notice = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".notice"), "the action's answer")[0]
        assert "refused" in notice.text and "wrong or missing token" in notice.text, notice.text
        assert _state(url, "live_fill") == "running"
    assert running.thread.is_alive()


def test_pause_clicked_with_the_token_pauses_the_backfill_in_the_control_table(
    browser: webdriver.Chrome, server: DashboardServer, url: str, running: Runner
) -> None:
    browser.get(server.url)
    field = browser.find_element(By.ID, "token")
    field.clear()  # the page keeps what was typed before (sessionStorage)
    field.send_keys(TOKEN)
    _card(browser, "live_fill").find_element(By.CSS_SELECTOR, "button.pause").click()
    notice = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".notice.ok"), "the action's answer")[0]
    assert notice.text == "pause 'live_fill': now paused"
    assert _state(url, "live_fill") == "paused"
    running.thread.join(timeout=60)
    assert running.report is not None and running.report.outcome is RunOutcome.PAUSED
    # The page now offers resume, and a reload shows the new state without posting the action again.
    browser.refresh()
    card = _card(browser, "live_fill")
    assert card.find_element(By.CSS_SELECTOR, ".state").text == "paused"
    buttons = [button.text for button in card.find_elements(By.CSS_SELECTOR, "form.action button")]
    assert buttons == ["resume", "cancel"]
    assert browser.current_url == server.url


def test_a_backfill_named_like_markup_shows_as_text_and_its_buttons_act_on_it(
    browser: webdriver.Chrome, server: DashboardServer, url: str
) -> None:
    hostile = 'x"><img src=y onerror="document.title=1"> & \'quoted\''
    _create_table(url, "markup_table", 100)
    backfill.register_backfill(url, _spec(hostile, "markup_table"))
    browser.get(server.url)
    assert browser.find_elements(By.TAG_NAME, "img") == [] and browser.title == "backfill dashboard"
    card = next(
        c
        for c in browser.find_elements(By.CSS_SELECTOR, "section.backfill")
        if c.get_attribute("data-backfill") == hostile
    )
    assert card.find_element(By.CSS_SELECTOR, ".name").text == hostile
    field = browser.find_element(By.ID, "token")
    field.clear()
    field.send_keys(TOKEN)
    card.find_element(By.CSS_SELECTOR, "button.pause").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".notice.ok"), "the action's answer")
    assert _state(url, hostile) == "paused"
    assert browser.find_elements(By.TAG_NAME, "img") == []


def test_actions_are_post_only_and_a_read_only_dashboard_refuses_them(url: str, running: Runner) -> None:
    before = _state(url, "live_fill")
    with DashboardServer(create_app(url), port=0) as read_only:
        page = _get(read_only.url)[1]
        assert "Read-only" in page and "<button" not in page
        status, body = _post(read_only.url, {"backfill": "live_fill", "action": "cancel", "token": TOKEN})
        assert status == 403 and "read-only" in body
        status, _, _ = _get(read_only.url + "action?backfill=live_fill&action=cancel")
        assert status == 405
    assert _state(url, "live_fill") == before


def test_the_token_also_works_as_a_bearer_header_and_bad_actions_are_one_line_refusals(
    server: DashboardServer, url: str
) -> None:
    _create_table(url, "orders", 500)
    backfill.register_backfill(url, _spec("header_fill", "orders"))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    status, body = _post(server.url, {"backfill": "header_fill", "action": "pause"}, bearer)
    assert status == 200 and "now paused" in body
    assert _state(url, "header_fill") == "paused"
    status, body = _post(server.url, {"backfill": "header_fill", "action": "retry", "token": TOKEN})
    assert status == 409 and "retry &#39;header_fill&#39; failed" in body
    status, body = _post(server.url, {"backfill": "no_such_fill", "action": "pause", "token": TOKEN})
    assert status == 409 and "no backfill named" in body
    status, body = _post(server.url, {"backfill": "header_fill", "action": "drop", "token": TOKEN})
    assert status == 400 and "unknown action" in body
    assert _state(url, "header_fill") == "paused"


def test_the_page_carries_no_password_and_loads_nothing_from_elsewhere(url: str, running: Runner) -> None:
    secret = "pw-never-shown-7f3a"
    with_password = make_url(url).set(password=secret).render_as_string(hide_password=False)
    unreachable = make_url(url).set(password=secret, port=1).render_as_string(hide_password=False)
    with (
        DashboardServer(create_app(with_password), port=0) as good,
        DashboardServer(create_app(unreachable), port=0) as bad,
    ):
        status, page, headers = _get(good.url)
        assert status == 200 and "live_fill" in page and secret not in page
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert "http" not in page.replace(good.url, "").replace("http-equiv", "")
        status, page, _ = _get(bad.url)
        assert status == 503 and secret not in page and "***" in page
        status, text, _ = _get(bad.url + "metrics")
        assert status == 503 and secret not in text and len(text.strip().splitlines()) == 1


# --- live settings ---------------------------------------------------------------------------------------------


def _overrides(url: str, name: str) -> dict[str, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT overrides FROM backfills WHERE name = %s", (name,)).fetchone()
    assert row is not None
    return dict(row[0] or {})


def test_live_settings_set_from_the_page_with_the_token_reach_the_control_table(
    browser: webdriver.Chrome, server: DashboardServer, url: str
) -> None:
    _create_table(url, "settings_table", 500)
    backfill.register_backfill(url, _spec("settings_fill", "settings_table"))
    browser.get(server.url)
    field = browser.find_element(By.ID, "token")
    field.clear()
    field.send_keys(TOKEN)
    form = _card(browser, "settings_fill").find_element(By.CSS_SELECTOR, "form.settings")
    form.find_element(By.NAME, "max_rows_per_second").send_keys("500")
    form.find_element(By.NAME, "sleep").send_keys("200ms")
    form.find_element(By.CSS_SELECTOR, "button.set").click()
    notice = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".notice.ok"), "the answer")[0]
    assert notice.text == "live settings of 'settings_fill': max rows/s 500 · sleep 0.2s"
    assert _overrides(url, "settings_fill") == {"max_rows_per_second": 500, "sleep": 0.2}
    shown = _card(browser, "settings_fill").find_element(By.CSS_SELECTOR, ".overrides").text
    assert shown == "live settings: max rows/s 500 · sleep 0.2s"

    assert _post(server.url, {"backfill": "settings_fill", "max_rows_per_second": "5"}, path="settings")[0] == 403
    for fields, status, text in (
        ({"max_rows_per_second": "fast"}, 400, "max rows/s: &#39;fast&#39; is not a number"),
        ({"sleep": "1 fortnight"}, 400, "sleep: &#39;1 fortnight&#39; is not a number, a duration"),
        ({}, 400, "give at least one setting, or reset"),
        ({"max_rows_per_second": "5", "token": "wrong-token-0123456789"}, 403, "wrong or missing token"),
    ):
        answer = _post(
            server.url, {"backfill": "settings_fill", "token": TOKEN, "op": "set", **fields}, path="settings"
        )
        assert answer[0] == status and text in answer[1], answer
    assert _overrides(url, "settings_fill") == {"max_rows_per_second": 500, "sleep": 0.2}
    status, body = _post(server.url, {"backfill": "settings_fill", "token": TOKEN, "op": "reset"}, path="settings")
    assert status == 200 and "each runner uses its own settings" in body
    assert _overrides(url, "settings_fill") == {}


# --- /metrics --------------------------------------------------------------------------------------------------


def _families(server: DashboardServer) -> dict[str, Any]:
    status, text, headers = _get(server.url + "metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(text)}


def _samples(family: Any, **labels: str) -> dict[str, float]:
    """sample name (with its distinguishing labels) -> value, for the samples whose labels include ``labels``."""
    found = {}
    for sample in family.samples:
        if all(sample.labels.get(k) == v for k, v in labels.items()):
            extra = {k: v for k, v in sample.labels.items() if k not in labels}
            found[sample.name + (str(sorted(extra.items())) if extra else "")] = sample.value
    return found


def test_metrics_parsed_by_the_prometheus_parser_match_the_control_tables(
    server: DashboardServer, url: str, running: Runner
) -> None:
    _create_table(url, "done_table", 1_000)
    report = backfill.run_backfill(url, _spec("done_fill", "done_table"), settings=RunSettings(batch_size=300))
    assert report.outcome is RunOutcome.FINISHED
    families = _families(server)
    for name in (
        "backfill_rows_updated",
        "backfill_batches",
        "backfill_batch_duration_seconds",
        "backfill_throttle_wait_seconds",
        "backfill_retries",
        "backfill_state",
        "backfill_live_runners",
        "backfill_estimated_seconds_remaining",
    ):
        assert name in families, name
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT b.name, b.state, coalesce(sum(s.rows_updated), 0), coalesce(sum(s.batches), 0)"
            " FROM backfills b LEFT JOIN backfill_slices s ON s.backfill_id = b.id GROUP BY b.name, b.state"
        ).fetchall()
    assert {name for name, *_ in rows} >= {"live_fill", "done_fill"}
    with psycopg.connect(url, autocommit=True) as conn:
        counters = {
            column: {
                (name, reason): value
                for name, reason, value in conn.execute(
                    f"SELECT b.name, c.key, sum(c.value::float8) FROM backfills b"
                    f" JOIN backfill_slices s ON s.backfill_id = b.id, jsonb_each_text(s.{column}) c GROUP BY 1, 2"
                )
            }
            for column in ("throttle_seconds", "retries")
        }
        history = {
            name: (count, total)
            for name, count, total in conn.execute(
                "SELECT b.name, count(h.*), coalesce(sum(h.duration), 0) FROM backfills b"
                " LEFT JOIN backfill_batches h ON h.backfill_id = b.id GROUP BY b.name"
            )
        }
    assert counters["throttle_seconds"][("live_fill", "sleep_between")] > 0
    waits = {
        (sample.labels["backfill"], sample.labels["reason"]): sample.value
        for sample in families["backfill_throttle_wait_seconds"].samples
    }
    assert waits == pytest.approx(counters["throttle_seconds"])
    retries = {
        (sample.labels["backfill"], sample.labels["reason"]): sample.value
        for sample in families["backfill_retries"].samples
    }
    assert retries == counters["retries"]
    for name, state, rows_updated, batches in rows:
        rows_family = families["backfill_rows_updated"]
        assert _samples(rows_family, backfill=name) == {"backfill_rows_updated_total": rows_updated}
        assert _samples(families["backfill_batches"], backfill=name) == {"backfill_batches_total": batches}
        states = _samples(families["backfill_state"], backfill=name)
        assert states[f"backfill_state[('state', '{state}')]"] == 1.0
        assert sum(states.values()) == 1.0 and len(states) == 6
        # Nobody runs these now (one finished, one paused, one never started): no runner, no ETA.
        assert _samples(families["backfill_live_runners"], backfill=name) == {"backfill_live_runners": 0}
        assert _samples(families["backfill_estimated_seconds_remaining"], backfill=name) == {}
        # The duration histogram: this server's first scrape, so every batch of the history, once.
        durations = _samples(families["backfill_batch_duration_seconds"], backfill=name)
        count, total = history[name]
        assert durations["backfill_batch_duration_seconds_count"] == count
        assert durations["backfill_batch_duration_seconds_sum"] == pytest.approx(total)
        assert durations["backfill_batch_duration_seconds_bucket[('le', '+Inf')]"] == count
    assert _samples(families["backfill_rows_updated"], backfill="done_fill") == {"backfill_rows_updated_total": 1_000}


# --- the command ---------------------------------------------------------------------------------------------


def _serve_command(url: str, *args: str, token: str | None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BACKFILL_SERVE_TOKEN")}
    env.update(DATABASE_URL=url, PYTHONUNBUFFERED="1")
    if token is not None:
        env["BACKFILL_SERVE_TOKEN"] = token
    argv = [sys.executable, "-m", "backfill.cli", "--log-format", "json", "serve", *args]
    return subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)  # noqa: S603


def test_the_serve_command_serves_until_sigterm_with_the_token_from_the_environment(url: str) -> None:
    _create_table(url, "cli_table", 100)
    backfill.register_backfill(url, _spec("cli_fill", "cli_table"))
    process = _serve_command(url, "--port", "0", token=TOKEN)
    try:
        assert process.stderr is not None
        lines = []
        while not (found := re.search(r"dashboard on (http://\S+/) ", lines[-1] if lines else "")):
            line = process.stderr.readline()
            assert line, f"serve exited: {''.join(lines)}"
            lines.append(line)
        address = found.group(1)
        assert "read-only" not in lines[-1] and TOKEN not in "".join(lines)
        assert "cli_fill" in _get(address)[1]
        assert _post(address, {"backfill": "cli_fill", "action": "pause", "token": TOKEN})[0] == 200
        assert _state(url, "cli_fill") == "paused"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    ("args", "token", "message"),
    [
        (("--port", "0"), "too-short", "Error: the token must be at least 16 characters long"),
        (("--port", "70000"), None, "Error: Invalid value for '--port'"),
        (("--host", "192.0.2.1", "--port", "0"), None, "Error: cannot listen on 192.0.2.1:0:"),
    ],
)
def test_bad_serve_options_are_one_line_errors(
    url: str, args: tuple[str, ...], token: str | None, message: str
) -> None:
    process = _serve_command(url, *args, token=token)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and errors[0].startswith(message), stderr
