"""Block (depth) pruning: whole residual blocks and transformer layers replaced by the identity.

A *block* is a module whose output has the shape of its input and that a residual network could skip:
a torchvision ``BasicBlock``/``Bottleneck`` without a ``downsample`` branch, a transformer encoder layer
in a ``ModuleList``/``Sequential``, or any module named by the user's patterns. Blocks are scored on
calibration inputs (how little a block changes its input, or how much the model's output changes when it
is skipped); the least useful go first, within the level's cost budget and a cap on their number.
A block is never removed when its output is not a tensor shaped like its input, or when the model does not
run with the block replaced by a :class:`~lightning_hprune.core.graph.SkippedBlock`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from lightning_hprune.core.cost import Cost, resolve_cost
from lightning_hprune.core.graph import SkippedBlock, call_model, model_device_dtype, move_to, preserved_modes
from lightning_hprune.core.levels import ModuleLevel, SelectionContext
from lightning_hprune.core.validation import check_choice, check_int, check_positive, check_str_list

#: Class-name endings of modules that are block candidates when they sit in a ``ModuleList``/``Sequential``.
BLOCK_SUFFIXES = ("Block", "Bottleneck", "EncoderLayer", "Layer")
METRICS = ("relative", "cosine", "output")


def _is_default_block(module: nn.Module) -> bool:
    if isinstance(module, nn.Identity) or not any(True for _ in module.parameters()):
        return False
    if getattr(module, "downsample", None) is not None:  # torchvision/timm ResNet blocks with a projection
        return False
    return type(module).__name__.endswith(BLOCK_SUFFIXES)


def find_blocks(model: nn.Module, patterns: Sequence[str] = ()) -> list[str]:
    """Names of the candidate blocks of ``model``, in module order (outermost candidates only).

    Args:
        model: the model.
        patterns: ``fnmatch`` globs of module names; when given, exactly the modules they match are
            candidates. Otherwise, for a model of a known layout (:mod:`lightning_hprune.core.families`), the
            layers its family may remove (not T5's layer 0, none of ALBERT's shared layer; BART's encoder and
            decoder layers, :class:`BlockLevel` leaving each stack a layer); for any other model, the children of every
            ``nn.ModuleList``/``nn.Sequential`` whose class name ends with one of :data:`BLOCK_SUFFIXES` and
            that have no ``downsample`` module.

    """
    from lightning_hprune.core.families import detect

    found: list[str] = []
    family = None if patterns else detect(model)
    if family is not None:
        return family.removable_layers(model)
    if patterns:
        for name, module in model.named_modules():
            if (
                name
                and not isinstance(module, nn.Identity)
                and any(fnmatch.fnmatchcase(name, p) for p in patterns)
            ):
                found.append(name)
    else:
        for name, module in model.named_modules():
            if not isinstance(module, (nn.ModuleList, nn.Sequential)):
                continue
            for child_name, child in module.named_children():
                if _is_default_block(child):
                    found.append(f"{name}.{child_name}" if name else child_name)
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        found.sort(key=lambda n: order[n])
    # Keep outermost candidates only: removing a parent removes its children.
    return [n for n in found if not any(n.startswith(f"{p}.") for p in found if p != n)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent._modules[child]
    parent._modules[child] = module
    assert old is not None
    return old


@contextmanager
def skipped(model: nn.Module, name: str) -> Iterator[None]:
    """Temporarily replace module ``name`` by a ``SkippedBlock`` (restored on exit, even on error)."""
    old = _set_module(model, name, SkippedBlock())
    try:
        yield
    finally:
        _set_module(model, name, old)


@contextmanager
def left_out(model: nn.Module, name: str) -> Iterator[None]:
    """Temporarily take module ``name`` out of its ``nn.ModuleList`` (put back on exit, even on error).

    For a layer whose output is a tuple (T5's ``(hidden, position bias, ...)``), which no stand-in returning the
    input can mimic: the model runs as it would with the layer removed from its layer list.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.ModuleList) or not child.isdigit():
        raise RuntimeError(f"{name} returns a tuple and is not in a layer list")
    index = int(child)
    layer = parent[index]
    del parent[index]
    try:
        yield
    finally:
        parent.insert(index, layer)


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for v in obj:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _per_sample(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Distance of ``b`` from ``a`` per slice along dim 0: relative L2, or 1 - cosine similarity."""
    a = a.detach().float().reshape(a.shape[0], -1) if a.dim() > 1 else a.detach().float().reshape(1, -1)
    b = b.detach().float().reshape(a.shape)
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
    return (b - a).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)


def _limit(inputs: Sequence[Any], max_samples: int) -> list[Any]:
    out: list[Any] = []
    left = max_samples
    for x in inputs:
        if left <= 0:
            break
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            x = x[:left]
            left -= x.shape[0]
        else:
            left -= 1
        out.append(x)
    return out


@torch.no_grad()
def block_scores(
    model: nn.Module,
    names: Sequence[str],
    inputs: Sequence[Any],
    metric: str = "relative",
    example_inputs: Any = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """Score candidate blocks on ``inputs`` (eval mode; the model's modes are restored).

    Args:
        model: the model.
        names: candidate block names.
        inputs: model inputs (a tensor, a tuple of positional arguments or a dict of keyword arguments each).
        metric: ``"relative"`` (mean ``||f(x) - x|| / ||x||`` of the block), ``"cosine"`` (mean
            ``1 - cos(f(x), x)``), or ``"output"`` (mean relative change of the model's output when the block
            is skipped). Low scores mean *remove first*.
        example_inputs: the input used to check that the model runs with a block skipped (default: the
            first of ``inputs``).

    Returns:
        Scores of the removable blocks, and the reason each other candidate cannot be removed.

    """
    check_choice("metric", metric, METRICS)
    device, dtype = model_device_dtype(model)
    batches = [move_to(x, device, dtype) for x in inputs]
    trial = move_to(example_inputs, device, dtype) if example_inputs is not None else batches[0]
    from lightning_hprune.core.families import detect

    refused: dict[str, str] = {}
    family = detect(model)
    # Layers a known layout removes from their layer list (not replaced by a stand-in) may return tuples.
    deletable = set(family.removable_layers(model)) if family is not None else set()
    tupled: set[str] = set()
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    with preserved_modes(model):
        model.eval()
        handles = []

        def hook(name: str) -> Any:
            def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                x = args[0] if args else _first_tensor(kwargs)
                if (
                    isinstance(output, tuple)
                    and output
                    and isinstance(output[0], torch.Tensor)
                    and name in deletable
                ):  # a known layout's layer returning (hidden states, ...), removed by deletion: scored on those
                    tupled.add(name)
                    output = output[0]
                if not isinstance(output, torch.Tensor) or not isinstance(x, torch.Tensor):
                    refused[name] = f"its output is a {type(output).__name__}, not a tensor"
                elif output.shape != x.shape:
                    refused[name] = (
                        f"its output shape {tuple(output.shape)} differs from its input's {tuple(x.shape)}"
                    )
                elif metric != "output":
                    d = _per_sample(x, output, metric)
                    sums[name] += float(d.sum())
                    counts[name] += d.numel()

            return fn

        try:
            for name in names:
                handles.append(model.get_submodule(name).register_forward_hook(hook(name), with_kwargs=True))
            references = [_first_tensor(call_model(model, x)) for x in batches]
        finally:
            for h in handles:
                h.remove()
        for name in names:
            if name in refused:
                continue
            if counts[name] == 0 and metric != "output":
                refused[name] = "it was not called in the forward pass"
                continue
            with left_out(model, name) if name in tupled else skipped(model, name):
                try:
                    out = _first_tensor(call_model(model, trial))
                    if metric == "output":
                        for x, ref in zip(batches, references, strict=True):
                            y = _first_tensor(call_model(model, x))
                            if ref is None or y is None or y.shape != ref.shape:
                                raise RuntimeError("the model's output changed shape")
                            d = _per_sample(ref, y, "relative")
                            sums[name] += float(d.sum())
                            counts[name] += d.numel()
                    elif out is None:
                        raise RuntimeError("the model has no tensor output")
                except Exception as err:  # any failure means the block cannot be skipped
                    refused[name] = f"the model fails without it ({type(err).__name__}: {err})"
    scores = {n: sums[n] / max(counts[n], 1) for n in names if n not in refused}
    return scores, refused


def block_costs(
    model: nn.Module, names: Sequence[str], example_inputs: Any, cost: Cost | str
) -> dict[str, float]:
    """What removing each block saves: its MACs in one forward of ``example_inputs``, or its parameters."""
    return resolve_cost(cost).of_modules(model, names, example_inputs)


class BlockLevel(ModuleLevel):
    """Block (depth) pruning: replace the least useful whole blocks by the identity.

    Candidates are found by :func:`find_blocks` and scored by :func:`block_scores` on the calibration
    inputs the callback keeps (the example input when there are none). Blocks go lowest score first; a
    block is removed when its cost fits in what remains of the level's budget, or overshoots it by at most
    what it closes (the level rounds to the nearest whole block) while the model stays within the whole
    run's final target (``ctx.final_slack``: the finer levels remove that much less, at this event and the
    later ones), when its score is at most ``max_score`` (if set), and while fewer than ``max_blocks`` blocks
    have been removed in total.
    With a cumulative budget (see :func:`~lightning_hprune.core.engine.plan_steps`), a block that does not
    fit at one event may fit at a later one: a block is coarse (one layer of a 4-layer ViT is about 25 % of
    its MACs), the level's cumulative budget grows event by event, and the block is taken at the first event
    where it rounds to one, even when the finer levels' share of that event is smaller than its overshoot.

    Args:
        max_blocks: most blocks removed over the whole run (default: half of the candidate blocks).
        metric: ``"relative"``, ``"cosine"`` or ``"output"`` (see :func:`block_scores`).
        patterns: module-name globs of the candidate blocks (default: automatic, see :func:`find_blocks`).
        max_score: never remove a block scoring above this.
        max_samples: calibration samples used for scoring.
        share: see :class:`~lightning_hprune.core.levels.Level`.
        schedule: see :class:`~lightning_hprune.core.levels.Level`.

    """

    name = "block"

    def __init__(
        self,
        max_blocks: int | None = None,
        metric: str = "relative",
        patterns: Sequence[str] | None = None,
        max_score: float | None = None,
        max_samples: int = 256,
        share: float = 1.0,
        schedule: str | None = None,
    ) -> None:
        super().__init__(share=share, schedule=schedule)
        self.max_blocks = check_int("max_blocks", max_blocks, minimum=0, allow_none=True)
        self.metric = check_choice("metric", metric, METRICS)
        self.patterns = list(check_str_list("patterns", patterns))
        self.max_score = (
            None if max_score is None else check_positive("max_score", max_score, allow_zero=True)
        )
        self.max_samples = check_int("max_samples", max_samples, minimum=1)

    def check_model(self, model: nn.Module) -> None:
        """Every pattern must match at least one module name of ``model``."""
        names = [n for n, _ in model.named_modules() if n]
        unmatched = [p for p in self.patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ValueError(
                f"Expected every pattern of `patterns` of {type(self).__name__} to match a module name of "
                f"{type(model).__name__}, but {unmatched} matched none. Module names look like {names[:6]}."
            )

    def cap(self, candidates: int, removed: int) -> int:
        """Most blocks that may be removed in total."""
        if self.max_blocks is not None:
            return self.max_blocks
        return (candidates + removed) // 2

    def select(self, ctx: SelectionContext, budget: float) -> list[str]:
        """The lowest-scoring blocks whose costs fit in ``budget``, within the caps."""
        if ctx.model is None:
            raise ValueError("BlockLevel needs the model in its SelectionContext.")
        names = find_blocks(ctx.model, self.patterns)
        removed = len(ctx.removed_modules)
        room = self.cap(len(names), removed) - removed
        ctx.info.update(candidates=len(names), room=max(room, 0))
        if room <= 0 or budget <= 0 or not names:
            return []
        inputs = _limit(list(ctx.calibration), self.max_samples) or [ctx.example_inputs]
        scores, refused = block_scores(ctx.model, names, inputs, self.metric, ctx.example_inputs)
        costs = ctx.cost_of_modules(list(scores))
        chosen: list[str] = []
        left, slack = budget, ctx.final_slack
        from lightning_hprune.core.families import detect

        family = detect(ctx.model)  # a known layout: every layer stack keeps a layer (BART's decoder)
        for name in sorted(scores, key=lambda n: scores[n]):
            if len(chosen) >= room or (self.max_score is not None and scores[name] > self.max_score):
                break
            if family is not None and not family.can_remove_layers(ctx.model, [*chosen, name]):
                continue
            cost = costs[name]
            # A block goes when it fits, or when it overshoots the level's budget by at most the budget it
            # closes and no further than the whole run's final target allows (`ctx.final_slack`): the level
            # rounds to the nearest whole block, and the finer levels remove that much less (at this event,
            # and at later ones when the block passed this event's own target).
            over = cost - left
            if cost > 0 and (over <= 0 or (over <= left and over <= slack)):
                chosen.append(name)
                slack -= max(0.0, over)
                left -= cost
        ctx.info.update(scores=scores, refused=refused, predicted=budget - left)
        return chosen
