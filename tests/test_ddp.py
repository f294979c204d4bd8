"""Distributed pruning: two CPU processes (gloo) prune identical channels and keep training in sync.

``strategy="ddp"`` launches the script once per rank, so the run happens in a subprocess running this
module (``python -m tests.test_ddp OUT``), and the test reads back what each rank wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_hprune import HierarchicalPruning
from lightning_hprune.core.importance import RandomImportance
from tests.helpers import TinyCNN, loaders

pytestmark = pytest.mark.fit  # every test here runs a Trainer (or a fresh process)

REPO = Path(__file__).resolve().parents[1]


class WrapperProbe(Callback):
    """After every epoch end (pruning included): is DDP wrapped around exactly the live parameters?"""

    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wrapper = trainer.strategy.model
        live = {id(p) for p in pl_module.parameters()}
        held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.checks.append(
            {
                "epoch": trainer.current_epoch,
                "is_ddp": isinstance(wrapper, torch.nn.parallel.DistributedDataParallel),
                "wraps_live_params": {id(p) for p in wrapper.parameters()} == live,
                "optimizer_holds_live_params": held == live,
            }
        )


def run_rank(out: Path) -> None:
    """One rank of the 2-process run (called by ``python -m tests.test_ddp OUT``)."""
    torch.set_num_threads(1)
    pl.seed_everything(0)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    model = TinyCNN(widths=(16, 16, 16), optimizer="adam", lr=0.01)
    # Rank-dependent random scores: without agreement the ranks would pick different channels.
    pruning = HierarchicalPruning(
        target=0.5,
        importance=RandomImportance(seed=rank),
        round_to=4,
        measure_latency=False,
        verbose=False,
    )
    probe = WrapperProbe()
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[pruning, probe],
        logger=False,
        default_root_dir=str(out),  # the end-of-fit report goes here, not into the working directory
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    train, val = loaders(n=64, batch_size=16)
    trainer.fit(model, train, val)
    torch.save(
        {
            "rank": trainer.global_rank,
            "finished": trainer.state.finished,
            "global_step": trainer.global_step,
            "history": pruning.history_steps(),
            "event_epochs": [r["epoch"] for r in pruning.records],
            "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
            "checks": probe.checks,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


@pytest.mark.slow  # two processes import torch and Lightning: about 20-40 s on 2 busy cores
def test_ddp_two_cpu_processes_prune_identically(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_ddp", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["finished"]
    assert r1["finished"]
    # Both events (ends of epochs 0 and 1) happened on both ranks, with the very same channels.
    assert r0["event_epochs"] == r1["event_epochs"] == [0, 1]
    assert r0["history"] == r1["history"]
    assert r0["history"]
    shapes0 = {k: tuple(v.shape) for k, v in r0["state_dict"].items()}
    assert shapes0 == {k: tuple(v.shape) for k, v in r1["state_dict"].items()}
    assert shapes0["features.0.weight"][0] < 16
    # Training went on after the last event (epoch 2), with gradients still averaged: same weights.
    assert r0["global_step"] == r1["global_step"] == 3 * 2
    for key, value in r0["state_dict"].items():
        torch.testing.assert_close(r1["state_dict"][key], value, msg=key)
    # The DDP wrapper and the optimizer were re-bound to the pruned parameters after every event.
    for checks in (r0["checks"], r1["checks"]):
        assert [c["epoch"] for c in checks] == [0, 1, 2]
        assert all(c["is_ddp"] for c in checks)
        assert all(c["wraps_live_params"] for c in checks)
        assert all(c["optimizer_holds_live_params"] for c in checks)


def test_ddp_spawn_is_refused_before_training() -> None:
    # The refusal depends on how processes start, not on their number: one spawned process keeps it quick.
    model = TinyCNN()
    before = {n: p.shape for n, p in model.named_parameters()}
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        strategy="ddp_spawn",
        callbacks=[HierarchicalPruning(measure_latency=False, verbose=False)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train, val = loaders(n=32)
    with pytest.raises(Exception, match=r"multiprocessing .*ddp_spawn.*Use strategy='ddp'") as info:
        trainer.fit(model, train, val)
    assert "unpruned" in str(info.value)
    assert {n: p.shape for n, p in model.named_parameters()} == before
    assert trainer.global_step == 0


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
