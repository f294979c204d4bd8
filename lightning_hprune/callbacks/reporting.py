"""What the pruning callbacks log, print and report, read from a session (nothing here changes pruning state).

Each event's record is logged as ``hprune/...`` metrics to every logger and printed as one line; the
monitored metric after every validation and the kept widths after every event go to the session's
timeline. At the end of fit, rank zero measures latency (the pruned model interleaved with the dense
copy), writes the report into the run's own directory (``hprune_report.json``, ``pruning_report.html``,
every figure as SVG, and as PNG when asked or a logger takes images), logs the figures to every logger that
takes images, and prints a summary.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch.nn as nn
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_hprune.callbacks.figures import run_directory, send_figures, send_files, takes_images
from lightning_hprune.core.ledger import EventRecord
from lightning_hprune.core.measure import LatencyComparison
from lightning_hprune.core.session import PruningSession
from lightning_hprune.report import write_report_files
from lightning_hprune.report.tables import (
    BEFORE_AFTER_COLUMNS,
    before_after_rows,
    latency_verdict,
    text_table,
)

#: Version of the report's layout (``hprune_report.json``).
REPORT_VERSION = 2

_RUN_DIRS: weakref.WeakKeyDictionary[pl.Trainer, str] = weakref.WeakKeyDictionary()


def run_dir(trainer: pl.Trainer) -> str:
    """The run's own directory (see :func:`~lightning_hprune.callbacks.figures.run_directory`), fixed per fit."""
    if trainer not in _RUN_DIRS:
        _RUN_DIRS[trainer] = run_directory(trainer)
    return _RUN_DIRS[trainer]


def say(trainer: pl.Trainer, message: str) -> None:
    """Print ``message`` on rank zero, above the progress bar while it runs (so the bar stays intact)."""
    if not getattr(trainer, "is_global_zero", True):
        return
    bar = getattr(trainer, "progress_bar_callback", None)
    training = getattr(bar, "_train_progress_bar", None)
    if isinstance(bar, TQDMProgressBar) and training is not None and not training.disable:
        bar.print(message)
    else:
        rank_zero_info(message)


