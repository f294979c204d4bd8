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

    def per_index(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (shaped like the parameter) summed over every dimension but ``dim``, in float32.

        A reduction, not a copy: no full-size temporary (the criteria run on models of any size).
        """
        others = [d for d in range(values.dim()) if d != self.dim]
        v = values.detach()
        return (v.sum(dim=others, dtype=torch.float32) if others else v.float()).cpu()

    def per_unit(self, values: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """Reduce a tensor shaped like the parameter to one value per unit.

        Each index along ``dim`` gets the sum of ``values`` over the other dimensions; a unit gets the mean
        (or the sum) of its indices' values.
        """
        return self.units_of(self.per_index(values), reduce)

    def units_of(self, per_index: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """One value per unit from one value per index along ``dim`` (mean or sum over the unit's indices)."""
        out = per_index.float()[torch.as_tensor(self.units, dtype=torch.long)]
        return out.sum(1) if reduce == "sum" else out.mean(1)

    def norms(self, p: int) -> torch.Tensor:
        """``sum |w|^p`` per unit's index (mean over the unit's indices), without materialising ``|w|^p``."""
        w = self.tensor
        assert w is not None
        others = [d for d in range(w.dim()) if d != self.dim]
        if not others:
            per = w.detach().float().abs().pow(p)
        else:
            per = torch.linalg.vector_norm(w.detach(), ord=p, dim=others).float().pow(p)
        return self.units_of(per.cpu())


def weight_cuts(cuts: Sequence[Cut]) -> list[Cut]:
    """The cuts of weights (biases carry little signal for criteria)."""
    return [c for c in cuts if c.param == "weight" and c.tensor is not None]
