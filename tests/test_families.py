"""Known layouts (Hugging Face decoders and encoders): layers, heads, key/value groups, FFN and hidden width,
pruned by their structure with the config kept true, and reloaded by plain transformers."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_hprune import BlockLevel, GlobalLevel, LayerLevel
from lightning_hprune.core.families import TransformerFamily, detect
from lightning_hprune.core.families.pretrained import PerLayerWidthsError, config_mismatches
from lightning_hprune.core.graph import PruningError, PruningGraph
from lightning_hprune.core.measure import count_macs
from lightning_hprune.core.schedules import EventSchedule
from lightning_hprune.core.session import PruningSession
from lightning_hprune.hf import save_pretrained
from tests.zoo import BY_NAME, FAMILY_CASES, Case, logits

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", message=".*token_id.*")


def shape_of(family: TransformerFamily) -> dict[str, int]:
    layers = family._read()
    return {
        "layers": len(layers),
        "heads": layers[0].heads,
        "kv": layers[0].kv,
        "ffn": layers[0].ffn,
        "hidden": family.hidden_size(),
        "head_dim": layers[0].head_dim,
        "all_layers": len(family._all_layers()),  # with a decoder stack (BART): both stacks
    }


def prune_every_kind(case: Case, uniform: bool = True) -> tuple[torch.nn.Module, PruningSession]:
    """One event of each kind: a layer, then half of every width kind the layout offers."""
    torch.manual_seed(0)
    model = case.build().eval()
    ratios = {"heads": 0.5, "kv": 0.5, "ffn": 0.5, "hidden": 0.25, "*:heads": 0.5, "*:kv": 0.5, "*:ffn": 0.5}
    session = PruningSession(
        [BlockLevel(max_blocks=1, share=0.5, schedule="constant"), LayerLevel(ratios=ratios, share=0.5)],
        target=0.6,
        schedule=EventSchedule(0, 1),
        round_to=4,
        measure_latency=False,
        uniform_widths=uniform,
    )
    session.use_example_input(case.inputs(batch=1))
    for epoch in range(2):
        plan = session.plan(model)
        session.record(model, plan, session.execute(model, plan), epoch=epoch, step=epoch)
    return model, session


@pytest.mark.parametrize("case", FAMILY_CASES, ids=lambda c: c.name)
def test_each_family_prunes_layers_heads_ffn_and_hidden_with_a_true_config(case: Case) -> None:
    model, session = prune_every_kind(case)
    family = session.graph.family if session.graph is not None else None
    assert isinstance(family, TransformerFamily)
    dense_model = case.build()
    dense = shape_of(TransformerFamily.detect(dense_model))  # type: ignore[arg-type]
    now = shape_of(family)
    protected = session.graph.protected_groups
    if case.layers:
        assert now["all_layers"] == dense["all_layers"] - 1  # a whole layer left its layer list
    else:  # ALBERT: one shared layer, run num_hidden_layers times
        assert now["layers"] == dense["layers"]
        assert "layers" in protected
    if case.hidden or not case.derived_heads:
        assert now["heads"] < dense["heads"]
    else:  # the head size is hidden / heads and the hidden size is protected
        assert now["heads"] == dense["heads"]
        assert "heads" in protected
    assert now["heads"] % now["kv"] == 0  # query heads stay grouped by key/value head
    assert now["ffn"] < dense["ffn"]
    if case.hidden:
        assert now["hidden"] < dense["hidden"]
    else:
        assert now["hidden"] == dense["hidden"]
        assert "hidden" in protected
    assert now["head_dim"] == dense["head_dim"]  # heads are never cut through (rotary dims intact)
    if case.derived_heads:
        assert now["hidden"] == now["heads"] * now["head_dim"]  # the head size the config derives is kept
    assert config_mismatches(model) == []  # the config describes the modules
    cfg = family.config
    layer_count = now["layers"] if family.layout.layer_count_key else dense_model.config.num_hidden_layers
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size) == (
        layer_count,
        now["heads"],
        now["hidden"],
    )
    if family.layout.kv_key:
        assert getattr(cfg, family.layout.kv_key) == now["kv"]
    assert getattr(cfg, family.layout.intermediate_key) == now["ffn"]
    for layout in family.stacks():  # renumbered for key/value caches, per layer list
        stack = family._layer_list(layout)
        indices = [m.layer_idx for m in stack.modules() if isinstance(m.__dict__.get("layer_idx"), int)]
        if indices:
            assert sorted(set(indices)) == list(range(len(stack)))
    # The model still runs, keeps its output shape and trains.
    x = case.inputs()
    out = logits(model.train(), x)
    assert out.shape == logits(case.build(), x).shape
    out.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if case.causal:
        generated = model.eval().generate(x["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
        assert generated.shape == (1, 7)
    if case.seq2seq:  # the decoder's tokens: the start token and three new ones
        generated = model.eval().generate(
            x["input_ids"][:1], max_new_tokens=3, min_new_tokens=3, do_sample=False
        )
        assert generated.shape == (1, 4)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_the_recorded_history_replays_on_a_fresh_model(name: str) -> None:
    case = BY_NAME[name]
    model, session = prune_every_kind(case)
    fresh = case.build().eval()
    PruningGraph(fresh, case.inputs(batch=1)).replay(session.ledger.history)
    assert {n: p.shape for n, p in fresh.named_parameters()} == {
        n: p.shape for n, p in model.named_parameters()
    }
    fresh.load_state_dict(model.state_dict())
    x = case.inputs()
    torch.testing.assert_close(logits(fresh, x), logits(model.eval(), x))


def test_grouping_a_llama_decoder_needs_no_trace() -> None:
    """torch-pruning's grouping of Llama-style decoders does not finish (transformers 5): the layout is read."""
    model = BY_NAME["llama"].build()
    before = PruningGraph.builds
    graph = PruningGraph(model, BY_NAME["llama"].inputs(batch=1))
    assert graph._dg is None  # nothing traced
    assert PruningGraph.builds == before + 1
    names = {g.name: g.size for g in graph.groups()}
    assert names == {"kv": 2, "heads": 4, "ffn": 96, "hidden": 64}


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_per_layer_widths_refuse_save_pretrained(name: str, tmp_path: Path) -> None:
    case = BY_NAME[name]
    torch.manual_seed(0)
    model = case.build().eval()
    session = PruningSession(
        [GlobalLevel()],
        target=0.4,
        schedule=EventSchedule(0, 0),
        round_to=4,
        measure_latency=False,
        uniform_widths=False,
    )
    session.use_example_input(case.inputs(batch=1))
    groups = {g.name for g in session.attach(model).groups()}
    assert "model.layers.0:ffn" in groups  # a group per layer
    plan = session.plan(model)
    session.record(model, plan, session.execute(model, plan), epoch=0, step=0)
    family = detect(model)
    assert isinstance(family, TransformerFamily)
    assert not family.uniform(model)
    for save in (model.save_pretrained, lambda d: save_pretrained(model, d)):
        with pytest.raises(PerLayerWidthsError, match=r"layers have different widths.*load_pruned"):
            save(str(tmp_path / "out"))
    assert not (tmp_path / "out" / "config.json").exists()


