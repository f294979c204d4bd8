"""One pruning event: levels run coarse to fine, each down to its cost target, all or nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_hprune.core.cost import CostModel, build_cost_model, measure_cost
from lightning_hprune.core.graph import ModuleSnapshot, PruningError, PruningGraph
from lightning_hprune.core.importance import Importance
from lightning_hprune.core.levels import Level, ModuleLevel, SelectionContext
from lightning_hprune.core.optim_state import ParameterSurgery
from lightning_hprune.core.schedules import ScheduleFn, resolve_schedule

#: Makes every process use the same selection (e.g. rank 0's, broadcast): removals dict or module names.
Agree = Callable[[Any], Any]


@dataclass
class LevelResult:
    """What one level did in one event."""

    level: str
    cost_before: float
    cost_after: float
    target_cost: float
    removed: dict[str, int] = field(default_factory=dict)
    rounds: int = 0
    blocks: list[str] = field(default_factory=list)


@dataclass
class EventResult:
    """What one event did (all levels)."""

    levels: list[LevelResult]
    surgery: ParameterSurgery
    seconds: float


def prune_level(
    graph: PruningGraph,
    level: Level,
    importance: Importance,
    kind: str,
    target_cost: float,
    original_size: dict[str, int],
    round_to: int,
    tolerance: float,
    max_rounds: int = 8,
    agree: Agree | None = None,
    calibration: Sequence[Any] = (),
    strict: bool = False,
) -> tuple[LevelResult, ParameterSurgery]:
    """Prune with ``level`` until the measured cost is at most ``target_cost + tolerance``.

    With ``strict`` (the schedule's last step), the target is a minimum: no tolerance, and when no
    selection lands closer to the target than it is now, the level may overshoot by one aligned chunk.

    Each round scores the current groups, asks the level for channels whose predicted saving closes the
    gap, applies them and measures the exact cost again. It stops early when nothing more can be removed
    (every group at its cap), which the caller reports as an unreachable target. ``agree`` makes every
    process use the same removals (for example rank 0's, broadcast).
    """
    surgery = ParameterSurgery()
    before = current = measure_cost(graph.model, graph.example_inputs, kind)
    result = LevelResult(level=level.name, cost_before=before, cost_after=before, target_cost=target_cost)
    rounds = level.rounds if level.rounds is not None else max_rounds
    for _ in range(rounds):
        gap = current - target_cost
        if gap <= (0.0 if strict else tolerance):
            break
        common = {
            "original_size": original_size,
            "round_to": round_to,
            "model": graph.model,
            "calibration": calibration,
            "example_inputs": graph.example_inputs,
            "removed_modules": [str(h["module"]) for h in graph.history if h.get("op") == "identity"],
        }
        if isinstance(level, ModuleLevel):
            ctx = SelectionContext(
                groups=(), scores={}, cost=CostModel(kind=kind, total=current, per_channel={}), **common
            )
            names = list(level.select_modules(ctx, gap))
            if agree is not None:
                names = list(agree(names))
            if not names:
                break
            graph.replace_with_identity(names)
            result.blocks.extend(names)
        else:
            groups = graph.groups()
            if not groups:
                break
            scores = {g.name: g.unit_scores(importance(g.group)) for g in groups}
            ctx = SelectionContext(
                groups=groups, scores=scores, cost=build_cost_model(graph, groups, kind), **common
            )
            removals = {k: v for k, v in level.select(ctx, gap).items() if v}
            if not removals and strict:
                ctx.info["at_least"] = True
                removals = {k: v for k, v in level.select(ctx, gap).items() if v}
            if agree is not None:
                removals = agree(removals)
            if not removals:
                break
            surgery.merge(graph.prune(removals))
            for name, idxs in removals.items():
                result.removed[name] = result.removed.get(name, 0) + len(idxs)
        result.rounds += 1
        current = measure_cost(graph.model, graph.example_inputs, kind)
    result.cost_after = current
    return result, surgery


def level_fractions(
    levels: Sequence[Level], target: float, k: int, n: int, default: ScheduleFn, decay: float
) -> list[float]:
    """Cumulative fraction of the dense cost each level should have removed after event ``k`` of ``n``.

    Level ``j`` is responsible for ``target * share_j / sum(shares)`` of the dense cost, reached on its own
    schedule (``level.schedule``) or on ``default``. The fractions sum to ``target`` at the last event.
    """
    total = sum(lv.share for lv in levels)
    out = []
    for lv in levels:
        fn = default if lv.schedule is None else resolve_schedule(lv.schedule, decay)
        out.append(target * lv.share / total * fn(k, n))
    return out


def removed_per_level(records: Sequence[Mapping[str, Any]], n_levels: int) -> list[float]:
    """Cost each level (by position) removed in the events recorded in ``records`` (see the callbacks' records)."""
    out = [0.0] * n_levels
    for record in records:
        levels = record.get("levels") or []
        if len(levels) != n_levels:
            continue
        for j, entry in enumerate(levels):
            out[j] += float(entry.get("cost_before", 0.0)) - float(entry.get("cost_after", 0.0))
    return out


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
        removed: from :func:`removed_per_level`.

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


def run_event(
    graph: PruningGraph,
    steps: Sequence[tuple[Level, float]],
    importance: Importance,
    kind: str,
    original_size: dict[str, int],
    round_to: int,
    tolerance: float,
    agree: Agree | None = None,
    calibration: Sequence[Any] = (),
    strict: bool = False,
) -> EventResult:
    """Run ``(level, target cost)`` steps in order, all or nothing.

    ``strict`` makes the last step's target a minimum (see :func:`prune_level`); use it at the last event.

    Raises:
        PruningError: a step failed; the model and the graph's history are as they were before the event.

    """
    start = time.perf_counter()
    snapshot = ModuleSnapshot(graph.model)
    n_hist = len(graph.history)
    surgery = ParameterSurgery()
    results = []
    try:
        for i, (level, target_cost) in enumerate(steps):
            res, s = prune_level(
                graph,
                level,
                importance,
                kind,
                target_cost,
                original_size,
                round_to,
                tolerance,
                agree=agree,
                calibration=calibration,
                strict=strict and i == len(steps) - 1,
            )
            surgery.merge(s)
            results.append(res)
    except Exception as err:
        snapshot.restore()
        del graph.history[n_hist:]
        graph.rebuild()
        if isinstance(err, PruningError):
            raise
        raise PruningError(
            f"Pruning event failed ({type(err).__name__}: {err}); the model was restored to its state before "
            "the event."
        ) from err
    return EventResult(levels=results, surgery=surgery, seconds=time.perf_counter() - start)


def level_names(results: Sequence[LevelResult]) -> list[str]:
    """Unique names for the levels of one event, in order: a repeated name gets ``_1``, ``_2``, ... appended."""
    seen: dict[str, int] = {}
    out = []
    for r in results:
        n = seen.get(r.level, 0)
        seen[r.level] = n + 1
        out.append(r.level if n == 0 else f"{r.level}_{n}")
    return out
