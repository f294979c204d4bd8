"""A GPU check of the callback inside a real fit: bf16-mixed on CUDA, Taylor criterion, resume.

    python benchmarks/gpu_smoke.py OUT_DIR      (runs on the CPU where no GPU is found)

Trains the digits CNN on the GPU, prunes 75 % of its MACs with the default hierarchy, checks that the
pruned model stays on the GPU, that the final reduction meets the target, that a mid-pruning checkpoint
resumes into the recorded architecture, and prints the before/after table (GPU latency at batch 256).
"""

from __future__ import annotations

import json
import sys

import lightning.pytorch as pl
import torch

from lightning_hprune import HierarchicalPruning
from lightning_hprune.checkpoint import find_pruning_state
from lightning_hprune.examples.digits import DigitsCNN, DigitsDataModule


def fit(out: str, max_epochs: int, ckpt_path: str | None = None) -> tuple[DigitsCNN, HierarchicalPruning]:
    pl.seed_everything(0)
    cb = HierarchicalPruning(
        target=0.75,
        importance="taylor",
        start_epoch=1,
        end_epoch=4,
        monitor="val_acc",
        latency_batch_size=256,
    )
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=f"{out}/ckpt", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=1,
        precision="bf16-mixed",
        callbacks=[cb, ckpt],
        logger=pl.loggers.CSVLogger(out, name="csv"),
        enable_progress_bar=False,
        default_root_dir=out,
    )
    model = DigitsCNN()
    trainer.fit(model, DigitsDataModule(), ckpt_path=ckpt_path)
    return model, cb


def main(out: str) -> None:
    model, cb = fit(out, 8)
    assert next(model.parameters()).is_cuda == torch.cuda.is_available()
    summary = cb.summary
    print(cb.report_table)
    assert summary["achieved"] >= 0.75, summary["achieved"]
    # Resume from the checkpoint written at the end of epoch 2 (two events done): the recorded structure
    # is rebuilt before training restarts, and the remaining events complete the target. Lightning does
    # not checkpoint the global RNG (dropout), so the later events may choose other channels.
    path = f"{out}/ckpt/epoch=2-step=69.ckpt"
    state = find_pruning_state(torch.load(path, map_location="cpu", weights_only=True))
    assert state is not None
    resumed, cb2 = fit(out + "/resumed", 8, ckpt_path=path)
    done = len(state["history"])
    prefix_same = cb2.history_steps()[:done] == cb.history_steps()[:done]
    print(
        json.dumps(
            {
                "achieved": summary["achieved"],
                "after": summary["after"],
                "resumed_events": state["event_index"],
                "resume_rebuilt_same_structure": prefix_same,
                "resumed_achieved": cb2.summary["achieved"],
                "resumed_on_gpu": next(resumed.parameters()).is_cuda,
            }
        )
    )
    assert prefix_same
    assert cb2.summary["achieved"] >= 0.75


if __name__ == "__main__":
    main(sys.argv[1])
