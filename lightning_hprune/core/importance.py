"""Criteria: small strategy objects that score the channels of a pruning group.

An importance object is called with a torch-pruning ``Group`` (full indices) and returns a 1-D tensor
with one score per channel of the group's root; a *low* score means *prune first*. Scores are raw
(not normalised); the levels normalise per group when groups compete.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from lightning_hprune.core.validation import check_choice


class Importance(abc.ABC):
    """Base class of every criterion.

    Criteria that need statistics gathered during training (gradients, activations) override the
    optional hooks; the callbacks call them at the right moments, so no criterion runs extra passes.
    """

    #: True when the criterion reads statistics gathered from training steps.
    needs_training_statistics: bool = False

    @abc.abstractmethod
    def __call__(self, group: Any) -> torch.Tensor:
        """Return one score per channel of ``group`` (low = unimportant)."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Forget gathered statistics (called after each pruning event)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _magnitude_target_types() -> list[type]:
    # A fresh list on every call: torch-pruning keeps mutable defaults.
    return [nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm]


class MagnitudeImportance(Importance):
    """Group L1/L2 weight magnitude: the norm of every weight slice a channel owns, averaged over the group.

    Args:
        p: 1 for L1, 2 for L2.

    """

    def __init__(self, p: int = 2) -> None:
        if p not in (1, 2):
            raise ValueError(f"Expected argument `p` to be 1 or 2, but got {p!r}.")
        self.p = p
        self._impl = tp.importance.GroupMagnitudeImportance(
            p=p, group_reduction="mean", normalizer=None, target_types=_magnitude_target_types()
        )

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor:
        """Return the group magnitude of each channel."""
        return self._impl(group).float().cpu()


class RandomImportance(Importance):
    """Random scores: a baseline for benchmarks (seeded for reproducibility)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    def __call__(self, group: Any) -> torch.Tensor:
        """Return uniform random scores."""
        n = len(group[0].idxs)
        return torch.rand(n, generator=self._gen)


IMPORTANCES: dict[str, type[Importance]] = {
    "magnitude": MagnitudeImportance,
    "l1": MagnitudeImportance,
    "l2": MagnitudeImportance,
    "random": RandomImportance,
}


def resolve_importance(importance: Importance | str | None) -> Importance:
    """Accept an ``Importance`` object or a short name (``"l1"``, ``"l2"``, ``"magnitude"``, ``"random"``)."""
    if importance is None:
        return MagnitudeImportance(p=2)
    if isinstance(importance, Importance):
        return importance
    if isinstance(importance, str):
        check_choice("importance", importance, IMPORTANCES)
        if importance == "l1":
            return MagnitudeImportance(p=1)
        return IMPORTANCES[importance]()
    raise ValueError(
        "Expected argument `importance` to be an `Importance` object or one of "
        f"{sorted(IMPORTANCES)}, but got {importance!r} ({type(importance).__name__})."
    )
