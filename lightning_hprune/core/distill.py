"""Knowledge distillation from the dense model: the Lightning-free parts.

While a model is pruned, a frozen copy of it taken just before the first event (or a teacher the user
gives) can guide the recovery: the student's logits are pulled towards the teacher's with

``term = alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T))``

averaged over the samples (or, for token-level logits ``(batch, length, vocabulary)``, over the tokens the
padding mask keeps), plus, optionally, a hidden-state loss between matching layers (Minitron-style, off by
default). This module holds what does not need Lightning:

* :class:`Distillation` and :class:`HiddenStates`: the settings, validated at construction;
* :func:`logits_of`, :func:`token_mask`, :func:`logit_loss`, :func:`hidden_loss`: finding the logits in a
  forward's output and the loss itself;
* :func:`frozen_copy`: the teacher, copied once, directly to its device and dtype;
* :class:`ForwardCapture`: the outermost forward calls of a module (and outputs of named layers) while a
  training step runs;
* :class:`ChannelMaps`: which teacher channels each pruned student layer kept (for the hidden-state loss);
* :class:`StepCost`: the teacher's measured cost per step.

The callback glue (``lightning_hprune.callbacks.distillation``) wires them into ``training_step``.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_hprune.core.validation import check_choice, check_positive

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


class DistillationError(ValueError):
    """The distillation term would be meaningless (no logits found, shapes differ from the teacher's, ...)."""


# ---------------------------------------------------------------------- settings
class HiddenStates:
    """A hidden-state loss between matching layers of the student and the teacher (Minitron-style).

    Each named student layer's output is compared with the teacher layer's output on the channels the
    student still has: pruning keeps a subset of the dense model's channels, and :class:`ChannelMaps` knows
    which, so no projection (and no extra trainable parameter) is needed. That needs a teacher with the
    student's dense architecture (the default copy, or a checkpoint of the same module), and layers with a
    weight whose output dimension torch-pruning slices: ``nn.Linear``, convolutions, normalisation layers,
    ``nn.Embedding`` (name e.g. ``"encoder.layer.3.output.LayerNorm"`` for a BERT block's output). A
    layer that a block removal takes away drops out of the loss.

    Args:
        layers: student layer names (the teacher's have the same names), or ``{student name: teacher name}``.
        weight: the loss's weight in the term added to the user's loss (> 0).
        loss: ``"mse"`` (mean squared error over the kept channels) or ``"cosine"`` (1 - cosine similarity
            along the channel dimension, averaged).

    """

    def __init__(
        self, layers: Sequence[str] | Mapping[str, str], weight: float = 1.0, loss: str = "mse"
    ) -> None:
        if isinstance(layers, Mapping):
            pairs = [(k, v) for k, v in layers.items()]
        elif isinstance(layers, (list, tuple)):
            pairs = [(n, n) for n in layers]
        else:
            pairs = []
        if not pairs or not all(isinstance(a, str) and a and isinstance(b, str) and b for a, b in pairs):
            raise ValueError(
                "Expected argument `layers` to be a non-empty list of layer names or a {student: teacher} "
                f"mapping of names, but got {layers!r}."
            )
        self.pairs: list[tuple[str, str]] = pairs
        self.weight = check_positive("weight", weight)
        self.loss = check_choice("loss", loss, ("mse", "cosine"))

    def __repr__(self) -> str:
        layers: Any = [a for a, _ in self.pairs] if all(a == b for a, b in self.pairs) else dict(self.pairs)
        return f"HiddenStates(layers={layers!r}, weight={self.weight!r}, loss={self.loss!r})"


class Distillation:
    """Recover a model while it is pruned by distilling from the dense model (or a teacher you give).

    Give it to any pruning callback (``HierarchicalPruning(distillation=Distillation())``): nothing changes
    in your ``training_step``. The callback sees the inputs and outputs of the model's forward during each
    training step, runs the teacher on the same inputs (eval mode, no gradients) and adds to the loss your
    ``training_step`` returns (a tensor, or a dict's ``"loss"``)::

        alpha * T**2 * KL(softmax(teacher_logits / T) || softmax(student_logits / T))

    averaged over the samples; token-level logits ``(batch, length, vocabulary)`` are averaged over the
    tokens the padding mask (the call's ``mask_key`` argument) keeps. With ``hidden``, a hidden-state loss
    between matching layers is added too.

    Args:
        alpha: weight of the logit term (> 0).
        temperature: softmax temperature ``T`` (> 0); the ``T**2`` factor keeps the gradient's scale.
        teacher: ``None`` (default): a frozen copy of the dense model, taken just before the first pruning
            event (distillation starts after it); a module called like the student's (used as given: frozen,
            put in eval mode, moved to ``device``/``dtype`` in place); or the path of a Lightning checkpoint
            of the same LightningModule class (pruned or not), loaded with
            :func:`lightning_hprune.load_pruned`. A given teacher is used from the first training step.
        device: where the teacher lives: ``None`` (the training device) or e.g. ``"cpu"`` (saves
            accelerator memory; slower).
        dtype: the teacher's parameter dtype: ``None`` (as the model), ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        logits_key: where the logits are in the forward's output when it is not a tensor: a key of a dict or
            a Hugging Face ``ModelOutput`` (default ``"logits"``), or an index into a tuple.
        mask_key: the forward argument holding the padding mask of token-level logits (a keyword argument,
            or a key of a dict given as the first argument; 1 = a real token).
        module: the name of the submodule whose forward is distilled (``""`` = the LightningModule itself).
            ``None`` (default): the LightningModule if ``training_step`` calls it, else the one direct
            child it calls (``self.model(**batch)``); anything else is refused at the first step.
        hidden: a :class:`HiddenStates` loss between matching layers, or ``None`` (default).

    Example::

        HierarchicalPruning(target=0.5, distillation=Distillation(alpha=1.0, temperature=2.0))

    """

    def __init__(
        self,
        alpha: float = 1.0,
        temperature: float = 2.0,
        teacher: nn.Module | str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        logits_key: str | int = "logits",
        mask_key: str | None = "attention_mask",
        module: str | None = None,
        hidden: HiddenStates | None = None,
    ) -> None:
        self.alpha = check_positive("alpha", alpha)
        self.temperature = check_positive("temperature", temperature)
        if isinstance(teacher, os.PathLike):
            teacher = os.fspath(teacher)
        if teacher is not None and not isinstance(teacher, (nn.Module, str)):
            raise ValueError(
                "Expected argument `teacher` to be None (a copy of the dense model), an nn.Module or the path "
                f"of a Lightning checkpoint, but got {teacher!r} ({type(teacher).__name__})."
            )
        if isinstance(teacher, str) and not os.path.isfile(teacher):
            raise ValueError(
                f"Expected argument `teacher` to be the path of a Lightning checkpoint file, but {teacher!r} "
                "is not a file."
            )
        self.teacher = teacher
        try:
            self.device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"Expected argument `device` to be None or a device such as 'cpu' or 'cuda:0', but got {device!r}."
            ) from err
        self.dtype = resolve_dtype(dtype)
        if isinstance(logits_key, bool) or not isinstance(logits_key, (str, int)):
            raise ValueError(
                f"Expected argument `logits_key` to be a key (str) or a tuple index (int), but got {logits_key!r}."
            )
        self.logits_key = logits_key
        if mask_key is not None and not isinstance(mask_key, str):
            raise ValueError(
                f"Expected argument `mask_key` to be an argument name or None, but got {mask_key!r}."
            )
        self.mask_key = mask_key
        if module is not None and not isinstance(module, str):
            raise ValueError(
                f"Expected argument `module` to be a submodule name ('' = the LightningModule) or None, but got "
                f"{module!r}."
            )
        self.module = module
        if hidden is not None and not isinstance(hidden, HiddenStates):
            raise ValueError(
                f"Expected argument `hidden` to be a `HiddenStates` or None, but got {hidden!r}."
            )
        self.hidden = hidden

    @property
    def source(self) -> str:
        """``"dense"`` (a copy at the first event), ``"module"`` or ``"path"``."""
        if self.teacher is None:
            return "dense"
        return "path" if isinstance(self.teacher, str) else "module"

    def __repr__(self) -> str:
        teacher = (
            None
            if self.teacher is None
            else (self.teacher if isinstance(self.teacher, str) else f"<{type(self.teacher).__name__}>")
        )
        return (
            f"Distillation(alpha={self.alpha!r}, temperature={self.temperature!r}, teacher={teacher!r}, "
            f"device={None if self.device is None else str(self.device)!r}, dtype={self.dtype!r}, "
            f"logits_key={self.logits_key!r}, mask_key={self.mask_key!r}, module={self.module!r}, "
            f"hidden={self.hidden!r})"
        )


