"""Levels of the hierarchy: each turns channel scores and a cost budget into a removal plan.

A level's :meth:`Level.select` returns ``{group name: channel indices to remove}`` whose predicted cost
(from the :class:`~lightning_hprune.core.cost.CostModel`) reaches ``budget``. Widths kept are
multiples of ``round_to`` and never fall under the level's per-layer cap.
"""

from __future__ import annotations

import abc
import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lightning_hprune.core.cost import CostModel
from lightning_hprune.core.graph import ChannelGroup
from lightning_hprune.core.importance import normalise_scores
from lightning_hprune.core.schedules import SCHEDULES
from lightning_hprune.core.validation import check_choice, check_fraction, check_int, check_positive

Removals = dict[str, list[int]]


@dataclass
class SelectionContext:
    """Everything a level needs to choose channels.

    Attributes:
        groups: prunable groups of the current model.
        scores: raw importance per group (one score per channel, low = prune first).
        cost: marginal cost per channel of every group.
        original_size: width of every group before any pruning (for caps).
        round_to: kept widths are multiples of this.
        model: the model being pruned.
        calibration: recent training inputs (CPU tensors) for levels that score on data.
        example_inputs: the one-sample example input used to trace the model and measure its cost.
        removed_modules: names of the modules already replaced by the identity (earlier events).
        info: what the level reports back (predicted saving, chosen ratio, ...), for logs and tests.

    """

    groups: Sequence[ChannelGroup]
    scores: dict[str, torch.Tensor]
    cost: CostModel
    original_size: dict[str, int]
    round_to: int = 1
    model: nn.Module | None = None
    calibration: Sequence[Any] = ()
    example_inputs: Any = None
    removed_modules: Sequence[str] = ()
    info: dict[str, Any] = field(default_factory=dict)

    def align(self, group: ChannelGroup) -> int:
        """Kept widths of ``group`` are multiples of this: ``round_to`` channels, or 1 head."""
        return group.align if group.align is not None else self.round_to


def min_keep(original: int, current: int, max_layer_ratio: float, round_to: int) -> int:
    """The smallest width a group may keep: the cap, aligned up to ``round_to`` (never above ``current``)."""
    floor = max(1, math.ceil(original * (1.0 - max_layer_ratio) - 1e-9))
    floor = max(floor, round_to)
    floor = int(math.ceil(floor / round_to) * round_to)
    return min(floor, current)


def chunk_sizes(current: int, keep_floor: int, round_to: int) -> list[int]:
    """Sizes of the removable chunks of a group, smallest-score first.

    The first chunk realigns an unaligned width to ``round_to``; every later chunk is ``round_to``
    channels. The chunks never cut below ``keep_floor``.
    """
    sizes: list[int] = []
    width = current
    first = width % round_to
    if first and width - first >= keep_floor:
        sizes.append(first)
        width -= first
    while width - round_to >= keep_floor:
        sizes.append(round_to)
        width -= round_to
    return sizes


def take_cheapest(
    candidates: list[tuple[float, str, list[int]]], ctx: SelectionContext, budget: float
) -> Removals:
    """Take ``(rank key, group, indices)`` chunks, lowest key first, until their predicted cost reaches ``budget``.

    Within a group, chunks must be listed in the order they may be taken (their keys never decrease), so
    that alignment chunks come before the chunks that rely on them. A chunk that would overshoot the budget
    by more than it closes is skipped (with the rest of its group). With ``ctx.info["at_least"]`` (the
    engine's last resort when the budget is a minimum), the budget is then closed with the least overshoot:
    among the next chunk of every group, the cheapest that closes the gap (or the largest, repeatedly).
    Writes the predicted saving to ``ctx.info["predicted"]``.
    """
    candidates = sorted(candidates, key=lambda c: c[0])
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
    if ctx.info.get("at_least"):
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
    """One level of the hierarchy.

    Args:
        share: this level's share of the overall target when levels are composed (shares are normalised
            by their sum).
        max_layer_ratio: no group loses more than this fraction of its original width.
        schedule: this level's own schedule (a name from :mod:`~lightning_hprune.core.schedules`, e.g.
            ``"constant"`` to act in full at the first event); ``None`` follows the callback's schedule.

    """

    name: str = "level"
    #: Selections per event; ``None`` lets the engine refine until the cost target is met.
    rounds: int | None = None

    def __init__(self, share: float = 1.0, max_layer_ratio: float = 0.8, schedule: str | None = None) -> None:
        self.share = check_fraction("share", share, allow_one=True)
        self.max_layer_ratio = check_fraction("max_layer_ratio", max_layer_ratio, allow_one=False)
        if schedule is not None:
            check_choice("schedule", schedule, SCHEDULES)
        self.schedule = schedule

    @abc.abstractmethod
    def select(self, ctx: SelectionContext, budget: float) -> Removals:
        """Choose channels whose predicted cost reaches ``budget``."""

    def check_model(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Raise a clear ``ValueError`` when the level's arguments cannot apply to ``model`` (called in setup)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class ModuleLevel(Level):
    """A level that removes whole modules (replacing them by the identity) instead of channels.

    The engine calls :meth:`select_modules` and applies the result with
    :meth:`~lightning_hprune.core.graph.PruningGraph.replace_with_identity`.
    """

    def select(self, ctx: SelectionContext, budget: float) -> Removals:
        """Module levels remove modules, not channels: see :meth:`select_modules`."""
        raise TypeError(f"{type(self).__name__} removes whole modules; call `select_modules` instead.")

    @abc.abstractmethod
    def select_modules(self, ctx: SelectionContext, budget: float) -> list[str]:
        """Names of the modules to replace by the identity; their cost must fit in ``budget``."""


class GlobalLevel(Level):
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
                ctx.original_size.get(g.name, g.size), g.size, self.max_layer_ratio, ctx.align(g)
            )
            start = 0
            running: list[int] = []
            for size in chunk_sizes(g.size, floor, ctx.align(g)):
                idxs = order[start : start + size].tolist()
                start += size
                running = running + idxs
                # A later chunk is only taken after the earlier ones: rank it by its running mean.
                candidates.append((float(norm[running].mean()), g.name, idxs))
        return take_cheapest(candidates, ctx, budget)


