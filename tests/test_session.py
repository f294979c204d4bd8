"""The Lightning-free session: an event's stages, the ledger's stable original widths, undo, state."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn

from lightning_hprune import BlockLevel, ClosedLoop, GlobalLevel
from lightning_hprune.core.importance import Importance, MagnitudeImportance
from lightning_hprune.core.schedules import EventSchedule
from lightning_hprune.core.session import STATE_VERSION, PruningSession, history_of, migrate
from lightning_hprune.core.undo import by_value


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c)
        self.conv2, self.bn2 = nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNet1d(nn.Module):
    """A stem and residual blocks over one residual stream (one group spanning the stem and every block)."""

    def __init__(self, c: int = 64, blocks: int = 3, classes: int = 5) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv1d(2, c, 5, padding=2), nn.BatchNorm1d(c), nn.ReLU())
        self.net = nn.Sequential(stem, *[Block(c) for _ in range(blocks)])
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x).mean(-1))


class StreamFirst(Importance):
    """Scores the residual stream (the group holding the stem) far below everything else: prune it first."""

    def __call__(self, group: Any) -> torch.Tensor:
        n = len(group[0].idxs)
        stem = any(getattr(dep.target, "name", "").startswith("net.0.0") for dep, _ in group)
        base = torch.linspace(0.0, 1e-3, n) if stem else torch.linspace(1.0, 2.0, n)
        return base


def run_events(session: PruningSession, model: nn.Module, epochs: range) -> list[Any]:
    records = []
    for epoch in epochs:
        if not session.due(epoch):
            continue
        plan = session.plan(model)
        result = session.execute(model, plan)
        record, _ = session.record(model, plan, result, epoch=epoch, step=epoch)
        records.append(record)
    return records


def test_original_width_floor_holds_after_a_block_removal_renames_the_group() -> None:
    torch.manual_seed(0)
    model = ResNet1d()
    session = PruningSession(
        [
            BlockLevel(patterns=["net.3"], max_blocks=1, share=0.5),
            GlobalLevel(share=0.5, max_layer_ratio=0.8),
        ],
        target=0.9,
        cost="macs",
        schedule=EventSchedule(start_epoch=0, end_epoch=3),
        importance=StreamFirst(),
        round_to=8,
        measure_latency=False,
    )
    session.use_example_input(torch.randn(1, 2, 32))
    graph = session.attach(model)
    assert "net.3.conv2" in {g.name for g in graph.groups()}  # the stream's root before the removal
    run_events(session, model, range(4))
    assert isinstance(model.net[3], nn.Identity)  # the last block went, so the stream has another root
    stream = next(g for g in graph.groups() if "net.0.0" in g.outputs)
    assert stream.name != "net.3.conv2"
    assert session.ledger.original_width(stream) == 64  # found through its output layers
    # The stream was scored lowest at every event, yet it keeps the documented floor: 20 % of 64, aligned.
    # (Keyed by the group's name, the width was lost with the old root and the stem ended at 8.)
    assert model.net[0][0].out_channels == 16
    assert session.ledger.records[-1].removed >= 0.9 - 0.002


def test_events_run_as_plain_stages_and_the_state_round_trips() -> None:
    torch.manual_seed(0)
    model = ResNet1d(c=32)
    session = PruningSession(
        [GlobalLevel()], target=0.5, schedule=EventSchedule(0, 1), round_to=4, measure_latency=False
    )
    session.use_example_input(torch.randn(1, 2, 32))
    plan = session.plan(model)
    assert plan.index == 0
    assert plan.steps[-1][1] == pytest.approx(plan.dense * (1 - plan.fraction))
    result = session.execute(model, plan)
    record, entry = session.record(model, plan, result, epoch=0, step=3)
    assert entry["action"] == "pruned"
    assert record.target == plan.fraction
    assert 0 < record.removed <= plan.fraction + 0.01
    state = session.state_dict()
    assert state["version"] == STATE_VERSION == 2
    assert history_of(state) == session.ledger.history
    assert torch.load  # plain data: only tensors, numbers, strings, lists, dicts
    fresh = PruningSession(
        [GlobalLevel()], target=0.5, schedule=EventSchedule(0, 1), round_to=4, measure_latency=False
    )
    fresh.load_state_dict(by_value(state))
    assert fresh.state_dict()["ledger"] == state["ledger"]
    assert fresh.schedule.position == 1
    # A fresh (unpruned) model gets the recorded structure replayed when the session attaches to it.
    other = ResNet1d(c=32)
    fresh.attach(other)
    assert [p.shape for p in other.parameters()] == [p.shape for p in model.parameters()]


def test_a_snapshot_restores_the_whole_session_by_value() -> None:
    model = ResNet1d(c=16)
    session = PruningSession(
        [GlobalLevel()],
        target=0.5,
        schedule=EventSchedule(0, 1),
        importance="taylor",
        round_to=4,
        measure_latency=False,
    )
    session.use_example_input(torch.randn(1, 2, 32))
    x = torch.randn(4, 2, 32)
    for _ in range(3):
        model(x).sum().backward()
        session.importance.on_before_optimizer_step(model)
    session.calibration.add(x)
    before = by_value(session.state_dict())
    snapshot = session.snapshot(model)
    plan = session.plan(model)
    session.execute(model, plan)  # resets the criterion's statistics, as every event does
    assert session.importance.state_dict()["steps"] == 0
    snapshot.restore()
    after = session.state_dict()
    assert after["importance"]["steps"] == 3
    assert set(after["importance"]["acc"]) == set(before["importance"]["acc"])
    for k, v in before["importance"]["acc"].items():
        assert torch.equal(after["importance"]["acc"][k], v), k
    assert after["ledger"] == before["ledger"]
    assert len(after["calibration"]["batches"]) == 1
    assert all(
        m.out_channels == 16 for m in model.modules() if isinstance(m, nn.Conv1d) and m.in_channels != 2
    )


def test_version_1_states_migrate() -> None:
    v1 = {
        "marker": "lightning_hprune",
        "version": 1,
        "event_index": 2,
        "history": [{"op": "channels", "module": "a", "idxs": [0]}],
        "records": [
            {
                "event": 0,
                "epoch": 0,
                "step": 4,
                "params": 10.0,
                "macs": 90.0,
                "target": 0.1,
                "removed": 0.1,
                "event_ratio": 0.1,
                "event_time_s": 0.5,
                "levels": [
                    {
                        "level": "global",
                        "removed": {"a": 1},
                        "blocks": [],
                        "cost_before": 100.0,
                        "cost_after": 90.0,
                        "target_cost": 90.0,
                    }
                ],
                "val_acc": 0.9,
                "retained": 1.0,
            }
        ],
        "baseline": {"dense_macs": 100.0, "dense_params": 12.0, "metric": 0.9},
        "original_size": {"a": 8},
        "example_input": torch.zeros(1, 3),
        "calibration": [],
        "importance": {},
        "adjust": {
            "rate": 0.5,
            "retries": 1,
            "stopped": False,
            "decisions": [{"action": "pruned"}],
            "pending_check": None,
        },
        "sensitivity": None,
    }
    session = PruningSession(
        [GlobalLevel()], monitor="val_acc", closed_loop=ClosedLoop(max_drop=0.1), measure_latency=False
    )
    session.load_state_dict(v1)
    assert session.schedule.position == 2
    assert session.ledger.history == v1["history"]
    assert session.ledger.original_widths == {"a": 8}
    assert session.ledger.records[0].metric == 0.9
    assert session.ledger.removed_per_level(1) == [10.0]
    assert session.loop is not None
    assert (session.loop.rate, session.loop.retries) == (0.5, 1)
    assert session.decisions.entries == [{"action": "pruned"}]
    assert migrate(v1)["version"] == 2
    assert history_of(v1) == v1["history"]


def test_magnitude_is_the_default_criterion() -> None:
    assert isinstance(PruningSession([GlobalLevel()]).importance, MagnitudeImportance)


def test_a_stop_decision_past_the_schedule_does_not_ask_for_a_catch_up_event() -> None:
    torch.manual_seed(0)
    model = ResNet1d(c=16)
    session = PruningSession(
        [GlobalLevel()],
        target=0.5,
        schedule=EventSchedule(0, 1),
        round_to=4,
        monitor="acc",
        closed_loop=ClosedLoop(max_drop=0.05, max_retries=0),
        measure_latency=False,
    )
    session.use_example_input(torch.randn(1, 2, 32))
    widths = [p.shape for p in model.parameters()]
    for epoch, acc in ((0, 0.9), (1, 0.9)):  # two events, both judged fine
        if epoch == 1:
            verdict = session.judge(epoch, epoch, acc, max_epochs=6)
            assert verdict is not None
            assert verdict.decision.action == "continue"
        plan = session.plan(model, metric=acc)
        session.record(model, plan, session.execute(model, plan), epoch=epoch, step=epoch, max_epochs=6)
    assert session.schedule.finished
    verdict = session.judge(2, 2, 0.1, max_epochs=6)  # the last event ruined the metric, no retry allowed
    assert verdict is not None
    assert verdict.decision.action == "stop"
    assert verdict.rolled_back
    assert session.stopped
    assert not verdict.retry_now  # stopped means stopped, even short of the target
    assert not session.active
    assert [p.shape for p in model.parameters()] != widths  # back to the model after the first event
    assert len(session.ledger.records) == 1
    assert [e["action"] for e in session.decisions.entries] == ["pruned", "continue", "pruned", "stop"]