def reference_macs(model: torch.nn.Module, inputs: dict) -> int:
    """FlopCounterMode with grad on and fast paths off (math attention): what the issue measures against."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("case", FAMILY_CASES, ids=lambda c: c.name)
def test_macs_match_the_flop_counter_before_and_after_pruning(case: Case) -> None:
    model = case.build().eval()
    x = case.inputs(batch=1)
    assert count_macs(model, x).total == pytest.approx(reference_macs(model, x), rel=0.01)
    model, _ = prune_every_kind(case)
    model.eval()
    assert count_macs(model, x).total == pytest.approx(reference_macs(model, x), rel=0.01)


def test_torch_transformer_encoder_macs_are_counted_despite_its_fast_path() -> None:
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(1, 16, 64)
    with torch.no_grad():
        naive = FlopCounterMode(display=False)
        with naive:
            encoder(x)
    assert naive.get_total_flops() == 0  # what counting under no_grad used to see
    assert count_macs(encoder, x).total == pytest.approx(reference_macs(encoder, x), rel=0.01)
    assert count_macs(encoder, x).total > 1_000_000


@pytest.mark.fit
def test_pruned_models_round_trip_through_plain_from_pretrained_in_a_fresh_process(tmp_path: Path) -> None:
    expected = {}
    for case in FAMILY_CASES:
        model, _ = prune_every_kind(case)
        model.eval()
        x = case.inputs()
        directory = tmp_path / case.name
        save_pretrained(model, directory)
        torch.save({"inputs": x, "logits": logits(model, x).detach()}, directory / "reference.pt")
        generated = None
        if case.causal or case.seq2seq:
            generated = model.generate(x["input_ids"][:1, :4], max_new_tokens=4, do_sample=False).tolist()
        expected[case.name] = {"auto": case.auto, "generated": generated}
    (tmp_path / "cases.json").write_text(json.dumps(expected))
    code = (
        "import json, sys, torch, warnings, transformers\n"
        "warnings.filterwarnings('ignore')\n"
        "root = sys.argv[1]\n"
        "out = {}\n"
        "for name, case in json.load(open(root + '/cases.json')).items():\n"
        "    model = getattr(transformers, case['auto']).from_pretrained(root + '/' + name).eval()\n"
        "    ref = torch.load(root + '/' + name + '/reference.pt')\n"
        "    res = model(**ref['inputs'])\n"
        "    got = res.logits if getattr(res, 'logits', None) is not None else res[0]\n"
        "    gen = None\n"
        "    if case['generated'] is not None:\n"
        "        gen = model.generate(ref['inputs']['input_ids'][:1, :4], max_new_tokens=4, do_sample=False).tolist()\n"
        "    out[name] = {'diff': float((got - ref['logits']).abs().max()), 'generated': gen,\n"
        "                 'hprune': 'lightning_hprune' in sys.modules}\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(expected)
    for name, r in results.items():
        assert r["hprune"] is False  # plain transformers: the library was never imported
        assert r["diff"] <= 1e-5, name
        assert r["generated"] == expected[name]["generated"], name


def test_t5_removes_the_same_heads_from_every_layer_with_their_position_bias() -> None:
    """Layer 0's relative position bias (one column per head) is added to every layer's scores: a head goes
    from every layer at once, with its column, and the model equals the dense one without those heads."""
    import copy

    from lightning_hprune.core.importance import RandomImportance

    case = BY_NAME["t5-encoder"]
    torch.manual_seed(0)
    model = case.build().eval()
    dense = copy.deepcopy(model)
    graph = PruningGraph(model, case.inputs(batch=1))
    [heads] = [g for g in graph.groups() if g.name == "heads"]
    assert heads.shared
    assert heads.size == 4
    assert len(heads.slots) == 3
    torch.manual_seed(1)
    heads.score(RandomImportance())
    removals = heads.expand([0, 1])
    gone = {tuple(v) for v in removals.values()}
    assert len(gone) == 1  # the same heads in every layer
    [drop] = gone
    graph.prune(removals)
    d, kept = 12, [h for h in range(4) if h not in drop]
    block0 = model.transformer.encoder.block[0].layer[0].SelfAttention
    dense0 = dense.transformer.encoder.block[0].layer[0].SelfAttention
    torch.testing.assert_close(
        block0.relative_attention_bias.weight, dense0.relative_attention_bias.weight[:, kept]
    )
    assert (block0.n_heads, block0.inner_dim, model.config.num_heads) == (2, 24, 2)
    with torch.no_grad():  # the dense model without those heads: their output columns zeroed in every layer
        for block in dense.transformer.encoder.block:
            for h in drop:
                block.layer[0].SelfAttention.o.weight[:, h * d : (h + 1) * d] = 0
    x = case.inputs()
    torch.testing.assert_close(logits(model, x), logits(dense, x))


def test_t5_layer_0_is_never_removed_and_albert_layers_are_not_removable() -> None:
    t5 = BY_NAME["t5-encoder"].build()
    family = detect(t5)
    assert isinstance(family, TransformerFamily)
    assert family.removable_layers(t5) == ["transformer.encoder.block.1", "transformer.encoder.block.2"]
    with pytest.raises(PruningError, match="relative_attention_bias"):
        family.remove_layers(t5, ["transformer.encoder.block.0"])
    assert len(t5.transformer.encoder.block) == 3
    albert = BY_NAME["albert"].build()
    family = detect(albert)
    assert isinstance(family, TransformerFamily)
    assert family.removable_layers(albert) == []
    graph = PruningGraph(albert, BY_NAME["albert"].inputs(batch=1))
    assert {g.name for g in graph.groups()} == {"heads", "ffn"}  # heads take their hidden channels with them
    assert "num_hidden_layers times" in graph.protected_groups["layers"]
    with pytest.raises(PruningError, match="repeated"):
        family.remove_layers(albert, family.layers(albert))
    assert albert.config.num_hidden_layers == 3


def _swin(**overrides: object) -> torch.nn.Module:
    """A tiny random Swin (2 stages of 2 blocks, 8 x 8 patches, windows of 4), weights perturbed off init."""
    transformers = pytest.importorskip("transformers")
    kwargs: dict = {
        "image_size": 32,
        "patch_size": 4,
        "embed_dim": 16,
        "depths": [2, 2],
        "num_heads": [2, 4],
        "window_size": 4,
        "mlp_ratio": 4.0,
        "num_labels": 3,
    }
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = transformers.SwinForImageClassification(transformers.SwinConfig(**kwargs)).eval()
    with torch.no_grad():  # the bias tables start at zero: give every parameter something to lose
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


SWIN_X = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def _rebuilt(model: torch.nn.Module) -> torch.nn.Module:
    """A model built from ``model``'s config alone, with its weights: what plain ``from_pretrained`` gives."""
    import copy

    fresh = type(model)(copy.deepcopy(model.config)).eval()
    fresh.load_state_dict(model.state_dict())
    return fresh


