"""What a :class:`~lightning_hprune.callbacks.base.PruningCallback` logs and reports.

Each event appends a record to ``callback.records`` and logs its ``hprune/...`` metrics; at the end of fit
a summary (before/after, the structure, the events) is logged, kept as ``callback.summary`` and written to
``hprune_report.json`` (and ``hprune_curves.png`` when matplotlib is installed) by rank 0.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_hprune.core.engine import EventResult, level_names

if TYPE_CHECKING:
    from lightning_hprune.callbacks.base import PruningCallback


def log_event(
    callback: PruningCallback,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    k: int,
    fraction: float,
    metric: float | None,
    result: EventResult,
) -> None:
    """Measure the pruned module, append the event's record to ``callback.records`` and log it.

    Args:
        callback: The pruning callback.
        trainer: The Trainer whose loggers receive the ``hprune/...`` metrics.
        pl_module: The module just pruned.
        k: The index of the event.
        fraction: The cumulative fraction of the cost the event aimed at.
        metric: The monitored metric before the event, or None.
        result: What the event did, level by level.

    """
    after = callback._measure(pl_module)
    cost = callback.cost
    dense = callback.baseline[f"dense_{cost}"]
    prev_cost = callback.records[-1][cost] if callback.records else dense
    record: dict[str, Any] = {
        "event": k,
        "epoch": trainer.current_epoch,
        "step": trainer.global_step,
        **after,
        "target": fraction,
        "removed": 1.0 - after[cost] / dense,
        "event_ratio": 1.0 - after[cost] / prev_cost if prev_cost else 0.0,
        "event_time_s": result.seconds,
        "levels": [
            {
                "level": name,
                "removed": dict(r.removed),
                "blocks": list(r.blocks),
                "cost_before": r.cost_before,
                "cost_after": r.cost_after,
                "target_cost": r.target_cost,
            }
            for name, r in zip(level_names(result.levels), result.levels, strict=True)
        ],
    }
    if metric is not None:
        record[callback.monitor or "metric"] = metric
        base = callback.baseline.get("metric")
        record["retained"] = metric / base if base else math.nan
    callback.records.append(record)
    metrics = {f"hprune/{key}": float(v) for key, v in record.items() if isinstance(v, (int, float))}
    # One namespace per level (a repeated level class gets a numeric suffix: global, global_1, ...).
    for name, r in zip(level_names(result.levels), result.levels, strict=True):
        metrics[f"hprune/{name}/channels_removed"] = float(sum(r.removed.values()))
        metrics[f"hprune/{name}/blocks_removed"] = float(len(r.blocks))
        metrics[f"hprune/{name}/{cost}_removed"] = float(r.cost_before - r.cost_after)
        metrics[f"hprune/{name}/{cost}_after"] = float(r.cost_after)
    if metric is not None and callback.monitor:
        metrics[f"hprune/{callback.monitor}"] = metric
        metrics[f"hprune/retained_{callback.monitor}"] = record["retained"]
        metrics.pop("hprune/retained", None)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    if callback.verbose:
        rank_zero_info(
            f"[hprune] event {k + 1}/{callback.num_events} at epoch {trainer.current_epoch}: removed "
            f"{record['removed']:.1%} of {cost} (target so far {fraction:.1%}; final target "
            f"{callback.target:.1%}); params {int(after['params']):,}, MACs {int(after['macs']):,}"
            + (f", {callback.monitor}={metric:.4f}" if metric is not None else "")
            + f" [{result.seconds:.2f}s]"
        )


def finish(callback: PruningCallback, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Summarise the fit: log the final metrics, set ``callback.summary`` and write the report (rank 0).

    Does nothing when no event ran. Every rank must call it (``trainer.log_dir`` broadcasts under DDP).

    Args:
        callback: The pruning callback.
        trainer: The Trainer at the end of fit.
        pl_module: The pruned module.

    """
    if not callback.records:
        return
    final = callback._measure(pl_module)
    cost = callback.cost
    dense = callback.baseline[f"dense_{cost}"]
    summary: dict[str, Any] = {
        "target": callback.target,
        "cost": cost,
        "achieved": 1.0 - final[cost] / dense,
        "events": callback.event_index,
        "before": {k[len("dense_") :]: v for k, v in callback.baseline.items() if k.startswith("dense_")},
        "after": final,
    }
    metrics = {
        "hprune/final_params": final["params"],
        "hprune/final_macs": final["macs"],
        "hprune/final_removed": summary["achieved"],
    }
    monitor = callback.monitor
    if monitor is not None and monitor in trainer.callback_metrics:
        value = float(trainer.callback_metrics[monitor])
        summary["before"][monitor] = callback.baseline.get("metric")
        summary["after"][monitor] = value
        metrics[f"hprune/final_{monitor}"] = value
        if callback.baseline.get("metric"):
            metrics[f"hprune/final_retained_{monitor}"] = value / callback.baseline["metric"]
    if abs(summary["achieved"] - callback.target) > 0.02:
        rank_zero_warn(
            f"{type(callback).__name__} removed {summary['achieved']:.1%} of {cost}, more than 2 points "
            f"from the target {callback.target:.1%}: with round_to={callback.round_to} the model's layers are too "
            "narrow (or too capped) for a finer step. Use a smaller `round_to` or a larger `max_layer_ratio`."
        )
    summary["structure"] = structure(callback, pl_module)
    summary["events_log"] = callback.records
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    # `trainer.log_dir` broadcasts under DDP: every rank asks, or rank 0 waits forever.
    log_dir = trainer.log_dir or trainer.default_root_dir
    if trainer.is_global_zero:
        write_report(callback, trainer, summary, log_dir)
    callback.summary = summary


