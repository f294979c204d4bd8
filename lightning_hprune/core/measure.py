"""Measurement without deep copies: parameters, MACs (total and per module) and real latency."""

from __future__ import annotations

import hashlib
import statistics
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
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


def structure_fingerprint(model: nn.Module) -> str:
    """A short hash of the names and shapes of the model's tensors: equal fingerprints, equal structures."""
    h = hashlib.sha1(usedforsecurity=False)
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(getattr(t, 'shape', ()))};".encode())
    return h.hexdigest()[:16]


def _signature(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return ("t", tuple(obj.shape), str(obj.dtype))
    if isinstance(obj, dict):
        return tuple((k, _signature(v)) for k, v in sorted(obj.items()))
    if isinstance(obj, (list, tuple)):
        return tuple(_signature(v) for v in obj)
    return repr(obj)


@contextmanager
def exact_kernels() -> Iterator[None]:
    """Run attention through ops a counter sees: no ``nn.MultiheadAttention`` fast path, math SDPA.

    Under ``no_grad`` (and in eval mode) ``nn.TransformerEncoder`` takes a fused fast path that
    ``FlopCounterMode`` does not see at all (0 MACs counted for a whole encoder), and on the CPU
    ``scaled_dot_product_attention`` dispatches to fused kernels it does not count either.
    """
    mha = getattr(torch.backends, "mha", None)
    previous = mha.get_fastpath_enabled() if mha is not None else None
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel: Any = sdpa_kernel([SDPBackend.MATH])
    except ImportError:  # pragma: no cover - torch < 2.3
        kernel = None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        if kernel is None:  # pragma: no cover
            yield
        else:
            with kernel:
                yield
    finally:
        if mha is not None and previous is not None:
            mha.set_fastpath_enabled(previous)


_MACS_CACHE: OrderedDict[Any, MacsReport] = OrderedDict()
_MACS_CACHE_SIZE = 16


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Any) -> MacsReport:
    """Count MACs with ``torch.utils.flop_counter`` (no deep copy; eval mode, restored afterwards).

    Running in eval mode keeps BatchNorm running statistics untouched and consumes no random numbers;
    attention runs through :func:`exact_kernels` so that fused paths are counted. A model's MACs only change
    with its structure, so results are cached by the model, its structure's fingerprint and the input's
    shapes (pruning a layer changes the fingerprint).
    """
    key = (id(model), structure_fingerprint(model), _signature(example_inputs))
    cached = _MACS_CACHE.get(key)
    if cached is not None:
        _MACS_CACHE.move_to_end(key)
        return cached
    device, dtype = model_device_dtype(model)
    inputs = move_to(example_inputs, device, dtype)
    counter = FlopCounterMode(display=False)
    with preserved_modes(model), exact_kernels():
        model.eval()
        with counter:
            call_model(model, inputs)
    prefix = type(model).__name__
    per_module: dict[str, int] = {}
    for key_, ops in counter.get_flop_counts().items():
        if key_ == "Global":
            continue
        name = key_[len(prefix) + 1 :] if key_.startswith(prefix + ".") else ("" if key_ == prefix else key_)
        per_module[name] = int(sum(ops.values())) // 2
    report = MacsReport(total=int(counter.get_total_flops()) // 2, per_module=per_module)
    _MACS_CACHE[key] = report
    while len(_MACS_CACHE) > _MACS_CACHE_SIZE:
        _MACS_CACHE.popitem(last=False)
    return report


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
