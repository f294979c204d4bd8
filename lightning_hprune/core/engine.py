"""One pruning event: levels run coarse to fine, each down to its cost target, all or nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_hprune.core.cost import build_cost_model, measure_cost
from lightning_hprune.core.graph import ModuleSnapshot, PruningError, PruningGraph
from lightning_hprune.core.importance import Importance
from lightning_hprune.core.levels import Level, Removals, SelectionContext
from lightning_hprune.core.optim_state import ParameterSurgery


@dataclass
class LevelResult:
    """What one level did in one event."""

    level: str
    cost_before: float
    cost_after: float
    target_cost: float
    removed: dict[str, int] = field(default_factory=dict)
    rounds: int = 0


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
    agree: Callable[[Removals], Removals] | None = None,
    calibration: Sequence[Any] = (),
) -> tuple[LevelResult, ParameterSurgery]:
    """Prune with ``level`` until the measured cost is at most ``target_cost + tolerance``.

    Each round scores the current groups, asks the level for channels whose predicted saving closes the
    gap, applies them and measures the exact cost again. It stops early when nothing more can be removed
    (every group at its cap), which the caller reports as an unreachable target. ``agree`` makes every
    process use the same removals (for example rank 0's, broadcast).
    """
    surgery = ParameterSurgery()
    before = current = measure_cost(graph.model, graph.example_inputs, kind)
    result = LevelResult(level=level.name, cost_before=before, cost_after=before, target_cost=target_cost)
    for _ in range(max_rounds):
        gap = current - target_cost
        if gap <= tolerance:
            break
        groups = graph.groups()
        if not groups:
            break
        scores = {g.name: importance(g.group) for g in groups}
        ctx = SelectionContext(
            groups=groups,
            scores=scores,
            cost=build_cost_model(graph, groups, kind),
            original_size=original_size,
            round_to=round_to,
            model=graph.model,
            calibration=calibration,
        )
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


def run_event(
    graph: PruningGraph,
    steps: Sequence[tuple[Level, float]],
    importance: Importance,
    kind: str,
    original_size: dict[str, int],
    round_to: int,
    tolerance: float,
    agree: Callable[[Removals], Removals] | None = None,
    calibration: Sequence[Any] = (),
) -> EventResult:
    """Run ``(level, target cost)`` steps in order, all or nothing.

    Raises:
        PruningError: a step failed; the model and the graph's history are as they were before the event.

    """
    start = time.perf_counter()
    snapshot = ModuleSnapshot(graph.model)
    n_hist = len(graph.history)
    surgery = ParameterSurgery()
    results = []
    try:
        for level, target_cost in steps:
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
