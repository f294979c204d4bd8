"""``ClosedLoop``: automatic adjustment of the pruning rate from the monitored metric.

After each event and its recovery epoch(s), the monitored value is compared with its value before the
first event (see :func:`~lightning_hprune.core.adjust.decide`): within ``max_drop`` pruning goes on (faster
with ``speed_up`` when the metric holds comfortably); beyond it the event is rolled back (model, optimizer
state, the ledger and the criterion's statistics, from a CPU copy taken just before the event) and retried
with a smaller step; after ``max_retries`` failed retries in a row, pruning stops.

This object holds the loop's settings and its own state (rate, retries, stopped, the pending check and the
rollback point); the session drives it. It never touches a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_hprune.core.adjust import AdjustConfig, Decision, decide, next_fraction
from lightning_hprune.core.undo import Snapshot


@dataclass(frozen=True)
class PendingCheck:
    """An event waiting to be judged at the end of ``check_epoch``."""

    event: int
    epoch: int
    check_epoch: int


class ClosedLoop:
    """Roll back and slow down when the monitored metric drops too far (needs the callback's ``monitor``).

    Args:
        max_drop: the largest tolerated drop of ``monitor`` relative to its value before the first event
            (0.01 = 1 %), in (0, 1). The direction comes from the callback's ``mode``.
        max_retries: failed retries in a row after which pruning stops (rolled back to the last good model).
        back_off: step multiplier applied after each rollback, in (0, 1).
        speed_up: step multiplier applied when the drop stays under ``comfort * max_drop`` (1 = never).
        max_rate: the step multiplier never exceeds this (>= 1).
        comfort: see ``speed_up``, in (0, 1).

    Example::

        HierarchicalPruning(target=0.5, monitor="val_acc", closed_loop=ClosedLoop(max_drop=0.01))

    """

    def __init__(
        self,
        max_drop: float = 0.01,
        max_retries: int = 2,
        back_off: float = 0.5,
        speed_up: float = 1.0,
        max_rate: float = 2.0,
        comfort: float = 0.5,
    ) -> None:
        # validates every argument with the uniform messages
        AdjustConfig(max_drop, max_retries, back_off, speed_up, max_rate, comfort)
        self.max_drop = float(max_drop)
        self.max_retries = int(max_retries)
        self.back_off = float(back_off)
        self.speed_up = float(speed_up)
        self.max_rate = float(max_rate)
        self.comfort = float(comfort)
        self.rate = 1.0
        self.retries = 0
        self.stopped = False
        self.pending: PendingCheck | None = None
        self._point: Snapshot | None = None

    def config(self, mode: str) -> AdjustConfig:
        """The settings as the pure decision function takes them."""
        return AdjustConfig(
            self.max_drop, self.max_retries, self.back_off, self.speed_up, self.max_rate, self.comfort, mode
        )

    # ------------------------------------------------------------------ planning
    def aim(self, fractions: Sequence[float], achieved: float, target: float) -> list[float]:
        """Scale the levels' scheduled cumulative fractions: the event goes ``rate`` times the way."""
        planned = sum(fractions)
        if planned <= 0:
            return list(fractions)
        aim = next_fraction(achieved, planned, self.rate, target)
        return [f * aim / planned for f in fractions]

    def keep(self, point: Snapshot) -> None:
        """Keep the rollback point of the event about to run (the previous one is released first)."""
        self._point = None
        self._point = point

    # ------------------------------------------------------------------ after an event
    def schedule_check(self, event: int, epoch: int, every_n_epochs: int, max_epochs: int | None) -> str:
        """Plan the check of ``event`` after its recovery epoch(s); returns a sentence for the decision log."""
        check = epoch + every_n_epochs
        if max_epochs is not None and max_epochs >= 0:
            check = min(check, max_epochs - 1)
        if check <= epoch:
            self.pending, self._point = None, None
            return "no epoch left to check it against max_drop"
        self.pending = PendingCheck(event=event, epoch=epoch, check_epoch=check)
        return f"checked at the end of epoch {check}"

    def due(self, epoch: int) -> PendingCheck | None:
        """The pending check, when it is due at the end of ``epoch``."""
        if self.pending is None or epoch < self.pending.check_epoch:
            return None
        return self.pending

    def judge(self, baseline: float, value: float, mode: str) -> tuple[Decision, Snapshot | None]:
        """Decide about the pending event; update the rate, retries and ``stopped``.

        Returns:
            The decision, and the rollback point to restore when it rolls back (``None`` when there is
            none: resumed from a checkpoint, which does not hold the CPU copy; the loop then stops).

        """
        decision = decide(baseline, value, self.config(mode), self.rate, self.retries)
        return self.apply(decision)

    def apply(self, decision: Decision) -> tuple[Decision, Snapshot | None]:
        """Apply a decision (possibly made on another process) to the loop's state."""
        point = self._point if decision.roll_back else None
        self.pending, self._point = None, None
        if decision.roll_back and point is None:
            self.stopped = True
            return decision, None
        self.rate, self.retries = decision.rate, decision.retries
        if decision.action == "stop":
            self.stopped = True
        return decision, point

    def stop(self) -> None:
        """Stop pruning for good."""
        self.stopped = True

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Rate, retries, stopped and the pending check (the CPU rollback point is not checkpointed)."""
        pending = self.pending
        return {
            "rate": self.rate,
            "retries": self.retries,
            "stopped": self.stopped,
            "pending_check": None
            if pending is None
            else {"event": pending.event, "epoch": pending.epoch, "check_epoch": pending.check_epoch},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; any rollback point held is released (a checkpoint holds none)."""
        self._point = None
        self.rate = float(state.get("rate", 1.0))
        self.retries = int(state.get("retries", 0))
        self.stopped = bool(state.get("stopped", False))
        pending = state.get("pending_check")
        self.pending = None if pending is None else PendingCheck(**{k: int(v) for k, v in pending.items()})

    def __getstate__(self) -> dict[str, Any]:
        # A rollback point is a runtime copy of a model: never pickled or deep-copied.
        state = self.__dict__.copy()
        state["_point"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_drop={self.max_drop!r}, max_retries={self.max_retries!r}, "
            f"back_off={self.back_off!r}, speed_up={self.speed_up!r}, max_rate={self.max_rate!r}, "
            f"comfort={self.comfort!r})"
        )
