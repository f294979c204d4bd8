"""Criteria: small strategy objects that score the channels of a pruning group.

An importance object is called with a torch-pruning ``Group`` (full indices) and returns a 1-D tensor
with one score per channel of the group's root; a *low* score means *prune first*. Scores are raw
(not normalised); the levels normalise per group when groups compete.

Criteria that need data follow a small protocol that the pruning callbacks drive, so no criterion runs
extra training passes:

1. :meth:`Importance.on_before_optimizer_step` after every optimizer step's gradients are final
   (Lightning calls its hook of the same name after AMP unscaling and gradient accumulation);
2. :meth:`Importance.prepare` once before an event (with the calibration inputs and, under DDP, a
   function that sums a tensor over all processes, so every process scores the same);
3. ``__call__(group)`` for every group, possibly in several rounds while the event prunes;
4. :meth:`Importance.reset` after the event.

Statistics survive the parameter replacement torch-pruning does while an event prunes: gradient
statistics travel in the parameters' ``.grad`` (torch-pruning slices ``.grad`` with the weight), and
activation statistics are gathered again whenever a layer's width no longer matches them.
"""

from __future__ import annotations

import abc
import importlib
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function as tp_fn

from lightning_hprune.core.cuts import Cut, weight_cuts
from lightning_hprune.core.graph import call_model, model_device_dtype, move_to, preserved_modes
from lightning_hprune.core.validation import check_choice, check_int, check_positive

#: Sums a tensor over every process (``None`` on a single process).
Reduce = Callable[[torch.Tensor], torch.Tensor]

_OUT = (tp_fn.prune_conv_out_channels, tp_fn.prune_linear_out_channels)
_IN = (tp_fn.prune_conv_in_channels, tp_fn.prune_linear_in_channels)
_DEPTHWISE = (tp_fn.prune_depthwise_conv_out_channels, tp_fn.prune_depthwise_conv_in_channels)
_NORM = (
    tp_fn.prune_batchnorm_out_channels,
    tp_fn.prune_layernorm_out_channels,
    tp_fn.prune_groupnorm_out_channels,
    tp_fn.prune_instancenorm_out_channels,
)


