"""Benchmark of the hierarchy: one-shot, uniform layer-wise, global only, and the default hierarchy.

Trains the digits CNN (``lightning_hprune.examples.digits.DigitsCNN``) and a small residual network
(:class:`DigitsResNet`, ResNet-20-like, torchvision ``BasicBlock``) on scikit-learn's bundled digits to
2x and 4x fewer MACs (``target=0.5`` and ``0.75``, ``cost="macs"``) with the same epoch budget under:

* ``one-shot``: global channel pruning, the whole target at the end of the first epoch
  (``schedule="constant"``), then fine-tuning;
* ``uniform``: layer-wise pruning with one ratio for every layer (``LayerLevel()``), gradual;
* ``global``: global channel pruning only (``GlobalLevel()``), gradual;
* ``hierarchy``: ``HierarchicalPruning()`` with its default levels, gradual.

Gradual methods prune at the end of epochs ``0 .. epochs // 2 - 1`` (geometric schedule) and recover in
the second half. Prints a table of validation accuracy, parameters, MACs and measured CPU latency (batch
64, best of 5 medians of 15 runs) per method. Training and latency use ``--threads`` torch threads (1 by
default: with more, a loaded machine can make every step many times slower). ``--seeds`` > 1 reports the
mean +- std of accuracy. The default (8 epochs, 1 seed) takes about 8 minutes on 2 CPU cores.

Run:  python benchmarks/hierarchy.py [--epochs 8] [--seeds 1] [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_hprune import HierarchicalPruning
from lightning_hprune.core.levels import GlobalLevel, LayerLevel
from lightning_hprune.core.measure import count_macs, count_params, measure_latency
from lightning_hprune.examples.digits import DigitsCNN, DigitsDataModule, DigitsResNet

MODELS: dict[str, Callable[[], pl.LightningModule]] = {"digits_cnn": DigitsCNN, "digits_resnet": DigitsResNet}


def _common(epochs: int) -> dict[str, Any]:
    return {"cost": "macs", "measure_latency": False, "verbose": False, "end_epoch": max(0, epochs // 2 - 1)}


METHODS: dict[str, Callable[[float, int], pl.Callback | None]] = {
    "dense": lambda target, epochs: None,
    "one-shot": lambda target, epochs: HierarchicalPruning(
        target=target, levels=[GlobalLevel()], schedule="constant", **{**_common(epochs), "end_epoch": 0}
    ),
    "uniform": lambda target, epochs: HierarchicalPruning(
        target=target, levels=[LayerLevel()], **_common(epochs)
    ),
    "global": lambda target, epochs: HierarchicalPruning(
        target=target, levels=[GlobalLevel()], **_common(epochs)
    ),
    "hierarchy": lambda target, epochs: HierarchicalPruning(target=target, **_common(epochs)),
}


def run_one(
    model_name: str, method: str, target: float, epochs: int, seed: int, limit: int | None
) -> dict[str, Any]:
    """Train one model with one method; return accuracy, params, MACs, latency and wall time."""
    pl.seed_everything(seed, verbose=False)
    root = tempfile.mkdtemp(prefix="hprune_bench_")
    model = MODELS[model_name]()
    callback = METHODS[method](target, epochs)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[callback] if callback is not None else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,  # the callback's report goes here, not into the current directory
    )
    start = time.perf_counter()
    data = DigitsDataModule(batch_size=64, limit=limit)
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    acc = float(trainer.validate(model, data, verbose=False)[0]["val_acc"])
    x = model.example_input_array
    # The best of 5 medians: robust to other processes on a shared machine.
    latency = min(measure_latency(model, x, batch_size=64, warmup=3, repeats=15) for _ in range(5))
    blocks = [h["module"] for h in callback.history_steps() if h.get("op") == "identity"] if callback else []
    shutil.rmtree(root, ignore_errors=True)
    return {
        "model": model_name,
        "method": method,
        "target": target if callback is not None else 0.0,
        "seed": seed,
        "val_acc": acc,
        "params": count_params(model),
        "macs": count_macs(model, x).total,
        "latency_ms": latency,
        "blocks_removed": len(blocks),
        "fit_s": seconds,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: one line per (model, target, method).

    Accuracy is the mean (+- std) over seeds, latency the best over seeds (like each seed's best of 5: the
    least disturbed by other processes); params, MACs and blocks are those of the first seed.
    """
    keyed: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in rows:
        keyed.setdefault((r["model"], r["target"], r["method"]), []).append(r)
    dense = {m: rs[0] for (m, t, meth), rs in keyed.items() if meth == "dense"}
    lines = [
        "| model | target | method | val acc (%) | params | MACs | MACs ratio | CPU latency (ms) | blocks removed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, target, method), rs in sorted(
        keyed.items(), key=lambda kv: (kv[0][0], kv[0][1], list(METHODS).index(kv[0][2]))
    ):
        accs = [100 * r["val_acc"] for r in rs]
        acc = f"{statistics.mean(accs):.2f}" + (f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else "")
        r = rs[0]
        ratio = dense[model]["macs"] / r["macs"] if model in dense else float("nan")
        lat = min(x["latency_ms"] for x in rs)
        lines.append(
            f"| {model} | {target:.2f} | {method} | {acc} | {r['params']:,} | {r['macs']:,} | {ratio:.2f}x | "
            f"{lat:.3f} | {r['blocks_removed']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8, help="epochs of every run (the same budget for all)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per configuration")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="4 epochs on 256 training samples (a smoke run)")
    parser.add_argument("--json", default=None, help="also write every run's numbers to this file")
    parser.add_argument("--table", default=None, help="only print the table of a JSON file written by --json")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is robust on a shared, loaded machine)"
    )
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            rows = json.load(f)
        print(table(rows))
        return rows
    torch.set_num_threads(args.threads)
    epochs, limit = (4, 256) if args.quick else (args.epochs, None)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    rows: list[dict[str, Any]] = []
    for model in args.models:
        for seed in range(args.seeds):
            for method in args.methods:
                for target in [0.0] if method == "dense" else args.targets:
                    row = run_one(model, method, target, epochs, seed, limit)
                    rows.append(row)
                    print(
                        f"{model:>14} {method:>10} target={target:.2f} seed={seed}: acc={row['val_acc']:.4f} "
                        f"MACs={row['macs']:,} latency={row['latency_ms']:.3f} ms blocks={row['blocks_removed']} "
                        f"[{row['fit_s']:.0f}s]",
                        flush=True,
                    )
    print()
    print(
        f"{epochs} epochs per run, {args.seeds} seed(s); latency: CPU, {args.threads} thread(s), batch 64, "
        "best of 5 medians"
    )
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
