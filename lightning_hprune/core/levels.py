"""Levels of the hierarchy: each turns scores and a cost budget into a removal plan.

Every level implements one method, :meth:`Level.plan`: given a :class:`SelectionContext` (the model's
current groups, their scores, what a unit of each costs, the original widths, ...) and a budget (the cost
to remove in this round), it returns a :class:`Plan` that the engine agrees on across processes and
applies, without knowing which kind of level made it.

* :class:`ChannelLevel` levels remove channels (or attention heads): their :meth:`ChannelLevel.select`
  returns ``{group name: unit indices}`` (a :class:`ChannelPlan`). Widths kept are multiples of
  ``round_to`` and never fall under the level's per-layer cap.
* :class:`ModuleLevel` levels remove whole modules: their :meth:`ModuleLevel.select` returns module names
  (a :class:`ModulePlan`), replaced by a :class:`~lightning_hprune.core.graph.SkippedBlock`.

See "Writing a level" in ``docs/levels.md``.
"""

from __future__ import annotations

import abc
import fnmatch
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
import torch.nn as nn

from lightning_hprune.core.cost import Cost, CostModel
from lightning_hprune.core.graph import ChannelGroup, PruningGraph
from lightning_hprune.core.importance import Importance, normalise_scores
from lightning_hprune.core.optim_state import ParameterSurgery
from lightning_hprune.core.schedules import SCHEDULES
from lightning_hprune.core.validation import check_choice, check_fraction, check_int, check_positive

Removals = dict[str, list[int]]
#: Makes every process use the same plan data (e.g. rank 0's, broadcast).
Agree = Callable[[Any], Any]


class SelectionContext:
    """Everything a level may use to choose what to remove in one round.

    The engine builds it over the live model; ``groups``, ``scores`` and ``cost`` are computed on first
    use, so a level that removes whole modules never pays for channel scores. Tests and custom engines can
    give them directly.

    Attributes:
        groups: prunable groups of the current model.
        scores: raw importance per group (one score per unit, low = prune first).
        cost: the cost of the model and the marginal cost of one unit of every group.
        original_size: every current group's width before any pruning (for caps).
        round_to: kept widths are multiples of this.
        model: the model being pruned.
        calibration: recent training inputs (CPU tensors) for levels that score on data.
        example_inputs: the one-sample example input used to trace the model and measure its cost.
        removed_modules: names of the modules already removed whole (earlier events).
        sensitivity: per-layer sensitivities measured by the callback's sensitivity analysis, if any.
        at_least: the budget is a minimum (the schedule's last step): a level that finds nothing within
            the budget should take the selection that closes it with the least overshoot.
        slack: how far past its own budget the level may go without passing the event's overall target (the
            finer levels after it then remove less); 0 for the last level.
        final_slack: how far past its own budget the level may go without passing the whole run's final target
            (the finer levels, at this event and the later ones, then remove less); at least ``slack``, and
            ``slack`` when the engine gives no final target.
        info: what the level reports back (predicted saving, chosen ratio, ...), for logs and tests.

    """

    def __init__(
        self,
        groups: Sequence[ChannelGroup] | None = None,
        scores: Mapping[str, torch.Tensor] | None = None,
        cost: CostModel | None = None,
        original_size: Mapping[str, int] | None = None,
        round_to: int = 1,
        model: nn.Module | None = None,
        calibration: Sequence[Any] = (),
        example_inputs: Any = None,
        removed_modules: Sequence[str] = (),
        sensitivity: Mapping[str, float] | None = None,
        at_least: bool = False,
        slack: float = 0.0,
        final_slack: float | None = None,
        *,
        graph: PruningGraph | None = None,
        importance: Importance | None = None,
        cost_kind: Cost | None = None,
        original: Callable[[ChannelGroup], int] | None = None,
    ) -> None:
        self.round_to = round_to
        self.model = model if model is not None else (graph.model if graph is not None else None)
        self.calibration = calibration
        self.example_inputs = (
            example_inputs if example_inputs is not None or graph is None else graph.example_inputs
        )
        self.removed_modules = list(removed_modules)
        self.sensitivity = None if sensitivity is None else dict(sensitivity)
        self.at_least = at_least
        self.slack = max(0.0, float(slack))
        self.final_slack = self.slack if final_slack is None else max(self.slack, float(final_slack))
        self.info: dict[str, Any] = {}
        self._graph, self._importance, self._cost_kind, self._original = (
            graph,
            importance,
            cost_kind,
            original,
        )
        for key, value in (
            ("groups", groups),
            ("scores", scores),
            ("cost", cost),
            ("original_size", original_size),
        ):
            if value is not None:
                self.__dict__[key] = value  # pre-fills the cached property
        if groups is None and graph is None:
            raise ValueError("Expected `groups` or a `graph` to take them from, but got neither.")

    @cached_property
    def groups(self) -> Sequence[ChannelGroup]:
        """The prunable groups of the current model."""
        assert self._graph is not None
        return self._graph.groups()

    @cached_property
    def scores(self) -> Mapping[str, torch.Tensor]:
        """One raw score per unit of every group (the criterion's channel scores, averaged per head)."""
        if self._importance is None:
            raise ValueError("This SelectionContext was built without a criterion: it has no scores.")
        return {g.name: g.score(self._importance) for g in self.groups}

    @cached_property
    def cost(self) -> CostModel:
        """The cost model of the current groups."""
        if self._graph is None or self._cost_kind is None:
            raise ValueError(
                "This SelectionContext was built without a graph and a cost: it has no cost model."
            )
        return CostModel.of(self._graph, self.groups, self._cost_kind)

    @cached_property
    def original_size(self) -> Mapping[str, int]:
        """Every current group's original width."""
        if self._original is None:
            return {g.name: g.size for g in self.groups}
        return {g.name: self._original(g) for g in self.groups}

    def cost_of_modules(self, names: Sequence[str]) -> dict[str, float]:
        """What removing each named module whole saves."""
        if self.model is None:
            raise ValueError("This SelectionContext was built without a model.")
        kind = self._cost_kind if self._cost_kind is not None else self.cost.cost
        return kind.of_modules(self.model, names, self.example_inputs)

    def align(self, group: ChannelGroup) -> int:
        """Kept widths of ``group`` are multiples of this: ``round_to`` channels (and the group's own step), or 1 head."""
        return group.aligned(self.round_to)

    def concrete(self, removals: Mapping[str, Sequence[int]]) -> Removals:
        """What a level's ``{group: units}`` removes, in the graph's terms.

        A tied layout group expands to its slots: every layer loses its own lowest-scoring units (see
        :mod:`lightning_hprune.core.families`).
        """
        by_name = {g.name: g for g in self.groups}
        out: Removals = {}
        for name, units in removals.items():
            group = by_name.get(name)
            out.update(group.expand(units) if group is not None else {name: [int(u) for u in units]})
        return out


