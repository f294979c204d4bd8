"""The closed loop: decisions (pure), the CPU rollback point, and real Trainer runs that roll back."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn

from lightning_hprune import ClosedLoop, HierarchicalPruning
from lightning_hprune.core.adjust import (
    DECISION_CODES,
    AdjustConfig,
    bound_of,
    decide,
    next_fraction,
    relative_drop,
)
from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.levels import GlobalLevel
from lightning_hprune.core.optim_state import remap_optimizer
from lightning_hprune.core.undo import Snapshot
from tests.helpers import TinyCNN, loaders, trainer


# ---------------------------------------------------------------------- pure decisions
def test_drop_and_bound_are_relative_to_the_baseline() -> None:
    assert relative_drop(0.8, 0.78) == pytest.approx(0.025)
    assert relative_drop(0.8, 0.9) == pytest.approx(-0.125)
    assert relative_drop(2.0, 2.2, mode="min") == pytest.approx(0.1)
    assert relative_drop(0.8, math.nan) == math.inf
    assert bound_of(0.8, 0.01) == pytest.approx(0.792)
    assert bound_of(2.0, 0.1, mode="min") == pytest.approx(2.2)


@pytest.mark.parametrize(
    ("value", "rate", "retries", "action", "new_rate", "new_retries"),
    [
        (0.795, 1.0, 0, "continue", 1.0, 0),  # drop 0.6 %: within 1 %, not comfortable enough
        (0.799, 1.0, 0, "speed_up", 1.5, 0),  # drop 0.1 % <= half of max_drop
        (0.799, 1.5, 1, "speed_up", 2.0, 0),  # capped at max_rate, retries reset
        (0.799, 2.0, 0, "continue", 2.0, 0),  # already at max_rate
        (0.70, 1.0, 0, "roll_back", 0.5, 1),
        (0.70, 0.5, 1, "roll_back", 0.25, 2),
        (0.70, 0.25, 2, "stop", 0.25, 2),  # max_retries failed retries
        (math.nan, 1.0, 0, "roll_back", 0.5, 1),
    ],
)
def test_decide(
    value: float, rate: float, retries: int, action: str, new_rate: float, new_retries: int
) -> None:
    cfg = AdjustConfig(max_drop=0.01, max_retries=2, back_off=0.5, speed_up=1.5, max_rate=2.0)
    d = decide(0.8, value, cfg, rate=rate, retries=retries)
    assert (d.action, d.rate, d.retries) == (action, pytest.approx(new_rate), new_retries)
    assert d.code == DECISION_CODES[action]
    assert d.roll_back == (action in ("roll_back", "stop"))
    assert d.bound == pytest.approx(0.792)
    assert "drop" in d.reason


def test_decide_without_speed_up_never_speeds_up() -> None:
    d = decide(0.8, 0.8, AdjustConfig(max_drop=0.01), rate=1.0)
    assert d.action == "continue"
    assert d.rate == 1.0


def test_decide_min_mode() -> None:
    cfg = AdjustConfig(max_drop=0.1, mode="min")
    assert decide(1.0, 1.05, cfg).action == "continue"
    assert decide(1.0, 1.2, cfg).action == "roll_back"


def test_next_fraction() -> None:
    assert next_fraction(0.0, 0.8, 1.0, 0.8) == pytest.approx(0.8)
    assert next_fraction(0.0, 0.8, 0.5, 0.8) == pytest.approx(0.4)
    assert next_fraction(0.4, 0.8, 0.5, 0.8) == pytest.approx(0.6)  # catches up on later events
    assert next_fraction(0.2, 0.4, 2.0, 0.5) == pytest.approx(0.5)  # faster, capped at the target
    assert next_fraction(0.5, 0.4, 1.0, 0.8) == pytest.approx(0.5)  # never below what is achieved


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_drop": 0.0}, "max_drop"),
        ({"max_drop": 1.5}, "max_drop"),
        ({"max_drop": 0.1, "max_retries": -1}, "max_retries"),
        ({"max_drop": 0.1, "back_off": 1.0}, "back_off"),
        ({"max_drop": 0.1, "speed_up": 0.5}, "speed_up"),
        ({"max_drop": 0.1, "mode": "up"}, "mode"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=f"Expected argument `{match}`"):
        AdjustConfig(**kwargs)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: HierarchicalPruning(closed_loop=ClosedLoop(max_drop=0.01)), "monitor"),  # needs a metric
        (lambda: HierarchicalPruning(monitor="val_acc", closed_loop=ClosedLoop(max_drop=2.0)), "max_drop"),
        (lambda: ClosedLoop(max_retries=1.5), "max_retries"),  # type: ignore[arg-type]
        (lambda: ClosedLoop(back_off=1.0), "back_off"),
        (lambda: HierarchicalPruning(mode="maximum"), "mode"),
        (lambda: HierarchicalPruning(monitor="val_acc", closed_loop=0.01), "closed_loop"),  # type: ignore[arg-type]
        (lambda: HierarchicalPruning(sensitivity=0.3), "sensitivity"),  # type: ignore[arg-type]
    ],
    ids=["no-monitor", "max_drop", "max_retries", "back_off", "mode", "closed_loop", "sensitivity"],
)
def test_callback_validates_adjustment_arguments(build: Any, match: str) -> None:
    with pytest.raises(ValueError, match=f"Expected argument `{match}`"):
        build()


# ---------------------------------------------------------------------- rollback point (CPU)
class Tagged:
    """A stateful part whose state is a mutable dict."""

    def __init__(self) -> None:
        self.tag = {"n": 1}

    def state_dict(self) -> dict[str, Any]:
        return {"tag": self.tag}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tag = state["tag"]


def test_rollback_point_restores_model_and_optimizer_from_cpu() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x = torch.randn(2, 3, 8, 8)

    def step() -> None:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    step()
    graph = PruningGraph(model, x[:1])
    saved_state = {k: v.clone() for k, v in model.state_dict().items()}
    saved_adam = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    tag = Tagged()
    point = Snapshot(model, [opt], parts=[tag], history=graph.history, copy=True)
    tag.tag["n"] = 2  # mutated in place after the snapshot: the snapshot kept its value
    assert point.nbytes > 0
    assert all(d.device.type == "cpu" for d, *_ in point._model._params.values())  # type: ignore[union-attr]

    surgery = graph.prune({"0": [1, 4, 6]})
    remap_optimizer(opt, surgery, list(model.parameters()))
    step()
    assert model[0].out_channels == 5
    assert graph.history

    new_params = point.restore()
    graph.rebuild()
    assert model[0].out_channels == 8
    assert model[1].num_features == 8
    assert model[3].in_channels == 8
    assert graph.history == []
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved_state[k])
    restored = opt.state[model[0].weight]
    for k, v in saved_adam.items():
        torch.testing.assert_close(restored[k], v)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert set(map(id, new_params.values())) == {id(p) for p in model.parameters()}
    step()  # training goes on with the restored parameters
    assert opt.state[model[0].weight]["step"] == saved_adam["step"] + 1
    assert tag.tag == {"n": 1}


# ---------------------------------------------------------------------- real runs
def read_metrics(tmp_path: Path) -> list[dict[str, str]]:
    (path,) = tmp_path.glob("logs/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def aggressive(**kwargs: Any) -> HierarchicalPruning:
    """95 % of the MACs in one shot with random channels: far too much for one recovery epoch."""
    args: dict[str, Any] = {
        "target": 0.95,
        "levels": [GlobalLevel(max_layer_ratio=0.97)],
        "schedule": "constant",
        "start_epoch": 2,
        "end_epoch": 2,
        "round_to": 1,
        "importance": "random",
        "monitor": "val_acc",
        "measure_latency": False,
    }
    loop = ClosedLoop(max_drop=0.02, max_retries=kwargs.pop("max_retries", 2))
    args.update(kwargs)
    return HierarchicalPruning(closed_loop=loop, **args)


@pytest.mark.fit
def test_too_aggressive_schedule_rolls_back_and_stays_within_bound(tmp_path: Path) -> None:
    pl.seed_everything(0)
    cb = aggressive(max_retries=2)
    model = TinyCNN(lr=0.02)
    train, val = loaders(n=128, batch_size=32)
    tr = trainer(tmp_path, [cb], max_epochs=6)
    tr.fit(model, train, val)

    actions = [d["action"] for d in cb.decisions]
    assert actions[:3] == ["pruned", "roll_back", "pruned"]
    first, roll = cb.decisions[0], cb.decisions[1]
    assert roll["value"] < roll["bound"]  # the one-shot prune fell below the bound ...
    assert roll["undone_removed"] == pytest.approx(0.95, abs=0.02)  # ... and was undone
    assert roll["rate"] == 0.5
    assert first["rate"] == 1.0
    assert cb.rate < 1.0
    assert not cb.stopped
    # the retry took a smaller step, and later events caught up with it
    assert cb.records[0]["removed"] < 0.95 * 0.75
    assert cb.records[-1]["removed"] > cb.records[0]["removed"]

    # the final model holds the bound (validated again after fit, on the model as it is now)
    baseline = cb.baseline["metric"]
    final = tr.validate(model, val, verbose=False)[0]["val_acc"]
    assert final >= baseline * (1 - 0.02)

    # decisions in the CSV logs, in order, with the rate
    rows = [r for r in read_metrics(tmp_path) if r.get("hprune/decision")]
    codes = [int(float(r["hprune/decision"])) for r in rows]
    assert codes == [DECISION_CODES[a] for a in actions]
    assert DECISION_CODES["roll_back"] in codes
    rates = [float(r["hprune/rate"]) for r in rows]
    assert rates[0] == 1.0
    assert rates[1] == 0.5
    assert float(rows[1]["hprune/drop"]) > 0.02

    # the decisions are part of the checkpointed state
    state = cb.state_dict()
    assert [d["action"] for d in state["decisions"]["entries"]] == actions
    fresh = aggressive()
    fresh.load_state_dict(state)
    assert fresh.decisions == cb.decisions
    assert fresh.rate == cb.rate


@pytest.mark.fit
def test_stops_after_max_retries_and_keeps_the_last_good_model(tmp_path: Path) -> None:
    pl.seed_everything(0)
    cb = aggressive(max_retries=0)
    model = TinyCNN(lr=0.02)
    train, val = loaders(n=128, batch_size=32)
    tr = trainer(tmp_path, [cb], max_epochs=5)
    tr.fit(model, train, val)
    assert [d["action"] for d in cb.decisions] == ["pruned", "stop"]
    assert cb.stopped
    assert "stopped pruning" in cb.decisions[-1]["reason"]
    # rolled back to the dense model: every layer has its full width again, and nothing more was pruned
    assert [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)] == [16, 32, 32]
    assert cb.history_steps() == []
    assert cb.records == []
    final = tr.validate(model, val, verbose=False)[0]["val_acc"]
    assert final >= cb.baseline["metric"] * (1 - 0.02)
    rows = [r for r in read_metrics(tmp_path) if r.get("hprune/decision")]
    assert [int(float(r["hprune/decision"])) for r in rows] == [0, 4]


def test_pending_check_after_resume_without_snapshot_stops(tmp_path: Path) -> None:
    """The CPU copy is not checkpointed: a failing check after a resume stops instead of guessing."""
    cb = aggressive()
    cb.load_state_dict(  # a version-1 state (the first release's layout), migrated on load
        {
            "event_index": 1,
            "baseline": {"metric": 1.0, "dense_macs": 1.0},
            "adjust": {"pending_check": {"event": 0, "epoch": 2, "check_epoch": 3}, "rate": 1.0},
        }
    )

    class FakeStrategy:
        def broadcast(self, obj: Any, src: int = 0) -> Any:
            return obj

    class FakeTrainer:
        current_epoch = 3
        global_step = 10
        callback_metrics = {"val_acc": torch.tensor(0.5)}
        strategy = FakeStrategy()
        loggers: list[Any] = []
        max_epochs = 6

    assert cb._judge(FakeTrainer(), None) is False  # type: ignore[arg-type]
    assert cb.stopped
    assert cb.decisions[-1]["action"] == "stop"
    assert "not available" in cb.decisions[-1]["reason"]
