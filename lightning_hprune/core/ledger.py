"""The ledger: what pruning has done so far, in one place.

* the **baseline**: the dense model's measurements (and the monitored metric) just before the first event;
* the **original widths**: every prunable layer's width before any pruning, keyed by the layer's *module
  name*. A group is found by any of its output layers (:attr:`ChannelGroup.outputs`), so the width survives
  torch-pruning choosing another root for the same group after a block was removed (the group ``net.1.conv2``
  of a residual stream becomes ``net.0.0`` once block ``net.1`` is gone);
* the typed **event records** and what each level (by position in the hierarchy) has removed so far;
* the **structural history**: the list of plain-data steps the dependency graph appends to while it prunes,
  replayed on resume and by ``load_pruned``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_hprune.core.graph import ChannelGroup, removed_modules

#: Measurement keys an :class:`EventRecord` may hold, in report order.
MEASURES = ("params", "macs", "latency_ms")


@dataclass
class LevelRecord:
    """What one level did in one event.

    Attributes:
        level: the level's name in this event (a repeated class gets ``_1``, ``_2``, ...).
        cost_before: the cost when the level started.
        cost_after: the cost when it finished.
        target_cost: the cost it aimed at.
        removed: group name -> units removed.
        blocks: modules removed whole.
        rounds: selection rounds it ran.

    """

    level: str
    cost_before: float
    cost_after: float
    target_cost: float
    removed: dict[str, int] = field(default_factory=dict)
    blocks: list[str] = field(default_factory=list)
    rounds: int = 0

    @property
    def saved(self) -> float:
        """The cost this level removed."""
        return self.cost_before - self.cost_after


@dataclass
class EventRecord:
    """One pruning event, as measured right after it.

    Attributes:
        event: the event's index in the schedule.
        epoch: the training epoch at whose end it ran.
        step: the global step.
        measured: ``params``, ``macs`` and (when measured) ``latency_ms`` after the event.
        target: the cumulative fraction of the cost the event aimed at.
        removed: the cumulative fraction of the dense cost removed after it.
        event_ratio: the fraction of the cost before the event that it removed.
        seconds: wall time of the event.
        levels: what each level did.
        metric: the monitored metric just before the event, if any.
        retained: ``metric`` relative to its value before the first event.

    """

    event: int
    epoch: int
    step: int
    measured: dict[str, float]
    target: float
    removed: float
    event_ratio: float
    seconds: float
    levels: list[LevelRecord]
    metric: float | None = None
    retained: float | None = None

    def as_dict(self, monitor: str | None = None) -> dict[str, Any]:
        """Flat plain data (the layout of the report's ``events_log`` and of version-1 checkpoints)."""
        out: dict[str, Any] = {"event": self.event, "epoch": self.epoch, "step": self.step, **self.measured}
        out.update(
            target=self.target,
            removed=self.removed,
            event_ratio=self.event_ratio,
            event_time_s=self.seconds,
            levels=[asdict(lv) for lv in self.levels],
        )
        if self.metric is not None:
            out[monitor or "metric"] = self.metric
            out["retained"] = math.nan if self.retained is None else self.retained
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], monitor: str | None = None) -> EventRecord:
        """Read what :meth:`as_dict` wrote (also the records of version-1 checkpoints)."""
        metric_key = monitor if monitor and monitor in data else ("metric" if "metric" in data else None)
        levels = [
            LevelRecord(
                level=str(lv["level"]),
                cost_before=float(lv.get("cost_before", 0.0)),
                cost_after=float(lv.get("cost_after", 0.0)),
                target_cost=float(lv.get("target_cost", 0.0)),
                removed={str(k): int(v) for k, v in dict(lv.get("removed", {})).items()},
                blocks=[str(b) for b in lv.get("blocks", [])],
                rounds=int(lv.get("rounds", 0)),
            )
            for lv in data.get("levels", [])
        ]
        retained = data.get("retained")
        return cls(
            event=int(data["event"]),
            epoch=int(data.get("epoch", 0)),
            step=int(data.get("step", 0)),
            measured={k: float(data[k]) for k in MEASURES if k in data},
            target=float(data.get("target", 0.0)),
            removed=float(data.get("removed", 0.0)),
            event_ratio=float(data.get("event_ratio", 0.0)),
            seconds=float(data.get("event_time_s", 0.0)),
            levels=levels,
            metric=None if metric_key is None else float(data[metric_key]),
            retained=None if retained is None else float(retained),
        )


