"""Levels composed coarse to fine in one callback; per-level callbacks; YAML configuration."""

import csv
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import yaml

from lightning_hprune import HierarchicalPruning
from lightning_hprune.callbacks.hierarchical import default_levels
from lightning_hprune.callbacks.levels import (
    BlockPruning,
    GlobalPruning,
    LayerPruning,
    UnitPruning,
    WindowPruning,
)
from lightning_hprune.cli import build_cli
from lightning_hprune.core.blocks import BlockLevel
from lightning_hprune.core.cost import measure_cost
from lightning_hprune.core.engine import run_event
from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.importance import MagnitudeImportance
from lightning_hprune.core.levels import GlobalLevel, LayerLevel, UnitLevel, WindowLevel
from tests.helpers import TinyCNN, loaders, trainer
from tests.test_blocks import IDENTITY_BLOCKS, TinyResNet, TinyViT

ROOT = Path(__file__).resolve().parents[1]


def read_metrics(t):
    with open(os.path.join(t.logger.log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def read_report(t):
    with open(os.path.join(t.log_dir, "hprune_report.json")) as f:
        return json.load(f)


def fit(tmp_path, model, cb, max_epochs=3, **kwargs):
    t = trainer(tmp_path, [cb], max_epochs=max_epochs, **kwargs)
    train, val = loaders()
    t.fit(model, train, val)
    return t


# ---------------------------------------------------------------- the default composition
def test_default_composition_is_blocks_then_global():
    levels = default_levels()
    assert [type(lv) for lv in levels] == [BlockLevel, GlobalLevel]
    assert [type(lv) for lv in HierarchicalPruning().levels] == [BlockLevel, GlobalLevel]
    assert default_levels()[0] is not levels[0]  # fresh objects for every callback


@pytest.mark.fit
def test_default_hierarchy_on_a_residual_net_removes_blocks_and_channels(tmp_path):
    torch.manual_seed(0)
    model = TinyResNet()
    cb = HierarchicalPruning(
        target=0.6, start_epoch=0, end_epoch=2, round_to=2, measure_latency=False, verbose=False
    )
    t = fit(tmp_path, model, cb, max_epochs=4)
    report = read_report(t)
    assert report["achieved"] == pytest.approx(0.6, abs=0.03)
    removed = [n for n in IDENTITY_BLOCKS if isinstance(model.get_submodule(n), nn.Identity)]
    assert removed
    assert sorted(report["structure"]["removed_modules"]) == sorted(removed)
    levels = report["structure"]["levels"]
    assert sorted(levels["block"]["blocks_removed"]) == sorted(removed)
    assert levels["global"]["channels_removed"] > 0
    # The final structure: widths before/after per layer; layers inside removed blocks name their block.
    widths = report["structure"]["widths"]
    gone = {n: w for n, w in widths.items() if "removed_with" in w}
    assert gone
    assert all(w["after"] is None and w["removed_with"] in removed for w in gone.values())
    assert any(w["after"] is not None and w["after"] < w["before"] for w in widths.values())
    # Each level logs under its own namespace.
    rows = read_metrics(t)
    header = rows[0].keys()
    for key in ("hprune/block/blocks_removed", "hprune/block/macs_removed", "hprune/global/channels_removed"):
        assert key in header
    logged_blocks = sum(float(r["hprune/block/blocks_removed"] or 0) for r in rows)
    assert logged_blocks == len(removed)


@pytest.mark.fit
def test_default_hierarchy_on_a_plain_cnn_gives_the_block_share_to_the_channels(tmp_path):
    torch.manual_seed(0)
    cb = HierarchicalPruning(target=0.5, start_epoch=0, end_epoch=1, measure_latency=False, verbose=False)
    t = fit(tmp_path, TinyCNN(), cb)
    report = read_report(t)
    assert report["achieved"] == pytest.approx(0.5, abs=0.03)
    assert report["structure"]["levels"]["block"]["blocks_removed"] == []
    assert report["structure"]["levels"]["block"]["macs_removed"] == 0


def test_default_levels_on_a_transformer_remove_layers_then_width():
    torch.manual_seed(0)
    model = TinyViT(depth=4, dim=32)
    x = torch.randn(1, 6, 8)
    graph = PruningGraph(model, x)
    dense = measure_cost(model, x, "macs")
    steps = [(lv, dense * (1 - 0.5 * f)) for lv, f in zip(default_levels(), (0.5, 1.0), strict=True)]
    sizes = {g.name: g.size for g in graph.groups()}
    result = run_event(
        graph,
        steps,
        MagnitudeImportance(),
        "macs",
        sizes,
        8,
        0.002 * dense,
        calibration=[torch.randn(16, 6, 8)],
    )
    assert result.levels[0].blocks  # whole encoder blocks went first
    assert result.levels[1].removed  # then the MLP widths
    # Within one chunk of 8 hidden units (3 % of this tiny model's MACs) of the target.
    assert measure_cost(model, x, "macs") <= 0.53 * dense
    assert model(torch.randn(2, 6, 8)).shape == (2, 3)


# ---------------------------------------------------------------- shares, own schedules, catching up
@pytest.mark.fit
def test_a_coarse_level_catches_up_on_its_share_at_a_later_event(tmp_path):
    # A block costs ~20 % of TinyResNet's MACs; the block level owes half of 0.5 on a linear schedule:
    # 6.25 % after event 0 (no block fits), then 12.5 %, 18.75 %, 25 %: it removes blocks later (blocks
    # get cheaper as the global level thins them), and never more than its share.
    torch.manual_seed(0)
    model = TinyResNet()
    dense = measure_cost(model, model.example_input_array, "macs")
    block_fraction = 2 * 16 * 16 * 9 * 64 / dense
    assert 0.19 < block_fraction < 0.22
    levels = [BlockLevel(share=0.5), GlobalLevel(share=0.5)]
    cb = HierarchicalPruning(
        target=0.5,
        levels=levels,
        schedule="linear",
        start_epoch=0,
        end_epoch=3,
        round_to=2,
        measure_latency=False,
        verbose=False,
    )
    fit(tmp_path, model, cb, max_epochs=5)
    per_event = [r["levels"][0]["blocks"] for r in cb.records]
    assert per_event[0] == []
    assert sum(len(b) for b in per_event[1:]) >= 1
    block_removed = sum(r["levels"][0]["cost_before"] - r["levels"][0]["cost_after"] for r in cb.records)
    assert block_removed <= 0.25 * dense
    assert cb.records[-1]["removed"] == pytest.approx(0.5, abs=0.03)


@pytest.mark.fit
def test_a_level_with_its_own_constant_schedule_acts_in_full_at_the_first_event(tmp_path):
    torch.manual_seed(0)
    # The layer level owes 25 % of the MACs at once, more than its mapping gives (~12 %): it applies the whole
    # mapping at the first event, never more, and the global level does the rest.
    levels = [LayerLevel(ratios={"features.0": 0.5}, share=0.5, schedule="constant"), GlobalLevel(share=0.5)]
    cb = HierarchicalPruning(
        target=0.5,
        levels=levels,
        start_epoch=0,
        end_epoch=2,
        round_to=1,
        measure_latency=False,
        verbose=False,
    )
    fit(tmp_path, TinyCNN(widths=(32, 32, 32)), cb, max_epochs=4)
    first = cb.records[0]["levels"]
    assert first[0]["removed"] == {"features.0": 16}  # its whole ratio at event 0
    assert all(not r["levels"][0]["removed"] for r in cb.records[1:])
    assert cb.records[-1]["removed"] == pytest.approx(0.5, abs=0.03)


@pytest.mark.fit
def test_repeated_level_classes_log_under_distinct_names(tmp_path):
    levels = [GlobalLevel(share=0.5, max_layer_ratio=0.3), GlobalLevel(share=0.5)]
    cb = HierarchicalPruning(
        target=0.4, levels=levels, start_epoch=0, end_epoch=0, measure_latency=False, verbose=False
    )
    t = fit(tmp_path, TinyCNN(), cb, max_epochs=1)
    header = read_metrics(t)[0].keys()
    assert "hprune/global/channels_removed" in header
    assert "hprune/global_1/channels_removed" in header


# ---------------------------------------------------------------- per-level callbacks
# fine steps on these narrow layers (the window level aligns to its windows)
COMMON = {
    "measure_latency": False,
    "verbose": False,
    "start_epoch": 0,
    "end_epoch": 1,
    "round_to": 2,
    "importance": "l2",
}


@pytest.mark.fit
@pytest.mark.parametrize(
    ("make", "check"),
    [
        (lambda: GlobalPruning(target=0.4, max_layer_ratio=0.7, **COMMON), None),
        (lambda: LayerPruning(target=0.4, **COMMON), "uniform"),
        (
            lambda: LayerPruning(target=0.4, ratios={"features.0": 0.25, "features.[36]": 0.75}, **COMMON),
            "ratios",
        ),
        (lambda: WindowPruning(target=0.4, window_size=16, **{**COMMON, "round_to": 1}), "windows"),
        (lambda: UnitPruning(target=0.3, threshold=3.0, reference="mean", **COMMON), None),
    ],
    ids=["global", "layer-uniform", "layer-ratios", "window", "unit"],
)
def test_each_level_callback_prunes_during_fit(tmp_path, make, check):
    torch.manual_seed(0)
    callback = make()
    model = TinyCNN(widths=(32, 64, 48))
    t = fit(tmp_path, model, callback)
    report = read_report(t)
    # The final target is a minimum; coarse steps (layer-wise ratios move several layers at once) may
    # overshoot it by a few points.
    assert callback.target - 0.01 <= report["achieved"] <= callback.target + 0.05
    widths = {n: w["after"] for n, w in report["structure"]["widths"].items()}
    assert model.features[0].out_channels == widths["features.0"]
    if check == "windows":
        assert all(w % 16 == 0 for w in widths.values())
    if check == "ratios":
        assert widths["head.1"] == 32  # unmatched: untouched
        # Ratios reached together, in proportion 1:3 (within alignment to 2 channels).
        r0, r3, r6 = (
            1 - widths["features.0"] / 32,
            1 - widths["features.3"] / 64,
            1 - widths["features.6"] / 48,
        )
        assert r3 == pytest.approx(r6, abs=2 / 48)
        assert r0 == pytest.approx(r3 / 3, abs=2 / 32)
    if check == "uniform":
        ratios = [1 - widths[n] / s for n, s in (("features.0", 32), ("features.3", 64), ("features.6", 48))]
        assert max(ratios) - min(ratios) <= 2 / 32


@pytest.mark.fit
def test_block_pruning_on_a_plain_cnn_removes_nothing_and_says_so(tmp_path):
    cb = BlockPruning(target=0.3, start_epoch=0, end_epoch=0, measure_latency=False, verbose=False)
    with pytest.warns(UserWarning, match="removed 0.0% of macs"):
        t = fit(tmp_path, TinyCNN(), cb, max_epochs=1)
    assert read_report(t)["achieved"] == 0.0


@pytest.mark.fit
def test_cooperating_callbacks_with_conflicting_settings_are_refused_in_setup(tmp_path):
    cbs = [BlockPruning(target=0.2), GlobalPruning(target=0.4)]
    t = trainer(tmp_path, cbs, max_epochs=2)
    train, val = loaders()
    with pytest.raises(ValueError, match=r"pruning callbacks on one Trainer to share their settings") as err:
        t.fit(TinyResNet(), train, val)
    message = str(err.value)
    assert "BlockPruning(target=0.2" in message
    assert "GlobalPruning(target=0.4" in message
    assert "target: 0.2 vs 0.4" in message
    assert "HierarchicalPruning(levels=[BlockLevel(" in message
    assert t.global_step == 0


@pytest.mark.fit
def test_layer_pattern_matching_no_module_raises_in_setup(tmp_path):
    cb = LayerPruning(target=0.3, ratios={"backbone.*": 0.5})
    t = trainer(tmp_path, [cb], max_epochs=2)
    train, val = loaders()
    with pytest.raises(ValueError, match=r"\['backbone\.\*'\] matched none"):
        t.fit(TinyCNN(), train, val)
    assert t.global_step == 0


def test_level_callbacks_repr_and_state_keys_differ():
    a, b = GlobalPruning(target=0.4), WindowPruning(target=0.4)
    assert a.state_key != b.state_key
    assert "WindowLevel(" in repr(b)


# ---------------------------------------------------------------- YAML
EXPECTED = {
    "hierarchy_default.yaml": [BlockLevel, GlobalLevel],
    "hierarchy_block_global_window.yaml": [BlockLevel, GlobalLevel, WindowLevel],
    "hierarchy_layer_ratios.yaml": [LayerLevel],
    "hierarchy_unit_threshold.yaml": [GlobalLevel, UnitLevel],
    "hierarchy_blocks_only.yaml": [BlockLevel],
    "hierarchy_windows_only.yaml": [WindowLevel],
    "hierarchy_vit.yaml": [BlockLevel, LayerLevel, GlobalLevel],
}


def test_every_hierarchy_yaml_is_shipped_and_tested():
    shipped = {p.name for p in (ROOT / "examples").glob("hierarchy_*.yaml")}
    assert shipped == set(EXPECTED)


@pytest.mark.fit
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hierarchy_yaml_configures_its_levels(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(ROOT / "examples" / name)], run=False)
    [cb] = [c for c in cli.trainer.callbacks if hasattr(c, "session")]
    levels = cb.levels
    assert [type(lv) for lv in levels] == EXPECTED[name]
    config = yaml.safe_load((ROOT / "examples" / name).read_text())
    init = config["trainer"]["callbacks"][0]["init_args"]
    for lv, spec in zip(levels, init.get("levels", []), strict="levels" in init):
        for key, value in spec["init_args"].items():
            got = getattr(lv, key)
            assert (list(got) if isinstance(got, (list, tuple)) else got) == value, (name, key)
    if name == "hierarchy_layer_ratios.yaml":
        assert levels[0].ratios["features.[34].0"] == 0.7
    if name == "hierarchy_blocks_only.yaml":
        assert (levels[0].metric, levels[0].max_blocks, cb.target) == ("output", 3, 0.25)


@pytest.mark.fit
def test_hierarchy_yaml_runs_a_short_fit_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((ROOT / "examples" / "hierarchy_block_global_window.yaml").read_text())
    config["trainer"]["max_epochs"] = 2
    config["data"]["init_args"]["limit"] = 128
    config["model"]["init_args"] = {"widths": [8, 16, 16], "blocks": [2, 2, 2]}
    config["trainer"]["callbacks"][0]["init_args"].update(
        end_epoch=0, target=0.4, round_to=4, importance="l2"
    )
    config["trainer"]["callbacks"][0]["init_args"]["levels"][2]["init_args"]["window_size"] = 4
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path)])
    [cb] = [c for c in cli.trainer.callbacks if isinstance(c, HierarchicalPruning)]
    assert cb.event_index == 1
    assert cb.records[-1]["removed"] == pytest.approx(0.4, abs=0.03)
    assert [lv["level"] for lv in cb.records[-1]["levels"]] == ["block", "global", "window"]
    assert cb.records[-1]["levels"][0]["blocks"]  # the block level acted in full at the first event
    assert (tmp_path / "logs" / "hierarchy_block_global_window").is_dir()


