"""One pruning event: levels run coarse to fine, each down to its cost target.

The engine knows levels only through :meth:`~lightning_hprune.core.levels.Level.plan`: each round it asks
the level for a plan that closes the gap to the level's target, makes every process agree on it, applies
it and measures the exact cost again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_hprune.core.cost import Cost, resolve_cost
from lightning_hprune.core.graph import ChannelGroup, PruningError, PruningGraph
from lightning_hprune.core.importance import Importance
from lightning_hprune.core.ledger import LevelRecord
from lightning_hprune.core.levels import Agree, Level, SelectionContext
from lightning_hprune.core.optim_state import ParameterSurgery
from lightning_hprune.core.schedules import ScheduleFn, share_fractions
from lightning_hprune.core.undo import Snapshot, undo_on_failure

#: A group's width before any pruning: a mapping by current group name, or a lookup (the ledger's).
OriginalSize = Mapping[str, int] | Callable[[ChannelGroup], int]

__all__ = [
    "Agree",
    "EventResult",
    "level_fractions",
    "plan_steps",
    "prune_level",
    "run_event",
]


@dataclass
class EventResult:
    """What one event did: per level, the parameter surgery (for optimizers) and the wall time."""

    levels: list[LevelRecord]
    surgery: ParameterSurgery
    seconds: float


def _original_lookup(original_size: OriginalSize) -> Callable[[ChannelGroup], int]:
    if callable(original_size):
        return original_size
    sizes = dict(original_size)
    return lambda g: sizes.get(g.name, g.size)


def prune_level(
    graph: PruningGraph,
    level: Level,
    importance: Importance,
    cost: Cost | str,
    target_cost: float,
    original_size: OriginalSize,
    round_to: int,
    tolerance: float,
    max_rounds: int = 8,
    agree: Agree | None = None,
    calibration: Sequence[Any] = (),
    strict: bool = False,
    sensitivity: Mapping[str, float] | None = None,
    name: str | None = None,
    floor_cost: float | None = None,
    surgery: ParameterSurgery | None = None,
    final_cost: float | None = None,
) -> tuple[LevelRecord, ParameterSurgery]:
    """Prune with ``level`` until the measured cost is at most ``target_cost + tolerance``.

    With ``strict`` (the schedule's last step), the target is a minimum: no tolerance, and a level that
    finds nothing within the gap may close it with the least overshoot (``ctx.at_least``).

    ``floor_cost`` (the event's overall target) and ``final_cost`` (the whole run's final target) bound how
    far past ``target_cost`` a level that rounds to whole modules may go (``ctx.slack`` and
    ``ctx.final_slack``); neither lets a level go past the final target.

    Each round asks the level for a plan whose predicted saving closes the gap, applies it and measures the
    exact cost again. It stops early when the level finds nothing more to remove (every group at its cap, no
    block that fits), which the caller reports as an unreachable target. ``agree`` makes every process use
    the same plan (for example rank 0's, broadcast).
    """
    cost = resolve_cost(cost)
    original = _original_lookup(original_size)
    surgery = surgery if surgery is not None else ParameterSurgery()
    before = current = cost.measure(graph.model, graph.example_inputs)
    result = LevelRecord(
        level=name or level.name, cost_before=before, cost_after=before, target_cost=target_cost
    )
    rounds = level.rounds if level.rounds is not None else max_rounds
    for _ in range(rounds):
        gap = current - target_cost
        if gap <= (0.0 if strict else tolerance):
            break
        ctx = SelectionContext(
            graph=graph,
            importance=importance,
            cost_kind=cost,
            original=original,
            round_to=round_to,
            calibration=calibration,
            removed_modules=graph.removed_modules(),
            sensitivity=sensitivity,
            at_least=strict,
            slack=0.0 if floor_cost is None else max(0.0, target_cost - floor_cost),
            final_slack=None if final_cost is None else max(0.0, target_cost - final_cost),
        )
        plan = level.plan(ctx, gap)
        if agree is not None:
            plan = plan.agreed(agree)
        if not plan:
            break
        plan.apply(graph, surgery)
        removed, blocks = plan.describe()
        for group, count in removed.items():
            result.removed[group] = result.removed.get(group, 0) + count
        result.blocks.extend(blocks)
        result.rounds += 1
        current = cost.measure(graph.model, graph.example_inputs)
    result.cost_after = current
    return result, surgery


def level_fractions(
    levels: Sequence[Level], target: float, k: int, n: int, default: ScheduleFn, decay: float
) -> list[float]:
    """Cumulative fraction of the dense cost each level should have removed after event ``k`` of ``n``.

    Level ``j`` is responsible for ``target * share_j / sum(shares)`` of the dense cost, reached on its own
    schedule (``level.schedule``) or on ``default``. The fractions sum to ``target`` at the last event.
    """
    return share_fractions([(lv.share, lv.schedule) for lv in levels], target, k, n, default, decay)


def plan_steps(
    levels: Sequence[Level], dense: float, start: float, fractions: Sequence[float], removed: Sequence[float]
) -> list[tuple[Level, float]]:
    """Turn per-level cumulative fractions into the ``(level, target cost)`` steps of one event.

    Each level is asked for what it still owes, ``dense * fractions[j] - removed[j]``, on top of what the
    levels before it in this event achieved; no step goes below the event's overall target
    ``dense * (1 - sum(fractions))``, and the last step aims exactly at it, so a level that falls short
    (blocks too coarse, layers at their caps) is made up by the finer levels after it, and it catches up
    on its own share at later events.

    Args:
        levels: the levels, coarse to fine.
        dense: cost of the model before any pruning.
        start: cost of the model now (before this event).
        fractions: from :func:`level_fractions`.
        removed: what each level removed so far (the ledger's ``removed_per_level``).

    """
    final = dense * (1.0 - sum(fractions))
    steps: list[tuple[Level, float]] = []
    owed = 0.0
    for j, lv in enumerate(levels):
        owed += max(0.0, dense * fractions[j] - removed[j])
        steps.append((lv, max(final, start - owed)))
    if steps:
        steps[-1] = (levels[-1], final)
    return steps


def level_names(levels: Sequence[Level]) -> list[str]:
    """Unique names for levels in order: a repeated name gets ``_1``, ``_2``, ... appended."""
    seen: dict[str, int] = {}
    out = []
    for lv in levels:
        n = seen.get(lv.name, 0)
        seen[lv.name] = n + 1
        out.append(lv.name if n == 0 else f"{lv.name}_{n}")
    return out


def run_event(
    graph: PruningGraph,
    steps: Sequence[tuple[Level, float]],
    importance: Importance,
    cost: Cost | str,
    original_size: OriginalSize,
    round_to: int,
    tolerance: float,
    agree: Agree | None = None,
    calibration: Sequence[Any] = (),
    strict: bool = False,
    sensitivity: Mapping[str, float] | None = None,
    atomic: bool = True,
    final_cost: float | None = None,
) -> EventResult:
    """Run ``(level, target cost)`` steps in order.

    ``strict`` makes the last step's target a minimum (see :func:`prune_level`); use it at the last event.
    ``final_cost`` is the cost the whole run aims at (the dense cost times ``1 - target``): a level that
    rounds to whole modules (:class:`~lightning_hprune.core.blocks.BlockLevel`) may overshoot this event's
    target up to it, and the finer levels remove that much less then and at later events. Without it, the
    event's own target (the last step's) bounds every step.
    With ``atomic`` (the default), a failure restores the model and the graph's history; a caller that
    takes a wider snapshot of its own (a pruning session) passes ``False``.

    Raises:
        PruningError: a step failed.

    """
    start = time.perf_counter()
    surgery = ParameterSurgery()
    results = []
    names = level_names([lv for lv, _ in steps])
    try:
        with undo_on_failure(
            lambda: Snapshot(graph.model if atomic else None, history=graph.history if atomic else None)
        ):
            for i, ((level, target_cost), name) in enumerate(zip(steps, names, strict=True)):
                res, _ = prune_level(
                    graph,
                    level,
                    importance,
                    cost,
                    target_cost,
                    original_size,
                    round_to,
                    tolerance,
                    agree=agree,
                    calibration=calibration,
                    strict=strict and i == len(steps) - 1,
                    sensitivity=sensitivity,
                    name=name,
                    floor_cost=steps[-1][1],
                    surgery=surgery,
                    final_cost=None if final_cost is None else min(final_cost, steps[-1][1]),
                )
                results.append(res)
    except Exception as err:
        if atomic:
            graph.rebuild()
        if isinstance(err, PruningError):
            raise
        raise PruningError(
            f"Pruning event failed ({type(err).__name__}: {err})"
            + ("; the model was restored to its state before the event." if atomic else ".")
        ) from err
    return EventResult(levels=results, surgery=surgery, seconds=time.perf_counter() - start)
