"""``cost="latency"``: per-layer latency tables measured once, cached, checkpointed, and pruned against."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_hprune import GlobalLevel, HierarchicalPruning
from lightning_hprune.core.cost import resolve_cost
from lightning_hprune.core.latency_cost import LatencyCost, LatencyTable
from lightning_hprune.core.measure import LatencyMeasurement, latency_stats
from lightning_hprune.core.schedules import EventSchedule
from lightning_hprune.core.session import PruningSession
from tests.helpers import TinyCNN, loaders, trainer

EXAMPLE = torch.zeros(1, 3, 8, 8)


def fast(**kwargs: object) -> LatencyCost:
    return LatencyCost(warmup=0, repeats=1, **kwargs)  # type: ignore[arg-type]


def test_resolve_cost_accepts_latency_and_names_it_in_errors() -> None:
    assert isinstance(resolve_cost("latency"), LatencyCost)
    with pytest.raises(ValueError, match=r"one of \['latency', 'macs', 'params'\].*but got 'speed'"):
        resolve_cost("speed")
    with pytest.raises(
        ValueError, match=r"`widths` to be a non-empty sequence of fractions in \(0, 1\].*1.5"
    ):
        LatencyCost(widths=(0.5, 1.5))
    with pytest.raises(ValueError, match=r"`batch_size` to be a positive int or None, but got 0"):
        LatencyCost(batch_size=0)
    with pytest.raises(ValueError, match=r"`repeats` to be an int >= 1, but got 0"):
        LatencyCost(repeats=0)


def test_table_interpolates_between_measured_widths_and_is_monotone() -> None:
    # A noisy dip (3.0 after 4.0) is lifted so that no channel has a negative cost.
    table = LatencyTable("k", [8, 16], [8, 16, 32], [[1.0, 2.0, 4.0], [2.0, 4.0, 3.0]])
    assert table.ms[1] == [2.0, 4.0, 4.0]
    assert table(8, 16) == pytest.approx(2.0)
    assert table(12, 16) == pytest.approx(3.0)  # half-way between the rows
    assert table(8, 24) == pytest.approx(3.0)  # half-way between the columns
    assert table(4, 4) >= 0.0  # extrapolated below the grid, never negative
    assert LatencyTable.from_dict(table.as_dict()).ms == table.ms


def test_tables_are_built_once_per_kind_of_layer_and_reused_from_the_cache(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    cache = tmp_path / "table.json"
    cost = fast(batch_size=4, widths=(0.5, 1.0), cache=cache)
    total = cost.measure(model, EXAMPLE)
    assert total > 0
    assert cost.source == "measured"
    # The three 3x3 convolutions at 8x8 share one table, the two linear layers another; each table holds
    # half and all of its widest layer's widths and every layer's own widths (3 input channels, ...).
    assert len(cost.tables) == 2
    conv = next(t for k, t in cost.tables.items() if "Conv2d" in k)
    assert conv.ins == [3, 16, 32]
    assert conv.outs == [16, 32]
    assert cost.timings == sum(len(t.ins) * len(t.outs) for t in cost.tables.values())
    per_module = cost.per_module(model, EXAMPLE)
    assert per_module[""] == pytest.approx(total)
    assert per_module["features"] == pytest.approx(sum(per_module[f"features.{i}"] for i in (0, 3, 6)))
    saved = json.loads(cache.read_text())
    assert saved["batch_size"] == 4
    assert len(saved["tables"]) == 2
    again = fast(batch_size=4, widths=(0.5, 1.0), cache=cache)
    assert again.measure(model, EXAMPLE) == pytest.approx(total)
    assert again.timings == 0
    assert again.source == "cache"
    other = fast(batch_size=8, widths=(0.5, 1.0), cache=cache)  # another batch size: measured anew
    other.measure(model, EXAMPLE)
    assert other.timings > 0
    assert other.source == "measured"


def test_a_level_prunes_to_a_latency_target(monkeypatch: pytest.MonkeyPatch) -> None:
    # The mechanism (tables -> per-unit costs -> a level's plan -> the estimate after it), on a deterministic
    # timing: tables timed on a loaded machine made one round remove 0.36-0.60 of the estimate for a 0.3
    # target (the benchmark, benchmarks/latency_cost.py, measures real timings).
    def synthetic_ms(
        self: LatencyCost, module: nn.Module, shape: tuple[int, ...], c_in: int, c_out: int
    ) -> float:
        self.timings += 1
        area = math.prod(shape[2:]) if isinstance(module, nn.Conv2d) else 1
        return 0.05 + 1e-5 * c_in * c_out * area

    monkeypatch.setattr(LatencyCost, "_time", synthetic_ms)
    torch.manual_seed(0)
    model = TinyCNN(widths=(32, 64, 64), size=16)
    example = torch.zeros(1, 3, 16, 16)
    cost = LatencyCost(batch_size=16, warmup=1, repeats=3)
    session = PruningSession(
        [GlobalLevel()],
        target=0.3,
        cost=cost,
        schedule=EventSchedule(0, 0),
        round_to=4,
        measure_latency=False,
    )
    session.use_example_input(example)
    before_params = sum(p.numel() for p in model.parameters())
    plan = session.plan(model)
    result = session.execute(model, plan)
    record, _ = session.record(model, plan, result, epoch=0, step=0)
    assert session.cost.name == "latency"
    assert record.removed == pytest.approx(0.3, abs=0.05)  # of the estimated latency
    assert sum(p.numel() for p in model.parameters()) < before_params
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    # The estimate follows the widths the level left, from the same tables (nothing measured again).
    timings = cost.timings
    assert cost.measure(model, example) == pytest.approx(session.ledger.current("latency"), rel=1e-6)
    assert cost.timings == timings


def test_flat_stretches_of_a_table_do_not_make_channels_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """A staircase (a GPU's, or timing noise flattened by the monotone fit) has zero local slope at the dense
    widths; a channel must still count for the table's average slope, or one round removes far past the target."""

    def staircase_ms(
        self: LatencyCost, module: nn.Module, shape: tuple[int, ...], c_in: int, c_out: int
    ) -> float:
        self.timings += 1
        area = math.prod(shape[2:]) if isinstance(module, nn.Conv2d) else 1
        step = 32
        return 0.05 + 1e-5 * math.ceil(c_in / step) * step * math.ceil(c_out / step) * step * area

    monkeypatch.setattr(LatencyCost, "_time", staircase_ms)
    torch.manual_seed(0)
    model = TinyCNN(widths=(32, 64, 64), size=16)
    example = torch.zeros(1, 3, 16, 16)
    cost = LatencyCost(batch_size=16, warmup=1, repeats=3)
    cost.measure(model, example)
    name = "features.3"  # 32 -> 64 channels, 3x3
    key, module = cost._layers[name]
    table = cost.tables[key]
    c_in, c_out = module.in_channels, module.out_channels
    assert table(c_in, c_out) == table(c_in, c_out - 1)  # flat at the dense width
    assert cost.per_unit_of_layer(module, name, c_out, {}) > 0  # ... yet a channel is not free
    session = PruningSession(
        [GlobalLevel()],
        target=0.3,
        cost=cost,
        schedule=EventSchedule(0, 0),
        round_to=4,
        measure_latency=False,
    )
    session.use_example_input(example)
    plan = session.plan(model)
    record, _ = session.record(model, plan, session.execute(model, plan), epoch=0, step=0)
    assert 0.3 - 0.02 <= record.removed <= 0.3 + 0.1  # of the estimated latency: a staircase is coarse


@pytest.mark.fit
def test_fit_builds_the_table_at_the_training_batch_caches_it_and_a_resume_does_not_measure(
    tmp_path: Path,
) -> None:
    pl.seed_everything(0)
    pruning = HierarchicalPruning(
        target=0.4, cost="latency", end_epoch=3, round_to=4, measure_latency=False, verbose=False
    )
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="{epoch}", save_top_k=-1)
    train, val = loaders(n=64, batch_size=16)
    trainer(tmp_path, [pruning, ckpt], max_epochs=2, enable_checkpointing=True, num_sanity_val_steps=0).fit(
        TinyCNN(), train, val
    )
    cost = pruning.session.cost
    assert isinstance(cost, LatencyCost)
    assert cost.batch_size == 16
    assert cost.source == "measured"
    assert cost.timings > 0
    cached = list(tmp_path.rglob("hprune_latency_table.json"))
    assert len(cached) == 1
    assert json.loads(cached[0].read_text())["batch_size"] == 16
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if "HierarchicalPruning" in k]
    assert len(state["cost"]["tables"]) == len(cost.tables)

    resumed = HierarchicalPruning(
        target=0.4, cost="latency", end_epoch=3, round_to=4, measure_latency=False, verbose=False
    )
    trainer(tmp_path / "resumed", [resumed], max_epochs=4, num_sanity_val_steps=0).fit(
        TinyCNN(), train, val, ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt")
    )
    again = resumed.session.cost
    assert isinstance(again, LatencyCost)
    assert again.source == "checkpoint"
    assert again.timings == 0
    assert resumed.event_index == 4
    assert resumed.summary["achieved"] > 0.3  # of the estimated latency (coarse steps on a tiny model)


def test_latency_measurement_takes_at_most_its_share_of_the_training_time() -> None:
    with pytest.raises(ValueError, match=r"`max_share` to be a number in \(0, 1\] or None, but got 0"):
        LatencyMeasurement(max_share=0)
    session = PruningSession(
        [GlobalLevel()], measure_latency=LatencyMeasurement(batch_size=2, rounds=10, repeats=5)
    )
    assert session.latency_budget() is None  # no clock: only `budget_s`
    session.start_clock()
    session.clock_start -= 10.0  # type: ignore[operator]  # ten seconds of training so far
    assert session.latency_budget() == pytest.approx(0.1, abs=0.01)
    session.latency_seconds = 0.5  # already spent more than 1 % of it: the minimum from now on
    assert session.latency_budget() == 0.0
    stats = latency_stats(TinyCNN().eval(), EXAMPLE, session.latency, session.latency_budget())
    assert stats.samples == 5  # never fewer than 5 rounds of 1 pass
    unlimited = latency_stats(TinyCNN().eval(), EXAMPLE, session.latency)
    assert unlimited.samples == 50