def resolve_dtype(dtype: Any) -> torch.dtype | None:
    """``None``, a ``torch.dtype`` of floating point, or one of ``"bf16"``, ``"fp16"``, ``"fp32"``."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(
        f"Expected argument `dtype` to be None, 'bf16', 'fp16', 'fp32' or a floating torch.dtype, but got {dtype!r}."
    )


# ---------------------------------------------------------------------- what a forward returned
def describe(obj: Any, depth: int = 0) -> str:
    """A short description of a forward's output (types and tensor shapes), for error messages."""
    if isinstance(obj, torch.Tensor):
        return f"Tensor{list(obj.shape)} {str(obj.dtype).removeprefix('torch.')}"
    if depth >= 2:
        return type(obj).__name__
    if isinstance(obj, Mapping):
        items = ", ".join(f"{k!r}: {describe(v, depth + 1)}" for k, v in list(obj.items())[:6])
        return f"{type(obj).__name__} {{{items}{', ...' if len(obj) > 6 else ''}}}"
    if isinstance(obj, (tuple, list)):
        items = ", ".join(describe(v, depth + 1) for v in obj[:6])
        return f"a {type(obj).__name__} of ({items}{', ...' if len(obj) > 6 else ''})"
    return f"a {type(obj).__name__}"


def logits_of(output: Any, key: str | int = "logits") -> torch.Tensor:
    """The logits in a forward's output: the tensor itself, ``output[key]`` / ``output.key``, or ``output[i]``.

    Raises:
        DistillationError: no floating-point logits tensor (of at least 2 dimensions) is found; the message
            says what the output holds.

    """
    found: Any = None
    if isinstance(output, torch.Tensor):
        found = output
    elif isinstance(key, str) and isinstance(output, Mapping):
        found = output.get(key)
    elif isinstance(key, str) and hasattr(output, key) and not isinstance(output, (tuple, list)):
        found = getattr(output, key)
    elif isinstance(key, int) and isinstance(output, (tuple, list)) and -len(output) <= key < len(output):
        found = output[key]
    if isinstance(found, torch.Tensor) and found.is_floating_point() and found.dim() >= 2:
        return found
    where = f"under {key!r}" if isinstance(key, str) else f"at index {key}"
    raise DistillationError(
        f"Expected the distilled forward to return logits (a floating tensor of shape (batch, ..., classes), "
        f"or one {where}), but it returned {describe(output)}. Set `Distillation(logits_key=...)` to the key "
        "or tuple index of the logits, or `Distillation(module=...)` to the submodule that returns them."
    )