@pytest.mark.fit
def test_vit_yaml_prunes_blocks_and_heads_through_the_cli(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((ROOT / "examples" / "hierarchy_vit.yaml").read_text())
    config["trainer"]["max_epochs"] = 2
    config["data"]["init_args"]["limit"] = 128
    config["model"]["init_args"] = {"embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}
    config["trainer"]["callbacks"][0]["init_args"].update(start_epoch=0, end_epoch=0, target=0.5)
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path)])
    [cb] = [c for c in cli.trainer.callbacks if isinstance(c, HierarchicalPruning)]
    assert cb.records[-1]["removed"] >= 0.5 - 1e-6
    ops = [h["op"] for h in cb.history_steps()]
    assert "identity" in ops  # a whole encoder block
    assert "heads" in ops  # the layer level's head ratio
    vit = cli.model.vit
    for block in vit.blocks:
        if hasattr(block, "attn"):
            assert block.attn.qkv.out_features == 3 * block.attn.num_heads * block.attn.head_dim
    assert cli.model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


# ---------------------------------------------------------------- the benchmark runs
@pytest.mark.fit
def test_hierarchy_benchmark_quick_run_prints_its_table(capsys):
    from benchmarks.hierarchy import main

    args = ["--quick", "--models", "digits_resnet", "--methods", "dense", "hierarchy", "--targets", "0.5"]
    threads = torch.get_num_threads()
    try:
        rows = main(args)
    finally:
        torch.set_num_threads(threads)  # the benchmark trains on one thread
    assert [(r["method"], r["target"]) for r in rows] == [("dense", 0.0), ("hierarchy", 0.5)]
    dense, pruned = rows
    assert dense["macs"] / pruned["macs"] >= 2.0  # the final target is a minimum
    assert pruned["blocks_removed"] >= 1
    assert pruned["latency_ms"] > 0
    out = capsys.readouterr().out
    assert "| digits_resnet | 0.50 | hierarchy |" in out


