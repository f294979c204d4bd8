"""The report from plain data (core, no Trainer): four figures (SVG drawn in pure Python, PNG with matplotlib), the HTML page, the JSON, rebuild."""

from __future__ import annotations

import base64
import json
import math
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
    curves,
    draw_figures,
    rebuild_report,
    write_report_files,
)
from lightning_hprune.report import svg as svg_mod
from lightning_hprune.report.figures import FIGURES
from lightning_hprune.report.tables import before_after_rows, fmt_count
from tests.report_fixtures import closed_loop_summary

SVG = "{http://www.w3.org/2000/svg}"


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
        assert root.tag == f"{SVG}svg"
        assert root.get("data-figure") == name
        assert float(root.get("width", 0)) >= 600
        assert float(root.get("height", 0)) >= 300
        assert len(root.findall(f".//{SVG}g[@class='series']")) + len(root.findall(f".//{SVG}rect")) > 10
    page = Path(files.html).read_text()
    images = re.findall(r"src='data:image/svg\+xml;base64,([^']+)'", page)
    assert len(images) == 4
    for data, name in zip(images, files.figures, strict=True):
        svg = base64.b64decode(data).decode("utf-8")
        assert svg == Path(files.figures[name]["svg"]).read_text()  # the page embeds the written file
        assert ET.fromstring(svg).get("data-figure") == name
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


def test_without_matplotlib_the_report_has_svg_figures_and_no_png(
    summary: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report_mod, "has_matplotlib", lambda: False)
    files = rebuild_report(str(write_report_files(dict(summary), str(tmp_path)).json), str(tmp_path / "out"))
    page = Path(files.html).read_text()
    assert set(files.figures) == set(FIGURES)
    assert all(set(paths) == {"svg"} for paths in files.figures.values())
    assert list((tmp_path / "out").glob("*.png")) == []
    assert len(re.findall(r"src='data:image/svg\+xml;base64,", page)) == 4
    assert "before-after" in page
    written = json.loads((tmp_path / "out" / JSON_NAME).read_text())["files"]["figures"]
    assert written == {n: {"svg": f"hprune_{n}.svg"} for n in FIGURES}


