"""Exporting a pruned model: the exported artifacts compute what the pruned module computes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_hprune.export as export_module
from lightning_hprune import HierarchicalPruning, load_pruned
from lightning_hprune.export import ExportMismatchError, export_pruned, load_exported
from tests.helpers import TinyCNN, loaders, trainer

pytestmark = pytest.mark.fit  # every test here runs a Trainer (or a fresh process)

SUFFIX = {"torch.export": "pt2", "torchscript": "pt", "onnx": "onnx"}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("export")
    pl.seed_everything(0)
    cb = HierarchicalPruning(target=0.5, round_to=4, measure_latency=False, verbose=False)
    ckpt = ModelCheckpoint(dirpath=str(root), filename="last")
    t = trainer(root, [cb, ckpt], max_epochs=2, enable_checkpointing=True, num_sanity_val_steps=0)
    train, val = loaders(n=64)
    t.fit(TinyCNN(), train, val)
    model = load_pruned(TinyCNN, root / "last.ckpt")
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in TinyCNN().parameters())
    return {"model": model, "root": root}


@pytest.mark.parametrize("fmt", ["torch.export", "torchscript", "onnx"])
def test_exported_outputs_match_the_pruned_module(pruned: dict[str, Any], tmp_path: Path, fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")
    model = pruned["model"]
    model.train()  # export must leave the mode alone
    path = export_pruned(model, tmp_path / f"model.{SUFFIX[fmt]}", format=fmt)
    assert model.training
    assert path.is_file()
    # Load back independently and compare on batch sizes other than the traced one.
    run = load_exported(path, fmt)
    model.eval()
    for n in (1, 5):
        x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            expected = model(x)
        got = run(x)
        got = got[0] if isinstance(got, list) else got
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if fmt == "torch.export":  # the artifact holds the pruned (smaller) weights
        program = torch.export.load(str(path))
        shapes = {k: tuple(v.shape) for k, v in program.state_dict.items()}
        assert shapes["features.0.weight"] == tuple(model.features[0].weight.shape)


def test_export_uses_the_checkpoint_example_input(pruned: dict[str, Any], tmp_path: Path) -> None:
    model = TinyCNN(set_example_input=False)
    assert model.example_input_array is None
    loaded = load_pruned(TinyCNN, pruned["root"] / "last.ckpt", set_example_input=False)
    assert tuple(loaded.example_input_array.shape) == (1, 3, 8, 8)  # from the checkpoint
    assert export_pruned(loaded, tmp_path / "model.pt2").is_file()


def test_export_reports_bad_input_and_mismatches(
    pruned: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="Expected argument `example_input`"):
        export_pruned(bare, tmp_path / "a.pt2")
    with pytest.raises(ValueError, match="Expected argument `format` to be one of"):
        export_pruned(bare, tmp_path / "a.bin", format="tflite", example_input=torch.zeros(1, 4))
    # A wrong export is caught by the check.
    real = export_module.load_exported
    monkeypatch.setattr(export_module, "load_exported", lambda p, f: lambda x: real(p, f)(x) + 1.0)
    with pytest.raises(ExportMismatchError, match="differs from the model's"):
        export_pruned(pruned["model"], tmp_path / "b.pt2")
    monkeypatch.undo()
    # ONNX without its packages: a clear message instead of an import error deep in torch.onnx.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        export_module.importlib.util, "find_spec", lambda name: None if name == "onnx" else find_spec(name)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install onnx onnxscript"):
        export_pruned(pruned["model"], tmp_path / "c.onnx", format="onnx")
