"""Levels of the hierarchy: each turns channel scores and a cost budget into a removal plan.

A level's :meth:`Level.select` returns ``{group name: channel indices to remove}`` whose predicted cost
(from the :class:`~lightning_hprune.core.cost.CostModel`) reaches ``budget``. Widths kept are
multiples of ``round_to`` and never fall under the level's per-layer cap.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lightning_hprune.core.cost import CostModel
from lightning_hprune.core.graph import ChannelGroup
from lightning_hprune.core.validation import check_fraction

Removals = dict[str, list[int]]


@dataclass
class SelectionContext:
    """Everything a level needs to choose channels.

    Attributes:
        groups: prunable groups of the current model.
        scores: raw importance per group (one score per channel, low = prune first).
        cost: marginal cost per channel of every group.
        original_size: width of every group before any pruning (for caps).
        round_to: kept widths are multiples of this.
        model: the model being pruned.
        calibration: recent training inputs (CPU tensors) for levels that score on data.

    """

    groups: Sequence[ChannelGroup]
    scores: dict[str, torch.Tensor]
    cost: CostModel
    original_size: dict[str, int]
    round_to: int = 1
    model: nn.Module | None = None
    calibration: Sequence[Any] = ()
    info: dict[str, float] = field(default_factory=dict)


def min_keep(original: int, current: int, max_layer_ratio: float, round_to: int) -> int:
    """The smallest width a group may keep: the cap, aligned up to ``round_to`` (never above ``current``)."""
    floor = max(1, math.ceil(original * (1.0 - max_layer_ratio) - 1e-9))
    floor = max(floor, round_to)
    floor = int(math.ceil(floor / round_to) * round_to)
    return min(floor, current)


def chunk_sizes(current: int, keep_floor: int, round_to: int) -> list[int]:
    """Sizes of the removable chunks of a group, smallest-score first.

    The first chunk realigns an unaligned width to ``round_to``; every later chunk is ``round_to``
    channels. The chunks never cut below ``keep_floor``.
    """
    sizes: list[int] = []
    width = current
    first = width % round_to
    if first and width - first >= keep_floor:
        sizes.append(first)
        width -= first
    while width - round_to >= keep_floor:
        sizes.append(round_to)
        width -= round_to
    return sizes


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """Divide by the group's mean so that layers with different scales compete fairly."""
    scores = scores.float()
    mean = scores.abs().mean()
    return scores / mean if mean > 0 else scores


class Level(abc.ABC):
    """One level of the hierarchy.

    Args:
        share: this level's share of the overall target when levels are composed.
        max_layer_ratio: no group loses more than this fraction of its original width.

    """

    name: str = "level"

    def __init__(self, share: float = 1.0, max_layer_ratio: float = 0.8) -> None:
        self.share = check_fraction("share", share, allow_one=True)
        self.max_layer_ratio = check_fraction("max_layer_ratio", max_layer_ratio, allow_one=False)

    @abc.abstractmethod
    def select(self, ctx: SelectionContext, budget: float) -> Removals:
        """Choose channels whose predicted cost reaches ``budget``."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class GlobalLevel(Level):
    """Global channel pruning: one ranking over all groups, scores normalised per group, capped per layer.

    Channels are ranked in chunks of ``round_to`` (the lowest-scoring channels of a group first), so every
    kept width stays aligned.
    """

    name = "global"

    def select(self, ctx: SelectionContext, budget: float) -> Removals:
        """Take the lowest-scoring chunks across the network until ``budget`` is reached."""
        candidates: list[tuple[float, str, list[int]]] = []
        for g in ctx.groups:
            norm = normalise(ctx.scores[g.name])
            order = torch.argsort(norm, stable=True)
            floor = min_keep(
                ctx.original_size.get(g.name, g.size), g.size, self.max_layer_ratio, ctx.round_to
            )
            start = 0
            running: list[int] = []
            for size in chunk_sizes(g.size, floor, ctx.round_to):
                idxs = order[start : start + size].tolist()
                start += size
                running = running + idxs
                # A later chunk is only taken after the earlier ones: rank it by its running mean.
                candidates.append((float(norm[running].mean()), g.name, idxs))
        candidates.sort(key=lambda c: c[0])
        removals: Removals = {}
        spent = 0.0
        for _, name, idxs in candidates:
            if spent >= budget:
                break
            removals.setdefault(name, []).extend(idxs)
            spent += len(idxs) * ctx.cost.per_channel.get(name, 0.0)
        ctx.info["predicted"] = spent
        return removals


class UniformLevel(Level):
    """Layer-wise pruning with one ratio for every group (the ratio is searched to meet the budget)."""

    name = "uniform"

    def select(self, ctx: SelectionContext, budget: float) -> Removals:
        """Find the smallest common ratio whose predicted cost reaches ``budget``."""
        if budget <= 0:
            return {}
        lo, hi = 0.0, 1.0
        best = self._at(ctx, hi)
        for _ in range(30):
            mid = (lo + hi) / 2
            removals = self._at(ctx, mid)
            if self._cost(ctx, removals) >= budget:
                hi, best = mid, removals
            else:
                lo = mid
        ctx.info["ratio"] = hi
        ctx.info["predicted"] = self._cost(ctx, best)
        return best

    @staticmethod
    def _cost(ctx: SelectionContext, removals: Removals) -> float:
        return sum(len(v) * ctx.cost.per_channel.get(k, 0.0) for k, v in removals.items())

    def _at(self, ctx: SelectionContext, ratio: float) -> Removals:
        removals: Removals = {}
        for g in ctx.groups:
            k = ratio_removal(
                g.size, ratio, ctx.original_size.get(g.name, g.size), self.max_layer_ratio, ctx.round_to
            )
            if k:
                removals[g.name] = lowest(ctx.scores[g.name], k)
        return removals


def ratio_removal(current: int, ratio: float, original: int, max_layer_ratio: float, round_to: int) -> int:
    """How many channels to remove from a group of width ``current`` for ``ratio``, aligned and capped."""
    floor = min_keep(original, current, max_layer_ratio, round_to)
    keep = current - math.floor(ratio * current + 1e-9)
    keep = int(math.ceil(keep / round_to) * round_to) if keep > 0 else round_to
    keep = max(keep, floor)
    return max(0, current - keep)


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest scores (stable)."""
    return sorted(torch.argsort(scores.float(), stable=True)[:k].tolist())
