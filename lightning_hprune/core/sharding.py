"""Prune FSDP2 (``fully_shard``) models in place: gather the full structure, prune it, shard it again.

torch-pruning traces and slices ordinary tensors, while FSDP2 keeps every parameter as a ``DTensor``
sharded on dim 0 across a device mesh, with module hooks that gather it around each forward. A pruning
event on a sharded model therefore runs in four steps, identically on every rank:

1. :func:`find_units` records every ``fully_shard`` unit: its modules and what it takes to apply it again
   (mesh, ``reshard_after_forward``, mixed precision, offloading, per-parameter placements, ignored
   parameters);
2. :func:`unshard` gathers the parameters, one at a time, into ordinary parameters and takes FSDP off the
   modules (class, hooks, composable state). It only *replaces* what FSDP put on a module, never edits it
   in place, so a by-reference :class:`~lightning_hprune.core.undo.Snapshot` taken before still holds the
   sharded model and :meth:`Unsharded.undo` puts back the rest (classes, the global module-state map);
3. the session plans and prunes the full model (rank 0 decides, the plan is broadcast). Inside
   :func:`releasing` (and :func:`no_saved_tensors`, so that the traced graph keeps no views of the
   weights), the storage of every gathered parameter that pruning replaced is freed at once, so a rank
   holds the gathered model once, not the gathered and the pruned one together;
4. :meth:`Unsharded.reshard` applies the recorded units again, children first; the optimizer state is then
   carried over by :func:`~lightning_hprune.core.optim_state.remap_optimizer` (each state tensor gathered,
   sliced like its weight and split like the new parameter, one tensor at a time).

Supported: 1-D (FSDP) and 2-D (HSDP) meshes with one parameter group per unit. Refused with
:class:`ShardingError`: tensor-parallel ``DTensor`` parameters outside FSDP, SPMD meshes
(``dp_mesh_dims``), per-parameter meshes. Settings made on FSDP modules after ``fully_shard`` (prefetch
lists, custom collectives, ``set_*`` flags) are not re-applied.

This module does not import Lightning; the Trainer glue is ``lightning_hprune/callbacks/strategies.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn as nn


class ShardingError(RuntimeError):
    """A sharded model (or a sharding set-up) that pruning cannot handle."""


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def _fsdp_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (a sharded parameter or state tensor)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``model`` or one of its submodules."""
    cls = _fsdp_module_type()
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


# ---------------------------------------------------------------------- tensors
@torch.no_grad()
def full_tensor(t: Any, device: torch.device | None = None) -> torch.Tensor:
    """The whole (global) tensor of a DTensor on every rank (a collective); a plain tensor unchanged.

    Args:
        t: a DTensor or a plain tensor.
        device: where the local shard must be for the collective (the mesh's device; a CPU-offloaded
            shard is moved there first). Default: where it is.

    """
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import DTensor

    local = t.to_local()
    if device is not None and local.device != device:
        t = DTensor.from_local(
            local.to(device), t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
        )
    return t.full_tensor()


@torch.no_grad()
def shard_like(full: torch.Tensor, like: Any) -> torch.Tensor:
    """``full`` (the same on every rank) split like ``like`` (a DTensor); on ``like``'s device if plain.

    No communication: every rank keeps its own slice of its local copy.
    """
    if not is_dtensor(like):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    local = like.to_local()
    out = distribute_tensor(full.to(local.device), like.device_mesh, like.placements, src_data_rank=None)
    if out.to_local().shape != local.shape:  # pragma: no cover - FSDP2 and DTensor chunk alike
        raise ShardingError(
            f"Expected a state tensor of {tuple(full.shape)} split like its parameter (local shard "
            f"{tuple(local.shape)}), but DTensor split it into {tuple(out.to_local().shape)}."
        )
    return out


