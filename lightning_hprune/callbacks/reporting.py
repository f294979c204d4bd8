"""What the pruning callbacks log and report, read from a session (nothing here changes any state).

Each event's record is logged as ``hprune/...`` metrics to every logger; at the end of fit a summary
(before/after, the structure, the events) is logged and written to ``hprune_report.json`` (and
``hprune_curves.png`` when matplotlib is installed) by rank 0.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_hprune.core.ledger import EventRecord
from lightning_hprune.core.session import PruningSession


def log_event(trainer: pl.Trainer, session: PruningSession, record: EventRecord, verbose: bool) -> None:
    """Log one event's record to every logger and, with ``verbose``, print its line (rank 0).

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
    if verbose:
        m = record.measured
        rank_zero_info(
            f"[hprune] event {record.event + 1}/{session.schedule.num_events} at epoch {record.epoch}: removed "
            f"{record.removed:.1%} of {cost} (target so far {record.target:.1%}; final target "
            f"{session.target:.1%}); params {int(m['params']):,}, MACs {int(m['macs']):,}"
            + (f", {monitor}={record.metric:.4f}" if record.metric is not None else "")
            + f" [{record.seconds:.2f}s]"
        )


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
        rank_zero_info(f"[hprune] decision at epoch {entry['epoch']}: {action} - {entry['reason']}")


def summarize(
    session: PruningSession, final: Mapping[str, float], metric: float | None, model: nn.Module
) -> dict[str, Any]:
    """The end-of-fit summary: target, achieved, before/after, the structure and every event, as plain data."""
    cost = session.cost.name
    ledger = session.ledger
    summary: dict[str, Any] = {
        "target": session.target,
        "cost": cost,
        "achieved": 1.0 - final[cost] / ledger.dense(cost),
        "events": session.schedule.position,
        "before": {k[len("dense_") :]: v for k, v in ledger.baseline.items() if k.startswith("dense_")},
        "after": dict(final),
    }
    if session.monitor is not None and metric is not None:
        summary["before"][session.monitor] = ledger.baseline.get("metric")
        summary["after"][session.monitor] = metric
    summary["structure"] = structure(session, model)
    summary["events_log"] = [r.as_dict(session.monitor) for r in ledger.records]
    summary["decisions"] = [dict(d) for d in session.decisions.entries]
    return summary


def finish(
    trainer: pl.Trainer,
    session: PruningSession,
    model: nn.Module,
    verbose: bool,
    extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], str] | None:
    """Summarise the fit: log the final metrics and write the report (rank 0).

    Every rank must call it (``trainer.log_dir`` broadcasts under DDP). ``extra`` entries (e.g. the
    distillation's measured cost) are added to the summary.

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
    summary = summarize(session, final, value, model)
    summary.update(extra or {})
    metrics = {
        "hprune/final_params": final["params"],
        "hprune/final_macs": final["macs"],
        "hprune/final_removed": summary["achieved"],
    }
    if value is not None and monitor is not None:
        metrics[f"hprune/final_{monitor}"] = value
        base = session.ledger.baseline.get("metric")
        if base:
            metrics[f"hprune/final_retained_{monitor}"] = value / base
    if session.schedule.finished and abs(summary["achieved"] - session.target) > 0.02:
        rank_zero_warn(
            f"Pruning removed {summary['achieved']:.1%} of {session.cost.name}, more than 2 points from the "
            f"target {session.target:.1%}: with round_to={session.round_to} the model's layers are too narrow "
            "(or too capped) for a finer step. Use a smaller `round_to` or a larger `max_layer_ratio`."
        )
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    # `trainer.log_dir` broadcasts under DDP: every rank asks, or rank 0 waits forever.
    log_dir = trainer.log_dir or trainer.default_root_dir
    table = before_after_table(summary, monitor)
    if trainer.is_global_zero:
        path = write_report(summary, log_dir)
        if verbose:
            rank_zero_info(
                f"[hprune] removed {summary['achieved']:.1%} of {session.cost.name} (target "
                f"{session.target:.1%}) in {summary['events']} events; report: {path}\n{table}"
            )
    return summary, table


def structure(session: PruningSession, model: nn.Module) -> dict[str, Any]:
    """The report's ``"structure"``: every group's width before and after, removed modules, per-level totals."""
    graph = session.graph
    groups = graph.groups() if graph is not None and graph.model is model else []
    history = session.ledger.history
    now: dict[str, int] = {}
    for g in groups:
        for name in (g.name, *g.outputs):
            now.setdefault(name, g.size)
    heads = {g.name for g in groups if g.kind == "heads"}
    heads.update(str(h["module"]) for h in history if h.get("op") == "heads")
    removed = session.ledger.removed_modules()
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


def before_after_table(summary: Mapping[str, Any], monitor: str | None) -> str:
    """The before/after table printed at the end of fit."""
    before, after = summary["before"], summary["after"]
    rows = [("params", "{:,.0f}"), ("macs", "{:,.0f}"), ("latency_ms", "{:.3f}")]
    if monitor:
        rows.append((monitor, "{:.4f}"))
    lines = [f"{'':<14}{'before':>16}{'after':>16}{'ratio':>10}"]
    for key, fmt in rows:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        ratio = a / b if b else math.nan
        lines.append(f"{key:<14}{fmt.format(b):>16}{fmt.format(a):>16}{ratio:>10.3f}")
    return "\n".join(lines)


def write_report(summary: Mapping[str, Any], log_dir: str) -> str:
    """Write ``hprune_report.json`` (and ``hprune_curves.png`` with matplotlib) into ``log_dir``; return the JSON path."""
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, "hprune_report.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2, default=float)
    if importlib.util.find_spec("matplotlib") is not None:
        from lightning_hprune.report import plot_report

        plot_report(summary, os.path.join(log_dir, "hprune_curves.png"))
    return path