def sensitivity_progress(trainer: pl.Trainer) -> Callable[[int, int, str, float], None]:
    """A progress line every tenth of the sensitivity analysis (it prunes and evaluates every layer once)."""
    start = time.perf_counter()

    def progress(done: int, total: int, group: str, drop: float) -> None:
        if done != total and done % max(1, total // 10):
            return
        spent = time.perf_counter() - start
        left = spent / done * (total - done)
        say(
            trainer,
            f"[hprune] sensitivity analysis: {done}/{total} layers ({group}: drop {drop:.4f}) "
            f"[{spent:.1f}s, about {left:.0f}s left]",
        )

    return progress


def kept_widths(session: PruningSession) -> dict[str, int | None]:
    """Every original layer's width now (``None``: removed with its block), from the session's graph."""
    graph = session.graph
    groups = graph.groups() if graph is not None else []
    now: dict[str, int] = {}
    for g in groups:
        for name in (g.name, *g.outputs):
            now.setdefault(name, g.size)
    removed = session.ledger.removed_modules()
    out: dict[str, int | None] = {}
    for n in session.ledger.original_groups:
        gone = any(n == b or n.startswith(f"{b}.") for b in removed)
        out[n] = None if gone else now.get(n, session.ledger.original_widths.get(n))
    return out


def log_event(trainer: pl.Trainer, session: PruningSession, record: EventRecord, verbose: bool) -> None:
    """Log one event's record to every logger, keep its widths and, with ``verbose``, print its line (rank 0).

    Args:
        trainer: The Trainer whose loggers receive the ``hprune/...`` metrics.
        session: The pruning session that ran the event.
        record: The event's record.
        verbose: Print one line.

    """
    monitor, cost = session.monitor, session.cost.name
    flat = record.as_dict(monitor)
    metrics = {f"hprune/{key}": float(v) for key, v in flat.items() if isinstance(v, (int, float))}
    # One namespace per level (a repeated level class gets a numeric suffix: global, global_1, ...).
    for lv in record.levels:
        metrics[f"hprune/{lv.level}/channels_removed"] = float(sum(lv.removed.values()))
        metrics[f"hprune/{lv.level}/blocks_removed"] = float(len(lv.blocks))
        metrics[f"hprune/{lv.level}/{cost}_removed"] = float(lv.saved)
        metrics[f"hprune/{lv.level}/{cost}_after"] = float(lv.cost_after)
    if record.metric is not None and monitor:
        metrics[f"hprune/{monitor}"] = record.metric
        metrics[f"hprune/retained_{monitor}"] = float(flat["retained"])
        metrics.pop("hprune/retained", None)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    session.timeline.add_widths(record.event, record.epoch, kept_widths(session))
    if verbose:
        m = record.measured
        blocks = [b for lv in record.levels for b in lv.blocks]
        latency = ""
        if "latency_ms" in m:
            latency = (
                f", latency {m['latency_ms']:.3f} ms (IQR {m['latency_q1_ms']:.3f}-{m['latency_q3_ms']:.3f})"
            )
        say(
            trainer,
            f"[hprune] event {record.event + 1}/{session.schedule.num_events} at epoch {record.epoch}: removed "
            f"{record.removed:.1%} of {cost} (target so far {record.target:.1%}; final target "
            f"{session.target:.1%}); params {int(m['params']):,}, MACs {int(m['macs']):,}"
            + latency
            + (f"; blocks removed: {', '.join(blocks)}" if blocks else "")
            + (f"; {monitor}={record.metric:.4f} before it" if record.metric is not None else "")
            + f" [{record.seconds:.2f}s]",
        )


def log_validation(trainer: pl.Trainer, session: PruningSession) -> None:
    """Keep the monitored metric after a validation (not the sanity check) in the session's timeline."""
    monitor = session.monitor
    if monitor is None or trainer.sanity_checking:
        return
    value = trainer.callback_metrics.get(monitor)
    if value is not None:
        session.timeline.add_metric(trainer.current_epoch, trainer.global_step, float(value))


def log_decision(
    trainer: pl.Trainer, session: PruningSession, entry: Mapping[str, Any], verbose: bool
) -> None:
    """Log a decision as ``hprune/decision`` (and ``hprune/rate``, ``hprune/drop``); print it when it matters.

    Args:
        trainer: The Trainer whose loggers receive the metrics.
        session: The pruning session.
        entry: The decision-log entry.
        verbose: Print routine decisions too (in closed loop).

    """
    metrics = {"hprune/decision": float(entry["code"]), "hprune/rate": float(entry["rate"])}
    drop = entry.get("drop")
    if isinstance(drop, float) and math.isfinite(drop):
        metrics["hprune/drop"] = drop
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    # The event line already says what was pruned: a routine decision is printed only in closed loop.
    action = entry["action"]
    if action in ("roll_back", "stop", "speed_up") or (verbose and session.loop is not None):
        say(trainer, f"[hprune] decision at epoch {entry['epoch']}: {action} - {entry['reason']}")


def configuration(session: PruningSession, trainer: pl.Trainer | None = None) -> dict[str, Any]:
    """The run's settings, as the report shows them."""
    config: dict[str, Any] = {"levels": ", ".join(repr(lv) for lv in session.levels)}
    config.update(session.settings())
    if trainer is not None:
        config["max_epochs"] = trainer.max_epochs
        config["loggers"] = ", ".join(type(lg).__name__ for lg in trainer.loggers) or "none"
        config["world_size"] = trainer.world_size
    return config


def summarize(
    session: PruningSession,
    final: Mapping[str, float],
    metric: float | None,
    model: nn.Module,
    latency: LatencyComparison | None = None,
    trainer: pl.Trainer | None = None,
) -> dict[str, Any]:
    """The end-of-fit summary as plain data: everything the report, its figures and its tables show."""
    cost = session.cost.name
    ledger = session.ledger
    base = ledger.baseline
    summary: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "model": type(model).__name__,
        "target": session.target,
        "cost": cost,
        "monitor": session.monitor,
        "mode": session.mode,
        "achieved": 1.0 - final[cost] / ledger.dense(cost),
        "events": session.schedule.position,
        "before": {k: base[f"dense_{k}"] for k in ("params", "macs") if f"dense_{k}" in base},
        "after": {k: final[k] for k in ("params", "macs")},
        "configuration": configuration(session, trainer),
    }
    if "dense_latency_ms" in base:
        summary["baseline_latency"] = {
            "median_ms": base["dense_latency_ms"],
            "q1_ms": base.get("dense_latency_q1_ms", base["dense_latency_ms"]),
            "q3_ms": base.get("dense_latency_q3_ms", base["dense_latency_ms"]),
        }
    summary["latency"] = None if latency is None else latency.as_dict()
    if latency is not None:
        summary["latency"]["measurement_s"] = session.latency_seconds
        summary["before"]["latency_ms"] = latency.dense.median_ms
        summary["after"]["latency_ms"] = latency.pruned.median_ms
    if session.monitor is not None and metric is not None:
        summary["before"][session.monitor] = base.get("metric")
        summary["after"][session.monitor] = metric
    if session.loop is not None:
        summary["max_drop"] = session.loop.max_drop
    summary["structure"] = structure(session, model)
    summary["events_log"] = [r.as_dict(session.monitor) for r in ledger.records]
    summary["decisions"] = [dict(d) for d in session.decisions.entries]
    summary["timeline"] = [dict(m) for m in session.timeline.metrics]
    summary["widths_log"] = session.timeline.state_dict()["widths"]
    if trainer is not None:
        summary["final_epoch"] = max(int(trainer.current_epoch) - 1, 0)
    return summary