@pytest.mark.fit
def test_default_hierarchy_on_a_vit_removes_encoder_blocks_then_widths(tmp_path):
    """`HierarchicalPruning()` on a transformer: whole encoder blocks first, then channels (no arguments)."""
    pytest.importorskip("timm")
    from lightning_hprune.examples.digits import DigitsDataModule, DigitsViT

    pl.seed_everything(0)
    cb = HierarchicalPruning(target=0.5, start_epoch=0, end_epoch=3, measure_latency=False, verbose=False)
    model = DigitsViT(embed_dim=64, depth=8, num_heads=2)
    pl.Trainer(
        max_epochs=4,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
        limit_val_batches=1,
        default_root_dir=tmp_path,
    ).fit(model, DigitsDataModule(limit=128))
    blocks = [b for r in cb.records for lv in r["levels"] for b in lv.get("blocks", [])]
    assert blocks, cb.records
    assert all(b.startswith("vit.blocks.") for b in blocks)
    # The target is a minimum. Since MACs include the attention products (math SDPA), the last step on this
    # 64-wide ViT is the cheapest closing chunk, one head of 2 (about 3 % of the MACs): the bound allows one.
    assert 0.5 <= cb.summary["achieved"] <= 0.535
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


# ---------------------------------------------------------------- cooperating callbacks
@pytest.mark.fit
def test_cooperating_callbacks_end_like_one_hierarchy(tmp_path):
    common = {"target": 0.6, "start_epoch": 0, "end_epoch": 2, "round_to": 2, "measure_latency": False}

    def run(callbacks, sub):
        pl.seed_everything(0)
        model = TinyResNet()
        t = trainer(tmp_path / sub, callbacks, max_epochs=4)
        train, val = loaders()
        t.fit(model, train, val)
        t.save_checkpoint(tmp_path / sub / "last.ckpt")
        return model, t

    pair = [
        BlockPruning(share=0.25, verbose=False, **common),
        GlobalPruning(share=0.75, verbose=False, **common),
    ]
    one = HierarchicalPruning(
        levels=[BlockLevel(share=0.25), GlobalLevel(share=0.75)], verbose=False, **common
    )
    model_a, t_a = run(pair, "pair")
    model_b, t_b = run([one], "one")

    # The same structure: blocks first, then channels, on one graph with one schedule.
    leader, member = pair
    assert leader.history_steps() == one.history_steps()
    assert {h["op"] for h in one.history_steps()} == {"identity", "channels"}
    assert {n: p.shape for n, p in model_a.named_parameters()} == {
        n: p.shape for n, p in model_b.named_parameters()
    }
    assert [type(lv) for lv in leader.session.levels] == [BlockLevel, GlobalLevel]
    assert member.event_index == leader.event_index == 3  # the member reads the leader's session
    assert member.records == leader.records
    # One report, with both levels in it.
    report = read_report(t_a)
    assert set(report["structure"]["levels"]) == {"block", "global"}
    assert report["structure"] == read_report(t_b)["structure"]
    # One checkpoint entry each: the leader's holds the state, the member's points at it.
    ckpt = torch.load(tmp_path / "pair" / "last.ckpt", weights_only=True)
    entries = {k: v for k, v in ckpt["callbacks"].items() if v.get("marker") == "lightning_hprune"}
    assert set(entries) == {leader.state_key, member.state_key}
    assert entries[member.state_key]["member_of"] == leader.state_key
    assert entries[leader.state_key]["version"] == 2
    from lightning_hprune import load_pruned

    loaded = load_pruned(TinyResNet, tmp_path / "pair" / "last.ckpt")
    assert {n: p.shape for n, p in loaded.named_parameters()} == {
        n: p.shape for n, p in model_a.named_parameters()
    }
