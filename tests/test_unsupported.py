"""Risky or unsupported setups: each is either supported (and shown to work) or refused early and clearly."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, StochasticWeightAveraging
from lightning.pytorch.strategies import FSDPStrategy
from torch._dynamo.testing import CompileCounter

from lightning_hprune import HierarchicalPruning, PruningError
from lightning_hprune.core.session import history_of
from tests.helpers import TinyCNN, loaders, trainer

pytestmark = pytest.mark.fit  # every test here runs a Trainer (or a fresh process)


def _cb(**kwargs: Any) -> HierarchicalPruning:
    kwargs = {"target": 0.5, "round_to": 4, "measure_latency": False, "verbose": False, **kwargs}
    return HierarchicalPruning(**kwargs)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------- strategies
def test_fsdp_strategy_is_refused_in_setup() -> None:
    # FSDP needs a GPU to build a Trainer; the refusal only reads the strategy, so a real FSDPStrategy
    # object is handed to `setup` directly.
    cb = _cb()
    stand_in = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[cb], max_epochs=4)
    with pytest.raises(
        RuntimeError, match=r"FSDPStrategy strategy \(FSDP1's flat parameters.*Use strategy='ddp'"
    ):
        cb.setup(stand_in, TinyCNN(), "fit")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- optimisation setups
class TwoOptimizerCNN(TinyCNN):
    """Manual optimization with two optimizers (features / head) and a scheduler on one of them."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        feat_opt, head_opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        feat_opt.zero_grad()
        head_opt.zero_grad()
        self.manual_backward(loss)
        feat_opt.step()
        head_opt.step()
        self.losses.append(float(loss))

    def on_train_epoch_end(self) -> None:
        sched = self.lr_schedulers()
        assert sched is not None
        sched.step()

    def configure_optimizers(self) -> Any:
        feat = torch.optim.Adam(self.features.parameters(), lr=0.01)
        head = torch.optim.SGD(self.head.parameters(), lr=0.05, momentum=0.9)
        return [feat, head], [torch.optim.lr_scheduler.StepLR(feat, step_size=1, gamma=0.5)]


def test_manual_optimization_with_two_optimizers_is_supported(tmp_path: Path) -> None:
    model = TwoOptimizerCNN()
    cb = _cb()
    t = trainer(tmp_path, [cb], max_epochs=3, num_sanity_val_steps=0)
    train, val = loaders(n=64)
    t.fit(model, train, val)
    assert t.state.finished
    assert cb.event_index == 2
    assert _params(model) < _params(TwoOptimizerCNN())
    feat_opt, head_opt = t.optimizers
    # Each optimizer holds exactly the live parameters of its own part, with state of matching shapes.
    assert {id(p) for g in feat_opt.param_groups for p in g["params"]} == {
        id(p) for p in model.features.parameters()
    }
    assert {id(p) for g in head_opt.param_groups for p in g["params"]} == {
        id(p) for p in model.head.parameters()
    }
    for opt, key in ((feat_opt, "exp_avg"), (head_opt, "momentum_buffer")):
        for p in (p for g in opt.param_groups for p in g["params"]):
            assert opt.state[p][key].shape == p.shape
    assert t.lr_scheduler_configs[0].scheduler.optimizer is feat_opt  # the scheduler still drives it
    assert feat_opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)
    assert all(torch.isfinite(torch.tensor(model.losses)))


@pytest.mark.parametrize("compiled", ["the LightningModule", "a submodule"])
def test_torch_compiled_model_recompiles_after_each_event(tmp_path: Path, compiled: str) -> None:
    counter = CompileCounter()

    class CompilesPerEpoch(Callback):
        def __init__(self) -> None:
            self.counts: list[int] = []

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.start = counter.frame_count

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.counts.append(counter.frame_count - self.start)

    model = TinyCNN()
    eager_forward = model.forward
    if compiled == "a submodule":
        model.features = torch.compile(model.features, backend=counter)
    cb = _cb()
    spy = CompilesPerEpoch()
    t = trainer(tmp_path, [spy, cb], max_epochs=3, num_sanity_val_steps=0, limit_val_batches=0)
    train, _ = loaders(n=64)
    # With one cache entry per function, a pruned shape is compiled only if the old entries were dropped.
    with torch._dynamo.config.patch(recompile_limit=1):
        t.fit(torch.compile(model, backend=counter) if compiled == "the LightningModule" else model, train)
    assert cb.event_index == 2
    assert _params(model) < _params(TinyCNN())
    assert spy.counts[0] >= 1  # the dense model
    assert spy.counts[1] >= 1  # recompiled for the structure after event 1
    assert spy.counts[2] >= 1  # and after event 2 (no fallback to eager)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        expected = eager_forward(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