def find_argument(args: Sequence[Any], kwargs: Mapping[str, Any], key: str | None) -> Any:
    """A forward argument by name: a keyword argument, or a key of a dict given as the first argument."""
    if key is None:
        return None
    if key in kwargs:
        return kwargs[key]
    if args and isinstance(args[0], Mapping):
        return args[0].get(key)
    return None


def token_mask(logits: torch.Tensor, mask: Any) -> torch.Tensor | None:
    """The padding mask of token-level logits ``(batch, length, vocabulary)`` as booleans, or ``None``.

    Raises:
        DistillationError: a mask is given but its shape is not the logits' ``(batch, length)``.

    """
    if logits.dim() < 3 or mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(logits.shape[:-1]):
        raise DistillationError(
            f"Expected the padding mask of the token-level logits {describe(logits)} to have shape "
            f"{list(logits.shape[:-1])}, but got {describe(mask)}. Set `Distillation(mask_key=None)` to use "
            "every position, or name the right argument with `mask_key`."
        )
    return mask.to(logits.device).bool()


# ---------------------------------------------------------------------- the loss
def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def logit_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, summed over the last dimension.

    Averaged over the samples (``(batch, classes)``), or over the positions ``mask`` keeps (token level).
    Computed in float32; gradients flow into ``student`` only.
    """
    if tuple(student.shape) != tuple(teacher.shape):
        raise DistillationError(
            f"Expected the teacher's logits to have the student's shape, but the student gave "
            f"{describe(student)} and the teacher {describe(teacher)}."
        )
    t = temperature
    with torch.autocast(student.device.type, enabled=False):
        log_s = F.log_softmax(student.float() / t, dim=-1)
        log_t = F.log_softmax(teacher.detach().to(student.device).float() / t, dim=-1)
        kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
        return (t * t) * _masked_mean(kl, mask)


def hidden_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str = "mse",
    channel_dim: int = -1,
    index: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A hidden-state loss on the student's channels (``index``: the teacher channels they are), in float32.

    ``mask`` (``(batch, length)``) restricts 3-D hidden states ``(batch, length, channels)`` to real tokens.
    """
    t = teacher.detach().to(student.device)
    if index is not None:
        t = t.index_select(channel_dim, index.to(t.device))
    if t.shape != student.shape:
        raise DistillationError(
            f"Expected the teacher's hidden state (on the student's channels) to have the student's shape, but "
            f"the student gave {describe(student)} and the teacher {describe(t)}."
        )
    keep = (
        mask
        if mask is not None and student.dim() == 3 and tuple(mask.shape) == tuple(student.shape[:2])
        else None
    )
    with torch.autocast(student.device.type, enabled=False):
        s, t = student.float(), t.float()
        if kind == "cosine":
            per = 1.0 - F.cosine_similarity(s, t, dim=channel_dim)
            return _masked_mean(per, keep if per.dim() == 2 else None)
        per = (s - t).pow(2)
        if keep is not None:
            return _masked_mean(per.mean(-1), keep)
        return per.mean()


