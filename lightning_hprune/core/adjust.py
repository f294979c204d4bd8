"""The closed loop's decision: keep going, go faster, roll back and retry slower, or stop.

Pure logic (no Lightning, no model): after an event and its recovery epoch(s), the monitored value is
compared with its value before the first event. The *drop* is relative to that baseline
(``(baseline - value) / |baseline|`` for ``mode="max"`` metrics such as accuracy, the opposite for
``mode="min"`` metrics such as a loss). Within ``max_drop`` the pruning continues, and when the metric
holds comfortably (drop at most ``comfort * max_drop``) the next steps may grow by ``speed_up`` up to
``max_rate``. Beyond ``max_drop`` the last event is rolled back and retried with its step multiplied by
``back_off``; after ``max_retries`` consecutive failed retries pruning stops (also rolled back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_hprune.core.validation import check_choice, check_fraction, check_int, check_positive

#: Numeric codes logged as ``hprune/decision``.
DECISION_CODES: dict[str, int] = {"pruned": 0, "continue": 1, "speed_up": 2, "roll_back": 3, "stop": 4}


@dataclass(frozen=True)
class AdjustConfig:
    """Settings of the closed loop.

    Attributes:
        max_drop: largest tolerated relative drop of the monitored value, in (0, 1).
        max_retries: failed retries (in a row) after which pruning stops.
        back_off: factor applied to the rate after a rollback, in (0, 1).
        speed_up: factor applied to the rate when the metric holds comfortably (1 disables).
        max_rate: the rate never exceeds this.
        comfort: "comfortably" means a drop of at most ``comfort * max_drop``, in (0, 1).
        mode: ``"max"`` when higher is better (accuracy), ``"min"`` when lower is better (loss).

    """

    max_drop: float
    max_retries: int = 2
    back_off: float = 0.5
    speed_up: float = 1.0
    max_rate: float = 2.0
    comfort: float = 0.5
    mode: str = "max"

    def __post_init__(self) -> None:
        check_fraction("max_drop", self.max_drop)
        check_int("max_retries", self.max_retries, minimum=0)
        check_fraction("back_off", self.back_off)
        check_positive("speed_up", self.speed_up)
        if self.speed_up < 1.0:
            raise ValueError(f"Expected argument `speed_up` to be a number >= 1, but got {self.speed_up!r}.")
        check_positive("max_rate", self.max_rate)
        if self.max_rate < 1.0:
            raise ValueError(f"Expected argument `max_rate` to be a number >= 1, but got {self.max_rate!r}.")
        check_fraction("comfort", self.comfort)
        check_choice("mode", self.mode, ("max", "min"))


@dataclass(frozen=True)
class Decision:
    """One decision of the closed loop.

    Attributes:
        action: ``"continue"``, ``"speed_up"``, ``"roll_back"`` or ``"stop"``.
        reason: a sentence for the logs.
        rate: the step multiplier for the next events.
        retries: failed retries in a row after this decision.
        drop: the relative drop that was measured.
        bound: the lowest (``mode="max"``) or highest (``mode="min"``) acceptable value.

    """

    action: str
    reason: str
    rate: float
    retries: int
    drop: float
    bound: float

    @property
    def code(self) -> int:
        """The numeric code logged as ``hprune/decision``."""
        return DECISION_CODES[self.action]

    @property
    def roll_back(self) -> bool:
        """Whether the model must go back to its state before the last event."""
        return self.action in ("roll_back", "stop")


def relative_drop(baseline: float, value: float, mode: str = "max") -> float:
    """How much worse ``value`` is than ``baseline``, as a fraction of ``|baseline|`` (negative = better).

    A non-finite ``value`` is an infinite drop.
    """
    if not math.isfinite(value):
        return math.inf
    scale = abs(baseline) if baseline != 0 else 1.0
    worse = baseline - value if mode == "max" else value - baseline
    return worse / scale


def bound_of(baseline: float, max_drop: float, mode: str = "max") -> float:
    """The acceptable limit of the monitored value."""
    scale = abs(baseline) if baseline != 0 else 1.0
    return baseline - max_drop * scale if mode == "max" else baseline + max_drop * scale


def decide(
    baseline: float, value: float, config: AdjustConfig, rate: float = 1.0, retries: int = 0
) -> Decision:
    """Decide what to do after an event's recovery.

    Args:
        baseline: the monitored value before the first event.
        value: the monitored value now.
        config: the loop's settings.
        rate: the current step multiplier.
        retries: failed retries in a row so far.

    Returns:
        The decision, with the rate and retry count to use from now on.

    """
    drop = relative_drop(baseline, value, config.mode)
    limit = bound_of(baseline, config.max_drop, config.mode)
    seen = f"{value:.4g} vs. {baseline:.4g} before pruning: drop {drop:.2%}"
    if drop > config.max_drop:
        if retries >= config.max_retries:
            return Decision(
                action="stop",
                reason=(
                    f"{seen} > max_drop {config.max_drop:.2%} after {retries} failed "
                    f"retr{'y' if retries == 1 else 'ies'} (max_retries={config.max_retries}): rolled back "
                    "to the last accepted model and stopped pruning"
                ),
                rate=rate,
                retries=retries,
                drop=drop,
                bound=limit,
            )
        new_rate = rate * config.back_off
        return Decision(
            action="roll_back",
            reason=(
                f"{seen} > max_drop {config.max_drop:.2%}: rolled back the last event; rate "
                f"{rate:.3g} -> {new_rate:.3g} (retry {retries + 1}/{config.max_retries})"
            ),
            rate=new_rate,
            retries=retries + 1,
            drop=drop,
            bound=limit,
        )
    if config.speed_up > 1.0 and drop <= config.comfort * config.max_drop and rate < config.max_rate:
        new_rate = min(config.max_rate, rate * config.speed_up)
        return Decision(
            action="speed_up",
            reason=(
                f"{seen} <= {config.comfort:.0%} of max_drop {config.max_drop:.2%}: rate {rate:.3g} -> "
                f"{new_rate:.3g}"
            ),
            rate=new_rate,
            retries=0,
            drop=drop,
            bound=limit,
        )
    return Decision(
        action="continue",
        reason=f"{seen} within max_drop {config.max_drop:.2%}: keep the rate {rate:.3g}",
        rate=rate,
        retries=0,
        drop=drop,
        bound=limit,
    )


def next_fraction(achieved: float, scheduled: float, rate: float, target: float) -> float:
    """The cumulative fraction the next event aims at: ``rate`` times the way to the schedule, capped.

    With ``rate=1`` it is the schedule's own value; a lower rate closes only part of the gap (later events
    catch up), a higher one goes further, never beyond ``target`` and never below what is ``achieved``.
    """
    return min(target, max(achieved, achieved + rate * (scheduled - achieved)))
