"""The report from plain data (core, no Trainer): four figures, PNG/SVG files, the HTML page, the JSON, rebuild."""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from lightning_hprune import report as report_mod
from lightning_hprune.cli import main
from lightning_hprune.report import (
    HTML_NAME,
    JSON_NAME,
    close_figures,
    draw_figures,
    rebuild_report,
    write_report_files,
)
from lightning_hprune.report.tables import before_after_rows, fmt_count
from tests.report_fixtures import closed_loop_summary


@pytest.fixture(scope="module")
def summary() -> dict[str, Any]:
    return closed_loop_summary()


def test_every_figure_is_labelled_without_offset_notation(summary: dict[str, Any]) -> None:
    figures = draw_figures(summary)
    try:
        assert set(figures) == {"pruning_curve", "over_epochs", "hierarchy", "decisions"}
        for name, fig in figures.items():
            fig.canvas.draw()
            for ax in fig.axes:
                if not ax.axison or ax.get_label() == "<colorbar>":
                    continue
                assert ax.get_ylabel() or ax.get_yticklabels(), name
                for axis in (ax.xaxis, ax.yaxis):
                    assert axis.get_offset_text().get_text() == "", (name, axis)  # no 1e7 / +1e6
            labels = [ax.get_xlabel() for ax in fig.axes] + [ax.get_ylabel() for ax in fig.axes]
            assert any(labels), name
        curve = figures["pruning_curve"]
        assert curve.axes[0].get_xlabel() == "MACs (thousands)"
        assert curve.axes[0].get_ylabel() == "val_acc (after recovery)"
        legend = [t.get_text() for t in curve.axes[0].get_legend().get_texts()]
        assert {"dense baseline", "target (-75%)"} <= set(legend)
        heat = figures["hierarchy"].axes[0]
        rows = [t.get_text() for t in heat.get_yticklabels()]
        (block,) = summary["structure"]["removed_modules"]  # one of the candidates net.3, net.4
        assert block in ("net.3", "net.4")
        assert f"{block}.conv1 [block {block} removed]" in rows
        assert f"blocks removed whole: {block}" in heat.get_title()
        decisions = [t.get_text() for t in figures["decisions"].axes[0].get_legend().get_texts()]
        assert {"pruned", "roll back", "continue"} <= set(decisions)
    finally:
        close_figures(figures)


def test_files_decode_and_the_page_is_self_contained(summary: dict[str, Any], tmp_path: Path) -> None:
    files = write_report_files(dict(summary), str(tmp_path))
    assert set(files.figures) == {"pruning_curve", "over_epochs", "hierarchy", "decisions"}
    for name, paths in files.figures.items():
        with Image.open(paths["png"]) as img:
            img.load()
            assert img.width >= 600, name
            assert img.height >= 300, name
            assert len(img.convert("RGB").getcolors(1 << 20) or []) > 50, name  # not a blank canvas
        root = ET.parse(paths["svg"]).getroot()
        assert root.tag.endswith("svg")
        assert Path(paths["svg"]).stat().st_size > 10_000
    page = Path(files.html).read_text()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 4
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)  # nothing loaded from elsewhere
    assert "<script" not in page
    # the page shows the JSON's numbers
    data = json.loads(Path(files.json).read_text())
    assert fmt_count(data["after"]["params"]) in page
    assert f"{data['latency']['ratio']:.3f}" in page
    for row in before_after_rows(data):
        assert row["after"] in page
    assert data["files"]["html"] == HTML_NAME
    assert len(data["decisions"]) == len(summary["decisions"])
    assert page.count("<td data-key='action'>roll_back</td>") == 1


def test_hprune_report_rebuilds_a_run_from_its_json(
    summary: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    write_report_files(dict(summary), str(tmp_path))
    first = (tmp_path / HTML_NAME).read_text()
    for p in tmp_path.glob("hprune_*.png"):
        p.unlink()
    (tmp_path / HTML_NAME).unlink()
    main(["report", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == str(tmp_path / HTML_NAME)
    rebuilt = (tmp_path / HTML_NAME).read_text()
    strip = lambda s: re.sub(r"base64,[^']+", "", s)  # noqa: E731
    assert strip(rebuilt) == strip(first)
    assert len(list(tmp_path.glob("hprune_*.png"))) == 4
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "missing")])
    assert "Expected a pruning report at" in capsys.readouterr().err


def test_without_matplotlib_the_report_has_tables_and_no_figures(
    summary: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report_mod, "has_matplotlib", lambda: False)
    files = rebuild_report(str(write_report_files(dict(summary), str(tmp_path)).json), str(tmp_path / "out"))
    page = Path(files.html).read_text()
    assert files.figures == {}
    assert "matplotlib is not installed" in page
    assert "before-after" in page
    assert json.loads((tmp_path / "out" / JSON_NAME).read_text())["files"]["figures"] == {}
