"""Regenerate the figures of docs/hierarchy.md and docs/reports.md from real runs (2-core CPU: a few minutes).

    python docs/scripts/make_figures.py

Run 1: the default hierarchy (whole blocks, then channels across the network) prunes the digits ResNet
(``lightning_hprune.examples.digits.DigitsResNet``) to a quarter of its MACs, with a closed loop. Run 2:
the same with per-event latency (``LatencyMeasurement(per_event=True)``), to measure what it costs. The
figures are copied to ``docs/img/``; the numbers quoted in the docs go to ``docs/img/runs.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning.pytorch as pl
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from lightning_hprune import ClosedLoop, HierarchicalPruning, LatencyMeasurement  # noqa: E402
from lightning_hprune.examples.digits import DigitsDataModule, DigitsResNet  # noqa: E402

OUT = os.path.join(ROOT, "docs", "img")


def run(tmp: str, per_event: bool) -> tuple[dict, float]:
    pl.seed_everything(0)
    torch.set_num_threads(1)
    cb = HierarchicalPruning(
        target=0.75,
        start_epoch=2,
        end_epoch=5,
        monitor="val_acc",
        closed_loop=ClosedLoop(max_drop=0.01),
        measure_latency=LatencyMeasurement(batch_size=32, per_event=per_event),
    )
    trainer = pl.Trainer(
        max_epochs=9,
        accelerator="cpu",
        devices=1,
        callbacks=[cb],
        logger=pl.loggers.CSVLogger(tmp, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(DigitsResNet(), DigitsDataModule())
    return cb.summary, time.perf_counter() - start


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    numbers = {}
    with tempfile.TemporaryDirectory() as tmp:
        summary, seconds = run(os.path.join(tmp, "a"), per_event=False)
        run_dir = os.path.join(tmp, "a", "run", "version_0")
        for name in ("pruning_curve", "over_epochs", "hierarchy", "decisions"):
            src = os.path.join(run_dir, f"hprune_{name}.png")
            if os.path.exists(src):
                shutil.copy(src, os.path.join(OUT, f"{name}.png"))
        events = summary["events_log"]
        numbers["ends"] = {
            "fit_s": seconds,
            "latency_measurement_s": summary["latency"]["measurement_s"],
            "event_s": [e["event_time_s"] for e in events],
            "latency": summary["latency"],
            "achieved": summary["achieved"],
            "removed_modules": summary["structure"]["removed_modules"],
            "decisions": [d["action"] for d in summary["decisions"]],
        }
        per, seconds = run(os.path.join(tmp, "b"), per_event=True)
        numbers["per_event"] = {
            "fit_s": seconds,
            "latency_measurement_s": per["latency"]["measurement_s"],
            "events": len(per["events_log"]),
        }
    numbers["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, one thread"
    with open(os.path.join(OUT, "runs.json"), "w") as f:
        json.dump(numbers, f, indent=2)
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
