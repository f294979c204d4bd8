"""Block (depth) pruning: whole residual blocks and encoder layers replaced by the identity."""

import json
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
from torchmetrics.classification import MulticlassAccuracy
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock

from lightning_hprune import load_pruned
from lightning_hprune.callbacks.levels import BlockPruning
from lightning_hprune.core.blocks import BlockLevel, block_costs, block_scores, find_blocks
from lightning_hprune.core.cost import measure_cost
from lightning_hprune.core.engine import prune_level
from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.importance import MagnitudeImportance
from lightning_hprune.core.measure import count_params
from tests.helpers import TinyCNN, loaders, trainer


def residual_stage(c_in: int, c_out: int, n: int, stride: int) -> list[nn.Module]:
    down = None
    if stride != 1 or c_in != c_out:
        down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
    return [BasicBlock(c_in, c_out, stride, down)] + [BasicBlock(c_out, c_out) for _ in range(n - 1)]


class TinyResNet(TinyCNN):
    """Stem + 3 identity blocks + a strided block (with downsample) + 1 identity block; TinyCNN's training."""

    def __init__(self, width: int = 16, classes: int = 4, size: int = 8, lr: float = 0.05) -> None:
        pl.LightningModule.__init__(self)  # TinyCNN's layers are not wanted, only its training logic
        self.save_hyperparameters({"width": width, "classes": classes, "size": size, "lr": lr})
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()),
            *residual_stage(width, width, 3, 1),
            *residual_stage(width, 2 * width, 2, 2),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))
        self.example_input_array = torch.zeros(1, 3, size, size)
        self.val_acc = MulticlassAccuracy(num_classes=classes, average="micro")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)


IDENTITY_BLOCKS = ["features.1", "features.2", "features.3", "features.5"]


def make_identity_like(block: BasicBlock) -> None:
    """Zero the residual branch's last BN: the block then returns relu(x) = x for its non-negative input."""
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()


def calibration(n: int = 32, size: int = 8) -> list[torch.Tensor]:
    return [torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))]


# ---------------------------------------------------------------- finding blocks
def test_find_blocks_in_torchvision_resnet18_skips_blocks_with_downsample():
    model = resnet18(num_classes=10)
    assert find_blocks(model) == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]


def test_find_blocks_in_tiny_resnet_and_plain_cnn():
    assert find_blocks(TinyResNet()) == IDENTITY_BLOCKS
    assert find_blocks(TinyCNN()) == []


def test_find_blocks_in_transformer_encoder_and_patterns():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.Sequential(nn.Linear(4, 16), nn.TransformerEncoder(layer, 3, enable_nested_tensor=False))
    assert find_blocks(model) == ["1.layers.0", "1.layers.1", "1.layers.2"]
    assert find_blocks(TinyResNet(), patterns=["features.[35]"]) == ["features.3", "features.5"]
    # Nested matches: only the outermost is a candidate.
    assert find_blocks(TinyResNet(), patterns=["features.1", "features.1.conv1"]) == ["features.1"]


