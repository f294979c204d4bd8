"""A zoo of vision models (timm, torchvision) and ``nn.TransformerEncoder``, pruned in a real fit.

Each model (tiny config, random weights) is fitted for two short epochs with
``HierarchicalPruning(target=0.4, cost="macs", start_epoch=0, end_epoch=1)`` and otherwise default pruning
settings. It must prune without crashing, keep its output shape, train a step with a finite loss after
pruning, reload with :func:`lightning_hprune.load_pruned` to identical outputs, and have its MACs counted
within 1 % of ``FlopCounterMode`` (grad on, fast paths off) before and after pruning. What each model
prunes (heads, grouped channels, what is left alone) is checked too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from lightning_hprune import HierarchicalPruning, load_pruned
from lightning_hprune.core.conv_groups import GroupedChannelGroup
from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.measure import count_macs
from tests.helpers import trainer as quiet_trainer

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

CLASSES = 5


class TokenEncoder(nn.Module):
    """``nn.TransformerEncoder`` over a token sequence (its multi-head attention fast path included)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=CLASSES, **kw)


def _resnext() -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4, num_classes=CLASSES)


def _regnet_y() -> nn.Module:
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    return RegNet(params, num_classes=CLASSES, stem_width=16)


def _timm_regnet() -> nn.Module:
    from timm.models.regnet import RegNet, RegNetCfg

    # groups=3 in the first stage: "Given groups=3, expected weight to be divisible by 3" before
    return RegNet(
        RegNetCfg(depth=6, w0=24, wa=24.0, wm=2.0, group_size=8, stem_width=16), num_classes=CLASSES
    )


VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


@dataclass(frozen=True)
class Case:
    """One zoo model: how to build it, its input, and what its pruning must show."""

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    heads: bool = False  # attention heads are units of some groups
    grouped: bool = False  # groups reach grouped convolutions (pruned at the same offsets per conv group)
    left_alone: bool = False  # some groups are left alone, with a reason


CASES = [
    Case("vit", _timm("vit_tiny_patch16_224", **VIT), (3, 32, 32), heads=True),
    Case("deit_distilled", _timm("deit_tiny_distilled_patch16_224", **VIT), (3, 32, 32), heads=True),
    Case(
        "swin",
        _timm(
            "swin_tiny_patch4_window7_224",
            img_size=32,
            patch_size=2,
            window_size=4,
            embed_dim=16,
            depths=(2, 2),
            num_heads=(2, 4),
        ),
        (3, 32, 32),
        heads=True,
        left_alone=True,  # the first stage's width goes through PatchMerging's 6-D view
    ),
    Case("mobilevit", _timm("mobilevit_xxs"), (3, 32, 32), heads=True),
    Case("convnext", _timm("convnext_atto", depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)), (3, 32, 32)),
    Case("efficientnet", _timm("test_efficientnet"), (3, 32, 32)),
    Case("timm_regnet", _timm_regnet, (3, 32, 32), grouped=True),
    Case("resnext", _resnext, (3, 32, 32), grouped=True),
    Case("regnet_y", _regnet_y, (3, 32, 32), grouped=True),
    Case(
        "shufflenet_v2",
        lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=CLASSES),
        (3, 32, 32),
        left_alone=True,
    ),
    Case("torch_transformer_encoder", TokenEncoder, (6, 8)),
]
BY_NAME = {c.name: c for c in CASES}