# ---------------------------------------------------------------------- models torch-pruning cannot follow
class HardReshape(TinyCNN):
    """Flattens with a hard-coded width: pruning the last convolution breaks its forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head[1:](self.features(x).reshape(-1, 32 * 8 * 8))


class RawConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, padding=1)


class RawConvCNN(TinyCNN):
    """A convolution written with a raw parameter, which torch-pruning slices along the wrong dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.features[3] = RawConv(16, 32)


@pytest.mark.parametrize(
    ("model_cls", "prunable", "where", "fix"),
    [
        (HardReshape, "features.6", "the forward of HardReshape itself", "ignored_layers"),
        (RawConvCNN, "features.0", "module 'features.3' (RawConv)", "raw parameter"),
    ],
)
def test_untraceable_model_error_names_the_module(
    tmp_path: Path, model_cls: type[TinyCNN], prunable: str, where: str, fix: str
) -> None:
    model = model_cls()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Only the layer whose pruning breaks the model is left prunable, so that the event must touch it.
    ignored = [n for n in ("features.0", "features.3", "features.6", "head.1") if n != prunable]
    t = trainer(tmp_path, [_cb(ignored_layers=ignored)], max_epochs=2, num_sanity_val_steps=0)
    train, val = loaders(n=32)
    with pytest.raises(PruningError) as info:
        t.fit(model, train, val)
    message = str(info.value)
    assert where in message
    assert fix in message
    assert "exactly as they were before the event" in message
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in before.items()}


def test_untraceable_example_input_fails_before_training(tmp_path: Path) -> None:
    model = TinyCNN()
    model.example_input_array = torch.zeros(1, 5, 8, 8)  # the model takes 3 channels
    t = trainer(tmp_path, [_cb()], max_epochs=2, num_sanity_val_steps=0)
    train, val = loaders(n=32)
    with pytest.raises(PruningError, match=r"could not trace TinyCNN.*inside module 'features.0' \(Conv2d\)"):
        t.fit(model, train, val)
    assert t.global_step == 0


# ---------------------------------------------------------------------- monitor, targets, parameter copies
def test_monitor_never_logged_is_reported_before_anything_is_pruned(tmp_path: Path) -> None:
    model = TinyCNN()
    t = trainer(tmp_path, [_cb(monitor="val_f1")], max_epochs=2, num_sanity_val_steps=0)
    train, val = loaders(n=32)
    # found at the end of the first validation (epoch 0), before its event
    with pytest.raises(
        ValueError,
        match=r"expected the metric 'val_f1' to be logged by the end of the first validation.*'val_acc'",
    ):
        t.fit(model, train, val)
    assert model.features[0].out_channels == 16
    assert t.current_epoch == 0


