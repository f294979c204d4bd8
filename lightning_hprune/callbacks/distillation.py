"""Lightning glue of :class:`~lightning_hprune.core.distill.Distillation`: the term added to the user's loss.

The mechanism, and why:

* Lightning gives a callback no hook that can change the loss: ``on_before_backward`` receives the loss
  tensor but backpropagates its own reference, and ``on_train_batch_end`` comes after the optimizer step.
  So the pruning callback wraps the module's ``training_step`` (an instance attribute set in ``setup`` and
  removed in ``teardown``, like the ``on_load_checkpoint`` patch; ``functools.wraps`` keeps the signature
  Lightning inspects). The wrapper returns the user's loss plus the term; everything Lightning does with
  that loss afterwards (dividing by ``accumulate_grad_batches``, AMP scaling, DDP's gradient averaging,
  clipping) applies to the sum, exactly as if the user had written it.
* Inside the wrapped step, forward hooks on the distilled module (the LightningModule, or the one child
  the step calls: ``self.model(**batch)``) record the *outermost* calls' inputs and outputs. They are
  registered on entering the step and removed on leaving it, so nothing stays on the model (the teacher
  copy, validation and export never see them) and the outer call DDP makes to run ``training_step``
  itself is never recorded. After the user's step returns (still inside Lightning's autocast context),
  the teacher runs on the recorded inputs under ``no_grad``.
* The teacher lives on this object, not in the model: it is not a submodule (not in the model's
  ``state_dict``, its optimizer, the pruning graph or the event's undo snapshot), and the dense copy is
  made once, at the first event, straight to its device and dtype. Checkpoints store its weights once, as
  plain tensors under the pruning callback's entry; resuming rebuilds it from the module given to ``fit``
  before that module's pruned structure is restored (a module or checkpoint path given as the teacher is
  used again instead, checked by fingerprint).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_warn

from lightning_hprune.core.distill import (
    Call,
    ChannelMaps,
    Distillation,
    DistillationError,
    ForwardCapture,
    StepCost,
    check_copyable,
    describe,
    device_dtype,
    find_argument,
    fingerprint,
    freeze,
    frozen_copy,
    hidden_loss,
    logit_loss,
    logits_of,
    move_inputs,
    output_dims,
    tensor_bytes,
    token_mask,
)
from lightning_hprune.core.optim_state import ParameterSurgery
from lightning_hprune.core.session import PruningSession
from lightning_hprune.core.undo import Snapshot

_PATCHED = "_hprune_distillation"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    return None


def loss_of(output: Any) -> torch.Tensor | None:
    """The loss a ``training_step`` returned: the tensor, or a dict's ``"loss"`` (``None``: a skipped step)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    return None


def with_term(output: Any, term: torch.Tensor) -> Any:
    """``output`` with ``term`` added to its loss (a new dict for a dict; other keys unchanged)."""
    if isinstance(output, torch.Tensor):
        return output + term.to(output.dtype)
    new = dict(output)
    new["loss"] = output["loss"] + term.to(output["loss"].dtype)
    return new


def _clean(teacher: nn.Module) -> None:
    """A copy of the student without this package's method patches or the student's forward hooks.

    Forward hooks on the student (the user's activation logging, ...) must not fire on teacher forwards;
    the copy's weights are fixed, so it needs no hook to compute them.
    """
    for name in ("training_step", "on_load_checkpoint"):
        teacher.__dict__.pop(name, None)
    for m in teacher.modules():
        for hooks in (
            m._forward_hooks,
            m._forward_hooks_with_kwargs,
            m._forward_hooks_always_called,
            m._forward_pre_hooks,
            m._forward_pre_hooks_with_kwargs,
        ):
            hooks.clear()