class ZooClassifier(pl.LightningModule):
    """A zoo model as a classifier; rebuilt by name from its hyper-parameters (for ``load_pruned``)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = BY_NAME[name].build()
        self.example_input_array = torch.zeros(1, *BY_NAME[name].shape)
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def reference_macs(model: nn.Module, x: torch.Tensor) -> int:
    """``FlopCounterMode`` with grad on and fast paths off (math attention), in eval mode."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    training = model.training
    model.eval()
    try:
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
        model.train(training)
    return counter.get_total_flops() // 2


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.fit
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_zoo_model_prunes_trains_reloads_and_counts_macs(case: Case, tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = ZooClassifier(case.name)
    x = torch.randn(2, *case.shape)
    dense_params = _params(model)
    dense_macs = count_macs(model, x[:1]).total
    assert dense_macs == pytest.approx(reference_macs(model, x[:1]), rel=0.01)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(16, *case.shape, generator=g), torch.randint(0, CLASSES, (16,), generator=g)
    )
    cb = HierarchicalPruning(
        target=0.4, cost="macs", start_epoch=0, end_epoch=1, measure_latency=False, verbose=False
    )
    trainer = quiet_trainer(
        tmp_path, [cb], max_epochs=2, logger=False, limit_val_batches=0, enable_checkpointing=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(data, batch_size=8))
    assert trainer.state.finished

    # pruned: fewer parameters and MACs, the target met, and what the model's structure allows
    assert _params(model) < dense_params
    pruned_macs = count_macs(model, x[:1]).total
    assert pruned_macs < dense_macs
    assert cb.summary["achieved"] >= 0.4 - 0.02, cb.summary["achieved"]
    assert pruned_macs == pytest.approx(reference_macs(model, x[:1]), rel=0.01)
    ops = {h["op"] for h in cb.history_steps()}
    assert ops & {"channels", "heads"}, ops
    graph = PruningGraph(ZooClassifier(case.name), x[:1])
    groups = graph.groups()
    assert any(g.kind == "heads" for g in groups) == case.heads
    assert not graph.protected_groups  # no attention layer of this zoo is left unrecognised
    assert any(isinstance(g, GroupedChannelGroup) for g in groups) == case.grouped
    assert bool(graph.left_alone) == case.left_alone, graph.left_alone
    if case.heads:
        assert "heads" in ops, ops
    for module in model.modules():
        table = getattr(module, "relative_position_bias_table", None)
        if isinstance(table, nn.Parameter):  # Swin: one column per remaining head
            assert table.shape[1] == module.num_heads
            assert module.qkv.out_features % (3 * module.num_heads) == 0
        if isinstance(module, nn.MultiheadAttention):
            assert module.embed_dim % module.num_heads == 0
            assert module.in_proj_weight.shape == (3 * module.embed_dim, module.embed_dim)

    # the output shape is kept, and training continues with finite losses and gradients
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, CLASSES)
    assert all(math.isfinite(v) for v in model.losses)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # the checkpoint of the pruned model reloads to identical outputs
    model.eval()
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    trainer.save_checkpoint(ckpt)  # after the extra step: the weights compared below
    loaded = load_pruned(ZooClassifier, ckpt)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in model.parameters()]


# ---------------------------------------------------------------------- exactness of the new units (no Trainer)
def _swin() -> nn.Module:
    return BY_NAME["swin"].build().eval()