class Ledger:
    """Baseline, original widths, event records and structural history (see the module docstring)."""

    def __init__(self) -> None:
        self.baseline: dict[str, float] = {}
        self.original_widths: dict[str, int] = {}
        #: The groups' names (root layers) when the baseline was taken, in the graph's order.
        self.original_groups: list[str] = []
        self.records: list[EventRecord] = []
        #: Cost removed by each level of the hierarchy (by position), summed over the events.
        self.level_removed: list[float] = []
        #: The structural steps, appended to by the pruning graph (this very list object is shared).
        self.history: list[dict[str, Any]] = []
        #: Fingerprints of the model's structure (:func:`structure_fingerprint`): ``"dense"`` and ``"pruned"``.
        self.structure: dict[str, str] = {}

    # ------------------------------------------------------------------ baseline and widths
    @property
    def started(self) -> bool:
        """Whether the baseline was taken (the first event began)."""
        return bool(self.baseline)

    def start(
        self,
        measured: Mapping[str, float],
        metric: float | None,
        groups: Sequence[ChannelGroup],
        fingerprint: str | None = None,
    ) -> None:
        """Take the baseline: the dense measurements, the metric and every group's original width."""
        if fingerprint is not None:
            self.structure = {"dense": fingerprint}
        self.baseline = {f"dense_{k}": float(v) for k, v in measured.items()}
        if metric is not None:
            self.baseline["metric"] = float(metric)
        self.original_widths = {m: g.size for g in groups for m in (g.name, *g.outputs)}
        self.original_groups = [g.name for g in groups]

    def dense(self, cost: str) -> float:
        """The dense model's cost."""
        return self.baseline[f"dense_{cost}"]

    def original_width(self, group: ChannelGroup) -> int:
        """The width of ``group`` (in its units: channels, or heads) before any pruning.

        Looked up by each of the group's output layers, so it holds after a block removal changed the
        group's root; a group none of whose layers was recorded (nothing was pruned yet) has its current
        width.
        """
        for name in (group.name, *group.outputs):
            if name in self.original_widths:
                return self.original_widths[name]
        return group.size

    def original_sizes(self, groups: Sequence[ChannelGroup]) -> dict[str, int]:
        """``{group name: original width}`` for the current groups."""
        return {g.name: self.original_width(g) for g in groups}

    # ------------------------------------------------------------------ events
    def current(self, cost: str) -> float:
        """The cost after the last recorded event (the dense cost before any)."""
        return self.records[-1].measured[cost] if self.records else self.dense(cost)

    def removed_per_level(self, n_levels: int) -> list[float]:
        """What each of ``n_levels`` levels removed so far."""
        return [*self.level_removed, *([0.0] * n_levels)][:n_levels]

    def add(self, record: EventRecord, fingerprint: str | None = None) -> None:
        """Append an event's record and add what each of its levels removed."""
        if fingerprint is not None:
            self.structure["pruned"] = fingerprint
        self.records.append(record)
        if len(self.level_removed) < len(record.levels):
            self.level_removed += [0.0] * (len(record.levels) - len(self.level_removed))
        for j, lv in enumerate(record.levels):
            self.level_removed[j] += lv.saved

    def removed_modules(self) -> list[str]:
        """Modules removed whole so far, in order."""
        return removed_modules(self.history)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "baseline": dict(self.baseline),
            "original_widths": dict(self.original_widths),
            "original_groups": list(self.original_groups),
            "records": [asdict(r) for r in self.records],
            "level_removed": list(self.level_removed),
            "history": [dict(h) for h in self.history],
            "structure": dict(self.structure),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the history list object is kept (the graph appends to it)."""
        self.baseline = {str(k): float(v) for k, v in dict(state.get("baseline", {})).items()}
        self.original_widths = {str(k): int(v) for k, v in dict(state.get("original_widths", {})).items()}
        self.original_groups = [str(g) for g in state.get("original_groups", self.original_widths)]
        self.records = [_record(r) for r in state.get("records", [])]
        self.level_removed = [float(v) for v in state.get("level_removed", [])]
        self.history[:] = [dict(h) for h in state.get("history", [])]
        self.structure = {str(k): str(v) for k, v in dict(state.get("structure", {})).items()}


def _record(data: Mapping[str, Any]) -> EventRecord:
    levels = [LevelRecord(**dict(lv)) for lv in data.get("levels", [])]
    return EventRecord(**{**dict(data), "levels": levels})