def output_dims(module: nn.Module) -> tuple[int, int]:
    """``(channel dimension of the output, output dimension of the weight)`` of a layer with a weight."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 1, 1
    if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return 1, 0
    if isinstance(module, nn.Embedding):
        return -1, 1
    return -1, 0


# ---------------------------------------------------------------------- the teacher
def frozen_copy(
    module: nn.Module,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    skip: Sequence[Any] = (),
    weights: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A frozen copy of ``module`` (eval mode, no gradients), made once, directly on ``device`` in ``dtype``.

    Parameters and buffers are copied straight to their destination (no intermediate second copy on the
    module's device); floating-point ones take ``dtype``. Objects in ``skip`` (a Trainer the module points
    at) are not copied: the copy holds ``None`` instead. Shared (tied) parameters stay shared.

    Args:
        module: what to copy.
        device: where the copy's tensors go (default: where they are).
        dtype: the floating-point dtype of the copy's tensors (default: theirs).
        skip: objects referenced by the module that the copy must not duplicate.
        weights: values to give the copy instead of the module's (a ``state_dict`` of the same structure;
            tensors it lacks, such as non-persistent buffers, come from the module).

    Raises:
        TypeError: something in the module cannot be deep-copied (the message says to give a teacher).
        DistillationError: ``weights`` does not have the module's tensor names and shapes.

    """
    memo: dict[int, Any] = {id(obj): None for obj in skip if obj is not None}
    values = dict(weights or {})
    if weights is not None:
        own = module.state_dict()
        wrong = sorted(set(own) ^ set(values)) + sorted(
            k for k in set(own) & set(values) if tuple(own[k].shape) != tuple(values[k].shape)
        )
        if wrong:
            raise DistillationError(
                f"Expected the stored teacher weights to fit {type(module).__name__} (the dense model), but "
                f"{len(wrong)} tensors differ in name or shape, e.g. {wrong[:4]}. The teacher is rebuilt from "
                "the module given to `fit` before its pruned structure is restored: give `fit` a freshly built "
                "(unpruned) module."
            )

    def target(t: torch.Tensor, name: str) -> torch.Tensor:
        src = values.get(name, t)
        dt = dtype if dtype is not None and src.is_floating_point() else src.dtype
        return src.detach().to(device=device or t.device, dtype=dt, copy=True)

    for name, p in module.named_parameters(remove_duplicate=True):
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(target(p, name), requires_grad=False)
    for name, b in module.named_buffers(remove_duplicate=True):
        if id(b) not in memo:
            memo[id(b)] = target(b, name)
    try:
        teacher = copy.deepcopy(module, memo)
    except Exception as err:
        raise TypeError(
            f"Could not copy {type(module).__name__} as the distillation teacher ({type(err).__name__}: {err}). "
            "Give the teacher yourself: `Distillation(teacher=<module or checkpoint path>)`."
        ) from err
    freeze(teacher)
    return teacher


