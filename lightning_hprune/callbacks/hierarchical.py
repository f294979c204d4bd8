"""``HierarchicalPruning``: structured pruning during ``Trainer.fit``, coarse to fine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lightning_hprune.callbacks.base import PruningCallback
from lightning_hprune.core.blocks import BlockLevel
from lightning_hprune.core.importance import Importance
from lightning_hprune.core.levels import GlobalLevel, Level
from lightning_hprune.core.sensitivity import SensitivityAnalysis


def default_levels() -> list[Level]:
    """The default hierarchy, coarse to fine, for CNNs and transformers alike.

    1. :class:`~lightning_hprune.core.blocks.BlockLevel` (a quarter of the target): whole residual blocks or
       encoder layers that barely change their input go first. Models without such blocks skip it, and its
       share falls to the next level.
    2. :class:`~lightning_hprune.core.levels.GlobalLevel` (the rest): channels ranked across the whole
       network, scores normalised per layer, no layer losing more than 80 % of its width.
    """
    return [BlockLevel(share=0.25), GlobalLevel(share=0.75)]


class HierarchicalPruning(PruningCallback):
    """Physically prune a model while it trains: fewer channels, parameters and MACs, same output shape.

    At the end of selected training epochs (``start_epoch`` to ``end_epoch``, every ``every_n_epochs``), a
    pruning event removes a share of the model's cost; training in between recovers. The cumulative removed
    fraction follows ``schedule`` and reaches ``target`` at the last event. Each event runs ``levels`` in
    order (coarse to fine); each level removes what it still owes of its ``share`` of the target (so a coarse
    level that cannot act at one event, e.g. because no whole block fits yet, catches up later) and the last
    level always brings the model to the event's overall target.

    Args:
        target: fraction of the model's cost to remove by the end, in (0, 1).
        cost: ``"macs"`` (multiply-accumulates of one forward pass) or ``"params"``.
        levels: the hierarchy, coarse to fine; each level owes its ``share`` of the target (shares are
            normalised) on its own ``schedule`` or the callback's. Default: :func:`default_levels`.
        schedule: ``"geometric"`` (each event removes ``r_k = r_0 * decay**k`` of the target), ``"cubic"``,
            ``"linear"``, ``"constant"`` (one-shot), or a callable of the event index returning the cumulative
            fraction of the target.
        decay: the geometric schedule's decay, in (0, 1].
        start_epoch: first epoch at whose end an event happens.
        end_epoch: last event epoch (default: half of ``max_epochs``, leaving the rest for recovery).
        every_n_epochs: epochs between events.
        importance: the criterion: an ``Importance`` object, or ``"l1"``, ``"l2"``, ``"taylor"``,
            ``"activation"``, ``"apoz"``, ``"activation_weighted"``, ``"bn_scale"``, ``"random"`` (see ``docs/criteria.md``).
        round_to: kept widths are multiples of this (hardware alignment; 1 disables).
        ignored_layers: module-name glob patterns whose output width must not change. Layers producing the
            model's outputs are always kept.
        monitor: a logged metric (e.g. ``"val_acc"``) reported with its ratio to its value before pruning.
        measure_latency: measure forward latency at each event (CPU or GPU, wherever the model is).
        latency_batch_size: batch size of the latency measurement.
        tolerance: stop a level when within this fraction of the dense cost above its target.
        calibration_batches: training batches kept (on the CPU) during event epochs for data-driven levels
            and criteria.
        verbose: print one line per event and a before/after table at the end.
        max_drop: turn on the closed loop: the largest tolerated drop of ``monitor`` relative to its value
            before the first event (0.01 = 1 %). After each event's recovery epoch(s) (``every_n_epochs``),
            a larger drop rolls the event back (model and optimizer state, saved on the CPU) and retries with
            a smaller step. Needs ``monitor``. See ``docs/criteria.md``.
        max_retries: failed retries in a row after which pruning stops (rolled back to the last good model).
        back_off: step multiplier applied after each rollback, in (0, 1).
        speed_up: step multiplier applied when the drop stays under half of ``max_drop`` (1 = never; the
            step never exceeds twice the schedule's).
        mode: ``"max"`` if higher ``monitor`` values are better (accuracy), ``"min"`` otherwise (loss).
        sensitivity: a :class:`~lightning_hprune.core.sensitivity.SensitivityAnalysis` run once before the
            first event; its per-layer sensitivities go to every ``LayerLevel`` given no ratios.

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[HierarchicalPruning(target=0.5, monitor="val_acc")])
        trainer.fit(model, datamodule)

    """

    def __init__(
        self,
        target: float = 0.5,
        cost: str = "macs",
        levels: Sequence[Level] | None = None,
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
        super().__init__(
            target=target,
            cost=cost,
            schedule=schedule,
            decay=decay,
            start_epoch=start_epoch,
            end_epoch=end_epoch,
            every_n_epochs=every_n_epochs,
            importance=importance,
            round_to=round_to,
            ignored_layers=ignored_layers,
            monitor=monitor,
            measure_latency=measure_latency,
            latency_batch_size=latency_batch_size,
            tolerance=tolerance,
            calibration_batches=calibration_batches,
            verbose=verbose,
            max_drop=max_drop,
            max_retries=max_retries,
            back_off=back_off,
            speed_up=speed_up,
            mode=mode,
            sensitivity=sensitivity,
        )
        if levels is None:
            levels = default_levels()
        levels = list(levels)
        if not levels or not all(isinstance(lv, Level) for lv in levels):
            raise ValueError(
                f"Expected argument `levels` to be a non-empty list of `Level` objects, but got {levels!r}."
            )
        self.levels = levels

    def levels_for_event(self) -> list[Level]:
        """The configured levels, coarse to fine."""
        return self.levels

    def __repr__(self) -> str:
        args: dict[str, Any] = {"target": self.target, "cost": self.cost, "levels": self.levels}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())})"
