"""Real latency of pruned models: dense vs. pruned with unrounded and hardware-aligned widths.

Uses the Lightning-free core only (``PruningGraph`` + ``UniformLevel``, magnitude criterion), on
random-init torchvision models (no download). Prints a table of params, MACs ratio and speed-up.

    python benchmarks/latency.py                      # CPU, small batch (a quick check)
    python benchmarks/latency.py --device cuda --batch 256 --bf16 --models resnet50 vit_b_16

On a GPU it uses bf16 autocast and cudnn.benchmark, as in docs' reference figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from lightning_hprune.core.cost import measure_cost
from lightning_hprune.core.engine import run_event
from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.importance import MagnitudeImportance
from lightning_hprune.core.levels import UniformLevel


def build(name: str, size: int) -> torch.nn.Module:
    if name.startswith("vit"):
        return getattr(torchvision.models, name)(image_size=size)
    return getattr(torchvision.models, name)()


def prune(model: torch.nn.Module, example: torch.Tensor, fraction: float, round_to: int) -> None:
    ignored = []
    if hasattr(model, "encoder"):  # ViT: keep the residual stream (hidden_dim) and heads' count
        ignored = [m for n, m in model.named_modules() if n.endswith("self_attention")]
    graph = PruningGraph(model, example, ignored_layers=ignored)
    dense = measure_cost(model, example, "macs")
    sizes = {g.name: g.size for g in graph.groups()}
    run_event(
        graph,
        [(UniformLevel(max_layer_ratio=0.95), dense * (1 - fraction))],
        MagnitudeImportance(),
        "macs",
        sizes,
        round_to,
        0.002 * dense,
    )


@torch.no_grad()
def latency(model: torch.nn.Module, x: torch.Tensor, bf16: bool, repeats: int) -> float:
    model.eval()
    ctx = (
        torch.autocast(x.device.type, dtype=torch.bfloat16)
        if bf16
        else torch.autocast(x.device.type, enabled=False)
    )
    times = []
    with ctx:
        for i in range(repeats + 5):
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 5:
                times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50"])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.75])
    p.add_argument("--round-to", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    if a.device == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"device={a.device} batch={a.batch} size={a.size} bf16={a.bf16}")
    print("| model | variant | params (M) | MACs ratio | latency (ms) | speed-up |")
    print("|---|---|---|---|---|---|")
    for name in a.models:
        torch.manual_seed(0)
        example = torch.randn(1, 3, a.size, a.size)
        dense = build(name, a.size)
        dense_macs = measure_cost(dense, example, "macs")
        x = torch.randn(a.batch, 3, a.size, a.size, device=a.device)
        base = latency(dense.to(a.device), x, a.bf16, a.repeats)
        print(
            f"| {name} | dense | {sum(q.numel() for q in dense.parameters()) / 1e6:.1f} | 1.00 | {base:.2f} | 1.00x |"
        )
        for frac in a.fractions:
            for r in a.round_to:
                torch.manual_seed(0)
                m = build(name, a.size)
                prune(m, example, frac, r)
                macs = measure_cost(m, example, "macs")
                ms = latency(m.to(a.device), x, a.bf16, a.repeats)
                label = f"MACs -{frac:.0%}, widths " + ("unrounded" if r == 1 else f"rounded to {r}")
                print(
                    f"| {name} | {label} | {sum(q.numel() for q in m.parameters()) / 1e6:.1f} | "
                    f"{dense_macs / macs:.2f} | {ms:.2f} | {base / ms:.2f}x |",
                    flush=True,
                )
                del m
            if a.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
