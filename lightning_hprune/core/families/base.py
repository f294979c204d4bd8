"""What every layout family shares: slots, layout groups, slicing parameters, and the ``Family`` protocol.

A **slot** is one place where units can be removed: the FFN of layer 3, the query heads that share key/value
group 1 of layer 3, the hidden size of the whole model. It lists the parameter slices (:class:`Cut`) each of
its units owns. A **layout group** (:class:`FamilyGroup`) is what levels see and choose from: one slot, or
several slots *tied* together so that removing ``k`` units removes, in every slot, that slot's ``k``
lowest-scoring units. Tied groups keep a model's widths uniform across layers, so that one config value
describes every layer and the model's own ``from_pretrained`` loads it; their units are interchangeable
(only how many are removed matters), and their scores are the slots' sorted scores averaged by rank.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch_pruning.pruner import function as tp_fn

from lightning_hprune.core.cuts import Cut
from lightning_hprune.core.graph import ChannelGroup
from lightning_hprune.core.importance import Importance

#: Records every slice in the current ``record_parameter_surgery`` (its ``_prune_parameter_and_grad``).
_SLICER = tp_fn.LinearPruner()


def outermost_hf_model(model: nn.Module) -> tuple[str, nn.Module, str] | None:
    """The outermost Hugging Face model in ``model``: its name, the module and its ``config.model_type``."""
    for name, module in model.named_modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(model_type, str) and hasattr(module, "base_model_prefix"):
            return name, module, model_type
    return None


@dataclass(frozen=True, eq=False)
class Slot:
    """One place where units can be removed.

    Attributes:
        name: addressable name (a history step names it), e.g. ``"model.layers.3:ffn"``.
        size: units in the slot.
        cuts: the parameter slices each unit owns.
        per_unit: slot units removed per unit of the layout group (``head_dim`` hidden channels per head when a
            model derives its head size from ``hidden_size / num_heads``).
        core: ``(module name, share)`` of work not in any parameter (attention products): a unit saves ``share``
            of that module's own MACs.

    """

    name: str
    size: int
    cuts: tuple[Cut, ...]
    per_unit: int = 1
    core: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, eq=False)
class FamilyGroup(ChannelGroup):
    """A layout group over one or more tied slots (see the module docstring)."""

    slots: tuple[Slot, ...] = ()
    #: The unit counts the group may keep (``None``: any), e.g. head counts that divide the hidden size.
    allowed: tuple[int, ...] | None = None
    #: Kept widths are multiples of this (with the callback's ``round_to``); ``None``: ``round_to`` only.
    step: int | None = None
    #: Every slot removes the same units (their scores summed), not each its own lowest-scoring ones.
    shared: bool = False
    _ranking: dict[str, list[int]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def align(self) -> int | None:
        """Heads align to 1; channel groups to ``step`` (combined with ``round_to`` by the levels)."""
        return 1 if self.units is not None else self.step

    def allows(self, width: int) -> bool:
        """Whether the group may keep ``width`` units."""
        return self.allowed is None or width in self.allowed

    @property
    def kind_key(self) -> str:
        """The kind of width (``"kv"``, ``"heads"``, ``"ffn"``, ``"hidden"``), also for per-layer groups."""
        return self.name.rsplit(":", 1)[-1] if ":" in self.name else self.name

    def score(self, importance: Importance) -> torch.Tensor:
        """Rank every slot's units by the criterion; the group's own units score their rank (neutral quantiles).

        How unequal the units of one kind are (their normalised spread) says nothing about whether that kind
        matters more than another, and the group's units are interchangeable anyway: they only say *how many*
        to remove, each slot then removing its lowest-scoring ones. So every layout group scores its units
        ``0, 1/(n-1), ..., 1``: levels that rank across groups remove about the same share of every kind, and
        the criterion decides which units go in each layer.
        """
        total: torch.Tensor | None = None
        for slot in self.slots:
            s = importance.score_cuts(slot.cuts).float().flatten()
            if s.numel() != slot.size:
                raise ValueError(
                    f"Expected {slot.size} scores for the units of {slot.name!r}, but the criterion gave {s.numel()}."
                )
            self._ranking[slot.name] = torch.argsort(s, stable=True).tolist()
            if self.shared and slot.per_unit == 1:
                total = s if total is None else total + s
        if total is not None:  # the same units in every slot: ranked by their summed scores
            order = torch.argsort(total, stable=True).tolist()
            for slot in self.slots:
                if slot.per_unit == 1 and slot.size == len(order):
                    self._ranking[slot.name] = order
        return torch.linspace(0.0, 1.0, self.size) if self.size > 1 else torch.zeros(self.size)

    def expand(self, units: Sequence[int]) -> dict[str, list[int]]:
        """What removing ``len(units)`` of this group's units removes in each slot (its lowest-scoring ones)."""
        k = len(units)
        if k == 0:
            return {}
        if not all(slot.name in self._ranking for slot in self.slots):
            raise RuntimeError(f"Layout group {self.name!r} must be scored before its units can be expanded.")
        return {s.name: sorted(self._ranking[s.name][: k * s.per_unit]) for s in self.slots}

    def unit_cost(self, cost: Any, graph: Any, costs: Mapping[str, float]) -> float:
        """What one unit of this group saves: every slot's cuts (and attention work), ``per_unit`` times."""
        total = 0.0
        for slot in self.slots:
            per = sum(cost.per_cut_unit(c, costs) for c in slot.cuts)
            for module, share in slot.core:
                per += cost.core_share(graph.model, module, share, costs)
            total += per * slot.per_unit
        return total