# ---------------------------------------------------------------------- plans
class Plan(abc.ABC):
    """What a level decided to remove in one round; the engine agrees on it and applies it."""

    @abc.abstractmethod
    def __bool__(self) -> bool:
        """Whether the plan removes anything."""

    @abc.abstractmethod
    def agreed(self, agree: Agree) -> Plan:
        """The same kind of plan with ``agree`` applied to its data (every process gets rank 0's)."""

    @abc.abstractmethod
    def apply(self, graph: PruningGraph, surgery: ParameterSurgery | None = None) -> ParameterSurgery:
        """Apply it to the model, all or nothing; return the parameter surgery (recorded into ``surgery``)."""

    @abc.abstractmethod
    def describe(self) -> tuple[dict[str, int], list[str]]:
        """``(units removed per group, modules removed whole)`` for the event's record."""


class ChannelPlan(Plan):
    """Remove units (channels, or heads) of groups: ``{group name: indices in its current numbering}``."""

    def __init__(self, removals: Mapping[str, Sequence[int]]) -> None:
        self.removals: Removals = {k: [int(i) for i in v] for k, v in removals.items() if len(v)}

    def __bool__(self) -> bool:
        """Whether any unit is removed."""
        return bool(self.removals)

    def agreed(self, agree: Agree) -> ChannelPlan:
        """Rank 0's removals on every process."""
        return ChannelPlan(agree(self.removals))

    def apply(self, graph: PruningGraph, surgery: ParameterSurgery | None = None) -> ParameterSurgery:
        """Prune the units (see :meth:`~lightning_hprune.core.graph.PruningGraph.prune`)."""
        return graph.prune(self.removals, surgery)

    def describe(self) -> tuple[dict[str, int], list[str]]:
        """Units per group; no module."""
        return {k: len(v) for k, v in self.removals.items()}, []


class ModulePlan(Plan):
    """Remove whole modules (blocks, layers) by name."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = [str(m) for m in modules]

    def __bool__(self) -> bool:
        """Whether any module is removed."""
        return bool(self.modules)

    def agreed(self, agree: Agree) -> ModulePlan:
        """Rank 0's module names on every process."""
        return ModulePlan(agree(self.modules))

    def apply(self, graph: PruningGraph, surgery: ParameterSurgery | None = None) -> ParameterSurgery:
        """Replace the modules (see :meth:`~lightning_hprune.core.graph.PruningGraph.replace_with_identity`)."""
        graph.replace_with_identity(self.modules)
        return surgery if surgery is not None else ParameterSurgery()

    def describe(self) -> tuple[dict[str, int], list[str]]:
        """No unit; the modules."""
        return {}, list(self.modules)


