"""One-time sensitivity analysis: how much the metric suffers when one layer alone is pruned.

For every prunable group, the ``fraction`` of its channels that score lowest is removed, the metric is
measured on a few validation batches, and the model is restored with a zero-copy
:class:`~lightning_hprune.core.undo.Snapshot` (the one undo mechanism every pruning step uses). The result, ``{group name: drop}``, plugs into
``LayerLevel(sensitivity=...)``; :func:`sensitivity_ratios` turns it into explicit per-layer ratios for
``LayerLevel(ratios=...)``. :func:`cached_sensitivity` stores it as JSON (for example in the log
directory) and reuses it when the file matches, so a resumed run does not measure again.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_hprune.core.graph import (
    PruningGraph,
    call_model,
    model_device_dtype,
    move_to,
    preserved_modes,
)
from lightning_hprune.core.importance import Importance, MagnitudeImportance
from lightning_hprune.core.undo import Snapshot
from lightning_hprune.core.validation import check_choice, check_fraction, check_int

Evaluate = Callable[[nn.Module], float]
#: ``progress(done, total, group, drop)``: called after each group is measured (for a progress line).
Progress = Callable[[int, int, str, float], None]
CACHE_VERSION = 1


@dataclass(frozen=True)
class SensitivityAnalysis:
    """Settings of the one-time analysis a pruning callback runs before its first event.

    The callback measures on the first ``batches`` validation batches, caches the result as
    ``hprune_sensitivity.json`` in the log directory and in its checkpointed state, and hands it to every
    ``LayerLevel`` given neither ``ratios`` nor ``sensitivity``.

    Attributes:
        fraction: share of one group's channels removed to measure its sensitivity, in (0, 1).
        batches: validation batches per measurement.
        metric: ``"accuracy"`` (classification, higher is better) or ``"loss"`` (cross-entropy).

    """

    fraction: float = 0.3
    batches: int = 2
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        check_fraction("fraction", self.fraction)
        check_int("batches", self.batches, minimum=1)
        check_choice("metric", self.metric, ("accuracy", "loss"))

    @property
    def mode(self) -> str:
        """``"max"`` for accuracy, ``"min"`` for the loss."""
        return "max" if self.metric == "accuracy" else "min"

    def settings(self) -> dict[str, Any]:
        """What must match for a cached analysis to be reused."""
        return {"fraction": self.fraction, "batches": self.batches, "metric": self.metric}


def batch_metric(batches: Sequence[Any], metric: str = "accuracy") -> Evaluate:
    """An evaluator over ``(input, target)`` batches: ``"accuracy"`` or ``"loss"`` (cross-entropy).

    The model runs in eval mode without gradients, on the device of its parameters. Higher is better
    for accuracy, lower for the loss (use ``mode="min"`` with it).
    """
    check_choice("metric", metric, ("accuracy", "loss"))
    if not batches:
        raise ValueError(
            "Expected argument `batches` to hold at least one (input, target) batch, but got none."
        )
    for b in batches:
        if not (isinstance(b, (tuple, list)) and len(b) >= 2 and isinstance(b[1], torch.Tensor)):
            raise ValueError(
                f"Expected every batch to be an (input, target) pair, but got a {type(b).__name__}. Pass "
                "your own `evaluate(model) -> float` for other batch layouts."
            )

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        device, dtype = model_device_dtype(model)
        total, correct, loss = 0, 0.0, 0.0
        with preserved_modes(model):
            model.eval()
            for batch in batches:
                x, y = move_to(batch[0], device, dtype), batch[1].to(device)
                logits = call_model(model, x).float()
                n = y.shape[0]
                total += n
                if metric == "accuracy":
                    correct += float((logits.argmax(-1) == y).sum())
                else:
                    loss += float(F.cross_entropy(logits, y, reduction="sum"))
        return correct / total if metric == "accuracy" else loss / total

    return evaluate


def measure_sensitivity(
    graph: PruningGraph,
    evaluate: Evaluate,
    fraction: float = 0.3,
    importance: Importance | None = None,
    mode: str = "max",
    groups: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Prune ``fraction`` of each group alone, measure, restore; return ``{group: metric drop}``.

    Args:
        graph: the model's pruning graph (the model is left exactly as it was).
        evaluate: ``model -> metric`` on a few validation batches.
        fraction: share of each group's channels to remove (at least one, never all).
        importance: which channels to remove (default: L2 magnitude). Must not need statistics.
        mode: ``"max"`` when higher metric values are better, ``"min"`` otherwise; drops are positive
            when the metric gets worse.
        groups: restrict the analysis to these group names (default: every prunable group).
        progress: called after each group as ``progress(done, total, group name, drop)``.

    Returns:
        The drop of the metric for each group (clipped at 0 from below).

    """
    check_fraction("fraction", fraction)
    check_choice("mode", mode, ("max", "min"))
    importance = importance or MagnitudeImportance(p=2)
    if importance.needs_training_statistics or importance.needs_calibration:
        raise ValueError(
            "Expected a criterion without statistics for the sensitivity analysis (e.g. magnitude), but got "
            f"{importance!r}."
        )
    base = float(evaluate(graph.model))
    wanted = None if groups is None else set(groups)
    drops: dict[str, float] = {}
    todo = [g for g in graph.groups() if wanted is None or g.name in wanted]
    for done, g in enumerate(todo, 1):
        k = min(g.size - 1, max(1, math.floor(fraction * g.size)))
        if k < 1:
            continue
        scores = g.score(importance)
        idxs = sorted(torch.argsort(scores.float(), stable=True)[:k].tolist())
        snapshot = Snapshot(graph.model, history=graph.history)
        try:
            graph.prune(g.expand(idxs))
            value = float(evaluate(graph.model))
        finally:
            snapshot.restore()
            graph.invalidate()
        worse = base - value if mode == "max" else value - base
        drops[g.name] = max(0.0, worse) if math.isfinite(worse) else math.inf
        if progress is not None:
            progress(done, len(todo), g.name, drops[g.name])
    return drops


