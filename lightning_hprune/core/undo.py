"""One undo mechanism: a :class:`Snapshot` of everything a pruning step may change, restored atomically.

Used by every place that must be able to go back: a pruning event that fails half-way (zero-copy), a
closed-loop rollback judged epochs later (a CPU copy, so no second model stays in GPU memory), the
sensitivity analysis (prune one layer, measure, restore), and the graph's own all-or-nothing steps.

A snapshot holds:

* the model: every module's attributes, children, parameters and buffers (and each parameter's ``.grad``).
  By *reference* (``copy=False``): torch-pruning replaces tensors rather than editing them, so keeping the
  old references undoes a prune without copying a weight. By *CPU copy* (``copy=True``): values are copied
  to the CPU and restored as new parameters on their original devices;
* the optimizers: their parameter lists and per-parameter state (by reference, or CPU copies matched by
  parameter identity);
* stateful parts (anything with ``state_dict()`` / ``load_state_dict()``: the session's ledger, schedule,
  criterion, ...), saved *by value*: tensors are cloned and containers copied, so statistics mutated or
  replaced after the snapshot cannot leak into it;
* a history list (cut back to its saved length);
* callables to run after restoring (re-wrapping DDP, rebuilding a dependency graph).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn


class Stateful(Protocol):
    """Anything that saves and restores its state as plain data."""

    def state_dict(self) -> dict[str, Any]:  # pragma: no cover - protocol
        """The state, as plain data and tensors."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # pragma: no cover - protocol
        """Restore what :meth:`state_dict` returned."""
        ...


