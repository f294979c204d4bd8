"""The HTML report in a real browser: headless Chromium (Debian's package) renders it without errors."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from lightning_hprune.report import write_report_files
from tests.report_fixtures import closed_loop_summary

pytestmark = pytest.mark.fit  # starts a browser process

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="headless Chromium is not installed (CI installs it: apt-get install -y chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    return Path(write_report_files(closed_loop_summary(), str(out)).html)


@needs_chromium
def test_the_report_renders_in_chromium_without_console_errors(page: Path, tmp_path: Path) -> None:
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    errors: list[str] = []
    shot = tmp_path / "report.png"
    with playwright.sync_playwright() as p:
        # Playwright starts Chromium with a fresh temporary profile of its own (its --user-data-dir)
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS[1:])
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            tab.goto(page.as_uri(), wait_until="load")
            images = tab.eval_on_selector_all(
                "figure img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
            )
            tables = tab.eval_on_selector_all("table", "ts => ts.map(t => [t.id, t.rows.length])")
            warning = tab.inner_text("#latency-warning") if tab.query_selector("#latency-warning") else ""
            tab.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert len(images) == 4
    for complete, width, height in images:
        assert complete
        assert width >= 600
        assert height >= 300
    rows = dict(tables)
    assert rows["before-after"] >= 4  # header, params, MACs, latency, val_acc
    assert rows["events"] == 4  # header + 3 kept events
    assert rows["decisions"] == 9  # header + 8 decisions, the rollback among them
    assert rows["layers"] >= 5
    assert isinstance(warning, str)
    with Image.open(shot) as img:
        img.load()
        assert img.width == 1280
        assert img.height > 3000  # tables and four figures, not an error page
        assert len(img.convert("RGB").getcolors(1 << 20) or []) > 200


@needs_chromium
def test_chromium_cli_screenshot_of_the_report(page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "cli.png"
    done = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,2400",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    with Image.open(shot) as img:
        img.load()
        assert img.size == (1280, 2400)
        assert len(img.convert("RGB").getcolors(1 << 20) or []) > 200
