"""The pruning report: figures, ``pruning_report.html`` and ``hprune_report.json``, from plain data.

Everything here reads the end-of-fit summary (the dict a pruning callback keeps as ``summary`` and writes
as ``hprune_report.json``), so a finished run's report can be rebuilt from its JSON alone
(``hprune report <log_dir>``). The figures of the HTML page and the ``.svg`` files are drawn in pure Python
(:mod:`lightning_hprune.report.svg`, milliseconds); matplotlib is optional and draws the same figures as
raster images (PNG files, and the images sent to loggers such as TensorBoard) only when those are wanted.

* :mod:`lightning_hprune.report.svg`: the four figures as SVG text (no dependency);
* :mod:`lightning_hprune.report.figures`: the same four figures with matplotlib (for raster images);
* :mod:`lightning_hprune.report.tables`: the tables (shared by the console summary and the HTML page);
* :mod:`lightning_hprune.report.html`: the self-contained HTML page.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: File names inside a run's log directory.
JSON_NAME = "hprune_report.json"
HTML_NAME = "pruning_report.html"
#: Formats a figure can be written in: SVG always (pure Python), PNG when asked (matplotlib).
FIGURE_FORMATS = ("svg", "png")


def has_matplotlib() -> bool:
    """Whether figures can be drawn."""
    return importlib.util.find_spec("matplotlib") is not None


@dataclass
class ReportFiles:
    """What :func:`write_report_files` wrote."""

    json: str
    html: str
    figures: dict[str, dict[str, str]] = field(default_factory=dict)


def curves(report: Mapping[str, Any]) -> dict[str, list[float]]:
    """Series per quantity: the dense value first, then one value per event (same length for all).

    The monitored metric logged at an event was measured just before it, so it belongs to the previous
    point; its last value is the final one.
    """
    before = report.get("before", {})
    events = list(report.get("events_log", []))
    metric = report.get("monitor") or next(
        (k for k in report.get("after", {}) if k not in ("params", "macs", "latency_ms")), None
    )
    out: dict[str, list[float]] = {}
    for key in ("params", "macs"):
        if key in before and all(key in e for e in events):
            out[key] = [float(before[key])] + [float(e[key]) for e in events]
    if metric is not None and before.get(metric) is not None and all(metric in e for e in events):
        dense = float(before[metric])  # the baseline, before the first event (even a rolled-back one)
        out[metric] = [dense] + [float(e[metric]) for e in events[1:]] + [float(report["after"][metric])]
    return out


def png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def draw_figures(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Every figure of the report (empty without matplotlib)."""
    if not has_matplotlib():
        return {}
    from lightning_hprune.report.figures import draw_all

    return draw_all(summary)


def close_figures(figures: Mapping[str, Any]) -> None:
    """Free the figures' memory."""
    if not figures:
        return
    import matplotlib.pyplot as plt

    for fig in figures.values():
        plt.close(fig)


def _finite(obj: Any) -> Any:
    """``NaN``/``inf`` as ``None`` (strict JSON, readable by any tool)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_report_files(
    summary: dict[str, Any],
    out_dir: str,
    figures: Mapping[str, Any] | None = None,
    png: bool = True,
) -> ReportFiles:
    """Write ``hprune_report.json``, every figure as SVG (and PNG) and ``pruning_report.html`` into ``out_dir``.

    The SVG figures (the ones the HTML page embeds) are drawn in pure Python
    (:mod:`lightning_hprune.report.svg`): milliseconds, and no matplotlib needed. PNG files are raster
    images drawn with matplotlib (about a third of a second per figure): written for ``figures`` when they
    are given, else drawn here when ``png`` is true and matplotlib is installed.

    Args:
        summary: the report's data; its ``"files"`` entry is set to the written files (relative names).
        out_dir: the run's log directory.
        figures: matplotlib figures already drawn (they stay open for the caller), written as PNG.
        png: without ``figures``, draw the matplotlib figures and write them as PNG (closed here).

    Returns:
        The paths written.

    """
    from lightning_hprune.report.html import render_html
    from lightning_hprune.report.svg import draw_all

    os.makedirs(out_dir, exist_ok=True)
    own = figures is None
    figs = (draw_figures(summary) if png else {}) if figures is None else dict(figures)
    files = ReportFiles(json=os.path.join(out_dir, JSON_NAME), html=os.path.join(out_dir, HTML_NAME))
    svgs = draw_all(summary)
    try:
        for name, svg in svgs.items():
            path = os.path.join(out_dir, f"hprune_{name}.svg")
            with open(path, "w", encoding="utf-8") as f:
                f.write(svg)
            files.figures[name] = {"svg": path}
        for name, fig in figs.items():
            path = os.path.join(out_dir, f"hprune_{name}.png")
            fig.savefig(path, format="png", dpi=110)
            files.figures.setdefault(name, {})["png"] = path
    finally:
        if own:
            close_figures(figs)
    summary["files"] = {
        "json": JSON_NAME,
        "html": HTML_NAME,
        "figures": {n: {k: os.path.basename(v) for k, v in p.items()} for n, p in files.figures.items()},
    }
    clean = _finite(summary)
    with open(files.json + ".tmp", "w") as f:
        json.dump(clean, f, indent=2, default=float)
    os.replace(files.json + ".tmp", files.json)
    with open(files.html, "w", encoding="utf-8") as f:
        f.write(render_html(clean, svgs))
    return files


def load_report(path: str) -> dict[str, Any]:
    """Read ``hprune_report.json`` (a file, or the log directory holding it)."""
    if os.path.isdir(path):
        path = os.path.join(path, JSON_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Expected a pruning report at {path!r} (written by a pruning callback at the end of fit into "
            "the run's log directory), but there is no such file."
        )
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "before" not in data or "after" not in data:
        raise ValueError(
            f"Expected {path!r} to be a pruning report (with 'before' and 'after'), but it is not."
        )
    return data


def rebuild_report(log_dir: str, out_dir: str | None = None, png: bool = True) -> ReportFiles:
    """Rebuild the figures and ``pruning_report.html`` of a finished run from its ``hprune_report.json``.

    Args:
        log_dir: the run's log directory, or its ``hprune_report.json``.
        out_dir: where to write (default: next to the JSON).
        png: also draw the PNG files (with matplotlib, when it is installed).

    """
    summary = load_report(log_dir)
    base = log_dir if os.path.isdir(log_dir) else os.path.dirname(log_dir)
    return write_report_files(summary, out_dir or base, png=png)


def plot_report(report: Mapping[str, Any] | str, path: str) -> str:
    """Draw the "over the run" figure of ``report`` (a dict or a ``hprune_report.json`` path) into ``path``."""
    from lightning_hprune.report.figures import over_epochs

    data = load_report(report) if isinstance(report, str) else report
    fig = over_epochs(data)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    close_figures({"f": fig})
    return path
