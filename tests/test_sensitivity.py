"""Sensitivity analysis: known answers on a hand-built model, exact restore, ratios, caching, callback use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn

import lightning_hprune.core.session as session_module
from lightning_hprune import HierarchicalPruning
from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.levels import LayerLevel
from lightning_hprune.core.sensitivity import (
    SensitivityAnalysis,
    batch_metric,
    cached_sensitivity,
    measure_sensitivity,
    sensitivity_ratios,
)
from tests.helpers import TinyCNN, loaders, trainer


def two_layer_net() -> nn.Sequential:
    """Layer "0" has 4 dead channels out of 8 (zero weights and bias); layer "2" uses all of its channels."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight[4:] = 0
        net[0].bias[4:] = 0
    return net


def fidelity(net: nn.Module, x: torch.Tensor) -> Any:
    """Higher is better: minus the squared error to the unpruned model's outputs."""
    with torch.no_grad():
        reference = net(x).clone()

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return -float((model(x) - reference).pow(2).mean())

    return evaluate


def test_dead_channels_make_a_layer_insensitive() -> None:
    net = two_layer_net()
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    graph = PruningGraph(net, x[:1])
    drops = measure_sensitivity(graph, fidelity(net, x), fraction=0.5)
    assert set(drops) == {"0", "2"}
    assert drops["0"] == pytest.approx(0.0, abs=1e-9)  # the 4 lowest-magnitude channels are the dead ones
    assert drops["2"] > 1e-4
    ratios = sensitivity_ratios(drops, max_ratio=0.8)
    assert ratios["0"] == pytest.approx(0.8)
    assert ratios["2"] < 0.05  # only the smoothing term (5 % of the mean drop) keeps it above 0


def test_model_is_restored_exactly_without_copies() -> None:
    net = two_layer_net()
    x = torch.randn(16, 6)
    graph = PruningGraph(net, x[:1])
    params = [id(p) for p in net.parameters()]
    out = net(x).detach()
    measure_sensitivity(graph, fidelity(net, x), fraction=0.5)
    assert [id(p) for p in net.parameters()] == params  # the very same tensors (zero-copy restore)
    assert (net[0].out_features, net[2].in_features, net[2].out_features) == (8, 8, 8)
    assert graph.history == []
    torch.testing.assert_close(net(x), out)
    graph.prune({"2": [0, 1]})  # the graph still works afterwards
    assert net[2].out_features == 6


def test_measures_only_the_requested_groups_and_checks_arguments() -> None:
    net = two_layer_net()
    x = torch.randn(8, 6)
    graph = PruningGraph(net, x[:1])
    assert set(measure_sensitivity(graph, fidelity(net, x), groups=["2"])) == {"2"}
    with pytest.raises(ValueError, match="Expected argument `fraction`"):
        measure_sensitivity(graph, fidelity(net, x), fraction=1.0)
    with pytest.raises(ValueError, match="without statistics"):
        measure_sensitivity(
            graph,
            fidelity(net, x),
            importance=__import__("lightning_hprune").core.importance.TaylorImportance(),
        )


def test_ratios_are_inverse_to_sensitivity() -> None:
    ratios = sensitivity_ratios({"a": 0.01, "b": 0.02, "c": float("inf")}, max_ratio=0.6, smoothing=0.0)
    assert ratios["a"] == pytest.approx(0.6)
    assert ratios["b"] == pytest.approx(0.3)
    assert ratios["c"] == 0.0
    assert sensitivity_ratios({}) == {}
    assert sensitivity_ratios({"a": 0.0, "b": 0.0}) == {"a": 0.8, "b": 0.8}


def test_batch_metric() -> None:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 1, 1])
    assert batch_metric([(x, y)], "accuracy")(model) == pytest.approx(0.75)
    expected = float(nn.functional.cross_entropy(x, y))
    assert batch_metric([(x[:2], y[:2]), (x[2:], y[2:])], "loss")(model) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least one"):
        batch_metric([])
    with pytest.raises(ValueError, match="input, target"):
        batch_metric([x])


