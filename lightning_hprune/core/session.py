"""``PruningSession``: all the state of one pruning run, and an event as explicit stages.

The session owns every piece of pruning state, each in a small part with ``state_dict`` /
``load_state_dict``:

* the :class:`~lightning_hprune.core.schedules.EventSchedule` (event epochs, per-level fractions, position);
* the :class:`~lightning_hprune.core.ledger.Ledger` (baseline, original widths, event records, history);
* the :class:`~lightning_hprune.core.closed_loop.ClosedLoop` (or none);
* the criterion (:class:`~lightning_hprune.core.importance.Importance`) and its statistics;
* the calibration batches, the decision log, the example input and the sensitivity analysis' result.

An event runs as ``plan -> execute -> record``, and ``judge`` comes on a later epoch, each with plain
values in and out. :meth:`PruningSession.snapshot` is the undo point of a whole event (the model, the
optimizers and the session by value), so a failure at any stage leaves nothing changed, criterion
statistics included. The session never imports Lightning: callbacks feed it from Trainer hooks.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lightning_hprune.core.adjust import DECISION_CODES, Decision, decide
from lightning_hprune.core.closed_loop import ClosedLoop
from lightning_hprune.core.cost import MacsCost, ParamsCost, resolve_cost
from lightning_hprune.core.engine import EventResult, plan_steps, run_event
from lightning_hprune.core.families.pretrained import guard_save_pretrained
from lightning_hprune.core.graph import (
    PruningError,
    PruningGraph,
    SkippedBlock,
    match_modules,
    preserved_modes,
)
from lightning_hprune.core.importance import Importance, Reduce, resolve_importance
from lightning_hprune.core.ledger import EventRecord, Ledger
from lightning_hprune.core.levels import Agree, Level
from lightning_hprune.core.measure import (
    LatencyComparison,
    LatencyMeasurement,
    LatencyStats,
    compare_latency,
    compare_separate,
    cpu_copy,
    latency_stats,
    nbytes,
    resolve_latency,
    structure_fingerprint,
)
from lightning_hprune.core.schedules import EventSchedule
from lightning_hprune.core.sensitivity import Progress, SensitivityAnalysis, measure_sensitivity
from lightning_hprune.core.timeline import RunTimeline
from lightning_hprune.core.undo import Snapshot
from lightning_hprune.core.validation import check_choice, check_fraction, check_int, check_str_list

#: The state format :meth:`PruningSession.state_dict` writes (version 1 is read too).
STATE_VERSION = 2


def _detached_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, Mapping):
        return {k: _detached_cpu(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_detached_cpu(v) for v in x)
    return x


class Calibration:
    """The model inputs of the last few training batches of an event epoch, kept on the CPU.

    Levels and criteria that need data (block scores, activations) use them, so no extra passes over the
    data loader are made.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.batches: list[Any] = []

    def add(self, x: Any) -> None:
        """Keep ``x`` (a tensor, or a tuple or dict of them: detached, on the CPU), dropping the oldest."""
        if self.size <= 0:
            return
        self.batches.append(_detached_cpu(x))
        del self.batches[: -self.size]

    def clear(self) -> None:
        """Forget every batch."""
        self.batches.clear()

    def state_dict(self) -> dict[str, Any]:
        """The batches."""
        return {"batches": list(self.batches)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.batches = list(state.get("batches", []))


class DecisionLog:
    """Every decision about an event, in order: ``pruned``, ``continue``, ``speed_up``, ``roll_back``, ``stop``.

    Append-only: a rollback restores the model and the ledger, never the log of how it came to that.
    """

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def add(
        self, action: str, reason: str, epoch: int, step: int, rate: float, **fields: Any
    ) -> dict[str, Any]:
        """Append and return one entry."""
        entry = {
            "action": action,
            "code": DECISION_CODES[action],
            "reason": reason,
            "epoch": epoch,
            "step": step,
            "rate": rate,
            **fields,
        }
        self.entries.append(entry)
        return entry

    def state_dict(self) -> dict[str, Any]:
        """The entries."""
        return {"entries": [dict(e) for e in self.entries]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.entries = [dict(e) for e in state.get("entries", [])]


@dataclass(frozen=True)
class EventPlan:
    """The plan of one event: what each level owes, as ``(level, target cost)`` steps.

    Attributes:
        index: the event's position in the schedule.
        fractions: every level's cumulative fraction of the dense cost after the event.
        steps: ``(level, target cost)``, coarse to fine; the last aims at the event's overall target.
        dense: the dense model's cost.
        start: the cost before the event.
        strict: the event's target is a minimum (the schedule's last step).

    """

    index: int
    fractions: list[float]
    steps: list[tuple[Level, float]]
    dense: float
    start: float
    strict: bool

    @property
    def fraction(self) -> float:
        """The cumulative fraction of the dense cost removed after the event (all levels)."""
        return sum(self.fractions)


@dataclass
class Verdict:
    """What :meth:`PruningSession.judge` decided about the last event.

    Attributes:
        decision: the closed loop's decision.
        entries: the decision-log entries it appended.
        rolled_back: the model and the optimizers were restored to their state before the event.
        new_parameters: ``id(old parameter) -> parameter`` after a rollback (the optimizers already point at
            them; a distributed wrapper must be rebuilt around the model).
        retry_now: an event must run now (a retry past the schedule's end).

    """

    decision: Decision
    entries: list[dict[str, Any]]
    rolled_back: bool = False
    new_parameters: dict[int, nn.Parameter] = field(default_factory=dict)
    retry_now: bool = False


class PruningSession:
    """All the state of one pruning run over one model (see the module docstring).

    Args:
        levels: the hierarchy, coarse to fine.
        target: fraction of the cost to remove by the end, in (0, 1).
        cost: ``"macs"``, ``"params"`` or a :class:`~lightning_hprune.core.cost.Cost`.
        schedule: when events happen (default: every epoch from 0, end resolved from the fit's length).
        importance: the criterion (default L2 magnitude), a short name or a ``class_path`` mapping.
        round_to: kept widths are multiples of this.
        tolerance: a level stops within this fraction of the dense cost above its target.
        ignored_layers: module-name glob patterns whose output width must not change.
        monitor: the name of the monitored metric (for records), or ``None``.
        mode: ``"max"`` when higher ``monitor`` values are better, ``"min"`` otherwise.
        closed_loop: automatic rate adjustment (needs ``monitor``), or ``None``.
        calibration_batches: training batches kept for data-driven levels and criteria.
        measure_latency: ``True`` (a :class:`~lightning_hprune.core.measure.LatencyMeasurement` with its
            defaults: before the first event and, interleaved with a CPU copy of the dense model, at the end),
            a ``LatencyMeasurement`` (``per_event=True`` also measures after every event), or ``False``.
        sensitivity: a one-time sensitivity analysis before the first event, or ``None``.
        uniform_widths: for models of a known layout (Hugging Face transformers), keep one width per kind
            across layers (what a plain ``from_pretrained`` config describes); ``False`` prunes layers apart.

    """

    def __init__(
        self,
        levels: Sequence[Level],
        target: float = 0.5,
        cost: Any = "macs",
        schedule: EventSchedule | None = None,
        importance: Importance | str | Mapping[str, Any] | None = None,
        round_to: int = 8,
        tolerance: float = 0.002,
        ignored_layers: Sequence[str] | None = None,
        monitor: str | None = None,
        mode: str = "max",
        closed_loop: ClosedLoop | None = None,
        calibration_batches: int = 4,
        measure_latency: bool | LatencyMeasurement = True,
        sensitivity: SensitivityAnalysis | None = None,
        uniform_widths: bool = True,
    ) -> None:
        levels = list(levels)
        if not levels or not all(isinstance(lv, Level) for lv in levels):
            raise ValueError(
                f"Expected argument `levels` to be a non-empty list of `Level` objects, but got {levels!r}."
            )
        self._levels = levels
        self.target = check_fraction("target", target)
        self.cost = resolve_cost(cost)
        self.schedule = schedule if schedule is not None else EventSchedule()
        if not isinstance(self.schedule, EventSchedule):
            raise ValueError(f"Expected argument `schedule` to be an `EventSchedule`, but got {schedule!r}.")
        self.importance = resolve_importance(importance)
        self.round_to = check_int("round_to", round_to, minimum=1)
        self.tolerance = check_fraction("tolerance", tolerance)
        self.ignored_layers = check_str_list("ignored_layers", ignored_layers)
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"Expected argument `monitor` to be a metric name or None, but got {monitor!r}.")
        self.monitor = monitor
        self.mode = check_choice("mode", mode, ("max", "min"))
        if closed_loop is not None and not isinstance(closed_loop, ClosedLoop):
            raise ValueError(
                f"Expected argument `closed_loop` to be a `ClosedLoop` or None, but got {closed_loop!r}."
            )
        if closed_loop is not None and monitor is None:
            raise ValueError(
                "Expected argument `monitor` to name a logged metric when `closed_loop` is set, but got "
                "monitor=None."
            )
        self.loop = closed_loop
        self.calibration = Calibration(check_int("calibration_batches", calibration_batches, minimum=0))
        self.latency = resolve_latency(measure_latency)
        #: Whether this process keeps the dense copy and measures at the end (set False on ranks > 0).
        self.latency_here = True
        #: A CPU copy of the dense model, taken before the first event (runtime only, never checkpointed).
        self.dense_copy: nn.Module | None = None
        #: Wall time spent measuring latency in this process so far.
        self.latency_seconds = 0.0
        #: ``time.perf_counter()`` when training started in this process (see :meth:`start_clock`).
        self.clock_start: float | None = None
        if sensitivity is not None and not isinstance(sensitivity, SensitivityAnalysis):
            raise ValueError(
                f"Expected argument `sensitivity` to be a `SensitivityAnalysis` or None, but got {sensitivity!r}."
            )
        self.sensitivity = sensitivity
        if not isinstance(uniform_widths, bool):
            raise ValueError(f"Expected argument `uniform_widths` to be a bool, but got {uniform_widths!r}.")
        self.uniform_widths = uniform_widths
        self.ledger = Ledger()
        self.decisions = DecisionLog()
        #: The monitored metric per validation and the kept widths per event (for the report).
        self.timeline = RunTimeline()
        self.example_input: Any = None
        self._warned_calibration = False
        #: Set by the pruning callbacks when the user chose no criterion (see ``ShardedPruning.check``).
        self.default_importance = False
        #: ``{group name: metric drop}`` from the sensitivity analysis, once it ran.
        self.sensitivity_drops: dict[str, float] | None = None
        self._graph: PruningGraph | None = None

    # ------------------------------------------------------------------ configuration
    @property
    def levels(self) -> tuple[Level, ...]:
        """The hierarchy, coarse to fine."""
        return tuple(self._levels)

    def compose(self, levels: Sequence[Level]) -> None:
        """Append the levels of cooperating callbacks (finer ones after coarser ones), before any event."""
        if self.ledger.started:
            raise PruningError("Levels cannot be added to a session whose first event has run.")
        self._levels.extend(levels)

    def settings(self) -> dict[str, str]:
        """The settings that cooperating callbacks must share, as comparable strings."""
        s = self.schedule
        return {
            "target": repr(self.target),
            "cost": self.cost.name,
            "schedule": repr(s.schedule),
            "decay": repr(s.decay),
            "start_epoch": repr(s.start_epoch),
            "end_epoch": repr(s.end_epoch),
            "every_n_epochs": repr(s.every_n_epochs),
            "importance": repr(self.importance),
            "round_to": repr(self.round_to),
            "tolerance": repr(self.tolerance),
            "ignored_layers": repr(list(self.ignored_layers)),
            "monitor": repr(self.monitor),
            "mode": repr(self.mode),
            "closed_loop": repr(self.loop),
            "calibration_batches": repr(self.calibration.size),
            "measure_latency": repr(self.latency),
            "sensitivity": repr(self.sensitivity),
            "uniform_widths": repr(self.uniform_widths),
        }

    def use_example_input(self, example: Any) -> None:
        """Set the one-sample input used to trace and measure the model (kept on the CPU, checkpointed)."""
        self.example_input = example

    # ------------------------------------------------------------------ the graph
    @property
    def graph(self) -> PruningGraph | None:
        """The dependency graph, once :meth:`attach` built it."""
        return self._graph

    def ignored_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules ``ignored_layers`` names."""
        names = {n for ns in match_modules(model, self.ignored_layers).values() for n in ns}
        return [m for n, m in model.named_modules() if n in names]

    def attach(self, model: nn.Module) -> PruningGraph:
        """Build (or reuse) the dependency graph of ``model``; rebuild the recorded structure when needed.

        A model without the recorded structure (state loaded by hand into a fresh model) gets it replayed;
        one that already has it (a deep copy of a pruned model) is left alone.

        Raises:
            ValueError: no example input yet, or nothing in the model is prunable.
            PruningError: torch-pruning cannot trace the model.

        """
        if self._graph is not None and self._graph.model is model:
            return self._graph
        if self.example_input is None:
            raise ValueError(
                "Expected the session to have an example input before building the graph, but got None."
            )
        graph = PruningGraph(
            model,
            self.example_input,
            self.ignored_modules(model),
            history=self.ledger.history,
            uniform=self.uniform_widths,
        )
        if self.ledger.history and not self._applied(graph):
            # Resumed without the module hook (state loaded by hand into a fresh model): rebuild the structure.
            steps = [dict(h) for h in self.ledger.history]
            self.ledger.history.clear()
            graph.replay(steps)
        if not self.ledger.history and not graph.groups():
            raise ValueError(
                f"Expected {type(model).__name__} to have at least one prunable channel group, but "
                + (
                    f"`ignored_layers`={list(self.ignored_layers)} excludes every one"
                    if self.ignored_layers
                    else "every layer's output width is fixed (it feeds the model's output)"
                )
                + f", so the target {self.target:.0%} of {self.cost.name} cannot be reached. Leave at least one "
                "layer that does not produce the model's output out of `ignored_layers`."
            )
        self._graph = graph
        return graph

    def _applied(self, graph: PruningGraph) -> bool:
        """Whether ``graph``'s model already has the recorded structure (steps apply in order, all or none)."""
        known = self.ledger.structure
        if known.get("pruned") or known.get("dense"):
            now = structure_fingerprint(graph.model)
            if now == known.get("pruned"):
                return True
            if now == known.get("dense"):
                return False
            raise PruningError(
                f"{type(graph.model).__name__} has neither the dense nor the pruned structure recorded in the pruning "
                "state (another architecture or size?): the recorded history cannot be replayed on it."
            )
        # States of the first release carry no fingerprint: judge by the first recorded step.
        first = self.ledger.history[0]
        module = str(first.get("module"))
        if first.get("op") == "identity":
            return isinstance(_get(graph.model, module), SkippedBlock)
        for g in graph.groups():
            if module == g.name or module in g.outputs:
                return g.size != self.ledger.original_widths.get(module, g.size)
        return True  # the recorded group is gone: the model is not the unpruned architecture

    def rebuild_structure(self, model: nn.Module, state: Mapping[str, Any]) -> PruningGraph | None:
        """Rebuild the structure recorded in a checkpointed ``state`` on an unpruned ``model`` (before its weights load).

        Returns:
            The graph, or ``None`` when the state records no structure.

        """
        state = migrate(state, self)
        history = state["ledger"].get("history") or []
        if not history:
            return None
        self.ledger.load_state_dict(state["ledger"])
        self.example_input = state.get("example_input")
        self._graph = None
        return self.attach(model)

    def forget_graph(self) -> None:
        """Drop the dependency graph (a cache): the next use traces the model again."""
        self._graph = None

    def _rebuild_graph(self) -> None:
        if self._graph is None:
            return
        try:
            self._graph.rebuild()
        except Exception:  # retraced lazily at the next use (which reports the error)
            self._graph = None

    # ------------------------------------------------------------------ measurement
    def measure(self, model: nn.Module, latency: bool | None = None) -> dict[str, float]:
        """Parameters, MACs and latency (median and quartiles) of ``model`` on the example input.

        Args:
            model: the model.
            latency: measure latency (default: when ``measure_latency`` asks for it at every event).

        """
        out = {
            "params": ParamsCost().measure(model, self.example_input),
            "macs": MacsCost().measure(model, self.example_input),
        }
        if self.cost.name not in out:
            out[self.cost.name] = self.cost.measure(model, self.example_input)
        if latency is None:
            latency = self.latency is not None and self.latency.per_event
        if latency and self.latency is not None:
            start = time.perf_counter()
            stats = latency_stats(model, self.example_input, self.latency, self.latency_budget())
            self.latency_seconds += time.perf_counter() - start
            out["latency_ms"] = stats.median_ms
            out["latency_q1_ms"] = stats.q1_ms
            out["latency_q3_ms"] = stats.q3_ms
        return out

    def start_clock(self) -> None:
        """Note that training starts now: ``max_share`` of latency measurement counts from here."""
        self.clock_start = time.perf_counter()

    def latency_budget(self) -> float | None:
        """Seconds of latency measurement ``max_share`` still allows (``None``: no clock or no share)."""
        cfg = self.latency
        if cfg is None or cfg.max_share is None or self.clock_start is None:
            return None
        elapsed = time.perf_counter() - self.clock_start
        return max(0.0, cfg.max_share * elapsed - self.latency_seconds)

    def _keep_dense_copy(self, model: nn.Module) -> None:
        """Keep a CPU copy of the dense model for the end-of-fit comparison (when configured, here)."""
        self.dense_copy = None
        if self.latency is not None and self.latency.dense_copy and self.latency_here:
            self.dense_copy = cpu_copy(model)

    def final_latency(self, model: nn.Module) -> LatencyComparison | None:
        """Dense against pruned latency at the end: interleaved with the dense copy when there is one.

        The dense copy runs on ``model``'s device for the measurement and is released afterwards.
        Returns ``None`` when latency is not measured or no event ran.
        """
        cfg = self.latency
        if cfg is None or not self.ledger.started or self.example_input is None:
            return None
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        dense, self.dense_copy = self.dense_copy, None
        budget = self.latency_budget()
        start = time.perf_counter()
        try:
            if dense is not None:
                try:
                    dense.to(device)
                    return compare_latency(dense, model, self.example_input, cfg, budget)
                except torch.cuda.OutOfMemoryError:
                    note = f"the dense copy ({nbytes(dense) / 2**20:.0f} MiB) did not fit on {device}"
            elif not cfg.dense_copy:
                note = "dense_copy=False"
            else:
                note = "no dense copy in this process (resumed after the first event)"
            base = self.ledger.baseline
            if "dense_latency_ms" not in base:
                return None
            median = base["dense_latency_ms"]
            before = LatencyStats(
                median, base.get("dense_latency_q1_ms", median), base.get("dense_latency_q3_ms", median), 0
            )
            after = latency_stats(model, self.example_input, cfg, budget)
            seconds = time.perf_counter() - start
            note = f"not interleaved ({note}): dense measured before the first event, pruned at the end"
            return compare_separate(before, after, str(device), cfg.batch_size, seconds, note)
        finally:
            self.latency_seconds += time.perf_counter() - start
            del dense

    # ------------------------------------------------------------------ when
    @property
    def stopped(self) -> bool:
        """Whether the closed loop stopped pruning."""
        return self.loop is not None and self.loop.stopped

    @property
    def active(self) -> bool:
        """Whether events remain (scheduled, or a pending check that may call for a retry)."""
        if self.stopped:
            return False
        return not self.schedule.finished or (self.loop is not None and self.loop.pending is not None)

    def due(self, epoch: int) -> bool:
        """Whether a scheduled event runs at the end of ``epoch``."""
        return not self.stopped and self.schedule.is_event_epoch(epoch) and not self.schedule.finished

    def collects(self, epoch: int) -> bool:
        """Whether training batches of ``epoch`` are kept as calibration inputs."""
        return (
            self.calibration.size > 0 and self.schedule.is_event_epoch(epoch) and not self.schedule.finished
        )

    def target_fraction(self, k: int) -> float:
        """Cumulative fraction of the cost scheduled to be removed after event ``k`` (all levels)."""
        return sum(
            self.schedule.level_fractions([(lv.share, lv.schedule) for lv in self._levels], self.target, k)
        )

    # ------------------------------------------------------------------ the stages of an event
    def snapshot(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        on_restore: Sequence[Callable[[], None]] = (),
    ) -> Snapshot:
        """The undo point of a whole event: the model and optimizers (zero-copy) and this session, by value.

        ``on_restore`` runs before the graph is traced again (it may put back what the model needs to run).
        """
        return Snapshot(model, optimizers, parts=[self], on_restore=[*on_restore, self._rebuild_graph])

    def wants_sensitivity(self) -> bool:
        """Whether the sensitivity analysis must run before this event (configured, not run, and used)."""
        return (
            self.sensitivity is not None
            and self.sensitivity_drops is None
            and any(lv.wants_sensitivity for lv in self._levels)
        )

    def measure_sensitivity(
        self, evaluate: Callable[[nn.Module], float], progress: Progress | None = None
    ) -> dict[str, float]:
        """Run the configured sensitivity analysis on the attached model (left exactly as it was)."""
        assert self.sensitivity is not None
        assert self._graph is not None
        cfg = self.sensitivity
        return measure_sensitivity(self._graph, evaluate, cfg.fraction, mode=cfg.mode, progress=progress)

    def use_sensitivity(self, drops: Mapping[str, float]) -> None:
        """Keep the analysis' result (checkpointed); levels get it through their selection context."""
        self.sensitivity_drops = {str(k): float(v) for k, v in drops.items()}

    def plan(self, model: nn.Module, metric: float | None = None) -> EventPlan:
        """Stage 1: what each level owes at this event. The first event takes the baseline first."""
        graph = self.attach(model)
        if not self.ledger.started:
            self.ledger.start(
                self.measure(model, latency=self.latency is not None),
                metric,
                graph.groups(),
                structure_fingerprint(model),
            )
            self._keep_dense_copy(model)
        k = self.schedule.position
        shares = [(lv.share, lv.schedule) for lv in self._levels]
        fractions = self.schedule.level_fractions(shares, self.target, k)
        dense = self.ledger.dense(self.cost.name)
        start = self.ledger.current(self.cost.name)
        if self.loop is not None:
            fractions = self.loop.aim(fractions, 1.0 - start / dense, self.target)
        removed = self.ledger.removed_per_level(len(self._levels))
        steps = plan_steps(self._levels, dense, start, fractions, removed)
        strict = k >= self.schedule.num_events - 1  # the final target is a minimum
        return EventPlan(index=k, fractions=fractions, steps=steps, dense=dense, start=start, strict=strict)

    def execute(
        self,
        model: nn.Module,
        plan: EventPlan,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        agree: Agree | None = None,
        reduce: Reduce | None = None,
    ) -> EventResult:
        """Stage 2: score and remove, level by level (with the closed loop, a CPU rollback point first)."""
        graph = self.attach(model)
        if self.loop is not None:
            self.loop.keep(
                Snapshot(model, optimizers, parts=[self.ledger, self.importance, self.calibration], copy=True)
            )
        batches = list(self.calibration.batches)
        if not batches and self.importance.needs_calibration and self.example_input is not None:
            # no training batch had the example input's form (see `calibration_from_batch`): one sample
            # of statistics is better than an event that fails
            if not self._warned_calibration:
                self._warned_calibration = True
                warnings.warn(
                    f"{self.importance!r} scores from calibration batches, but no training batch had the form of "
                    "the model's example input, so it scores from the example input alone (one sample). Make "
                    "the batches' model input match `example_input_array` (see docs/criteria.md).",
                    stacklevel=2,
                )
            batches = [self.example_input]
        self.importance.prepare(model, batches, reduce)
        try:
            with preserved_modes(model):
                return run_event(
                    graph,
                    plan.steps,
                    self.importance,
                    self.cost,
                    self.ledger.original_width,
                    self.round_to,
                    self.tolerance * plan.dense,
                    agree=agree,
                    calibration=batches,
                    strict=plan.strict,
                    sensitivity=self.sensitivity_drops,
                    atomic=False,
                    final_cost=plan.dense * (1.0 - self.target),
                )
        finally:
            self.importance.reset()  # also clears the statistics carried in `.grad` during the event
            # any Hugging Face model inside (known layout or traced) refuses its own `save_pretrained` while
            # its config cannot rebuild it, instead of writing a directory `from_pretrained` rejects
            guard_save_pretrained(model)

    def record(
        self,
        model: nn.Module,
        plan: EventPlan,
        result: EventResult,
        epoch: int,
        step: int,
        metric: float | None = None,
        max_epochs: int | None = None,
    ) -> tuple[EventRecord, dict[str, Any]]:
        """Stage 3: measure the pruned model, record the event, move the schedule on.

        Returns:
            The event's record and its ``pruned`` decision-log entry.

        """
        after = self.measure(model)
        cost = self.cost.name
        prev = self.ledger.current(cost)
        base = self.ledger.baseline.get("metric")
        record = EventRecord(
            event=plan.index,
            epoch=epoch,
            step=step,
            measured=after,
            target=plan.fraction,
            removed=1.0 - after[cost] / plan.dense,
            event_ratio=1.0 - after[cost] / prev if prev else 0.0,
            seconds=result.seconds,
            levels=result.levels,
            metric=metric,
            retained=(metric / base if base else math.nan) if metric is not None else None,
        )
        self.ledger.add(record, structure_fingerprint(model))
        self.calibration.clear()
        self.schedule.advance()
        reason = f"event {plan.index}: {record.removed:.1%} of {cost} removed so far"
        rate = self.loop.rate if self.loop is not None else 1.0
        reason += f" (rate {rate:.3g})"
        if self.loop is not None:
            every = self.schedule.every_n_epochs
            reason += f"; {self.monitor} " + self.loop.schedule_check(plan.index, epoch, every, max_epochs)
        entry = self.decisions.add(
            "pruned", reason, epoch, step, rate, event=plan.index, removed=record.removed
        )
        return record, entry

    def judge(
        self,
        epoch: int,
        step: int,
        value: float | None,
        max_epochs: int | None = None,
        agree: Callable[[Decision], Decision] | None = None,
    ) -> Verdict | None:
        """Stage 4, after an event's recovery: keep it, or roll it back; say whether to retry now.

        Args:
            epoch: the epoch that just ended.
            step: the global step.
            value: the monitored metric now.
            max_epochs: the fit's length (to know whether an epoch is left for a retry).
            agree: makes every process act on the same decision (rank 0's).

        Returns:
            ``None`` when no check is due.

        """
        loop = self.loop
        pending = loop.due(epoch) if loop is not None else None
        if loop is None or pending is None:
            return None
        assert value is not None
        baseline = self.ledger.baseline.get("metric", value)
        decision = decide(baseline, value, loop.config(self.mode), loop.rate, loop.retries)
        if agree is not None:
            decision = agree(decision)
        undone = self.ledger.records[-1] if self.ledger.records else None
        decision, point = loop.apply(decision)
        fields: dict[str, Any] = {
            "event": pending.event,
            "value": value,
            "drop": decision.drop,
            "bound": decision.bound,
        }
        if decision.roll_back and point is None:
            entry = self.decisions.add(
                "stop",
                f"{self.monitor}={value:.4g} dropped {decision.drop:.2%} (> max_drop {loop.max_drop:.2%}), but the "
                f"state before event {pending.event} is not available (resumed from a checkpoint, and the CPU copy "
                "is not checkpointed): stopped pruning",
                epoch,
                step,
                loop.rate,
                **fields,
            )
            return Verdict(decision=decision, entries=[entry])
        verdict = Verdict(decision=decision, entries=[])
        if point is not None:
            kept = list(self.calibration.batches)  # this epoch's, when it is an event epoch: newer
            verdict.new_parameters = point.restore()
            if kept:
                self.calibration.load_state_dict({"batches": kept})
            self._rebuild_graph()
            verdict.rolled_back = True
            fields["undone_removed"] = undone.removed if undone is not None else math.nan
        verdict.entries.append(
            self.decisions.add(decision.action, decision.reason, epoch, step, loop.rate, **fields)
        )
        if loop.stopped or not self.schedule.finished:
            return verdict  # the schedule goes on: its next event (maybe this epoch's) is the retry
        room = max_epochs is None or max_epochs < 0 or epoch + 1 < max_epochs
        if decision.action != "roll_back":
            # Past the schedule, short of the target because of rollbacks: catch up while epochs remain.
            last = self.ledger.records[-1] if self.ledger.records else None
            short = last is not None and last.removed < self.target - self.tolerance
            verdict.retry_now = room and short and last is not None and last.event_ratio > 0
        elif room:
            verdict.retry_now = True
        else:
            loop.stop()
            verdict.entries.append(
                self.decisions.add(
                    "stop", "rolled back at the last epoch: no epoch left to retry", epoch, step, loop.rate
                )
            )
        return verdict

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything, as plain data and CPU tensors (``torch.load(..., weights_only=True)`` reads it)."""
        return {
            "version": STATE_VERSION,
            "levels": [lv.name for lv in self._levels],
            "schedule": self.schedule.state_dict(),
            "ledger": self.ledger.state_dict(),
            "decisions": self.decisions.state_dict(),
            "closed_loop": None if self.loop is None else self.loop.state_dict(),
            "importance": self.importance.state_dict(),
            # Non-empty only in a checkpoint written during an event epoch before its event (validation-end
            # or step-based checkpoints): a resumed run then prunes with the same data as an unbroken one.
            "calibration": self.calibration.state_dict(),
            "example_input": self.example_input,
            "sensitivity": None if self.sensitivity_drops is None else dict(self.sensitivity_drops),
            "timeline": self.timeline.state_dict(),
            "cost": self.cost.state_dict(),  # a measured cost's tables (``cost="latency"``): not re-measured
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (version 2) or a version-1 callback state (see :func:`migrate`)."""
        state = migrate(state, self)
        self.schedule.load_state_dict(state.get("schedule") or {})
        self.ledger.load_state_dict(state.get("ledger") or {})
        self.decisions.load_state_dict(state.get("decisions") or {})
        if self.loop is not None:
            self.loop.load_state_dict(state.get("closed_loop") or {})
        self.importance.reset()
        if state.get("importance"):
            self.importance.load_state_dict(state["importance"])
        self.calibration.load_state_dict(state.get("calibration") or {})
        if state.get("example_input") is not None:
            self.example_input = state["example_input"]
        self.timeline.load_state_dict(state.get("timeline") or {})
        self.cost.load_state_dict(state.get("cost") or {})
        drops = state.get("sensitivity")
        self.sensitivity_drops = None if drops is None else {str(k): float(v) for k, v in drops.items()}

    def __getstate__(self) -> dict[str, Any]:
        # Picklable (``ddp_spawn``, deep copies): the dependency graph is a cache, rebuilt on use.
        state = self.__dict__.copy()
        state["_graph"] = None
        state["dense_copy"] = None  # runtime only (and possibly large)
        return state


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def history_of(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The structural history recorded in a checkpointed session state (either version)."""
    if int(state.get("version", 1)) >= 2:
        return [dict(h) for h in (state.get("ledger") or {}).get("history", [])]
    return [dict(h) for h in state.get("history", [])]


def migrate(state: Mapping[str, Any], session: PruningSession | None = None) -> dict[str, Any]:
    """A version-2 state from ``state``; version-1 states (the first release's callback state) are converted.

    Version 1 kept everything flat: ``event_index``, ``history``, ``records``, ``baseline``,
    ``original_size`` (keyed by group names, which were the root layers' module names), and the closed loop
    under ``adjust``.
    """
    version = int(state.get("version", 1))
    if version >= 2:
        return dict(state)
    monitor = session.monitor if session is not None else None
    records = [EventRecord.from_dict(r, monitor) for r in state.get("records", [])]
    n_levels = (
        len(session.levels) if session is not None else max((len(r.levels) for r in records), default=0)
    )
    level_removed = [0.0] * n_levels
    for r in records:
        if len(r.levels) == n_levels:
            for j, lv in enumerate(r.levels):
                level_removed[j] += lv.saved
    adjust = dict(state.get("adjust") or {})
    ledger = Ledger()
    ledger.baseline = {str(k): float(v) for k, v in dict(state.get("baseline", {})).items()}
    ledger.original_widths = {str(k): int(v) for k, v in dict(state.get("original_size", {})).items()}
    ledger.original_groups = list(ledger.original_widths)
    ledger.records = records
    ledger.level_removed = level_removed
    ledger.history[:] = [dict(h) for h in state.get("history", [])]
    return {
        "version": STATE_VERSION,
        "schedule": {"position": int(state.get("event_index", 0)), "end_epoch": None},
        "ledger": ledger.state_dict(),
        "decisions": {"entries": [dict(d) for d in adjust.get("decisions", [])]},
        "closed_loop": {k: adjust[k] for k in ("rate", "retries", "stopped", "pending_check") if k in adjust},
        "importance": state.get("importance") or {},
        "calibration": {"batches": list(state.get("calibration", []))},
        "example_input": state.get("example_input"),
        "sensitivity": state.get("sensitivity"),
    }
