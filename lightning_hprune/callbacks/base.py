"""Lightning glue over a :class:`~lightning_hprune.core.session.PruningSession`.

A pruning callback only does what needs Lightning: it feeds the session from Trainer hooks (example input,
calibration batches, gradient statistics, the monitored metric), checks the strategy and the other
callbacks, re-binds what Lightning holds after an event (optimizers, the DDP wrapper, compiled code), logs,
and saves the session in checkpoints. Every piece of pruning state lives in the session.

Several pruning callbacks on one Trainer cooperate: the first one (in the callbacks list) leads, and its
session runs the levels of all of them, coarse to fine in list order, with one graph, one schedule, one
report; the others keep a checkpoint entry that points at the leader's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_hprune.callbacks import reporting
from lightning_hprune.callbacks.checks import dict_example_error, monitor_error
from lightning_hprune.callbacks.distillation import Distiller
from lightning_hprune.callbacks.inputs import (
    batch_size_of,
    calibration_from_batch,
    example_from_batch,
    first_sample,
    model_input_from_batch,
)
from lightning_hprune.callbacks.strategies import ShardedPruning, maybe, sharding_for
from lightning_hprune.callbacks.transaction import (
    describe_failure,
    eager,
    failing_module,
    forward_failures,
    recompile,
    weight_averaging_types,
)
from lightning_hprune.checkpoint import LOAD_HINT, STATE_MARKER, find_pruning_state
from lightning_hprune.core.closed_loop import ClosedLoop
from lightning_hprune.core.cost import Cost
from lightning_hprune.core.distill import Distillation
from lightning_hprune.core.graph import PruningError, match_modules
from lightning_hprune.core.importance import GroupTaylorImportance, Importance
from lightning_hprune.core.latency_cost import LatencyCost
from lightning_hprune.core.levels import Level
from lightning_hprune.core.measure import LatencyMeasurement
from lightning_hprune.core.optim_state import ParameterSurgery, remap_optimizer
from lightning_hprune.core.schedules import EventSchedule
from lightning_hprune.core.sensitivity import SensitivityAnalysis, batch_metric, cached_sensitivity
from lightning_hprune.core.session import PruningSession, history_of

_REFUSED_STRATEGIES = {
    "FSDPStrategy": (
        "FSDP1's flat parameters cannot be sliced per channel; use FSDP2: ModelParallelStrategy("
        "data_parallel_size=<devices>, tensor_parallel_size=1) with `fully_shard` in `configure_model`, which "
        "is pruned in place"
    ),
    "DeepSpeedStrategy": "DeepSpeed partitions parameters and owns the optimizer",
    "XLAStrategy": "XLA compiles a static graph",
}


class _Setting:
    """A read-only view of one of the session's settings on the callback (give it to the constructor)."""

    def __init__(self, read: Callable[[PruningSession], Any], doc: str) -> None:
        self.read = read
        self.__doc__ = doc
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: PruningCallback | None, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return self.read(obj.session)

    def __set__(self, obj: PruningCallback, value: Any) -> None:
        raise AttributeError(
            f"`{self.name}` is a setting of the pruning session, fixed at construction: give it to the "
            f"constructor, e.g. {type(obj).__name__}({self.name}={value!r}, ...)."
        )


