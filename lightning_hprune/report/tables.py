"""The report's tables, as rows of formatted strings, from the report's plain data (``hprune_report.json``).

The console summary, the HTML report and ``hprune report`` all read these, so they always agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

Row = dict[str, str]


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def fmt_count(value: Any) -> str:
    """``1,587,434``; ``-`` when missing."""
    v = _num(value)
    return "-" if v is None or not math.isfinite(v) else f"{v:,.0f}"


def fmt_ratio(value: Any, digits: int = 3) -> str:
    """A ratio with ``digits`` decimals; ``-`` when missing."""
    v = _num(value)
    return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def fmt_pct(value: Any, digits: int = 1) -> str:
    """A fraction as a percentage."""
    v = _num(value)
    return "-" if v is None or not math.isfinite(v) else f"{100 * v:.{digits}f} %"


def fmt_ms(value: Any) -> str:
    """Milliseconds, 3 significant decimals."""
    v = _num(value)
    return "-" if v is None or not math.isfinite(v) else f"{v:.3f} ms"


def latency_verdict(latency: Mapping[str, Any]) -> str:
    """What the latency ratio says, in words (with why it is inconclusive, when it is)."""
    verdict = str(latency.get("verdict", "inconclusive"))
    how = "interleaved" if latency.get("interleaved") else "not interleaved"
    rounds = int(latency.get("pruned", {}).get("samples", 0))
    if verdict == "inconclusive":
        text = "inconclusive: the ratio's interquartile range contains 1"
    else:
        text = (
            f"{verdict}: the ratio's interquartile range lies {'below' if verdict == 'faster' else 'above'} 1"
        )
    detail = f"{how}, {rounds} passes each, batch {latency.get('batch_size')}, {latency.get('device')}"
    note = latency.get("note")
    return f"{text} ({detail}{'; ' + str(note) if note else ''})"


def before_after_rows(summary: Mapping[str, Any]) -> list[Row]:
    """Params, MACs, latency (with spread and verdict) and the monitored metric, before and after."""
    before, after = summary.get("before", {}), summary.get("after", {})
    rows: list[Row] = []
    for key, label in (("params", "parameters"), ("macs", "MACs")):
        b, a = _num(before.get(key)), _num(after.get(key))
        if b is None or a is None:
            continue
        ratio = a / b if b else math.nan
        rows.append(
            {
                "quantity": label,
                "before": fmt_count(b),
                "after": fmt_count(a),
                "ratio": fmt_ratio(ratio),
                "retained": fmt_pct(ratio),
                "note": "the pruning cost" if key == summary.get("cost") else "",
            }
        )
    lat = summary.get("latency")
    if isinstance(lat, Mapping) and lat.get("dense") and lat.get("pruned"):
        d, p = lat["dense"], lat["pruned"]
        rows.append(
            {
                "quantity": "latency",
                "before": f"{fmt_ms(d['median_ms'])} (IQR {d['q1_ms']:.3f}-{d['q3_ms']:.3f})",
                "after": f"{fmt_ms(p['median_ms'])} (IQR {p['q1_ms']:.3f}-{p['q3_ms']:.3f})",
                "ratio": f"{fmt_ratio(lat['ratio'])} (IQR {fmt_ratio(lat['ratio_q1'])}-{fmt_ratio(lat['ratio_q3'])})",
                "retained": fmt_pct(lat["ratio"]),
                "note": latency_verdict(lat),
            }
        )
    monitor = summary.get("monitor")
    if monitor:
        b, a = _num(before.get(monitor)), _num(after.get(monitor))
        if b is not None and a is not None:
            ratio = a / b if b else math.nan
            rows.append(
                {
                    "quantity": str(monitor),
                    "before": f"{b:.4f}",
                    "after": f"{a:.4f}",
                    "ratio": fmt_ratio(ratio),
                    "retained": fmt_pct(ratio),
                    "note": "before: just before the first event; after: the last validation",
                }
            )
    return rows


def text_table(rows: Sequence[Row], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table with aligned columns (``columns``: ``(key, header)``)."""
    widths = [max(len(h), *(len(r.get(k, "")) for r in rows)) for k, h in columns]
    line = "  ".join(h.ljust(w) for (_, h), w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(r.get(k, "").ljust(w) for (k, _), w in zip(columns, widths, strict=True)))
    return "\n".join(s.rstrip() for s in out)


