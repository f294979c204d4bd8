"""Pruned checkpoints: plain data, ``weights_only`` loading, one-call inference loading in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_hprune
from lightning_hprune import HierarchicalPruning
from lightning_hprune.checkpoint import STATE_MARKER, find_pruning_state, has_structure_of, load_pruned
from lightning_hprune.core.session import history_of
from tests.helpers import TinyCNN, loaders, trainer

pytestmark = pytest.mark.fit  # every test here runs a Trainer (or a fresh process)

REPO = Path(__file__).resolve().parents[1]
PLAIN = (str, int, float, bool, type(None), torch.Tensor)


class RestoringCNN(TinyCNN):
    """The documented hook that makes ``load_from_checkpoint`` rebuild the pruned structure."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        lightning_hprune.restore_structure(self, checkpoint)


class NeedsWidth(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(width, width)


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One short fit (events at the ends of epochs 0 and 1) writing a checkpoint every epoch."""
    root = tmp_path_factory.mktemp("pruned_run")
    pl.seed_everything(0)
    model = TinyCNN()
    pruning = HierarchicalPruning(target=0.5, round_to=4, measure_latency=False, verbose=False)
    ckpt = ModelCheckpoint(dirpath=str(root / "ckpt"), filename="{epoch}", save_top_k=-1, save_last=True)
    t = trainer(root, [pruning, ckpt], max_epochs=3, enable_checkpointing=True, num_sanity_val_steps=0)
    train, val = loaders(n=64)
    t.fit(model, train, val)
    model.eval()
    return {"root": root, "model": model, "pruning": pruning, "ckpt": root / "ckpt"}


def _walk(obj: Any, path: str = "") -> list[str]:
    """Paths of everything in ``obj`` that is not plain data (containers of str/int/float/bool/None/tensors)."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _walk(k, path) + _walk(v, f"{path}/{k}")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _walk(v, f"{path}[{i}]")]
    return [] if isinstance(obj, PLAIN) else [f"{path}: {type(obj).__name__}"]


def test_pruned_checkpoints_are_plain_data_loaded_with_weights_only(pruned_run: dict[str, Any]) -> None:
    events = []
    for epoch in range(3):
        checkpoint = torch.load(pruned_run["ckpt"] / f"epoch={epoch}.ckpt", weights_only=True)
        state = find_pruning_state(checkpoint)
        assert state is not None
        assert state["marker"] == STATE_MARKER
        assert _walk(state) == []  # names, indices, numbers and one example tensor: nothing pickled
        for step in history_of(state):
            assert step["op"] in {"channels", "identity"}
            assert isinstance(step["module"], str)
            assert all(isinstance(i, int) for i in step.get("idxs", []))
        assert isinstance(state["example_input"], torch.Tensor)
        assert tuple(state["example_input"].shape) == (1, 3, 8, 8)
        events.append((state["schedule"]["position"], len(history_of(state))))
        # Each checkpoint's structure can be rebuilt on a fresh model and takes its weights strictly.
        fresh = TinyCNN()
        lightning_hprune.restore_structure(fresh, checkpoint)
        assert has_structure_of(fresh, checkpoint["state_dict"])
        fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    assert [e for e, _ in events] == [1, 2, 2]  # mid-pruning after epoch 0, complete after epoch 1
    assert 0 < events[0][1] < events[1][1] == events[2][1]


def test_load_pruned_in_a_fresh_process(pruned_run: dict[str, Any], tmp_path: Path) -> None:
    path = pruned_run["ckpt"] / "last.ckpt"
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import torch, lightning_hprune
from tests.helpers import TinyCNN
from tests.test_checkpoint import RestoringCNN
x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
one_call = lightning_hprune.load_pruned(TinyCNN, {str(path)!r})
hooked = RestoringCNN.load_from_checkpoint({str(path)!r}, map_location="cpu").eval()
with torch.no_grad():
    out = {{"load_pruned": one_call(x), "load_from_checkpoint": hooked(x),
           "shapes": {{n: list(p.shape) for n, p in one_call.named_parameters()}},
           "training": one_call.training}}
torch.save(out, {str(tmp_path / "out.pt")!r})
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    model = pruned_run["model"]
    with torch.no_grad():
        expected = model(x)
    assert out["shapes"] == {n: list(p.shape) for n, p in model.named_parameters()}
    assert out["training"] is False
    torch.testing.assert_close(out["load_pruned"], expected)
    torch.testing.assert_close(out["load_from_checkpoint"], expected)


def test_restore_structure_twice_prunes_once(pruned_run: dict[str, Any]) -> None:
    checkpoint = torch.load(pruned_run["ckpt"] / "last.ckpt", weights_only=True)
    model = TinyCNN()
    first = lightning_hprune.restore_structure(model, checkpoint)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    second = lightning_hprune.restore_structure(model, checkpoint)
    assert first is not None
    assert second is not None
    assert second.history == first.history == pruned_run["pruning"].history_steps()
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert has_structure_of(model, checkpoint["state_dict"])
    # A checkpoint without pruning state leaves the model alone.
    dense = TinyCNN()
    assert lightning_hprune.restore_structure(dense, {"state_dict": dense.state_dict()}) is None
    assert dense.features[0].out_channels == 16


def test_resume_with_a_self_restoring_module_does_not_prune_twice(
    pruned_run: dict[str, Any], tmp_path: Path
) -> None:
    # The callback's own restore runs first; the module's hook then finds the structure already in place.
    path = pruned_run["ckpt"] / "epoch=0.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    restored = find_pruning_state(checkpoint)
    assert restored is not None

    class Probe(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.matches = has_structure_of(pl_module, checkpoint["state_dict"])

    model = RestoringCNN()
    pruning = HierarchicalPruning(target=0.5, round_to=4, measure_latency=False, verbose=False)
    probe = Probe()
    t = trainer(tmp_path, [pruning, probe], max_epochs=3, num_sanity_val_steps=0)
    train, val = loaders(n=64)
    t.fit(model, train, val, ckpt_path=str(path))
    assert t.state.finished
    assert probe.matches
    n = len(history_of(restored))
    assert pruning.history_steps()[:n] == history_of(restored)
    assert len(pruning.history_steps()) > n  # the second event ran on top of the restored structure
    assert pruning.event_index == 2


def test_load_pruned_explains_bad_input(pruned_run: dict[str, Any], tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "not_lightning.pt")
    with pytest.raises(ValueError, match=r"Expected .* to be a Lightning checkpoint with a 'state_dict'"):
        load_pruned(TinyCNN, tmp_path / "not_lightning.pt")
    torch.save({"state_dict": {}}, tmp_path / "no_hparams.ckpt")
    with pytest.raises(TypeError, match=r"save_hyperparameters\(\)"):
        load_pruned(NeedsWidth, tmp_path / "no_hparams.ckpt")
    # Keyword arguments override the saved hyper-parameters.
    model = load_pruned(TinyCNN, pruned_run["ckpt"] / "last.ckpt", lr=0.5)
    assert model.hparams["lr"] == 0.5
    assert has_structure_of(model, pruned_run["model"].state_dict())