Allows = Callable[[int], bool]


def _allowed_at_or_above(width: int, ceiling: int, allows: Allows | None) -> int:
    """The smallest allowed width in ``[width, ceiling]`` (``ceiling`` when none is)."""
    if allows is None:
        return width
    return next((w for w in range(width, ceiling + 1) if allows(w)), ceiling)


def min_keep(
    original: int, current: int, max_layer_ratio: float, round_to: int, allows: Allows | None = None
) -> int:
    """The smallest width a group may keep: the cap, aligned up to ``round_to`` (never above ``current``).

    ``allows`` restricts the widths a group may take (``ChannelGroup.allows``: a layout whose config ties its
    head count to the hidden size, grouped convolutions, ...); the floor is then the next allowed width.
    """
    floor = max(1, math.ceil(original * (1.0 - max_layer_ratio) - 1e-9))
    floor = max(floor, round_to)
    floor = int(math.ceil(floor / round_to) * round_to)
    return min(_allowed_at_or_above(floor, current, allows), current)


def chunk_sizes(current: int, keep_floor: int, round_to: int, allows: Allows | None = None) -> list[int]:
    """Sizes of the removable chunks of a group, smallest-score first.

    The first chunk realigns an unaligned width to ``round_to``; every later chunk is ``round_to``
    channels. The chunks never cut below ``keep_floor``. With ``allows``, chunks run between consecutive
    allowed widths (a chunk may then span several aligned steps).
    """
    widths = [current]
    width = current
    first = width % round_to
    if first and width - first >= keep_floor:
        width -= first
        widths.append(width)
    while width - round_to >= keep_floor:
        width -= round_to
        widths.append(width)
    if allows is not None:
        widths = [current] + [w for w in widths[1:] if allows(w)]
    return [a - b for a, b in itertools.pairwise(widths)]


def _equalise_kinds(
    candidates: list[tuple[float, str, list[int]]], ctx: SelectionContext
) -> list[tuple[float, str, list[int]]]:
    """Compare chunks of different kinds of units by their rank within their own kind.

    Within one kind (channels of every layer, heads of every layer, a transformer's FFN width ...) the
    normalised scores rank units across layers. Across kinds they do not: how unequal the units of one kind
    are says nothing about whether that kind matters more than another (a group of four heads has a narrow
    spread, an MLP of 1,536 channels a long tail). So when several kinds compete, each chunk's key becomes its
    rank quantile within its kind, and every kind loses about the same share of its units. With one kind (a
    CNN) the order is unchanged.
    """
    kinds = {g.name: g.kind_key for g in ctx.groups}
    if len({kinds.get(name, "") for _, name, _ in candidates}) <= 1:
        return candidates
    by_kind: dict[str, list[int]] = {}
    for i, (_, name, _) in enumerate(candidates):
        by_kind.setdefault(kinds.get(name, ""), []).append(i)
    out = list(candidates)
    for members in by_kind.values():
        order = sorted(members, key=lambda i: candidates[i][0])  # stable: a group's chunks keep their order
        n = len(order)
        for rank, i in enumerate(order):
            _, name, idxs = candidates[i]
            out[i] = ((rank + 0.5) / n, name, idxs)
    return out