class PreNormBlock(nn.Module):
    """A pre-norm transformer block called positionally: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    def __init__(self, depth: int = 4, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList([PreNormBlock(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.mean(1))


def test_transformer_blocks_in_a_module_list_are_removed_and_macs_drop():
    torch.manual_seed(0)
    model = TinyViT()
    x = torch.randn(1, 6, 8)
    assert find_blocks(model) == [f"blocks.{i}" for i in range(4)]
    graph = PruningGraph(model, x)
    dense = measure_cost(model, x, "macs")
    level = BlockLevel(max_blocks=2)
    result, _ = prune_level(
        graph, level, MagnitudeImportance(), "macs", 0.0, {}, 1, 0.0, calibration=[torch.randn(8, 6, 8)]
    )
    assert len(result.blocks) == 2
    assert all(isinstance(model.get_submodule(n), nn.Identity) for n in result.blocks)
    assert measure_cost(model, x, "macs") < dense
    assert model(torch.randn(2, 6, 8)).shape == (2, 3)


def test_torch_transformer_encoder_layers_are_removable_except_the_one_it_inspects():
    # nn.TransformerEncoder calls its layers with keyword arguments (a removed block accepts and ignores
    # them) and reads layers[0].self_attn for its fast path: without layer 0 the model fails, so the scoring
    # refuses exactly that one and leaves the model unchanged.
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 3, enable_nested_tensor=False), nn.Linear(16, 3))
    names = find_blocks(model)
    scores, refused = block_scores(model, names, [torch.randn(4, 5, 16)])
    assert set(scores) == {"0.layers.1", "0.layers.2"}
    assert list(refused) == ["0.layers.0"]
    assert "fails without it" in refused["0.layers.0"]
    assert all(isinstance(model.get_submodule(n), nn.TransformerEncoderLayer) for n in names)


def test_hugging_face_encoder_layers_are_removed_and_the_model_runs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, vocab_size=40
    )
    model = transformers.BertModel(cfg).eval()
    ids = {"input_ids": torch.randint(0, 40, (1, 6))}
    assert find_blocks(model) == [f"encoder.layer.{i}" for i in range(4)]
    graph = PruningGraph(model, ids)
    dense = measure_cost(model, ids, "macs")
    calibration = [{"input_ids": torch.randint(0, 40, (4, 6))}]
    result, _ = prune_level(
        graph,
        BlockLevel(max_blocks=2),
        MagnitudeImportance(),
        "macs",
        0.0,
        {},
        1,
        0.0,
        calibration=calibration,
    )
    assert len(result.blocks) == 2
    assert measure_cost(model, ids, "macs") < dense
    out = model(input_ids=torch.randint(0, 40, (2, 6))).last_hidden_state
    assert out.shape == (2, 6, 32)


# ---------------------------------------------------------------- scoring
@pytest.mark.parametrize("metric", ["relative", "cosine", "output"])
def test_an_identity_like_block_scores_lowest(metric):
    torch.manual_seed(0)
    model = TinyResNet()
    make_identity_like(model.features[3])
    scores, refused = block_scores(model, IDENTITY_BLOCKS, calibration(), metric)
    assert refused == {}
    assert set(scores) == set(IDENTITY_BLOCKS)
    assert min(scores, key=scores.get) == "features.3"
    assert scores["features.3"] == pytest.approx(0.0, abs=1e-5)
    assert all(s > 1e-3 for n, s in scores.items() if n != "features.3")


def test_blocks_whose_shapes_differ_are_refused():
    model = TinyResNet()
    # The strided block with a downsample branch changes the shape: named explicitly, it is still refused.
    scores, refused = block_scores(model, ["features.4", "features.5"], calibration())
    assert list(scores) == ["features.5"]
    assert "differs from its input" in refused["features.4"]


def test_block_costs_are_macs_or_params():
    model = TinyResNet()
    x = torch.zeros(1, 3, 8, 8)
    macs = block_costs(model, ["features.1", "features.5"], x, "macs")
    params = block_costs(model, ["features.1"], x, "params")
    assert macs["features.1"] == 2 * 16 * 16 * 9 * 64  # two 3x3 convs at 8x8, 16 -> 16 channels
    assert macs["features.5"] == 2 * 32 * 32 * 9 * 16  # at 4x4, 32 -> 32 channels
    assert params["features.1"] == count_params(model.features[1])


# ---------------------------------------------------------------- the level
def prune_blocks(model, level, target_cost, kind="macs"):
    x = model.example_input_array
    graph = PruningGraph(model, x)
    result, _ = prune_level(
        graph, level, MagnitudeImportance(), kind, target_cost, {}, 8, 0.0, calibration=calibration()
    )
    return graph, result


def test_block_level_removes_the_lowest_scoring_block_and_the_module_is_gone():
    torch.manual_seed(0)
    model = TinyResNet()
    make_identity_like(model.features[2])
    x = model.example_input_array
    dense_macs, dense_params = measure_cost(model, x, "macs"), count_params(model)
    block = 2 * 16 * 16 * 9 * 64
    graph, result = prune_blocks(model, BlockLevel(), dense_macs - block)  # budget: exactly one block
    assert result.blocks == ["features.2"]
    assert isinstance(model.features[2], nn.Identity)
    assert "features.2.conv1" not in dict(model.named_modules())
    assert measure_cost(model, x, "macs") == dense_macs - block
    assert count_params(model) == dense_params - count_params(BasicBlock(16, 16))
    assert graph.history == [{"op": "identity", "module": "features.2"}]
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_block_level_never_exceeds_its_budget_or_its_cap():
    torch.manual_seed(0)
    model = TinyResNet()
    dense = measure_cost(model, model.example_input_array, "macs")
    block = 2 * 16 * 16 * 9 * 64
    # 2.5 blocks of budget: two 8x8 blocks fit (the 4x4 block is cheaper and fits too, if its score allows).
    _, result = prune_blocks(model, BlockLevel(max_blocks=10), dense - 2.5 * block)
    assert dense - measure_cost(model, model.example_input_array, "macs") <= 2.5 * block
    model2 = TinyResNet()
    _, capped = prune_blocks(model2, BlockLevel(max_blocks=1), 0.0)
    assert len(capped.blocks) == 1
    model3 = TinyResNet()
    _, default_cap = prune_blocks(model3, BlockLevel(), 0.0)
    assert len(default_cap.blocks) == len(IDENTITY_BLOCKS) // 2  # default cap: half of the candidates
    assert len(result.blocks) >= 2


def test_block_level_max_score_and_patterns():
    torch.manual_seed(0)
    model = TinyResNet()
    make_identity_like(model.features[5])
    _, result = prune_blocks(model, BlockLevel(max_blocks=4, max_score=1e-4), 0.0)
    assert result.blocks == ["features.5"]  # the other blocks change their input more than 1e-4
    model2 = TinyResNet()
    _, only = prune_blocks(model2, BlockLevel(max_blocks=4, patterns=["features.1"]), 0.0)
    assert only.blocks == ["features.1"]


def test_block_level_params_cost():
    model = TinyResNet()
    dense = count_params(model)
    block = count_params(BasicBlock(16, 16))
    _, result = prune_blocks(model, BlockLevel(max_blocks=3), dense - 1.5 * block, kind="params")
    assert len(result.blocks) == 1  # only one 16-channel block fits in 1.5 blocks' parameters
    assert count_params(model) == dense - block


def test_block_level_may_pass_the_event_target_but_never_the_final_one():
    """A block bigger than the event's slack goes when the run's final target leaves room for it, else not."""
    block = 2 * 16 * 16 * 9 * 64  # every candidate block of TinyResNet costs this many MACs

    def run(final_blocks):
        model = TinyResNet()
        x = model.example_input_array
        dense = measure_cost(model, x, "macs")
        graph = PruningGraph(model, x)
        result, _ = prune_level(
            graph,
            BlockLevel(max_blocks=4),
            MagnitudeImportance(),
            "macs",
            dense - 0.6 * block,  # the level's budget: 0.6 block, nearest whole block: 1
            {},
            8,
            0.0,
            calibration=calibration(),
            floor_cost=dense - 0.7 * block,  # the event's target: 0.1 block past the budget, less than 0.4
            final_cost=None if final_blocks is None else dense - final_blocks * block,
        )
        return dense - measure_cost(model, x, "macs"), result

    saved, result = run(None)  # no final target given: the event's target bounds it, as before
    assert saved == 0
    assert result.blocks == []
    saved, result = run(0.8)  # the final target is 0.2 block past the budget: still too close
    assert saved == 0
    assert result.blocks == []
    saved, result = run(2.0)  # room for the whole block before the final target: it goes, one only
    assert saved == block
    assert len(result.blocks) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_blocks": -1}, "`max_blocks` to be an integer >= 0 or None"),
        ({"metric": "loss"}, "`metric` to be one of ['cosine', 'output', 'relative']"),
        ({"patterns": "features.*"}, None),  # a single string is one pattern
        ({"patterns": [3]}, "`patterns` to be a list of strings"),
        ({"max_score": -1.0}, "`max_score` to be a non-negative number"),
        ({"max_samples": 0}, "`max_samples` to be an integer >= 1"),
    ],
)
def test_block_level_arguments(kwargs, message):
    if message is None:
        assert BlockLevel(**kwargs).patterns == ["features.*"]
        return
    with pytest.raises(ValueError, match="Expected argument") as err:
        BlockLevel(**kwargs)
    assert message in str(err.value)


# ---------------------------------------------------------------- the callback, end to end
@pytest.mark.fit
def test_block_pruning_callback_removes_blocks_during_fit_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = TinyResNet()
    cb = BlockPruning(
        target=0.3, max_blocks=2, start_epoch=0, end_epoch=1, measure_latency=False, verbose=False
    )
    t = trainer(tmp_path, [cb], max_epochs=3, enable_checkpointing=True)
    train, val = loaders()
    t.fit(model, train, val)
    removed = [n for n in IDENTITY_BLOCKS if isinstance(model.get_submodule(n), nn.Identity)]
    assert 1 <= len(removed) <= 2
    # The optimizer holds exactly the live parameters (removed blocks' parameters left it).
    live = {id(p) for p in model.parameters()}
    held = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert held == live
    # Logged per level, and the final structure names the removed blocks.
    with open(os.path.join(t.logger.log_dir, "metrics.csv")) as f:
        assert "hprune/block/blocks_removed" in f.readline()
    with open(os.path.join(t.log_dir, "hprune_report.json")) as f:
        report = json.load(f)
    assert sorted(report["structure"]["removed_modules"]) == sorted(removed)
    assert sorted(report["structure"]["levels"]["block"]["blocks_removed"]) == sorted(removed)
    # A fresh process rebuilds the structure from the checkpoint and loads the weights strictly.
    ckpt = t.checkpoint_callback.best_model_path
    loaded = load_pruned(TinyResNet, ckpt)
    assert all(isinstance(loaded.get_submodule(n), nn.Identity) for n in removed)
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    assert torch.allclose(loaded(x), model(x), atol=1e-5)


@pytest.mark.fit
def test_default_hierarchy_at_half_removes_a_layer_and_heads_of_a_small_vit_within_the_target(tmp_path):
    """`HierarchicalPruning(target=0.5)` on a 4-layer ViT (one layer ~25 % of the MACs, more than the finer
    level's share of any one event): a whole layer goes, heads too, and no step passes the final target."""
    pytest.importorskip("timm")
    from lightning_hprune import HierarchicalPruning
    from lightning_hprune.examples.digits import DigitsDataModule, DigitsViT

    pl.seed_everything(0)
    cb = HierarchicalPruning(
        target=0.5, start_epoch=1, end_epoch=5, round_to=8, measure_latency=False, verbose=False
    )
    model = DigitsViT(embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0)  # examples/hierarchy_vit.yaml's
    trainer(tmp_path, [cb], max_epochs=7, limit_train_batches=4, limit_val_batches=1).fit(
        model, DigitsDataModule(limit=256)
    )
    levels = cb.summary["structure"]["levels"]
    assert len(levels["block"]["blocks_removed"]) >= 1, cb.records
    assert all(b.startswith("vit.blocks.") for b in levels["block"]["blocks_removed"])
    assert levels["global"]["heads_removed"] >= 1
    # Never past the final target, except the last step's rounding to one closing unit (a minimum).
    final = cb.session.ledger.dense("macs") * 0.5
    steps = [lv for r in cb.session.ledger.records for lv in r.levels]
    assert all(lv.cost_after >= final for lv in steps[:-1])
    assert 0.5 <= cb.summary["achieved"] <= 0.55
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