class LinearProbe(pl.LightningModule):
    """One linear layer: its only channels are the model's outputs, so nothing can be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
        self.example_input_array = torch.zeros(1, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("model_cls", "ignored", "why"),
    [
        (
            TinyCNN,
            ["features.*", "head.1"],
            r"`ignored_layers`=\['features.\*', 'head.1'\] excludes every one",
        ),
        (LinearProbe, [], "every layer's output width is fixed"),
    ],
)
def test_nothing_prunable_is_refused_before_training(
    tmp_path: Path, model_cls: type[pl.LightningModule], ignored: list[str], why: str
) -> None:
    t = trainer(tmp_path, [_cb(ignored_layers=ignored)], max_epochs=2, num_sanity_val_steps=0)
    train, _ = loaders(n=32)
    with pytest.raises(
        ValueError, match=rf"at least one prunable channel group, but {why}.*cannot be reached"
    ):
        t.fit(model_cls(), train)
    assert t.global_step == 0


@pytest.mark.parametrize(
    "averaging", [lambda: StochasticWeightAveraging(swa_lrs=0.01), lambda: EMAWeightAveraging()]
)
def test_weight_averaging_callbacks_are_refused_in_setup(tmp_path: Path, averaging: Any) -> None:
    callback = averaging()
    t = trainer(tmp_path, [_cb(), callback], max_epochs=2)
    train, val = loaders(n=32)
    with pytest.raises(RuntimeError, match=rf"\['{type(callback).__name__}'\].*averaged copy.*second fit"):
        t.fit(TinyCNN(), train, val)
    assert t.global_step == 0


def test_lookalike_averaging_callback_gets_a_warning(tmp_path: Path) -> None:
    class MyEMA(Callback):
        pass

    t = trainer(tmp_path, [_cb(), MyEMA()], max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    train, _ = loaders(n=32)
    with pytest.warns(UserWarning, match=r"\['MyEMA'\] look like they keep copies"):
        t.fit(TinyCNN(), train)


def test_callback_pickles_and_copies_with_a_pruned_model(tmp_path: Path) -> None:
    # ddp_spawn pickles the Trainer (and its callbacks); users deep-copy models with their callbacks.
    cb = _cb(schedule="geometric")
    restored = pickle.loads(pickle.dumps(cb))
    assert restored.target_fraction(0) == cb.target_fraction(0)
    model = TinyCNN()
    t = trainer(tmp_path, [cb], max_epochs=4, num_sanity_val_steps=0)
    train, val = loaders(n=32)
    t.fit(model, train, val)
    model_copy, cb_copy = copy.deepcopy((model, cb))
    shapes = {n: p.shape for n, p in model_copy.named_parameters()}
    assert history_of(cb_copy.state_dict()) == cb.history_steps()
    # The copy's graph is rebuilt around the already pruned copy: recorded, not pruned a second time.
    graph = cb_copy.session.attach(model_copy)
    assert graph.history == cb.history_steps()
    assert {n: p.shape for n, p in model_copy.named_parameters()} == shapes


# ---------------------------------------------------------------------- precision
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_reduced_precision_is_supported(tmp_path: Path, precision: str) -> None:
    model = TinyCNN(optimizer="adam")
    cb = _cb()
    t = trainer(tmp_path, [cb], max_epochs=2, num_sanity_val_steps=0, precision=precision)
    train, val = loaders(n=64)
    t.fit(model, train, val)
    assert cb.event_index == 1
    assert _params(model) < _params(TinyCNN())
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert all(p.dtype == dtype for p in model.parameters())
    opt = t.optimizers[0]
    for p in (p for g in opt.param_groups for p in g["params"]):
        assert opt.state[p]["exp_avg"].shape == p.shape
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


def test_grouping_that_never_finishes_fails_instead_of_hanging(monkeypatch):
    """torch-pruning's grouping can loop forever on some models: the graph gives up with a clear error."""
    import threading
    import time

    import torch_pruning as tp

    from lightning_hprune.core.graph import PruningError, PruningGraph

    release = threading.Event()

    def forever(self, *args, **kwargs):
        while not release.is_set():
            time.sleep(0.01)
        return iter(())

    model = TinyCNN()
    graph = PruningGraph(model, torch.zeros(1, 3, 8, 8))
    monkeypatch.setattr(tp.DependencyGraph, "get_all_groups", forever)
    monkeypatch.setattr(PruningGraph, "grouping_timeout_s", 0.3)
    graph._grouping_checked = False
    try:
        with pytest.raises(PruningError, match=r"did not finish grouping .* within 0\.3 s"):
            graph.groups()
    finally:
        release.set()  # let the abandoned worker thread end
    assert all(m.training for m in model.modules())  # modes untouched