def take_cheapest(
    candidates: list[tuple[float, str, list[int]]], ctx: SelectionContext, budget: float
) -> Removals:
    """Take ``(rank key, group, indices)`` chunks, lowest key first, until their predicted cost reaches ``budget``.

    When the chunks come from groups of different kinds (``ChannelGroup.kind_key``), keys are first turned into
    ranks within each kind (see :func:`_equalise_kinds`).

    Within a group, chunks must be listed in the order they may be taken (their keys never decrease), so
    that alignment chunks come before the chunks that rely on them. A chunk that would overshoot the budget
    by more than it closes is skipped (with the rest of its group). With ``ctx.at_least`` (the
    engine's last resort when the budget is a minimum), the budget is then closed with the least overshoot:
    among the next chunk of every group, the cheapest that closes the gap (or the largest, repeatedly).
    Writes the predicted saving to ``ctx.info["predicted"]``.
    """
    candidates = sorted(_equalise_kinds(candidates, ctx), key=lambda c: c[0])
    per_channel = ctx.cost.per_channel
    costs = [len(idxs) * per_channel.get(name, 0.0) for _, name, idxs in candidates]
    taken = [False] * len(candidates)
    removals: Removals = {}
    spent = 0.0

    def take(i: int) -> None:
        nonlocal spent
        taken[i] = True
        removals.setdefault(candidates[i][1], []).extend(candidates[i][2])
        spent += costs[i]

    closed: set[str] = set()  # groups whose next chunk was skipped: their later chunks must wait too
    for i, (_, name, _) in enumerate(candidates):
        if spent >= budget:
            break
        if name in closed:
            continue
        if spent + costs[i] - budget > budget - spent:
            # Taking this chunk would overshoot by more than it closes: try cheaper chunks instead.
            closed.add(name)
            continue
        take(i)
    if ctx.at_least:
        while spent < budget:
            nxt: dict[str, int] = {}
            for i, (_, name, _) in enumerate(candidates):
                if not taken[i] and name not in nxt:
                    nxt[name] = i
            if not nxt:
                break
            left = budget - spent
            closing = [i for i in nxt.values() if costs[i] >= left]
            take(
                min(closing, key=lambda i: costs[i]) if closing else max(nxt.values(), key=lambda i: costs[i])
            )
    ctx.info["predicted"] = spent
    return removals


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """Divide by the group's mean so that layers with different scales compete fairly."""
    return normalise_scores(scores, "mean")


class Level(abc.ABC):
    """One level of the hierarchy: a share of the target and a way of choosing what to remove.

    Args:
        share: this level's share of the overall target when levels are composed (shares are normalised
            by their sum).
        schedule: this level's own schedule (a name from :mod:`~lightning_hprune.core.schedules`, e.g.
            ``"constant"`` to act in full at the first event); ``None`` follows the callback's schedule.

    """

    #: The level's name in logs and reports.
    name: str = "level"
    #: Selection rounds per event; ``None`` lets the engine refine until the cost target is met.
    rounds: int | None = None
    #: Whether the level uses the callback's sensitivity analysis (``ctx.sensitivity``); it runs only then.
    wants_sensitivity: bool = False

    def __init__(self, share: float = 1.0, schedule: str | None = None) -> None:
        self.share = check_fraction("share", share, allow_one=True)
        if schedule is not None:
            check_choice("schedule", schedule, SCHEDULES)
        self.schedule = schedule

    @abc.abstractmethod
    def plan(self, ctx: SelectionContext, budget: float) -> Plan:
        """What to remove so that the predicted saving reaches ``budget`` (an empty plan: nothing fits)."""

    def check_model(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Raise a clear ``ValueError`` when the level's arguments cannot apply to ``model`` (called in setup)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class ChannelLevel(Level):
    """A level that removes channels (and attention heads) of the model's groups.

    Args:
        share: see :class:`Level`.
        max_layer_ratio: no group loses more than this fraction of its original width.
        schedule: see :class:`Level`.

    """

    def __init__(self, share: float = 1.0, max_layer_ratio: float = 0.8, schedule: str | None = None) -> None:
        super().__init__(share=share, schedule=schedule)
        self.max_layer_ratio = check_fraction("max_layer_ratio", max_layer_ratio, allow_one=False)

    def plan(self, ctx: SelectionContext, budget: float) -> ChannelPlan:
        """The units :meth:`select` chooses.

        When the budget is a minimum (``ctx.at_least``, the schedule's last step) and nothing fits within it,
        :meth:`select` is asked again with ``ctx.at_least`` set, to close the gap with the least overshoot;
        otherwise it sees ``ctx.at_least`` false.
        """
        minimum = ctx.at_least
        ctx.at_least = False
        try:
            removals = self.select(ctx, budget)
            if minimum and not any(len(v) for v in removals.values()):
                ctx.at_least = True
                removals = self.select(ctx, budget)
        finally:
            ctx.at_least = minimum
        return ChannelPlan(ctx.concrete(removals))

    @abc.abstractmethod
    def select(self, ctx: SelectionContext, budget: float) -> Removals:
        """Choose units whose predicted cost reaches ``budget``: ``{group name: unit indices}``."""


class ModuleLevel(Level):
    """A level that removes whole modules (replacing them by a :class:`~lightning_hprune.core.graph.SkippedBlock`)."""

    def plan(self, ctx: SelectionContext, budget: float) -> ModulePlan:
        """The modules :meth:`select` chooses."""
        return ModulePlan(self.select(ctx, budget))

    @abc.abstractmethod
    def select(self, ctx: SelectionContext, budget: float) -> list[str]:
        """Names of the modules to remove; their cost must fit in ``budget``."""


class GlobalLevel(ChannelLevel):
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
                ctx.original_size.get(g.name, g.size), g.size, self.max_layer_ratio, ctx.align(g), g.allows
            )
            start = 0
            running: list[int] = []
            for size in chunk_sizes(g.size, floor, ctx.align(g), g.allows):
                idxs = order[start : start + size].tolist()
                start += size
                running = running + idxs
                # A later chunk is only taken after the earlier ones: rank it by its running mean.
                candidates.append((float(norm[running].mean()), g.name, idxs))
        return take_cheapest(candidates, ctx, budget)


