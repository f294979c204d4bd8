"""Pruning schedules as pure functions.

A schedule maps an event index ``k`` (0-based) and the number of events ``n`` to the *cumulative*
fraction of the final target reached after event ``k``. Every schedule is non-decreasing and reaches
exactly 1.0 at the last event, so the final reduction is the requested target.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from lightning_hprune.core.validation import check_positive

ScheduleFn = Callable[[int, int], float]


def _check_event(k: int, n: int) -> None:
    if n < 1:
        raise ValueError(f"Expected the number of events `n` to be >= 1, but got {n}.")
    if not 0 <= k < n:
        raise ValueError(f"Expected the event index `k` to be in [0, {n - 1}], but got {k}.")


def geometric(k: int, n: int, decay: float = 0.9) -> float:
    """Fine-tuning pruning: event ``k`` removes a share ``r_k = r_0 * decay**k`` of the target.

    ``r_0`` is chosen so that the shares sum to one over ``n`` events; ``decay=1`` is linear.
    """
    _check_event(k, n)
    check_positive("decay", decay)
    if decay == 1.0:
        return (k + 1) / n
    return (1.0 - decay ** (k + 1)) / (1.0 - decay**n)


def cubic(k: int, n: int) -> float:
    """Zhu & Gupta's gradual schedule: ``1 - (1 - t)**3`` with ``t = (k + 1) / n``."""
    _check_event(k, n)
    t = (k + 1) / n
    return 1.0 - (1.0 - t) ** 3


def linear(k: int, n: int) -> float:
    """Equal shares of the target at every event."""
    _check_event(k, n)
    return (k + 1) / n


def constant(k: int, n: int) -> float:
    """One-shot: the whole target at the first event; later events keep it."""
    _check_event(k, n)
    return 1.0


def event_shares(schedule: ScheduleFn, n: int) -> list[float]:
    """Per-event increments of ``schedule`` (useful for logs and plots)."""
    out, prev = [], 0.0
    for k in range(n):
        cur = schedule(k, n)
        out.append(cur - prev)
        prev = cur
    return out


SCHEDULES: dict[str, ScheduleFn] = {
    "geometric": geometric,
    "cubic": cubic,
    "linear": linear,
    "constant": constant,
    "oneshot": constant,
}


def resolve_schedule(schedule: str | Callable[..., float], decay: float = 0.9) -> ScheduleFn:
    """Turn the user's ``schedule`` argument into a ``(k, n) -> cumulative fraction`` function.

    A callable of one argument (the event index) is accepted too; its value is clipped to [0, 1] and
    the last event always completes the target.
    """
    check_positive("decay", decay)
    if decay > 1.0:
        raise ValueError(f"Expected argument `decay` to be a float in (0, 1], but got {decay!r}.")
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(
                f"Expected argument `schedule` to be one of {sorted(SCHEDULES)} or a callable of the event"
                f" index, but got {schedule!r}."
            )
        if schedule == "geometric":
            return functools.partial(geometric, decay=decay)  # picklable (ddp_spawn, deepcopy)
        return SCHEDULES[schedule]
    if callable(schedule):
        user = schedule

        def wrapped(k: int, n: int) -> float:
            _check_event(k, n)
            if k == n - 1:
                return 1.0
            return min(1.0, max(0.0, float(user(k))))

        return wrapped
    raise ValueError(
        f"Expected argument `schedule` to be one of {sorted(SCHEDULES)} or a callable of the event index,"
        f" but got {schedule!r} ({type(schedule).__name__})."
    )