class Importance(abc.ABC):
    """Base class of every criterion.

    Criteria that need statistics gathered during training (gradients, activations) override the
    optional hooks; the callbacks call them at the right moments, so no criterion runs extra passes.
    """

    #: True when the criterion reads statistics gathered from training steps.
    needs_training_statistics: bool = False
    #: True when the criterion runs the calibration inputs through the model in :meth:`prepare`.
    needs_calibration: bool = False

    @abc.abstractmethod
    def __call__(self, group: Any) -> torch.Tensor:
        """Return one score per channel of ``group`` (low = unimportant)."""

    def score_cuts(self, cuts: Sequence[Cut]) -> torch.Tensor:
        """Return one score per unit of a layout group, from the parameter slices its units own.

        Layout groups (known transformer structures, see :mod:`lightning_hprune.core.families`) are not
        torch-pruning groups: a criterion that prunes them implements this too. Every built-in one does.

        Raises:
            NotImplementedError: the criterion only scores torch-pruning groups.

        """
        raise NotImplementedError(
            f"{type(self).__name__} scores torch-pruning groups only (`__call__`), but this model's groups come "
            "from a known transformer layout: implement `score_cuts(cuts)` too (see docs/criteria.md), or use a "
            "built-in criterion."
        )

    def on_before_optimizer_step(  # noqa: B027 - optional hook
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Gather statistics from the final (unscaled, accumulated) gradients of one optimizer step."""

    def prepare(  # noqa: B027 - optional hook
        self, model: nn.Module, calibration: Sequence[Any] = (), reduce: Reduce | None = None
    ) -> None:
        """Get ready to score ``model`` (called once before each event).

        Args:
            model: the model about to be pruned.
            calibration: recent model inputs (CPU tensors) for criteria that look at activations.
            reduce: sums a tensor over all processes (DDP), so every process gets the same scores.

        """

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Forget gathered statistics (called after each pruning event)."""

    def state_dict(self) -> dict[str, Any]:
        """Gathered statistics as CPU tensors (to restore them after a rollback)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore statistics saved by :meth:`state_dict`."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _linear_like(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer with a transposed ``[in, out]`` weight."""
    w = module._parameters.get("weight") if isinstance(module, nn.Module) else None
    return type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2


def _magnitude_target_types() -> list[type[nn.Module]]:
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

    @torch.no_grad()
    def score_cuts(self, cuts: Sequence[Cut]) -> torch.Tensor:
        """The mean over the weights a unit owns of ``sum |w|^p`` (per index), averaged over the cuts."""
        parts = [c.norms(self.p) for c in weight_cuts(cuts)]
        if not parts:
            raise ValueError("Expected at least one weight among the cuts of a layout group, but got none.")
        return torch.stack(parts).mean(0)


class RandomImportance(Importance):
    """Random scores: a baseline for benchmarks (seeded for reproducibility)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    def __call__(self, group: Any) -> torch.Tensor:
        """Return uniform random scores."""
        n = len(group[0].idxs)
        return torch.rand(n, generator=self._gen)

    def score_cuts(self, cuts: Sequence[Cut]) -> torch.Tensor:
        """Return uniform random scores, one per unit."""
        return torch.rand(len(cuts[0].units), generator=self._gen)

    def state_dict(self) -> dict[str, Any]:
        """The generator's state, so that a resumed run draws the same scores as an unbroken one."""
        return {"seed": self.seed, "generator": self._gen.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the generator saved by :meth:`state_dict`."""
        if "generator" in state:
            self._gen.set_state(state["generator"])


# ---------------------------------------------------------------------- channel reductions
def _index(idxs: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor([int(i) for i in idxs], dtype=torch.long, device=device)


def _per_channel(
    module: nn.Module, handler: Any, idxs: Sequence[int], tensors: Mapping[str, torch.Tensor | None]
) -> torch.Tensor | None:
    """Sum a weight-shaped score tensor (and a bias-shaped one) over the slice each channel owns.

    ``tensors`` maps ``"weight"`` / ``"bias"`` to element-wise scores shaped like those parameters.
    Returns one value per entry of ``idxs``, or ``None`` when the layer holds no such slice.
    """
    w, b = tensors.get("weight"), tensors.get("bias")
    transposed = bool(getattr(module, "transposed", False))
    out: torch.Tensor | None = None
    if handler in _OUT or handler in _DEPTHWISE:
        if w is not None:
            t = w.transpose(0, 1) if transposed else w
            out = t.flatten(1).sum(1).float()
        if b is not None:
            out = b.float() if out is None else out + b.float()
        return None if out is None else out[_index(idxs, out.device)]
    if handler in _IN:
        if w is None:
            return None
        t = w if transposed else w.transpose(0, 1)
        local = t.flatten(1).sum(1).float()
        groups = getattr(module, "groups", 1)
        if handler == tp_fn.prune_conv_in_channels and groups not in (1, module.in_channels):
            local = local.repeat(groups)
        return local[_index(idxs, local.device)]
    if handler in _NORM:
        for part in (w, b):
            if part is not None:
                out = part.float() if out is None else out + part.float()
        return None if out is None else out[_index(idxs, out.device)]
    return None


def reduce_over_group(
    group: Any,
    local: Callable[[nn.Module, Any, Sequence[int]], torch.Tensor | None],
    how: str = "sum",
) -> torch.Tensor | None:
    """Combine per-layer channel values of a group into one value per root channel.

    Each layer's values are first averaged per root channel (a linear layer after ``flatten`` owns
    several inputs per channel), then the layers are summed (``how="sum"``: the cost of removing the
    channel from every layer) or averaged (``how="mean"``). Returns ``None`` when no layer contributes.
    """
    n = len(group[0].idxs)
    total = torch.zeros(n)
    layers = torch.zeros(n)
    for i, (dep, idxs) in enumerate(group):
        root_idxs = group[i].root_idxs
        if any(r is None for r in root_idxs):
            continue
        values = local(dep.target.module, dep.handler, list(idxs))
        if values is None:
            continue
        values = values.detach().float().cpu()
        root = torch.as_tensor([int(r) for r in root_idxs], dtype=torch.long)
        acc = torch.zeros(n).scatter_add_(0, root, values)
        cnt = torch.zeros(n).scatter_add_(0, root, torch.ones_like(values))
        total += acc / cnt.clamp(min=1)
        layers += (cnt > 0).float()
    if not bool((layers > 0).any()):
        return None
    if how == "mean":
        return total / layers.clamp(min=1)
    return total


def _module_parameter(module: nn.Module, name: str) -> torch.Tensor | None:
    p = module._parameters.get(name) if isinstance(module, nn.Module) else None
    return p


# ---------------------------------------------------------------------- data-driven criteria
class _GradientStatistics(Importance):
    """What the gradient criteria share: statistics accumulated at every optimizer step.

    Per-key statistics are summed over processes before an event, carried in ``.grad`` during it, cleared
    after it, and checkpointed.

    Subclasses say which tensors they track (:meth:`_tracked`, cached between events: the modules an event
    leaves are the same objects) and what one step adds (:meth:`on_before_optimizer_step` via :meth:`_add`).
    """

    needs_training_statistics = True

    def __init__(self) -> None:
        self._acc: dict[str, torch.Tensor] = {}
        self.steps = 0
        self._model: nn.Module | None = None
        self._fallback = MagnitudeImportance(p=2)
        self._cache: tuple[weakref.ref[nn.Module], dict[str, Any]] | None = None

    @abc.abstractmethod
    def _find(self, model: nn.Module) -> dict[str, Any]:
        """The tracked entries of ``model`` by key."""

    def _tracked(self, model: nn.Module) -> dict[str, Any]:
        """:meth:`_find`, walked once per model between events (every step reads it)."""
        if self._cache is None or self._cache[0]() is not model:
            self._cache = (weakref.ref(model), self._find(model))
        return self._cache[1]

    @staticmethod
    def _allowed(optimizer: torch.optim.Optimizer | None) -> set[int] | None:
        """Ids of the parameters ``optimizer`` steps (``None``: every parameter)."""
        if optimizer is None:
            return None
        return {id(p) for g in optimizer.param_groups for p in g["params"]}

    def _add(self, key: str, contrib: torch.Tensor) -> None:
        """Add one step's contribution (non-finite values, a skipped AMP step, count as zero)."""
        contrib = torch.nan_to_num_(contrib, nan=0.0, posinf=0.0, neginf=0.0)
        acc = self._acc.get(key)
        if acc is None or acc.shape != contrib.shape:
            self._acc[key] = contrib
        else:
            if acc.device != contrib.device:  # statistics restored from a checkpoint live on the CPU
                acc = self._acc[key] = acc.to(contrib.device)
            acc.add_(contrib)

    def _missing(self) -> str:
        return (
            f"{type(self).__name__} has no gradient statistics: no optimizer step was seen since the last "
            "pruning event. The pruning callbacks feed it from `on_before_optimizer_step`; when scoring "
            "by hand, call `importance.on_before_optimizer_step(model)` after each backward pass."
        )

    def _sum_over_processes(self, keys: Sequence[str], reduce: Reduce | None, device: torch.device) -> None:
        """Sum the statistics of ``keys`` over processes in one collective, on ``device``."""
        if reduce is None or not keys:
            return
        flat = reduce(torch.cat([self._acc[k].to(device).flatten() for k in keys]))
        offset = 0
        for k in keys:
            n = self._acc[k].numel()
            self._acc[k] = flat[offset : offset + n].view_as(self._acc[k]).clone()
            offset += n

    def _check_prepared(self) -> None:
        if self._model is None:
            raise RuntimeError(f"{type(self).__name__} was called before `prepare(model)`.")

    def reset(self) -> None:
        """Clear the statistics and the ``.grad`` carriers."""
        if self._model is not None:
            for p in self._model.parameters():
                p.grad = None
        self._model = None
        self._acc = {}
        self.steps = 0
        self._cache = None  # the event may have removed modules

    def state_dict(self) -> dict[str, Any]:
        """The accumulated statistics (CPU copies) and the number of steps."""
        return {"acc": {k: v.detach().cpu().clone() for k, v in self._acc.items()}, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore statistics saved by :meth:`state_dict`."""
        self._acc = {str(k): v.clone() for k, v in dict(state.get("acc", {})).items()}
        self.steps = int(state.get("steps", 0))
        self._cache = None  # a rollback may have restored other modules


class TaylorImportance(_GradientStatistics):
    """First-order Taylor importance: ``sum |w * g|`` over the weights a channel owns.

    ``|w * g|`` is accumulated element-wise over every optimizer step since the last event, from the
    gradients Lightning hands to ``on_before_optimizer_step`` (already unscaled under AMP and complete
    under gradient accumulation), so no extra forward or backward pass is run. Non-finite contributions
    (a skipped AMP step) are ignored. The statistics take one float32 tensor per weight of the pruned
    layer types. During an event they are carried in the parameters' ``.grad`` (torch-pruning slices
    ``.grad`` together with the weights); every ``.grad`` of the model is cleared before and after the
    event. Groups whose layers received no gradient (frozen) fall back to weight magnitude.

    Args:
        bias: also count ``|b * db|`` of biases.

    """

    def __init__(self, bias: bool = True) -> None:
        if not isinstance(bias, bool):
            raise ValueError(f"Expected argument `bias` to be a bool, but got {bias!r}.")
        super().__init__()
        self.bias = bias

    def _find(self, model: nn.Module) -> dict[str, Any]:
        names = ("weight", "bias") if self.bias else ("weight",)
        targets = tuple(_magnitude_target_types())
        out: dict[str, tuple[nn.Module, str]] = {}
        for mname, m in model.named_modules():
            if (
                not isinstance(m, targets)
                and not _linear_like(m)
                and not type(m).__name__.endswith("RMSNorm")
            ):
                continue
            for pname in names:
                if m._parameters.get(pname) is not None:
                    out[f"{mname}.{pname}" if mname else pname] = (m, pname)
        return out

    @torch.no_grad()
    def on_before_optimizer_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Add ``|w * g|`` of this step (only the parameters of ``optimizer`` when given)."""
        allowed = self._allowed(optimizer)
        for key, (module, name) in self._tracked(model).items():
            p = module._parameters.get(name)
            g = p.grad if p is not None else None
            if p is None or g is None or g.is_sparse or (allowed is not None and id(p) not in allowed):
                continue
            self._add(key, (p.detach().float() * g.detach().float()).abs_())
        self.steps += 1

    @torch.no_grad()
    def prepare(
        self, model: nn.Module, calibration: Sequence[Any] = (), reduce: Reduce | None = None
    ) -> None:
        """Sum the statistics over processes and install them as ``.grad`` of the matching parameters.

        Raises:
            RuntimeError: no optimizer step was seen since the last event.

        """
        if not self._acc:
            raise RuntimeError(self._missing())
        live = {k: m._parameters[n] for k, (m, n) in self._find(model).items()}
        keys = sorted(k for k, v in self._acc.items() if k in live and live[k].shape == v.shape)
        if keys:
            self._sum_over_processes(keys, reduce, live[keys[0]].device)
        for p in model.parameters():
            p.grad = None
        for k in keys:
            p = live[k]
            p.grad = self._acc[k].to(device=p.device, dtype=p.dtype)
        self._model = model

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor:
        """Return the accumulated ``sum |w * g|`` of each channel, summed over the group's layers."""
        self._check_prepared()

        def local(module: nn.Module, handler: Any, idxs: Sequence[int]) -> torch.Tensor | None:
            tensors: dict[str, torch.Tensor | None] = {}
            for name in ("weight", "bias") if self.bias else ("weight",):
                p = _module_parameter(module, name)
                tensors[name] = p.grad if p is not None else None
            return _per_channel(module, handler, idxs, tensors)

        scores = reduce_over_group(group, local, how="sum")
        return scores if scores is not None else self._fallback(group)

    @torch.no_grad()
    def score_cuts(self, cuts: Sequence[Cut]) -> torch.Tensor:
        """The accumulated ``sum |w * g|`` over everything each unit owns (all cuts), or magnitude without it."""
        self._check_prepared()
        names = ("weight", "bias") if self.bias else ("weight",)
        parts = []
        for c in cuts:
            p = c.tensor
            if c.param in names and p is not None and p.grad is not None and p.grad.shape == p.shape:
                parts.append(c.per_unit(p.grad, reduce="sum"))
        if not parts:
            return self._fallback.score_cuts(cuts)
        return torch.stack(parts).sum(0)


def _reader_layout(module: nn.Module) -> tuple[int, int] | None:
    """``(input dimension of the weight, groups)`` of a layer that reads channels, or ``None``.

    Linear layers and ungrouped / depthwise convolutions; Hugging Face's ``Conv1D`` keeps its inputs on
    dimension 0, as do transposed convolutions. Grouped convolutions that are not depthwise are left out.
    """
    w = module._parameters.get("weight") if isinstance(module, nn.Module) else None
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        return None
    if isinstance(module, nn.Linear):
        return 1, 1
    if _linear_like(module):
        return 0, 1
    if isinstance(module, nn.modules.conv._ConvNd):
        groups = int(module.groups)
        if groups == 1:
            return (0 if module.transposed else 1), 1
        if groups == module.in_channels == module.out_channels and not module.transposed:
            return 0, groups  # depthwise: input channel c is read by the filter of output c alone
    return None


class GroupTaylorImportance(_GradientStatistics):
    """Group Taylor importance (Molchanov et al., CVPR 2019): the squared loss change of a channel, per step.

    Removing input channel ``c`` of a layer that reads it changes the loss, to first order, by the sum of
    ``w * g`` over the weights that read it (the loss gradient at the channel's activation times the
    activation, summed over the batch and positions). Unlike :class:`TaylorImportance`, which adds
    ``|w * g|`` element by element, that sum is taken *first* and squared at every optimizer step, so the
    score of a channel is ``sum over steps of (sum_k w[k, c] * g[k, c])^2``, summed over the layers of the
    group that read it (and over the channels of a unit such as an attention head): it estimates what
    removing the whole channel costs, not the size of its weights' updates.

    Between events it keeps one float32 value per input channel of every linear layer and every ungrouped
    or depthwise convolution (about the width of the layers, not a copy of the model). During an event the
    values are carried in the weights' ``.grad`` (one value repeated along the input dimension;
    torch-pruning slices ``.grad`` with the weights), so later rounds of the event score exactly the
    channels that are left; every ``.grad`` of the model is cleared before and after the event. Channels no
    tracked layer reads (grouped convolutions, attention products) fall back to weight magnitude. Under
    DDP the per-process sums are added. Non-finite contributions (a skipped AMP step) are ignored.

    Args:
        strict: raise when an event comes before any optimizer step was seen; ``False`` (the callbacks' default
            criterion) scores that event by weight magnitude instead, with a warning.

    """

    def __init__(self, strict: bool = True) -> None:
        if not isinstance(strict, bool):
            raise ValueError(f"Expected argument `strict` to be a bool, but got {strict!r}.")
        super().__init__()
        self.strict = strict

    def _find(self, model: nn.Module) -> dict[str, Any]:
        out: dict[str, tuple[nn.Module, int, int]] = {}
        for name, m in model.named_modules():
            layout = _reader_layout(m)
            if layout is not None:
                out[f"{name}.weight" if name else "weight"] = (m, *layout)
        return out

    @staticmethod
    def _per_input(values: torch.Tensor, dim: int, groups: int) -> torch.Tensor:
        """``values`` (shaped like ``w``) summed over everything but the input channel: one value per input."""
        if groups > 1:  # depthwise: the input channel is the filter's row
            return values.flatten(1).sum(1, dtype=torch.float32)
        others = [d for d in range(values.dim()) if d != dim]
        return values.sum(dim=others, dtype=torch.float32)

    @torch.no_grad()
    def on_before_optimizer_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Add ``(sum of w * g over each input channel)^2`` of this step."""
        allowed = self._allowed(optimizer)
        for key, (module, dim, groups) in self._tracked(model).items():
            p = module._parameters.get("weight")
            g = p.grad if p is not None else None
            if p is None or g is None or g.is_sparse or (allowed is not None and id(p) not in allowed):
                continue
            self._add(key, self._per_input(p.detach() * g.detach(), dim, groups).pow_(2))
        self.steps += 1

    @staticmethod
    def _width(module: nn.Module, dim: int, groups: int) -> int:
        w = module._parameters["weight"]
        assert w is not None
        return int(w.shape[0] if groups > 1 else w.shape[dim])

    @torch.no_grad()
    def prepare(
        self, model: nn.Module, calibration: Sequence[Any] = (), reduce: Reduce | None = None
    ) -> None:
        """Sum the statistics over processes and carry them in the readers' ``.grad``.

        Raises:
            RuntimeError: no optimizer step was seen since the last event.

        """
        if not self._acc:
            if self.strict:
                raise RuntimeError(self._missing())
            warnings.warn(self._missing() + " This event scores by weight magnitude.", stacklevel=2)
        readers = self._find(model)
        keys = sorted(
            k for k, v in self._acc.items() if k in readers and v.numel() == self._width(*readers[k])
        )
        if keys:
            self._sum_over_processes(keys, reduce, readers[keys[0]][0].weight.device)
        for p in model.parameters():
            p.grad = None
        for k in keys:
            module, dim, groups = readers[k]
            w = module._parameters["weight"]
            assert w is not None
            values = self._acc[k].to(device=w.device, dtype=w.dtype)
            shape = [1] * w.dim()
            shape[0 if groups > 1 else dim] = -1
            w.grad = values.view(shape).expand_as(w).contiguous()
        self._model = model

    @staticmethod
    def _carried(module: nn.Module) -> tuple[torch.Tensor, int, int] | None:
        layout = _reader_layout(module)
        w = module._parameters.get("weight") if layout is not None else None
        if layout is None or w is None or w.grad is None or w.grad.shape != w.shape:
            return None
        return w.grad, layout[0], layout[1]

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor:
        """Return each channel's accumulated squared loss change, summed over the group's readers."""
        self._check_prepared()

        def local(module: nn.Module, handler: Any, idxs: Sequence[int]) -> torch.Tensor | None:
            if handler not in _IN and handler not in _DEPTHWISE:
                return None
            carried = self._carried(module)
            if carried is None:
                return None
            grad, dim, groups = carried
            # one value repeated along the input's slice: its mean is that value
            per = self._per_input(grad, dim, groups) / (grad.numel() // self._width(module, dim, groups))
            return per[_index(idxs, per.device)]

        scores = reduce_over_group(group, local, how="sum")
        return scores if scores is not None else self._fallback(group)

    @torch.no_grad()
    def score_cuts(self, cuts: Sequence[Cut]) -> torch.Tensor:
        """Each unit's accumulated squared loss change: summed over its channels and the cuts that read them."""
        self._check_prepared()
        parts = []
        for c in cuts:
            if c.role != "in" or c.param != "weight":
                continue
            carried = self._carried(c.module)
            if carried is None or carried[2] > 1 or carried[1] != c.dim:
                continue
            grad = carried[0]
            per = c.per_index(grad) / (grad.numel() // grad.shape[c.dim])
            parts.append(c.units_of(per, reduce="sum"))
        if not parts:
            return self._fallback.score_cuts(cuts)
        return torch.stack(parts).sum(0)


class ActivationImportance(Importance):
    """Activation statistics of each channel, from forward hooks over calibration batches.

    The statistic is taken where a channel is *consumed*: at the input of every convolution and linear
    layer that reads it (after ReLU-like functions, pooling, ...). With ``statistic="mean"`` the score is
    the mean ``|activation|``; with ``"apoz"`` it is ``1 - APoZ`` (the fraction of non-zero activations),
    so channels that are almost always zero go first. The model runs in eval mode without gradients;
    hooks are removed right after. Statistics are gathered again when an event has changed a layer's
    width. Groups no layer reads (none in practice) fall back to weight magnitude.

    With ``weighted=True`` each channel's statistic is multiplied by the L2 norm of the weights that read
    it (``||W[:, c]||``, over output channels and kernel positions of each consuming layer), so the score
    estimates how much the channel contributes to the next layer's output rather than how active it is
    (the activation-times-weight idea of Wanda, Sun et al., 2023). A rarely active channel that the next
    layer weighs heavily is then kept.

    Args:
        statistic: ``"mean"`` or ``"apoz"``.
        num_batches: use the last ``num_batches`` calibration inputs (default: all the callback keeps,
            see its ``calibration_batches``).
        weighted: multiply by the consuming weights' norm (see above).

    """

    needs_calibration = True

    def __init__(
        self, statistic: str = "mean", num_batches: int | None = None, weighted: bool = False
    ) -> None:
        self.statistic = check_choice("statistic", statistic, ("mean", "apoz"))
        self.num_batches = check_int("num_batches", num_batches, minimum=1, allow_none=True)
        if not isinstance(weighted, bool):
            raise ValueError(f"Expected argument `weighted` to be a bool, but got {weighted!r}.")
        self.weighted = weighted
        self._stats: dict[nn.Module, torch.Tensor] = {}
        self._model: nn.Module | None = None
        self._batches: list[Any] = []
        self._reduce: Reduce | None = None
        self._fallback = MagnitudeImportance(p=2)

    def prepare(
        self, model: nn.Module, calibration: Sequence[Any] = (), reduce: Reduce | None = None
    ) -> None:
        """Run the calibration inputs through ``model`` and record per-channel input statistics.

        Raises:
            RuntimeError: there are no calibration inputs.

        """
        batches = list(calibration)
        if self.num_batches is not None:
            batches = batches[-self.num_batches :]
        if not batches:
            raise RuntimeError(
                "ActivationImportance needs calibration inputs, but got none. Set the pruning callback's "
                "`calibration_batches` to at least 1 (or pass `calibration` to `prepare`)."
            )
        self._model, self._batches, self._reduce = model, batches, reduce
        self._collect()

    @staticmethod
    def _in_width(module: nn.Module) -> int:
        if isinstance(module, nn.modules.conv._ConvNd):
            return int(module.in_channels)
        if _linear_like(module):
            return int(module.weight.shape[0])  # type: ignore[union-attr,index]
        return int(module.in_features)  # type: ignore[arg-type]

    @torch.no_grad()
    def _collect(self) -> None:
        assert self._model is not None
        model = self._model
        layers = [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or _linear_like(m)
        ]
        sums: dict[nn.Module, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            x = x.detach().float()
            if isinstance(module, nn.modules.conv._ConvNd):
                x = x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() > 1 else x.view(1, -1)
            else:
                x = x.reshape(-1, x.shape[-1]).t()
            stats = torch.stack(
                [x.abs().sum(1), (x == 0).float().sum(1), torch.full_like(x[:, 0], x.shape[1])]
            )
            sums[module] = stats if module not in sums else sums[module] + stats

        handles = [m.register_forward_hook(hook) for _, m in layers]
        device, dtype = model_device_dtype(model)
        try:
            with preserved_modes(model):
                model.eval()
                for batch in self._batches:
                    call_model(model, move_to(batch, device, dtype))
        finally:
            for h in handles:
                h.remove()
        seen = [m for _, m in layers if m in sums]
        if self._reduce is not None and seen:
            flat = self._reduce(torch.cat([sums[m].flatten() for m in seen]))
            offset = 0
            for m in seen:
                n = sums[m].numel()
                sums[m] = flat[offset : offset + n].view_as(sums[m])
                offset += n
        self._stats = {}
        for m in seen:
            abs_sum, zeros, count = sums[m].cpu()
            count = count.clamp(min=1)
            self._stats[m] = abs_sum / count if self.statistic == "mean" else 1.0 - zeros / count

    def _stale(self, group: Any) -> bool:
        for dep, _ in group:
            m = dep.target.module
            if dep.handler in _IN and (m not in self._stats or self._stats[m].numel() != self._in_width(m)):
                return True
        return False

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor:
        """Return the mean activation statistic of each channel over the layers that read it."""
        if self._model is None:
            raise RuntimeError("ActivationImportance was called before `prepare(model, calibration)`.")
        if self._stale(group):
            self._collect()

        def local(module: nn.Module, handler: Any, idxs: Sequence[int]) -> torch.Tensor | None:
            if handler not in _IN or module not in self._stats:
                return None
            stats = self._stats[module]
            if stats.numel() != self._in_width(module):
                return None
            if self.weighted:
                weight = module.weight
                assert isinstance(weight, torch.Tensor)
                w = weight.detach().float()
                w = w.t() if isinstance(module, nn.Linear) else w.transpose(0, 1).flatten(1)
                if w.shape[0] == stats.numel():  # grouped convolutions keep the plain statistic
                    stats = stats * w.norm(dim=1).cpu()
            return stats[_index(idxs, stats.device)]

        scores = reduce_over_group(group, local, how="mean")
        return scores if scores is not None else self._fallback(group)

    @torch.no_grad()
    def score_cuts(self, cuts: Sequence[Cut]) -> torch.Tensor:
        """The activation statistic where each unit's channels are read (``in`` cuts), averaged over them."""
        if self._model is None:
            raise RuntimeError("ActivationImportance was called before `prepare(model, calibration)`.")
        readers = [c for c in cuts if c.role == "in" and c.param == "weight" and c.tensor is not None]
        if any(
            c.module not in self._stats or self._stats[c.module].numel() != self._in_width(c.module)
            for c in readers
        ):
            self._collect()
        parts = []
        for c in readers:
            stats = self._stats.get(c.module)
            if stats is None or stats.numel() != self._in_width(c.module):
                continue
            w = c.tensor
            assert w is not None
            if self.weighted:
                cols = w.detach().float().transpose(0, c.dim).reshape(w.shape[c.dim], -1)
                stats = stats * cols.norm(dim=1).cpu()
            # `stats` is indexed by the reader's input channel, which is the cut's dimension.
            idx = torch.as_tensor(c.units, dtype=torch.long)
            parts.append(stats[idx].mean(1))
        if not parts:
            return self._fallback.score_cuts(cuts)
        return torch.stack(parts).mean(0)

    def reset(self) -> None:
        """Drop the statistics and the references to the model and calibration inputs."""
        self._stats = {}
        self._model = None
        self._batches = []
        self._reduce = None


class BNScaleImportance(Importance):
    """Network-slimming importance: ``|gamma|`` of the normalisation layers that follow a channel.

    Groups without a normalisation layer fall back to weight magnitude (levels normalise scores per
    group, so the two scales do not compete directly).
    """

    def __init__(self) -> None:
        self._fallback = MagnitudeImportance(p=2)

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor:
        """Return the mean ``|gamma|`` of each channel over the group's normalisation layers."""

        def local(module: nn.Module, handler: Any, idxs: Sequence[int]) -> torch.Tensor | None:
            if handler not in _NORM:
                return None
            w = _module_parameter(module, "weight")
            if w is None:
                return None
            return w.detach().abs()[_index(idxs, w.device)]

        scores = reduce_over_group(group, local, how="mean")
        return scores if scores is not None else self._fallback(group)

    @torch.no_grad()
    def score_cuts(self, cuts: Sequence[Cut]) -> torch.Tensor:
        """The mean ``|gamma|`` of the normalisation layers over each unit's channels."""
        parts = [
            c.per_unit(c.tensor.abs())
            for c in cuts
            if c.role == "norm" and c.param == "weight" and c.tensor is not None
        ]
        if not parts:
            return self._fallback.score_cuts(cuts)
        return torch.stack(parts).mean(0)


# ---------------------------------------------------------------------- combination
NORMALISERS = ("mean", "max", "rank")


def normalise_scores(scores: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Put one group's scores on a common scale.

    ``"mean"`` / ``"max"`` divide by the mean / max of ``|scores|``; ``"rank"`` gives ranks in [0, 1].
    """
    scores = scores.float()
    if how == "rank":
        n = scores.numel()
        if n < 2:
            return torch.ones_like(scores)
        ranks = torch.empty_like(scores)
        ranks[torch.argsort(scores, stable=True)] = torch.arange(n, dtype=scores.dtype)
        return ranks / (n - 1)
    ref = scores.abs().max() if how == "max" else scores.abs().mean()
    return scores / ref if ref > 0 else torch.zeros_like(scores)


def _instantiate(spec: Mapping[str, Any]) -> Importance:
    path = spec.get("class_path")
    if not isinstance(path, str) or "." not in path:
        raise ValueError(
            "Expected a criterion given as a mapping to have a `class_path` like "
            f"'lightning_hprune.core.importance.TaylorImportance', but got {dict(spec)!r}."
        )
    module_name, _, cls_name = path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Importance)):
        raise ValueError(f"Expected `class_path` to name an `Importance` subclass, but got {path!r}.")
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise ValueError(f"Expected `init_args` of {path!r} to be a mapping, but got {init_args!r}.")
    return cls(**dict(init_args))


class IntegratedImportance(Importance):
    """A weighted combination of criteria, each normalised per group before combining.

    Args:
        criteria: ``Importance`` objects, short names (``"l2"``, ``"taylor"``, ...) or mappings
            ``{"class_path": ..., "init_args": {...}}`` (as in a LightningCLI YAML file).
        weights: one non-negative weight per criterion (default: equal); they need not sum to one.
        normalizer: ``"mean"`` (divide by the group's mean), ``"max"`` or ``"rank"`` (ranks in [0, 1]).

    Example YAML (``importance:`` of a pruning callback)::

        class_path: lightning_hprune.core.importance.IntegratedImportance
        init_args:
          criteria:
            - class_path: lightning_hprune.core.importance.TaylorImportance
            - class_path: lightning_hprune.core.importance.MagnitudeImportance
              init_args: {p: 2}
          weights: [0.7, 0.3]

    """

    def __init__(
        self,
        criteria: Sequence[Importance | str | Mapping[str, Any]],
        weights: Sequence[float] | None = None,
        normalizer: str = "mean",
    ) -> None:
        if (
            isinstance(criteria, (str, Mapping, Importance))
            or not isinstance(criteria, Sequence)
            or not criteria
        ):
            raise ValueError(
                f"Expected argument `criteria` to be a non-empty list of criteria, but got {criteria!r}."
            )
        self.criteria = [
            _instantiate(c) if isinstance(c, Mapping) else resolve_importance(c) for c in criteria
        ]
        if weights is None:
            weights = [1.0] * len(self.criteria)
        if (
            isinstance(weights, (str, bytes))
            or not isinstance(weights, Sequence)
            or len(weights) != len(self.criteria)
        ):
            raise ValueError(
                f"Expected argument `weights` to be a list of {len(self.criteria)} numbers (one per "
                f"criterion), but got {weights!r}."
            )
        self.weights = [check_positive("weights", w, allow_zero=True) for w in weights]
        if sum(self.weights) <= 0:
            raise ValueError(
                f"Expected argument `weights` to have a positive sum, but got {list(weights)!r}."
            )
        self.normalizer = check_choice("normalizer", normalizer, NORMALISERS)

    @property
    def needs_training_statistics(self) -> bool:  # type: ignore[override]
        """True when any member criterion needs training statistics."""
        return any(c.needs_training_statistics for c in self.criteria)

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        """True when any member criterion needs calibration inputs."""
        return any(c.needs_calibration for c in self.criteria)

    def __call__(self, group: Any) -> torch.Tensor:
        """Return the weighted sum of the members' per-group normalised scores."""
        total: torch.Tensor | None = None
        for crit, w in zip(self.criteria, self.weights, strict=True):
            if w == 0:
                continue
            part = w * normalise_scores(crit(group).detach().float().cpu(), self.normalizer)
            total = part if total is None else total + part
        assert total is not None
        return total

    def score_cuts(self, cuts: Sequence[Cut]) -> torch.Tensor:
        """Return the weighted sum of the members' normalised unit scores."""
        total: torch.Tensor | None = None
        for crit, w in zip(self.criteria, self.weights, strict=True):
            if w == 0:
                continue
            part = w * normalise_scores(crit.score_cuts(cuts).detach().float().cpu(), self.normalizer)
            total = part if total is None else total + part
        assert total is not None
        return total

    def on_before_optimizer_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Forward to every member."""
        for c in self.criteria:
            c.on_before_optimizer_step(model, optimizer)

    def prepare(
        self, model: nn.Module, calibration: Sequence[Any] = (), reduce: Reduce | None = None
    ) -> None:
        """Forward to every member."""
        for c in self.criteria:
            c.prepare(model, calibration, reduce)

    def reset(self) -> None:
        """Forward to every member."""
        for c in self.criteria:
            c.reset()

    def state_dict(self) -> dict[str, Any]:
        """The members' statistics, by position."""
        return {"criteria": [c.state_dict() for c in self.criteria]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the members' statistics."""
        for c, s in zip(self.criteria, state.get("criteria", []), strict=False):
            c.load_state_dict(s)


IMPORTANCES: dict[str, Callable[[], Importance]] = {
    "magnitude": MagnitudeImportance,
    "l1": lambda: MagnitudeImportance(p=1),
    "l2": MagnitudeImportance,
    "random": RandomImportance,
    "taylor": TaylorImportance,
    "group_taylor": GroupTaylorImportance,
    "activation": ActivationImportance,
    "apoz": lambda: ActivationImportance(statistic="apoz"),
    "activation_weighted": lambda: ActivationImportance(weighted=True),
    "bn_scale": BNScaleImportance,
}


def resolve_importance(importance: Importance | str | Mapping[str, Any] | None) -> Importance:
    """Accept an ``Importance`` object, a short name or a ``{"class_path": ..., "init_args": ...}`` mapping.

    Short names: ``"l1"``, ``"l2"``/``"magnitude"``, ``"random"``, ``"taylor"``, ``"group_taylor"``,
    ``"activation"``, ``"apoz"``, ``"activation_weighted"``, ``"bn_scale"``.
    """
    if importance is None:
        return MagnitudeImportance(p=2)
    if isinstance(importance, Importance):
        return importance
    if isinstance(importance, str):
        check_choice("importance", importance, IMPORTANCES)
        return IMPORTANCES[importance]()
    if isinstance(importance, Mapping):
        return _instantiate(importance)
    raise ValueError(
        "Expected argument `importance` to be an `Importance` object or one of "
        f"{sorted(IMPORTANCES)}, but got {importance!r} ({type(importance).__name__})."
    )
