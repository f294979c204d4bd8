"""The report's figures, drawn with matplotlib (imported here only, lazily) from the report's plain data.

1. :func:`pruning_curve`: the monitored metric against MACs and against parameters, one point per event,
   the dense baseline and the target marked.
2. :func:`over_epochs`: parameters, MACs, the metric and latency over the epochs, events marked.
3. :func:`hierarchy`: every layer's kept width after every event (a layers x events heat map), blocks
   removed whole and attention heads marked.
4. :func:`decisions`: the closed loop's decisions over time (pruned / rolled back / stopped ...).

Each returns a ``matplotlib.figure.Figure`` (or ``None`` when the run has nothing to draw for it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

FIGURES = ("pruning_curve", "over_epochs", "hierarchy", "decisions")

_COLORS = {
    "pruned": "#2a9d8f",
    "continue": "#8d99ae",
    "speed_up": "#3a86ff",
    "roll_back": "#e63946",
    "stop": "#111111",
}
_MARKERS = {"pruned": "o", "continue": ".", "speed_up": "^", "roll_back": "X", "stop": "s"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scale(values: Sequence[float]) -> tuple[float, str]:
    """A divisor and its name so that ticks read 12.3 (millions) rather than 1.23e7."""
    top = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    for div, name in ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands")):
        if top >= div:
            return div, name
    return 1.0, ""


def _plain(ax: Any) -> None:
    """No offset or scientific notation on linear axes."""
    for axis in (ax.xaxis, ax.yaxis):
        fmt = axis.get_major_formatter()
        if hasattr(fmt, "set_useOffset"):
            fmt.set_useOffset(False)
            fmt.set_scientific(False)


def _label(quantity: str, name: str) -> str:
    return f"{quantity} ({name})" if name else quantity


def _cost_points(summary: Mapping[str, Any], key: str) -> list[float]:
    """Dense value, then the value after each kept event."""
    before = summary.get("before", {})
    events = summary.get("events_log", [])
    if key not in before or not all(key in e for e in events):
        return []
    return [float(before[key])] + [float(e[key]) for e in events]


def _metric_points(summary: Mapping[str, Any]) -> list[float]:
    """The metric of the dense model, then of the model after each event (measured after its recovery).

    The metric logged at an event was measured just before it, so it belongs to the model the previous
    event left; the last point is the final value.
    """
    monitor = summary.get("monitor")
    events = summary.get("events_log", [])
    after = summary.get("after", {})
    if not monitor or not events or not all(monitor in e for e in events) or after.get(monitor) is None:
        return []
    # The dense point is the baseline (before the first event, even if that event was rolled back).
    dense = summary.get("before", {}).get(monitor, events[0][monitor])
    return [float(dense)] + [float(e[monitor]) for e in events[1:]] + [float(after[monitor])]


def _rollback_epochs(summary: Mapping[str, Any]) -> list[int]:
    """Epochs at which the closed loop rolled an event back."""
    return [int(d["epoch"]) for d in summary.get("decisions", []) if d.get("action") == "roll_back"]


def _cost_steps(
    xs: Sequence[float], events: Sequence[Mapping[str, Any]], last: int, div: float
) -> tuple[list[int], list[float]]:
    """A cost series (dense first, one value per event) as a post-step curve over the epochs, scaled by ``div``."""
    steps_x = [0] + [int(e["epoch"]) for e in events] + [last]
    steps_y = [xs[0] / div] + [v / div for v in xs[1:]] + [xs[-1] / div]
    return steps_x, steps_y


def _latency_points(
    summary: Mapping[str, Any], events: Sequence[Mapping[str, Any]], last: int
) -> list[tuple[str, float, Mapping[str, Any]]]:
    """The latency measurements to draw, as ``(kind, epoch, stats)``.

    Kinds: ``"dense"`` (before the first event), ``"event"`` (after one), ``"pruned"`` and ``"interleaved"``
    (the pruned model and the dense copy timed in turns at the end of fit); ``stats`` has ``median_ms`` and,
    where measured, ``q1_ms``/``q3_ms``.
    """
    base, lat = summary.get("baseline_latency"), summary.get("latency")
    first = [int(d["epoch"]) for d in summary.get("decisions", []) if d.get("action") == "pruned"]
    first += [int(e["epoch"]) for e in events]
    out: list[tuple[str, float, Mapping[str, Any]]] = []
    if isinstance(base, Mapping) and first:
        out.append(("dense", min(first), base))
    for e in events:
        if isinstance(e.get("latency_ms"), (int, float)):
            stats = {
                "median_ms": e["latency_ms"],
                "q1_ms": e.get("latency_q1_ms", e["latency_ms"]),
                "q3_ms": e.get("latency_q3_ms", e["latency_ms"]),
            }
            out.append(("event", int(e["epoch"]), stats))
    if isinstance(lat, Mapping) and lat.get("pruned"):
        out.append(("pruned", last + 0.12, lat["pruned"]))
        if lat.get("interleaved"):
            out.append(("interleaved", last - 0.12, lat["dense"]))
    return out


def _latency_title(summary: Mapping[str, Any]) -> str:
    """The latency panel's title: the end-of-fit ratio and verdict when measured."""
    lat = summary.get("latency")
    if isinstance(lat, Mapping) and lat.get("pruned"):
        return f"latency: ratio {lat['ratio']:.3f} (IQR {lat['ratio_q1']:.3f}-{lat['ratio_q3']:.3f}), {lat['verdict']}"
    return "latency"