def test_swin_is_a_known_layout_with_tied_heads_and_mlp_groups() -> None:
    from lightning_hprune.core.families import SwinFamily

    model = _swin()
    family = detect(model)
    assert isinstance(family, SwinFamily)
    assert config_mismatches(model) == []
    graph = PruningGraph(model, {"pixel_values": SWIN_X["pixel_values"][:1]})
    assert graph._dg is None  # nothing traced
    groups = {g.name: g for g in graph.groups()}
    assert set(groups) == {"heads", "ffn"}
    assert graph.protected_groups == {}
    # one head unit: a stage-0 head (8 channels of embed_dim 16), 2 heads and 16 channels of stage 1
    heads = groups["heads"]
    assert (heads.size, heads.kind) == (2, "heads")
    per_unit = {s.name: s.per_unit for s in heads.slots}
    assert per_unit["swin.encoder.layers.0:hidden"] == 8
    assert per_unit["swin.encoder.layers.1:hidden"] == 16
    assert per_unit["swin.encoder.layers.0.blocks.1:heads"] == 1
    assert per_unit["swin.encoder.layers.1.blocks.0:heads"] == 2
    # one MLP unit: a channel of every stage-0 MLP, 2 of every stage-1 MLP
    assert groups["ffn"].size == 64
    assert {s.name: s.per_unit for s in groups["ffn"].slots}["swin.encoder.layers.1.blocks.1:ffn"] == 2
    # only the last block of each stage may go: the shifted-window pattern stays what the config rebuilds
    assert family.removable_layers(model) == [
        "swin.encoder.layers.0.blocks.1",
        "swin.encoder.layers.1.blocks.1",
    ]
    with pytest.raises(PruningError, match="shifted windows"):
        family.remove_layers(model, ["swin.encoder.layers.0.blocks.0"])
    with pytest.raises(PruningError, match="keeps at least one"):
        family.remove_layers(model, ["swin.encoder.layers.0.blocks.0", "swin.encoder.layers.0.blocks.1"])


