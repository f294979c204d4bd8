"""Carry optimizer state across a structural prune.

torch-pruning replaces every pruned weight with a *new* ``nn.Parameter`` built by ``index_select``.
:class:`ParameterSurgery` records, while a prune runs, which old parameter became which new one and
which indices were kept along which dimensions. :func:`remap_optimizer` then edits an optimizer *in
place*: its param groups point at the new parameters and every per-parameter state tensor of the
parameter's shape (SGD momentum, Adam moments, ...) is sliced exactly like the weight. Scalars such as
Adam's ``step`` are kept. Because the optimizer object itself survives, LR schedulers, Lightning's
optimizer wrappers and AMP scalers keep working and keep their position. Sharded (FSDP2 ``DTensor``)
state is gathered, sliced and split again like its new parameter (see :mod:`lightning_hprune.core.sharding`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch_pruning.pruner import function as tp_function

from lightning_hprune.core.sharding import full_tensor, same_layout, shard_like


@dataclass
class ParamChange:
    """How one original parameter became its pruned successor."""

    old: nn.Parameter
    new: nn.Parameter
    #: ``(dim, kept indices)`` applied in order.
    ops: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """Slice ``tensor`` (shaped like ``old``) the way ``old`` was sliced into ``new``."""
        for dim, keep in self.ops:
            tensor = torch.index_select(tensor, dim, keep.to(tensor.device))
        return tensor


class ParameterSurgery:
    """The parameter changes of one prune (filled by :func:`record_parameter_surgery`)."""

    def __init__(self) -> None:
        self._by_new: dict[int, ParamChange] = {}

    def _record(self, weight: nn.Parameter, keep_idxs: Iterable[int], dim: int, new: nn.Parameter) -> None:
        keep = torch.as_tensor(list(keep_idxs), dtype=torch.long)
        prev = self._by_new.pop(id(weight), None)
        change = prev if prev is not None else ParamChange(old=weight, new=new)
        change.new = new
        change.ops.append((dim, keep))
        self._by_new[id(new)] = change

    @property
    def changes(self) -> list[ParamChange]:
        """All recorded changes, one per original parameter."""
        return list(self._by_new.values())

    def old_to_change(self) -> dict[int, ParamChange]:
        """Map ``id(old parameter)`` to its change."""
        return {id(c.old): c for c in self._by_new.values()}

    def merge(self, later: ParameterSurgery) -> None:
        """Compose a later surgery onto this one (for multi-round events)."""
        for change in later.changes:
            prev = self._by_new.pop(id(change.old), None)
            if prev is None:
                self._by_new[id(change.new)] = change
            else:
                prev.new = change.new
                prev.ops.extend(change.ops)
                self._by_new[id(change.new)] = prev


@contextmanager
def record_parameter_surgery(into: ParameterSurgery | None = None) -> Iterator[ParameterSurgery]:
    """Record every parameter torch-pruning slices while the context is open.

    Args:
        into: record into this surgery (a multi-round event's: a parameter sliced again is chained to its
            first change at once, so intermediate parameters are released as soon as they are replaced).

    """
    surgery = into if into is not None else ParameterSurgery()
    cls = tp_function.BasePruningFunc
    original = cls._prune_parameter_and_grad

    def recording(self: object, weight: nn.Parameter, keep_idxs: list[int], pruning_dim: int) -> nn.Parameter:
        new = original(self, weight, keep_idxs, pruning_dim)
        surgery._record(weight, keep_idxs, pruning_dim, new)
        return new

    cls._prune_parameter_and_grad = recording  # type: ignore[method-assign]
    try:
        yield surgery
    finally:
        cls._prune_parameter_and_grad = original  # type: ignore[method-assign]


def remap_optimizer(
    optimizer: torch.optim.Optimizer,
    surgery: ParameterSurgery,
    live_params: Iterable[nn.Parameter],
    before: Mapping[int, nn.Parameter] | None = None,
    after: Mapping[int, nn.Parameter] | None = None,
) -> list[str]:
    """Point ``optimizer`` at the pruned parameters and slice its state, in place.

    Parameters that are no longer part of the model (a removed block) leave the optimizer.

    For a sharded model (FSDP2), pruning runs on gathered copies of the parameters and the pruned ones are
    sharded again afterwards: ``before`` maps ``id(optimizer's parameter)`` to the gathered parameter the
    surgery saw, ``after`` maps ``id(pruned parameter)`` to the sharded parameter that now stands for it.
    A sharded (``DTensor``) state tensor is then gathered, sliced like the weight and split like the new
    parameter, one tensor at a time; one whose parameter kept its shape and sharding is kept as it is.

    Returns:
        Warnings about state that could not be carried over (empty when everything was carried).

    """
    by_old = surgery.old_to_change()
    before = before or {}
    after = after or {}
    live = {id(p) for p in live_params}
    problems: list[str] = []
    for group in optimizer.param_groups:
        new_params = []
        for p in group["params"]:
            seen = before.get(id(p), p)
            change = by_old.get(id(seen))
            now = change.new if change is not None else seen
            final = after.get(id(now), now)
            if final is p:
                if id(p) in live:
                    new_params.append(p)
                else:
                    optimizer.state.pop(p, None)
                continue
            if id(final) not in live:
                optimizer.state.pop(p, None)
                continue
            new_params.append(final)
            state = optimizer.state.pop(p, None)
            if not state:
                continue
            new_state = {}
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.dim() > 0:
                    if change is None and same_layout(value, final):
                        new_state[key] = value
                        continue
                    full = full_tensor(value)
                    if change is not None:
                        full = change.apply(full).contiguous()
                    new_state[key] = shard_like(full, final)
                elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() > 1:
                    problems.append(
                        f"optimizer state {key!r} of shape {tuple(value.shape)} for a parameter of shape "
                        f"{tuple(p.shape)} cannot be sliced; it was reset"
                    )
                else:
                    new_state[key] = value
            if len(new_state) == len(state):
                optimizer.state[final] = new_state
        group["params"] = new_params
    return problems
