"""The lifecycle every pruning callback shares: when to prune, re-binding what Lightning holds, logging, state.

Data flows one way: a Trainer hook -> this class decides *when* and *how much* (the schedule) -> the core
decides *what* (criteria, levels) and applies it -> this class re-binds optimizers and the DDP wrapper,
restores train mode, logs, and keeps the history for checkpoints.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_hprune.checkpoint import STATE_MARKER, restore_structure
from lightning_hprune.core.cost import COSTS
from lightning_hprune.core.engine import EventResult, run_event
from lightning_hprune.core.graph import PruningGraph, match_modules, preserved_modes
from lightning_hprune.core.importance import Importance, resolve_importance
from lightning_hprune.core.levels import Level
from lightning_hprune.core.measure import count_macs, count_params, measure_latency
from lightning_hprune.core.optim_state import remap_optimizer
from lightning_hprune.core.schedules import resolve_schedule
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


def model_input_from_batch(batch: Any) -> torch.Tensor | None:
    """The documented rule for finding the model input in a training batch.

    A tensor is the input; for a tuple or list, its first element; for a dict, the value under ``"x"``,
    ``"input"``, ``"inputs"``, ``"input_ids"`` or ``"image"`` (a dict of several model inputs must be given as
    ``example_input_array``). Returns ``None`` when no input tensor is found.
    """
    x: Any = batch
    if isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
    elif isinstance(batch, dict):
        x = next((batch[k] for k in ("x", "input", "inputs", "input_ids", "image") if k in batch), None)
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    return x


def example_from_batch(batch: Any) -> Any:
    """The first sample of the batch's model input (see :func:`model_input_from_batch`), on the CPU."""
    x = model_input_from_batch(batch)
    return None if x is None else x[:1].detach().cpu().clone()


def _first_sample(example: Any) -> Any:
    if isinstance(example, torch.Tensor):
        return example[:1].detach().cpu().clone() if example.dim() > 0 else example.detach().cpu()
    if isinstance(example, dict):
        return {k: _first_sample(v) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return tuple(_first_sample(v) for v in example)
    return example


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
        if not pl_module.automatic_optimization and len(trainer.optimizers or []) > 1:
            rank_zero_warn(
                "Manual optimization: every optimizer returned by configure_optimizers is re-bound."
            )
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

    def _patch_module_restore(self, pl_module: pl.LightningModule) -> None:
        if "on_load_checkpoint" in pl_module.__dict__:
            return
        original = pl_module.on_load_checkpoint
        callback = self

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            state = (checkpoint.get("callbacks") or {}).get(callback.state_key)
            if state and state.get("history") and not callback.history and callback._graph is None:
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
        """Cumulative fraction of the cost removed after event ``k``."""
        return self.target * self._schedule_fn(k, self.num_events)

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.example_input is None:
            if pl_module.example_input_array is not None:
                self.example_input = _first_sample(pl_module.example_input_array)
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
        if not self.is_event_epoch(epoch) or self.event_index >= self.num_events:
            return
        if self.example_input is None:
            if pl_module.example_input_array is None:
                raise ValueError(
                    f"{type(self).__name__} saw no training batch and `example_input_array` is not set."
                )
            self.example_input = _first_sample(pl_module.example_input_array)
        self._prune_event(trainer, pl_module)

    def _ignored(self, pl_module: nn.Module) -> list[nn.Module]:
        names = {n for ns in match_modules(pl_module, self.ignored_layers).values() for n in ns}
        return [m for n, m in pl_module.named_modules() if n in names]

    def _ensure_graph(self, pl_module: pl.LightningModule) -> PruningGraph:
        if self._graph is None or self._graph.model is not pl_module:
            self._graph = PruningGraph(pl_module, self.example_input, ignored_layers=self._ignored(pl_module))
            if self.history and not self._graph.history:
                # Resumed without the module hook (e.g. restored by hand): replay the recorded structure.
                self._graph.replay(self.history)
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

    def _prune_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        k = self.event_index
        graph = self._ensure_graph(pl_module)
        metric = self._monitored(trainer)
        if k == 0 or not self.baseline:
            self.baseline = {f"dense_{key}": v for key, v in self._measure(pl_module).items()}
            if metric is not None:
                self.baseline["metric"] = metric
            self.original_size = {g.name: g.size for g in graph.groups()}
        dense = self.baseline[f"dense_{self.cost}"]
        fraction = self.target_fraction(k)
        steps = []
        levels = self.levels_for_event()
        total_share = sum(lv.share for lv in levels)
        cum = 0.0
        for lv in levels:
            cum += lv.share
            steps.append((lv, dense * (1.0 - fraction * cum / total_share)))
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
            )
        self._rebind(trainer, pl_module, result)
        self.importance.reset()
        self.calibration.clear()
        self.event_index += 1
        self._log_event(trainer, pl_module, k, fraction, metric, result)

    # ------------------------------------------------------------------ re-binding
    def _rebind(self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: EventResult) -> None:
        live = list(pl_module.parameters())
        for opt in trainer.optimizers:
            problems = remap_optimizer(opt, result.surgery, live)
            for p in problems:
                rank_zero_warn(f"{type(self).__name__}: {p}.")
        strategy = trainer.strategy
        wrapper = strategy.model
        if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel) and hasattr(
            strategy, "_setup_model"
        ):
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
                    "level": r.level,
                    "removed": dict(r.removed),
                    "cost_before": r.cost_before,
                    "cost_after": r.cost_after,
                }
                for r in result.levels
            ],
        }
        if metric is not None:
            record[self.monitor or "metric"] = metric
            base = self.baseline.get("metric")
            record["retained"] = metric / base if base else math.nan
        self.records.append(record)
        metrics = {f"hprune/{key}": float(v) for key, v in record.items() if isinstance(v, (int, float))}
        for r in result.levels:
            metrics[f"hprune/{r.level}/channels_removed"] = float(sum(r.removed.values()))
            metrics[f"hprune/{r.level}/{self.cost}_removed"] = float(r.cost_before - r.cost_after)
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
        summary["structure"] = self._structure(pl_module)
        summary["events_log"] = self.records
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            self._write_report(trainer, summary)
        self.summary = summary

    def _structure(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        now = {g.name: g.size for g in self._graph.groups()} if self._graph is not None else {}
        return {
            "widths": {
                n: {"before": self.original_size.get(n), "after": now.get(n)} for n in self.original_size
            },
            "removed_modules": [h["module"] for h in self.history_steps() if h.get("op") == "identity"],
        }

    def history_steps(self) -> list[dict[str, Any]]:
        """The structural steps applied so far (plain data)."""
        return list(self._graph.history) if self._graph is not None else list(self.history)

    def _write_report(self, trainer: pl.Trainer, summary: dict[str, Any]) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, "hprune_report.json")
        with open(path, "w") as f:
            json.dump(summary, f, indent=2, default=float)
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