def test_swin_heads_and_mlp_channels_go_exactly() -> None:
    """A removed head (with its bias-table column) equals the dense model with the head's output-projection
    columns zeroed; a removed MLP channel equals its ``fc2`` column zeroed."""
    import copy

    model = _swin()
    dense = copy.deepcopy(model)
    family = detect(model)
    assert family is not None
    plan = {
        "swin.encoder.layers.0.blocks.1:heads": [0],
        "swin.encoder.layers.1.blocks.0:heads": [1, 3],
        "swin.encoder.layers.1.blocks.1:ffn": [0, 5, 7],
    }
    before = (
        model.swin.encoder.layers[1].blocks[0].attention.relative_position_bias.relative_position_bias_table
    )
    before = before.detach().clone()
    PruningGraph(model, SWIN_X, uniform=False).prune(plan)
    attn = model.swin.encoder.layers[1].blocks[0].attention
    torch.testing.assert_close(attn.relative_position_bias.relative_position_bias_table, before[:, [0, 2]])
    assert (attn.num_attention_heads, attn.head_dim, attn.o_proj.in_features) == (2, 8, 16)
    with torch.no_grad():
        dense.swin.encoder.layers[0].blocks[1].attention.o_proj.weight[:, 0:8] = 0
        for h in (1, 3):
            dense.swin.encoder.layers[1].blocks[0].attention.o_proj.weight[:, h * 8 : (h + 1) * 8] = 0
        dense.swin.encoder.layers[1].blocks[1].mlp.fc2.weight[:, [0, 5, 7]] = 0
        torch.testing.assert_close(model(**SWIN_X).logits, dense(**SWIN_X).logits)
    # per-layer widths: no SwinConfig describes them, so the model's own save_pretrained refuses
    assert config_mismatches(model)
    with pytest.raises(PerLayerWidthsError, match="load_pruned"):
        model.save_pretrained("/nonexistent/never-written")


