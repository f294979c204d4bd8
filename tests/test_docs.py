"""The docs site: builds strictly, its generated pages are up to date, its figures exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_tables_are_generated_from_the_json() -> None:
    sys.path.insert(0, str(ROOT / "docs" / "scripts"))
    try:
        import benchmark_tables
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "benchmarks.md").read_text() == benchmark_tables.render()


def test_every_page_and_image_the_docs_name_exists() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            for value in item.values():
                yield from pages(value) if isinstance(value, list) else [value]

    names = list(pages(config["nav"]))
    for name in names:
        assert (ROOT / "docs" / name).is_file(), name
    for page in (ROOT / "docs").rglob("*.md"):
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text()):
            assert (page.parent / image).is_file(), (page, image)
    assert "RUN_SUMMARY" not in (ROOT / "docs" / "hierarchy.md").read_text()


def test_examples_keep_the_progress_bar_on() -> None:
    for path in (ROOT / "examples").glob("*.yaml"):
        assert yaml.safe_load(path.read_text())["trainer"].get("enable_progress_bar", True), path


@pytest.mark.fit  # starts a process
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed (pip install -e '.[docs]')")
    mkdocs = shutil.which("mkdocs")
    assert mkdocs is not None
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "LatencyMeasurement" in api
    assert "measure_latency" in api
    assert (tmp_path / "site" / "img" / "hierarchy.png").is_file()