class UniformLevel(ChannelLevel):
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
                g.size,
                ratio,
                ctx.original_size.get(g.name, g.size),
                self.max_layer_ratio,
                ctx.align(g),
                g.allows,
            )
            if k:
                removals[g.name] = lowest(ctx.scores[g.name], k)
        return removals


def ratio_removal(
    current: int,
    ratio: float,
    original: int,
    max_layer_ratio: float,
    round_to: int,
    allows: Allows | None = None,
) -> int:
    """How many channels to remove from a group of width ``current`` for ``ratio``, aligned and capped."""
    floor = min_keep(original, current, max_layer_ratio, round_to, allows)
    keep = current - math.floor(ratio * current + 1e-9)
    keep = int(math.ceil(keep / round_to) * round_to) if keep > 0 else round_to
    keep = _allowed_at_or_above(max(keep, floor), current, allows)
    return max(0, current - keep)


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest scores (stable)."""
    return sorted(torch.argsort(scores.float(), stable=True)[:k].tolist())


def aligned_keep(
    original: int,
    ratio: float,
    floor: int,
    round_to: int,
    allows: Allows | None = None,
    ceiling: int | None = None,
) -> int:
    """Width to keep when a group loses ``ratio`` of its ``original`` width: aligned up, never under ``floor``.

    With ``allows``, the next allowed width at or above it (up to ``ceiling``, default ``original``).
    """
    keep = original * (1.0 - ratio)
    keep_aligned = int(math.ceil(keep / round_to - 1e-9) * round_to)
    width = max(floor, keep_aligned, 1)
    return _allowed_at_or_above(width, ceiling if ceiling is not None else max(original, width), allows)


def _check_pattern_mapping(
    name: str, value: Any, *, low: float, high: float | None, high_open: bool, allow_inf: bool = False
) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not value:
        raise ValueError(
            f"Expected argument `{name}` to be a non-empty mapping of module-name pattern to number, but got "
            f"{value!r} ({type(value).__name__})."
        )
    out: dict[str, float] = {}
    for key, v in value.items():
        ok = isinstance(key, str) and bool(key)
        ok = ok and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= low
        ok = ok and (math.isfinite(v) or (allow_inf and v == math.inf))
        if ok and high is not None:
            ok = v < high if high_open else v <= high
        if not ok:
            bound = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
            raise ValueError(
                f"Expected argument `{name}` to map module-name patterns to numbers >= {low}{bound}, but got "
                f"{key!r}: {v!r} in {dict(value)!r}."
            )
        out[key] = float(v)
    return out


class LayerLevel(ChannelLevel):
    """Layer-wise pruning: each layer loses its own fraction of its original width.

    The ratios come from one of three sources:

    * nothing: one ratio for every layer (uniform), searched to meet the level's cost budget;
    * ``ratios``: a mapping from module-name pattern (``fnmatch`` glob of the name of the layer whose output
      channels form the group, e.g. ``"features.3.*"``) to a fraction of that layer's original width. The
      first matching pattern wins; unmatched layers are left alone. All ratios are scaled by one common
      factor in [0, 1] just large enough to meet the budget, so they are reached together, stay in
      proportion, and are never exceeded; when the level owes at least what the mapping gives, every layer
      ends at its ratio to within ``round_to`` channels;
    * ``sensitivity``: a mapping from pattern to a per-layer sensitivity (>= 0, e.g. the accuracy drop
      measured when pruning that layer alone): ratios are proportional to ``1 / (sensitivity + eps)``
      (``eps`` is 5 % of the mean finite sensitivity; an infinite one is never pruned), scaled to meet the
      budget, so less sensitive layers lose more. A :class:`~lightning_hprune.core.sensitivity.SensitivityAnalysis`
      on the callback fills it for every ``LayerLevel`` given neither mapping.

    Every ratio is capped by ``max_layer_ratio``; kept widths are multiples of ``round_to``; channels are
    chosen by the criterion inside each layer (lowest scores first).

    Args:
        ratios: pattern -> fraction of the original width to remove, each in [0, ``max_layer_ratio``].
        sensitivity: pattern -> sensitivity (>= 0); exclusive with ``ratios``.
        share: see :class:`Level`.
        max_layer_ratio: see :class:`Level`.
        schedule: see :class:`Level`.

    """

    name = "layer"

    def __init__(
        self,
        ratios: Mapping[str, float] | None = None,
        sensitivity: Mapping[str, float] | None = None,
        share: float = 1.0,
        max_layer_ratio: float = 0.8,
        schedule: str | None = None,
    ) -> None:
        super().__init__(share=share, max_layer_ratio=max_layer_ratio, schedule=schedule)
        if ratios is not None and sensitivity is not None:
            raise ValueError(
                "Expected at most one of the arguments `ratios` and `sensitivity`, but got both: "
                f"ratios={ratios!r}, sensitivity={sensitivity!r}."
            )
        self.ratios = _check_pattern_mapping(
            "ratios", ratios, low=0.0, high=self.max_layer_ratio, high_open=False
        )
        self.sensitivity = _check_pattern_mapping(
            "sensitivity", sensitivity, low=0.0, high=None, high_open=False, allow_inf=True
        )

    @property
    def wants_sensitivity(self) -> bool:  # type: ignore[override]
        """A level given neither ``ratios`` nor ``sensitivity`` uses the callback's sensitivity analysis."""
        return not self.ratios and not self.sensitivity

    @property
    def patterns(self) -> list[str]:
        """The module-name patterns of the mapping (empty for uniform)."""
        return list(self.ratios or self.sensitivity)

    def check_model(self, model: nn.Module) -> None:
        """Every pattern must match at least one module name of ``model``."""
        names = [n for n, _ in model.named_modules() if n]
        unmatched = [p for p in self.patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            which = "ratios" if self.ratios else "sensitivity"
            raise ValueError(
                f"Expected every pattern of `{which}` of {type(self).__name__} to match a module name of "
                f"{type(model).__name__}, but {unmatched} matched none. Module names look like {names[:6]}."
            )

    def mapping(self, ctx: SelectionContext) -> tuple[str, Mapping[str, float]]:
        """Where the ratios come from: ``("ratios" | "sensitivity" | "uniform", pattern -> value)``.

        A level given neither mapping uses the sensitivities of the callback's analysis (``ctx.sensitivity``)
        when there are any.
        """
        if self.ratios:
            return "ratios", self.ratios
        if self.sensitivity:
            return "sensitivity", self.sensitivity
        if ctx.sensitivity:
            return "sensitivity", ctx.sensitivity
        return "uniform", {}

    def weights(
        self, groups: Sequence[ChannelGroup], source: tuple[str, Mapping[str, float]] | None = None
    ) -> dict[str, float]:
        """Each group's ratio at scale 1 (groups no pattern matches are absent).

        A pattern matches a group when it matches the group's name or the name of one of its output layers
        (which stay the same when a block removal gives the group another root).
        """
        kind, mapping = (
            source
            if source is not None
            else (
                ("ratios", self.ratios)
                if self.ratios
                else ("sensitivity", self.sensitivity)
                if self.sensitivity
                else ("uniform", {})
            )
        )
        if kind == "uniform":
            return {g.name: 1.0 for g in groups}
        matched: dict[str, float] = {}
        for g in groups:
            names = (g.name, *g.outputs)
            for pattern, value in mapping.items():
                if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    matched[g.name] = value
                    break
        if kind == "ratios" or not matched:
            return matched
        # Same allocation as `core.sensitivity.sensitivity_ratios`: an infinite sensitivity means "never".
        finite = [v for v in matched.values() if math.isfinite(v)]
        eps = 0.05 * (sum(finite) / len(finite) if finite else 0.0) + 1e-12
        inverse = {k: (1.0 / (v + eps) if math.isfinite(v) else 0.0) for k, v in matched.items()}
        top = max(inverse.values())
        return {k: v / top for k, v in inverse.items() if v > 0} if top > 0 else {}

    def removal_counts(self, ctx: SelectionContext, scale: float) -> dict[str, int]:
        """Channels each group must lose (relative to its current width) to reach its ratio at ``scale``."""
        counts: dict[str, int] = {}
        by_name = {g.name: g for g in ctx.groups}
        for name, weight in self.weights(ctx.groups, self.mapping(ctx)).items():
            group = by_name[name]
            current, align = group.size, ctx.align(group)
            original = ctx.original_size.get(name, current)
            ratio = min(self.max_layer_ratio, scale * weight)
            floor = min_keep(original, current, self.max_layer_ratio, align, group.allows)
            k = current - aligned_keep(original, ratio, floor, align, group.allows, ceiling=current)
            if k > 0:
                counts[name] = k
        return counts

    def select(self, ctx: SelectionContext, budget: float) -> Removals:
        """Find the smallest common scale whose predicted cost reaches ``budget`` (at most 1)."""
        ctx.info["source"] = self.mapping(ctx)[0]
        if budget <= 0:
            return {}

        def cost(counts: dict[str, int]) -> float:
            return sum(k * ctx.cost.per_channel.get(n, 0.0) for n, k in counts.items())

        lo, hi = 0.0, 1.0
        best = self.removal_counts(ctx, hi)
        if cost(best) >= budget:
            for _ in range(30):
                mid = (lo + hi) / 2
                counts = self.removal_counts(ctx, mid)
                if cost(counts) >= budget:
                    hi, best = mid, counts
                else:
                    lo = mid
            best = self._refine(ctx, self.removal_counts(ctx, lo), best, budget, cost)
        ctx.info["scale"] = hi
        ctx.info["predicted"] = cost(best)
        return {name: lowest(ctx.scores[name], k) for name, k in best.items()}

    @staticmethod
    def _refine(
        ctx: SelectionContext,
        below: dict[str, int],
        above: dict[str, int],
        budget: float,
        cost: Callable[[dict[str, int]], float],
    ) -> dict[str, int]:
        """Step the layers between two neighbouring scales one at a time, until the budget is met.

        Between the last scale under the budget and the first over it, several layers may step at once
        (equal widths share their rounding thresholds). They step one at a time, least important extra
        channels first, so every layer stays at one of its two neighbouring aligned widths.
        """
        counts = dict(below)
        steps = []
        for name, k in above.items():
            extra = k - below.get(name, 0)
            if extra > 0:
                order = torch.argsort(normalise(ctx.scores[name]), stable=True)
                added = order[below.get(name, 0) : k]
                steps.append((float(normalise(ctx.scores[name])[added].mean()), name, k))
        for _, name, k in sorted(steps):
            if cost(counts) >= budget:
                break
            counts[name] = k
        return counts


class UnitLevel(ChannelLevel):
    """Unit-wise pruning by threshold: inside each layer, units (channels, neurons) scoring under a threshold.

    The threshold is absolute (``reference="absolute"``: score < ``threshold``) or relative to the layer's
    scores (``reference="max"`` or ``"mean"``: score < ``threshold`` x the layer's max or mean score). Only
    units under the threshold are eligible; a layer never loses more than ``max_layer_ratio`` of its original
    width, and its kept width stays a multiple of ``round_to`` (so a layer may keep a few eligible units).
    Eligible units compete across layers (scores normalised per layer) until the level's cost budget is
    reached: the target bounds what the threshold removes. Thresholds are evaluated once per event.

    Args:
        threshold: the threshold (> 0), in score units or as a multiple of the reference.
        reference: ``"absolute"``, ``"max"`` or ``"mean"``.
        share: see :class:`Level`.
        max_layer_ratio: see :class:`Level`.
        schedule: see :class:`Level`.

    """

    name = "unit"
    rounds = 1
    REFERENCES = ("absolute", "max", "mean")

    def __init__(
        self,
        threshold: float = 0.5,
        reference: str = "mean",
        share: float = 1.0,
        max_layer_ratio: float = 0.8,
        schedule: str | None = None,
    ) -> None:
        super().__init__(share=share, max_layer_ratio=max_layer_ratio, schedule=schedule)
        self.threshold = check_positive("threshold", threshold)
        self.reference = check_choice("reference", reference, self.REFERENCES)

    def layer_threshold(self, scores: torch.Tensor) -> float:
        """The threshold in score units for one layer."""
        scores = scores.float()
        if self.reference == "max":
            return self.threshold * float(scores.max())
        if self.reference == "mean":
            return self.threshold * float(scores.mean())
        return self.threshold

    def select(self, ctx: SelectionContext, budget: float) -> Removals:
        """Take eligible units, lowest normalised score first, in aligned chunks, until ``budget``."""
        candidates: list[tuple[float, str, list[int]]] = []
        eligible_total = 0
        for g in ctx.groups:
            raw = ctx.scores[g.name].float()
            eligible = int((raw < self.layer_threshold(raw)).sum())
            eligible_total += eligible
            if not eligible:
                continue
            original = ctx.original_size.get(g.name, g.size)
            align = ctx.align(g)
            floor = min_keep(original, g.size, self.max_layer_ratio, align, g.allows)
            keep = max(floor, int(math.ceil((g.size - eligible) / align) * align))
            keep = _allowed_at_or_above(keep, g.size, g.allows)
            if keep >= g.size:
                continue
            norm = normalise(raw)
            order = torch.argsort(raw, stable=True)
            start = 0
            for size in chunk_sizes(g.size, keep, align, g.allows):
                idxs = order[start : start + size].tolist()
                start += size
                candidates.append((float(norm[order[:start]].mean()), g.name, idxs))
        ctx.info["eligible"] = eligible_total
        if budget <= 0:
            return {}
        return take_cheapest(candidates, ctx, budget)


class WindowLevel(ChannelLevel):
    """Window-wise pruning: contiguous windows of ``window_size`` units are scored together and removed together.

    A window is ``window_size`` consecutive channels of a group (in its current numbering), e.g. the
    ``head_dim`` output dimensions of one attention head, or a block of channels that hardware processes
    as one tile. Its score is the ``reduce`` of its units' scores (normalised per layer); windows compete
    across layers until the cost budget is reached. Kept widths are multiples of
    ``lcm(window_size, round_to)``: a width that is not is first realigned by removing its lowest-scoring
    units, after which window boundaries never move.

    Args:
        window_size: units per window (>= 1).
        reduce: ``"mean"`` or ``"sum"`` (equivalent for equal-sized windows), or ``"max"`` (a window is only
            as unimportant as its most important unit).
        share: see :class:`Level`.
        max_layer_ratio: see :class:`Level`.
        schedule: see :class:`Level`.

    """

    name = "window"
    REDUCTIONS = ("mean", "sum", "max")

    def __init__(
        self,
        window_size: int = 8,
        reduce: str = "mean",
        share: float = 1.0,
        max_layer_ratio: float = 0.8,
        schedule: str | None = None,
    ) -> None:
        super().__init__(share=share, max_layer_ratio=max_layer_ratio, schedule=schedule)
        self.window_size = check_int("window_size", window_size, minimum=1)
        self.reduce = check_choice("reduce", reduce, self.REDUCTIONS)

    def _score(self, values: torch.Tensor) -> float:
        if self.reduce == "sum":
            return float(values.sum())
        if self.reduce == "max":
            return float(values.max())
        return float(values.mean())

    def windows(self, size: int, skip: Sequence[int] = ()) -> list[list[int]]:
        """Consecutive windows of ``window_size`` over the indices ``0..size-1`` that are not in ``skip``."""
        return self._windows(size, self.window_size, skip)

    @staticmethod
    def _windows(size: int, w: int, skip: Sequence[int] = ()) -> list[list[int]]:
        skipped = set(skip)
        rest = [i for i in range(size) if i not in skipped]
        return [rest[i : i + w] for i in range(0, len(rest) - w + 1, w)]

    def select(self, ctx: SelectionContext, budget: float) -> Removals:
        """Take the lowest-scoring windows across the network until ``budget`` is reached."""
        candidates: list[tuple[float, str, list[int]]] = []
        for g in ctx.groups:
            # An attention head is already a window of its channels: head groups step one head at a time.
            window = self.window_size if g.units is None else 1
            step = math.lcm(window, ctx.align(g))
            per_chunk = step // window
            norm = normalise(ctx.scores[g.name])
            original = ctx.original_size.get(g.name, g.size)
            floor = min_keep(original, g.size, self.max_layer_ratio, step, g.allows)
            width = g.size
            realign: list[int] = []
            key = -math.inf
            if width % step:
                r = width % step
                if width - r < floor:
                    continue
                realign = torch.argsort(norm, stable=True)[:r].tolist()
                key = float(norm[realign].mean())
                candidates.append((key, g.name, realign))
                width -= r
            windows = sorted(self._windows(g.size, window, realign), key=lambda w: self._score(norm[w]))
            taken: list[float] = []
            pending: list[int] = []  # windows of a chunk waiting for an allowed width
            for c in range(0, len(windows) - per_chunk + 1, per_chunk):
                if width - step < floor:
                    break
                chunk = windows[c : c + per_chunk]
                taken.extend(self._score(norm[w]) for w in chunk)
                pending += [i for w in chunk for i in w]
                width -= step
                if not g.allows(width):
                    continue
                # Keys never decrease within a group, so a group's chunks are taken in order.
                key = max(key, sum(taken) / len(taken))
                candidates.append((key, g.name, pending))
                pending = []
        return take_cheapest(candidates, ctx, budget)