def prune_swin(model: torch.nn.Module) -> PruningSession:
    """One event of each kind in uniform mode: a block, then half of the heads and MLP widths."""
    session = PruningSession(
        [
            BlockLevel(max_blocks=1, share=0.5, schedule="constant"),
            LayerLevel(ratios={"heads": 0.5, "ffn": 0.5}),
        ],
        target=0.6,
        schedule=EventSchedule(0, 1),
        round_to=4,
        measure_latency=False,
    )
    session.use_example_input({"pixel_values": SWIN_X["pixel_values"][:1]})
    for epoch in range(2):
        plan = session.plan(model)
        session.record(model, plan, session.execute(model, plan), epoch=epoch, step=epoch)
    return session


def test_swin_prunes_heads_mlp_and_a_block_with_a_true_config() -> None:
    model = _swin()
    x = SWIN_X
    assert count_macs(model, x).total == pytest.approx(reference_macs(model, x), rel=0.01)
    session = prune_swin(model)
    cfg = model.config
    stages = model.swin.encoder.layers
    assert cfg.embed_dim == 8  # half the heads, head size 8 kept
    assert list(cfg.num_heads) == [1, 2]
    assert list(cfg.depths) in ([1, 2], [2, 1])  # the last block of one stage left
    assert [len(s.blocks) for s in stages] == list(cfg.depths)
    for i, stage in enumerate(stages):
        for block in stage.blocks:
            assert block.attention.head_dim == 8
            assert block.attention.num_attention_heads == cfg.num_heads[i]
            assert block.mlp.fc1.out_features == int(cfg.mlp_ratio * cfg.embed_dim * 2**i) < 4 * 16 * 2**i
            table = block.attention.relative_position_bias.relative_position_bias_table
            assert table.shape[1] == cfg.num_heads[i]
    assert config_mismatches(model) == []
    rebuilt = _rebuilt(model)  # the config alone builds the same model: same shifts, same outputs
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**x).logits, model(**x).logits)
    assert count_macs(model, x).total == pytest.approx(reference_macs(model, x), rel=0.01)
    # the recorded history replays on a fresh model
    fresh = _swin()
    PruningGraph(fresh, {"pixel_values": x["pixel_values"][:1]}).replay(session.ledger.history)
    assert {n: p.shape for n, p in fresh.named_parameters()} == {
        n: p.shape for n, p in model.named_parameters()
    }
    assert fresh.config.to_dict() == model.config.to_dict()


