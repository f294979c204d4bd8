"""The lifecycle every pruning callback shares: when to prune, re-binding what Lightning holds, logging, state.

Data flows one way: a Trainer hook -> this class decides *when* and *how much* (the schedule) -> the core
decides *what* (criteria, levels) and applies it -> this class re-binds optimizers and the DDP wrapper,
restores train mode, logs, and keeps the history for checkpoints.
"""

from __future__ import annotations

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

from lightning_hprune.callbacks import closed_loop, reporting
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
from lightning_hprune.core.adjust import AdjustConfig
from lightning_hprune.core.cost import COSTS
from lightning_hprune.core.engine import (
    EventResult,
    level_fractions,
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
from lightning_hprune.core.optim_state import remap_optimizer
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

    #: The end-of-fit summary (also written to ``hprune_report.json``); set by :meth:`on_train_end`.
    summary: dict[str, Any]
    #: The before/after table printed at the end of fit (rank 0).
    report_table: str

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
        # automatic adjustment (closed loop, see `closed_loop`) and sensitivity analysis
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
            "adjust": closed_loop.adjust_state(self),
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
        closed_loop.load_adjust_state(self, state_dict.get("adjust") or {})
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
        fractions = closed_loop.adjusted_fractions(self, fractions, 1.0 - start / dense)
        fraction = sum(fractions)
        steps = plan_steps(levels, dense, start, fractions, removed_per_level(self.records, len(levels)))
        closed_loop.save_rollback_point(self, trainer, pl_module, graph)
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
        closed_loop.after_event(self, trainer, k)

    # ------------------------------------------------------------------ criteria statistics & closed loop
    # Criteria that learn from training (Taylor) are fed from `on_before_optimizer_step`; with `max_drop`,
    # every event is checked after its recovery epoch(s) and rolled back (model + optimizer state, kept on
    # the CPU) when the monitored metric fell too far; see `closed_loop` and `lightning_hprune.core.adjust`.
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

    def _check_adjustment(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Judge the last event once its recovery is over (see :func:`.closed_loop.check_adjustment`)."""
        return closed_loop.check_adjustment(self, trainer, pl_module)

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

    # ------------------------------------------------------------------ logging & report (see `reporting`)
    def _log_event(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        k: int,
        fraction: float,
        metric: float | None,
        result: EventResult,
    ) -> None:
        reporting.log_event(self, trainer, pl_module, k, fraction, metric, result)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reporting.finish(self, trainer, pl_module)

    def history_steps(self) -> list[dict[str, Any]]:
        """The structural steps applied so far (plain data)."""
        return list(self._graph.history) if self._graph is not None else list(self.history)