def final_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The ``hprune/final_*`` metrics logged at the end of fit (the report's numbers, exactly)."""
    after, monitor = summary["after"], summary.get("monitor")
    metrics = {
        "hprune/final_params": float(after["params"]),
        "hprune/final_macs": float(after["macs"]),
        "hprune/final_removed": float(summary["achieved"]),
    }
    if monitor and after.get(monitor) is not None:
        metrics[f"hprune/final_{monitor}"] = float(after[monitor])
        base = summary["before"].get(monitor)
        if base:
            metrics[f"hprune/final_retained_{monitor}"] = float(after[monitor]) / float(base)
    lat = summary.get("latency")
    if isinstance(lat, Mapping):
        metrics["hprune/final_latency_ms"] = float(lat["pruned"]["median_ms"])
        metrics["hprune/final_dense_latency_ms"] = float(lat["dense"]["median_ms"])
        metrics["hprune/final_latency_ratio"] = float(lat["ratio"])
        metrics["hprune/final_latency_ratio_q1"] = float(lat["ratio_q1"])
        metrics["hprune/final_latency_ratio_q3"] = float(lat["ratio_q3"])
    return metrics


def off_target_message(session: Any, achieved: float) -> str:
    """Why the fit ended more than 2 points from its target, and what to change.

    Short of the target with parts of the model protected or left alone (by its structure: a decoder sharing
    the hidden size, shared layers, shuffled channels, ...), the structure is the limit, and the message names
    those parts; otherwise the step is too coarse (``round_to``) or the layers too capped.
    """
    head = (
        f"Pruning removed {achieved:.1%} of {session.cost.name}, more than 2 points from the target "
        f"{session.target:.1%}"
    )
    graph = getattr(session, "graph", None)
    held = {**getattr(graph, "protected_groups", {}), **getattr(graph, "left_alone", {})}
    if achieved < session.target and held:
        names = sorted(held)
        shown = ", ".join(f"{n} ({held[n]})" for n in names[:3]) + (
            f" and {len(names) - 3} more" if len(names) > 3 else ""
        )
        return (
            f"{head}: the rest of the model reached its limits, and its structure keeps these parts from being "
            f"pruned: {shown}. A smaller `round_to` or a larger `max_layer_ratio` can only help the parts that "
            "are pruned; a lower target fits this model."
        )
    return (
        f"{head}: with round_to={session.round_to} the model's layers are too narrow (or too capped) for a finer "
        "step. Use a smaller `round_to` or a larger `max_layer_ratio`."
    )


def finish(
    trainer: pl.Trainer,
    session: PruningSession,
    model: nn.Module,
    verbose: bool,
    extra: Mapping[str, Any] | None = None,
    png: bool = False,
) -> tuple[dict[str, Any], str] | None:
    """Summarise the fit: measure latency, log the final metrics and figures, write the report (rank 0).

    Every rank calls it; only rank zero measures latency, writes files and prints. ``extra`` entries (e.g. the
    distillation's measured cost) are added to the summary. The figures are written as SVG (pure Python,
    milliseconds); they are drawn as PNG with matplotlib (about a third of a second each) only when ``png``
    asks for the files or a logger takes images (TensorBoard, MLflow, Weights & Biases).

    Returns:
        ``(summary, before/after table)``, or ``None`` when no event ran.

    """
    if not session.ledger.records:
        return None
    final = session.measure(model)
    monitor = session.monitor
    value = None
    if monitor is not None and monitor in trainer.callback_metrics:
        value = float(trainer.callback_metrics[monitor])
    latency = session.final_latency(model) if trainer.is_global_zero else None
    summary = summarize(session, final, value, model, latency, trainer)
    summary.update(extra or {})
    if session.schedule.finished and abs(summary["achieved"] - session.target) > 0.02:
        rank_zero_warn(off_target_message(session, summary["achieved"]))
    for logger in trainer.loggers:
        logger.log_metrics(final_metrics(summary), step=trainer.global_step)
    table = before_after_table(summary)
    if trainer.is_global_zero:
        directory = run_dir(trainer)
        raster = png or any(takes_images(lg) for lg in trainer.loggers)
        files = write_report_files(summary, directory, png=raster)
        send_figures(trainer, {n: p["png"] for n, p in files.figures.items() if "png" in p})
        send_files(trainer, [files.json, files.html])
        if verbose:
            say(trainer, console_summary(summary, table, files.html, directory))
    return summary, table


def structure(session: PruningSession, model: nn.Module) -> dict[str, Any]:
    """The report's ``"structure"``: every group's width before and after, removed modules, per-level totals."""
    graph = session.graph
    groups = graph.groups() if graph is not None and graph.model is model else []
    history = session.ledger.history
    heads = {g.name for g in groups if g.kind == "heads"}
    heads.update(str(h["module"]) for h in history if h.get("op") == "heads")
    removed = session.ledger.removed_modules()
    now = kept_widths(session) if groups else {}
    widths: dict[str, dict[str, Any]] = {}
    for n in session.ledger.original_groups:
        gone = next((b for b in removed if n == b or n.startswith(f"{b}.")), None)
        entry: dict[str, Any] = {
            "before": session.ledger.original_widths.get(n),
            "after": None if gone else now.get(n),
        }
        if n in heads:
            entry["unit"] = "heads"
        if gone is not None:
            entry["removed_with"] = gone
        widths[n] = entry
    cost = session.cost.name
    per_level: dict[str, dict[str, Any]] = {}
    for record in session.ledger.records:
        for lv in record.levels:
            agg = per_level.setdefault(
                lv.level,
                {"channels_removed": 0, "heads_removed": 0, "blocks_removed": [], f"{cost}_removed": 0.0},
            )
            for name, count in lv.removed.items():
                agg["heads_removed" if name in heads else "channels_removed"] += int(count)
            agg["blocks_removed"].extend(lv.blocks)
            agg[f"{cost}_removed"] += lv.saved
    return {"widths": widths, "removed_modules": removed, "levels": per_level}


def before_after_table(summary: Mapping[str, Any], monitor: str | None = None) -> str:
    """The before/after table printed at the end of fit (latency with its spread and verdict)."""
    rows = before_after_rows(summary)
    return text_table(rows, BEFORE_AFTER_COLUMNS)


def console_summary(summary: Mapping[str, Any], table: str, html: str, directory: str) -> str:
    """The end-of-fit summary printed on rank zero."""
    lines = [
        f"[hprune] removed {summary['achieved']:.1%} of {summary['cost']} (target {summary['target']:.1%}) in "
        f"{summary['events']} events",
        _rich_table(summary) or table,
    ]
    lat = summary.get("latency")
    if isinstance(lat, Mapping):
        lines.append(f"latency: {latency_verdict(lat)}")
    for name, lv in summary.get("structure", {}).get("levels", {}).items():
        parts = [f"{lv['channels_removed']} channels"]
        if lv.get("heads_removed"):
            parts.append(f"{lv['heads_removed']} heads")
        if lv.get("blocks_removed"):
            parts.append(f"blocks {', '.join(lv['blocks_removed'])}")
        lines.append(f"level {name}: removed {', '.join(parts)}")
    lines.append(f"report: {html} (figures and hprune_report.json in {directory})")
    lines.append(
        "load the pruned model with lightning_hprune.load_pruned(MyModule, checkpoint); "
        "MyModule.load_from_checkpoint needs lightning_hprune.restore_structure in its on_load_checkpoint"
    )
    return "\n".join(lines)


def _rich_table(summary: Mapping[str, Any]) -> str | None:
    """The before/after table drawn by ``rich`` (as text), when it is installed."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich ships with most Lightning installs
        return None
    table = Table(title="before / after pruning", title_justify="left")
    for key, header in BEFORE_AFTER_COLUMNS:
        table.add_column(header or "quantity", justify="left" if key == "quantity" else "right")
    for row in before_after_rows(summary):
        table.add_row(*(row.get(k, "") for k, _ in BEFORE_AFTER_COLUMNS))
    console = Console(width=120, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(table)
    text = console.export_text()
    console.file.close()
    return text.rstrip()