class UniformLevel(Level):
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
                g.size, ratio, ctx.original_size.get(g.name, g.size), self.max_layer_ratio, ctx.align(g)
            )
            if k:
                removals[g.name] = lowest(ctx.scores[g.name], k)
        return removals


def ratio_removal(current: int, ratio: float, original: int, max_layer_ratio: float, round_to: int) -> int:
    """How many channels to remove from a group of width ``current`` for ``ratio``, aligned and capped."""
    floor = min_keep(original, current, max_layer_ratio, round_to)
    keep = current - math.floor(ratio * current + 1e-9)
    keep = int(math.ceil(keep / round_to) * round_to) if keep > 0 else round_to
    keep = max(keep, floor)
    return max(0, current - keep)


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest scores (stable)."""
    return sorted(torch.argsort(scores.float(), stable=True)[:k].tolist())


def aligned_keep(original: int, ratio: float, floor: int, round_to: int) -> int:
    """Width to keep when a group loses ``ratio`` of its ``original`` width: aligned up, never under ``floor``."""
    keep = original * (1.0 - ratio)
    keep_aligned = int(math.ceil(keep / round_to - 1e-9) * round_to)
    return max(floor, keep_aligned, 1)


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


class LayerLevel(Level):
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

    def weights(self, groups: Sequence[ChannelGroup]) -> dict[str, float]:
        """Each group's ratio at scale 1 (groups no pattern matches are absent)."""
        if not self.patterns:
            return {g.name: 1.0 for g in groups}
        mapping = self.ratios or self.sensitivity
        matched: dict[str, float] = {}
        for g in groups:
            for pattern, value in mapping.items():
                if fnmatch.fnmatchcase(g.name, pattern):
                    matched[g.name] = value
                    break
        if self.ratios or not matched:
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
        for name, weight in self.weights(ctx.groups).items():
            current, align = by_name[name].size, ctx.align(by_name[name])
            original = ctx.original_size.get(name, current)
            ratio = min(self.max_layer_ratio, scale * weight)
            floor = min_keep(original, current, self.max_layer_ratio, align)
            k = current - aligned_keep(original, ratio, floor, align)
            if k > 0:
                counts[name] = k
        return counts

    def select(self, ctx: SelectionContext, budget: float) -> Removals:
        """Find the smallest common scale whose predicted cost reaches ``budget`` (at most 1)."""
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


class UnitLevel(Level):
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
            floor = min_keep(original, g.size, self.max_layer_ratio, align)
            keep = max(floor, int(math.ceil((g.size - eligible) / align) * align))
            if keep >= g.size:
                continue
            norm = normalise(raw)
            order = torch.argsort(raw, stable=True)
            start = 0
            for size in chunk_sizes(g.size, keep, align):
                idxs = order[start : start + size].tolist()
                start += size
                candidates.append((float(norm[order[:start]].mean()), g.name, idxs))
        ctx.info["eligible"] = eligible_total
        if budget <= 0:
            return {}
        return take_cheapest(candidates, ctx, budget)


class WindowLevel(Level):
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
            floor = min_keep(original, g.size, self.max_layer_ratio, step)
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
            for c in range(0, len(windows) - per_chunk + 1, per_chunk):
                if width - step < floor:
                    break
                chunk = windows[c : c + per_chunk]
                taken.extend(self._score(norm[w]) for w in chunk)
                # Keys never decrease within a group, so a group's chunks are taken in order.
                key = max(key, sum(taken) / len(taken))
                candidates.append((key, g.name, [i for w in chunk for i in w]))
                width -= step
        return take_cheapest(candidates, ctx, budget)
