"""Automatic adjustment (the closed loop) of a :class:`~lightning_hprune.callbacks.base.PruningCallback`.

With ``max_drop``, every event is checked after its recovery epoch(s) and rolled back (model + optimizer
state, kept on the CPU) when the monitored metric fell too far; the pruning rate then backs off (or speeds
up after good events). The decisions themselves are made by :mod:`lightning_hprune.core.adjust`; these
functions apply them to a callback, its Trainer and its module. Without ``max_drop`` only the routine
``pruned`` decisions are recorded.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_hprune.core.adjust import DECISION_CODES, decide, next_fraction
from lightning_hprune.core.engine import EventResult
from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.optim_state import ParameterSurgery
from lightning_hprune.core.rollback import RollbackPoint

if TYPE_CHECKING:
    from lightning_hprune.callbacks.base import PruningCallback


def adjusted_fractions(callback: PruningCallback, fractions: list[float], achieved: float) -> list[float]:
    """Scale the levels' cumulative fractions: the event goes ``rate`` times the way to the schedule.

    Args:
        callback: The pruning callback.
        fractions: The levels' scheduled cumulative fractions of the cost for this event.
        achieved: The fraction of the cost removed so far.

    Returns:
        The fractions, unchanged when the closed loop is off.

    """
    planned = sum(fractions)
    if callback._adjust is None or planned <= 0:
        return fractions
    aim = next_fraction(achieved, planned, callback.rate, callback.target)
    return [f * aim / planned for f in fractions]


def save_rollback_point(
    callback: PruningCallback, trainer: pl.Trainer, pl_module: pl.LightningModule, graph: PruningGraph
) -> None:
    """Keep a CPU copy of the state before an event, for :func:`roll_back` (closed loop only).

    Args:
        callback: The pruning callback.
        trainer: The Trainer whose optimizers are saved.
        pl_module: The module about to be pruned.
        graph: The module's dependency graph (its history is saved).

    """
    if callback._adjust is None:
        return
    callback._rollback = None  # free the previous copy first
    callback._rollback = RollbackPoint(
        pl_module,
        trainer.optimizers,
        graph.history,
        extra={
            "records": len(callback.records),
            "importance": callback.importance.state_dict(),
            "calibration": list(callback.calibration),
        },
    )


def after_event(callback: PruningCallback, trainer: pl.Trainer, k: int) -> None:
    """Record the ``pruned`` decision of event ``k`` and, in closed loop, schedule its check.

    Args:
        callback: The pruning callback.
        trainer: The Trainer.
        k: The index of the event that just ran.

    """
    record = callback.records[-1] if callback.records else {}
    removed = float(record.get("removed", math.nan))
    reason = f"event {k}: {removed:.1%} of {callback.cost} removed so far (rate {callback.rate:.3g})"
    if callback._adjust is None:
        record_decision(callback, trainer, "pruned", reason, event=k)
        return
    epoch = trainer.current_epoch
    check = epoch + callback.every_n_epochs
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        check = min(check, trainer.max_epochs - 1)
    if check <= epoch:
        callback._pending_check, callback._rollback = None, None
        reason += "; no epoch left to check it against max_drop"
    else:
        callback._pending_check = {"event": k, "epoch": epoch, "check_epoch": check}
        reason += f"; {callback.monitor} is checked at the end of epoch {check}"
    record_decision(callback, trainer, "pruned", reason, event=k)


def check_adjustment(callback: PruningCallback, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Judge the last event once its recovery is over; roll back when needed.

    Args:
        callback: The pruning callback.
        trainer: The Trainer (its ``callback_metrics`` hold the monitored metric).
        pl_module: The pruned module.

    Returns:
        True when a retry must run now (the rollback happened after the last scheduled event).

    """
    pending = callback._pending_check
    epoch = trainer.current_epoch
    if callback._adjust is None or pending is None or epoch < pending["check_epoch"]:
        return False
    callback._pending_check = None
    value = callback._monitored(trainer)
    assert value is not None
    baseline = callback.baseline.get("metric", value)
    # Every process acts on rank 0's decision (the metric may not be synchronised across processes).
    decision = trainer.strategy.broadcast(
        decide(baseline, value, callback._adjust, callback.rate, callback.retries), src=0
    )
    fields = {"event": pending["event"], "value": value, "drop": decision.drop, "bound": decision.bound}
    if decision.roll_back:
        if callback._rollback is None:
            callback.stopped = True
            record_decision(
                callback,
                trainer,
                "stop",
                f"{callback.monitor}={value:.4g} dropped {decision.drop:.2%} (> max_drop "
                f"{callback._adjust.max_drop:.2%}), but the state before event {pending['event']} is not available (resumed from a "
                "checkpoint, and the CPU copy is not checkpointed): stopped pruning",
                **fields,
            )
            return False
        undone = roll_back(callback, trainer, pl_module)
        fields["undone_removed"] = float(undone.get("removed", math.nan)) if undone else math.nan
    callback._rollback = None
    callback.rate, callback.retries = decision.rate, decision.retries
    if decision.action == "stop":
        callback.stopped = True
    record_decision(callback, trainer, decision.action, decision.reason, **fields)
    if callback.event_index < callback.num_events:
        return False  # the schedule goes on: its next event (maybe this epoch's) is the retry
    room = trainer.max_epochs is None or trainer.max_epochs < 0 or epoch + 1 < trainer.max_epochs
    if decision.action != "roll_back":
        # Past the schedule, short of the target because of rollbacks: catch up while epochs remain.
        last = callback.records[-1] if callback.records else {}
        short = float(last.get("removed", 1.0)) < callback.target - callback.tolerance
        return room and short and float(last.get("event_ratio", 0.0)) > 0
    if room:
        return True
    callback.stopped = True
    record_decision(callback, trainer, "stop", "rolled back at the last epoch: no epoch left to retry")
    return False


