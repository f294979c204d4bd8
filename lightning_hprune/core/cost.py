"""What a pruning target is measured in: small cost objects (parameters, MACs), and a linear cost model.

A :class:`Cost` measures a model exactly (:meth:`Cost.measure`), estimates how much removing one channel
of each group saves (:meth:`Cost.per_channel`) and what whole modules cost (:meth:`Cost.of_modules`, for
block levels). Exact costs are measured after every step; the per-channel estimate only guides *how many*
channels to select. It ignores the product term when two coupled groups shrink together, so it slightly
over-estimates savings and the engine converges from above in a few rounds.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from lightning_hprune.core.cuts import Cut
from lightning_hprune.core.graph import ChannelGroup, PruningGraph
from lightning_hprune.core.measure import count_macs, count_params


class Cost(abc.ABC):
    """A quantity a pruning target is expressed in (the subclasses' ``name`` is what logs and reports use)."""

    #: Short name: ``"params"``, ``"macs"``, ...
    name: str

    @abc.abstractmethod
    def measure(self, model: nn.Module, example_inputs: Any) -> float:
        """The exact cost of ``model`` (one forward pass of ``example_inputs`` where that matters)."""

    @abc.abstractmethod
    def per_module(self, model: nn.Module, example_inputs: Any) -> Mapping[str, float]:
        """The cost of every module by name (parents include their children; ``""`` is the model)."""

    def per_channel(
        self,
        graph: PruningGraph,
        groups: Sequence[ChannelGroup],
        costs: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """The marginal cost of one unit (channel, or head) of every group.

        A channel of a group costs, in every layer it touches, that layer's cost divided by the layer's width
        along the pruned dimension; a head costs its attention layer's cost (projections and attention
        products) plus the group's layers outside it, divided by the head count.

        Args:
            graph: the model's pruning graph.
            groups: the groups to estimate.
            costs: :meth:`per_module` of the model, when already measured.

        """
        if costs is None:
            costs = self.per_module(graph.model, graph.example_inputs)
        return {g.name: float(g.unit_cost(self, graph, costs)) for g in groups}

    def per_unit_of_layer(
        self, module: nn.Module, name: str, width: int, costs: Mapping[str, float]
    ) -> float:
        """Cost of one of ``width`` channels of a layer (default: the layer's cost divided by ``width``)."""
        return costs.get(name, 0.0) / width

    def per_cut_unit(self, cut: Cut, costs: Mapping[str, float]) -> float:
        """What one unit of a layout group's cut saves (default: the layer's cost per index, for weights)."""
        p = cut.tensor
        if p is None or cut.param != "weight":
            return 0.0
        return costs.get(cut.name, 0.0) / p.shape[cut.dim] * len(cut.units[0])

    def core_share(self, model: nn.Module, module: str, share: float, costs: Mapping[str, float]) -> float:
        """``share`` of what a module costs beyond its children (attention products; none for parameters)."""
        own = costs.get(module, 0.0)
        try:
            children = model.get_submodule(module).named_children()
        except AttributeError:
            return 0.0
        prefix = f"{module}." if module else ""
        return max(0.0, own - sum(costs.get(prefix + n, 0.0) for n, _ in children)) * share

    def of_modules(self, model: nn.Module, names: Sequence[str], example_inputs: Any) -> dict[str, float]:
        """The cost of each named module (what removing it whole saves)."""
        costs = self.per_module(model, example_inputs)
        return {n: float(costs.get(n, 0.0)) for n in names}

    def state_dict(self) -> dict[str, Any]:
        """What the cost measured and must keep across a resume (checkpointed; none for counted costs)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (nothing to restore for counted costs)."""
        del state

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


class ParamsCost(Cost):
    """Number of parameters (shared parameters counted once)."""

    name = "params"

    def measure(self, model: nn.Module, example_inputs: Any) -> float:
        """Count the parameters of ``model``."""
        return float(count_params(model))

    def per_module(self, model: nn.Module, example_inputs: Any) -> dict[str, float]:
        """Parameters of every module (recursively)."""
        return {n: float(count_params(m)) for n, m in model.named_modules()}

    def per_unit_of_layer(
        self, module: nn.Module, name: str, width: int, costs: Mapping[str, float]
    ) -> float:
        """The layer's own parameters along the pruned dimension, divided by ``width``."""
        return sum(p.numel() / width for p in module.parameters(recurse=False) if width in p.shape)


class MacsCost(Cost):
    """Multiply-accumulates of one forward pass of the example input."""

    name = "macs"

    def measure(self, model: nn.Module, example_inputs: Any) -> float:
        """Count the MACs of one forward pass."""
        return float(count_macs(model, example_inputs).total)

    def per_module(self, model: nn.Module, example_inputs: Any) -> dict[str, float]:
        """MACs spent in every module during one forward pass."""
        return {k: float(v) for k, v in count_macs(model, example_inputs).per_module.items()}


#: The costs a target can be given in, by name (``"latency"``:
#: :class:`~lightning_hprune.core.latency_cost.LatencyCost`, imported on use).
COSTS: dict[str, type[Cost]] = {"macs": MacsCost, "params": ParamsCost}


def resolve_cost(cost: Cost | str) -> Cost:
    """Accept a :class:`Cost` object or one of the names in :data:`COSTS` (or ``"latency"``)."""
    if isinstance(cost, Cost):
        return cost
    if cost == "latency":
        from lightning_hprune.core.latency_cost import LatencyCost

        return LatencyCost()
    if isinstance(cost, str) and cost in COSTS:
        return COSTS[cost]()
    raise ValueError(
        f"Expected argument `cost` to be one of {sorted([*COSTS, 'latency'])} or a `Cost` object (e.g. "
        f"`LatencyCost(batch_size=64)`), but got {cost!r} ({type(cost).__name__})."
    )


@dataclass(frozen=True)
class CostModel:
    """The cost of the current model and the marginal cost of one unit of each group."""

    cost: Cost
    total: float
    per_channel: dict[str, float]

    @classmethod
    def of(cls, graph: PruningGraph, groups: Sequence[ChannelGroup], cost: Cost) -> CostModel:
        """Estimate the marginal cost of one unit of every group of ``graph`` (one measurement of the model)."""
        costs = cost.per_module(graph.model, graph.example_inputs)
        total = costs[""] if "" in costs else cost.measure(graph.model, graph.example_inputs)
        return cls(cost=cost, total=float(total), per_channel=cost.per_channel(graph, groups, costs))


def measure_cost(model: nn.Module, example_inputs: Any, cost: Cost | str) -> float:
    """Exact cost of ``model``: see :meth:`Cost.measure`."""
    return resolve_cost(cost).measure(model, example_inputs)


def build_cost_model(graph: PruningGraph, groups: Sequence[ChannelGroup], cost: Cost | str) -> CostModel:
    """The cost model of ``groups`` (see :meth:`CostModel.of`)."""
    return CostModel.of(graph, groups, resolve_cost(cost))