def check_copyable(module: nn.Module, skip: Sequence[Any] = ()) -> None:
    """Check, cheaply, that :func:`frozen_copy` will work: a copy that shares every tensor, then dropped."""
    memo: dict[int, Any] = {id(obj): None for obj in skip if obj is not None}
    for t in [*module.parameters(), *module.buffers()]:
        memo[id(t)] = t
    try:
        copy.deepcopy(module, memo)
    except Exception as err:
        raise TypeError(
            f"Expected the model {type(module).__name__} to be deep-copyable, to take the distillation teacher "
            f"from it at the first event, but copying it raised {type(err).__name__}: {err}. Give the teacher "
            "yourself: `Distillation(teacher=<module or checkpoint path>)`."
        ) from err


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients, in place."""
    module.eval()
    module.requires_grad_(False)
    return module


def tensor_bytes(module: nn.Module) -> int:
    """Bytes held by ``module``'s parameters and buffers (shared ones counted once)."""
    seen: dict[int, torch.Tensor] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in seen.values())


def fingerprint(module: nn.Module) -> list[float]:
    """Two numbers that change when any weight does: the sums of the values and of their squares (float64)."""
    total = torch.zeros((), dtype=torch.float64)
    squares = torch.zeros((), dtype=torch.float64)
    for t in module.state_dict().values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            d = t.detach().to("cpu", torch.float64)
            total += d.sum()
            squares += d.pow(2).sum()
    return [float(total), float(squares)]