@pytest.mark.fit
def test_pruned_swin_round_trips_through_plain_from_pretrained_in_a_fresh_process(tmp_path: Path) -> None:
    model = _swin()
    prune_swin(model)
    model.save_pretrained(tmp_path / "swin")
    with torch.no_grad():
        torch.save({"x": SWIN_X, "logits": model(**SWIN_X).logits}, tmp_path / "reference.pt")
    code = (
        "import sys, torch, warnings, transformers\n"
        "warnings.filterwarnings('ignore')\n"
        "m = transformers.AutoModelForImageClassification.from_pretrained(sys.argv[1] + '/swin').eval()\n"
        "ref = torch.load(sys.argv[1] + '/reference.pt')\n"
        "with torch.no_grad():\n"
        "    d = float((m(**ref['x']).logits - ref['logits']).abs().max())\n"
        "print(type(m).__name__, d, 'lightning_hprune' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, diff, imported = proc.stdout.split()
    assert name == "SwinForImageClassification"
    assert float(diff) <= 1e-5
    assert imported == "False"


def test_swin_heads_that_do_not_scale_with_the_stage_widths_are_protected() -> None:
    """Head sizes 12 and 16 (embed_dim 24, heads [2, 3]): the least cut of embed_dim that removes whole heads
    in both stages is all 24 channels, so the heads stay, with the reason; the MLP still prunes."""
    model = _swin(embed_dim=24, num_heads=[2, 3])
    graph = PruningGraph(model, SWIN_X)
    assert {g.name for g in graph.groups()} == {"ffn"}
    assert "head size" in graph.protected_groups["heads"]
    [ffn] = graph.groups()
    from lightning_hprune.core.importance import MagnitudeImportance

    ffn.score(MagnitudeImportance())
    graph.prune(ffn.expand(list(range(32))))
    assert config_mismatches(model) == []
    with torch.no_grad():
        torch.testing.assert_close(_rebuilt(model)(**SWIN_X).logits, model(**SWIN_X).logits)


def test_swin_per_layer_widths_prune_each_block_and_stage_and_refuse_save_pretrained(tmp_path: Path) -> None:
    model = _swin()
    session = PruningSession(
        [GlobalLevel()],
        target=0.5,
        schedule=EventSchedule(0, 0),
        round_to=4,
        measure_latency=False,
        uniform_widths=False,
    )
    session.use_example_input({"pixel_values": SWIN_X["pixel_values"][:1]})
    names = {g.name for g in session.attach(model).groups()}
    assert {"swin.encoder.layers.1.blocks.0:heads", "swin.encoder.layers.0.blocks.1:ffn"} <= names
    assert {"swin.encoder.layers.0:hidden", "swin.encoder.layers.1:hidden"} <= names
    plan = session.plan(model)
    session.record(model, plan, session.execute(model, plan), epoch=0, step=0)
    assert model(**SWIN_X).logits.shape == (2, 3)
    assert count_macs(model, SWIN_X).total == pytest.approx(reference_macs(model, SWIN_X), rel=0.01)
    assert config_mismatches(model)
    with pytest.raises(PerLayerWidthsError, match="load_pruned"):
        model.save_pretrained(str(tmp_path / "out"))
    assert not (tmp_path / "out" / "config.json").exists()


# ---------------------------------------------------------------------- BART: an encoder-decoder, two stacks
def _bart(**config: object) -> torch.nn.Module:
    import transformers

    from tests.zoo import _bart_kwargs

    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(transformers.BartConfig(**_bart_kwargs(**config))).eval()


def test_bart_ties_encoder_heads_decoder_heads_cross_attention_heads_and_d_model() -> None:
    model = _bart()
    graph = PruningGraph(model, BY_NAME["bart-gen"].inputs(batch=1))
    groups = {g.name: g for g in graph.groups()}
    assert set(groups) == {"heads", "ffn", "decoder:ffn"}
    assert graph.protected_groups == {}
    slots = {s.name: s.per_unit for s in groups["heads"].slots}
    assert slots == {
        **{f"model.encoder.layers.{i}:kv": 1 for i in range(3)},
        **{f"model.decoder.layers.{i}:kv": 1 for i in range(2)},
        **{f"model.decoder.layers.{i}.encoder_attn:kv": 1 for i in range(2)},
        "hidden": 12,  # a head takes head_dim = 12 channels of d_model with it
    }
    assert groups["heads"].size == 4
    assert len(groups["decoder:ffn"].slots) == 2
    assert groups["decoder:ffn"].size == 80
    family = graph.family
    assert isinstance(family, TransformerFamily)
    assert family.removable_layers(model)[-2:] == ["model.decoder.layers.0", "model.decoder.layers.1"]
    # every stack keeps a layer: the whole decoder cannot go, even with encoder layers left
    assert not family.can_remove_layers(model, ["model.decoder.layers.0", "model.decoder.layers.1"])
    with pytest.raises(PruningError, match=r"Cannot remove all 2 layers of model\.decoder\.layers"):
        family.remove_layers(model, ["model.decoder.layers.0", "model.decoder.layers.1"])
    assert len(model.model.decoder.layers) == 2


def test_bart_decoder_ffn_and_attention_heads_are_removed_exactly() -> None:
    """Removing FFN units and heads (self- and cross-attention, per layer) equals the dense model with them
    zeroed: their down-projection / output-projection columns."""
    import copy

    model = _bart()
    dense = copy.deepcopy(model)
    graph = PruningGraph(model, BY_NAME["bart-gen"].inputs(batch=1), uniform=False)
    removals = {
        "model.decoder.layers.0:ffn": [3, 17, 40],
        "model.encoder.layers.1:ffn": [0, 79],
        "model.decoder.layers.1:kv": [2],
        "model.decoder.layers.0.encoder_attn:kv": [0, 3],
        "model.encoder.layers.2:kv": [1],
    }
    graph.prune(removals)
    d = 12
    with torch.no_grad():
        for name, units in removals.items():
            layer = name.rpartition(":")[0]
            if name.endswith(":ffn"):
                dense.get_submodule(f"{layer}.fc2").weight[:, units] = 0
            else:
                attn = layer if layer.endswith("encoder_attn") else f"{layer}.self_attn"
                for h in units:
                    dense.get_submodule(f"{attn}.out_proj").weight[:, h * d : (h + 1) * d] = 0
    cross = model.model.decoder.layers[0].encoder_attn
    assert (cross.num_heads, cross.q_proj.out_features, cross.k_proj.out_features) == (2, 24, 24)
    assert model.model.decoder.layers[0].self_attn.num_heads == 4
    x = BY_NAME["bart-gen"].inputs()
    torch.testing.assert_close(logits(model, x), logits(dense, x))
    problems = config_mismatches(model)  # per-layer widths: no config value describes them
    assert problems
    assert "layers have different widths" in problems[0]


def test_bart_with_other_head_counts_in_the_decoder_cuts_d_model_in_lcm_steps() -> None:
    """Encoder 4 heads of 12, decoder 6 heads of 8 (d_model 48): d_model can only shrink in multiples of
    lcm(12, 8) = 24, each step taking 2 encoder heads and 3 decoder heads."""
    import copy
    import warnings

    from lightning_hprune.core.importance import MagnitudeImportance

    model = _bart(decoder_attention_heads=6)
    x = BY_NAME["bart-gen"].inputs(batch=1)
    graph = PruningGraph(model, x)
    [heads] = [g for g in graph.groups() if g.name == "heads"]
    assert heads.size == 2
    assert {s.name: s.per_unit for s in heads.slots if "layers.0" in s.name or s.name == "hidden"} == {
        "model.encoder.layers.0:kv": 2,
        "model.decoder.layers.0:kv": 3,
        "model.decoder.layers.0.encoder_attn:kv": 3,
        "hidden": 24,
    }
    heads.score(MagnitudeImportance())
    graph.prune(heads.expand([0]))
    cfg = model.config
    assert (cfg.d_model, cfg.encoder_attention_heads, cfg.decoder_attention_heads) == (24, 2, 3)
    assert config_mismatches(model) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rebuilt = type(model)(copy.deepcopy(cfg))
    assert {n: p.shape for n, p in rebuilt.state_dict().items()} == {
        n: p.shape for n, p in model.state_dict().items()
    }
    assert count_macs(model, x).total == pytest.approx(reference_macs(model, x), rel=0.01)
    # 4 heads of 12 against 3 heads of 16: the least common multiple is d_model itself, nothing can go
    graph = PruningGraph(_bart(decoder_attention_heads=3), x)
    assert {g.name for g in graph.groups()} == {"ffn", "decoder:ffn"}
    assert "multiples of 48, and d_model is 48" in graph.protected_groups["heads"]
    assert "hidden" in graph.protected_groups


def test_bart_with_scaled_embeddings_protects_d_model_and_heads() -> None:
    graph = PruningGraph(_bart(scale_embedding=True), BY_NAME["bart-gen"].inputs(batch=1))
    assert {g.name for g in graph.groups()} == {"ffn", "decoder:ffn"}
    assert "scale_embedding=True" in graph.protected_groups["hidden"]
    assert "hidden size is protected" in graph.protected_groups["heads"]


def test_a_bare_bart_model_keeps_d_model_when_its_last_norm_is_ignored() -> None:
    """``BartModel`` outputs d_model itself: with the decoder's last norm ignored, heads and d_model stay."""
    import transformers

    from tests.zoo import _bart_kwargs

    torch.manual_seed(0)
    model = transformers.BartModel(transformers.BartConfig(**_bart_kwargs())).eval()
    x = BY_NAME["bart-cls"].inputs(batch=1)
    graph = PruningGraph(model, x, ignored_layers=[model.decoder.layers[-1].final_layer_norm])
    assert {g.name for g in graph.groups()} == {"ffn", "decoder:ffn"}
    assert graph.protected_groups == {"heads": "an ignored layer's output width would change"}
    graph = PruningGraph(model, x)  # not ignored: d_model (the output's width) goes with the heads
    assert {g.name: g.size for g in graph.groups()} == {"heads": 4, "ffn": 80, "decoder:ffn": 80}
