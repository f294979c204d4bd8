"""Grouped convolutions: channels removed at the same offsets in every convolution group.

A convolution with ``groups=G`` (ResNeXt, RegNet, ...) splits its input and output channels into ``G``
contiguous blocks; its weight is ``[out, in / G, k, k]``. torch-pruning slices such a weight as if every
input channel had its own column, which fails ("INDICES element is out of DATA bounds") or leaves a width
that ``G`` does not divide ("expected weight to be divisible by G"). A channel group that reaches grouped
convolutions is therefore pruned in *units* of ``G`` channels: unit ``j`` is channel ``j`` of every block
(offsets ``j, C/G + j, 2 C/G + j, ...``), so every block loses the same offsets, ``groups`` stays ``G``
and the convolution keeps ``C/G - k`` channels per block (the convention of torch-pruning's own
``MetaPruner``). When several grouped convolutions with different ``G`` meet in one channel group, the
unit spans ``lcm`` of their counts. Whole convolution groups are never removed (that would couple the
input and output channel groups of the convolution).

A channel group is left alone, with the reason recorded, when its channels reach a grouped convolution
through a reshape or concatenation (its numbering is not the convolution's), when ``lcm`` of the group
counts does not divide its width, or when a block has a single channel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from lightning_hprune.core.graph import ChannelGroup


def is_grouped_conv(module: Any) -> bool:
    """A convolution with ``1 < groups`` that torch-pruning does not treat as depthwise."""
    if not isinstance(module, nn.modules.conv._ConvNd) or module.groups <= 1:
        return False
    return not (module.groups == module.out_channels and module.out_channels > 1)


@dataclass(frozen=True)
class GroupedChannelGroup(ChannelGroup):
    """A channel group reaching grouped convolutions: its units are ``per_unit`` channels at one offset.

    Attributes:
        per_unit: channels per unit (``lcm`` of the group counts of the convolutions it reaches).

    """

    per_unit: int = 1

    @property
    def align(self) -> int | None:
        """Unused: :meth:`aligned` derives the step from ``round_to`` and ``per_unit``."""
        return 1

    @property
    def kind(self) -> str:
        """``"channels"``: the units compete with the other channel groups."""
        return "channels"

    def aligned(self, round_to: int) -> int:
        """Kept widths are multiples of ``round_to`` channels: a multiple of this many units."""
        return round_to // math.gcd(round_to, self.per_unit)

    def unit_cost(self, cost: Any, graph: Any, costs: Mapping[str, float]) -> float:
        """``per_unit`` channels' worth of the group's cost."""
        return self.per_unit * super().unit_cost(cost, graph, costs)

    def channels(self, units: list[int]) -> list[int]:
        """The channel indices (the root's numbering) of ``units``."""
        return sorted(c for u in units for c in self.units[u])  # type: ignore[index]


def grouped_units(group: Any, dg: Any) -> tuple[tuple[tuple[int, ...], ...], int] | str | None:
    """The units of a torch-pruning ``group`` that reaches grouped convolutions, or why it cannot be pruned.

    Returns:
        ``None`` when the group reaches no grouped convolution; ``(units, per_unit)`` when it can be pruned
        in units; otherwise the reason it is left alone.

    """
    width = len(group[0].idxs)
    counts: list[int] = []
    for dep, idxs in group:
        module = dep.target.module
        if not is_grouped_conv(module):
            continue
        own = module.out_channels if dg.is_out_channel_pruning_fn(dep.handler) else module.in_channels
        if own != width or list(idxs) != list(range(width)):
            return (
                f"its channels reach the grouped convolution {type(module).__name__}(groups={module.groups}) "
                "through a reshape or concatenation, so whole blocks of it cannot be kept consistent"
            )
        counts.append(int(module.groups))
    if not counts:
        return None
    per_unit = math.lcm(*counts)
    if width % per_unit:
        return f"its width {width} is not a multiple of the convolution group counts {sorted(set(counts))}"
    stride = width // per_unit
    if stride < 2:
        return f"its grouped convolutions (groups={sorted(set(counts))}) have one channel per group"
    units = tuple(tuple(t * stride + j for t in range(per_unit)) for j in range(stride))
    return units, per_unit