def pruning_curve(summary: Mapping[str, Any]) -> Any:
    """The monitored metric against MACs and against parameters: one point per event, dense and target marked."""
    plt = _plt()
    monitor = summary.get("monitor")
    metric = _metric_points(summary)
    cost = str(summary.get("cost", "macs"))
    target = float(summary.get("target", math.nan))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, (key, quantity) in zip(axes[0], (("macs", "MACs"), ("params", "parameters")), strict=True):
        xs = _cost_points(summary, key)
        if not xs:
            ax.set_axis_off()
            continue
        div, unit = _scale(xs)
        x = [v / div for v in xs]
        if metric and len(metric) == len(x):
            y = metric
            ax.set_ylabel(f"{monitor} (after recovery)")
            ax.axhline(y[0], color="#999999", ls=":", lw=1)
        else:
            y = [100.0 * v / xs[0] for v in xs]
            ax.set_ylabel(f"{quantity} kept (% of dense)")
        ax.plot(x, y, "-o", color="#264653", ms=5, zorder=2, label="after each event")
        ax.plot(x[:1], y[:1], "*", color="#f4a261", ms=16, zorder=3, label="dense baseline")
        for i in range(1, len(x)):
            ax.annotate(str(i), (x[i], y[i]), textcoords="offset points", xytext=(4, 5), fontsize=8)
        if key == cost and math.isfinite(target):
            ax.axvline(x[0] * (1 - target), color="#e76f51", ls="--", lw=1.2, label=f"target (-{target:.0%})")
        ax.set_xlabel(_label(quantity, unit))
        ax.invert_xaxis()  # pruning goes from right (dense) to left (small)
        ax.grid(alpha=0.3)
        _plain(ax)
        ax.legend(fontsize=8, loc="best")
        ax.set_title(f"{monitor or 'size'} vs {quantity}")
    achieved = summary.get("achieved", math.nan)
    fig.suptitle(
        f"Pruning curve: removed {achieved:.1%} of {cost} (target {target:.1%}); "
        "numbers are event indices, the star is the dense model"
    )
    fig.tight_layout()
    return fig


def _last_epoch(summary: Mapping[str, Any]) -> int:
    epochs = [int(e["epoch"]) for e in summary.get("events_log", [])]
    epochs += [int(m["epoch"]) for m in summary.get("timeline", [])]
    epochs += [int(d["epoch"]) for d in summary.get("decisions", [])]
    final = summary.get("final_epoch")
    if isinstance(final, int):
        epochs.append(final)
    return max(epochs, default=0)


