"""``HierarchicalPruning``: structured pruning during ``Trainer.fit``, coarse to fine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lightning_hprune.callbacks.base import PruningCallback
from lightning_hprune.core.importance import Importance
from lightning_hprune.core.levels import GlobalLevel, Level


class HierarchicalPruning(PruningCallback):
    """Physically prune a model while it trains: fewer channels, parameters and MACs, same output shape.

    At the end of selected training epochs (``start_epoch`` to ``end_epoch``, every ``every_n_epochs``), a
    pruning event removes a share of the model's cost; training in between recovers. The cumulative removed
    fraction follows ``schedule`` and reaches ``target`` at the last event. Each event runs ``levels`` in
    order (coarse to fine); each level takes its ``share`` of the event's reduction.

    Args:
        target: fraction of the model's cost to remove by the end, in (0, 1).
        cost: ``"macs"`` (multiply-accumulates of one forward pass) or ``"params"``.
        levels: the hierarchy, coarse to fine (default: one global channel level).
        schedule: ``"geometric"`` (each event removes ``r_k = r_0 * decay**k`` of the target), ``"cubic"``,
            ``"linear"``, ``"constant"`` (one-shot), or a callable of the event index returning the cumulative
            fraction of the target.
        decay: the geometric schedule's decay, in (0, 1].
        start_epoch: first epoch at whose end an event happens.
        end_epoch: last event epoch (default: half of ``max_epochs``, leaving the rest for recovery).
        every_n_epochs: epochs between events.
        importance: the criterion (an ``Importance`` object, or ``"l1"``, ``"l2"``, ``"random"``).
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
        )
        if levels is None:
            levels = [GlobalLevel()]
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