def same_layout(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` have the same global shape, device and (for DTensors) mesh and placements."""
    if a.shape != b.shape:
        return False
    if is_dtensor(a) != is_dtensor(b):
        return False
    if is_dtensor(a):
        return (
            a.device_mesh == b.device_mesh
            and tuple(a.placements) == tuple(b.placements)
            and a.to_local().shape == b.to_local().shape
            and a.to_local().device == b.to_local().device
        )
    return a.device == b.device


# ---------------------------------------------------------------------- units
@dataclass
class ShardUnit:
    """One ``fully_shard`` call: its modules, and the arguments that apply it again to the same modules.

    Attributes:
        modules: the module, or the modules grouped in one call (``fully_shard([a, b])``).
        mesh: the data-parallel device mesh.
        reshard_after_forward: as given to ``fully_shard`` (``None``: FSDP chooses, root or not).
        mp_policy: the ``MixedPrecisionPolicy``.
        offload_policy: the ``OffloadPolicy``.
        device: the unit's compute device (where gathered parameters live).
        placements: ``(module, parameter name, Shard placement)`` for parameters not sharded on dim 0.
        ignored: ``(module, parameter name)`` of parameters FSDP was told to leave alone.

    """

    modules: tuple[nn.Module, ...]
    mesh: Any
    reshard_after_forward: bool | int | None
    mp_policy: Any
    offload_policy: Any
    device: torch.device
    placements: list[tuple[nn.Module, str, Any]] = field(default_factory=list)
    ignored: list[tuple[nn.Module, str]] = field(default_factory=list)

    def apply(self) -> None:
        """Apply ``fully_shard`` with the recorded arguments to the unit's modules (as they are now)."""
        from torch.distributed.fsdp import fully_shard

        ignored = {p for m, n in self.ignored if (p := m._parameters.get(n)) is not None} or None
        by_param = {
            id(p): placement for m, n, placement in self.placements if (p := m._parameters.get(n)) is not None
        }
        placement_fn = (lambda p: by_param.get(id(p))) if by_param else None
        target: Any = self.modules[0] if len(self.modules) == 1 else list(self.modules)
        fully_shard(
            target,
            mesh=self.mesh,
            reshard_after_forward=self.reshard_after_forward,
            shard_placement_fn=placement_fn,
            mp_policy=self.mp_policy,
            offload_policy=self.offload_policy,
            ignored_params=ignored,
        )


def _state_of(module: nn.Module) -> Any:
    return module._get_fsdp_state()  # type: ignore[operator]


def _reshard_after_forward(state: Any, group: Any) -> bool | int | None:
    if state._auto_reshard_after_forward:
        return None
    post = group.post_forward_mesh_info if group is not None else None
    if post is None:
        return False
    if post is group.mesh_info:
        return True
    return int(post.shard_mesh_size)


def find_units(model: nn.Module) -> list[ShardUnit]:
    """Every ``fully_shard`` unit of ``model``, parents before children (the order of ``named_modules``).

    Raises:
        ShardingError: a set-up :func:`unshard` cannot undo and apply again (see the module docstring).

    """
    fsdp_cls = _fsdp_module_type()
    if fsdp_cls is None:
        return []
    from torch.distributed.fsdp import OffloadPolicy
    from torch.distributed.tensor import Shard

    units: list[ShardUnit] = []
    seen: set[int] = set()
    managed: set[int] = set()  # id() of every parameter some unit shards
    names = {m: n for n, m in model.named_modules()}
    for module in model.modules():
        if not isinstance(module, fsdp_cls):
            continue
        state = _state_of(module)
        if id(state) in seen:
            continue
        seen.add(id(state))
        where = names.get(module) or type(module).__name__
        groups = list(state._fsdp_param_groups)
        if len(groups) > 1:
            raise ShardingError(
                f"Expected each `fully_shard` unit to shard its parameters on one mesh, but {where!r} has "
                f"{len(groups)} parameter groups (a `shard_placement_fn` returning per-parameter meshes). "
                "Pruning cannot re-apply that sharding."
            )
        group = groups[0] if groups else None
        if group is not None and getattr(group.mesh_info, "is_spmd_mesh", False):
            raise ShardingError(
                f"Expected `fully_shard` on a data-parallel mesh, but {where!r} was sharded on an SPMD mesh "
                "(`dp_mesh_dims`, tensor parallelism inside FSDP). Pruning supports FSDP and HSDP meshes only."
            )
        placements: list[tuple[nn.Module, str, Any]] = []
        if group is not None:
            for fp in group.fsdp_params:
                info = fp._module_info
                managed.add(id(getattr(info.module, info.param_name)))
                if fp.fsdp_placement != Shard(0):
                    placements.append((info.module, info.param_name, fp.fsdp_placement))
                    placements.extend(
                        (m, n, fp.fsdp_placement)
                        for m, n in zip(info.shared_modules, info.shared_param_names, strict=True)
                    )
        units.append(
            ShardUnit(
                modules=tuple(state._modules),
                mesh=group.mesh_info.mesh if group is not None else None,
                reshard_after_forward=_reshard_after_forward(state, group),
                mp_policy=state._mp_policy,
                offload_policy=group.offload_policy if group is not None else OffloadPolicy(),
                device=state._device,
                placements=placements,
            )
        )
    _fill_meshes_and_ignored(model, units, managed)
    return units


def _fill_meshes_and_ignored(model: nn.Module, units: list[ShardUnit], managed: set[int]) -> None:
    """Give a unit without parameters the model's mesh; record the parameters FSDP leaves alone."""
    mesh = next((u.mesh for u in units if u.mesh is not None), None)
    unit_roots = {m for u in units for m in u.modules}
    names = {m: n for n, m in model.named_modules()}
    for unit in units:
        if unit.mesh is None:
            unit.mesh = mesh  # a unit without parameters of its own (e.g. the root): the model's mesh
        for root in unit.modules:
            stack = [root]
            while stack:
                m = stack.pop()
                for n, p in m._parameters.items():
                    if p is None or id(p) in managed:
                        continue
                    if is_dtensor(p):
                        raise ShardingError(
                            f"Expected every DTensor parameter to be sharded by `fully_shard`, but "
                            f"{names.get(m, '?')}.{n} is a DTensor FSDP does not manage (tensor parallelism, "
                            "`parallelize_module`). Pruning supports FSDP2 without tensor parallelism "
                            "(tensor_parallel_size=1)."
                        )
                    unit.ignored.append((m, n))
                stack.extend(c for c in m._modules.values() if c is not None and c not in unit_roots)


# ---------------------------------------------------------------------- taking FSDP off and on
def _contract_keys() -> tuple[str, str]:
    contract = importlib.import_module("torch.distributed._composable.contract")
    return contract.STATE_KEY, contract.REGISTRY_KEY


def _handles(state: Any) -> list[Any]:
    out: list[Any] = []
    for name in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
        h = getattr(state, name, None)
        if h is not None:
            out.extend(getattr(h, "handles", (h,)))
    for group in state._fsdp_param_groups:
        out.extend(group._module_to_pre_save_state_dict_hook_handle.values())
        out.extend(group._module_to_pre_load_state_dict_hook_handle.values())
        out.extend(
            fp._post_load_hook_handle for fp in group.fsdp_params if hasattr(fp, "_post_load_hook_handle")
        )
    return out


def _hook_ids(handles: list[Any]) -> dict[int, set[int]]:
    """``id(hook dict) -> hook ids`` of every dict the handles registered into."""
    out: dict[int, set[int]] = {}
    for h in handles:
        refs = [h.hooks_dict_ref, *getattr(h, "extra_dict_ref", ())]
        for ref in refs:
            d = ref()
            if d is not None:
                out.setdefault(id(d), set()).add(h.id)
    return out


@dataclass
class Unsharded:
    """A model taken out of FSDP2 by :func:`unshard`: ordinary, full parameters on every rank.

    Attributes:
        model: the model.
        units: its recorded ``fully_shard`` units.
        gathered: ``id(sharded parameter) -> full parameter`` that replaced it.

    """

    model: nn.Module
    units: list[ShardUnit]
    gathered: dict[int, nn.Parameter]
    _classes: list[tuple[nn.Module, type]] = field(default_factory=list)
    _states: list[tuple[nn.Module, Any]] = field(default_factory=list)
    resharded: bool = False

    def undo(self) -> None:
        """After a by-reference snapshot taken before :func:`unshard` was restored: put FSDP back exactly.

        The snapshot restores every module's attributes (hooks, FSDP state, sharded parameters); this puts
        back what lives elsewhere: the classes and torch's global module-to-state map.
        """
        from torch.distributed import _composable_state

        mapping = _composable_state._module_state_mapping
        for module, cls in self._classes:
            module.__class__ = cls
        for module, state in self._states:
            mapping[module] = state  # a weak reference to the state, as torch keeps it

    def reshard(self) -> dict[int, nn.Parameter]:
        """Apply the recorded units again, children first, to the modules still in the model.

        Units whose modules were removed (a pruned block) are dropped. Each unit's full parameters are freed
        as soon as it is sharded, so at most the (pruned) model is held once, plus the new shards.

        Returns:
            ``id(full parameter) -> sharded parameter`` for every parameter that FSDP took over.

        """
        live = {id(m) for m in self.model.modules()}
        before = _registered(self.model)
        for unit in reversed(self.units):
            if all(id(m) in live for m in unit.modules):
                unit.apply()
                release(before[k] for k, p in _registered_in(unit.modules).items() if before.get(k) is not p)
        after = _registered(self.model)
        self.resharded = True
        return {id(p): after[k] for k, p in before.items() if k in after and after[k] is not p}


def _registered(model: nn.Module) -> dict[tuple[int, str], nn.Parameter]:
    return _registered_in([model])


def _registered_in(roots: Any) -> dict[tuple[int, str], nn.Parameter]:
    out: dict[tuple[int, str], nn.Parameter] = {}
    for root in roots:
        for m in root.modules():
            for n, p in m._parameters.items():
                if p is not None:
                    out[(id(m), n)] = p
    return out


def reshard_all(model: nn.Module) -> None:
    """Register the sharded parameters on every FSDP module (``FSDPModule.reshard``).

    A unit with ``reshard_after_forward=False`` (FSDP's default for the root) keeps its gathered parameters
    registered after a forward without gradients. Call it before taking a snapshot of a sharded model.
    """
    fsdp_cls = _fsdp_module_type()
    if fsdp_cls is None:
        return
    for m in model.modules():
        if isinstance(m, fsdp_cls):
            cast(Any, m).reshard()


@torch.no_grad()
def unshard(model: nn.Module) -> Unsharded:
    """Take FSDP2 off ``model``: every sharded parameter becomes its full tensor, modules their own class.

    A collective: every rank must call it at the same point. Parameters are gathered one at a time, in
    module order. Nothing FSDP put on a module is edited in place (hook dictionaries are replaced by
    filtered copies, state entries removed from the module's ``__dict__``), so a by-reference
    :class:`~lightning_hprune.core.undo.Snapshot` taken before, followed by :meth:`Unsharded.undo`,
    restores the sharded model exactly.

    Raises:
        ShardingError: see :func:`find_units`.

    """
    from torch.distributed import _composable_state
    from torch.distributed.fsdp import FSDPModule

    units = find_units(model)
    reshard_all(model)
    result = Unsharded(model=model, units=units, gathered={})
    mapping = _composable_state._module_state_mapping
    hook_ids: dict[int, set[int]] = {}
    states: set[int] = set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        ref = mapping.get(module)
        if ref is not None:
            result._states.append((module, ref))
        state = _state_of(module)
        if id(state) in states:
            continue  # a module of a grouped call (`fully_shard([a, b])`): its state is done
        states.add(id(state))
        for group in state._fsdp_param_groups:
            for fp in group.fsdp_params:
                info = fp._module_info
                sharded = info.module._parameters[info.param_name]
                if id(sharded) in result.gathered:
                    continue
                full = nn.Parameter(
                    full_tensor(sharded, state._device).contiguous(), requires_grad=sharded.requires_grad
                )
                result.gathered[id(sharded)] = full
                shared = zip(info.shared_modules, info.shared_param_names, strict=True)
                for m, n in [(info.module, info.param_name), *shared]:
                    m._parameters[n] = full
        for key, ids in _hook_ids(_handles(state)).items():
            hook_ids.setdefault(key, set()).update(ids)
    keys = (*_contract_keys(), "_is_fsdp_managed_module", "_fsdp_use_orig_params")
    try:
        for module in model.modules():
            for name, value in list(vars(module).items()):
                if isinstance(value, dict) and id(value) in hook_ids:
                    drop = hook_ids[id(value)]
                    module.__dict__[name] = type(value)((k, v) for k, v in value.items() if k not in drop)
            for attr in keys:
                module.__dict__.pop(attr, None)
            if isinstance(module, FSDPModule):
                cls = type(module)
                result._classes.append((module, cls))
                mro = cls.__mro__
                module.__class__ = mro[mro.index(FSDPModule) + 1]
        for module, _ in result._states:
            mapping.pop(module, None)
    except BaseException:
        result.undo()  # the caller's snapshot restores the modules' attributes; classes and the map here
        raise
    return result


# ---------------------------------------------------------------------- memory
def _not_saved(t: torch.Tensor) -> None:
    return None


def _never_unpacked(packed: Any) -> torch.Tensor:
    raise RuntimeError(
        "A backward pass ran through a graph recorded while a sharded model was gathered for pruning; "
        "those graphs keep no tensors (lightning_hprune.core.sharding.no_saved_tensors)."
    )


@contextmanager
def no_saved_tensors() -> Iterator[None]:
    """Autograd keeps no tensors for backward while open (for graphs that are walked, never differentiated).

    torch-pruning traces the model with autograd and keeps the recorded graph, whose saved tensors include
    views of every weight (``weight.t()`` for a linear layer): they would keep the gathered weights alive
    after pruning replaced (and :func:`releasing` freed) them, for as long as the dependency graph lives.
    An event runs no backward pass, so nothing needs them.
    """
    with torch.autograd.graph.saved_tensors_hooks(_not_saved, _never_unpacked):
        yield


def release(params: Any) -> None:
    """Free the storage (and gradient) of parameters no longer in the model; the objects stay valid."""
    for p in params:
        if p is None or p.numel() == 0:
            continue
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        p.grad = None


@contextmanager
def releasing(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """While open, free each of ``params`` (or a parameter pruning made from one) once pruning replaced it.

    torch-pruning builds each pruned parameter from the old one and only then puts it in the module; the
    old one is freed at the next replacement (or when the context closes), once no module holds it. Used
    on the gathered parameters of a sharded model, whose sharded originals are what an undo restores.
    """
    from torch_pruning.pruner import function as tp_function

    cls = tp_function.BasePruningFunc
    original = cls._prune_parameter_and_grad
    ours = {id(p): p for p in params}  # strong references: an id stays unique while it is tracked
    pending: list[nn.Parameter] = []

    def flush() -> None:
        held = {id(p) for m in model.modules() for p in m._parameters.values() if p is not None}
        keep = [p for p in pending if id(p) in held]
        release(p for p in pending if id(p) not in held)
        pending[:] = keep

    def replacing(self: object, weight: nn.Parameter, keep_idxs: list[int], pruning_dim: int) -> nn.Parameter:
        flush()
        new = original(self, weight, keep_idxs, pruning_dim)
        if id(weight) in ours:
            ours[id(new)] = new
            pending.append(weight)
        return new

    cls._prune_parameter_and_grad = replacing  # type: ignore[method-assign]
    try:
        yield
    finally:
        cls._prune_parameter_and_grad = original  # type: ignore[method-assign]
        flush()