def roll_back(
    callback: PruningCallback, trainer: pl.Trainer, pl_module: pl.LightningModule
) -> dict[str, Any]:
    """Restore the model, the optimizers, the history, the records and the criterion's statistics.

    Args:
        callback: The pruning callback (its rollback point must be set).
        trainer: The Trainer whose optimizers are restored.
        pl_module: The module to restore.

    Returns:
        The record of the event that was undone (empty when there is none).

    """
    point = callback._rollback
    assert point is not None
    assert callback._graph is not None
    point.restore(callback._graph.history)
    callback._graph.rebuild()
    n_records = int(point.extra["records"])
    undone = callback.records[n_records] if len(callback.records) > n_records else {}
    del callback.records[n_records:]
    callback.importance.reset()
    callback.importance.load_state_dict(point.extra["importance"])
    if not callback.calibration:
        callback.calibration = list(point.extra["calibration"])
    # The optimizers already point at the restored parameters; this re-wraps DDP around them.
    callback._rebind(trainer, pl_module, EventResult(levels=[], surgery=ParameterSurgery(), seconds=0.0))
    return undone


def record_decision(
    callback: PruningCallback, trainer: pl.Trainer, action: str, reason: str, **fields: Any
) -> None:
    """Append a decision to ``callback.decisions``, log it and, when it matters, print it.

    Args:
        callback: The pruning callback.
        trainer: The Trainer whose loggers receive ``hprune/decision``, ``hprune/rate`` (and ``hprune/drop``).
        action: One of :data:`~lightning_hprune.core.adjust.DECISION_CODES`.
        reason: Why, in words.
        **fields: Further entries of the decision (event, value, drop, bound, ...).

    """
    entry: dict[str, Any] = {
        "action": action,
        "code": DECISION_CODES[action],
        "reason": reason,
        "epoch": trainer.current_epoch,
        "step": trainer.global_step,
        "rate": callback.rate,
        **fields,
    }
    callback.decisions.append(entry)
    metrics = {"hprune/decision": float(entry["code"]), "hprune/rate": float(callback.rate)}
    if "drop" in fields and math.isfinite(fields["drop"]):
        metrics["hprune/drop"] = float(fields["drop"])
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    # The event line already says what was pruned: a routine decision is printed only in closed loop.
    if action in ("roll_back", "stop", "speed_up") or (callback.verbose and callback.max_drop is not None):
        rank_zero_info(f"[hprune] decision at epoch {trainer.current_epoch}: {action} - {reason}")


def adjust_state(callback: PruningCallback) -> dict[str, Any]:
    """The closed loop's checkpointed state (the ``"adjust"`` entry of the callback's state dict).

    Args:
        callback: The pruning callback.

    Returns:
        Plain data: rate, retries, stopped, decisions and the pending check.

    """
    return {
        "rate": callback.rate,
        "retries": callback.retries,
        "stopped": callback.stopped,
        "decisions": [dict(d) for d in callback.decisions],
        "pending_check": None if callback._pending_check is None else dict(callback._pending_check),
    }


def load_adjust_state(callback: PruningCallback, state: dict[str, Any]) -> None:
    """Restore what :func:`adjust_state` returned (the rollback point is not checkpointed: it is dropped).

    Args:
        callback: The pruning callback.
        state: The ``"adjust"`` entry of a state dict (may be empty).

    """
    callback.rate = float(state.get("rate", 1.0))
    callback.retries = int(state.get("retries", 0))
    callback.stopped = bool(state.get("stopped", False))
    callback.decisions = [dict(d) for d in state.get("decisions", [])]
    pending = state.get("pending_check")
    callback._pending_check = None if pending is None else {str(k): int(v) for k, v in pending.items()}
    callback._rollback = None  # the CPU copy is not checkpointed
