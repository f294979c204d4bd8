"""The main example through the Python API (the same run as ``hprune fit --config examples/digits_cnn.yaml``).

A 5-conv + 2-fc CNN (1.59 M parameters) trains on scikit-learn's bundled digits; ``HierarchicalPruning``
removes half of its parameters during training and the model recovers. Prints a before/after table.

Run:  python examples/digits_cnn.py [--target 0.5] [--cost params]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from lightning_hprune import HierarchicalPruning
from lightning_hprune.examples.digits import DigitsCNN, DigitsDataModule


def run(
    target: float = 0.5, cost: str = "params", max_epochs: int = 14, root: str = "logs/digits_cnn_py"
) -> dict:
    """Train and prune; return the callback's end-of-fit summary."""
    pl.seed_everything(0)
    pruning = HierarchicalPruning(target=target, cost=cost, start_epoch=3, end_epoch=8, monitor="val_acc")
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[pruning],
        logger=pl.loggers.CSVLogger(root, name="csv"),
        enable_progress_bar=False,
        log_every_n_steps=10,
        default_root_dir=root,
    )
    trainer.fit(DigitsCNN(), DigitsDataModule())
    return pruning.summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--cost", choices=["params", "macs"], default="params")
    parser.add_argument("--max-epochs", type=int, default=14)
    ns = parser.parse_args()
    summary = run(ns.target, ns.cost, ns.max_epochs)
    before, after = summary["before"], summary["after"]
    print(
        f"removed {summary['achieved']:.1%} of {ns.cost}; val_acc {before['val_acc']:.4f} -> {after['val_acc']:.4f}"
    )