def move_inputs(obj: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """``obj`` with every tensor on ``device`` (floating ones in ``dtype``, when given)."""
    if isinstance(obj, torch.Tensor):
        dt = dtype if dtype is not None and obj.is_floating_point() else obj.dtype
        if obj.device == device and obj.dtype == dt:
            return obj
        return obj.to(device=device, dtype=dt)
    if isinstance(obj, Mapping):
        moved = {k: move_inputs(v, device, dtype) for k, v in obj.items()}
        cls: Any = type(obj)
        try:
            return cls(moved)
        except TypeError:
            return moved
    if isinstance(obj, tuple):
        items = [move_inputs(v, device, dtype) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [move_inputs(v, device, dtype) for v in obj]
    return obj


def device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """The device of the module's first parameter (or buffer) and its floating dtype."""
    for t in [*module.parameters(), *module.buffers()]:
        return t.device, t.dtype if t.is_floating_point() else None
    return torch.device("cpu"), None


# ---------------------------------------------------------------------- seeing the step's forwards
@dataclass
class Call:
    """One outermost forward call seen during a step.

    Attributes:
        name: the module's name (``""``: the root).
        args: its positional arguments.
        kwargs: its keyword arguments.
        output: what it returned.
        taps: outputs of the tapped layers during this call (the last one, for a layer called twice).

    """

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any
    taps: dict[str, Any] = field(default_factory=dict)


class ForwardCapture:
    """Record the outermost forward calls of some modules (and outputs of tapped layers) while open.

    Calls nested inside another recorded module's forward are not recorded (``self(x)`` calls its
    children). Hooks are registered on entering and removed on leaving, so nothing stays on the model.

    Args:
        modules: ``{name: module}`` whose calls are recorded.
        taps: ``{name: layer}`` whose outputs are kept with the call they happen in.

    """

    def __init__(self, modules: Mapping[str, nn.Module], taps: Mapping[str, nn.Module] | None = None) -> None:
        self.modules = dict(modules)
        self.taps = dict(taps or {})
        self.calls: list[Call] = []
        self._depth = 0
        self._current: dict[str, Any] = {}
        self._handles: list[Any] = []

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            if self._depth == 0:
                self._current = {}
            self._depth += 1

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            self._depth = max(self._depth - 1, 0)
            failed = output is None and sys.exc_info()[1] is not None
            if self._depth == 0 and not failed:
                self.calls.append(Call(name, tuple(args), dict(kwargs), output, dict(self._current)))

        return hook

    def _tap(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._depth > 0:
                self._current[name] = output

        return hook

    def __enter__(self) -> ForwardCapture:
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._handles.append(
                m.register_forward_hook(self._post(name), with_kwargs=True, always_call=True)
            )
        for name, m in self.taps.items():
            self._handles.append(m.register_forward_hook(self._tap(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ---------------------------------------------------------------------- channels kept, for hidden states
class ChannelMaps:
    """For each hidden-state layer, which teacher channels the student's output channels are.

    Kept per number of recorded events (``maps[n]`` holds after ``n`` events), so a rolled-back or failed
    event (the ledger goes back to ``n``) reads the maps of ``n`` again. ``None`` = every channel, in order.
    """

    def __init__(self) -> None:
        self.maps: dict[int, dict[str, list[int] | None]] = {}

    def current(self, events: int) -> dict[str, list[int] | None]:
        """The maps after ``events`` events (the latest recorded at or before it)."""
        keys = [k for k in self.maps if k <= events]
        return self.maps[max(keys)] if keys else {}

    def update(
        self, events: int, kept: Mapping[str, Sequence[torch.Tensor]], gone: Sequence[str] = ()
    ) -> None:
        """Record the maps after event number ``events``: each layer's kept indices (in its previous numbering)."""
        before = self.current(events - 1)
        after: dict[str, list[int] | None] = {k: v for k, v in before.items() if k not in gone}
        for name, keeps in kept.items():
            idx = before.get(name)
            for keep in keeps:
                k = keep.tolist()
                idx = k if idx is None else [idx[i] for i in k]
            after[name] = idx
        for name in gone:
            after[name] = []
        self.maps = {k: v for k, v in self.maps.items() if k < events}
        self.maps[events] = after

    def state_dict(self) -> dict[str, Any]:
        """The maps, as plain data."""
        return {
            "maps": {
                str(k): {n: None if v is None else list(v) for n, v in m.items()}
                for k, m in self.maps.items()
            }
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.maps = {
            int(k): {str(n): None if v is None else [int(i) for i in v] for n, v in m.items()}
            for k, m in dict(state.get("maps") or {}).items()
        }


# ---------------------------------------------------------------------- the teacher's cost
class StepCost:
    """The teacher's measured cost: time of its forwards and of the loss per step, its memory.

    On CUDA, times come from CUDA events read once they completed (no synchronisation in the step).
    """

    def __init__(self) -> None:
        self.steps = 0
        self.teacher_s = 0.0
        self.loss_s = 0.0
        self.step_s = 0.0
        self.step_intervals = 0
        self._pending: list[tuple[str, Any, Any]] = []
        self._last_start: float | None = None

    @contextmanager
    def timed(self, what: str, device: torch.device) -> Iterator[None]:
        """Time the block (``what``: ``"teacher"`` or ``"loss"``)."""
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((what, start, end))
                self._resolve(block=False)
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._add(what, time.perf_counter() - t0)

    def _add(self, what: str, seconds: float) -> None:
        if what == "teacher":
            self.teacher_s += seconds
        else:
            self.loss_s += seconds

    def _resolve(self, block: bool) -> None:
        left = []
        for what, start, end in self._pending:
            if block:
                end.synchronize()
            if block or end.query():
                self._add(what, start.elapsed_time(end) / 1000.0)
            else:
                left.append((what, start, end))
        self._pending = left

    def step_started(self) -> None:
        """A distilled training step starts (the interval since the last one is one whole step)."""
        now = time.perf_counter()
        if self._last_start is not None:
            self.step_s += now - self._last_start
            self.step_intervals += 1
        self._last_start = now
        self.steps += 1

    def epoch_ended(self) -> None:
        """Do not count the time between epochs (validation, events) as a step."""
        self._last_start = None

    def summary(self) -> dict[str, float]:
        """Milliseconds per distilled step (teacher forward, loss, whole step) and the teacher's share."""
        self._resolve(block=True)
        n = max(self.steps, 1)
        step_ms = 1000.0 * self.step_s / self.step_intervals if self.step_intervals else math.nan
        extra = 1000.0 * (self.teacher_s + self.loss_s) / n
        return {
            "steps": float(self.steps),
            "teacher_ms_per_step": 1000.0 * self.teacher_s / n,
            "loss_ms_per_step": 1000.0 * self.loss_s / n,
            "extra_ms_per_step": extra,
            "step_ms": step_ms,
            "extra_share_of_step": extra / step_ms if step_ms and math.isfinite(step_ms) else math.nan,
        }

    def state_dict(self) -> dict[str, float]:
        """The totals, as plain data."""
        self._resolve(block=True)
        return {
            "steps": self.steps,
            "teacher_s": self.teacher_s,
            "loss_s": self.loss_s,
            "step_s": self.step_s,
            "step_intervals": self.step_intervals,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.steps = int(state.get("steps", 0))
        self.teacher_s = float(state.get("teacher_s", 0.0))
        self.loss_s = float(state.get("loss_s", 0.0))
        self.step_s = float(state.get("step_s", 0.0))
        self.step_intervals = int(state.get("step_intervals", 0))
        self._pending, self._last_start = [], None
