"""Peak memory per rank during a pruning event on an FSDP2-sharded model (two CPU processes, gloo).

A 6-layer MLP (width 2048, 25.2 M parameters, 100.7 MB in float32) is sharded by ``fully_shard`` (one
unit per linear layer, plus the root) under ``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1)`` and trained one epoch with Adam; at its end one event removes 30 % of the
parameters. A thread samples each rank's resident memory (``/proc/self/statm``, every millisecond)
from just before the event to just after it; the script prints, per rank, the resident memory before
the event, the peak increase during it (and at two points: once the model is gathered, and once it is
pruned and sharded again, before the optimizer state is carried over) and the increase left after it, in
MB and in units of the full model's parameter bytes.

``--no-release`` keeps the gathered parameters that pruning replaced until the event ends (what the
event would hold without ``lightning_hprune.core.sharding.releasing``), for comparison.

The processes run with ``MALLOC_MMAP_THRESHOLD_=65536`` (the script re-executes itself with it), so that
every tensor larger than 64 KiB is its own mapping and freeing it lowers the resident size at once:
otherwise glibc's dynamic threshold keeps freed blocks in the heap and the resident size stays at
its high-water mark.

Run:  python benchmarks/fsdp_memory.py [--no-release] [--width 2048] [--layers 6]
About 1 minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_hprune import HierarchicalPruning

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1e6


def rss() -> int:
    """Resident bytes of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class MLP(pl.LightningModule):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())])
        self.out = nn.Linear(width, 10)
        self.example_input_array = torch.zeros(1, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        dp = self.device_mesh["data_parallel"]
        for layer in self.body:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=dp)
        fully_shard(self, mesh=dp)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


class Sampler(Callback):
    """Samples resident memory from ``on_train_epoch_end`` (before pruning) until ``stop()``."""

    def __init__(self) -> None:
        self.before = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before = self.peak = rss()

        def run() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, rss())
                time.sleep(0.001)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss())
        return rss()


class Phases:
    """Resident memory right after the model was gathered, and right before the optimizer state is carried."""

    def __init__(self, sampler: Sampler) -> None:
        self.gathered = 0
        self.resharded = 0
        from lightning_hprune.callbacks import strategies

        unshard, remap = strategies.unshard, strategies.remap_optimizer

        def unshard_and_note(model: Any) -> Any:
            out = unshard(model)
            if sampler.before and not self.gathered:  # the event's (fit start and end gather too, to read)
                self.gathered = rss()
            return out

        def remap_and_note(*args: Any, **kwargs: Any) -> Any:
            self.resharded = self.resharded or rss()
            return remap(*args, **kwargs)

        strategies.unshard = unshard_and_note  # type: ignore[assignment]
        strategies.remap_optimizer = remap_and_note  # type: ignore[assignment]


class Stop(Callback):
    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.after = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.after = self.sampler.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--no-release", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    torch.set_num_threads(1)
    if args.no_release:
        from contextlib import nullcontext

        from lightning_hprune.callbacks import strategies

        strategies.releasing = lambda model, params: nullcontext()  # type: ignore[assignment]
    pl.seed_everything(0)
    model = MLP(args.width, args.layers)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sampler = Sampler()
    stop = Stop(sampler)
    phases = Phases(sampler)
    pruning = HierarchicalPruning(
        target=0.3, cost="params", schedule="constant", end_epoch=0, measure_latency=False, verbose=False
    )
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        callbacks=[sampler, pruning, stop],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir="/tmp/hprune_fsdp_memory",
    )
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, args.width, generator=g), torch.randint(0, 10, (64,), generator=g))
    trainer.fit(model, DataLoader(data, batch_size=16))
    kept = sum(p.numel() for p in model.parameters())  # DTensor numel: the global size
    row = {
        "rank": trainer.global_rank,
        "release": not args.no_release,
        "full_model_MB": full_bytes / MB,
        "params_after_event": kept,
        "params_removed": 1 - kept * 4 / full_bytes,
        "rss_before_event_MB": sampler.before / MB,
        "peak_increase_MB": (sampler.peak - sampler.before) / MB,
        "peak_increase_in_full_models": (sampler.peak - sampler.before) / full_bytes,
        "increase_gathered_MB": (phases.gathered - sampler.before) / MB,
        "increase_sharded_again_MB": (phases.resharded - sampler.before) / MB,
        "increase_after_event_MB": (stop.after - sampler.before) / MB,
    }
    rows: list[dict[str, Any]] = [row]
    if torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, row)
        rows = gathered
    if trainer.global_rank == 0:
        name = "fsdp_memory" + ("_no_release" if args.no_release else "") + ".json"
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / name).write_text(json.dumps(rows, indent=2))
        for r in rows:
            print(
                f"rank {r['rank']}: full model {r['full_model_MB']:.1f} MB; before the event {r['rss_before_event_MB']:.0f} MB "
                f"resident; peak +{r['peak_increase_MB']:.1f} MB (= {r['peak_increase_in_full_models']:.2f} x the full "
                f"model); after +{r['increase_after_event_MB']:.1f} MB; {r['params_removed']:.1%} of the parameters removed\n"
                f"    gathered: +{r['increase_gathered_MB']:.1f} MB; pruned and sharded again, before carrying the "
                f"optimizer state: +{r['increase_sharded_again_MB']:.1f} MB"
            )


if __name__ == "__main__":
    main()