BEFORE_AFTER_COLUMNS = (
    ("quantity", ""),
    ("before", "before"),
    ("after", "after"),
    ("ratio", "after/before"),
    ("retained", "retained"),
)


def layer_rows(summary: Mapping[str, Any]) -> list[Row]:
    """Every prunable layer's width before and after (channels, or heads), and what removed it."""
    rows = []
    for name, w in summary.get("structure", {}).get("widths", {}).items():
        before, after = w.get("before"), w.get("after")
        removed_with = w.get("removed_with")
        kept = after / before if isinstance(after, int) and before else (0.0 if removed_with else math.nan)
        rows.append(
            {
                "layer": name,
                "unit": str(w.get("unit", "channels")),
                "before": fmt_count(before),
                "after": "removed" if removed_with else fmt_count(after),
                "kept": fmt_pct(kept),
                "note": f"in block {removed_with}, removed whole" if removed_with else "",
            }
        )
    return rows


def event_rows(summary: Mapping[str, Any]) -> list[Row]:
    """One row per kept event: when, how much, the measurements and what each level did."""
    monitor = summary.get("monitor")
    rows = []
    for e in summary.get("events_log", []):
        levels = []
        for lv in e.get("levels", []):
            parts = []
            if lv.get("blocks"):
                parts.append(f"blocks {', '.join(lv['blocks'])}")
            units = sum(int(v) for v in dict(lv.get("removed", {})).values())
            if units:
                parts.append(f"{units} units in {len(lv['removed'])} layers")
            levels.append(f"{lv['level']}: {'; '.join(parts) or 'nothing'}")
        lat = "-"
        if _num(e.get("latency_ms")) is not None:
            lat = fmt_ms(e["latency_ms"])
            if _num(e.get("latency_q1_ms")) is not None and _num(e.get("latency_q3_ms")) is not None:
                lat += f" (IQR {e['latency_q1_ms']:.3f}-{e['latency_q3_ms']:.3f})"
        rows.append(
            {
                "event": str(int(e["event"]) + 1),
                "epoch": str(e.get("epoch")),
                "step": str(e.get("step")),
                "target": fmt_pct(e.get("target")),
                "removed": fmt_pct(e.get("removed")),
                "event_ratio": fmt_pct(e.get("event_ratio")),
                "params": fmt_count(e.get("params")),
                "macs": fmt_count(e.get("macs")),
                "latency": lat,
                "metric": fmt_ratio(e.get(monitor), 4) if monitor else "-",
                "retained": fmt_pct(e.get("retained")),
                "seconds": fmt_ratio(e.get("event_time_s"), 2),
                "levels": "; ".join(levels),
            }
        )
    return rows


def decision_rows(summary: Mapping[str, Any]) -> list[Row]:
    """Every decision, in order."""
    rows = []
    for d in summary.get("decisions", []):
        rows.append(
            {
                "epoch": str(d.get("epoch")),
                "step": str(d.get("step")),
                "action": str(d.get("action")),
                "rate": fmt_ratio(d.get("rate")),
                "value": fmt_ratio(d.get("value"), 4),
                "drop": fmt_pct(d.get("drop"), 2),
                "bound": fmt_ratio(d.get("bound"), 4),
                "reason": str(d.get("reason", "")),
            }
        )
    return rows


def config_rows(summary: Mapping[str, Any]) -> list[Row]:
    """The run's configuration, one setting per row."""
    return [{"setting": str(k), "value": str(v)} for k, v in summary.get("configuration", {}).items()]