def structure(callback: PruningCallback, pl_module: pl.LightningModule) -> dict[str, Any]:
    """The report's ``"structure"``: every group's width before and after, removed modules, per-level totals.

    Args:
        callback: The pruning callback.
        pl_module: The pruned module.

    Returns:
        ``{"widths": ..., "removed_modules": ..., "levels": ...}``, plain data.

    """
    groups = callback._graph.groups() if callback._graph is not None else []
    now = {g.name: g.size for g in groups}
    heads = {g.name for g in groups if g.kind == "heads"}
    heads.update(str(h["module"]) for h in callback.history_steps() if h.get("op") == "heads")
    removed = [str(h["module"]) for h in callback.history_steps() if h.get("op") == "identity"]
    widths: dict[str, dict[str, Any]] = {}
    for n, before in callback.original_size.items():
        entry: dict[str, Any] = {"before": before, "after": now.get(n)}
        if n in heads:
            entry["unit"] = "heads"
        gone = next((b for b in removed if n == b or n.startswith(f"{b}.")), None)
        if gone is not None:
            entry["removed_with"] = gone
        widths[n] = entry
    per_level: dict[str, dict[str, Any]] = {}
    for record in callback.records:
        for entry in record.get("levels", []):
            agg = per_level.setdefault(
                entry["level"],
                {
                    "channels_removed": 0,
                    "heads_removed": 0,
                    "blocks_removed": [],
                    f"{callback.cost}_removed": 0.0,
                },
            )
            for name, count in entry.get("removed", {}).items():
                agg["heads_removed" if name in heads else "channels_removed"] += int(count)
            agg["blocks_removed"].extend(entry.get("blocks", []))
            agg[f"{callback.cost}_removed"] += float(entry["cost_before"]) - float(entry["cost_after"])
    return {"widths": widths, "removed_modules": removed, "levels": per_level}


def write_report(
    callback: PruningCallback, trainer: pl.Trainer, summary: dict[str, Any], log_dir: str | None = None
) -> None:
    """Write ``hprune_report.json`` (and the curves), print the before/after table, set ``callback.report_table``.

    Args:
        callback: The pruning callback.
        trainer: The Trainer (its log directory is the default place).
        summary: The summary built by :func:`finish`.
        log_dir: Where to write; defaults to the Trainer's log directory.

    """
    log_dir = log_dir or trainer.log_dir or trainer.default_root_dir
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, "hprune_report.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2, default=float)
    if importlib.util.find_spec("matplotlib") is not None:
        from lightning_hprune.report import plot_report

        plot_report(summary, os.path.join(log_dir, "hprune_curves.png"))
    before, after = summary["before"], summary["after"]
    rows = [("params", "{:,.0f}"), ("macs", "{:,.0f}"), ("latency_ms", "{:.3f}")]
    if callback.monitor:
        rows.append((callback.monitor, "{:.4f}"))
    lines = [f"{'':<14}{'before':>16}{'after':>16}{'ratio':>10}"]
    for key, fmt in rows:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        ratio = a / b if b else math.nan
        lines.append(f"{key:<14}{fmt.format(b):>16}{fmt.format(a):>16}{ratio:>10.3f}")
    text = "\n".join(lines)
    if callback.verbose:
        rank_zero_info(
            f"[hprune] removed {summary['achieved']:.1%} of {callback.cost} (target {callback.target:.1%}) in "
            f"{summary['events']} events; report: {path}\n{text}"
        )
    callback.report_table = text