class _Buffers:
    """A module's buffers (BatchNorm running statistics, ...) as a stateful part of an undo snapshot."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return {n: b for n, b in self.module.named_buffers()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for n, b in self.module.named_buffers():
                if n in state:
                    b.copy_(state[n])


class Distiller:
    """Runs a :class:`Distillation` inside a fit: the teacher, the wrapped ``training_step``, its state.

    Owned by the leading pruning callback, which calls :meth:`setup`, :meth:`teardown`,
    :meth:`before_event` / :meth:`after_event` around every event, :meth:`restore` from the module's
    ``on_load_checkpoint`` and :meth:`state_dict` / :meth:`load_state_dict` with its checkpoint entry.

    Args:
        config: the settings.
        session: the pruning session (read only: whether the first event ran, how many are recorded).

    """

    def __init__(self, config: Distillation, session: PruningSession) -> None:
        self.config = config
        self.session = session
        #: The frozen teacher (``None`` until the first event for the dense copy).
        self.teacher: nn.Module | None = None
        #: The distilled module's name (``""``: the LightningModule), fixed at the first step.
        self.target: str | None = config.module
        self.checked = False
        self.maps = ChannelMaps()
        self.cost = StepCost()
        self.fingerprint: list[float] | None = None
        self._loaded: nn.Module | None = None  # a checkpoint-path teacher, until the target is known
        self._placed = False
        self._teacher_taps: dict[str, Any] = {}
        self._teacher_handles: list[Any] = []
        self._weights_before: dict[str, int] = {}
        self._patched: pl.LightningModule | None = None
        self._previous: Any = None
        self._device_bytes: int | None = None
        self._warned_gone: set[str] = set()

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse what cannot work, load a path teacher, wrap ``training_step`` (before any step)."""
        cfg = self.config
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"Expected automatic optimization with `distillation=Distillation(...)` (the term is added to "
                f"the loss `training_step` returns), but {type(pl_module).__name__} sets "
                "`automatic_optimization = False`: its `training_step` calls `manual_backward` itself. Remove "
                "`distillation`, or add the distillation loss to your loss yourself."
            )
        if cfg.module is not None and _get(pl_module, cfg.module) is None:
            raise ValueError(
                f"Expected `Distillation(module={cfg.module!r})` to name a submodule of "
                f"{type(pl_module).__name__}, but it has none of that name; direct children are "
                f"{[n for n, _ in pl_module.named_children()]}."
            )
        if cfg.source == "module":
            assert isinstance(cfg.teacher, nn.Module)
            shared = {id(p) for p in pl_module.parameters()} & {id(p) for p in cfg.teacher.parameters()}
            if shared:
                raise ValueError(
                    f"Expected the distillation teacher to be a separate model, but it shares {len(shared)} "
                    f"parameters with {type(pl_module).__name__} (the student, which is pruned and trained). "
                    "Give a copy, e.g. `copy.deepcopy(model)`, or leave `teacher=None` for a copy of the dense "
                    "model at the first event."
                )
            if self.teacher is None:
                self._use(freeze(cfg.teacher), placed=False)
        elif cfg.source == "path" and self._loaded is None and self.teacher is None:
            from lightning_hprune.checkpoint import load_pruned

            assert isinstance(cfg.teacher, str)
            self._loaded = freeze(load_pruned(type(pl_module), cfg.teacher, map_location="cpu"))
        self._patch(pl_module)

    def _patch(self, pl_module: pl.LightningModule) -> None:
        current = pl_module.__dict__.get("training_step")
        owner = getattr(current, _PATCHED, None)
        if owner is self:
            return
        if isinstance(owner, Distiller):  # left by a fit that failed (Lightning skips `teardown` then)
            owner.teardown()
        self._previous = pl_module.__dict__.get("training_step")
        original = pl_module.training_step
        distiller = self

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return distiller.step(pl_module, original, args, kwargs)

        setattr(training_step, _PATCHED, self)
        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._patched = pl_module

    def teardown(self) -> None:
        """Unwrap ``training_step``; remove the teacher's hooks."""
        module, self._patched = self._patched, None
        if module is not None:
            if self._previous is None:
                module.__dict__.pop("training_step", None)
            else:
                module.training_step = self._previous  # type: ignore[method-assign]
            self._previous = None

    # ------------------------------------------------------------------ the teacher
    def _student_device(self, pl_module: pl.LightningModule) -> torch.device:
        return device_dtype(pl_module)[0]

    def before_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the dense teacher before the first event; note the hidden layers' weights (all events)."""
        dense = self.config.source == "dense"
        if dense and self.teacher is None and self.checked and not self.session.ledger.started:
            self._take(trainer, pl_module)
        if self.config.hidden is not None and self.target is not None:
            self._weights_before = {}
            root = _get(pl_module, self.target)
            for name, _ in self.config.hidden.pairs:
                layer = _get(root, name) if root is not None else None
                weight = getattr(layer, "weight", None)
                if isinstance(weight, torch.Tensor):
                    self._weights_before[name] = id(weight)

    def _take(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.target is not None
        module = pl_module.get_submodule(self.target)
        device = self.config.device or self._student_device(pl_module)
        self._warn_half_on_cpu(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        teacher = frozen_copy(
            module, device, self.config.dtype, skip=[getattr(pl_module, "_trainer", None), trainer]
        )
        _clean(teacher)
        if before is not None:
            self._device_bytes = torch.cuda.memory_allocated(device) - before
        self._use(teacher, placed=True)

    def _warn_half_on_cpu(self, device: torch.device) -> None:
        if device.type == "cpu" and self.config.dtype in (torch.bfloat16, torch.float16):
            rank_zero_warn(
                f"Distillation(dtype={str(self.config.dtype).removeprefix('torch.')!r}) puts the teacher on the "
                "CPU in half precision: many CPUs run it far slower than float32 (on the development machine, "
                "one thread, the digits CNN's forward of 256 images took 6.7 s in bf16 against 0.44 s in "
                "float32). Use it on an accelerator, or keep the CPU teacher in float32."
            )

    def _use(self, teacher: nn.Module, placed: bool) -> None:
        for h in self._teacher_handles:
            h.remove()
        self._teacher_handles = []
        self.teacher = teacher
        self._placed = placed
        hidden = self.config.hidden
        if hidden is not None:
            for _, name in hidden.pairs:
                layer = _get(teacher, name)
                if layer is None:
                    raise DistillationError(
                        f"Expected the teacher to have the layer {name!r} named by `HiddenStates`, but it has "
                        f"none of that name; its modules look like {[n for n, _ in teacher.named_modules() if n][:8]}."
                    )
                self._teacher_handles.append(layer.register_forward_hook(self._teacher_tap(name)))
        if placed:
            self.fingerprint = self.fingerprint or fingerprint(teacher)

    def _use_loaded(self) -> None:
        assert self._loaded is not None
        assert self.target is not None
        self._use(self._loaded.get_submodule(self.target), placed=False)
        self._loaded = None

    def _teacher_tap(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._teacher_taps[name] = output

        return hook

    def _place(self, pl_module: pl.LightningModule) -> None:
        """Put a given or restored teacher on its device and dtype (once), and check it is the same one."""
        if self._placed or self.teacher is None:
            return
        device = self.config.device or self._student_device(pl_module)
        self._warn_half_on_cpu(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        if self.config.dtype is not None:
            self.teacher.to(device=device, dtype=self.config.dtype)
        else:
            self.teacher.to(device)
        if before is not None:
            self._device_bytes = torch.cuda.memory_allocated(device) - before
        self._placed = True
        now = fingerprint(self.teacher)
        if self.fingerprint is not None and self.config.source != "dense":
            same = all(
                abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(now, self.fingerprint, strict=True)
            )
            if not same:
                rank_zero_warn(
                    "The distillation teacher given to this (resumed) fit has other weights than the one the "
                    f"run started with (fingerprint {now} vs {self.fingerprint}): training goes on with the "
                    "new one."
                )
        self.fingerprint = now

    def _teacher_forward(self, call: Call) -> tuple[Any, dict[str, Any]]:
        assert self.teacher is not None
        device, dtype = device_dtype(self.teacher)
        args = move_inputs(call.args, device, dtype)
        kwargs = move_inputs(call.kwargs, device, dtype)
        self._teacher_taps = {}
        with torch.no_grad():
            out = self.teacher(*args, **kwargs)
        taps, self._teacher_taps = self._teacher_taps, {}
        return out, taps

    # ------------------------------------------------------------------ the step
    def _candidates(self, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        if self.target is not None:
            module = _get(pl_module, self.target)
            return {} if module is None else {self.target: module}
        return {"": pl_module, **dict(pl_module.named_children())}

    def _student_taps(
        self, pl_module: pl.LightningModule, roots: Mapping[str, nn.Module]
    ) -> dict[str, nn.Module]:
        hidden = self.config.hidden
        taps: dict[str, nn.Module] = {}
        if hidden is None:
            return taps
        for root_name, root in roots.items():
            for name, _ in hidden.pairs:
                layer = _get(root, name)
                if layer is not None:
                    taps[_join(root_name, name)] = layer
        return taps

    def step(
        self,
        pl_module: pl.LightningModule,
        original: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """The wrapped ``training_step``: the user's step, then the teacher and the term added to the loss."""
        dense = self.config.source == "dense"
        if dense and self.teacher is None and self.session.ledger.started:
            raise RuntimeError(
                "Expected the distillation teacher (the dense model, copied at the first pruning event) to be "
                "restored with the pruning state, but the checkpoint this fit resumed from has pruning events "
                "and no teacher (it was written without `distillation`). The dense model is gone: give one, "
                "`Distillation(teacher='<a checkpoint written before the first event>')`."
            )
        if self._loaded is not None and self.target is not None:
            self._use_loaded()  # a checkpoint-path teacher on a resumed fit (the target is known)
        if self.checked and self.teacher is None:
            return original(*args, **kwargs)  # the dense copy comes at the first event
        self._place(pl_module)
        if self.teacher is not None:
            self.cost.step_started()
        roots = self._candidates(pl_module)
        # The first step's forward updates running statistics before its check can refuse: undo that too.
        point = None if self.checked else Snapshot(parts=[_Buffers(pl_module)])
        with ForwardCapture(roots, self._student_taps(pl_module, roots)) as capture:
            output = original(*args, **kwargs)
        if point is not None:
            try:
                self._check(pl_module, capture.calls)
            except BaseException:
                point.restore()
                raise
        loss = loss_of(output)
        if self.teacher is None or loss is None:
            return output
        found = self._term(pl_module, capture.calls)
        if found is None:
            return output
        term, batch = found
        total = with_term(output, term)
        value = term.detach().float()
        share = value / loss_of(total).detach().float()  # type: ignore[union-attr]
        pl_module.log(
            "hprune/distill_loss", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch
        )
        pl_module.log(
            "hprune/distill_share", share, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch
        )
        return total

    def _check(self, pl_module: pl.LightningModule, calls: list[Call]) -> None:
        """First step: find the distilled module and its logits; run a given teacher and compare shapes."""
        cls = type(pl_module).__name__
        names = list(dict.fromkeys(c.name for c in calls))
        target = self.target
        if target is None:
            children = [n for n, _ in pl_module.named_children()]
            if "" in names:
                target = ""
            elif len(names) == 1:
                target = names[0]
            elif not names:
                raise DistillationError(
                    f"Expected `training_step` to call the forward of {cls} (`self(...)`) or of one of its direct "
                    f"children {children}, to distill its output, but it called none of them. Set "
                    "`Distillation(module='<name>')` to the submodule whose forward returns the logits."
                )
            else:
                raise DistillationError(
                    f"Expected `training_step` to call one module's forward, to distill its output, but it "
                    f"called several of {cls}'s children: {names}. Set `Distillation(module='<name>')` to the one "
                    "whose forward takes the batch and returns the logits."
                )
        mine = [c for c in calls if c.name == target]
        if not mine:
            raise DistillationError(
                f"Expected `training_step` to call the forward of `{target or cls}` (`Distillation(module="
                f"{target!r})`), but it did not{'; it called ' + str(names) if names else ''}."
            )
        found = [logits_of(c.output, self.config.logits_key) for c in mine]
        for c, s in zip(mine, found, strict=True):
            token_mask(s, find_argument(c.args, c.kwargs, self.config.mask_key))
        if not any(s.requires_grad for s in found):
            raise DistillationError(
                f"Expected the logits of `{target or cls}` ({describe(found[0])}) to require gradients in "
                "`training_step`, but none did (computed under `torch.no_grad()`?): the term would not train "
                "anything."
            )
        self.target = target
        root = pl_module.get_submodule(target)
        hidden = self.config.hidden
        if hidden is not None:
            for name, _ in hidden.pairs:
                layer = _get(root, name)
                if layer is None or not isinstance(getattr(layer, "weight", None), torch.Tensor):
                    what = "no such module" if layer is None else f"a {type(layer).__name__} without a weight"
                    raise DistillationError(
                        f"Expected `HiddenStates` layer {name!r} to be a layer with a weight (Linear, Conv, a "
                        f"normalisation, Embedding) inside `{target or cls}`, but found {what}."
                    )
        if self.config.source == "dense" and self.teacher is None:
            check_copyable(root, skip=[getattr(pl_module, "_trainer", None)])  # copied at the first event
        if self._loaded is not None:
            self._use_loaded()
            self._place(pl_module)
        if self.teacher is not None:
            call = mine[0]
            out, taps = self._teacher_forward(call)
            teacher_logits = logits_of(out, self.config.logits_key)
            if tuple(teacher_logits.shape) != tuple(found[0].shape):
                raise DistillationError(
                    f"Expected the teacher's logits to have the student's shape, to distill them, but the "
                    f"student `{target or cls}` gave {describe(found[0])} and the teacher "
                    f"({type(self.teacher).__name__}) {describe(teacher_logits)} on the same inputs."
                )
            self._check_hidden(call, taps)
        self.checked = True

    def _check_hidden(self, call: Call, teacher_taps: Mapping[str, Any]) -> None:
        hidden = self.config.hidden
        if hidden is None:
            return
        maps = self.maps.current(len(self.session.ledger.records))
        for s_name, t_name in hidden.pairs:
            full = _join(self.target or "", s_name)
            s, t = _first_tensor(call.taps.get(full)), _first_tensor(teacher_taps.get(t_name))
            if s is None or t is None:
                continue
            layer = _get(self._patched, full) if self._patched is not None else None
            dim = output_dims(layer)[0] if layer is not None else -1
            idx = maps.get(full)
            width = len(idx) if idx is not None else t.shape[dim]
            if s.shape[dim] != width:
                raise DistillationError(
                    f"Expected the student layer {s_name!r} ({describe(s)}) and the teacher layer {t_name!r} "
                    f"({describe(t)}) to have the same number of channels along dimension {dim}, for the "
                    "hidden-state loss; they do not (another architecture?)."
                )

    def _term(self, pl_module: pl.LightningModule, calls: list[Call]) -> tuple[torch.Tensor, int] | None:
        """The term (the mean over the distilled module's calls in this step) and the batch size."""
        cfg = self.config
        assert self.teacher is not None
        terms = []
        batch = 0
        for call in calls:
            if call.name != self.target:
                continue
            student = logits_of(call.output, cfg.logits_key)
            if not student.requires_grad:
                continue
            device = self._student_device(pl_module)
            with self.cost.timed("teacher", device_dtype(self.teacher)[0]):
                out, taps = self._teacher_forward(call)
            with self.cost.timed("loss", device):
                teacher = logits_of(out, cfg.logits_key)
                mask = token_mask(student, find_argument(call.args, call.kwargs, cfg.mask_key))
                term = cfg.alpha * logit_loss(student, teacher, cfg.temperature, mask)
                if cfg.hidden is not None:
                    extra = self._hidden_term(pl_module, call, taps, mask)
                    if extra is not None:
                        term = term + cfg.hidden.weight * extra
            terms.append(term)
            batch = batch or int(student.shape[0])
        if not terms:
            return None
        return (terms[0] if len(terms) == 1 else torch.stack(terms).mean()), batch

    def _hidden_term(
        self, pl_module: pl.LightningModule, call: Call, taps: Mapping[str, Any], mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        hidden = self.config.hidden
        assert hidden is not None
        maps = self.maps.current(len(self.session.ledger.records))
        losses = []
        for s_name, t_name in hidden.pairs:
            full = _join(self.target or "", s_name)
            idx = maps.get(full)
            layer = _get(pl_module, full)
            if (idx is not None and not idx) or layer is None:
                if s_name not in self._warned_gone:
                    self._warned_gone.add(s_name)
                    rank_zero_warn(
                        f"HiddenStates: the layer {s_name!r} was removed with its block; it leaves the loss."
                    )
                continue
            s, t = _first_tensor(call.taps.get(full)), _first_tensor(taps.get(t_name))
            if s is None or t is None:
                continue
            dim = output_dims(layer)[0]
            index = None if idx is None else torch.as_tensor(idx, dtype=torch.long)
            losses.append(hidden_loss(s, t, hidden.loss, dim, index, mask))
        if not losses:
            return None
        return torch.stack(losses).mean()

    # ------------------------------------------------------------------ events
    def after_event(self, pl_module: pl.LightningModule, surgery: ParameterSurgery) -> None:
        """Follow the kept channels of the hidden-state layers through an event's parameter surgery."""
        hidden = self.config.hidden
        if hidden is None or self.target is None:
            return
        changes = surgery.old_to_change()
        kept: dict[str, list[torch.Tensor]] = {}
        gone: list[str] = []
        for name, _ in hidden.pairs:
            full = _join(self.target, name)
            layer = _get(pl_module, full)
            if layer is None:
                gone.append(full)
                continue
            change = changes.get(self._weights_before.get(name, -1))
            if change is not None:
                out_dim = output_dims(layer)[1]
                kept[full] = [keep for dim, keep in change.ops if dim == out_dim]
        self.maps.update(len(self.session.ledger.records), kept, gone)

    def epoch_ended(self) -> None:
        """The time until the next step is not a training step's."""
        self.cost.epoch_ended()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain data and CPU tensors: the dense teacher's weights (once), the target, the maps, the cost."""
        weights = None
        if self.config.source == "dense" and self.teacher is not None:
            weights = {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}
        return {
            "source": self.config.source,
            "module": self.target,
            "checked": self.checked,
            "fingerprint": None if self.fingerprint is None else list(self.fingerprint),
            "teacher": None
            if weights is None
            else {"state_dict": weights, "dtype": str(device_dtype(self.teacher)[1])},  # type: ignore[arg-type]
            "maps": self.maps.state_dict(),
            "cost": self.cost.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the teacher is rebuilt here only if :meth:`restore` did not run first."""
        self._load_fields(state)
        if self.teacher is None and state.get("teacher") and self._patched is not None:
            self._rebuild(self._patched, state["teacher"])

    def _load_fields(self, state: Mapping[str, Any]) -> None:
        if state.get("module") is not None:
            self.target = str(state["module"])
        self.checked = bool(state.get("checked", False)) and self.target is not None
        fp = state.get("fingerprint")
        if fp is not None and self.fingerprint is None:
            self.fingerprint = [float(v) for v in fp]
        self.maps.load_state_dict(state.get("maps") or {})
        self.cost.load_state_dict(state.get("cost") or {})

    def restore(self, pl_module: pl.LightningModule, state: Mapping[str, Any] | None) -> None:
        """Rebuild the dense teacher from a checkpoint, on the module before its pruned structure returns."""
        if not state:
            return
        self._load_fields(state)
        if state.get("teacher"):
            self._rebuild(pl_module, state["teacher"])

    def _rebuild(self, pl_module: pl.LightningModule, teacher: Mapping[str, Any]) -> None:
        if self.config.source != "dense" or self.target is None:
            return
        root = _get(pl_module, self.target)
        if root is None:
            raise DistillationError(
                f"Expected {type(pl_module).__name__} to have the distilled module {self.target!r} recorded in "
                "the checkpoint, but it has none of that name."
            )
        # The stored weights are in the teacher's dtype: `dtype=None` keeps it.
        restored = frozen_copy(
            root,
            None,
            self.config.dtype,
            skip=[getattr(pl_module, "_trainer", None)],
            weights=teacher["state_dict"],
        )
        _clean(restored)
        self._use(restored, placed=False)

    def report(self) -> dict[str, Any]:
        """The teacher's settings and measured cost, for the end-of-fit summary."""
        teacher = self.teacher
        out: dict[str, Any] = {
            "alpha": self.config.alpha,
            "temperature": self.config.temperature,
            "source": self.config.source,
            "module": self.target,
            "hidden": None if self.config.hidden is None else repr(self.config.hidden),
        }
        if teacher is not None:
            device, dtype = device_dtype(teacher)
            out.update(
                device=str(device),
                dtype=str(dtype).removeprefix("torch."),
                teacher_parameters=sum(p.numel() for p in teacher.parameters()),
                teacher_bytes=tensor_bytes(teacher),
                checkpoint_bytes=tensor_bytes(teacher) if self.config.source == "dense" else 0,
            )
            if self._device_bytes is not None:
                out["measured_device_bytes"] = self._device_bytes
        out.update(self.cost.summary())
        return out

    def __getstate__(self) -> dict[str, Any]:
        # Pickled / deep-copied with its callback: hook handles do not travel.
        state = self.__dict__.copy()
        state["_teacher_handles"] = []
        state["_patched"] = None
        state["_previous"] = None
        return state
