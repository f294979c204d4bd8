"""A linear cost model: how much MACs or parameters removing one channel of a group saves.

Exact costs are measured after every step (:mod:`lightning_hprune.core.measure`); this model only
guides *how many* channels to select. It ignores the product term when two coupled groups shrink
together, so it slightly over-estimates savings and the engine converges from above in a few rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from lightning_hprune.core.graph import ChannelGroup, PruningGraph
from lightning_hprune.core.measure import MacsReport, count_macs, count_params

COSTS = ("macs", "params")


@dataclass(frozen=True)
class CostModel:
    """Cost of the current model and the marginal cost of one channel of each group."""

    kind: str
    total: float
    per_channel: dict[str, float]


def measure_cost(model: nn.Module, example_inputs: Any, kind: str) -> float:
    """Exact cost of ``model``: MACs of one forward of ``example_inputs``, or its parameter count."""
    if kind == "params":
        return float(count_params(model))
    return float(count_macs(model, example_inputs).total)


def build_cost_model(
    graph: PruningGraph, groups: Sequence[ChannelGroup], kind: str, macs: MacsReport | None = None
) -> CostModel:
    """Estimate the marginal cost of one channel of every group."""
    if kind == "macs" and macs is None:
        macs = count_macs(graph.model, graph.example_inputs)
    dg = graph._dg
    per_channel: dict[str, float] = {}
    for g in groups:
        if g.units is not None:  # attention heads: one head's share of the layer, not per channel
            per_channel[g.name] = _per_head(graph, g, kind, macs)
            continue
        seen: dict[int, float] = {}
        for dep, _ in g.group:
            module = dep.target.module
            if not isinstance(module, nn.Module) or module not in graph._module2name:
                continue
            name = graph._module2name[module]
            is_out = dg.is_out_channel_pruning_fn(dep.handler)
            try:
                n = dg.get_out_channels(module) if is_out else dg.get_in_channels(module)
            except Exception:  # pragma: no cover - exotic layers without a channel count
                n = None
            if not n:
                continue
            if kind == "macs":
                assert macs is not None
                c = macs.per_module.get(name, 0) / n
            else:
                c = sum(p.numel() / n for p in module.parameters(recurse=False) if n in p.shape)
            seen[id(module)] = max(seen.get(id(module), 0.0), c)
        per_channel[g.name] = float(sum(seen.values()))
    total = float(macs.total) if kind == "macs" and macs is not None else float(count_params(graph.model))
    return CostModel(kind=kind, total=total, per_channel=per_channel)


def _per_head(graph: PruningGraph, g: ChannelGroup, kind: str, macs: MacsReport | None) -> float:
    """Cost of one attention head.

    The attention layer's own cost (its projections and the attention products) plus the group's layers
    outside it (an output projection in a sibling module), divided by the head count.
    """
    layout = graph.layouts[g.name]
    parent = layout.module
    outside = [m for m in g.modules if parent and m != parent and not m.startswith(parent + ".")]
    if kind == "macs":
        assert macs is not None
        total = macs.per_module.get(layout.module, 0) + sum(macs.per_module.get(m, 0) for m in outside)
    else:
        total = count_params(graph.model.get_submodule(layout.module)) + sum(
            count_params(graph.model.get_submodule(m)) for m in outside
        )
    return float(total) / max(1, g.size)
