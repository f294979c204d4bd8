"""Distillation under DDP: two CPU processes (gloo), each with its own teacher; the ranks agree.

``strategy="ddp"`` launches the script once per rank, so the run happens in a subprocess running this
module (``python -m tests.test_distill_ddp OUT``), and the test reads back what each rank wrote.
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

from lightning_hprune import Distillation, HierarchicalPruning
from lightning_hprune.core.distill import fingerprint
from tests.helpers import TinyCNN, loaders

pytestmark = pytest.mark.fit  # a fresh process runs two Trainers

REPO = Path(__file__).resolve().parents[1]


class TeacherWatch(Callback):
    """After every distilled step: the teacher's fingerprint and the step's logged term."""

    def __init__(self, pruning: HierarchicalPruning) -> None:
        self.pruning = pruning
        self.fingerprints: list[list[float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        d = self.pruning.distiller
        if d is not None and d.teacher is not None:
            self.fingerprints.append(fingerprint(d.teacher))


def run_rank(out: Path) -> None:
    """One rank of the 2-process run (called by ``python -m tests.test_distill_ddp OUT``)."""
    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = TinyCNN(widths=(16, 16, 16), optimizer="adam", lr=0.01)
    pruning = HierarchicalPruning(
        target=0.5, round_to=4, measure_latency=False, verbose=False, distillation=Distillation()
    )
    watch = TeacherWatch(pruning)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[pruning, watch],
        logger=False,
        default_root_dir=str(out),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    train, val = loaders(n=64, batch_size=16)
    trainer.fit(model, train, val)
    d = pruning.distiller
    assert d is not None
    assert d.teacher is not None
    torch.save(
        {
            "rank": trainer.global_rank,
            "teacher": {k: v.clone() for k, v in d.teacher.state_dict().items()},
            "fingerprints": watch.fingerprints,
            "distill_loss": float(trainer.callback_metrics["hprune/distill_loss"]),
            "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
            "history": pruning.history_steps(),
        },
        out / f"rank{trainer.global_rank}.pt",
    )


@pytest.mark.slow  # two processes import torch and Lightning: about 20-40 s on 2 busy cores
def test_ddp_ranks_distil_from_identical_teachers_and_stay_in_sync(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_distill_ddp", str(tmp_path)],
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
    # each rank has its own teacher, with the same weights (copied from the synchronised dense model)
    assert set(r0["teacher"]) == set(r1["teacher"])
    for k, v in r0["teacher"].items():
        assert torch.equal(v, r1["teacher"][k]), k
    assert r0["teacher"]["features.0.weight"].shape[0] == 16  # dense
    # it never changed: epochs 1 and 2 distil (2 steps each per rank)
    for r in (r0, r1):
        assert len(r["fingerprints"]) == 4
        assert all(fp == r["fingerprints"][0] for fp in r["fingerprints"])
    # the logged term is synchronised across ranks; the pruned models and their weights agree
    assert r0["distill_loss"] == pytest.approx(r1["distill_loss"], rel=1e-6)
    assert r0["distill_loss"] > 0
    assert r0["history"] == r1["history"]
    assert r0["state_dict"]["features.0.weight"].shape[0] < 16
    for key, value in r0["state_dict"].items():
        torch.testing.assert_close(r1["state_dict"][key], value, msg=key)


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