def test_swin_heads_are_removed_exactly_with_their_bias_table_column() -> None:
    """Removing head 1 of a Swin window attention equals zeroing that head's output-projection columns."""
    import copy

    torch.manual_seed(0)
    model = _swin()
    reference = copy.deepcopy(model)
    attn = model.layers[1].blocks[0].attn
    d = attn.qkv.out_features // (3 * attn.num_heads)
    table = attn.relative_position_bias_table.detach().clone()
    with torch.no_grad():
        reference.layers[1].blocks[0].attn.proj.weight[:, d : 2 * d] = 0
    x = torch.randn(2, 3, 32, 32)
    graph = PruningGraph(model, x[:1])
    group = {g.name: g for g in graph.groups()}["layers.1.blocks.0.attn.qkv"]
    assert (group.kind, group.size) == ("heads", 4)
    graph.prune({group.name: [1]})
    assert attn.num_heads == 3
    assert attn.qkv.out_features == 3 * 3 * d
    torch.testing.assert_close(attn.relative_position_bias_table.detach(), table[:, [0, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_grouped_convolution_units_are_removed_exactly() -> None:
    """timm RegNet, groups=3: removing offset 0 of every conv group equals zeroing those inputs of conv3."""
    import copy

    torch.manual_seed(0)
    model = _timm_regnet().eval()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    graph = PruningGraph(model, x[:1])
    groups = {g.name: g for g in graph.groups()}
    block = model.s1.b1
    assert block.conv2.conv.groups == 3
    group = groups["s1.b1.conv2.conv"]
    assert isinstance(group, GroupedChannelGroup)
    assert (group.kind, group.per_unit, group.size) == ("channels", 3, 8)
    assert group.units[0] == (0, 8, 16)  # offset 0 of each of the 3 blocks of 8 channels
    assert [group.aligned(r) for r in (8, 4, 6)] == [8, 4, 2]  # units for kept widths of round_to channels
    with torch.no_grad():
        reference.s1.b1.conv3.conv.weight[:, [0, 8, 16]] = 0
    graph.prune({group.name: [0]})
    assert (block.conv2.conv.groups, block.conv2.conv.out_channels, block.conv2.conv.in_channels) == (
        3,
        21,
        24,
    )
    assert block.conv2.conv.weight.shape == (21, 8, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    assert graph.history[-1] == {"op": "channels", "module": "s1.b1.conv2.conv", "idxs": [0]}
    fresh = _timm_regnet()
    PruningGraph(fresh, x[:1]).replay(graph.history)
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in model.parameters()]


def test_shufflenet_prunes_inside_its_branches_and_leaves_shuffled_channels_alone() -> None:
    import copy

    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=CLASSES).eval()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    graph = PruningGraph(model, x[:1])
    groups = graph.groups()
    names = {g.name for g in groups}
    assert "stage2.1.branch2.3" in names  # inside a branch (1x1, depthwise, 1x1): no shuffle on the way
    assert graph.left_alone
    assert not names & set(graph.left_alone)
    # a branch's output is concatenated and shuffled: no group changes its width
    assert not any("stage2.1.branch2.5" in g.outputs for g in groups)
    with torch.no_grad():
        reference.stage2[1].branch2[5].weight[:, [2, 5]] = 0
    graph.prune({"stage2.1.branch2.3": [2, 5]})
    assert model.stage2[1].branch2[3].groups == model.stage2[1].branch2[3].out_channels == 22
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_multihead_attention_embedding_width_stays_a_multiple_of_its_heads() -> None:
    model = TokenEncoder().eval()
    graph = PruningGraph(model, torch.randn(1, 6, 8))
    [stream] = [g for g in graph.groups() if any(m.endswith("self_attn") for m in g.modules)]
    assert stream.multiple_of == 4
    assert [w for w in range(1, 33) if stream.allows(w)] == [4, 8, 12, 16, 20, 24, 28, 32]


def _zero_inputs(reference: nn.Module, graph: PruningGraph, group: Any, channels: list[int]) -> bool:
    """Zero, in ``reference``, the input weights that read ``channels`` of ``group``; False if not exact-able."""
    names = {m: n for n, m in graph.model.named_modules()}
    for dep, _ in group.group:
        if isinstance(dep.target.module, (nn.LayerNorm, nn.GroupNorm)):
            return False  # statistics over the channels: removing one is not zeroing it
    for dep, idxs in group.group:
        module = dep.target.module
        if graph._dg.is_out_channel_pruning_fn(dep.handler) or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        weight = reference.get_submodule(names[module]).weight
        cols = [idxs[c] for c in channels]
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            if module.groups == module.out_channels:
                continue  # depthwise: its input channel is its output channel, removed with it
            per_in, per_out = module.in_channels // module.groups, module.out_channels // module.groups
            for c in cols:
                block = c // per_in
                weight.data[block * per_out : (block + 1) * per_out, c % per_in] = 0
        else:
            weight.data[:, cols] = 0
    return True


@pytest.mark.parametrize("name", ["resnext", "regnet_y", "timm_regnet", "mobilevit", "shufflenet_v2"])
def test_removing_a_unit_of_every_group_equals_zeroing_what_reads_it(name: str) -> None:
    """torch-pruning's channel mappings are right: pruning unit 0 of every channel group at once equals
    the dense model with the weights that read those channels zeroed (grouped convolutions included)."""
    import copy

    torch.manual_seed(0)
    model = BY_NAME[name].build().eval()
    reference = copy.deepcopy(model)
    x = torch.randn(2, *BY_NAME[name].shape)
    graph = PruningGraph(model, x[:1])
    plan = {}
    for g in graph.groups():
        if g.kind == "heads" or g.size < 2:
            continue
        channels = list(g.units[0]) if g.units is not None else [0]
        if _zero_inputs(reference, graph, g, channels):
            plan[g.name] = [0]
    assert len(plan) >= 5
    graph.prune(plan)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
