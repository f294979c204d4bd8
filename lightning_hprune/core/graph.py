"""The dependency graph of a model, built once per structure, and all-or-nothing structural pruning.

:class:`PruningGraph` wraps torch-pruning's ``DependencyGraph`` and fixes what bites in practice:

* tracing switches the model to ``eval()`` and never switches it back: we restore every module's mode;
* tracing needs grad mode on and inputs on the model's device/dtype: we take care of both;
* channels that reach the model's output are never prunable, so the output shape never changes;
* a failure in the middle of applying a plan restores every touched module (no half-pruned model);
* every structural step is appended to a history list of plain data (module names, indices) for
  checkpoints and replay. The list is the caller's (a session's ledger owns it) or the graph's own.
"""

from __future__ import annotations

import fnmatch
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops as tp_ops
from torch_pruning.dependency import index_mapping as tp_index_mapping

from lightning_hprune.core.attention import find_layouts, protected_modules
from lightning_hprune.core.optim_state import ParameterSurgery, record_parameter_surgery
from lightning_hprune.core.undo import Snapshot


class PruningError(RuntimeError):
    """A pruning step failed; the model was restored to its state before the step."""


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit (torch-pruning's tracing calls ``eval()``)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class SkippedBlock(nn.Identity):
    """What a removed block becomes: returns its first input and ignores every other argument.

    Unlike a plain ``nn.Identity`` it accepts the extra arguments transformer layers are called with
    (attention masks, caches, ...). Block levels only remove blocks whose output is a tensor shaped like
    their input, and check that the model still runs without them.
    """

    def forward(self, input: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Return the block's input (the first positional argument, else the first keyword argument)."""
        if input is None and kwargs:
            return next(iter(kwargs.values()))
        return input


def move_to(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move tensors nested in tuples/lists/dicts to ``device`` (floating tensors also to ``dtype``)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: move_to(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device, dtype) for v in obj)
    return obj


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of the model's first parameter (CPU/float32 if it has none)."""
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` the way Lightning's ``example_input_array`` convention does (tuple -> *args, dict -> **kwargs)."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    return model(example_inputs)


def match_modules(model: nn.Module, patterns: Sequence[str]) -> dict[str, list[str]]:
    """Map each glob pattern (``fnmatch``) to the module names it matches."""
    names = [n for n, _ in model.named_modules() if n]
    return {p: [n for n in names if fnmatch.fnmatchcase(n, p)] for p in patterns}


@dataclass(frozen=True)
class ChannelGroup:
    """A set of coupled channels that must be pruned together (one torch-pruning group).

    Attributes:
        name: name of the group's root module (its output channels index the group).
        size: number of prunable units: channels, or heads for an attention projection.
        modules: names of every module the group touches.
        group: the torch-pruning group with full indices (for criteria, which score channels).
        units: for a group pruned in whole units (attention heads): the root's channel indices of every
            unit; ``None`` when every channel is a unit.
        outputs: names of the modules whose *output* width is the group's (the root and every coupled
            layer: residual convolutions, normalisations). Unlike ``name``, which is whichever layer
            torch-pruning picks as root and may change after a block is removed, each of these modules
            keeps its place in the group, so they identify it across structural changes.
        multiple_of: kept widths are multiples of this (the head counts of the ``nn.MultiheadAttention``
            layers whose ``embed_dim`` the group is: ``embed_dim % num_heads == 0`` must hold).

    """

    name: str
    size: int
    modules: tuple[str, ...]
    group: Any
    units: tuple[tuple[int, ...], ...] | None = None
    outputs: tuple[str, ...] = ()
    multiple_of: int = 1

    @property
    def align(self) -> int | None:
        """Kept widths are multiples of this many units (``None``: the callback's ``round_to``).

        Channel groups follow ``round_to``; head groups align to 1 head, since their width in channels is
        already a multiple of ``head_dim``.
        """
        return None if self.units is None else 1

    @property
    def kind(self) -> str:
        """``"heads"`` for attention projections pruned in whole heads, else ``"channels"``."""
        return "channels" if self.units is None else "heads"

    def aligned(self, round_to: int) -> int:
        """Kept widths are multiples of this many units, given the callback's ``round_to`` (in channels)."""
        if self.align is None:
            return round_to
        return self.align if self.kind == "heads" else math.lcm(self.align, round_to)

    def unit_scores(self, channel_scores: torch.Tensor) -> torch.Tensor:
        """One score per unit: the mean of its channels' scores (the scores themselves for channel groups)."""
        if self.units is None:
            return channel_scores
        flat = channel_scores.flatten().float()
        return torch.stack([flat[list(u)].mean() for u in self.units])

    def allows(self, width: int) -> bool:
        """Whether the group may keep ``width`` units (multiples of ``multiple_of``, unless a layout restricts them)."""
        return width % self.multiple_of == 0

    @property
    def kind_key(self) -> str:
        """What kind of unit the group holds, for levels that compare groups (``"heads"``, ``"channels"``)."""
        return self.kind

    def score(self, importance: Any) -> torch.Tensor:
        """One score per unit from ``importance`` (an :class:`~lightning_hprune.core.importance.Importance`)."""
        return self.unit_scores(importance(self.group))

    def expand(self, units: Sequence[int]) -> dict[str, list[int]]:
        """What removing ``units`` means for :meth:`PruningGraph.prune`: ``{group name: units}`` here."""
        return {self.name: [int(u) for u in units]} if len(units) else {}

    def unit_cost(self, cost: Any, graph: PruningGraph, costs: Mapping[str, float]) -> float:
        """What removing one unit saves in ``cost`` (a :class:`~lightning_hprune.core.cost.Cost`).

        A channel saves, in every layer of the group, that layer's cost divided by its width along the pruned
        dimension; a head saves its attention layer's cost (projections and attention products) plus the
        group's layers outside it, divided by the head count.
        """
        if self.kind == "heads":
            layout = graph.layouts[self.name]
            parent = layout.module
            outside = [m for m in self.modules if parent and m != parent and not m.startswith(parent + ".")]
            total = costs.get(parent, 0.0) + sum(costs.get(m, 0.0) for m in outside)
            return float(total) / max(1, self.size)
        dg = graph._dg
        seen: dict[int, float] = {}
        for dep, _ in self.group:
            module = dep.target.module
            if not isinstance(module, nn.Module) or module not in graph._module2name:
                continue
            is_out = dg.is_out_channel_pruning_fn(dep.handler)
            try:
                n = dg.get_out_channels(module) if is_out else dg.get_in_channels(module)
            except Exception:  # pragma: no cover - exotic layers without a channel count
                n = None
            if not n:
                continue
            c = cost.per_unit_of_layer(module, graph._module2name[module], int(n), costs)
            seen[id(module)] = max(seen.get(id(module), 0.0), c)
        return float(sum(seen.values()))


class PruningGraph:
    """torch-pruning's dependency graph over ``model``, rebuilt only when the structure changes.

    Args:
        model: the module to prune (pruned in place).
        example_inputs: inputs for tracing (tensor, tuple of positional args, or dict of kwargs).
        ignored_layers: modules whose *output* width must never change.
        history: the list every structural step is appended to (default: a new one, ``self.history``).
        uniform: for models of a known layout (:mod:`lightning_hprune.core.families`), keep widths uniform
            across layers (what one config value describes); ``False`` prunes each layer on its own.
        families: use a known layout when the model has one (``False`` always traces with torch-pruning).

    A model of a known layout (Hugging Face Llama, Qwen, Mistral, Phi-3, GPT-2, BERT, ...) is not traced: its
    family builds the groups from the structure, prunes by slicing, removes whole layers from the layer list
    and keeps the config true (``self.family``).

    """

    #: Number of dependency-graph builds in this process (lets tests and benchmarks check rebuild counts).
    builds: int = 0
    #: Seconds the first grouping after a (re)build may take. torch-pruning's grouping can loop forever on
    #: some architectures; a fit must fail with a message rather than hang.
    grouping_timeout_s: float = 300.0

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        ignored_layers: Sequence[nn.Module] = (),
        history: list[dict[str, Any]] | None = None,
        uniform: bool = True,
        families: bool = True,
    ) -> None:
        from lightning_hprune.core.families import detect

        self.model = model
        self.example_inputs = example_inputs
        self.ignored_layers = list(ignored_layers)
        self.history: list[dict[str, Any]] = [] if history is None else history
        self.uniform = bool(uniform)
        self.family = detect(model) if families else None
        self._dg: Any = None
        self._groups: list[ChannelGroup] | None = None
        self.rebuild()

    # ------------------------------------------------------------------ building
    def rebuild(self) -> None:
        """(Re)trace the model; the model's train/eval modes and grad state are left as they were."""
        if self.family is not None:  # a known layout: nothing to trace
            PruningGraph.builds += 1
            self._groups = None
            self._module2name = {m: n for n, m in self.model.named_modules()}
            self.layouts: dict[str, Any] = {}
            self._protected: dict[str, str] = {}
            #: Groups left out because they would cut through the heads of an unrecognised attention layer.
            self.protected_groups: dict[str, str] = {}
            #: Groups left out for another reason than attention heads: group name -> why.
            self.left_alone: dict[str, str] = {}
            self._unmappable: set[Any] = set()
            self._failing_roots: dict[int, str] | None = None
            self._grouping_checked = True
            return
        device, dtype = model_device_dtype(self.model)
        inputs = move_to(self.example_inputs, device, dtype)
        unmappable: set[Any] = set()
        with preserved_modes(self.model), torch.enable_grad(), _unmappable_reshapes(unmappable):
            try:
                self._dg = tp.DependencyGraph().build_dependency(
                    self.model, example_inputs=inputs, forward_fn=_forward_fn, verbose=False
                )
            except Exception as err:  # torch-pruning raises many kinds of errors while tracing
                raise PruningError(
                    f"torch-pruning could not trace {type(self.model).__name__}: {type(err).__name__}: {err}. "
                    "Exclude the module that fails with `ignored_layers`, or set `example_input_array` to "
                    "inputs the model's forward accepts."
                ) from err
        PruningGraph.builds += 1
        self._groups = None
        self._module2name = {m: n for n, m in self.model.named_modules()}
        self.layouts = find_layouts(self.model)
        self._protected = protected_modules(self.model)
        self.protected_groups = {}
        self.left_alone = {}
        #: Reshapes whose channel mapping torch-pruning could not work out (a channel shuffle, ...).
        self._unmappable = unmappable
        #: Roots whose group torch-pruning failed to map (``id`` -> error); ``None`` until one fails.
        self._failing_roots = None
        self._grouping_checked = False

    # ------------------------------------------------------------------ groups
    def groups(self) -> list[ChannelGroup]:
        """Every prunable channel group: never one that reaches the model's output or an ignored layer's output.

        Computed once per structure (torch-pruning's grouping is the slow part of a round): every change made
        through the graph (:meth:`prune`, :meth:`replace_with_identity`, :meth:`rebuild`) drops the cache; a
        caller that changes the model's structure by other means calls :meth:`invalidate`.
        """
        if self._groups is None:
            if self.family is not None:
                self._groups = list(self.family.groups(self.model, self.uniform, self.ignored_layers))
                self.protected_groups = dict(getattr(self.family, "protected", {}))
            else:
                self._groups = self._compute_groups()
        return list(self._groups)

    def invalidate(self) -> None:
        """Forget the cached groups (the model's widths changed outside the graph)."""
        self._groups = None

    def _compute_groups(self) -> list[ChannelGroup]:
        from lightning_hprune.core.conv_groups import GroupedChannelGroup, grouped_units

        out: list[ChannelGroup] = []
        self.left_alone = {}
        with preserved_modes(self.model):
            for group in self._all_groups():
                if any(self._reaches_output(dep) for dep, _ in group):
                    continue
                root = group[0].dep.target.module
                name = self._module2name.get(root)
                if name is None:
                    continue
                modules = tuple(
                    dict.fromkeys(
                        self._module2name[dep.target.module]
                        for dep, _ in group
                        if dep.target.module in self._module2name
                    )
                )
                attention = self._cuts_unknown_heads(group)
                if attention is not None:
                    self.protected_groups[name] = attention
                    continue
                layout = self.layouts.get(name)
                if layout is None and any(
                    dep.source in self._unmappable or dep.target in self._unmappable for dep, _ in group
                ):
                    self.left_alone[name] = (
                        "its channels pass through a reshape torch-pruning cannot map (a channel shuffle "
                        "or a view into more dimensions), so removing them would mix up channels"
                    )
                    continue
                outputs = tuple(
                    dict.fromkeys(
                        self._module2name[dep.target.module]
                        for dep, _ in group
                        if dep.target.module in self._module2name
                        and self._dg.is_out_channel_pruning_fn(dep.handler)
                    )
                )
                layout = self.layouts.get(name)
                if layout is not None:
                    units = layout.units(self.model)
                    out.append(
                        ChannelGroup(
                            name=name,
                            size=len(units),
                            modules=modules,
                            group=_without_params(group, layout.table_names()),
                            units=units,
                            outputs=outputs,
                        )
                    )
                    continue
                grouped = grouped_units(group, self._dg)
                if isinstance(grouped, str):
                    self.left_alone[name] = grouped
                    continue
                if grouped is not None:
                    units, per_unit = grouped
                    out.append(
                        GroupedChannelGroup(
                            name=name,
                            size=len(units),
                            modules=modules,
                            group=group,
                            units=units,
                            outputs=outputs,
                            per_unit=per_unit,
                        )
                    )
                    continue
                heads = [
                    d.target.module.num_heads
                    for d, _ in group
                    if isinstance(d.target.module, nn.MultiheadAttention)
                ]
                out.append(
                    ChannelGroup(
                        name=name,
                        size=len(group[0].idxs),
                        modules=modules,
                        group=group,
                        outputs=outputs,
                        multiple_of=math.lcm(*heads) if heads else 1,
                    )
                )
        return out

    def _all_groups(self) -> list[Any]:
        """torch-pruning's groups; the first call after a build runs under ``grouping_timeout_s``."""
        ignored = list(self.ignored_layers)
        if self._grouping_checked:
            return self._tp_groups(ignored)
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["groups"] = self._tp_groups(ignored)
            except BaseException as err:  # re-raised in the calling thread
                box["error"] = err

        worker = threading.Thread(target=run, name="hprune-grouping", daemon=True)
        worker.start()
        worker.join(self.grouping_timeout_s)
        if worker.is_alive():
            raise PruningError(
                f"torch-pruning did not finish grouping the channels of {type(self.model).__name__} within "
                f"{self.grouping_timeout_s:g} s (its dependency search can loop on some architectures, e.g. "
                "Llama-style decoders). Nothing was pruned. Exclude the part it cannot handle with "
                "`ignored_layers`, or raise `PruningGraph.grouping_timeout_s` if the model is just large."
            )
        if "error" in box:
            raise box["error"]
        self._grouping_checked = True
        return list(box["groups"])

    def _tp_groups(self, ignored: list[nn.Module]) -> list[Any]:
        """torch-pruning's groups, root by root when one of them cannot be mapped (see below)."""
        with _unmappable_reshapes(self._unmappable):
            if self._failing_roots is None:
                try:
                    return list(self._dg.get_all_groups(ignored_layers=ignored))
                except _MAPPING_ERRORS:
                    self._failing_roots = {}
            return self._groups_one_by_one(ignored)

    def _groups_one_by_one(self, ignored: list[nn.Module]) -> list[Any]:
        """torch-pruning's ``get_all_groups``, leaving alone the roots whose group it cannot map.

        Around a channel shuffle torch-pruning's index mappings can fail for some roots (an index outside a
        concatenation's offsets); the other groups are still valid.
        """
        dg = self._dg
        ignored = ignored + list(dg.IGNORED_LAYERS_IN_TRACING)
        visited: set[int] = set()
        out = []
        for module in list(dg.module2node.keys()):
            if module in ignored or not isinstance(module, (tp_ops.TORCH_CONV, tp_ops.TORCH_LINEAR)):
                continue
            pruner = dg.get_pruner_of_module(module)
            if pruner is None or pruner.get_out_channels(module) is None or id(module) in visited:
                continue
            name = self._module2name.get(module, type(module).__name__)
            failed = self._failing_roots.get(id(module)) if self._failing_roots is not None else None
            if failed is None:
                try:
                    group = dg.get_pruning_group(
                        module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module)))
                    )
                except _MAPPING_ERRORS as err:
                    # pruning other groups does not make it mappable: not tried again until a rebuild
                    failed = f"{type(err).__name__}: {err}"
                    if self._failing_roots is not None:
                        self._failing_roots[id(module)] = failed
            if failed is not None:
                self.left_alone[name] = (
                    f"torch-pruning could not map its channels through the model ({failed})"
                )
                continue
            prunable = True
            for dep, _ in group:
                if dg.is_out_channel_pruning_fn(dep.handler):
                    visited.add(id(dep.target.module))
                    if dep.target.module in ignored:
                        prunable = False
            if prunable:
                out.append(group)
        return out

    def _cuts_unknown_heads(self, group: Any) -> str | None:
        """The unrecognised attention module whose projections' output width ``group`` changes, if any."""
        for dep, _ in group:
            name = self._module2name.get(dep.target.module)
            if name in self._protected and self._dg.is_out_channel_pruning_fn(dep.handler):
                return self._protected[name]
        return None

    def _reaches_output(self, dep: Any) -> bool:
        # A node without consumers produces (part of) the model's output: its output width is fixed.
        node = dep.target
        if node.type == tp_ops.OPTYPE.OUTPUT:
            return True
        return not node.outputs and self._dg.is_out_channel_pruning_fn(dep.handler)

    def _root(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    # ------------------------------------------------------------------ pruning
    def prune(
        self, removals: Mapping[str, Sequence[int]], surgery: ParameterSurgery | None = None
    ) -> ParameterSurgery:
        """Remove channels, all or nothing.

        Args:
            removals: group root name -> unit indices (in the group's current numbering) to remove: channels,
                or heads for attention projections (see :class:`ChannelGroup`).
            surgery: record the parameter changes into this one (an event's, across its rounds).

        Returns:
            The parameter surgery (old -> new parameters, kept indices) for optimizer remapping.

        Raises:
            PruningError: the plan is invalid or applying it failed; the model is unchanged.

        """
        from lightning_hprune.core.conv_groups import GroupedChannelGroup

        if self.family is not None:
            return self._prune_slots(removals, surgery)
        current = {g.name: g for g in self.groups()}
        for name, idxs in removals.items():
            if name not in current:
                raise PruningError(f"Cannot prune group {name!r}: it is not a prunable group of the model.")
            size = current[name].size
            bad = [i for i in idxs if not 0 <= int(i) < size]
            if bad:
                raise PruningError(f"Cannot prune group {name!r}: indices {bad[:5]} outside [0, {size}).")
            if len(set(map(int, idxs))) >= size:
                raise PruningError(
                    f"Cannot prune group {name!r}: the plan removes all {size} {current[name].kind}."
                )
        snapshot = Snapshot(self.model, history=self.history)
        self._groups = None
        try:
            with record_parameter_surgery(surgery) as surgery, preserved_modes(self.model):
                for name, idxs in removals.items():
                    if len(idxs) == 0:
                        continue
                    plain = sorted({int(i) for i in idxs})
                    layout = self.layouts.get(name)
                    group = current[name]
                    if layout is not None:
                        layout.prune_tables(self.model, plain)
                        self._prune_root(name, layout.channels(self.model, plain), skip=layout.table_names())
                        layout.sync_heads(self.model)
                        self.history.append({"op": "heads", "module": name, "idxs": plain})
                    elif isinstance(group, GroupedChannelGroup):  # unit j: offset j in every conv group
                        self._prune_root(name, group.channels(plain))
                        self.history.append({"op": "channels", "module": name, "idxs": plain})
                    else:
                        self._prune_root(name, plain)
                        self.history.append({"op": "channels", "module": name, "idxs": plain})
        except Exception as err:
            snapshot.restore()
            self.rebuild()
            raise PruningError(
                f"Applying the pruning plan failed ({type(err).__name__}: {err}); the model was restored "
                "to its state before this pruning step."
            ) from err
        return surgery

    def _prune_slots(
        self, removals: Mapping[str, Sequence[int]], surgery: ParameterSurgery | None = None
    ) -> ParameterSurgery:
        """Prune units of a known layout's slots (``{slot name: unit indices}``), all or nothing."""
        assert self.family is not None
        slots = self.family.slots(self.model)
        plain: dict[str, list[int]] = {}
        for name, idxs in removals.items():
            if name not in slots:
                raise PruningError(
                    f"Cannot prune {name!r}: it is not a slot of the {self.family.name} model (slots look like "
                    f"{sorted(slots)[:3]})."
                )
            units = sorted({int(i) for i in idxs})
            bad = [i for i in units if not 0 <= i < slots[name].size]
            if bad:
                raise PruningError(f"Cannot prune {name!r}: units {bad[:5]} outside [0, {slots[name].size}).")
            if len(units) >= slots[name].size:
                raise PruningError(f"Cannot prune {name!r}: the plan removes all {slots[name].size} units.")
            if units:
                plain[name] = units
        snapshot = Snapshot(self.model, history=self.history)
        self._groups = None
        try:
            with record_parameter_surgery(surgery) as surgery:
                self.family.prune(self.model, plain)
                for name, units in plain.items():
                    step: dict[str, Any] = {"op": "channels", "module": name, "idxs": units}
                    # slots cut at once (the query heads of every key/value group) replay at once: one
                    # layer's slots are read from its current widths, which a partial replay leaves unequal
                    if len(plain) > 1:
                        step["batch"] = len(plain)
                    self.history.append(step)
        except Exception as err:
            snapshot.restore()
            self.rebuild()
            raise PruningError(
                f"Applying the pruning plan failed ({type(err).__name__}: {err}); the model was restored "
                "to its state before this pruning step."
            ) from err
        self._module2name = {m: n for n, m in self.model.named_modules()}
        return surgery

    def _prune_root(self, name: str, idxs: list[int], skip: Sequence[str] = ()) -> None:
        module = self._root(name)
        pruner = self._dg.get_pruner_of_module(module)
        with _unmappable_reshapes(self._unmappable):  # torch-pruning maps the indices again
            group = self._dg.get_pruning_group(module, pruner.prune_out_channels, idxs)
        _without_params(group, skip).prune(record_history=False)

    def replace_with_identity(self, names: Sequence[str]) -> None:
        """Replace whole modules (blocks, layers) by ``SkippedBlock`` and rebuild the graph, all or nothing."""
        snapshot = Snapshot(self.model, history=self.history)
        try:
            if self.family is not None:  # a known layout: out of the layer list, config and indices updated
                order = self.family.layers(self.model)
                # Removed from the last to the first, and recorded so: a replay step by step names the same layers.
                names = sorted(names, key=lambda n: order.index(n) if n in order else -1, reverse=True)
                was = {name: self._original_layer_name(name) for name in names}
                self.family.remove_layers(self.model, names)
                self.history.extend({"op": "remove_layer", "module": n, "was": was[n]} for n in names)
                self.rebuild()
                return
            for name in names:
                _set_submodule(self.model, name, SkippedBlock())
                self.history.append({"op": "identity", "module": name})
            self.rebuild()
        except Exception as err:
            snapshot.restore()
            self.rebuild()
            raise PruningError(
                f"Removing blocks {list(names)} failed ({type(err).__name__}: {err}); the model was restored."
            ) from err

    def removed_modules(self) -> list[str]:
        """Modules removed whole so far (replaced by a ``SkippedBlock``, or layers taken out of a layer list)."""
        return removed_modules(self.history)

    def _original_layer_name(self, name: str) -> str:
        """The name a layer had before earlier removals from the same layer list shifted the indices."""
        path, _, index = name.rpartition(".")
        if not index.isdigit():
            return name
        gone = sorted(
            int(str(h.get("was", h["module"])).rpartition(".")[2])
            for h in self.history
            if h.get("op") == "remove_layer" and str(h.get("was", h["module"])).rpartition(".")[0] == path
        )
        original, left = 0, int(index)
        while True:  # the `index`-th original index that is still there
            if original not in gone:
                if left == 0:
                    return f"{path}.{original}"
                left -= 1
            original += 1

    def replay(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Re-apply a recorded pruning history to an unpruned model of the same architecture."""
        i = 0
        while i < len(history):
            step = history[i]
            op = step.get("op")
            # a known layout's slots pruned at once: the next `batch` steps, applied in one call again
            together = list(history[i : i + int(step.get("batch", 1))]) if op == "channels" else [step]
            i += max(len(together), 1)
            if op in ("channels", "heads"):
                self.prune({str(s["module"]): [int(u) for u in s["idxs"]] for s in together})
            elif op in ("identity", "remove_layer"):
                self.replace_with_identity([str(step["module"])])
            else:
                raise PruningError(f"Unknown step in pruning history: {dict(step)!r}.")


#: History operations that remove a whole module.
REMOVAL_OPS = ("identity", "remove_layer")


def removed_modules(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the modules a history removed whole, in order (a layer taken out of a list: its original name)."""
    return [str(h.get("was", h["module"])) for h in history if h.get("op") in REMOVAL_OPS]


def _forward_fn(model: nn.Module, example_inputs: Any) -> Any:
    # torch-pruning walks the output's tensors; model outputs can also hold caches and other objects
    # (Hugging Face `past_key_values`), which it cannot walk: hand it the tensors only.
    return tensors_in(call_model(model, example_inputs))


#: What torch-pruning's index mappings raise when they cannot follow a reshape or concatenation.
_MAPPING_ERRORS = (ZeroDivisionError, ValueError, IndexError)


@contextmanager
def _unmappable_reshapes(into: set[Any]) -> Iterator[None]:
    """While tracing, a reshape whose channel mapping torch-pruning fails to infer is recorded, not fatal.

    torch-pruning infers how a ``view`` maps channels from the widths around it; around a channel shuffle
    (``view`` into ``[groups, channels / groups]``, ``transpose``, ``view`` back: ShuffleNet) the inference
    divides by zero and the whole trace fails. Such a reshape is recorded in ``into`` and every group
    whose channels pass through it is left alone.
    """
    original = tp_index_mapping.update_reshape_index_mapping
    decided: set[Any] = set()  # nothing is pruned while the context is open: a node's mapping stays right

    def guarded(graph: Any, node: Any) -> None:
        if node in decided:
            return
        decided.add(node)
        saved = _saved_mappings(node)
        try:
            original(graph, node)
        except _MAPPING_ERRORS:
            _restore_mappings(saved)
            into.add(node)
            return
        unchanged = _saved_mappings(node) == saved
        if unchanged and _changes_channels(graph, node):
            into.add(node)  # torch-pruning gave up on it (not a 2-D/4-D view) and maps channels 1:1
        elif not unchanged and len(getattr(node.grad_fn, "_saved_self_sym_sizes", ())) > 4:
            _restore_mappings(saved)  # a flattening mapping for a view of a 5-D tensor: it supports 2-D/4-D
            into.add(node)

    # torch-pruning maps indices again in every `get_pruning_group`: the graph opens this around each call.
    tp_index_mapping.update_reshape_index_mapping = guarded
    try:
        yield
    finally:
        tp_index_mapping.update_reshape_index_mapping = original


def _saved_mappings(node: Any) -> list[tuple[Any, list[Any]]]:
    """The index mappings on a node's edges (each edge with a copy of its list), to compare and restore."""
    deps = list(node.dependencies) + [d for n in node.inputs + node.outputs for d in n.dependencies]
    return [(d, list(d.index_mapping)) for d in deps]


def _restore_mappings(saved: list[tuple[Any, list[Any]]]) -> None:
    for dep, mappings in saved:
        dep.index_mapping[:] = mappings


def _changes_channels(graph: Any, node: Any) -> bool:
    """Whether the widths torch-pruning infers on both sides of a reshape differ (both known and positive)."""
    from torch_pruning.dependency import shape_infer

    def first(nodes: list[Any], infer: Any) -> int | None:
        for n in nodes:
            try:
                c = infer(graph, n, [0])
            except Exception:  # inference is best effort in torch-pruning too
                c = None
            if c is not None:
                return int(c)
        return None

    out_c = first(node.outputs, shape_infer.infer_in_channels_recursively)
    in_c = first(node.inputs, shape_infer.infer_out_channels_recursively)
    return in_c is not None and out_c is not None and in_c > 0 and out_c > 0 and in_c != out_c


def _without_params(group: Any, names: Sequence[str]) -> Any:
    """``group`` without the steps that slice the named unwrapped parameters (head tables, sliced apart).

    Matched by the names torch-pruning recorded when tracing: a table replaced since then is still the
    same node of its graph.
    """
    if not names:
        return group
    skip = set(names)
    to_name = group._DG._param_to_name
    out = tp.dependency.Group()
    out._DG = group._DG
    # the items themselves: torch-pruning keeps each one's `root_idxs` on it
    out._group = [
        item
        for item in group.items
        if not (
            item.dep.target.type == tp_ops.OPTYPE.PARAMETER and to_name.get(item.dep.target.module) in skip
        )
    ]
    return out


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) structure: tensors, mappings, sequences; other objects are skipped."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    return []


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child not in parent._modules:
        raise PruningError(f"Module {name!r} does not exist in the model.")
    parent._modules[child] = new
