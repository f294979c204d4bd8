"""Benchmark of the criteria: which channels to remove, at 4x fewer MACs, with the same budget.

Trains the digits CNN (``lightning_hprune.examples.digits.DigitsCNN``) once; then, for every criterion,
starts from the same trained weights and runs ``HierarchicalPruning(target=0.75, cost="macs",
levels=[GlobalLevel()])`` for ``--events + --recovery`` epochs: one training epoch per event (it feeds the
Taylor statistics and the calibration batches, identically for every criterion), the events at the end
of the first ``--events`` epochs (geometric schedule; ``--events 1`` is one-shot), then ``--recovery``
epochs of fine-tuning. ``GlobalLevel()`` is what ``HierarchicalPruning()`` uses on a plain CNN (no blocks
to remove): the normalised scores decide both which channels go and how much each layer loses.
``--level layer`` gives every layer the same ratio instead, so the criterion only decides *which*
channels go inside each layer.

Reported per criterion:

* **acc. after pruning, BN recalibrated**: validation accuracy right after the last event, measured on a
  copy whose BatchNorm running statistics were re-estimated on the training set (no gradient step). This
  is the standard way to judge a selection (EagleEye, Li et al., ECCV 2020): without it, the stale
  running statistics of a freshly pruned network dominate the result, whatever it kept;
* **acc. after pruning, raw**: the same without recalibration (for completeness);
* **acc. after recovery**: after the fine-tuning epochs (on this easy task every criterion recovers).

Every criterion is run with ``--seeds`` seeds (mean +- std): the seed sets the training order of the
pruning epochs, hence the Taylor statistics and calibration batches, and the random scores. One draw can
be lucky or unlucky, for every criterion. About 12 minutes on 2 CPU cores with the defaults.

Run:  python benchmarks/criteria.py [--epochs 6] [--events 3] [--recovery 1] [--seeds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn

from lightning_hprune import HierarchicalPruning
from lightning_hprune.core.importance import (
    ActivationImportance,
    BNScaleImportance,
    Importance,
    IntegratedImportance,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
)
from lightning_hprune.core.levels import GlobalLevel, LayerLevel, Level
from lightning_hprune.core.measure import count_macs, count_params
from lightning_hprune.examples.digits import DigitsCNN, DigitsDataModule

CRITERIA: dict[str, Callable[[int], Importance]] = {
    "random": lambda seed: RandomImportance(seed=seed),
    "l1": lambda seed: MagnitudeImportance(p=1),
    "l2": lambda seed: MagnitudeImportance(p=2),
    "taylor": lambda seed: TaylorImportance(),
    "activation (mean)": lambda seed: ActivationImportance(statistic="mean"),
    "activation (apoz)": lambda seed: ActivationImportance(statistic="apoz"),
    "activation (mean, weighted)": lambda seed: ActivationImportance(statistic="mean", weighted=True),
    "bn_scale": lambda seed: BNScaleImportance(),
    "integrated (taylor+l1+bn)": lambda seed: IntegratedImportance(
        [TaylorImportance(), MagnitudeImportance(p=1), BNScaleImportance()], weights=[1.0, 1.0, 1.0]
    ),
}


@torch.no_grad()
def accuracy(model: nn.Module, loader: Any) -> float:
    """Validation accuracy of ``model`` as it is now (eval mode, restored afterwards)."""
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    model.train(was)
    return correct / total


@torch.no_grad()
def recalibrated_accuracy(model: nn.Module, train_loader: Any, val_loader: Any) -> float:
    """Accuracy of a copy whose BatchNorm running statistics were re-estimated on ``train_loader``."""
    twin = copy.deepcopy(model)
    twin.eval()
    for m in twin.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the pass
            m.train()
    for x, _ in train_loader:
        twin(x)
    return accuracy(twin, val_loader)


class AccuracyAfterEvent(pl.Callback):
    """Measures accuracy right after the last pruning event (placed after the pruning callback)."""

    def __init__(self, train_loader: Any, val_loader: Any, epoch: int) -> None:
        self.train_loader, self.val_loader, self.epoch = train_loader, val_loader, epoch
        self.raw: float | None = None
        self.recalibrated: float | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.raw = accuracy(pl_module, self.val_loader)
            self.recalibrated = recalibrated_accuracy(pl_module, self.train_loader, self.val_loader)


def quiet_trainer(max_epochs: int, callbacks: list[pl.Callback], root: str) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )


def train_dense(epochs: int, seed: int, root: str) -> tuple[dict[str, torch.Tensor], float]:
    pl.seed_everything(seed, verbose=False)
    model = DigitsCNN()
    dm = DigitsDataModule(batch_size=64)
    quiet_trainer(epochs, [], root).fit(model, dm)
    dm.setup("fit")
    return {k: v.clone() for k, v in model.state_dict().items()}, accuracy(model, dm.val_dataloader())


def make_level(kind: str) -> Level:
    return LayerLevel() if kind == "layer" else GlobalLevel()


def prune_with(
    name: str,
    dense: dict[str, torch.Tensor],
    level: str,
    events: int,
    recovery: int,
    seed: int,
    root: str,
) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    model = DigitsCNN(lr=1e-3)
    model.load_state_dict(dense)
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    example = model.example_input_array
    dense_macs = count_macs(model, example).total
    after = AccuracyAfterEvent(dm.train_dataloader(), dm.val_dataloader(), epoch=events - 1)
    cb = HierarchicalPruning(
        target=0.75,
        cost="macs",
        levels=[make_level(level)],
        schedule="constant" if events == 1 else "geometric",
        start_epoch=0,
        end_epoch=events - 1,
        importance=CRITERIA[name](seed),
        measure_latency=False,
        calibration_batches=4,
        verbose=False,
    )
    start = time.perf_counter()
    quiet_trainer(events + recovery, [cb, after], root).fit(model, dm)
    return {
        "criterion": name,
        "seed": seed,
        "acc_pruned_raw": after.raw,
        "acc_pruned_recalibrated": after.recalibrated,
        "acc_recovered": accuracy(model, dm.val_dataloader()),
        "macs_ratio": dense_macs / count_macs(model, example).total,
        "params": count_params(model),
        "seconds": time.perf_counter() - start,
    }


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1%}"
    return f"{statistics.mean(values):.1%} +- {statistics.stdev(values):.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=6, help="dense training epochs")
    parser.add_argument("--events", type=int, default=3, help="pruning events, one per epoch")
    parser.add_argument("--recovery", type=int, default=1, help="fine-tuning epochs after the last event")
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="runs per criterion (seeds the training order, the calibration batches and random scores)",
    )
    parser.add_argument("--criteria", nargs="*", default=list(CRITERIA), choices=list(CRITERIA))
    parser.add_argument(
        "--level",
        default="global",
        choices=["layer", "global"],
        help="global (the callback's default level for a plain CNN): one ranking over all layers; layer: one "
        "ratio for every layer (only the choice of channels inside each layer differs)",
    )
    parser.add_argument("--root", default="/tmp/hprune_bench_criteria", help="Lightning's default_root_dir")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    t0 = time.perf_counter()
    dense, dense_acc = train_dense(args.epochs, 0, args.root)
    print(f"dense: {dense_acc:.4f} after {args.epochs} epochs ({time.perf_counter() - t0:.0f}s)", flush=True)
    rows: list[dict[str, Any]] = []
    for name in args.criteria:
        for seed in range(args.seeds):
            r = prune_with(name, dense, args.level, args.events, args.recovery, seed, args.root)
            rows.append(r)
            print(
                f"  {name:<27} seed {seed}: recalibrated {r['acc_pruned_recalibrated']:.4f} raw "
                f"{r['acc_pruned_raw']:.4f} recovered {r['acc_recovered']:.4f} ({r['macs_ratio']:.2f}x MACs, "
                f"{r['seconds']:.0f}s)",
                flush=True,
            )

    print(
        f"\nDigitsCNN (dense accuracy {dense_acc:.1%} after {args.epochs} epochs) pruned to 4x fewer MACs "
        f"(target=0.75), {args.level} level, {args.events} event(s) then {args.recovery} recovery epoch(s); "
        f"{time.perf_counter() - t0:.0f}s in total\n"
    )
    print(
        "| criterion | acc. after pruning, BN recalibrated | acc. after pruning, raw | acc. after recovery "
        "| MACs reduction |"
    )
    print("|---|---|---|---|---|")
    for name in args.criteria:
        mine = [r for r in rows if r["criterion"] == name]
        label = f"{name} ({len(mine)} seeds)" if len(mine) > 1 else name
        print(
            f"| {label} | {fmt([r['acc_pruned_recalibrated'] for r in mine])} | "
            f"{fmt([r['acc_pruned_raw'] for r in mine])} | {fmt([r['acc_recovered'] for r in mine])} | "
            f"{statistics.mean(r['macs_ratio'] for r in mine):.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense_acc": dense_acc, "rows": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