# ---------------------------------------------------------------------- cuts and slicing
def weight_dim(module: nn.Module, role: str) -> int:
    """The weight dimension of a projection's outputs (``"out"``) or inputs (``"in"``): HF ``Conv1D`` is ``[in, out]``."""
    if type(module).__name__ == "Conv1D":
        return 1 if role == "out" else 0
    return 0 if role == "out" else 1


def proj_cuts(name: str, module: nn.Module, role: str, units: Sequence[Sequence[int]]) -> list[Cut]:
    """Cuts of a projection's output rows (``role="out"``, with the bias) or input columns (``"in"``).

    Works for ``nn.Linear``, ungrouped ``nn.Conv2d`` (weight ``[out, in, kh, kw]``) and Hugging Face ``Conv1D``.
    """
    u = tuple(tuple(x) for x in units)
    cuts = [Cut(module, name, "weight", weight_dim(module, role), role, u)]
    if role == "out" and module._parameters.get("bias") is not None:
        cuts.append(Cut(module, name, "bias", 0, role, u))
    return cuts


def norm_cuts(name: str, module: nn.Module, units: Sequence[Sequence[int]]) -> list[Cut]:
    """Cuts of a norm's weight and bias (those it has)."""
    u = tuple(tuple(x) for x in units)
    return [
        Cut(module, name, pname, 0, "norm", u)
        for pname in ("weight", "bias")
        if module._parameters.get(pname) is not None
    ]


def slice_parameters(removals: Sequence[tuple[Cut, Sequence[int]]]) -> None:
    """Remove the indices of every cut's parameter (each tensor sliced once, tied parameters stay tied).

    A parameter shared by several modules (an output layer tied to the input embeddings) must be cut in each
    of them: the cuts merge, the tensor is sliced once, and every module gets the same new parameter. A tensor
    cut along two dimensions (a ``hidden x hidden`` pooler) is sliced along each in turn.

    Args:
        removals: ``(cut, indices along cut.dim)`` pairs.

    """
    by_tensor: dict[int, tuple[nn.Parameter, dict[int, set[int]]]] = {}
    for cut, idxs in removals:
        p = cut.tensor
        if p is None or not len(idxs):
            continue
        entry = by_tensor.setdefault(id(p), (p, {}))  # type: ignore[arg-type]
        entry[1].setdefault(cut.dim, set()).update(int(i) for i in idxs)
    modules = list({id(c.module): c.module for c, _ in removals}.values())
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in modules:
        for pname, q in module._parameters.items():
            if q is not None and id(q) in by_tensor:
                owners.setdefault(id(q), []).append((module, pname))
    for key, (p, dims) in by_tensor.items():
        new = p
        for dim, drop in sorted(dims.items()):
            keep = [i for i in range(new.shape[dim]) if i not in drop]
            new = _SLICER._prune_parameter_and_grad(new, keep, dim)
        for module, pname in owners.get(key, []):
            module._parameters[pname] = new
    for module in modules:
        fix_attributes(module)


