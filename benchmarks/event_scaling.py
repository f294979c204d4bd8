"""One pruning event's wall time and peak extra memory against model size (ResNet-18, Llama-style decoders).

    python benchmarks/event_scaling.py                       # 25 M ... ~1 B parameters, bf16, CPU
    python benchmarks/event_scaling.py --sizes tiny small    # a subset
    python benchmarks/event_scaling.py --sizes resnet18 tiny small --dtype float32

``resnet18`` is a random-init torchvision ResNet-18 (11.7 M parameters, a 1x3x224x224 example input); every
other size is a random-init ``LlamaForCausalLM`` (GQA, SwiGLU) built from a config in ``--dtype``; one event of
the default hierarchy's channel level (``GlobalLevel``, L2 magnitude, 20 % of the parameters, uniform widths)
runs through the Lightning-free session exactly as a callback's event does (undo snapshot, plan, execute,
record). A sampling thread reads the process's resident memory (``/proc/self/statm``) every 2 ms; the table
gives the peak above the level just before the event, as a multiple of the model's parameter bytes, and the
event's wall time. Writes ``benchmarks/results/event_scaling.json``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from lightning_hprune import GlobalLevel
from lightning_hprune.core.schedules import EventSchedule
from lightning_hprune.core.session import PruningSession

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8},
    "small": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 12,
        "num_attention_heads": 16,
    },
    "medium": {
        "hidden_size": 1536,
        "intermediate_size": 4096,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
    },
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
    },
}
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident memory of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler(threading.Thread):
    """Samples the resident memory every ``interval`` seconds until stopped; keeps the peak."""

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, rss(), threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        self.peak = max(self.peak, rss())
        return self.peak


def build_resnet18(dtype: torch.dtype, seq: int) -> tuple[torch.nn.Module, Any]:
    """A random-init torchvision ResNet-18 and a 224x224 example input (``seq`` is unused)."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18().to(dtype), torch.zeros(1, 3, 224, 224, dtype=dtype)


def build_llama(size: str, dtype: torch.dtype, seq: int) -> tuple[torch.nn.Module, Any]:
    """A random-init Llama decoder of one of :data:`SIZES` and ``seq`` tokens of example input."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = SIZES[size]
    config = LlamaConfig(
        vocab_size=32000,
        num_key_value_heads=max(1, cfg["num_attention_heads"] // 4),
        head_dim=cfg["hidden_size"] // cfg["num_attention_heads"],
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **cfg,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    return model, {"input_ids": torch.randint(0, 32000, (1, seq))}


#: Every size this benchmark can build, by name.
BUILDERS: dict[str, Any] = {
    "resnet18": build_resnet18,
    **{name: functools.partial(build_llama, name) for name in SIZES},
}


def one(size: str, dtype: torch.dtype, seq: int) -> dict[str, Any]:
    """One event of the default channel level on model ``size``: wall time and peak extra memory."""
    model, example = BUILDERS[size](dtype, seq)
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    session = PruningSession(
        [GlobalLevel()],
        target=0.2,
        cost="params",
        schedule=EventSchedule(0, 0),
        round_to=8,
        measure_latency=False,
    )
    session.use_example_input(example)
    gc.collect()
    before = rss()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    snapshot = session.snapshot(model)  # what a callback's event takes first
    plan = session.plan(model)
    result = session.execute(model, plan)
    record, _ = session.record(model, plan, result, epoch=0, step=0)
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    del snapshot
    out = {
        "size": size,
        "params": n_params,
        "param_bytes": param_bytes,
        "dtype": str(dtype).replace("torch.", ""),
        "event_s": seconds,
        "peak_extra_bytes": peak - before,
        "peak_extra_x_params": (peak - before) / param_bytes,
        "removed": record.removed,
        "structure": session.graph.family.describe() if session.graph and session.graph.family else None,
    }
    del model, session, plan, result, record
    gc.collect()
    return out


def slope(rows: list[dict[str, Any]], key: str = "event_s") -> float | None:
    """Least-squares slope of log(``key``) against log(parameters) (``None`` with fewer than 2 rows)."""
    pts = [(math.log(r["params"]), math.log(r[key])) for r in rows if r[key] > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of :func:`one`'s rows."""
    lines = [
        "| size | params | param bytes | event (s) | peak extra memory | x param bytes | removed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:,.1f} M | {r['param_bytes'] / 2**30:.2f} GiB | {r['event_s']:.1f} | "
            f"{r['peak_extra_bytes'] / 2**30:.2f} GiB | {r['peak_extra_x_params']:.2f} | {r['removed']:.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(BUILDERS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--seq", type=int, default=16, help="tokens of the example input (MAC counting)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "event_scaling.json"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    dtype = getattr(torch, args.dtype)
    rows = [one(s, dtype, args.seq) for s in args.sizes]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(table(rows))
    slope_ = slope(rows)
    if slope_ is not None:
        print(f"event time grows as params^{slope_:.2f} (log-log slope over {len(rows)} sizes)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "slope": slope_, "dtype": args.dtype}, indent=2))


if __name__ == "__main__":
    main()
