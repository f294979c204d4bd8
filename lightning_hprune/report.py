"""Visual analysis: curves of parameters, MACs, latency and the monitored metric per pruning event.

Reads the end-of-fit report (``hprune_report.json``, or the dict the callback keeps as ``summary``) and
draws one panel per quantity, the dense model at event 0. matplotlib is optional: it is imported only
here, and the callback skips the figure when it is missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any


def curves(report: Mapping[str, Any]) -> dict[str, list[float]]:
    """Series per quantity: the dense value first, then one value per event (same length for all)."""
    before = report.get("before", {})
    events = list(report.get("events_log", []))
    metric = next((k for k in report.get("after", {}) if k not in ("params", "macs", "latency_ms")), None)
    out: dict[str, list[float]] = {}
    for key in ("params", "macs", "latency_ms"):
        if key in before and all(key in e for e in events):
            out[key] = [float(before[key])] + [float(e[key]) for e in events]
    if metric is not None and before.get(metric) is not None and all(metric in e for e in events):
        # The metric logged at an event was measured just before it: it belongs to the previous point.
        out[metric] = [float(e[metric]) for e in events] + [float(report["after"][metric])]
    return out


def plot_report(report: Mapping[str, Any] | str, path: str) -> str:
    """Draw the curves of ``report`` (a dict or a ``hprune_report.json`` path) into the image ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if isinstance(report, str):
        with open(report) as f:
            data: Mapping[str, Any] = json.load(f)
    else:
        data = report
    series = curves(data)
    fig, axes = plt.subplots(1, len(series), figsize=(3.2 * max(len(series), 1), 3.0), squeeze=False)
    titles = {"params": "parameters", "macs": "MACs", "latency_ms": "latency (ms)"}
    for ax, (key, values) in zip(axes[0], series.items(), strict=True):
        ax.plot(range(len(values)), values, marker="o")
        ax.set_title(titles.get(key, key))
        ax.set_xlabel("event (0 = dense)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"removed {data.get('achieved', float('nan')):.1%} of {data.get('cost', 'cost')} "
        f"(target {data.get('target', float('nan')):.1%})"
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