def fix_attributes(module: nn.Module) -> None:
    """Set a layer's size attributes from its (sliced) parameters."""
    w = module._parameters.get("weight")
    if w is None:
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(w.shape[0]), int(w.shape[1])
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = int(w.shape[0]), int(w.shape[1])
    elif isinstance(module, nn.Conv2d):
        module.out_channels, module.in_channels = int(w.shape[0]), int(w.shape[1]) * module.groups
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = (int(w.shape[0]),)
    elif type(module).__name__ == "Conv1D" and w.dim() == 2:
        module.nf = int(w.shape[1])  # type: ignore[assignment]


# ---------------------------------------------------------------------- the protocol
class Family(abc.ABC):
    """A known model layout: its groups, how to prune them, how to remove a layer, how to keep the config true."""

    #: Short name for messages and reports.
    name: str = "family"

    @classmethod
    @abc.abstractmethod
    def detect(cls, model: nn.Module) -> Family | None:
        """An instance for ``model`` when it has this layout, else ``None``."""

    @abc.abstractmethod
    def groups(self, model: nn.Module, uniform: bool, ignored: Sequence[nn.Module] = ()) -> list[FamilyGroup]:
        """The layout groups of the model as it is now (tied across layers with ``uniform``)."""

    @abc.abstractmethod
    def slots(self, model: nn.Module) -> dict[str, Slot]:
        """Every slot of the model as it is now, by name."""

    def prune(self, model: nn.Module, removals: Mapping[str, Sequence[int]]) -> None:
        """Remove units of slots (``{slot name: unit indices}``), then bring the config up to date."""
        slots = self.slots(model)
        pairs: list[tuple[Cut, list[int]]] = []
        for name, units in removals.items():
            slot = slots[name]
            for cut in slot.cuts:
                pairs.append((cut, [i for u in units for i in cut.units[int(u)]]))
        slice_parameters(pairs)
        self.sync(model)

    @abc.abstractmethod
    def layers(self, model: nn.Module) -> list[str]:
        """Names of the model's removable layers (children of its layer list), in order."""

    def removable_layers(self, model: nn.Module) -> list[str]:
        """The layers :meth:`remove_layers` accepts (default: every layer)."""
        return self.layers(model)

    def can_remove_layers(self, model: nn.Module, names: Sequence[str]) -> bool:
        """Whether :meth:`remove_layers` accepts ``names`` together (default: some layer is left)."""
        return len(set(names)) < len(self.layers(model))

    @abc.abstractmethod
    def remove_layers(self, model: nn.Module, names: Sequence[str]) -> None:
        """Remove whole layers from the layer list; renumber what the model indexes by layer; update the config."""

    @abc.abstractmethod
    def sync(self, model: nn.Module) -> None:
        """Set the config and the modules' size attributes from the parameters' shapes."""

    def uniform(self, model: nn.Module) -> bool:
        """Whether every layer has the same widths (what one config value can describe)."""
        return True

    def mismatches(self, model: nn.Module) -> list[str]:
        """What the config says that the modules contradict (default: nothing known)."""
        return []

    def describe(self) -> str:
        """One line for logs."""
        return self.name
