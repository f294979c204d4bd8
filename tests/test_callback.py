import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback

from lightning_hprune import HierarchicalPruning
from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.measure import count_macs, count_params
from tests.helpers import TinyCNN, loaders, trainer

pytestmark = pytest.mark.fit  # every test here runs a Trainer (or a fresh process)


class ModeProbe(Callback):
    """Records train mode of every module and the loss at every training batch."""

    def __init__(self):
        self.modes = []
        self.losses = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append(all(m.training for m in pl_module.modules()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("cost", ["macs", "params"])
def test_fit_shrinks_as_scheduled_and_keeps_output_shape(tmp_path, cost):
    pl.seed_everything(0)
    model = TinyCNN(widths=(64, 64, 64))
    x = torch.randn(2, 3, 8, 8)
    out_before = model.eval()(x).shape
    model.train()
    params0, macs0 = count_params(model), count_macs(model, x[:1]).total
    # This toy's parameters sit mostly in one 32-wide linear layer: steps of 8 units are 4 % of the model,
    # too coarse for a 2-point guarantee, so the params case uses finer alignment (see docs/index.md).
    round_to = 8 if cost == "macs" else 2
    # L2 magnitude: with steps of 8 units on this toy, the 2-point guarantee holds for some choices of layers only
    cb = HierarchicalPruning(
        target=0.5, cost=cost, start_epoch=0, end_epoch=2, round_to=round_to, verbose=False, importance="l2"
    )
    probe = ModeProbe()
    t = trainer(tmp_path, [cb, probe], max_epochs=4)
    train, val = loaders()
    t.fit(model, train, val)

    assert cb.event_index == cb.num_events == 3
    removed = [r["removed"] for r in cb.records]
    targets = [r["target"] for r in cb.records]
    assert removed == sorted(removed)  # non-decreasing
    for got, want in zip(removed, targets, strict=True):
        assert got == pytest.approx(want, abs=0.05)
    assert 0.5 <= removed[-1] <= 0.52  # the final target is a minimum, reached within 2 points
    assert count_params(model) < params0
    assert count_macs(model, x[:1]).total < macs0
    assert model.eval()(x).shape == out_before
    assert model.head[-1].out_features == 4  # the output layer is never shrunk
    # train mode restored after every event, and training never diverged
    assert probe.modes
    assert all(probe.modes)
    assert all(torch.isfinite(torch.tensor(probe.losses)))


def test_widths_are_aligned(tmp_path):
    pl.seed_everything(0)
    model = TinyCNN(widths=(40, 48, 64))
    cb = HierarchicalPruning(target=0.6, start_epoch=0, end_epoch=1, round_to=8, verbose=False)
    t = trainer(tmp_path, [cb], max_epochs=2)
    train, val = loaders()
    t.fit(model, train, val)
    widths = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)] + [
        model.head[1].out_features
    ]
    assert any(w < w0 for w, w0 in zip(widths, (40, 48, 64, 32), strict=True))
    assert all(w % 8 == 0 for w in widths), widths


def test_ignored_layers_keep_their_width(tmp_path):
    pl.seed_everything(0)
    model = TinyCNN(widths=(32, 32, 32))
    cb = HierarchicalPruning(
        target=0.5, start_epoch=0, end_epoch=0, ignored_layers=["features.3"], verbose=False
    )
    t = trainer(tmp_path, [cb], max_epochs=1)
    train, val = loaders()
    t.fit(model, train, val)
    assert model.features[3].out_channels == 32
    assert model.features[0].out_channels < 32 or model.features[6].out_channels < 32


def test_optimizer_state_values_right_after_the_event(tmp_path):
    """The optimizer state for kept channels equals the pre-prune state, by value, at the event.

    Kept positions are found independently of the library's bookkeeping: each weight value is unique,
    so every element of a pruned weight is located in the pre-prune weight by its value.
    """
    seen = {}

    def snapshot(pl_module, opt):
        return {
            n: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
            for n, p in pl_module.named_parameters()
        }

    class Before(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if cb.event_index == 0:
                seen["before"] = snapshot(pl_module, trainer.optimizers[0])

    class After(Callback):
        def on_train_epoch_end(self, trainer, pl_module):  # runs after the pruning callback (list order)
            seen["after"] = snapshot(pl_module, trainer.optimizers[0])

    pl.seed_everything(0)
    model = TinyCNN(optimizer="adam", lr=0.01)
    cb = HierarchicalPruning(target=0.4, start_epoch=0, end_epoch=0, verbose=False)
    t = trainer(tmp_path, [Before(), cb, After()], max_epochs=1)
    train, val = loaders()
    t.fit(model, train, val)
    before, after = seen["before"], seen["after"]
    n_sliced = 0
    for name, (w, state) in after.items():
        old_w, old_state = before[name]
        assert torch.equal(state["step"], old_state["step"])
        if w.shape == old_w.shape:
            assert torch.equal(w, old_w)
            assert all(torch.equal(state[k], old_state[k]) for k in ("exp_avg", "exp_avg_sq")), name
            continue
        flat_old = old_w.reshape(-1)
        if flat_old.unique().numel() != flat_old.numel():
            continue  # values not unique (e.g. untouched BN init): cannot locate independently
        position = {float(v): i for i, v in enumerate(flat_old.tolist())}
        src = torch.tensor([position[float(v)] for v in w.reshape(-1).tolist()])
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[k].reshape(-1), old_state[k].reshape(-1)[src]), (name, k)
        n_sliced += 1
    assert n_sliced >= 4