def sensitivity_ratios(
    drops: Mapping[str, float], max_ratio: float = 0.8, smoothing: float = 0.05
) -> dict[str, float]:
    """Per-group pruning ratios from sensitivities: the least sensitive group gets ``max_ratio``.

    Ratios are proportional to ``1 / (drop + eps)`` with ``eps = smoothing * mean(drop)`` (plus a tiny
    constant), so a group twice as sensitive loses about half as much. Infinite drops get ratio 0.
    """
    check_fraction("max_ratio", max_ratio)
    if not drops:
        return {}
    finite = [v for v in drops.values() if math.isfinite(v)]
    eps = smoothing * (sum(finite) / len(finite) if finite else 0.0) + 1e-12
    inverse = {k: (1.0 / (v + eps) if math.isfinite(v) else 0.0) for k, v in drops.items()}
    top = max(inverse.values())
    if top <= 0:
        return dict.fromkeys(drops, 0.0)
    return {k: max_ratio * v / top for k, v in inverse.items()}


def cached_sensitivity(
    path: str | os.PathLike[str],
    measure: Callable[[], dict[str, float]],
    settings: Mapping[str, Any],
    group_names: Sequence[str] = (),
) -> tuple[dict[str, float], bool]:
    """Read the analysis from ``path`` when it was made with the same ``settings``, else measure and write it.

    Args:
        path: the JSON file.
        measure: runs the analysis.
        settings: JSON-serialisable settings that must match for the cache to be reused (fraction, metric,
            criterion, ...).
        group_names: when given, the cache is reused only if it covers every one of these groups.

    Returns:
        ``(drops, reused)``.

    """
    wanted = {"version": CACHE_VERSION, **dict(settings)}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                cached = json.load(f)
        except (OSError, ValueError):
            cached = None
        if (
            isinstance(cached, dict)
            and cached.get("settings") == json.loads(json.dumps(wanted))
            and isinstance(cached.get("drops"), dict)
            and all(n in cached["drops"] for n in group_names)
        ):
            return {str(k): float(v) for k, v in cached["drops"].items()}, True
    drops = measure()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"settings": wanted, "drops": drops}, f, indent=2)
    os.replace(tmp, path)
    return drops, False
