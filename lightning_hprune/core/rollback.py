"""A rollback point on the CPU: the model's structure and values, and its optimizers' state.

:class:`~lightning_hprune.core.graph.ModuleSnapshot` is zero-copy: it keeps references to the old
parameters, which stay on the model's device. That is right for undoing a failed step at once, but a
rollback point kept for a whole recovery epoch would hold a second copy of the model in GPU memory.
:class:`CpuModuleSnapshot` copies every parameter and buffer to the CPU instead, and restores them as
*new* parameters on their original devices; :class:`OptimizerSnapshot` records optimizer state by
parameter name so the optimizers can be pointed at those new parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


def _cpu(t: torch.Tensor) -> tuple[torch.Tensor, torch.device]:
    return t.detach().to("cpu", copy=True), t.device


class CpuModuleSnapshot:
    """Every module's attributes, children, and CPU copies of its parameters and buffers.

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
        """Put every module back as it was, with new parameters on their original devices.

        Returns:
            ``id(parameter at snapshot time) -> new parameter``.

        """
        new_params: dict[int, nn.Parameter] = {}
        new_buffers: dict[int, torch.Tensor] = {}
        for key, (data, device, requires_grad) in self._params.items():
            new_params[key] = nn.Parameter(data.to(device, copy=True), requires_grad=requires_grad)
        for key, (data, device) in self._buffers.items():
            new_buffers[key] = data.to(device, copy=True)
        for m, attrs, params, buffers, modules in self._saved:
            m.__dict__.update(attrs)
            m._parameters = {n: None if k is None else new_params[k] for n, k in params.items()}
            m._buffers = {n: None if k is None else new_buffers[k] for n, k in buffers.items()}
            m._modules = dict(modules)
        return new_params

    @property
    def nbytes(self) -> int:
        """CPU memory held by the copies."""
        tensors = [d for d, *_ in self._params.values()] + [d for d, _ in self._buffers.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class OptimizerSnapshot:
    """CPU copies of the per-parameter state of optimizers, matched to parameters by their snapshot ids.

    Only parameters that are not part of ``model`` are kept by reference (they are not restored);
    hyper-parameters (learning rate, ...) are not restored either: they belong to the LR schedule, which
    keeps running.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], model: nn.Module) -> None:
        in_model = {id(p) for p in model.parameters()}
        self._saved: list[tuple[torch.optim.Optimizer, list[list[int]], dict[int, dict[str, Any]]]] = []
        self._foreign: dict[int, nn.Parameter] = {}
        for opt in optimizers:
            groups = [[id(p) for p in g["params"]] for g in opt.param_groups]
            state: dict[int, dict[str, Any]] = {}
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) not in in_model:
                        self._foreign[id(p)] = p
                    s = opt.state.get(p)
                    if s:
                        state[id(p)] = {
                            k: _SavedTensor(*_cpu(v)) if isinstance(v, torch.Tensor) else v
                            for k, v in s.items()
                        }
            self._saved.append((opt, groups, state))

    def restore(self, new_params: dict[int, nn.Parameter]) -> None:
        """Point each optimizer at the restored parameters and give them back their saved state.

        Args:
            new_params: ``id(parameter at snapshot time) -> new parameter`` (from
                :meth:`CpuModuleSnapshot.restore`).

        """
        for opt, groups, state in self._saved:
            opt.state.clear()
            for group, ids in zip(opt.param_groups, groups, strict=True):
                params = [new_params[i] if i in new_params else self._foreign[i] for i in ids]
                group["params"] = params
                for i, p in zip(ids, params, strict=True):
                    if i in state:
                        opt.state[p] = {
                            k: v.data.to(v.device, copy=True) if isinstance(v, _SavedTensor) else v
                            for k, v in state[i].items()
                        }


@dataclass(frozen=True)
class _SavedTensor:
    data: torch.Tensor
    device: torch.device


class RollbackPoint:
    """Everything needed to undo one pruning event later: model and optimizers on the CPU, history length.

    Args:
        model: the model about to be pruned.
        optimizers: its optimizers (their per-parameter state is saved too).
        history: the pruning graph's history list (its length is saved; entries added later are dropped).
        extra: anything else the caller wants back (statistics, record counts, ...).

    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        history: Sequence[Any] = (),
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.module = CpuModuleSnapshot(model)
        self.optimizers = OptimizerSnapshot(optimizers, model)
        self.history_len = len(history)
        self.extra: dict[str, Any] = dict(extra or {})

    def restore(self, history: list[Any] | None = None) -> dict[int, nn.Parameter]:
        """Restore the model and the optimizers, and cut ``history`` back to its saved length.

        Returns:
            ``id(parameter at snapshot time) -> new parameter``.

        """
        new_params = self.module.restore()
        self.optimizers.restore(new_params)
        if history is not None:
            del history[self.history_len :]
        return new_params