def test_lr_scheduler_continues(tmp_path):
    pl.seed_everything(0)
    model = TinyCNN(lr=0.08, scheduler="step")
    cb = HierarchicalPruning(target=0.4, start_epoch=0, end_epoch=1, verbose=False)
    t = trainer(tmp_path, [cb], max_epochs=4)
    train, val = loaders()
    t.fit(model, train, val)
    sched = t.lr_scheduler_configs[0].scheduler
    assert sched.optimizer is t.optimizers[0]
    assert sched.last_epoch == 4
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.08 * 0.5**4)
    assert {id(p) for p in t.optimizers[0].param_groups[0]["params"]} == {id(p) for p in model.parameters()}


def test_bf16_mixed_gradient_accumulation_and_clipping(tmp_path):
    pl.seed_everything(0)
    model = TinyCNN(widths=(64, 64, 64), optimizer="adamw", lr=0.01)
    probe = ModeProbe()
    cb = HierarchicalPruning(target=0.5, start_epoch=0, end_epoch=1, round_to=4, verbose=False)
    t = trainer(
        tmp_path,
        [cb, probe],
        max_epochs=3,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
    )
    train, val = loaders()
    t.fit(model, train, val)
    assert cb.event_index == 2
    assert 0.5 <= cb.records[-1]["removed"] <= 0.52
    assert all(torch.isfinite(torch.tensor(probe.losses)))
    assert all(probe.modes)


def test_example_input_from_first_batch(tmp_path):
    pl.seed_everything(0)
    model = TinyCNN(set_example_input=False)
    assert model.example_input_array is None
    cb = HierarchicalPruning(target=0.3, start_epoch=0, end_epoch=0, verbose=False)
    t = trainer(tmp_path, [cb], max_epochs=1)
    train, val = loaders()
    t.fit(model, train, val)
    assert cb.session.example_input.shape == (1, 3, 8, 8)
    assert cb.records[-1]["removed"] > 0.2


def test_unusable_batch_without_example_input_raises_clearly(tmp_path):
    class WeirdBatches(TinyCNN):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["pixels"], batch["label"]), batch_idx)

    samples = [{"pixels": torch.randn(3, 8, 8), "label": i % 4} for i in range(8)]
    data = torch.utils.data.DataLoader(samples, batch_size=4)
    model = WeirdBatches(set_example_input=False)
    cb = HierarchicalPruning(verbose=False)
    t = trainer(tmp_path, [cb], max_epochs=1)
    with pytest.raises(
        ValueError, match=r"example_input_array.*first training batch.*got a batch of type dict"
    ):
        t.fit(model, data)
    assert t.global_step == 0


def test_graph_built_once_and_no_deep_copy(tmp_path, monkeypatch):
    deep_copies = []
    real = copy.deepcopy

    def counting(obj, *a, **k):
        if isinstance(obj, nn.Module):
            deep_copies.append(type(obj).__name__)
        return real(obj, *a, **k)

    monkeypatch.setattr(copy, "deepcopy", counting)
    pl.seed_everything(0)
    model = TinyCNN()
    cb = HierarchicalPruning(target=0.5, start_epoch=0, end_epoch=2, verbose=False)
    t = trainer(tmp_path, [cb], max_epochs=3)
    train, val = loaders()
    builds = PruningGraph.builds
    t.fit(model, train, val)
    assert cb.event_index == 3
    assert PruningGraph.builds - builds == 1  # channel pruning keeps the graph valid: no rebuild per event
    # one copy in the whole fit: the dense model's CPU copy for the end-of-fit latency comparison
    assert deep_copies == ["TinyCNN"]
