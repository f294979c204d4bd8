"""Faults: a failure in the middle of an event undoes it entirely; interrupted fits leave usable checkpoints."""

from __future__ import annotations

import copy
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint

import lightning_hprune.callbacks.base as base
import lightning_hprune.callbacks.reporting as reporting
from lightning_hprune import HierarchicalPruning, IntegratedImportance, PruningError, load_pruned
from lightning_hprune.checkpoint import find_pruning_state, has_structure_of
from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.session import PruningSession, history_of
from lightning_hprune.core.undo import by_value
from tests.helpers import TinyCNN, loaders, trainer

pytestmark = pytest.mark.fit  # every test here runs a Trainer (or a fresh process)


class BeforeEvent(Callback):
    """Runs just before the pruning callback at each epoch end: records everything an event may touch."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = trainer.optimizers[0]
        pruning = next(c for c in trainer.callbacks if isinstance(c, HierarchicalPruning))
        self.modules = dict(pl_module.named_modules())
        self.params = dict(pl_module.named_parameters())
        self.values = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.groups = [list(g["params"]) for g in opt.param_groups]
        self.opt_state = {
            id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for p, s in opt.state.items()
        }
        self.lr = [g["lr"] for g in opt.param_groups]
        self.scheduler = copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict())
        self.callback = (pruning.event_index, len(pruning.records), pruning.history_steps())
        # The whole session by value: schedule, ledger, decisions, criterion statistics, calibration, ...
        self.session = by_value(pruning.session.state_dict())
        self.criterion = by_value(pruning.session.importance.state_dict())
        self.wrapper = trainer.strategy.model


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Equal by value, recursively (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert set(a) == set(b), (where, sorted(a), sorted(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)), where
        assert len(a) == len(b), (where, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), (where, a, b)  # NaN == NaN here


def assert_unchanged(
    probe: BeforeEvent, t: pl.Trainer, model: pl.LightningModule, cb: HierarchicalPruning
) -> None:
    assert dict(model.named_modules()) == probe.modules
    assert all(p is probe.params[n] for n, p in model.named_parameters())  # the very same objects
    assert set(dict(model.named_parameters())) == set(probe.params)
    values = model.state_dict()
    assert set(values) == set(probe.values)
    for k, v in probe.values.items():
        assert torch.equal(values[k], v), k
    opt = t.optimizers[0]
    assert [list(g["params"]) for g in opt.param_groups] == probe.groups
    assert {id(p) for p in opt.state} == set(probe.opt_state)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(probe.opt_state[id(p)][k])), k
    assert [g["lr"] for g in opt.param_groups] == probe.lr
    assert t.lr_scheduler_configs[0].scheduler.state_dict() == probe.scheduler
    assert (cb.event_index, len(cb.records), cb.history_steps()) == probe.callback
    assert_same(cb.session.state_dict(), probe.session, "session")
    assert_same(cb.session.importance.state_dict(), probe.criterion, "criterion")
    assert t.strategy.model is probe.wrapper


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _fail_on_second_call(exc: BaseException) -> Any:
    original = PruningGraph._prune_root
    calls = {"n": 0}

    def flaky(self: PruningGraph, name: str, idxs: list[int]) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the first group of the plan is already pruned by now
            raise exc
        original(self, name, idxs)

    return flaky


def _fail_after_remap(*args: Any, **kwargs: Any) -> list[str]:
    base_remap(*args, **kwargs)  # the optimizer really is remapped to the pruned parameters...
    raise RuntimeError("injected failure after re-binding the optimizer")  # ...then the event fails


base_remap = base.remap_optimizer
real_plan = PruningSession.plan


def _fail_after_planning(self: PruningSession, *args: Any, **kwargs: Any) -> Any:
    real_plan(self, *args, **kwargs)  # the baseline and original widths really are taken...
    raise RuntimeError("injected failure while planning")  # ...then the event fails


def _fail_in_logging(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("injected failure while logging the event")  # after the event was recorded


CRITERIA = {
    "taylor": lambda: "taylor",
    "activation": lambda: "activation",
    "integrated": lambda: IntegratedImportance(["taylor", "activation", "l2"]),
}


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
@pytest.mark.parametrize("where", ["planning", "applying the plan", "re-binding the optimizer", "logging"])
def test_failure_inside_an_event_leaves_everything_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, criterion: str
) -> None:
    if where == "planning":
        monkeypatch.setattr(PruningSession, "plan", _fail_after_planning)
    elif where == "applying the plan":
        monkeypatch.setattr(
            PruningGraph, "_prune_root", _fail_on_second_call(RuntimeError("injected failure"))
        )
    elif where == "re-binding the optimizer":
        monkeypatch.setattr(base, "remap_optimizer", _fail_after_remap)
    else:
        monkeypatch.setattr(reporting, "log_event", _fail_in_logging)
    model = TinyCNN(optimizer="adam", scheduler="step")
    probe = BeforeEvent()
    cb = HierarchicalPruning(
        target=0.5, round_to=4, importance=CRITERIA[criterion](), measure_latency=False, verbose=False
    )
    t = trainer(tmp_path, [probe, cb], max_epochs=3, num_sanity_val_steps=0)
    train, val = loaders(n=64)
    with pytest.raises(PruningError, match="the pruning event at epoch 0 failed") as info:
        t.fit(model, train, val)
    message = str(info.value)
    assert "injected failure" in message  # what failed
    assert "exactly as they were before the event" in message
    assert_unchanged(probe, t, model, cb)
    assert model.features[0].out_channels == 16
    if criterion != "activation":  # Taylor statistics of the 2 steps of epoch 0 are still there
        taylor = probe.criterion if criterion == "taylor" else probe.criterion["criteria"][0]
        assert taylor["steps"] == 2
        assert len(taylor["acc"]) == 16  # weight and bias of 3 conv, 3 BN and 2 linear layers
    assert len(probe.session["calibration"]["batches"]) == 2  # the event epoch's batches, kept too

    # Training can go on: without the fault, the same model and callback prune in a new fit.
    monkeypatch.undo()
    t2 = trainer(tmp_path, [cb], max_epochs=3, num_sanity_val_steps=0)
    t2.fit(model, train, val)
    assert t2.state.finished
    assert cb.event_index == 2
    assert _params(model) < _params(TinyCNN())
    live = {id(p) for p in model.parameters()}
    assert {id(p) for g in t2.optimizers[0].param_groups for p in g["params"]} == live


@pytest.fixture
def restore_sigint() -> Iterator[None]:
    # Lightning ignores SIGINT after a KeyboardInterrupt ("graceful shutdown"); give pytest its handler back.
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def test_keyboard_interrupt_mid_event_leaves_no_half_pruned_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_sigint: None
) -> None:
    model = TinyCNN()
    cb = HierarchicalPruning(target=0.5, round_to=4, measure_latency=False, verbose=False)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="{epoch}", save_top_k=-1)
    on_exception = OnExceptionCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="interrupted")

    class InterruptSecondEvent(Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch == 1:  # Ctrl-C while the second event applies its plan
                monkeypatch.setattr(PruningGraph, "_prune_root", _fail_on_second_call(KeyboardInterrupt()))

    t = trainer(
        tmp_path,
        [InterruptSecondEvent(), cb, ckpt, on_exception],
        max_epochs=4,
        enable_checkpointing=True,
        num_sanity_val_steps=0,
    )
    train, val = loaders(n=64)
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after a KeyboardInterrupt
        t.fit(model, train, val)
    monkeypatch.undo()
    assert t.interrupted

    # In memory: exactly the structure after the first event, recorded consistently.
    last = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)
    assert has_structure_of(model, last["state_dict"])
    assert cb.event_index == 1
    assert cb.history_steps() == history_of(find_pruning_state(last))
    # On disk: both the last epoch's checkpoint and the one written on the interrupt load and agree.
    interrupted = tmp_path / "ckpt" / "interrupted.ckpt"
    state = find_pruning_state(torch.load(interrupted, weights_only=True))
    assert state is not None
    assert history_of(state) == cb.history_steps()
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(TinyCNN, interrupted)(x), model(x))
        assert load_pruned(TinyCNN, tmp_path / "ckpt" / "epoch=0.ckpt")(x).shape == (3, 4)

    # And training resumes from the last checkpoint to the end.
    resumed = HierarchicalPruning(target=0.5, round_to=4, measure_latency=False, verbose=False)
    t2 = trainer(tmp_path / "resumed", [resumed], max_epochs=4, num_sanity_val_steps=0)
    fresh = TinyCNN()
    t2.fit(fresh, train, val, ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    assert t2.state.finished
    assert resumed.event_index == 2


class CrashingCNN(TinyCNN):
    """User code that fails in the middle of the pruning schedule."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.current_epoch == 1 and batch_idx == 1:
            raise ValueError("a bug in user code")
        return super().training_step(batch, batch_idx)


def test_exception_in_user_code_mid_pruning_leaves_last_checkpoint_loadable(tmp_path: Path) -> None:
    model = CrashingCNN()
    cb = HierarchicalPruning(target=0.5, round_to=4, measure_latency=False, verbose=False)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="{epoch}", save_top_k=-1, save_last=True)
    t = trainer(tmp_path, [cb, ckpt], max_epochs=4, enable_checkpointing=True, num_sanity_val_steps=0)
    train, val = loaders(n=64)
    with pytest.raises(ValueError, match="a bug in user code"):
        t.fit(model, train, val)
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    state = find_pruning_state(checkpoint)
    assert state is not None
    assert state["schedule"]["position"] == 1  # mid-pruning: after the first of two events
    loaded = load_pruned(TinyCNN, last)
    assert has_structure_of(loaded, checkpoint["state_dict"])
    assert _params(loaded) < _params(TinyCNN())
    # The crashed model itself is consistent too (pruned once, never half-way).
    assert has_structure_of(model, checkpoint["state_dict"])
