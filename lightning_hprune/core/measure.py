"""Measurement without deep copies: parameters, MACs (total and per module) and real latency."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_hprune.core.graph import call_model, model_device_dtype, move_to, preserved_modes


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass(frozen=True)
class MacsReport:
    """MACs of one forward pass of the example input.

    Attributes:
        total: multiply-accumulates of the whole forward pass.
        per_module: MACs per module name (parents include their children; ``""`` is the model).

    """

    total: int
    per_module: dict[str, int]


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Any) -> MacsReport:
    """Count MACs with ``torch.utils.flop_counter`` (no deep copy; eval mode, restored afterwards).

    Running in eval mode keeps BatchNorm running statistics untouched and consumes no random numbers.
    """
    device, dtype = model_device_dtype(model)
    inputs = move_to(example_inputs, device, dtype)
    counter = FlopCounterMode(display=False)
    with preserved_modes(model):
        model.eval()
        with counter:
            call_model(model, inputs)
    prefix = type(model).__name__
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = key[len(prefix) + 1 :] if key.startswith(prefix + ".") else ("" if key == prefix else key)
        per_module[name] = int(sum(ops.values())) // 2
    return MacsReport(total=int(counter.get_total_flops()) // 2, per_module=per_module)


def batch_of(example_inputs: Any, batch_size: int) -> Any:
    """Repeat a one-sample example input to ``batch_size`` along the first dimension."""
    if isinstance(example_inputs, torch.Tensor):
        reps = [batch_size] + [1] * (example_inputs.dim() - 1)
        return example_inputs[:1].repeat(*reps) if example_inputs.dim() > 0 else example_inputs
    if isinstance(example_inputs, dict):
        return {k: batch_of(v, batch_size) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (list, tuple)):
        return type(example_inputs)(batch_of(v, batch_size) for v in example_inputs)
    return example_inputs


@torch.no_grad()
def measure_latency(
    model: nn.Module, example_inputs: Any, batch_size: int = 32, warmup: int = 10, repeats: int = 10
) -> float:
    """Median wall time of one forward pass, in milliseconds (eval mode, restored afterwards).

    ``warmup`` untimed passes come first: the first calls of a fit pay one-time costs (kernel selection,
    allocator growth, thread start-up) that would make the dense model look slower than it is.
    """
    device, dtype = model_device_dtype(model)
    inputs = move_to(batch_of(example_inputs, batch_size), device, dtype)
    times = []
    with preserved_modes(model):
        model.eval()
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            call_model(model, inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
