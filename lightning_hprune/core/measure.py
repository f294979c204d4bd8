"""Measurement: parameters, MACs (total and per module) and latency worth quoting.

Parameters and MACs are counted without deep copies. Latency is timed after warm-up passes, over enough
passes for a median and an interquartile range (:func:`latency_stats`); :func:`compare_latency` times a
dense and a pruned model in alternating rounds in the same process, so that machine noise hits both alike,
and reports the ratio with its spread and a verdict (faster / slower / inconclusive).
"""

from __future__ import annotations

import copy
import hashlib
import math
import statistics
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_hprune.core.graph import call_model, model_device_dtype, move_to, preserved_modes
from lightning_hprune.core.validation import check_int


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


# ---------------------------------------------------------------------- latency worth quoting
@dataclass(frozen=True)
class LatencyMeasurement:
    """How a pruning callback measures forward latency (``measure_latency=LatencyMeasurement(...)``).

    By default latency is measured twice: on the dense model just before the first event, and at the end
    of fit, where the pruned model and a CPU copy of the dense model (taken before the first event) run in
    alternating rounds in the same process, so that machine noise hits both alike. The report gives both
    medians with their interquartile ranges and the ratio with its spread, and says when the spread makes
    the ratio inconclusive.

    Attributes:
        batch_size: the example input is repeated to this batch size.
        warmup: untimed passes before timing each model (one-time costs: kernel selection, allocator
            growth, thread start-up). The first always runs (it also estimates a pass's time); the others
            only as far as ``budget_s`` and ``max_share`` leave room for them beside the fewest timed passes.
        rounds: alternating rounds (dense, pruned, pruned, dense, ...) at the end of fit; each round gives
            one pruned/dense ratio, and their quartiles are the ratio's spread.
        repeats: timed passes of each model per round.
        budget_s: fewer warm-up passes, rounds (never fewer than 5) and repeats when the measurement would
            take longer than this, estimated from the first warm-up pass; the warm-up counts towards it.
        max_share: the measurements of a fit together take at most this share of its training time so far
            (the same reduction as ``budget_s``; never fewer than 5 rounds of 1 pass), so that a short fit
            does not spend more time timing the model than training it; ``None``: only ``budget_s``.
        per_event: also measure after every event (off by default: each measurement costs ``warmup +
            rounds * repeats`` forward passes; see ``docs/reports.md``).
        dense_copy: keep the CPU copy of the dense model for the interleaved comparison. It costs the
            dense model's parameters and buffers in CPU memory (on rank zero only) from the first event to
            the end of fit; set False for models too big for that, and the end-of-fit measurement is
            compared with the one before the first event (not interleaved: the table says so).

    """

    batch_size: int = 32
    warmup: int = 3
    rounds: int = 10
    repeats: int = 5
    budget_s: float = 30.0
    max_share: float | None = 0.01
    per_event: bool = False
    dense_copy: bool = True

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("warmup", self.warmup, minimum=0)
        check_int("rounds", self.rounds, minimum=2)
        check_int("repeats", self.repeats, minimum=1)
        if (
            isinstance(self.budget_s, bool)
            or not isinstance(self.budget_s, (int, float))
            or self.budget_s <= 0
        ):
            raise ValueError(
                f"Expected argument `budget_s` to be a positive number, but got {self.budget_s!r}."
            )
        share = self.max_share
        if share is not None and (
            isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1
        ):
            raise ValueError(
                f"Expected argument `max_share` to be a number in (0, 1] or None, but got {share!r}."
            )
        for name in ("per_event", "dense_copy"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Expected argument `{name}` to be a bool, but got {getattr(self, name)!r}.")


def resolve_latency(value: bool | LatencyMeasurement | None) -> LatencyMeasurement | None:
    """``measure_latency`` as given to a callback: ``True`` -> the defaults, ``False``/``None`` -> off."""
    if value is None or value is False:
        return None
    if value is True:
        return LatencyMeasurement()
    if isinstance(value, LatencyMeasurement):
        return value
    raise ValueError(
        "Expected argument `measure_latency` to be a bool or a `LatencyMeasurement`, but got "
        f"{value!r} ({type(value).__name__})."
    )


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """``(q1, median, q3)`` of ``values`` (inclusive method; a single value is its own quartiles)."""
    data = sorted(float(v) for v in values)
    if not data:
        raise ValueError("Expected at least one value to take quartiles of, but got none.")
    if len(data) == 1:
        return data[0], data[0], data[0]
    q1, q2, q3 = statistics.quantiles(data, n=4, method="inclusive")
    return q1, q2, q3


@dataclass(frozen=True)
class LatencyStats:
    """Forward latency of one model: median and quartiles over the timed passes, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    samples: int

    @property
    def iqr_ms(self) -> float:
        """The interquartile range."""
        return self.q3_ms - self.q1_ms

    @classmethod
    def of(cls, times_ms: Sequence[float]) -> LatencyStats:
        """The statistics of ``times_ms``."""
        q1, q2, q3 = quartiles(times_ms)
        return cls(median_ms=q2, q1_ms=q1, q3_ms=q3, samples=len(times_ms))

    def as_dict(self) -> dict[str, float]:
        """Plain data (the report's layout)."""
        return {
            "median_ms": self.median_ms,
            "q1_ms": self.q1_ms,
            "q3_ms": self.q3_ms,
            "iqr_ms": self.iqr_ms,
            "samples": float(self.samples),
        }


@dataclass(frozen=True)
class LatencyComparison:
    """Dense against pruned latency, with the ratio's spread and a verdict.

    Attributes:
        dense: the dense model's latency.
        pruned: the pruned model's latency.
        ratio: median of the per-round ratios pruned / dense (below 1: the pruned model is faster).
        ratio_q1: the ratios' first quartile.
        ratio_q3: the ratios' third quartile.
        interleaved: both models ran in alternating rounds in the same process (otherwise the ratio compares
            measurements taken at different times, and its spread comes from the two spreads).
        verdict: ``"faster"`` or ``"slower"`` when the ratio's interquartile range lies below or above 1,
            else ``"inconclusive"``.
        device: where the models ran.
        batch_size: the batch size.
        seconds: wall time of the measurement.
        note: why the comparison is not interleaved, when it is not.

    """

    dense: LatencyStats
    pruned: LatencyStats
    ratio: float
    ratio_q1: float
    ratio_q3: float
    interleaved: bool
    device: str
    batch_size: int
    seconds: float
    note: str = ""

    @property
    def verdict(self) -> str:
        """``"faster"``, ``"slower"`` or ``"inconclusive"`` (the ratio's IQR contains 1)."""
        if self.ratio_q3 < 1.0:
            return "faster"
        if self.ratio_q1 > 1.0:
            return "slower"
        return "inconclusive"

    def as_dict(self) -> dict[str, Any]:
        """Plain data (the report's ``"latency"``)."""
        return {
            "dense": self.dense.as_dict(),
            "pruned": self.pruned.as_dict(),
            "ratio": self.ratio,
            "ratio_q1": self.ratio_q1,
            "ratio_q3": self.ratio_q3,
            "verdict": self.verdict,
            "interleaved": self.interleaved,
            "device": self.device,
            "batch_size": self.batch_size,
            "seconds": self.seconds,
            "note": self.note,
        }


class _Timer:
    """Times forward passes of one model on its own device and dtype (eval mode, no gradients)."""

    def __init__(self, model: nn.Module, example_inputs: Any, batch_size: int) -> None:
        self.model = model
        self.device, dtype = model_device_dtype(model)
        self.inputs = move_to(batch_of(example_inputs, batch_size), self.device, dtype)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def run(self, n: int) -> list[float]:
        times = []
        with preserved_modes(self.model):
            self.model.eval()
            for _ in range(n):
                self._sync()
                start = time.perf_counter()
                call_model(self.model, self.inputs)
                self._sync()
                times.append((time.perf_counter() - start) * 1e3)
        return times


def _plan(
    settings: LatencyMeasurement, pass_ms: float, models: int, budget_s: float | None = None
) -> tuple[int, int]:
    """``(rounds, repeats)`` that fit ``settings.budget_s`` and ``budget_s`` (at least 5 rounds and 1 repeat)."""
    rounds, repeats = settings.rounds, settings.repeats
    if pass_ms <= 0:
        return rounds, repeats
    budget = settings.budget_s if budget_s is None else max(0.0, min(settings.budget_s, budget_s))
    fit = budget * 1e3 / (pass_ms * models)
    while rounds * repeats > fit and repeats > 1:
        repeats -= 1
    while rounds * repeats > fit and rounds > min(5, settings.rounds):
        rounds -= 1
    return rounds, repeats


def _warm_up(
    timers: Sequence[_Timer], settings: LatencyMeasurement, budget_s: float | None
) -> list[list[float]]:
    """Warm-up passes of each timer's model: one always, the rest of ``warmup`` only where the budget has room.

    The room is what the budget leaves beside the fewest timed passes (``min(5, rounds)`` rounds of one pass
    of every model), estimated from the first pass.
    """
    warm = [t.run(1) for t in timers]
    if settings.warmup <= 1:
        return warm
    per_pass = sum(min(w) for w in warm)  # ms for one pass of every model
    cap = settings.budget_s if budget_s is None else min(settings.budget_s, budget_s)
    extra = settings.warmup - 1
    if per_pass > 0:
        room = (cap * 1e3 - min(5, settings.rounds) * per_pass - per_pass) / per_pass
        extra = max(0, min(extra, int(room)))
    return [w + t.run(extra) for w, t in zip(warm, timers, strict=True)]


def _left(settings: LatencyMeasurement, budget_s: float | None, start: float) -> float:
    """The budget left for the timed passes after the warm-up that started at ``start``."""
    cap = settings.budget_s if budget_s is None else min(settings.budget_s, budget_s)
    return max(0.0, cap - (time.perf_counter() - start))


def latency_stats(
    model: nn.Module,
    example_inputs: Any,
    settings: LatencyMeasurement | None = None,
    budget_s: float | None = None,
) -> LatencyStats:
    """The latency of one model: up to ``warmup`` untimed passes, then up to ``rounds * repeats`` timed ones.

    ``budget_s`` (e.g. what ``max_share`` of the training time allows) lowers ``settings.budget_s``; the
    warm-up counts towards it.
    """
    settings = settings or LatencyMeasurement()
    start = time.perf_counter()
    timer = _Timer(model, example_inputs, settings.batch_size)
    (warm,) = _warm_up([timer], settings, budget_s)
    rounds, repeats = _plan(settings, min(warm), 1, _left(settings, budget_s, start))
    return LatencyStats.of(timer.run(rounds * repeats))


def compare_latency(
    dense: nn.Module,
    pruned: nn.Module,
    example_inputs: Any,
    settings: LatencyMeasurement | None = None,
    budget_s: float | None = None,
) -> LatencyComparison:
    """Time ``dense`` and ``pruned`` in alternating rounds (ABBA order), in this process, on their devices.

    Both models must be on the same device for the ratio to mean anything (the caller moves them). Each
    round times ``repeats`` passes of each model; the ratio of the two medians of a round is one sample of
    the ratio, so slow drifts of the machine (another job starting, clock changes) cancel within a round.

    ``budget_s`` (e.g. what ``max_share`` of the training time allows) lowers ``settings.budget_s``; the
    warm-up counts towards it.

    Returns:
        The comparison (medians, quartiles, the ratio's quartiles and the verdict).

    """
    settings = settings or LatencyMeasurement()
    start = time.perf_counter()
    timers = [
        _Timer(dense, example_inputs, settings.batch_size),
        _Timer(pruned, example_inputs, settings.batch_size),
    ]
    warm = [min(w) for w in _warm_up(timers, settings, budget_s)]
    rounds, repeats = _plan(settings, sum(warm) / 2, 2, _left(settings, budget_s, start))
    times: list[list[float]] = [[], []]
    ratios = []
    for r in range(rounds):
        medians = [0.0, 0.0]
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            batch = timers[i].run(repeats)
            times[i] += batch
            medians[i] = statistics.median(batch)
        ratios.append(medians[1] / medians[0] if medians[0] > 0 else math.nan)
    q1, q2, q3 = quartiles([x for x in ratios if math.isfinite(x)] or [math.nan])
    return LatencyComparison(
        dense=LatencyStats.of(times[0]),
        pruned=LatencyStats.of(times[1]),
        ratio=q2,
        ratio_q1=q1,
        ratio_q3=q3,
        interleaved=True,
        device=str(timers[1].device),
        batch_size=settings.batch_size,
        seconds=time.perf_counter() - start,
    )


def compare_separate(
    dense: LatencyStats, pruned: LatencyStats, device: str, batch_size: int, seconds: float, note: str
) -> LatencyComparison:
    """A comparison of two measurements taken at different times (no dense copy to interleave with).

    The ratio of the medians, with a spread from the quartiles: ``pruned.q1 / dense.q3`` to
    ``pruned.q3 / dense.q1`` (so it is inconclusive unless the two interquartile ranges do not overlap).
    """
    ratio = pruned.median_ms / dense.median_ms if dense.median_ms > 0 else math.nan
    low = pruned.q1_ms / dense.q3_ms if dense.q3_ms > 0 else math.nan
    high = pruned.q3_ms / dense.q1_ms if dense.q1_ms > 0 else math.nan
    return LatencyComparison(
        dense=dense,
        pruned=pruned,
        ratio=ratio,
        ratio_q1=low,
        ratio_q3=high,
        interleaved=False,
        device=device,
        batch_size=batch_size,
        seconds=seconds,
        note=note,
    )


def cpu_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its parameters and buffers on the CPU.

    Each tensor is copied straight to the CPU, so no second copy of the model is made on its device.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    clone = copy.deepcopy(model, memo)
    for p in clone.parameters():
        p.grad = None
    return clone


def nbytes(model: nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``model``."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
