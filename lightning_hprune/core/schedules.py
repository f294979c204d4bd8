"""Pruning schedules as pure functions.

A schedule maps an event index ``k`` (0-based) and the number of events ``n`` to the *cumulative*
fraction of the final target reached after event ``k``. Every schedule is non-decreasing and reaches
exactly 1.0 at the last event, so the final reduction is the requested target.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_hprune.core.validation import check_int, check_positive

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


def share_fractions(
    shares: Sequence[tuple[float, str | None]],
    target: float,
    k: int,
    n: int,
    default: ScheduleFn,
    decay: float,
) -> list[float]:
    """Cumulative fraction of the dense cost each level should have removed after event ``k`` of ``n``.

    Level ``j`` with ``(share_j, schedule_j)`` is responsible for ``target * share_j / sum(shares)`` of the
    dense cost, reached on its own schedule (``schedule_j``, a name) or on ``default``. The fractions sum to
    ``target`` at the last event.
    """
    total = sum(s for s, _ in shares)
    out = []
    for share, own in shares:
        fn = default if own is None else resolve_schedule(own, decay)
        out.append(target * share / total * fn(k, n))
    return out


class EventSchedule:
    """When pruning events happen and how much of the target each level owes after each.

    Events happen at the end of epochs ``start_epoch, start_epoch + every_n_epochs, ...`` up to
    ``end_epoch``. The schedule keeps its place (``position``: events run so far) and the end epoch it
    resolved, both checkpointed, so a fit resumed in chunks (``max_epochs=2``, then ``fit(ckpt_path=...)``
    with ``max_epochs=6``) continues the same schedule.

    Args:
        start_epoch: first epoch at whose end an event happens.
        end_epoch: last event epoch (``None``: resolved from ``max_epochs`` by :meth:`resolve`).
        every_n_epochs: epochs between events.
        schedule: ``"geometric"``, ``"cubic"``, ``"linear"``, ``"constant"`` or a callable of the event
            index returning the cumulative fraction of the target (see :func:`resolve_schedule`).
        decay: the geometric schedule's decay.

    """

    def __init__(
        self,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        every_n_epochs: int = 1,
        schedule: str | Callable[..., float] = "geometric",
        decay: float = 0.9,
    ) -> None:
        self.start_epoch = check_int("start_epoch", start_epoch, minimum=0)
        self.end_epoch = check_int("end_epoch", end_epoch, minimum=0, allow_none=True)
        if self.end_epoch is not None and self.end_epoch < self.start_epoch:
            raise ValueError(
                f"Expected argument `end_epoch` to be >= `start_epoch` ({start_epoch}), but got {end_epoch}."
            )
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, minimum=1)
        self.fn = resolve_schedule(schedule, decay)
        self.schedule = schedule
        self.decay = float(decay)
        #: The end epoch in use (the argument, or the one resolved from ``max_epochs``).
        self.last_epoch: int | None = self.end_epoch
        #: Events run so far (a rolled-back event counts: the schedule moves on, the closed loop retries).
        self.position = 0

    def resolve(self, max_epochs: int | None) -> str | None:
        """Fix the end epoch for a fit of ``max_epochs`` epochs; returns a warning, if any.

        Without ``end_epoch``, events span the first half of training (the second half recovers). An
        ``end_epoch`` at or past ``max_epochs`` is allowed (training in chunks): the rest of the schedule runs
        when the fit is resumed with more epochs.

        Raises:
            ValueError: no ``end_epoch`` and no ``max_epochs`` to derive it from.

        """
        if self.end_epoch is None:
            if self.last_epoch is not None:
                return None  # resolved by an earlier fit (restored from a checkpoint): keep it
            if max_epochs is None or max_epochs < 0:
                raise ValueError(
                    "Expected `end_epoch` to be set when the Trainer has no `max_epochs`, but got "
                    f"end_epoch=None and max_epochs={max_epochs}."
                )
            self.last_epoch = max(self.start_epoch, (max_epochs - 1) // 2)
            return None
        self.last_epoch = self.end_epoch
        if max_epochs is not None and 0 <= max_epochs <= self.end_epoch:
            done = self.events_before(max_epochs)
            return (
                f"the fit ends after epoch {max_epochs - 1}, before the schedule's last event (end of epoch "
                f"{self.end_epoch}): {done} of {self.num_events} events run in this fit. Resume with "
                f"`trainer.fit(..., ckpt_path=...)` and max_epochs > {self.end_epoch} to finish the schedule "
                "and reach the target, with epochs left to recover."
            )
        return None

    @property
    def num_events(self) -> int:
        """Number of events of the schedule."""
        end = self.last_epoch if self.last_epoch is not None else self.start_epoch
        return (end - self.start_epoch) // self.every_n_epochs + 1

    def is_event_epoch(self, epoch: int) -> bool:
        """Whether a scheduled event happens at the end of ``epoch``."""
        end = self.last_epoch if self.last_epoch is not None else self.start_epoch
        return self.start_epoch <= epoch <= end and (epoch - self.start_epoch) % self.every_n_epochs == 0

    def events_before(self, epoch: int) -> int:
        """Scheduled events at the ends of epochs ``< epoch``."""
        return sum(1 for e in range(min(epoch, (self.last_epoch or 0) + 1)) if self.is_event_epoch(e))

    @property
    def finished(self) -> bool:
        """Whether every scheduled event has run."""
        return self.position >= self.num_events

    def fraction(self, k: int) -> float:
        """Cumulative fraction of the target after event ``k`` (past the end: 1)."""
        return self.fn(min(k, self.num_events - 1), self.num_events)

    def level_fractions(
        self, shares: Sequence[tuple[float, str | None]], target: float, k: int
    ) -> list[float]:
        """:func:`share_fractions` after event ``k`` of this schedule (past its end: the final fractions)."""
        n = self.num_events
        return share_fractions(shares, target, min(k, n - 1), n, self.fn, self.decay)

    def advance(self) -> None:
        """One more event has run."""
        self.position += 1

    def state_dict(self) -> dict[str, Any]:
        """The position and the resolved end epoch."""
        return {"position": self.position, "end_epoch": self.last_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; an ``end_epoch`` given to the constructor wins over the saved one."""
        self.position = int(state.get("position", 0))
        saved = state.get("end_epoch")
        if self.end_epoch is None and saved is not None:
            self.last_epoch = int(saved)

    def __getstate__(self) -> dict[str, Any]:
        # Picklable (``ddp_spawn`` pickles the Trainer): a callable schedule may be a local function.
        state = self.__dict__.copy()
        state["fn"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.fn = resolve_schedule(self.schedule, self.decay)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(start_epoch={self.start_epoch}, end_epoch={self.end_epoch}, "
            f"every_n_epochs={self.every_n_epochs}, schedule={self.schedule!r}, decay={self.decay})"
        )