def test_without_png_no_matplotlib_figure_is_drawn(
    summary: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(_summary: Any) -> Any:
        raise AssertionError("a matplotlib figure was drawn")

    monkeypatch.setattr(report_mod, "draw_figures", refuse)
    files = write_report_files(dict(summary), str(tmp_path), png=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [HTML_NAME, JSON_NAME, *(f"hprune_{n}.svg" for n in FIGURES)]
    )
    assert all(set(paths) == {"svg"} for paths in files.figures.values())


def _series(root: ET.Element) -> dict[str, tuple[list[float], list[float]]]:
    """Every labelled series of an SVG figure: label -> (x values, y values), from its data attributes."""
    out = {}
    for g in root.iter(f"{SVG}g"):
        if g.get("class") == "series" and g.get("data-label"):
            xs = [float(v) for v in (g.get("data-x") or "").split()]
            ys = [float(v) for v in (g.get("data-y") or "").split()]
            out[str(g.get("data-label"))] = (xs, ys)
    return out


def test_svg_figures_plot_the_reports_numbers(summary: dict[str, Any]) -> None:
    svgs = svg_mod.draw_all(summary)
    assert set(svgs) == set(FIGURES)
    roots = {name: ET.fromstring(text) for name, text in svgs.items()}

    # pruning curve: the metric after each event against MACs (thousands) and parameters; dense and target
    curve = roots["pruning_curve"]
    metric = curves(summary)["val_acc"]
    macs = [m / 1e3 for m in curves(summary)["macs"]]
    lines = [g for g in curve.iter(f"{SVG}g") if g.get("data-label") == "after each event"]
    assert len(lines) == 2  # one per panel (MACs, parameters)
    assert [float(v) for v in str(lines[0].get("data-x")).split()] == pytest.approx(macs)
    assert [float(v) for v in str(lines[0].get("data-y")).split()] == pytest.approx(metric)
    assert len(lines[0].findall(f"{SVG}circle")) == len(metric)  # one marker per point
    target = [g for g in curve.iter(f"{SVG}g") if g.get("data-label") == "target (-75%)"]
    assert [float(str(target[0].get("data-x")))] == pytest.approx([macs[0] * 0.25])
    assert _series(curve)["dense baseline"][1] == pytest.approx(metric[:1])
    texts = ["".join(t.itertext()) for t in curve.iter(f"{SVG}text")]
    assert "MACs (thousands)" in texts
    assert "val_acc (after recovery)" in texts
    assert not any("e+" in t or "1e" in t for t in texts)  # no scientific notation

    # over the run: the metric at every validation, latency with its spread, events marked
    over = _series(roots["over_epochs"])
    timeline = summary["timeline"]
    assert over["val_acc"] == ([m["epoch"] for m in timeline], pytest.approx([m["value"] for m in timeline]))
    lat = summary["latency"]
    assert over["pruned, end of fit"][1] == pytest.approx(
        [lat["pruned"]["median_ms"], lat["pruned"]["q1_ms"], lat["pruned"]["q3_ms"]]
    )
    assert over["event"][0] == [float(summary["events_log"][0]["epoch"])]
    assert "rollback" in over

    # hierarchy: one cell per layer and column, the block removed whole crossed out
    cells = [r for r in roots["hierarchy"].iter(f"{SVG}rect") if r.get("class") == "cell"]
    widths = summary["structure"]["widths"]
    assert len(cells) == len(widths) * (1 + len(summary["events_log"]))
    (block,) = summary["structure"]["removed_modules"]
    last = {r.get("data-layer"): r for r in cells if r.get("data-column") == str(len(summary["events_log"]))}
    for layer, w in widths.items():
        if w.get("removed_with"):
            assert last[layer].get("data-label") == "x"
            assert last[layer].get("fill") == "#d9d9d9"
        else:
            assert last[layer].get("data-label") == str(w["after"])
            assert float(str(last[layer].get("data-kept"))) == pytest.approx(w["after"] / w["before"])
    names = [
        "".join(t.itertext()) for t in roots["hierarchy"].iter(f"{SVG}text") if t.get("class") == "layer"
    ]
    assert f"{block}.conv1 [block {block} removed]" in names

    # decisions: every decision a marker at its epoch, the rollback among them; drops as bars
    dec = _series(roots["decisions"])
    assert {"pruned", "roll back", "continue", "kept events"} <= set(dec)
    assert dec["roll back"][0] == [
        float(d["epoch"]) for d in summary["decisions"] if d["action"] == "roll_back"
    ]
    bars = [g for g in roots["decisions"].iter(f"{SVG}g") if g.get("data-label") == "bars"]
    checks = [
        d for d in summary["decisions"] if isinstance(d.get("drop"), float) and math.isfinite(d["drop"])
    ]
    assert len(bars[0].findall(f"{SVG}rect")) == len(checks)


def test_nice_ticks_are_round_and_cover_the_range() -> None:
    ticks, decimals = svg_mod.nice_ticks(0.0, 1.0)
    assert ticks == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert decimals == 1
    ticks, decimals = svg_mod.nice_ticks(812.0, 1590.0)
    assert ticks == pytest.approx([1000.0, 1200.0, 1400.0])
    assert decimals == 0
    ticks, decimals = svg_mod.nice_ticks(0.0, 0.11)
    assert ticks == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08, 0.1])
    assert decimals == 2
    ticks, decimals = svg_mod.nice_ticks(0.0, 0.16)
    assert ticks == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15])
    assert decimals == 3
    assert svg_mod.viridis(0.0) == "#440154"
    assert svg_mod.viridis(1.0) == "#fde725"
