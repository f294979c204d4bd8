"""``HierarchicalPruning``: structured pruning during ``Trainer.fit``, coarse to fine."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, cast

from lightning_hprune.callbacks.base import PruningCallback
from lightning_hprune.core.levels import Level

#: The default hierarchy as class specs, so that ``hprune fit --print_config`` shows it (not ``levels: null``).
DEFAULT_LEVELS: tuple[dict[str, Any], ...] = (
    {"class_path": "lightning_hprune.core.blocks.BlockLevel", "init_args": {"share": 0.25}},
    {"class_path": "lightning_hprune.core.levels.GlobalLevel", "init_args": {"share": 0.75}},
)


def build_level(spec: Level | Mapping[str, Any]) -> Level:
    """A level from a level or a ``{"class_path": ..., "init_args": {...}}`` spec (as YAML writes it)."""
    if isinstance(spec, Level):
        return spec
    if isinstance(spec, Mapping) and isinstance(spec.get("class_path"), str):
        module, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        level = cls(**dict(spec.get("init_args") or {}))
        if isinstance(level, Level):
            return level
    raise ValueError(
        f"Expected every entry of argument `levels` to be a `Level` or a class_path spec of one, but got {spec!r}."
    )


def default_levels() -> list[Level]:
    """The default hierarchy, coarse to fine, for CNNs and transformers alike.

    1. :class:`~lightning_hprune.core.blocks.BlockLevel` (a quarter of the target): whole residual blocks or
       encoder layers that barely change their input go first. Models without such blocks skip it, and its
       share falls to the next level.
    2. :class:`~lightning_hprune.core.levels.GlobalLevel` (the rest): channels ranked across the whole
       network, scores normalised per layer, no layer losing more than 80 % of its width.
    """
    return [build_level(spec) for spec in DEFAULT_LEVELS]


class HierarchicalPruning(PruningCallback):
    """Physically prune a model while it trains: fewer channels, parameters and MACs, same output shape.

    Every argument of :class:`~lightning_hprune.callbacks.base.PruningCallback` (``target``, ``cost``,
    ``schedule``, ``start_epoch``, ``end_epoch``, ``monitor``, ``closed_loop``, ...), with the hierarchy
    defaulting to :func:`default_levels`.

    Args:
        levels: the hierarchy, coarse to fine; each level owes its ``share`` of the target (shares are
            normalised) on its own ``schedule`` or the callback's. Default: :func:`default_levels` (whole
            blocks, then channels ranked across the network), written as class specs
            (:data:`DEFAULT_LEVELS`) so that ``--print_config`` shows them; ``None`` means the default too.
        **kwargs: the arguments of :class:`~lightning_hprune.callbacks.base.PruningCallback`.

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[HierarchicalPruning(target=0.5, monitor="val_acc")])
        trainer.fit(model, datamodule)

    """

    def __init__(
        self,
        levels: Sequence[Level] | None = cast(Sequence[Level], DEFAULT_LEVELS),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            levels=default_levels()
            if levels is None
            else [build_level(lv) if isinstance(lv, Mapping) else lv for lv in levels],
            **kwargs,
        )