class PruningCallback(Callback):
    """Physically prune a model while it trains: the lifecycle every pruning callback shares.

    At the end of selected training epochs (``start_epoch`` to ``end_epoch``, every ``every_n_epochs``), a
    pruning event removes a share of the model's cost; training in between recovers. The cumulative removed
    fraction follows ``schedule`` and reaches ``target`` at the last event. Each event runs ``levels`` in
    order (coarse to fine); each level removes what it still owes of its ``share`` of the target (so a coarse
    level that cannot act at one event, e.g. because no whole block fits yet, catches up later) and the last
    level always brings the model to the event's overall target.

    Args:
        levels: the hierarchy, coarse to fine; each level owes its ``share`` of the target (shares are
            normalised) on its own ``schedule`` or the callback's.
        target: fraction of the model's cost to remove by the end, in (0, 1).
        cost: ``"macs"`` (multiply-accumulates of one forward pass), ``"params"``, ``"latency"`` (forward
            latency estimated from per-layer tables measured once on the training device at the training
            batch size: a :class:`~lightning_hprune.core.latency_cost.LatencyCost`, whose tables are cached in
            the run directory and checkpointed), or a ``Cost`` object.
        schedule: ``"geometric"`` (each event removes ``r_k = r_0 * decay**k`` of the target), ``"cubic"``,
            ``"linear"``, ``"constant"`` (one-shot), or a callable of the event index returning the cumulative
            fraction of the target.
        decay: the geometric schedule's decay, in (0, 1].
        start_epoch: first epoch at whose end an event happens.
        end_epoch: last event epoch (default: half of ``max_epochs``, leaving the rest for recovery). It may
            lie beyond the fit's ``max_epochs`` (training in chunks): a resumed fit finishes the schedule.
        every_n_epochs: epochs between events.
        importance: the criterion: an ``Importance`` object, or ``"l1"``, ``"l2"``, ``"taylor"``,
            ``"group_taylor"``, ``"activation"``, ``"apoz"``, ``"activation_weighted"``, ``"bn_scale"``, ``"random"`` (see
            ``docs/criteria.md``). Default: group Taylor from the fit's own gradients
            (``GroupTaylorImportance(strict=False)``, chosen from the criteria benchmarks), or L2 magnitude under a
            sharded strategy, whose gradients are split across processes.
        round_to: kept widths are multiples of this (hardware alignment; 1 disables).
        ignored_layers: module-name glob patterns whose output width must not change. Layers producing the
            model's outputs are always kept.
        monitor: a logged metric (e.g. ``"val_acc"``) reported with its ratio to its value before pruning.
        mode: ``"max"`` if higher ``monitor`` values are better (accuracy), ``"min"`` otherwise (loss,
            perplexity).
        closed_loop: a :class:`~lightning_hprune.ClosedLoop` that rolls events back (model and optimizer
            state, saved on the CPU) and slows down when ``monitor`` drops more than its ``max_drop``. Needs
            ``monitor``. See ``docs/criteria.md``.
        sensitivity: a :class:`~lightning_hprune.SensitivityAnalysis` run once before the first event; its
            per-layer sensitivities go to every ``LayerLevel`` given no ratios.
        measure_latency: ``True`` (default): forward latency of the dense model before the first event and,
            at the end of fit, of the pruned model interleaved with a CPU copy of the dense one (median,
            interquartile range, the ratio with its spread; see ``docs/reports.md``); a
            :class:`~lightning_hprune.core.measure.LatencyMeasurement` to change how (``per_event=True``
            also measures after every event; ``dense_copy=False`` saves the copy's CPU memory); ``False``:
            never.
        tolerance: stop a level when within this fraction of the dense cost above its target.
        calibration_batches: training batches kept (on the CPU) during event epochs for data-driven levels
            and criteria.
        distillation: a :class:`~lightning_hprune.Distillation`: recover by distilling from the dense model
            (a frozen copy taken just before the first event) or a teacher you give; its term is added to the
            loss ``training_step`` returns. See ``docs/distillation.md``.
        verbose: print one line per event and a before/after table at the end.
        uniform_widths: for Hugging Face transformers (a known layout), keep one width per kind (heads, key/value
            heads, FFN, hidden size) across layers, so the model's own ``save_pretrained`` /
            ``from_pretrained`` round-trips; ``False`` lets every layer keep its own widths (then only
            ``load_pruned`` reloads it, and ``save_pretrained`` is refused with a message).
        png_figures: also write every figure of the end-of-fit report as a PNG file (drawn with matplotlib,
            about a third of a second per figure). The report's figures are always written as SVG (and
            embedded in ``pruning_report.html``); PNGs are drawn anyway when a logger takes images
            (TensorBoard, MLflow, Weights & Biases), and ``hprune report <log_dir>`` draws them later.

    """

    #: The end-of-fit summary (also written to ``hprune_report.json``); set by :meth:`on_train_end`.
    summary: dict[str, Any]
    #: The before/after table printed at the end of fit (rank 0).
    report_table: str

    def __init__(
        self,
        levels: Sequence[Level],
        target: float = 0.5,
        cost: str | Cost = "macs",
        schedule: str | Callable[[int], float] = "geometric",
        decay: float = 0.9,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        every_n_epochs: int = 1,
        importance: Importance | str | None = None,
        round_to: int = 8,
        ignored_layers: Sequence[str] | None = None,
        monitor: str | None = None,
        mode: str = "max",
        closed_loop: ClosedLoop | None = None,
        sensitivity: SensitivityAnalysis | None = None,
        measure_latency: bool | LatencyMeasurement = True,
        tolerance: float = 0.002,
        calibration_batches: int = 4,
        distillation: Distillation | None = None,
        verbose: bool = True,
        uniform_widths: bool = True,
        png_figures: bool = False,
    ) -> None:
        super().__init__()
        self.session = PruningSession(
            levels,
            target=target,
            cost=cost,
            schedule=EventSchedule(start_epoch, end_epoch, every_n_epochs, schedule, decay),
            importance=GroupTaylorImportance(strict=False) if importance is None else importance,
            round_to=round_to,
            tolerance=tolerance,
            ignored_layers=ignored_layers,
            monitor=monitor,
            mode=mode,
            closed_loop=closed_loop,
            calibration_batches=calibration_batches,
            measure_latency=measure_latency,
            sensitivity=sensitivity,
            uniform_widths=uniform_widths,
        )
        self._own_levels = list(levels)
        #: The criterion was not chosen by the user (a sharded strategy swaps it for L2 magnitude).
        self.session.default_importance = importance is None
        if distillation is not None and not isinstance(distillation, Distillation):
            raise ValueError(
                f"Expected argument `distillation` to be a `Distillation` or None, but got {distillation!r}."
            )
        #: Runs the distillation (``None`` without one); its state travels in this callback's checkpoint entry.
        self.distiller = None if distillation is None else Distiller(distillation, self.session)
        self.verbose = bool(verbose)
        if not isinstance(png_figures, bool):
            raise ValueError(f"Expected argument `png_figures` to be a bool, but got {png_figures!r}.")
        self.png_figures = png_figures
        #: The callback whose session runs the events (``self`` unless it cooperates under another one).
        self._leader: PruningCallback = self
        self._patched_module: pl.LightningModule | None = None
        self._monitor_checked = False
        #: The sharded-model glue (FSDP2 under ModelParallelStrategy), set in ``setup``; ``None`` otherwise.
        self._sharding: ShardedPruning | None = None

    # ------------------------------------------------------------------ read-only views of the session
    target = _Setting(lambda s: s.target, "The fraction of the cost to remove.")
    cost = _Setting(lambda s: s.cost.name, "The cost's name.")
    monitor = _Setting(lambda s: s.monitor, "The monitored metric's name.")
    round_to = _Setting(lambda s: s.round_to, "Kept widths are multiples of this.")
    start_epoch = _Setting(lambda s: s.schedule.start_epoch, "The first event epoch.")
    end_epoch = _Setting(lambda s: s.schedule.end_epoch, "The last event epoch given (``None``: resolved).")
    every_n_epochs = _Setting(lambda s: s.schedule.every_n_epochs, "Epochs between events.")
    importance = _Setting(lambda s: s.importance, "The criterion.")
    measure_latency = _Setting(lambda s: s.latency, "How latency is measured (``None``: never).")

    @property
    def levels(self) -> list[Level]:
        """The levels this callback brought (the leading session runs those of every cooperating callback)."""
        return list(self._own_levels)

    @property
    def event_index(self) -> int:
        """Events run so far."""
        return self._leader.session.schedule.position

    @property
    def num_events(self) -> int:
        """Events of the schedule."""
        return self._leader.session.schedule.num_events

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every event's record, as plain data."""
        s = self._leader.session
        return [r.as_dict(s.monitor) for r in s.ledger.records]

    @property
    def decisions(self) -> list[dict[str, Any]]:
        """Every decision about an event."""
        return list(self._leader.session.decisions.entries)

    @property
    def baseline(self) -> dict[str, float]:
        """The dense model's measurements (and metric) before the first event."""
        return dict(self._leader.session.ledger.baseline)

    @property
    def stopped(self) -> bool:
        """Whether the closed loop stopped pruning."""
        return self._leader.session.stopped

    @property
    def rate(self) -> float:
        """The closed loop's step multiplier (1 without a closed loop)."""
        loop = self._leader.session.loop
        return loop.rate if loop is not None else 1.0

    def history_steps(self) -> list[dict[str, Any]]:
        """The structural steps applied so far (plain data)."""
        return [dict(h) for h in self._leader.session.ledger.history]

    def target_fraction(self, k: int) -> float:
        """Cumulative fraction of the cost scheduled to be removed after event ``k`` (all levels)."""
        return self._leader.session.target_fraction(k)

    # ------------------------------------------------------------------ state
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(target=self.target, cost=self.cost)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._leader is not self:
            return {"marker": STATE_MARKER, "version": 2, "member_of": self._leader.state_key}
        state = {"marker": STATE_MARKER, **self.session.state_dict()}
        if self.distiller is not None:
            state["distillation"] = self.distiller.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "member_of" in state_dict or self._leader is not self:
            return  # the leader's entry holds the state
        self.session.load_state_dict(state_dict)
        if self.distiller is not None and state_dict.get("distillation"):
            self.distiller.load_state_dict(state_dict["distillation"])

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A checkpoint whose pruning state sits under another key (written by another release or another
        # pruning callback class) is found by its marker; Lightning only hands over matching keys.
        if self._leader is not self or self.state_key in (checkpoint.get("callbacks") or {}):
            return
        state = find_pruning_state(checkpoint)
        if state is not None:
            self.load_state_dict(state)

    def _find_state(self, checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
        own = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if isinstance(own, Mapping) and "member_of" not in own:
            return dict(own)
        return find_pruning_state(checkpoint)

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        peers = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, PruningCallback)]
        self._leader = peers[0] if peers else self
        if self._leader is not self:
            return  # the leader composes, checks and prunes for every cooperating callback
        self._compose(peers[1:])
        self._refuse_strategies(trainer)
        self._sharding = sharding_for(trainer, self.session, type(self).__name__)
        if self._sharding is not None:
            self._sharding.check()
        for level in self.session.levels:
            level.check_model(pl_module)
        self._refuse_unsupported(trainer, pl_module)
        unmatched = [
            p for p, names in match_modules(pl_module, self.session.ignored_layers).items() if not names
        ]
        if unmatched:
            raise ValueError(
                f"Expected every pattern of `ignored_layers` to match a module name of "
                f"{type(pl_module).__name__}, but {unmatched} matched none. Module names look like "
                f"{[n for n, _ in pl_module.named_modules() if n][:6]}."
            )
        self.session.latency_here = trainer.is_global_zero  # the dense copy and the end-of-fit timing
        self._monitor_checked = False
        warning = self.session.schedule.resolve(trainer.max_epochs)
        if warning:
            rank_zero_warn(f"{type(self).__name__}: {warning}")
        # Lightning loads a checkpoint's weights before callbacks' `on_load_checkpoint`: rebuild the
        # pruned structure from the module's own `on_load_checkpoint`, which runs first (a sharded
        # strategy loads them earlier still, in `strategy.load_checkpoint`: the structure is rebuilt there).
        if self._sharding is not None:
            self._sharding.install_restore(trainer, pl_module, self._find_state)
        else:
            self._patch_module_restore(pl_module)
        if self.distiller is not None:
            self.distiller.setup(trainer, pl_module)

    def _compose(self, members: Sequence[PruningCallback]) -> None:
        """Run the levels of cooperating callbacks too, after refusing settings they disagree on."""
        mine = {**self.session.settings(), "distillation": repr(self.distiller and self.distiller.config)}
        for other in members:
            theirs = {
                **other.session.settings(),
                "distillation": repr(other.distiller and other.distiller.config),
            }
            differ = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
            if differ:
                detail = "; ".join(f"{k}: {a} vs {b}" for k, (a, b) in differ.items())
                raise ValueError(
                    f"Expected the pruning callbacks on one Trainer to share their settings (they prune one model "
                    f"with one schedule), but {self!r} and {other!r} differ in {detail}. Give both the same "
                    "values, or compose the levels in one callback: "
                    f"HierarchicalPruning(levels=[{', '.join(repr(lv) for c in (self, *members) for lv in c.levels)}])."
                )
            other._follow(self)
        self.session.compose([lv for c in members for lv in c.levels])

    def _follow(self, leader: PruningCallback) -> None:
        """Cooperate under ``leader``: its session runs this callback's levels; this one's hooks stand by."""
        self._leader = leader

    def _refuse_strategies(self, trainer: pl.Trainer) -> None:
        name = type(trainer.strategy).__name__
        bases = {c.__name__ for c in type(trainer.strategy).__mro__}
        for refused, why in _REFUSED_STRATEGIES.items():
            if refused in bases:
                raise RuntimeError(
                    f"{type(self).__name__} does not support the {name} strategy ({why}). Use "
                    "strategy='ddp' (or a single device) while pruning, then train the pruned model with "
                    f"{name}."
                )

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
        session, find, distiller = self.session, self._find_state, self.distiller

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            state = find(checkpoint)
            if distiller is not None and state:
                # The dense teacher comes from this (still unpruned) module, before its structure is rebuilt.
                distiller.restore(pl_module, state.get("distillation"))
            graph = session.graph
            if state and history_of(state) and (graph is None or graph.model is not pl_module):
                with eager():
                    session.rebuild_structure(pl_module, state)
            original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
        self._patched_module = pl_module

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._patched_module is not None:
            self._patched_module.__dict__.pop("on_load_checkpoint", None)
            self._patched_module = None
        if self._sharding is not None:
            self._sharding.uninstall()
            self._sharding = None  # it holds the strategy (process groups): not for pickles and copies
        if self.distiller is not None:
            self.distiller.teardown()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning does not call `teardown` after a failed fit: unwrap `training_step` here.
        if self.distiller is not None:
            self.distiller.teardown()

    # ------------------------------------------------------------------ hooks
    def _leads(self) -> bool:
        return self._leader is self

    def _example_input(self, pl_module: pl.LightningModule, batch: Any = None) -> None:
        if self.session.example_input is not None:
            return
        if pl_module.example_input_array is not None:
            self.session.use_example_input(first_sample(pl_module.example_input_array))
            return
        if batch is None:
            return
        example = example_from_batch(batch)
        wrong = dict_example_error(pl_module, batch, example)
        if wrong is not None:
            raise ValueError(f"{type(self).__name__}: {wrong}")
        if example is None:
            raise ValueError(
                f"{type(self).__name__} needs an example input to trace the model. Expected "
                "`pl_module.example_input_array` to be set, or the first training batch to be a "
                "tensor, a tuple/list whose first element is the input tensor, or a dict with an "
                f"'x'/'input'/'inputs'/'input_ids'/'image' tensor; but got a batch of type "
                f"{type(batch).__name__} and example_input_array=None."
            )
        self.session.use_example_input(example)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Trace as soon as the example input is known (the model is on its device by now): a model that
        # torch-pruning cannot trace, or one with nothing prunable, fails before the first epoch.
        if not self._leads():
            return
        self.session.start_clock()  # latency measurement takes at most `max_share` of the time from here
        cost = self.session.cost
        if isinstance(cost, LatencyCost) and cost.cache is None and trainer.is_global_zero:
            cost.cache = os.path.join(reporting.run_dir(trainer), "hprune_latency_table.json")
        self._example_input(pl_module)
        if self.session.example_input is None or not self.session.active:
            return
        view = self._sharding.view(pl_module) if self._sharding is not None else None
        with maybe(view), forward_failures(pl_module) as failures, eager():
            try:
                self._attach(pl_module)
            except PruningError as err:
                where = describe_failure(pl_module, failing_module(err, failures), tracing=True)
                raise PruningError(f"{err}{where}") from err

    def _attach(self, pl_module: pl.LightningModule) -> None:
        graph = self.session.attach(pl_module)
        family = getattr(graph, "family", None)
        if graph.protected_groups and family is not None:  # a known layout says what it leaves alone, and why
            reasons = "; ".join(f"{k}: {v}" for k, v in sorted(graph.protected_groups.items()))
            rank_zero_warn(
                f"{type(self).__name__}: the {family.name} layout does not prune {sorted(graph.protected_groups)} "
                f"({reasons}). Its other widths still are."
            )
        elif graph.protected_groups:
            rank_zero_warn(
                f"{type(self).__name__}: the attention layers {sorted(set(graph.protected_groups.values()))} "
                "are not a recognised layout (timm `qkv` or Hugging Face `query`/`key`/`value`), so the "
                f"groups {sorted(graph.protected_groups)} that would cut through their heads are not "
                "pruned. Their other widths (MLP, residual stream) still are."
            )
        left_alone = getattr(graph, "left_alone", {})
        if left_alone:
            why = sorted(set(left_alone.values()))
            rank_zero_warn(
                f"{type(self).__name__}: {len(left_alone)} channel groups (e.g. {sorted(left_alone)[:3]}) are left "
                f"alone; the rest of the model is pruned. Why: {'; '.join(why[:3])}."
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._leads():
            return
        self._example_input(pl_module, batch)
        cost = self.session.cost
        if isinstance(cost, LatencyCost) and cost.batch_size is None:
            size = batch_size_of(model_input_from_batch(batch))
            if size is not None:
                cost.observe_batch(size)  # the latency tables are timed at the training batch size
        if self.session.collects(trainer.current_epoch):
            # in the form the model is called with (a bare tensor would reach a keyword-only forward
            # positionally); a batch of another form is not kept, and the example input is used instead
            x = calibration_from_batch(batch, self.session.example_input)
            if x is not None:
                self.session.calibration.add(x)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning calls this once per optimizer step, after AMP unscaling and gradient accumulation.
        importance = self.session.importance
        if self._leads() and importance.needs_training_statistics and self.session.active:
            importance.on_before_optimizer_step(pl_module, optimizer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._leads():
            return
        if self.distiller is not None:
            self.distiller.epoch_ended()
        session, epoch = self.session, trainer.current_epoch
        retry = False
        if session.loop is not None and session.loop.due(epoch) is not None:
            retry = self._judge(trainer, pl_module)
        if not retry and not session.due(epoch):
            return
        if session.example_input is None:
            if pl_module.example_input_array is None:
                raise ValueError(
                    f"{type(self).__name__} saw no training batch and `example_input_array` is not set."
                )
            self._example_input(pl_module)
        self._event(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A misnamed `monitor` fails here, at the end of the first validation, not at the first event.
        if not self._leads() or getattr(trainer.state, "fn", None) != "fit":
            return
        if not getattr(self, "_monitor_checked", True):
            error = monitor_error(trainer, self.session.monitor, type(self).__name__)
            if error is not None:
                raise ValueError(error)
            self._monitor_checked = not trainer.sanity_checking
        reporting.log_validation(trainer, self.session)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._leads() and self.session.ledger.history:
            checkpoint["lightning_hprune"] = LOAD_HINT  # for whoever opens the file: how to load it

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._leads():
            return
        extra = None if self.distiller is None else {"distillation": self.distiller.report()}
        if self._sharding is not None and self.session.ledger.records:
            with self._sharding.view(pl_module):  # measured and described on the gathered model
                self.session.attach(pl_module)
                done = reporting.finish(
                    trainer, self.session, pl_module, self.verbose, extra, self.png_figures
                )
        else:
            done = reporting.finish(trainer, self.session, pl_module, self.verbose, extra, self.png_figures)
        if done is not None:
            self.summary, self.report_table = done

    # ------------------------------------------------------------------ one event
    def _monitored(self, trainer: pl.Trainer) -> float | None:
        monitor = self.session.monitor
        if monitor is None:
            return None
        value = trainer.callback_metrics.get(monitor)
        if value is None:
            raise RuntimeError(
                f"{type(self).__name__}(monitor={monitor!r}) expected the metric {monitor!r} to be "
                f"logged before the pruning event at epoch {trainer.current_epoch}, but the logged metrics "
                f"are {sorted(trainer.callback_metrics)}. Log it with `self.log({monitor!r}, ...)` in "
                "a validation or training step, or fix the name."
            )
        return float(value)

    def _event(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One event, all or nothing: a failure at any stage (even an interrupt) leaves nothing changed."""
        session, strategy, sharding = self.session, trainer.strategy, self._sharding
        wrapper = strategy.model

        def restore_wrapper() -> None:
            strategy.model = wrapper  # still bound to the restored (original) parameters

        if self.distiller is not None:
            self.distiller.before_event(trainer, pl_module)  # the dense teacher, before the first event
        undo = [restore_wrapper]
        full = None
        if sharding is not None:
            # The snapshot holds the sharded model; the event runs on the gathered one and shards it again.
            sharding.settle(pl_module)
            undo.append(sharding.undo)
            full = sharding.full_model(pl_module, list(trainer.optimizers))
        snapshot = session.snapshot(pl_module, trainer.optimizers, on_restore=undo)
        try:
            with maybe(full), forward_failures(pl_module) as failures, eager():
                metric = self._monitored(trainer)
                self._attach(pl_module)
                if session.wants_sensitivity():
                    self._run_sensitivity(trainer)
                plan = session.plan(pl_module, metric)
                result = session.execute(
                    pl_module,
                    plan,
                    trainer.optimizers,
                    agree=lambda data: strategy.broadcast(data, src=0),
                    reduce=self._reduce(trainer),
                )
                self._rebind(trainer, pl_module, result.surgery)
                record, entry = session.record(
                    pl_module,
                    plan,
                    result,
                    trainer.current_epoch,
                    trainer.global_step,
                    metric,
                    trainer.max_epochs,
                )
                if self.distiller is not None:
                    self.distiller.after_event(pl_module, result.surgery)
                reporting.log_event(trainer, session, record, self.verbose)
                reporting.log_decision(trainer, session, entry, self.verbose)
        except BaseException as err:
            snapshot.restore()
            if not isinstance(err, Exception):
                raise  # KeyboardInterrupt, SystemExit: undone, then passed on
            where = describe_failure(pl_module, failing_module(err, failures))
            raise PruningError(
                f"{type(self).__name__}: the pruning event at epoch {trainer.current_epoch} failed "
                f"({type(err).__name__}: {err}).{where} The model, its optimizers (parameters and state), the "
                "LR schedulers and this callback are exactly as they were before the event: fix the cause, "
                "then go on or resume from the last checkpoint with `trainer.fit(..., ckpt_path=...)`."
            ) from err
        recompile(pl_module)

    def _judge(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Judge the last event after its recovery; returns whether a retry must run now."""
        session, strategy = self.session, trainer.strategy
        value = self._monitored(trainer)
        # Every process acts on rank 0's decision (the metric may not be synchronised across processes).
        verdict = session.judge(
            trainer.current_epoch,
            trainer.global_step,
            value,
            trainer.max_epochs,
            agree=lambda d: strategy.broadcast(d, src=0),
        )
        if verdict is None:
            return False
        if verdict.rolled_back:
            # The optimizers already point at the restored parameters; this re-wraps DDP around them.
            self._rebind(trainer, pl_module, ParameterSurgery())
            recompile(pl_module)
        for entry in verdict.entries:
            reporting.log_decision(trainer, session, entry, self.verbose)
        return verdict.retry_now

    @staticmethod
    def _reduce(trainer: pl.Trainer) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if trainer.world_size <= 1:
            return None
        strategy = trainer.strategy
        return lambda t: strategy.reduce(t, reduce_op="sum")

    def _run_sensitivity(self, trainer: pl.Trainer) -> None:
        """Run (or reuse from the log directory) the sensitivity analysis; every rank gets rank 0's."""
        session = self.session
        cfg = session.sensitivity
        assert cfg is not None
        assert session.graph is not None
        drops: dict[str, float] = {}
        if trainer.is_global_zero:
            log_dir = reporting.run_dir(trainer)
            batches = self._validation_batches(trainer, cfg.batches)
            evaluate = batch_metric(batches, cfg.metric)
            drops, reused = cached_sensitivity(
                os.path.join(log_dir, "hprune_sensitivity.json"),
                lambda: session.measure_sensitivity(
                    evaluate, progress=reporting.sensitivity_progress(trainer)
                ),
                cfg.settings(),
                [g.name for g in session.graph.groups()],
            )
            reporting.say(
                trainer,
                f"[hprune] sensitivity ({'reused from' if reused else 'measured, saved in'} {log_dir}): "
                + ", ".join(f"{k}={v:.4f}" for k, v in drops.items()),
            )
        session.use_sensitivity(trainer.strategy.broadcast(drops, src=0))

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
    def _rebind(self, trainer: pl.Trainer, pl_module: pl.LightningModule, surgery: ParameterSurgery) -> None:
        if self._sharding is not None:
            self._sharding.keep(surgery)  # the optimizers follow once the model is sharded again
            return
        live = list(pl_module.parameters())
        for opt in trainer.optimizers:
            for p in remap_optimizer(opt, surgery, live):
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r}, cost={self.cost!r}, levels={self.levels!r})"