def by_value(obj: Any) -> Any:
    """A deep copy of plain data: tensors cloned (detached), dicts, lists and tuples copied recursively."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        return {k: by_value(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [by_value(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(by_value(v) for v in obj)
    return obj


# ---------------------------------------------------------------------- the model
class _ModuleReferences:
    """Every module's attributes, children, parameters, buffers and gradients, by reference."""

    def __init__(self, model: nn.Module) -> None:
        self._saved = [
            (m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
            for m in model.modules()
        ]
        self._grads = {
            id(p): (p, p.grad) for m in model.modules() for p in m._parameters.values() if p is not None
        }

    def restore(self) -> dict[int, nn.Parameter]:
        for m, attrs, params, buffers, modules in self._saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m._parameters = dict(params)
            m._buffers = dict(buffers)
            m._modules = dict(modules)
        for p, grad in self._grads.values():
            p.grad = grad
        return {}


def _cpu(t: torch.Tensor) -> tuple[torch.Tensor, torch.device]:
    return t.detach().to("cpu", copy=True), t.device


class _ModuleCopies:
    """Every module's attributes and children, and CPU copies of its parameters and buffers.

    Shared (tied) parameters stay shared after :meth:`restore`.
    """

    def __init__(self, model: nn.Module) -> None:
        self._params: dict[int, tuple[torch.Tensor, torch.device, bool]] = {}
        self._buffers: dict[int, tuple[torch.Tensor, torch.device]] = {}
        self._saved: list[
            tuple[nn.Module, dict[str, Any], dict[str, int | None], dict[str, int | None], dict[str, Any]]
        ] = []
        for m in model.modules():
            attrs = {k: v for k, v in m.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
            params: dict[str, int | None] = {}
            for name, p in m._parameters.items():
                if p is not None and id(p) not in self._params:
                    data, device = _cpu(p)
                    self._params[id(p)] = (data, device, p.requires_grad)
                params[name] = None if p is None else id(p)
            buffers: dict[str, int | None] = {}
            for name, b in m._buffers.items():
                if b is not None and id(b) not in self._buffers:
                    self._buffers[id(b)] = _cpu(b)
                buffers[name] = None if b is None else id(b)
            self._saved.append((m, attrs, params, buffers, dict(m._modules)))

    def restore(self) -> dict[int, nn.Parameter]:
        new_params = {
            key: nn.Parameter(data.to(device, copy=True), requires_grad=requires_grad)
            for key, (data, device, requires_grad) in self._params.items()
        }
        new_buffers = {key: data.to(device, copy=True) for key, (data, device) in self._buffers.items()}
        for m, attrs, params, buffers, modules in self._saved:
            m.__dict__.update(attrs)
            m._parameters = {n: None if k is None else new_params[k] for n, k in params.items()}
            m._buffers = {n: None if k is None else new_buffers[k] for n, k in buffers.items()}
            m._modules = dict(modules)
        return new_params

    @property
    def nbytes(self) -> int:
        tensors = [d for d, *_ in self._params.values()] + [d for d, _ in self._buffers.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------- optimizers
@dataclass(frozen=True)
class _SavedTensor:
    data: torch.Tensor
    device: torch.device


class _Optimizers:
    """Optimizers' parameter lists and per-parameter state, by reference or as CPU copies.

    Hyper-parameters (learning rate, ...) are not restored: they belong to the LR schedule, which an event
    does not touch and a rollback must not rewind.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], copy: bool) -> None:
        self.copy = copy
        self._saved: list[
            tuple[torch.optim.Optimizer, list[list[nn.Parameter]], dict[int, dict[str, Any]]]
        ] = []
        for opt in optimizers:
            groups = [list(g["params"]) for g in opt.param_groups]
            state: dict[int, dict[str, Any]] = {}
            for p, s in opt.state.items():
                if not copy:
                    state[id(p)] = s
                elif s:
                    state[id(p)] = {
                        k: _SavedTensor(*_cpu(v)) if isinstance(v, torch.Tensor) else v for k, v in s.items()
                    }
            self._saved.append((opt, groups, state))

    def restore(self, new_params: Mapping[int, nn.Parameter]) -> None:
        for opt, groups, state in self._saved:
            opt.state.clear()
            for group, params in zip(opt.param_groups, groups, strict=True):
                live = [new_params.get(id(p), p) for p in params]
                group["params"] = live
                for old, p in zip(params, live, strict=True):
                    s = state.get(id(old))
                    if s is None:
                        continue
                    if self.copy:
                        opt.state[p] = {
                            k: v.data.to(v.device, copy=True) if isinstance(v, _SavedTensor) else v
                            for k, v in s.items()
                        }
                    else:
                        opt.state[p] = s


# ---------------------------------------------------------------------- the snapshot
class Snapshot:
    """Everything a pruning step may change, to be put back at once with :meth:`restore`.

    Args:
        model: the model (its modules, parameters, buffers, gradients).
        optimizers: optimizers whose parameter lists and state follow the model.
        parts: stateful parts saved by value (``state_dict`` / ``load_state_dict``).
        history: a list cut back to its current length on restore.
        copy: keep CPU copies of the model and optimizer state instead of references (for a rollback point
            kept while training goes on: the references would keep the old parameters alive, and training
            modifies optimizer state in place).
        on_restore: called, in order, after everything else is restored.

    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        parts: Sequence[Stateful] = (),
        history: list[Any] | None = None,
        *,
        copy: bool = False,
        on_restore: Sequence[Callable[[], None]] = (),
    ) -> None:
        self._model: _ModuleReferences | _ModuleCopies | None = None
        if model is not None:
            self._model = _ModuleCopies(model) if copy else _ModuleReferences(model)
        self._optimizers = _Optimizers(optimizers, copy)
        self._parts = [(part, by_value(part.state_dict())) for part in parts]
        self._history = history
        self._history_len = len(history) if history is not None else 0
        self._on_restore = list(on_restore)

    @property
    def nbytes(self) -> int:
        """CPU memory held by the model copies (0 for a by-reference snapshot)."""
        return self._model.nbytes if isinstance(self._model, _ModuleCopies) else 0

    def restore(self) -> dict[int, nn.Parameter]:
        """Put everything back; parts get a fresh copy of their saved state (the snapshot stays reusable).

        Returns:
            ``id(parameter at snapshot time) -> new parameter`` for a copying snapshot (empty by reference).

        """
        new_params = self._model.restore() if self._model is not None else {}
        self._optimizers.restore(new_params)
        for part, state in self._parts:
            part.load_state_dict(by_value(state))
        if self._history is not None:
            del self._history[self._history_len :]
        for fn in self._on_restore:
            fn()
        return new_params


@contextmanager
def undo_on_failure(snapshot: Callable[[], Snapshot]) -> Iterator[Snapshot]:
    """Take ``snapshot()`` and restore it if the block raises anything (even ``KeyboardInterrupt``)."""
    point = snapshot()
    try:
        yield point
    except BaseException:
        point.restore()
        raise