def over_epochs(summary: Mapping[str, Any]) -> Any:
    """Parameters, MACs, the metric and latency over the epochs; events (and rollbacks) marked."""
    plt = _plt()
    events = list(summary.get("events_log", []))
    before = summary.get("before", {})
    last = _last_epoch(summary)
    monitor = summary.get("monitor")
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    rollbacks = _rollback_epochs(summary)

    def mark(ax: Any) -> None:
        for i, e in enumerate(events):
            ax.axvline(
                int(e["epoch"]),
                color="#e76f51",
                ls="--",
                lw=0.8,
                alpha=0.7,
                label="event" if i == 0 else None,
            )
        for i, ep in enumerate(rollbacks):
            ax.axvline(ep, color="#e63946", ls=":", lw=1.5, label="rollback" if i == 0 else None)
        ax.grid(alpha=0.3)

    for ax, (key, quantity) in zip(axes[0], (("params", "parameters"), ("macs", "MACs")), strict=True):
        xs = _cost_points(summary, key)
        if xs:
            div, unit = _scale(xs)
            ax.step(*_cost_steps(xs, events, last, div), where="post", color="#264653", lw=2)
            ax.set_ylabel(_label(quantity, unit))
            ax.set_ylim(bottom=0)
        ax.set_title(f"{quantity} (the model trained during each epoch)")
        mark(ax)
        _plain(ax)
    ax = axes[1][0]
    timeline = summary.get("timeline", [])
    if monitor and timeline:
        ax.plot([m["epoch"] for m in timeline], [m["value"] for m in timeline], "-o", ms=3, color="#2a9d8f")
        base = before.get(monitor)
        if isinstance(base, (int, float)):
            ax.axhline(base, color="#999999", ls=":", lw=1, label="before the first event")
        ax.set_ylabel(f"{monitor} (each validation)")
    else:
        ax.text(
            0.5, 0.5, "no monitored metric (monitor=None)", ha="center", va="center", transform=ax.transAxes
        )
    ax.set_title(str(monitor or "metric"))
    ax.set_xlabel("epoch (events at the end of the marked epochs, after validation)")
    mark(ax)
    _plain(ax)
    ax.legend(fontsize=8, loc="best")
    ax = axes[1][1]
    _latency_panel(ax, summary, events, last)
    ax.set_xlabel("epoch")
    mark(ax)
    _plain(ax)
    fig.suptitle("Over the run")
    fig.tight_layout()
    return fig


def _errorbar(ax: Any, x: float, stats: Mapping[str, Any], **kwargs: Any) -> None:
    med = float(stats["median_ms"])
    err = [[med - float(stats["q1_ms"])], [float(stats["q3_ms"]) - med]]
    ax.errorbar([x], [med], yerr=err, capsize=4, **kwargs)


