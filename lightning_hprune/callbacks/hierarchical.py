"""``HierarchicalPruning``: structured pruning during ``Trainer.fit``, coarse to fine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_hprune.callbacks.base import PruningCallback
from lightning_hprune.core.blocks import BlockLevel
from lightning_hprune.core.levels import GlobalLevel, Level


def default_levels() -> list[Level]:
    """The default hierarchy, coarse to fine, for CNNs and transformers alike.

    1. :class:`~lightning_hprune.core.blocks.BlockLevel` (a quarter of the target): whole residual blocks or
       encoder layers that barely change their input go first. Models without such blocks skip it, and its
       share falls to the next level.
    2. :class:`~lightning_hprune.core.levels.GlobalLevel` (the rest): channels ranked across the whole
       network, scores normalised per layer, no layer losing more than 80 % of its width.
    """
    return [BlockLevel(share=0.25), GlobalLevel(share=0.75)]


class HierarchicalPruning(PruningCallback):
    """Physically prune a model while it trains: fewer channels, parameters and MACs, same output shape.

    Every argument of :class:`~lightning_hprune.callbacks.base.PruningCallback` (``target``, ``cost``,
    ``schedule``, ``start_epoch``, ``end_epoch``, ``monitor``, ``closed_loop``, ...), with the hierarchy
    defaulting to :func:`default_levels`.

    Args:
        levels: the hierarchy, coarse to fine; each level owes its ``share`` of the target (shares are
            normalised) on its own ``schedule`` or the callback's. Default: :func:`default_levels` (whole
            blocks, then channels ranked across the network).
        **kwargs: the arguments of :class:`~lightning_hprune.callbacks.base.PruningCallback`.

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[HierarchicalPruning(target=0.5, monitor="val_acc")])
        trainer.fit(model, datamodule)

    """

    def __init__(self, levels: Sequence[Level] | None = None, **kwargs: Any) -> None:
        super().__init__(levels=default_levels() if levels is None else list(levels), **kwargs)
