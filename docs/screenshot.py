"""Take docs/dashboard.png: the dashboard of `backfill demo --serve` while the demo's backfill runs.

    uv run python docs/screenshot.py [--rows 1000000] [--port 8765] [--at 0.4] [--out docs/dashboard.png]

Needs Debian's chromium and chromium-driver. The demo runs as it always does (on a throwaway PostgreSQL); the
picture is taken once the backfill has done ``--at`` of its rows, read from the dashboard's own /metrics.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

ROOT = Path(__file__).resolve().parent.parent


def _progress(url: str) -> float | None:
    """Share of the demo's rows done, once its backfill runs; None before."""
    try:
        with urllib.request.urlopen(url + "metrics", timeout=5) as response:  # noqa: S310 -- 127.0.0.1
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    values = {
        (sample.name, sample.labels.get("state")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    if values.get(("backfill_state", "running")) != 1.0:
        return None
    return values.get(("backfill_rows_updated_total", None), 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--at", type=float, default=0.4, help="share of the rows done when the picture is taken")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}/"
    argv = [sys.executable, "-m", "backfill.cli", "demo", "--rows", str(args.rows), "--serve", "--port", str(args.port)]
    demo = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1100,570",
        f"--user-data-dir={tempfile.mkdtemp(prefix='backfill-shot-')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        deadline = time.monotonic() + 600
        while (done := _progress(url)) is None or done < args.at * args.rows:
            if demo.poll() is not None or time.monotonic() > deadline:
                print("the demo ended before its backfill got that far: try a smaller --at", file=sys.stderr)
                return 1
            time.sleep(0.05)
        driver.get(url)
        time.sleep(2.5)  # let the page's own refresh draw a few more seconds of the charts
        driver.save_screenshot(str(args.out))
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        demo.wait(timeout=600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
