"""``cost="latency"`` against ``cost="macs"`` at the same target: measured CPU speed-up per MACs reduction.

    OMP_NUM_THREADS=1 python benchmarks/latency_cost.py                    # ResNet-20-like CNN + small ViT, 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/latency_cost.py --models resnet --seeds 0 1 2 --target 0.5

Random-init models (no training: the question is what each cost removes, not accuracy): the digits
``DigitsResNet`` (ResNet-20-like, 16x16 inputs) and ``DigitsViT`` (timm ViT, 4 blocks, 128 wide). Each seed
prunes a fresh copy one-shot with the default channel level (``GlobalLevel``, L2 magnitude, ``round_to=8``)
to ``--target`` of its cost in MACs, and another to the same target of its estimated latency
(:class:`~lightning_hprune.core.latency_cost.LatencyCost`, tables timed at ``--batch``). Each pruned model is
timed interleaved with the dense one in the same process (``compare_latency``: ABBA rounds, the ratio's
median and interquartile range); the table gives the MACs ratio, the measured speed-up (dense / pruned) and
the speed-up per MACs reduction (speed-up / MACs ratio: 1 means the model got as much faster as it lost
MACs). Writes ``benchmarks/results/latency_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from lightning_hprune import GlobalLevel
from lightning_hprune.core.cost import MacsCost
from lightning_hprune.core.latency_cost import LatencyCost
from lightning_hprune.core.measure import LatencyMeasurement, compare_latency
from lightning_hprune.core.schedules import EventSchedule
from lightning_hprune.core.session import PruningSession
from lightning_hprune.examples.digits import DigitsResNet, DigitsViT

MODELS = {"resnet": DigitsResNet, "vit": DigitsViT}


def prune(model: torch.nn.Module, example: torch.Tensor, cost: Any, target: float) -> float:
    """One-shot event to ``target`` of ``cost``; returns the seconds it took (tables included)."""
    session = PruningSession(
        [GlobalLevel()],
        target=target,
        cost=cost,
        schedule=EventSchedule(0, 0),
        round_to=8,
        measure_latency=False,
    )
    session.use_example_input(example)
    start = time.perf_counter()
    plan = session.plan(model)
    result = session.execute(model, plan)
    session.record(model, plan, result, epoch=0, step=0)
    return time.perf_counter() - start


#: One latency model per model kind, measured once (as once per training device) and shared by the seeds.
TABLES: dict[str, LatencyCost] = {}


def run(
    name: str, seed: int, target: float, batch: int, settings: LatencyMeasurement
) -> list[dict[str, Any]]:
    example = torch.zeros(1, 1, 16, 16)
    macs = MacsCost()
    torch.manual_seed(seed)
    dense = MODELS[name]().eval()
    dense_macs = macs.measure(dense, example)
    rows = []
    for cost_name in ("macs", "latency"):
        torch.manual_seed(seed)
        model = MODELS[name]().eval()
        cost = TABLES.setdefault(name, LatencyCost(batch_size=batch)) if cost_name == "latency" else "macs"
        seconds = prune(model, example, cost, target)
        model.eval()
        cmp = compare_latency(dense, model, example, settings)
        rows.append(
            {
                "model": name,
                "seed": seed,
                "cost": cost_name,
                "params": sum(p.numel() for p in model.parameters()),
                "macs_ratio": dense_macs / macs.measure(model, example),
                "speedup": 1 / cmp.ratio,
                "speedup_q1": 1 / cmp.ratio_q3,
                "speedup_q3": 1 / cmp.ratio_q1,
                "dense_ms": cmp.dense.median_ms,
                "pruned_ms": cmp.pruned.median_ms,
                "prune_s": seconds,
            }
        )
        print(
            f"{name} seed {seed} {cost_name}: MACs {rows[-1]['macs_ratio']:.2f}x, speed-up {rows[-1]['speedup']:.2f}x "
            f"(IQR {rows[-1]['speedup_q1']:.2f}-{rows[-1]['speedup_q3']:.2f})",
            flush=True,
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | cost | params | MACs ratio | speed-up (median of seeds; seed range) | speed-up per MACs ratio | "
        "slower than dense (seeds) |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["model"], r["cost"]) for r in rows}, key=lambda k: (k[0], k[1] != "macs"))
    for model, cost in keys:
        rs = [r for r in rows if r["model"] == model and r["cost"] == cost]
        sp = [r["speedup"] for r in rs]
        mr = [r["macs_ratio"] for r in rs]
        per = [r["speedup"] / r["macs_ratio"] for r in rs]
        slower = sum(r["speedup_q3"] < 1 for r in rs)
        lines.append(
            f"| {model} | {cost} | {statistics.mean(r['params'] for r in rs):,.0f} | {statistics.mean(mr):.2f}x | "
            f"{statistics.median(sp):.2f}x ({min(sp):.2f}-{max(sp):.2f}) | {statistics.median(per):.2f} "
            f"({min(per):.2f}-{max(per):.2f}) | {slower} of {len(rs)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "latency_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    settings = LatencyMeasurement(batch_size=args.batch, warmup=3, rounds=10, repeats=3, max_share=None)
    rows = [r for m in args.models for s in args.seeds for r in run(m, s, args.target, args.batch, settings)]
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}"
    )
    print(f"machine: {machine}\ntarget {args.target}, batch {args.batch}\n")
    print(table(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": machine,
                "command": " ".join(["python", *sys.argv]),
                "target": args.target,
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
