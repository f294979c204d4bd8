"""``RunTimeline``: what the report draws over time, beside the ledger.

The ledger keeps what pruning did (events, baseline, structure); the timeline keeps what the report needs
to draw it over the run: the monitored metric after every validation, and every layer's kept width after
every event. Plain data, checkpointed with the session, so a resumed run's report covers the whole run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class RunTimeline:
    """The monitored metric per validation and the kept widths per event (append-only plain data)."""

    def __init__(self) -> None:
        #: ``{"epoch", "step", "value"}`` after each validation (not the sanity check).
        self.metrics: list[dict[str, Any]] = []
        #: ``{"event", "epoch", "widths": {layer: kept width, or None when removed with a block}}``.
        self.widths: list[dict[str, Any]] = []

    def add_metric(self, epoch: int, step: int, value: float) -> None:
        """Record the monitored value after the validation of ``epoch`` (a repeated epoch replaces it)."""
        self.metrics = [m for m in self.metrics if m["epoch"] != epoch]
        self.metrics.append({"epoch": int(epoch), "step": int(step), "value": float(value)})

    def add_widths(self, event: int, epoch: int, widths: Mapping[str, int | None]) -> None:
        """Record the kept widths after ``event`` (a retried event replaces its earlier entry)."""
        self.widths = [w for w in self.widths if w["event"] < event]
        self.widths.append(
            {"event": int(event), "epoch": int(epoch), "widths": {str(k): v for k, v in widths.items()}}
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "metrics": [dict(m) for m in self.metrics],
            "widths": [{**w, "widths": dict(w["widths"])} for w in self.widths],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.metrics = [dict(m) for m in state.get("metrics", [])]
        self.widths = [{**dict(w), "widths": dict(w["widths"])} for w in state.get("widths", [])]
