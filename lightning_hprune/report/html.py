"""``pruning_report.html``: one self-contained page (SVG figures embedded as data URIs, no script, no link out)."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_hprune.report.tables import (
    BEFORE_AFTER_COLUMNS,
    Row,
    before_after_rows,
    config_rows,
    decision_rows,
    event_rows,
    layer_rows,
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;font-size:.86rem;margin:.6rem 0;width:100%}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f5f7} td.num{text-align:right;font-variant-numeric:tabular-nums}
.lead{color:#555} .warn{color:#b5179e;font-weight:600} figure{margin:1rem 0}
figure img{max-width:100%;border:1px solid #eee} figcaption{color:#555;font-size:.85rem}
details{margin:.5rem 0} code{background:#f4f5f7;padding:0 .2rem}
"""

_CAPTIONS = {
    "pruning_curve": "The monitored metric against MACs and against parameters: the star is the dense model, "
    "numbered points the model after each event (measured after its recovery), the dashed line the target.",
    "over_epochs": "Parameters, MACs, the monitored metric and latency over the epochs; dashed lines mark the "
    "events, dotted red lines rollbacks. Latency: median with its interquartile range.",
    "hierarchy": "Kept width of every prunable layer after every event (channels, or heads for attention "
    "projections); a grey cell with x: the layer was removed with its block.",
    "decisions": "The closed loop: what it decided at each check (pruned, continue, speed up, roll back, "
    "stop), and the metric's drop against max_drop.",
}


def _table(
    rows: Sequence[Row], columns: Sequence[tuple[str, str]], table_id: str, numeric: Sequence[str] = ()
) -> str:
    if not rows:
        return "<p class='lead'>(none)</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in columns)
    body = []
    for r in rows:
        cells = []
        for key, _ in columns:
            cls = " class='num'" if key in numeric else ""
            cells.append(f"<td{cls} data-key='{key}'>{html.escape(r.get(key, ''))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table id='{table_id}'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(summary: Mapping[str, Any], images: Mapping[str, str]) -> str:
    """The whole page: ``images`` maps a figure's name to its SVG text (embedded as a data URI)."""
    monitor = summary.get("monitor")
    title = f"Pruning report: {summary.get('model', 'model')}"
    achieved, target = summary.get("achieved", float("nan")), summary.get("target", float("nan"))
    lead = (
        f"Removed {achieved:.1%} of {summary.get('cost')} (target {target:.1%}) in {summary.get('events')} "
        f"events"
    )
    lat = summary.get("latency")
    warn = ""
    if isinstance(lat, Mapping) and lat.get("verdict") == "inconclusive":
        warn = (
            "<p class='warn' id='latency-warning'>The latency ratio is inconclusive: its interquartile range "
            "contains 1, so this run cannot tell whether the pruned model is faster on this machine.</p>"
        )
    figs = []
    for name, svg in images.items():
        data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
        figs.append(
            f"<figure id='fig-{name}'><img alt='{html.escape(name)}' src='data:image/svg+xml;base64,{data}'>"
            f"<figcaption>{html.escape(_CAPTIONS.get(name, name))}</figcaption></figure>"
        )
    sections = [
        f"<h1>{html.escape(title)}</h1><p class='lead'>{html.escape(lead)}.</p>{warn}",
        "<h2>Before and after</h2>",
        _table(
            before_after_rows(summary),
            [*BEFORE_AFTER_COLUMNS, ("note", "note")],
            "before-after",
            ("before", "after", "ratio", "retained"),
        ),
        "<h2>Figures</h2>",
        "".join(figs) or "<p class='lead'>(no figures: the run has nothing to draw)</p>",
        "<h2>Per layer</h2>",
        _table(
            layer_rows(summary),
            [
                ("layer", "layer"),
                ("unit", "unit"),
                ("before", "before"),
                ("after", "after"),
                ("kept", "kept"),
                ("note", "note"),
            ],
            "layers",
            ("before", "after", "kept"),
        ),
        "<h2>Events</h2>",
        _table(
            event_rows(summary),
            [
                ("event", "event"),
                ("epoch", "epoch"),
                ("step", "step"),
                ("target", "target"),
                ("removed", "removed"),
                ("event_ratio", "event ratio"),
                ("params", "params"),
                ("macs", "MACs"),
                ("latency", "latency"),
                ("metric", f"{monitor or 'metric'} (before)"),
                ("retained", "retained"),
                ("seconds", "time (s)"),
                ("levels", "levels"),
            ],
            "events",
            ("params", "macs", "seconds"),
        ),
        "<h2>Decisions</h2>",
        _table(
            decision_rows(summary),
            [
                ("epoch", "epoch"),
                ("step", "step"),
                ("action", "action"),
                ("rate", "rate"),
                ("value", str(monitor or "value")),
                ("drop", "drop"),
                ("bound", "bound"),
                ("reason", "reason"),
            ],
            "decisions",
        ),
        "<h2>Configuration</h2>",
        _table(config_rows(summary), [("setting", "setting"), ("value", "value")], "configuration"),
        "<details><summary>The report's data (hprune_report.json)</summary><pre>"
        + html.escape(json.dumps(summary, indent=1, default=str))
        + "</pre></details>",
    ]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>"
    )
