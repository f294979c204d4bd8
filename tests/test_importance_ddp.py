"""Under DDP every process scores and prunes the same channels (two CPU processes, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from lightning_hprune import ClosedLoop, HierarchicalPruning
from lightning_hprune.core.importance import IntegratedImportance, Reduce
from lightning_hprune.core.levels import GlobalLevel
from tests.helpers import TinyCNN, loaders

pytestmark = [
    pytest.mark.fit,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]


class RecordingIntegrated(IntegratedImportance):
    """Taylor + activation; writes, per process, the scores it computed and what it reduced, to files."""

    def __init__(self, out_dir: str) -> None:
        super().__init__(["taylor", "activation"], weights=[1.0, 1.0])
        self.out_dir = out_dir
        self.event = 0
        self.scores: list[list[float]] = []  # in call order, which is deterministic on every process
        self.local: list[list[float]] = []

    def prepare(self, model: nn.Module, calibration: Any = (), reduce: Reduce | None = None) -> None:
        assert reduce is not None, "under DDP the callback must pass a cross-process reduction"

        def recording(t: torch.Tensor) -> torch.Tensor:
            self.local.append(t.detach().cpu().flatten().tolist())
            return reduce(t)

        super().prepare(model, calibration, recording)

    def __call__(self, group: Any) -> torch.Tensor:
        scores = super().__call__(group)
        self.scores.append(scores.tolist())
        return scores

    def reset(self) -> None:
        super().reset()
        rank = dist.get_rank()
        path = Path(self.out_dir) / f"event{self.event}_rank{rank}.json"
        path.write_text(json.dumps({"scores": self.scores, "local": self.local}))
        self.event += 1
        self.scores, self.local = [], []


class WriteStructure(pl.Callback):
    def __init__(self, out_dir: str, name: str = "structure") -> None:
        self.out_dir = out_dir
        self.name = name

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruning = next(c for c in trainer.callbacks if isinstance(c, HierarchicalPruning))
        widths = [m.out_channels for m in pl_module.features if isinstance(m, nn.Conv2d)]
        out = {
            "history": pruning.history_steps(),
            "widths": widths,
            "records": len(pruning.records),
            "decisions": [(d["action"], d["epoch"], d["rate"]) for d in pruning.decisions],
            "params": [float(p.double().sum()) for p in pl_module.parameters()],
        }
        (Path(self.out_dir) / f"{self.name}_rank{trainer.global_rank}.json").write_text(json.dumps(out))


def run_two_processes(out: str) -> None:
    """Fit under ``strategy="ddp"`` on 2 CPU processes (Lightning re-launches this module for rank 1)."""
    pl.seed_everything(0)
    cb = HierarchicalPruning(
        target=0.5,
        levels=[GlobalLevel()],
        importance=RecordingIntegrated(out),
        end_epoch=1,
        round_to=1,
        measure_latency=False,
        verbose=False,
    )
    train, _ = loaders(n=128, batch_size=16)
    trainer = pl.Trainer(
        max_epochs=3,
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        callbacks=[cb, WriteStructure(out)],
        logger=False,
        default_root_dir=out,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyCNN(), train)

    # The closed loop under DDP: a far too aggressive one-shot prune is rolled back on every process.
    pl.seed_everything(0)
    closed = HierarchicalPruning(
        target=0.95,
        levels=[GlobalLevel(max_layer_ratio=0.97)],
        schedule="constant",
        start_epoch=1,
        end_epoch=1,
        round_to=1,
        importance="random",
        monitor="val_acc",
        closed_loop=ClosedLoop(max_drop=0.02, max_retries=1),
        measure_latency=False,
        verbose=False,
    )
    train, val = loaders(n=128, batch_size=16)
    pl.Trainer(
        max_epochs=4,
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        callbacks=[closed, WriteStructure(out, "closed_loop")],
        logger=False,
        default_root_dir=out,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(TinyCNN(lr=0.02), train, val)


@pytest.mark.slow
def test_ddp_ranks_score_and_prune_identically(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_importance_ddp", str(tmp_path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    s0 = json.loads((tmp_path / "structure_rank0.json").read_text())
    s1 = json.loads((tmp_path / "structure_rank1.json").read_text())
    assert s0["records"] == 2
    assert s0["history"]
    assert s0 == s1  # the same channels, in the same order, on both processes
    assert s0["widths"] != [16, 32, 32]
    # written by rank 0 only, one run directory per fit under default_root_dir (no logger; two fits)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("**/hprune_report.json")) == [
        "hprune_logs/version_0/hprune_report.json",
        "hprune_logs/version_1/hprune_report.json",
    ]
    for event in (0, 1):
        r0 = json.loads((tmp_path / f"event{event}_rank0.json").read_text())
        r1 = json.loads((tmp_path / f"event{event}_rank1.json").read_text())
        # Each process saw different batches, so its own activation statistics differ ...
        assert any(
            not torch.allclose(torch.tensor(a), torch.tensor(b))
            for a, b in zip(r0["local"], r1["local"], strict=True)
        )
        # ... but after the reduction both score every group identically (before rank 0's broadcast).
        assert len(r0["scores"]) == len(r1["scores"]) > 0
        for a, b in zip(r0["scores"], r1["scores"], strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b))

    # closed loop: the same decisions, rollback included, and the same model on both processes
    c0 = json.loads((tmp_path / "closed_loop_rank0.json").read_text())
    c1 = json.loads((tmp_path / "closed_loop_rank1.json").read_text())
    actions = [a for a, _, _ in c0["decisions"]]
    assert actions[:3] == ["pruned", "roll_back", "pruned"]
    assert c0["decisions"] == c1["decisions"]
    assert c0["history"] == c1["history"]
    assert c0["widths"] == c1["widths"]
    torch.testing.assert_close(torch.tensor(c0["params"]), torch.tensor(c1["params"]))


_DIST_ENV = (
    "LOCAL_RANK",
    "NODE_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_WORLD_SIZE",
)

if __name__ == "__main__":
    run_two_processes(sys.argv[1])
