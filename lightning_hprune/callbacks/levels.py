"""One callback per level of the hierarchy: each prunes with a single level and shares the whole lifecycle.

``BlockPruning``, ``GlobalPruning``, ``LayerPruning``, ``UnitPruning`` and ``WindowPruning`` take the
level's own arguments (and its ``share``) plus every argument of
:class:`~lightning_hprune.callbacks.base.PruningCallback` (``target``, ``cost``, ``schedule``,
``start_epoch``, ...). Several of them on one Trainer cooperate: they compose into one hierarchy, coarse to
fine in the order they are listed, with one graph, one schedule and one report, exactly as
``HierarchicalPruning(levels=[...])`` with the same levels; settings they disagree on are refused in
``setup``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_hprune.callbacks.base import PruningCallback
from lightning_hprune.core.blocks import BlockLevel
from lightning_hprune.core.levels import GlobalLevel, LayerLevel, Level, UnitLevel, WindowLevel


class _SingleLevelPruning(PruningCallback):
    """A pruning callback whose every event runs one level (composable with other pruning callbacks)."""

    @property
    def level(self) -> Level:
        """The callback's level."""
        return self.levels[0]

    @property
    def state_key(self) -> str:
        """Two callbacks of one class (with different levels) can coexist on a Trainer."""
        return self._generate_state_key(target=self.target, cost=self.cost, level=repr(self.level))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r}, cost={self.cost!r}, level={self.level!r})"


class BlockPruning(_SingleLevelPruning):
    """Depth pruning during fit: whole residual blocks / transformer layers are replaced by the identity.

    Blocks are coarse: the target is met only as far as whole blocks fit in it (see the report's
    ``achieved``). See :class:`~lightning_hprune.core.blocks.BlockLevel`.

    Args:
        max_blocks: most blocks removed over the run (default: half of the candidates).
        metric: block score, ``"relative"``, ``"cosine"`` or ``"output"``
            (see :func:`~lightning_hprune.core.blocks.block_scores`).
        patterns: module-name globs of the candidate blocks (default: found automatically).
        max_score: never remove a block scoring above this.
        share: the level's share of the target when several pruning callbacks cooperate.
        **kwargs: arguments of :class:`~lightning_hprune.callbacks.base.PruningCallback`.

    """

    def __init__(
        self,
        max_blocks: int | None = None,
        metric: str = "relative",
        patterns: Sequence[str] | None = None,
        max_score: float | None = None,
        share: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            levels=[
                BlockLevel(
                    max_blocks=max_blocks, metric=metric, patterns=patterns, max_score=max_score, share=share
                )
            ],
            **kwargs,
        )


class GlobalPruning(_SingleLevelPruning):
    """Global channel pruning during fit: one ranking over all layers, scores normalised per layer.

    Args:
        max_layer_ratio: no layer loses more than this fraction of its original width.
        share: the level's share of the target when several pruning callbacks cooperate.
        **kwargs: arguments of :class:`~lightning_hprune.callbacks.base.PruningCallback`.

    """

    def __init__(self, max_layer_ratio: float = 0.8, share: float = 1.0, **kwargs: Any) -> None:
        super().__init__(levels=[GlobalLevel(max_layer_ratio=max_layer_ratio, share=share)], **kwargs)


class LayerPruning(_SingleLevelPruning):
    """Layer-wise pruning during fit: uniform, from a pattern -> ratio mapping, or from sensitivities.

    See :class:`~lightning_hprune.core.levels.LayerLevel`.

    Args:
        ratios: module-name pattern -> fraction of the layer's original width to remove.
        sensitivity: module-name pattern -> sensitivity (less sensitive layers lose more).
        max_layer_ratio: no layer loses more than this fraction of its original width.
        share: the level's share of the target when several pruning callbacks cooperate.
        **kwargs: arguments of :class:`~lightning_hprune.callbacks.base.PruningCallback`.

    """

    def __init__(
        self,
        ratios: Mapping[str, float] | None = None,
        sensitivity: Mapping[str, float] | None = None,
        max_layer_ratio: float = 0.8,
        share: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            levels=[
                LayerLevel(
                    ratios=ratios, sensitivity=sensitivity, max_layer_ratio=max_layer_ratio, share=share
                )
            ],
            **kwargs,
        )


class UnitPruning(_SingleLevelPruning):
    """Unit-wise pruning by threshold during fit (absolute, or relative to each layer's max or mean score).

    ``target`` bounds what the threshold may remove. See :class:`~lightning_hprune.core.levels.UnitLevel`.

    Args:
        threshold: the threshold (> 0).
        reference: ``"absolute"``, ``"max"`` or ``"mean"``.
        max_layer_ratio: no layer loses more than this fraction of its original width.
        share: the level's share of the target when several pruning callbacks cooperate.
        **kwargs: arguments of :class:`~lightning_hprune.callbacks.base.PruningCallback`.

    """

    def __init__(
        self,
        threshold: float = 0.5,
        reference: str = "mean",
        max_layer_ratio: float = 0.8,
        share: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            levels=[
                UnitLevel(
                    threshold=threshold, reference=reference, max_layer_ratio=max_layer_ratio, share=share
                )
            ],
            **kwargs,
        )


class WindowPruning(_SingleLevelPruning):
    """Window-wise pruning during fit: contiguous windows of ``window_size`` units are removed together.

    See :class:`~lightning_hprune.core.levels.WindowLevel`.

    Args:
        window_size: units per window; kept widths are multiples of ``lcm(window_size, round_to)``.
        reduce: window score from its units' scores, ``"mean"``, ``"sum"`` or ``"max"``.
        max_layer_ratio: no layer loses more than this fraction of its original width.
        share: the level's share of the target when several pruning callbacks cooperate.
        **kwargs: arguments of :class:`~lightning_hprune.callbacks.base.PruningCallback`.

    """

    def __init__(
        self,
        window_size: int = 8,
        reduce: str = "mean",
        max_layer_ratio: float = 0.8,
        share: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            levels=[
                WindowLevel(
                    window_size=window_size, reduce=reduce, max_layer_ratio=max_layer_ratio, share=share
                )
            ],
            **kwargs,
        )