def test_cache_is_reused_only_when_it_matches(tmp_path: Path) -> None:
    calls: list[int] = []

    def measure() -> dict[str, float]:
        calls.append(1)
        return {"a": 0.1, "b": 0.2}

    path = tmp_path / "sub" / "hprune_sensitivity.json"
    drops, reused = cached_sensitivity(path, measure, {"fraction": 0.3}, ["a", "b"])
    assert (drops, reused, len(calls)) == ({"a": 0.1, "b": 0.2}, False, 1)
    assert json.loads(path.read_text())["drops"] == drops
    assert cached_sensitivity(path, measure, {"fraction": 0.3}, ["a"]) == (drops, True)
    assert len(calls) == 1
    cached_sensitivity(path, measure, {"fraction": 0.5}, ["a"])  # other settings: measured again
    cached_sensitivity(path, measure, {"fraction": 0.5}, ["a", "c"])  # a group it lacks: measured again
    assert len(calls) == 3
    path.write_text("{not json")
    assert cached_sensitivity(path, measure, {"fraction": 0.5})[1] is False


def test_analysis_config_validation() -> None:
    with pytest.raises(ValueError, match="Expected argument `fraction`"):
        SensitivityAnalysis(fraction=0)
    with pytest.raises(ValueError, match="Expected argument `batches`"):
        SensitivityAnalysis(batches=0)
    with pytest.raises(ValueError, match="Expected argument `metric`"):
        SensitivityAnalysis(metric="f1")
    assert SensitivityAnalysis(metric="loss").mode == "min"


@pytest.mark.fit
def test_callback_runs_the_analysis_once_and_reuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = session_module.measure_sensitivity

    def counting(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(session_module, "measure_sensitivity", counting)

    def callback() -> HierarchicalPruning:
        return HierarchicalPruning(
            target=0.4,
            levels=[LayerLevel()],
            sensitivity=SensitivityAnalysis(fraction=0.25, batches=1),
            end_epoch=2,
            measure_latency=False,
            verbose=False,
            round_to=4,
        )

    class StopAfterEpoch1(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch == 1:
                trainer.should_stop = True

    pl.seed_everything(0)
    cb = callback()
    model = TinyCNN()
    train, val = loaders(n=64, batch_size=32)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="logs", version="run")
    tr = trainer(tmp_path, [cb, StopAfterEpoch1()], max_epochs=4, logger=logger)
    tr.fit(model, train, val)
    assert len(cb.records) == 2  # events at epochs 0 and 1; the one at epoch 2 is left for the resume
    assert len(calls) == 1
    drops = cb.session.sensitivity_drops
    assert drops is not None
    assert set(drops) == set(cb.session.ledger.original_groups)
    assert cb.levels[0].wants_sensitivity  # the level has no mapping of its own: it took the analysis'
    # ... so the least sensitive layer lost at least as large a share of its width as the most sensitive one
    finite = {k: v for k, v in drops.items() if v != float("inf")}
    low, high = min(finite, key=finite.get), max(finite, key=finite.get)
    widths = {g.name: g.size for g in cb.session.graph.groups()}
    original = cb.session.ledger.original_widths
    if finite[low] < finite[high]:
        assert 1 - widths[low] / original[low] >= 1 - widths[high] / original[high]
    cache = tmp_path / "logs" / "run" / "hprune_sensitivity.json"
    assert json.loads(cache.read_text())["drops"] == pytest.approx(drops)

    # Resuming from a checkpoint: the analysis comes back with the callback's state, no new measurement.
    ckpt = tmp_path / "mid.ckpt"
    tr.save_checkpoint(ckpt)
    resumed = callback()
    tr2 = trainer(tmp_path, [resumed], max_epochs=4, logger=pl.loggers.CSVLogger(str(tmp_path), name="other"))
    tr2.fit(TinyCNN(), train, val, ckpt_path=str(ckpt))
    assert len(resumed.records) == 3  # the last event ran after the resume ...
    assert len(calls) == 1  # ... with the checkpointed analysis
    assert resumed.session.sensitivity_drops == pytest.approx(drops)
    assert resumed.records[-1]["removed"] == pytest.approx(0.4, abs=0.05)

    # A new run logging to the same directory reuses the JSON cache.
    pl.seed_everything(0)
    again = callback()
    trainer(tmp_path, [again, StopAfterEpoch1()], max_epochs=4, logger=logger).fit(TinyCNN(), train, val)
    assert len(calls) == 1
    assert again.session.sensitivity_drops == pytest.approx(drops)


@pytest.mark.fit
def test_callback_analysis_needs_validation_batches(tmp_path: Path) -> None:
    cb = HierarchicalPruning(
        target=0.3,
        levels=[LayerLevel()],
        sensitivity=SensitivityAnalysis(),
        end_epoch=0,
        measure_latency=False,
        verbose=False,
    )
    train, _ = loaders(n=32, batch_size=32)
    with pytest.raises(RuntimeError, match="validation dataloader"):
        trainer(tmp_path, [cb], max_epochs=1).fit(TinyCNN(), train)
