"""``Cut``: the slice of one parameter that each unit of a layout group owns.

Layout groups (:mod:`lightning_hprune.core.families`) are built from a model's known structure rather than
traced: each says, for every parameter it touches, along which dimension and at which indices each of its
units (a channel, an attention head, a key/value group) lives. Criteria score such groups from their cuts
(:meth:`~lightning_hprune.core.importance.Importance.score_cuts`); the family slices the parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

#: What a cut's parameter does with the group's channels.
ROLES = ("out", "in", "norm", "embed")


@dataclass(frozen=True, eq=False)
class Cut:
    """The slice of ``module.<param>`` along ``dim`` that each unit owns.

    Attributes:
        module: the module holding the parameter.
        name: the module's name in the model.
        param: ``"weight"`` or ``"bias"``.
        dim: the parameter's dimension the units index.
        role: ``"out"`` (the layer produces the channels), ``"in"`` (it reads them), ``"norm"`` (it scales
            them) or ``"embed"`` (an embedding table's vectors).
        units: for every unit, the indices along ``dim`` it owns (all units own as many).

    """

    module: nn.Module
    name: str
    param: str
    dim: int
    role: str
    units: tuple[tuple[int, ...], ...]

    @property
    def tensor(self) -> torch.Tensor | None:
        """The parameter (``None`` when the module has none of that name)."""
        return self.module._parameters.get(self.param)

    def per_unit(self, values: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """Reduce a tensor shaped like the parameter to one value per unit.

        Each index along ``dim`` gets the sum of ``values`` over the other dimensions; a unit gets the mean
        (or the sum) of its indices' values.
        """
        v = values.detach().float()
        if v.dim() > 1:
            v = v.transpose(0, self.dim).reshape(v.shape[self.dim], -1).sum(1)
        idx = torch.as_tensor(self.units, dtype=torch.long, device=v.device)
        out = v[idx]
        return (out.sum(1) if reduce == "sum" else out.mean(1)).cpu()


def weight_cuts(cuts: Sequence[Cut]) -> list[Cut]:
    """The cuts of weights (biases carry little signal for criteria)."""
    return [c for c in cuts if c.param == "weight" and c.tensor is not None]