def _latency_panel(
    ax: Any, summary: Mapping[str, Any], events: Sequence[Mapping[str, Any]], last: int
) -> None:
    points = _latency_points(summary, events, last)
    style: dict[str, dict[str, Any]] = {
        "dense": {"fmt": "s", "color": "#f4a261", "label": "dense, before the first event"},
        "event": {"fmt": "o", "color": "#264653", "label": "after an event"},
        "pruned": {"fmt": "o", "color": "#2a9d8f", "ms": 7, "label": "pruned, end of fit"},
        "interleaved": {
            "fmt": "D",
            "mfc": "none",
            "color": "#f4a261",
            "ms": 7,
            "label": "dense copy, interleaved",
        },
    }
    labelled: set[str] = set()
    for kind, x, stats in points:
        kw = dict(style[kind])
        if kind in labelled:
            kw["label"] = None
        labelled.add(kind)
        _errorbar(ax, x, stats, **kw)
    ax.set_title(_latency_title(summary))
    if points:
        ax.set_ylabel("forward latency (ms, median and IQR)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(
            0.5,
            0.5,
            "latency not measured (measure_latency=False)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )


def _natural(name: str) -> list[Any]:
    """``features.10`` after ``features.9`` (module order for numbered children)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _width_matrix(
    summary: Mapping[str, Any],
) -> tuple[list[str], list[str], list[list[float]], list[list[str]]]:
    """Rows (layers), columns (dense + events), kept fractions and cell labels."""
    structure = summary.get("structure", {})
    widths = structure.get("widths", {})
    layers = sorted(widths, key=_natural)
    records = {(int(e["event"]), int(e["epoch"])) for e in summary.get("events_log", [])}
    snaps = [w for w in summary.get("widths_log", []) if (int(w["event"]), int(w["epoch"])) in records]
    columns = ["dense"] + [f"event {int(w['event']) + 1}\n(epoch {w['epoch']})" for w in snaps]
    values: list[list[float]] = []
    labels: list[list[str]] = []
    for name in layers:
        before = widths[name].get("before") or 0
        row, lab = [1.0], [str(before)]
        for w in snaps:
            kept = w["widths"].get(name, before)
            if kept is None:
                row.append(math.nan)
                lab.append("x")
            else:
                row.append(kept / before if before else math.nan)
                lab.append(str(kept))
        values.append(row)
        labels.append(lab)
    return layers, columns, values, labels


def _hierarchy_layout(
    summary: Mapping[str, Any], max_layers: int
) -> tuple[list[str], list[str], list[list[float]], list[list[str]], list[int], list[str], str] | None:
    """What the width heat map shows: :func:`_width_matrix`, the rows shown, their names and the title.

    Returns ``(layers, columns, values, labels, shown, names, title)``, or ``None`` without layers. With more
    than ``max_layers`` layers, the most pruned ones are shown (in module order); ``names`` tag head groups and
    layers removed with their block; the title's second line lists removed blocks and heads.
    """
    layers, columns, values, labels = _width_matrix(summary)
    if not layers:
        return None
    structure = summary.get("structure", {})
    widths = structure.get("widths", {})
    shown = list(range(len(layers)))
    note = ""
    if len(layers) > max_layers:
        final = [v[-1] if math.isfinite(v[-1]) else -1.0 for v in values]
        shown = sorted(sorted(shown, key=lambda i: final[i])[:max_layers])
        note = f" ({max_layers} most pruned of {len(layers)} layers)"
    names = []
    for i in shown:
        w = widths[layers[i]]
        tag = " [heads]" if w.get("unit") == "heads" else ""
        tag += f" [block {w['removed_with']} removed]" if w.get("removed_with") else ""
        names.append(f"{layers[i]}{tag}")
    removed = structure.get("removed_modules", [])
    heads = sum(int(lv.get("heads_removed", 0)) for lv in structure.get("levels", {}).values())
    subtitle = []
    if removed:
        subtitle.append(f"blocks removed whole: {', '.join(removed)}")
    if heads:
        subtitle.append(f"attention heads removed: {heads}")
    title = "Kept width per layer" + note + ("\n" + "; ".join(subtitle) if subtitle else "")
    return layers, columns, values, labels, shown, names, title


def _kept_events(summary: Mapping[str, Any]) -> tuple[list[int], list[float]] | None:
    """The kept events' cumulative removal (% of dense) as a post-step curve over the epochs."""
    events = summary.get("events_log", [])
    if not events:
        return None
    xs = [0] + [int(e["epoch"]) for e in events] + [_last_epoch(summary)]
    ys = [0.0] + [100 * float(e["removed"]) for e in events] + [100 * float(events[-1]["removed"])]
    return xs, ys


def _decision_marks(entries: Sequence[Mapping[str, Any]]) -> list[tuple[int, float, str]]:
    """``(epoch, removed %, action)`` of every decision: a rolled-back event at what it had removed."""
    marks = []
    removed_now = 0.0
    for d in entries:
        action = str(d.get("action"))
        if action == "pruned" and isinstance(d.get("removed"), (int, float)):
            removed_now = float(d["removed"])
            y = removed_now
        elif action == "roll_back" and isinstance(d.get("undone_removed"), (int, float)):
            y = float(d["undone_removed"])
        else:
            y = removed_now
        marks.append((int(d["epoch"]), 100 * y, action))
    return marks


def _metric_checks(entries: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The decisions that checked the metric (a finite ``drop``)."""
    return [d for d in entries if isinstance(d.get("drop"), (int, float)) and math.isfinite(d["drop"])]


def each_figure(summary: Mapping[str, Any], draw: Mapping[str, Any]) -> dict[str, Any]:
    """``draw[name](summary)`` for each of :data:`FIGURES`, keeping those the run has something for."""
    out = {}
    for name in FIGURES:
        figure = draw[name](summary)
        if figure is not None:
            out[name] = figure
    return out


def hierarchy(summary: Mapping[str, Any], max_layers: int = 80) -> Any:
    """Every layer's kept width after every event: a layers x events heat map (removed blocks crossed out)."""
    plt = _plt()
    from matplotlib.colors import ListedColormap

    layout = _hierarchy_layout(summary, max_layers)
    if layout is None:
        return None
    _layers, columns, values, labels, shown, names, title = layout
    rows = [values[i] for i in shown]
    height = min(max(3.0, 0.26 * len(shown) + 2.2), 24.0)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(columns) + 4.5), height))
    cmap = ListedColormap(plt.get_cmap("viridis")(range(256))).with_extremes(bad="#d9d9d9")
    image = ax.imshow([[100 * v for v in r] for r in rows], aspect="auto", cmap=cmap, vmin=0, vmax=100)
    if len(shown) * len(columns) <= 600:
        for r, i in enumerate(shown):
            for c, text in enumerate(labels[i]):
                v = values[i][c]
                color = "white" if math.isfinite(v) and v < 0.55 else "black"
                ax.text(c, r, text, ha="center", va="center", fontsize=7, color=color)
    ax.set_yticks(range(len(shown)), names, fontsize=7 if len(shown) > 30 else 8)
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_xlabel("after each event (cells: kept width in channels, or heads; x: removed with its block)")
    cbar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    cbar.set_label("kept width (% of the dense width)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def decisions(summary: Mapping[str, Any]) -> Any:
    """The closed loop over time: removed fraction per decision, and the metric's drop against ``max_drop``.

    ``None`` when the run had no closed loop (every decision was ``pruned``).
    """
    entries = list(summary.get("decisions", []))
    if not entries or (all(d.get("action") == "pruned" for d in entries) and not summary.get("max_drop")):
        return None
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    kept = _kept_events(summary)
    if kept is not None:
        top.step(*kept, where="post", color="#264653", lw=1.5, label="kept events")
    seen: set[str] = set()
    for epoch, y, action in _decision_marks(entries):
        top.plot(
            [epoch],
            [y],
            _MARKERS.get(action, "o"),
            color=_COLORS.get(action, "#555555"),
            ms=9 if action in ("roll_back", "stop") else 7,
            label=action.replace("_", " ") if action not in seen else None,
        )
        seen.add(action)
    target = summary.get("target")
    if isinstance(target, (int, float)):
        top.axhline(100 * target, color="#e76f51", ls="--", lw=1, label=f"target {target:.0%}")
    top.set_ylabel(f"{summary.get('cost', 'cost')} removed (% of dense)")
    top.set_title("Decisions (a rolled-back event is marked at what it had removed)")
    top.legend(fontsize=8, loc="best", ncol=2)
    top.grid(alpha=0.3)
    checks = _metric_checks(entries)
    if checks:
        for d in checks:
            action = str(d["action"])
            color = _COLORS.get(action, "#555555")
            bottom.bar(int(d["epoch"]), 100 * float(d["drop"]), color=color, width=0.5, alpha=0.6)
            bottom.plot(
                [int(d["epoch"])], [100 * float(d["drop"])], _MARKERS.get(action, "o"), color=color, ms=8
            )
        max_drop = summary.get("max_drop")
        if isinstance(max_drop, (int, float)):
            bottom.axhline(100 * max_drop, color="#e63946", ls="--", lw=1.2, label=f"max_drop {max_drop:.1%}")
            bottom.legend(fontsize=8, loc="best")
        twin = bottom.twinx()
        twin.step(
            [int(d["epoch"]) for d in entries],
            [float(d["rate"]) for d in entries],
            where="post",
            color="#3a86ff",
            lw=1,
        )
        twin.set_ylabel("rate (step multiplier)", color="#3a86ff")
        twin.set_ylim(0, max(float(d["rate"]) for d in entries) * 1.25)
        _plain(twin)
    else:
        bottom.text(
            0.5, 0.5, "no check of the metric yet", ha="center", va="center", transform=bottom.transAxes
        )
    bottom.set_ylabel(f"drop of {summary.get('monitor')} (% of before)")
    bottom.set_xlabel("epoch")
    bottom.grid(alpha=0.3)
    _plain(top)
    _plain(bottom)
    fig.tight_layout()
    return fig


def draw_all(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Every figure the run has something for, by name (see :data:`FIGURES`)."""
    return each_figure(
        summary,
        {
            "pruning_curve": pruning_curve,
            "over_epochs": over_epochs,
            "hierarchy": hierarchy,
            "decisions": decisions,
        },
    )
