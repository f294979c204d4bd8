"""The lifecycle every pruning callback shares: when to prune, re-binding what Lightning holds, logging, state.

Data flows one way: a Trainer hook -> this class decides *when* and *how much* (the schedule) -> the core
decides *what* (criteria, levels) and applies it -> this class re-binds optimizers and the DDP wrapper,
restores train mode, logs, and keeps the history for checkpoints.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_hprune.callbacks.inputs import example_from_batch, first_sample, model_input_from_batch
from lightning_hprune.callbacks.transaction import (
    EventTransaction,
    describe_failure,
    eager,
    failing_module,
    forward_failures,
    recompile,
    weight_averaging_types,
)
from lightning_hprune.checkpoint import STATE_MARKER, restore_structure
from lightning_hprune.core.adjust import DECISION_CODES, AdjustConfig, decide, next_fraction
from lightning_hprune.core.cost import COSTS
from lightning_hprune.core.engine import (
    EventResult,
    level_fractions,
    level_names,
    plan_steps,
    removed_per_level,
    run_event,
)
from lightning_hprune.core.graph import (
    PruningError,
    PruningGraph,
    match_modules,
    preserved_modes,
)
from lightning_hprune.core.importance import Importance, resolve_importance
from lightning_hprune.core.levels import LayerLevel, Level
from lightning_hprune.core.measure import count_macs, count_params, measure_latency
from lightning_hprune.core.optim_state import ParameterSurgery, remap_optimizer
from lightning_hprune.core.rollback import RollbackPoint
from lightning_hprune.core.schedules import resolve_schedule
from lightning_hprune.core.sensitivity import (
    SensitivityAnalysis,
    batch_metric,
    cached_sensitivity,
    measure_sensitivity,
)
from lightning_hprune.core.validation import (
    check_choice,
    check_fraction,
    check_int,
    check_positive,
    check_str_list,
)

_REFUSED_STRATEGIES = {
    "FSDPStrategy": "sharded parameters cannot be sliced per channel",
    "DeepSpeedStrategy": "DeepSpeed partitions parameters and owns the optimizer",
    "ModelParallelStrategy": "parameters are DTensors sharded across devices",
    "XLAStrategy": "XLA compiles a static graph",
}


class PruningCallback(Callback):
    """Shared lifecycle of the pruning callbacks (see :class:`~lightning_hprune.HierarchicalPruning`).

    Subclasses provide :meth:`levels_for_event`, the ``(level, share)`` steps of one event.
    """

    def __init__(
        self,
        target: float = 0.5,
        cost: str = "macs",
        schedule: str | Callable[[int], float] = "geometric",
        decay: float = 0.9,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        every_n_epochs: int = 1,
        importance: Importance | str | None = None,
        round_to: int = 8,
        ignored_layers: Sequence[str] | None = None,
        monitor: str | None = None,
        measure_latency: bool = True,
        latency_batch_size: int = 32,
        tolerance: float = 0.002,
        calibration_batches: int = 4,
        verbose: bool = True,
        max_drop: float | None = None,
        max_retries: int = 2,
        back_off: float = 0.5,
        speed_up: float = 1.0,
        mode: str = "max",
        sensitivity: SensitivityAnalysis | None = None,
    ) -> None:
        super().__init__()
        self.target = check_fraction("target", target)
        self.cost = check_choice("cost", cost, COSTS)
        self.decay = check_positive("decay", decay)
        self._schedule_fn = resolve_schedule(schedule, self.decay)
        self.schedule = schedule
        self.start_epoch = check_int("start_epoch", start_epoch, minimum=0)
        self.end_epoch = check_int("end_epoch", end_epoch, minimum=0, allow_none=True)
        if self.end_epoch is not None and self.end_epoch < start_epoch:
            raise ValueError(
                f"Expected argument `end_epoch` to be >= `start_epoch` ({start_epoch}), but got {end_epoch}."
            )
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, minimum=1)
        self.importance = resolve_importance(importance)
        self.round_to = check_int("round_to", round_to, minimum=1)
        self.ignored_layers = check_str_list("ignored_layers", ignored_layers)
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"Expected argument `monitor` to be a metric name or None, but got {monitor!r}.")
        self.monitor = monitor
        self.measure_latency = bool(measure_latency)
        self.latency_batch_size = check_int("latency_batch_size", latency_batch_size, minimum=1)
        self.tolerance = check_fraction("tolerance", tolerance)
        self.calibration_batches = check_int("calibration_batches", calibration_batches, minimum=0)
        self.verbose = verbose
        # automatic adjustment (closed loop) and sensitivity analysis; see the "closed loop" block below
        self.mode = check_choice("mode", mode, ("max", "min"))
        self.max_drop = max_drop
        if max_drop is not None and monitor is None:
            raise ValueError(
                "Expected argument `monitor` to name a logged metric when `max_drop` is set, but got monitor=None."
            )
        adjust = AdjustConfig(  # validates every argument, even when the loop is off
            max_drop=0.5 if max_drop is None else max_drop,
            max_retries=max_retries,
            back_off=back_off,
            speed_up=speed_up,
            mode=mode,
        )
        self._adjust: AdjustConfig | None = None if max_drop is None else adjust
        self.max_retries, self.back_off, self.speed_up = max_retries, back_off, speed_up
        if sensitivity is not None and not isinstance(sensitivity, SensitivityAnalysis):
            raise ValueError(
                f"Expected argument `sensitivity` to be a `SensitivityAnalysis` or None, but got {sensitivity!r}."
            )
        self.sensitivity = sensitivity
        self.rate = 1.0
        self.retries = 0
        self.stopped = False
        self.decisions: list[dict[str, Any]] = []
        self.sensitivity_drops: dict[str, float] | None = None
        self._pending_check: dict[str, int] | None = None
        self._rollback: RollbackPoint | None = None

        # checkpointed state
        self.event_index = 0
        self.history: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.baseline: dict[str, float] = {}
        self.original_size: dict[str, int] = {}
        self.example_input: Any = None

        # runtime
        self._graph: PruningGraph | None = None
        self._end_epoch: int | None = self.end_epoch
        self._patched_module: pl.LightningModule | None = None
        #: The model inputs of the last ``calibration_batches`` training batches of an event epoch (CPU);
        #: levels and criteria that need data (block scores, activations) use them, so no extra passes
        #: over the data loader are made.
        self.calibration: list[Any] = []

    # ------------------------------------------------------------------ identity & state
    def __getstate__(self) -> dict[str, Any]:
        # Picklable (``ddp_spawn`` pickles the Trainer): drop the resolved schedule (it may be a local
        # function) and the dependency graph (a cache; its history is kept as plain data).
        state = self.__dict__.copy()
        state.pop("_schedule_fn", None)
        graph = state.pop("_graph", None)
        if graph is not None:
            state["history"] = [dict(h) for h in graph.history]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._schedule_fn = resolve_schedule(self.schedule, self.decay)
        self._graph = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(target=self.target, cost=self.cost)

    @override
    def state_dict(self) -> dict[str, Any]:
        history = self._graph.history if self._graph is not None else self.history
        return {
            "marker": STATE_MARKER,
            "version": 1,
            "event_index": self.event_index,
            "history": [dict(h) for h in history],
            "records": [dict(r) for r in self.records],
            "baseline": dict(self.baseline),
            "original_size": dict(self.original_size),
            "example_input": self.example_input,
            # Non-empty only in a checkpoint written during an event epoch before its event (validation-end
            # or step-based checkpoints): a resumed run then prunes with the same data as an unbroken one.
            "calibration": list(self.calibration),
            # Statistics a criterion gathered since the last event (e.g. Taylor's |w * g| sums).
            "importance": self.importance.state_dict(),
            "adjust": self._adjust_state(),
            "sensitivity": None if self.sensitivity_drops is None else dict(self.sensitivity_drops),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.event_index = int(state_dict.get("event_index", 0))
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.records = [dict(r) for r in state_dict.get("records", [])]
        self.baseline = dict(state_dict.get("baseline", {}))
        self.original_size = dict(state_dict.get("original_size", {}))
        if state_dict.get("example_input") is not None:
            self.example_input = state_dict["example_input"]
        self.calibration = list(state_dict.get("calibration", []))
        if state_dict.get("importance"):
            self.importance.load_state_dict(state_dict["importance"])
        self._load_adjust_state(state_dict.get("adjust") or {})
        drops = state_dict.get("sensitivity")
        self.sensitivity_drops = None if drops is None else {str(k): float(v) for k, v in drops.items()}

    # ------------------------------------------------------------------ subclasses
    def levels_for_event(self) -> list[Level]:
        """The levels that act in each event, coarse to fine (their ``share`` splits the target)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(trainer.strategy).__name__
        for refused, why in _REFUSED_STRATEGIES.items():
            if refused in {c.__name__ for c in type(trainer.strategy).__mro__}:
                raise RuntimeError(
                    f"{type(self).__name__} does not support the {name} strategy ({why}). Use "
                    "strategy='ddp' (or a single device) while pruning, then train the pruned model with "
                    f"{name}."
                )
        peers = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, PruningCallback)]
        if len(peers) > 1:
            # Two pruning callbacks would each trace, prune and re-bind the optimizers on their own, with
            # targets measured against different baselines and histories that cannot be replayed in order.
            levels = ", ".join(repr(lv) for c in peers for lv in c.levels_for_event())
            raise ValueError(
                "Expected at most one pruning callback per Trainer, but got "
                f"{[type(c).__name__ for c in peers]}. Compose their levels, coarse to fine, in one callback "
                f"instead: HierarchicalPruning(levels=[{levels}])."
            )
        for level in self.levels_for_event():
            level.check_model(pl_module)
        self._refuse_unsupported(trainer, pl_module)
        unmatched = [p for p, names in match_modules(pl_module, self.ignored_layers).items() if not names]
        if unmatched:
            raise ValueError(
                f"Expected every pattern of `ignored_layers` to match a module name of "
                f"{type(pl_module).__name__}, but {unmatched} matched none. Module names look like "
                f"{[n for n, _ in pl_module.named_modules() if n][:6]}."
            )
        self._end_epoch = self._resolve_end_epoch(trainer)
        # Lightning loads a checkpoint's weights before callbacks' `on_load_checkpoint`: rebuild the
        # pruned structure from the module's own `on_load_checkpoint`, which runs first.
        self._patch_module_restore(pl_module)

    def _resolve_end_epoch(self, trainer: pl.Trainer) -> int:
        max_epochs = trainer.max_epochs
        if self.end_epoch is None:
            if max_epochs is None or max_epochs < 0:
                raise ValueError(
                    "Expected `end_epoch` to be set when the Trainer has no `max_epochs`, but got "
                    f"end_epoch=None and max_epochs={max_epochs}."
                )
            # Prune over the first half of training, recover over the second half.
            return max(self.start_epoch, (max_epochs - 1) // 2)
        if max_epochs is not None and max_epochs >= 0 and self.end_epoch >= max_epochs:
            raise ValueError(
                f"Expected `end_epoch` to be < the Trainer's max_epochs ({max_epochs}) so that the schedule "
                f"completes, but got end_epoch={self.end_epoch}."
            )
        return self.end_epoch

    def _refuse_unsupported(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse, before any training, the setups that a pruned model cannot survive (docs/support.md)."""
        cls = type(self).__name__
        launcher = getattr(trainer.strategy, "launcher", None)
        if isinstance(launcher, _MultiProcessingLauncher):
            method = getattr(launcher, "_start_method", "spawn")
            raise RuntimeError(
                f"{cls} does not support {type(trainer.strategy).__name__} with processes started by "
                f"multiprocessing (start method {method!r}: strategy='ddp_spawn', 'ddp_fork' or 'ddp_notebook'): "
                "at the end of fit, Lightning copies the workers' final weights into the main process's model, "
                "which is still unpruned and cannot hold them. Use strategy='ddp' (one script per process) or a "
                "single device; load the pruned result with `lightning_hprune.load_pruned(...)`."
            )
        averaging_types = weight_averaging_types()
        callbacks: list[Callback] = list(getattr(trainer, "callbacks", []))
        averaging = [type(c).__name__ for c in callbacks if isinstance(c, averaging_types)]
        if averaging:
            raise RuntimeError(
                f"{cls} cannot run together with {averaging}: they keep an averaged copy of every parameter, "
                "which pruning would leave with the old shapes. Prune first, then fine-tune the pruned model "
                f"(`lightning_hprune.load_pruned(...)`) with {averaging} in a second fit."
            )
        lookalikes = [
            type(c).__name__
            for c in callbacks
            if re.search(r"EMA|SWA|Averag|Polyak", type(c).__name__)
            and not isinstance(c, (PruningCallback, *averaging_types))
        ]
        if lookalikes:
            rank_zero_warn(
                f"{lookalikes} look like they keep copies of the model's parameters (EMA/SWA). {cls} replaces "
                "every pruned parameter with a new, smaller one, which such copies do not follow: make sure they "
                "support a changing model, or use them in a second fit on the pruned model."
            )

    def _patch_module_restore(self, pl_module: pl.LightningModule) -> None:
        if "on_load_checkpoint" in pl_module.__dict__:
            return
        original = pl_module.on_load_checkpoint
        callback = self

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            state = (checkpoint.get("callbacks") or {}).get(callback.state_key)
            if state and state.get("history") and not callback.history and callback._graph is None:
                with eager():
                    graph = restore_structure(
                        pl_module, {"callbacks": {callback.state_key: state}}, callback._ignored(pl_module)
                    )
                callback._graph = graph
            original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
        self._patched_module = pl_module

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._patched_module is not None:
            self._patched_module.__dict__.pop("on_load_checkpoint", None)
            self._patched_module = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Trace as soon as the example input is known (the model is on its device by now): a model that
        # torch-pruning cannot trace, or one with nothing prunable, fails before the first epoch.
        if self.example_input is None and pl_module.example_input_array is not None:
            self.example_input = first_sample(pl_module.example_input_array)
        if self.example_input is None or self.event_index >= self.num_events:
            return
        with forward_failures(pl_module) as failures:
            try:
                self._ensure_graph(pl_module)
            except PruningError as err:
                where = describe_failure(pl_module, failing_module(err, failures), tracing=True)
                raise PruningError(f"{err}{where}") from err

    # ------------------------------------------------------------------ schedule
    @property
    def num_events(self) -> int:
        """Number of pruning events of the schedule."""
        end = self._end_epoch if self._end_epoch is not None else self.start_epoch
        return (end - self.start_epoch) // self.every_n_epochs + 1

    def is_event_epoch(self, epoch: int) -> bool:
        """Whether a pruning event happens at the end of train epoch ``epoch``."""
        end = self._end_epoch if self._end_epoch is not None else self.start_epoch
        return self.start_epoch <= epoch <= end and (epoch - self.start_epoch) % self.every_n_epochs == 0

    def target_fraction(self, k: int) -> float:
        """Cumulative fraction of the cost scheduled to be removed after event ``k`` (all levels)."""
        levels = self.levels_for_event()
        return sum(level_fractions(levels, self.target, k, self.num_events, self._schedule_fn, self.decay))

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.example_input is None:
            if pl_module.example_input_array is not None:
                self.example_input = first_sample(pl_module.example_input_array)
            else:
                self.example_input = example_from_batch(batch)
                if self.example_input is None:
                    raise ValueError(
                        f"{type(self).__name__} needs an example input to trace the model. Expected "
                        "`pl_module.example_input_array` to be set, or the first training batch to be a "
                        "tensor, a tuple/list whose first element is the input tensor, or a dict with an "
                        f"'x'/'input'/'inputs'/'input_ids'/'image' tensor; but got a batch of type "
                        f"{type(batch).__name__} and example_input_array=None."
                    )
        if self.calibration_batches and self.is_event_epoch(trainer.current_epoch):
            x = model_input_from_batch(batch)
            if x is not None:
                self.calibration.append(x.detach().cpu())
                del self.calibration[: -self.calibration_batches]

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self._check_adjustment(trainer, pl_module):
            self._prune_event(trainer, pl_module)  # a retry after a rollback, past the scheduled events
            return
        if self.stopped or not self.is_event_epoch(epoch) or self.event_index >= self.num_events:
            return
        if self.example_input is None:
            if pl_module.example_input_array is None:
                raise ValueError(
                    f"{type(self).__name__} saw no training batch and `example_input_array` is not set."
                )
            self.example_input = first_sample(pl_module.example_input_array)
        self._prune_event(trainer, pl_module)

    def _ignored(self, pl_module: nn.Module) -> list[nn.Module]:
        names = {n for ns in match_modules(pl_module, self.ignored_layers).values() for n in ns}
        return [m for n, m in pl_module.named_modules() if n in names]

    def _ensure_graph(self, pl_module: pl.LightningModule) -> PruningGraph:
        if self._graph is None or self._graph.model is not pl_module:
            with eager():
                graph = PruningGraph(pl_module, self.example_input, ignored_layers=self._ignored(pl_module))
                if self.history and not graph.history:
                    current = {g.name: g.size for g in graph.groups()}
                    if all(current.get(n, s) == s for n, s in self.original_size.items()):
                        # Resumed without the module hook (state loaded by hand): rebuild the structure.
                        graph.replay(self.history)
                    else:  # the model already has it (e.g. a deep copy of a pruned model and callback)
                        graph.history = [dict(h) for h in self.history]
            if not graph.history and not graph.groups():
                raise ValueError(
                    f"Expected {type(pl_module).__name__} to have at least one prunable channel group, but "
                    + (
                        f"`ignored_layers`={list(self.ignored_layers)} excludes every one"
                        if self.ignored_layers
                        else "every layer's output width is fixed (it feeds the model's output)"
                    )
                    + f", so the target {self.target:.0%} of {self.cost} cannot be reached. Leave at least one "
                    "layer that does not produce the model's output out of `ignored_layers`."
                )
            if graph.protected_groups:
                rank_zero_warn(
                    f"{type(self).__name__}: the attention layers {sorted(set(graph.protected_groups.values()))} "
                    "are not a recognised layout (timm `qkv` or Hugging Face `query`/`key`/`value`), so the "
                    f"groups {sorted(graph.protected_groups)} that would cut through their heads are not "
                    "pruned. Their other widths (MLP, residual stream) still are."
                )
            self._graph = graph
        return self._graph

    def _measure(self, model: nn.Module) -> dict[str, float]:
        macs = count_macs(model, self.example_input).total
        out: dict[str, float] = {"params": float(count_params(model)), "macs": float(macs)}
        if self.measure_latency:
            out["latency_ms"] = measure_latency(model, self.example_input, self.latency_batch_size)
        return out

    def _monitored(self, trainer: pl.Trainer) -> float | None:
        if self.monitor is None:
            return None
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise RuntimeError(
                f"{type(self).__name__}(monitor={self.monitor!r}) expected the metric {self.monitor!r} to be "
                f"logged before the pruning event at epoch {trainer.current_epoch}, but the logged metrics "
                f"are {sorted(trainer.callback_metrics)}. Log it with `self.log({self.monitor!r}, ...)` in "
                "a validation or training step, or fix the name."
            )
        return float(value)

    def _guarded_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run :meth:`_prune_event` as a transaction: a failure, even an interrupt, leaves nothing changed."""
        transaction = EventTransaction(self, trainer, pl_module)
        self._in_event = True
        try:
            with forward_failures(pl_module) as failures, eager():
                self._prune_event(trainer, pl_module)
        except BaseException as err:
            transaction.restore()
            if not isinstance(err, Exception):
                raise  # KeyboardInterrupt, SystemExit: undone, then passed on
            where = describe_failure(pl_module, failing_module(err, failures))
            raise PruningError(
                f"{type(self).__name__}: the pruning event at epoch {trainer.current_epoch} failed "
                f"({type(err).__name__}: {err}).{where} The model, its optimizers (parameters and state), the "
                "LR schedulers and this callback are exactly as they were before the event: fix the cause, "
                "then go on or resume from the last checkpoint with `trainer.fit(..., ckpt_path=...)`."
            ) from err
        finally:
            self._in_event = False
        recompile(pl_module)

    def _prune_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not getattr(self, "_in_event", False):  # every event runs as a transaction
            self._guarded_event(trainer, pl_module)
            return
        k = self.event_index
        graph = self._ensure_graph(pl_module)
        metric = self._monitored(trainer)
        if k == 0 or not self.baseline:
            self.baseline = {f"dense_{key}": v for key, v in self._measure(pl_module).items()}
            if metric is not None:
                self.baseline["metric"] = metric
            self.original_size = {g.name: g.size for g in graph.groups()}
        dense = self.baseline[f"dense_{self.cost}"]
        # Composition: each level owes its share of the target on its own schedule, cumulatively, so a
        # coarse level (whole blocks) that cannot act at one event catches up later (see `plan_steps`).
        levels = self.levels_for_event()
        self._apply_sensitivity(trainer, graph, levels)
        # A retry after a rollback may come after the last scheduled event: it aims at the final target.
        k_sched = min(k, self.num_events - 1)
        fractions = level_fractions(
            levels, self.target, k_sched, self.num_events, self._schedule_fn, self.decay
        )
        start = float(self.records[-1][self.cost]) if self.records else dense
        fractions = self._adjusted_fractions(fractions, 1.0 - start / dense)
        fraction = sum(fractions)
        steps = plan_steps(levels, dense, start, fractions, removed_per_level(self.records, len(levels)))
        self._save_rollback_point(trainer, pl_module, graph)
        self.importance.prepare(pl_module, list(self.calibration), self._importance_reduce(trainer))
        try:
            with preserved_modes(pl_module):
                result = run_event(
                    graph,
                    steps,
                    self.importance,
                    self.cost,
                    self.original_size,
                    self.round_to,
                    self.tolerance * dense,
                    agree=lambda removals: trainer.strategy.broadcast(removals, src=0),
                    calibration=list(self.calibration),
                    strict=k_sched == self.num_events - 1,  # the final target is a minimum
                )
        finally:
            self.importance.reset()  # also clears the statistics carried in `.grad` during the event
        self._rebind(trainer, pl_module, result)
        self.calibration.clear()
        self.event_index += 1
        self._log_event(trainer, pl_module, k, fraction, metric, result)
        self._after_event(trainer, k)

    # ------------------------------------------------------------------ criteria statistics & closed loop
    # Criteria that learn from training (Taylor) are fed from `on_before_optimizer_step`; with `max_drop`,
    # every event is checked after its recovery epoch(s) and rolled back (model + optimizer state, kept on
    # the CPU) when the monitored metric fell too far; see `lightning_hprune.core.adjust`.
    def _pruning_active(self) -> bool:
        return not self.stopped and (self.event_index < self.num_events or self._pending_check is not None)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning calls this once per optimizer step, after AMP unscaling and gradient accumulation.
        if self.importance.needs_training_statistics and self._pruning_active():
            self.importance.on_before_optimizer_step(pl_module, optimizer)

    @staticmethod
    def _importance_reduce(trainer: pl.Trainer) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if trainer.world_size <= 1:
            return None
        strategy = trainer.strategy
        return lambda t: strategy.reduce(t, reduce_op="sum")

    def _adjusted_fractions(self, fractions: list[float], achieved: float) -> list[float]:
        """Scale the levels' cumulative fractions: the event goes ``rate`` times the way to the schedule."""
        planned = sum(fractions)
        if self._adjust is None or planned <= 0:
            return fractions
        aim = next_fraction(achieved, planned, self.rate, self.target)
        return [f * aim / planned for f in fractions]

    def _save_rollback_point(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, graph: PruningGraph
    ) -> None:
        if self._adjust is None:
            return
        self._rollback = None  # free the previous copy first
        self._rollback = RollbackPoint(
            pl_module,
            trainer.optimizers,
            graph.history,
            extra={
                "records": len(self.records),
                "importance": self.importance.state_dict(),
                "calibration": list(self.calibration),
            },
        )

    def _after_event(self, trainer: pl.Trainer, k: int) -> None:
        record = self.records[-1] if self.records else {}
        removed = float(record.get("removed", math.nan))
        reason = f"event {k}: {removed:.1%} of {self.cost} removed so far (rate {self.rate:.3g})"
        if self._adjust is None:
            self._record_decision(trainer, "pruned", reason, event=k)
            return
        epoch = trainer.current_epoch
        check = epoch + self.every_n_epochs
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            check = min(check, trainer.max_epochs - 1)
        if check <= epoch:
            self._pending_check, self._rollback = None, None
            reason += "; no epoch left to check it against max_drop"
        else:
            self._pending_check = {"event": k, "epoch": epoch, "check_epoch": check}
            reason += f"; {self.monitor} is checked at the end of epoch {check}"
        self._record_decision(trainer, "pruned", reason, event=k)

    def _check_adjustment(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Judge the last event once its recovery is over; roll back when needed.

        Returns:
            True when a retry must run now (the rollback happened after the last scheduled event).

        """
        pending = self._pending_check
        epoch = trainer.current_epoch
        if self._adjust is None or pending is None or epoch < pending["check_epoch"]:
            return False
        self._pending_check = None
        value = self._monitored(trainer)
        assert value is not None
        baseline = self.baseline.get("metric", value)
        # Every process acts on rank 0's decision (the metric may not be synchronised across processes).
        decision = trainer.strategy.broadcast(
            decide(baseline, value, self._adjust, self.rate, self.retries), src=0
        )
        fields = {"event": pending["event"], "value": value, "drop": decision.drop, "bound": decision.bound}
        if decision.roll_back:
            if self._rollback is None:
                self.stopped = True
                self._record_decision(
                    trainer,
                    "stop",
                    f"{self.monitor}={value:.4g} dropped {decision.drop:.2%} (> max_drop "
                    f"{self._adjust.max_drop:.2%}), but the state before event {pending['event']} is not available (resumed from a "
                    "checkpoint, and the CPU copy is not checkpointed): stopped pruning",
                    **fields,
                )
                return False
            undone = self._roll_back(trainer, pl_module)
            fields["undone_removed"] = float(undone.get("removed", math.nan)) if undone else math.nan
        self._rollback = None
        self.rate, self.retries = decision.rate, decision.retries
        if decision.action == "stop":
            self.stopped = True
        self._record_decision(trainer, decision.action, decision.reason, **fields)
        if self.event_index < self.num_events:
            return False  # the schedule goes on: its next event (maybe this epoch's) is the retry
        room = trainer.max_epochs is None or trainer.max_epochs < 0 or epoch + 1 < trainer.max_epochs
        if decision.action != "roll_back":
            # Past the schedule, short of the target because of rollbacks: catch up while epochs remain.
            last = self.records[-1] if self.records else {}
            short = float(last.get("removed", 1.0)) < self.target - self.tolerance
            return room and short and float(last.get("event_ratio", 0.0)) > 0
        if room:
            return True
        self.stopped = True
        self._record_decision(trainer, "stop", "rolled back at the last epoch: no epoch left to retry")
        return False

    def _roll_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Restore the model, the optimizers, the history, the records and the criterion's statistics."""
        point = self._rollback
        assert point is not None
        assert self._graph is not None
        point.restore(self._graph.history)
        self._graph.rebuild()
        n_records = int(point.extra["records"])
        undone = self.records[n_records] if len(self.records) > n_records else {}
        del self.records[n_records:]
        self.importance.reset()
        self.importance.load_state_dict(point.extra["importance"])
        if not self.calibration:
            self.calibration = list(point.extra["calibration"])
        # The optimizers already point at the restored parameters; this re-wraps DDP around them.
        self._rebind(trainer, pl_module, EventResult(levels=[], surgery=ParameterSurgery(), seconds=0.0))
        return undone

    def _record_decision(self, trainer: pl.Trainer, action: str, reason: str, **fields: Any) -> None:
        entry: dict[str, Any] = {
            "action": action,
            "code": DECISION_CODES[action],
            "reason": reason,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "rate": self.rate,
            **fields,
        }
        self.decisions.append(entry)
        metrics = {"hprune/decision": float(entry["code"]), "hprune/rate": float(self.rate)}
        if "drop" in fields and math.isfinite(fields["drop"]):
            metrics["hprune/drop"] = float(fields["drop"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        # The event line already says what was pruned: a routine decision is printed only in closed loop.
        if action in ("roll_back", "stop", "speed_up") or (self.verbose and self.max_drop is not None):
            rank_zero_info(f"[hprune] decision at epoch {trainer.current_epoch}: {action} - {reason}")

    def _adjust_state(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "retries": self.retries,
            "stopped": self.stopped,
            "decisions": [dict(d) for d in self.decisions],
            "pending_check": None if self._pending_check is None else dict(self._pending_check),
        }

    def _load_adjust_state(self, state: dict[str, Any]) -> None:
        self.rate = float(state.get("rate", 1.0))
        self.retries = int(state.get("retries", 0))
        self.stopped = bool(state.get("stopped", False))
        self.decisions = [dict(d) for d in state.get("decisions", [])]
        pending = state.get("pending_check")
        self._pending_check = None if pending is None else {str(k): int(v) for k, v in pending.items()}
        self._rollback = None  # the CPU copy is not checkpointed

    def _apply_sensitivity(self, trainer: pl.Trainer, graph: PruningGraph, levels: Sequence[Level]) -> None:
        """Run (or reuse) the sensitivity analysis and hand it to every `LayerLevel` without ratios."""
        if self.sensitivity is None:
            return
        targets = [lv for lv in levels if isinstance(lv, LayerLevel) and not lv.ratios and not lv.sensitivity]
        if not targets:
            return
        if self.sensitivity_drops is None:
            cfg = self.sensitivity
            log_dir = trainer.log_dir or trainer.default_root_dir  # every rank asks: it broadcasts
            drops: dict[str, float] = {}
            if trainer.is_global_zero:
                batches = self._validation_batches(trainer, cfg.batches)
                evaluate = batch_metric(batches, cfg.metric)
                drops, reused = cached_sensitivity(
                    os.path.join(log_dir, "hprune_sensitivity.json"),
                    lambda: measure_sensitivity(graph, evaluate, cfg.fraction, mode=cfg.mode),
                    cfg.settings(),
                    [g.name for g in graph.groups()],
                )
                rank_zero_info(
                    f"[hprune] sensitivity ({'reused from' if reused else 'measured, saved in'} {log_dir}): "
                    + ", ".join(f"{k}={v:.4f}" for k, v in drops.items())
                )
            self.sensitivity_drops = trainer.strategy.broadcast(drops, src=0)
        for lv in targets:
            lv.sensitivity = dict(self.sensitivity_drops)

    @staticmethod
    def _validation_batches(trainer: pl.Trainer, n: int) -> list[Any]:
        loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            raise RuntimeError(
                "The sensitivity analysis measures on validation batches, but the Trainer has no validation "
                "dataloader. Give `fit` a validation dataloader, or set `sensitivity=None`."
            )
        batches = []
        for batch in loaders:
            batches.append(batch)
            if len(batches) >= n:
                break
        return batches

    # ------------------------------------------------------------------ re-binding
    def _rebind(self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: EventResult) -> None:
        live = list(pl_module.parameters())
        for opt in trainer.optimizers:
            problems = remap_optimizer(opt, result.surgery, live)
            for p in problems:
                rank_zero_warn(f"{type(self).__name__}: {p}.")
        strategy = trainer.strategy
        if isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel):
            # The old wrapper's reducer is bound to the old parameters: wrap the pruned module afresh. Every
            # rank gets here at the same point (DDP's constructor is a collective that checks the shapes).
            strategy.model = pl_module
            configure = getattr(strategy, "configure_ddp", None)
            if callable(configure):
                configure()  # also re-registers the strategy's DDP communication hooks
            else:
                strategy.model = strategy._setup_model(pl_module)

    # ------------------------------------------------------------------ logging
    def _log_event(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        k: int,
        fraction: float,
        metric: float | None,
        result: EventResult,
    ) -> None:
        after = self._measure(pl_module)
        dense = self.baseline[f"dense_{self.cost}"]
        prev_cost = self.records[-1][self.cost] if self.records else dense
        record: dict[str, Any] = {
            "event": k,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            **after,
            "target": fraction,
            "removed": 1.0 - after[self.cost] / dense,
            "event_ratio": 1.0 - after[self.cost] / prev_cost if prev_cost else 0.0,
            "event_time_s": result.seconds,
            "levels": [
                {
                    "level": name,
                    "removed": dict(r.removed),
                    "blocks": list(r.blocks),
                    "cost_before": r.cost_before,
                    "cost_after": r.cost_after,
                    "target_cost": r.target_cost,
                }
                for name, r in zip(level_names(result.levels), result.levels, strict=True)
            ],
        }
        if metric is not None:
            record[self.monitor or "metric"] = metric
            base = self.baseline.get("metric")
            record["retained"] = metric / base if base else math.nan
        self.records.append(record)
        metrics = {f"hprune/{key}": float(v) for key, v in record.items() if isinstance(v, (int, float))}
        # One namespace per level (a repeated level class gets a numeric suffix: global, global_1, ...).
        for name, r in zip(level_names(result.levels), result.levels, strict=True):
            metrics[f"hprune/{name}/channels_removed"] = float(sum(r.removed.values()))
            metrics[f"hprune/{name}/blocks_removed"] = float(len(r.blocks))
            metrics[f"hprune/{name}/{self.cost}_removed"] = float(r.cost_before - r.cost_after)
            metrics[f"hprune/{name}/{self.cost}_after"] = float(r.cost_after)
        if metric is not None and self.monitor:
            metrics[f"hprune/{self.monitor}"] = metric
            metrics[f"hprune/retained_{self.monitor}"] = record["retained"]
            metrics.pop("hprune/retained", None)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.verbose:
            rank_zero_info(
                f"[hprune] event {k + 1}/{self.num_events} at epoch {trainer.current_epoch}: removed "
                f"{record['removed']:.1%} of {self.cost} (target so far {fraction:.1%}; final target "
                f"{self.target:.1%}); params {int(after['params']):,}, MACs {int(after['macs']):,}"
                + (f", {self.monitor}={metric:.4f}" if metric is not None else "")
                + f" [{result.seconds:.2f}s]"
            )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.records:
            return
        final = self._measure(pl_module)
        dense = self.baseline[f"dense_{self.cost}"]
        summary: dict[str, Any] = {
            "target": self.target,
            "cost": self.cost,
            "achieved": 1.0 - final[self.cost] / dense,
            "events": self.event_index,
            "before": {k[len("dense_") :]: v for k, v in self.baseline.items() if k.startswith("dense_")},
            "after": final,
        }
        metrics = {
            "hprune/final_params": final["params"],
            "hprune/final_macs": final["macs"],
            "hprune/final_removed": summary["achieved"],
        }
        if self.monitor is not None and self.monitor in trainer.callback_metrics:
            value = float(trainer.callback_metrics[self.monitor])
            summary["before"][self.monitor] = self.baseline.get("metric")
            summary["after"][self.monitor] = value
            metrics[f"hprune/final_{self.monitor}"] = value
            if self.baseline.get("metric"):
                metrics[f"hprune/final_retained_{self.monitor}"] = value / self.baseline["metric"]
        if abs(summary["achieved"] - self.target) > 0.02:
            rank_zero_warn(
                f"{type(self).__name__} removed {summary['achieved']:.1%} of {self.cost}, more than 2 points "
                f"from the target {self.target:.1%}: with round_to={self.round_to} the model's layers are too "
                "narrow (or too capped) for a finer step. Use a smaller `round_to` or a larger `max_layer_ratio`."
            )
        summary["structure"] = self._structure(pl_module)
        summary["events_log"] = self.records
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        # `trainer.log_dir` broadcasts under DDP: every rank asks, or rank 0 waits forever.
        log_dir = trainer.log_dir or trainer.default_root_dir
        if trainer.is_global_zero:
            self._write_report(trainer, summary, log_dir)
        self.summary = summary

    def _structure(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        groups = self._graph.groups() if self._graph is not None else []
        now = {g.name: g.size for g in groups}
        heads = {g.name for g in groups if g.kind == "heads"}
        heads.update(str(h["module"]) for h in self.history_steps() if h.get("op") == "heads")
        removed = [str(h["module"]) for h in self.history_steps() if h.get("op") == "identity"]
        widths: dict[str, dict[str, Any]] = {}
        for n, before in self.original_size.items():
            entry: dict[str, Any] = {"before": before, "after": now.get(n)}
            if n in heads:
                entry["unit"] = "heads"
            gone = next((b for b in removed if n == b or n.startswith(f"{b}.")), None)
            if gone is not None:
                entry["removed_with"] = gone
            widths[n] = entry
        per_level: dict[str, dict[str, Any]] = {}
        for record in self.records:
            for entry in record.get("levels", []):
                agg = per_level.setdefault(
                    entry["level"],
                    {
                        "channels_removed": 0,
                        "heads_removed": 0,
                        "blocks_removed": [],
                        f"{self.cost}_removed": 0.0,
                    },
                )
                for name, count in entry.get("removed", {}).items():
                    agg["heads_removed" if name in heads else "channels_removed"] += int(count)
                agg["blocks_removed"].extend(entry.get("blocks", []))
                agg[f"{self.cost}_removed"] += float(entry["cost_before"]) - float(entry["cost_after"])
        return {"widths": widths, "removed_modules": removed, "levels": per_level}

    def history_steps(self) -> list[dict[str, Any]]:
        """The structural steps applied so far (plain data)."""
        return list(self._graph.history) if self._graph is not None else list(self.history)

    def _write_report(self, trainer: pl.Trainer, summary: dict[str, Any], log_dir: str | None = None) -> None:
        log_dir = log_dir or trainer.log_dir or trainer.default_root_dir
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, "hprune_report.json")
        with open(path, "w") as f:
            json.dump(summary, f, indent=2, default=float)
        if importlib.util.find_spec("matplotlib") is not None:
            from lightning_hprune.report import plot_report

            plot_report(summary, os.path.join(log_dir, "hprune_curves.png"))
        before, after = summary["before"], summary["after"]
        rows = [("params", "{:,.0f}"), ("macs", "{:,.0f}"), ("latency_ms", "{:.3f}")]
        if self.monitor:
            rows.append((self.monitor, "{:.4f}"))
        lines = [f"{'':<14}{'before':>16}{'after':>16}{'ratio':>10}"]
        for key, fmt in rows:
            b, a = before.get(key), after.get(key)
            if b is None or a is None:
                continue
            ratio = a / b if b else math.nan
            lines.append(f"{key:<14}{fmt.format(b):>16}{fmt.format(a):>16}{ratio:>10.3f}")
        text = "\n".join(lines)
        if self.verbose:
            rank_zero_info(
                f"[hprune] removed {summary['achieved']:.1%} of {self.cost} (target {self.target:.1%}) in "
                f"{summary['events']} events; report: {path}\n{text}"
            )
        self.report_table = text
