"""``cost="latency"``: a per-layer latency model measured once on the training device (HALP-style).

:class:`LatencyCost` times every kind of prunable layer (``Conv1d``/``Conv2d``/``Conv3d`` with one group or
depthwise, ``Linear``) at a few candidate widths, at the training batch shape, on the model's device and
dtype, and keeps the timings as lookup tables: a layer of the model costs the table's value at its current
input and output widths (bilinear interpolation between the measured widths, linear extrapolation beyond,
never negative; timings are made non-decreasing in each width, so that noise never makes a channel look
like it costs less than nothing). A model's cost is the sum over its tables' layers, in milliseconds of one
forward pass; other layers (norms, activations, attention products) are not counted.

Layers that share their kind, kernel, stride, padding, dilation, bias and input shape (other than the batch
and the channels) share a table, so a network of repeated blocks is measured once per distinct block. A
table's widths are the ``widths`` fractions of the widest such layer of the model it was built on plus every
such layer's own widths, so the dense model's cost is measured, not interpolated, and the table still covers
the model once pruned, and resumed. Tables are measured at the first use and kept: :meth:`LatencyCost.state_dict` goes into the
pruning callback's checkpoint entry (a resumed fit does not measure again), and with ``cache`` set (the
callback sets the run directory's ``hprune_latency_table.json``) the tables are written there and reused by
a later run on the same device, batch size and widths.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from lightning_hprune.core.cost import Cost
from lightning_hprune.core.cuts import Cut
from lightning_hprune.core.graph import call_model
from lightning_hprune.core.measure import measure_latency

#: The layer types a latency table is built for.
TIMED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: Version of the cache file's layout.
CACHE_VERSION = 1


def _key(module: nn.Module, shape: Sequence[int]) -> str | None:
    """The table a layer belongs to (``None``: not timed); ``shape`` is its input's shape at batch 1."""
    rest = list(shape[2:]) if isinstance(module, nn.modules.conv._ConvNd) else list(shape[1:-1])
    if isinstance(module, nn.modules.conv._ConvNd):
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or isinstance(module.padding, str):
            return None
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if module.groups != 1 and not depthwise:
            return None
        parts: list[Any] = [
            type(module).__name__,
            list(module.kernel_size),
            list(module.stride),
            list(module.padding),
            list(module.dilation),
            "depthwise" if depthwise else "dense",
            module.bias is not None,
            rest,
        ]
        return json.dumps(parts)
    if isinstance(module, nn.Linear):
        return json.dumps(["Linear", module.bias is not None, rest])
    return None


def _widths(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    assert isinstance(module, nn.modules.conv._ConvNd)
    return module.in_channels, module.out_channels


def _interp(grid: Sequence[float], values: Sequence[float], x: float) -> float:
    """Piecewise-linear ``values`` over increasing ``grid`` at ``x`` (extrapolated linearly beyond)."""
    if len(grid) == 1:
        return values[0] * x / grid[0] if grid[0] else values[0]
    i = 0
    while i < len(grid) - 2 and x > grid[i + 1]:
        i += 1
    x0, x1 = grid[i], grid[i + 1]
    t = (x - x0) / (x1 - x0) if x1 != x0 else 0.0
    return values[i] + t * (values[i + 1] - values[i])


class LatencyTable:
    """Forward latency (ms) of one kind of layer over a grid of input and output widths.

    Args:
        key: what the layers of this table share (see the module's docstring).
        ins: input widths measured (increasing).
        outs: output widths measured (increasing); a depthwise convolution has ``ins == outs`` and one row.
        ms: ``ms[i][j]``: latency at ``ins[i]``, ``outs[j]`` (depthwise: ``ms[0][j]`` at width ``outs[j]``).

    """

    def __init__(
        self, key: str, ins: Sequence[int], outs: Sequence[int], ms: Sequence[Sequence[float]]
    ) -> None:
        self.key, self.ins, self.outs = key, [int(v) for v in ins], [int(v) for v in outs]
        # Non-decreasing along both widths: timing noise never gives a channel a negative cost.
        rows = [list(map(float, r)) for r in ms]
        for r in rows:
            for j in range(1, len(r)):
                r[j] = max(r[j], r[j - 1])
        for i in range(1, len(rows)):
            rows[i] = [max(a, b) for a, b in zip(rows[i], rows[i - 1], strict=True)]
        self.ms = rows

    @property
    def depthwise(self) -> bool:
        """Whether the table is one-dimensional (input width = output width)."""
        return '"depthwise"' in self.key

    def __call__(self, c_in: float, c_out: float) -> float:
        """Interpolated latency (ms) at ``c_in`` input and ``c_out`` output channels, never negative."""
        if self.depthwise:
            return max(0.0, _interp(self.outs, self.ms[0], c_out))
        column = [_interp(self.outs, row, c_out) for row in self.ms]
        return max(0.0, _interp(self.ins, column, c_in))

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON and checkpoints)."""
        return {"key": self.key, "ins": self.ins, "outs": self.outs, "ms": self.ms}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        """The inverse of :meth:`as_dict`."""
        return cls(str(data["key"]), data["ins"], data["outs"], data["ms"])


class LatencyCost(Cost):
    """Estimated forward latency (ms) from per-layer lookup tables measured on the training device.

    Args:
        batch_size: the batch size layers are timed at (default: the first training batch's, which the
            pruning callback reports; 32 if none was seen).
        widths: the fractions of each table's widest layer that are timed, along both widths.
        warmup: untimed passes before each timing.
        repeats: timed passes per width (the median is kept).
        cache: a JSON file the tables are written to and read from (the callback sets the run directory's
            ``hprune_latency_table.json`` when this is ``None``).

    """

    name = "latency"

    def __init__(
        self,
        batch_size: int | None = None,
        widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        warmup: int = 2,
        repeats: int = 5,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(
                f"Expected argument `batch_size` to be a positive int or None, but got {batch_size!r}."
            )
        fractions = list(widths) if isinstance(widths, Sequence) and not isinstance(widths, str) else None
        if not fractions or any(
            isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1 for f in fractions
        ):
            raise ValueError(
                f"Expected argument `widths` to be a non-empty sequence of fractions in (0, 1], but got {widths!r}."
            )
        for name, value, low in (("warmup", warmup, 0), ("repeats", repeats, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Expected argument `{name}` to be an int >= {low}, but got {value!r}.")
        self.batch_size = batch_size
        self.widths = sorted({float(f) for f in fractions})
        self.warmup, self.repeats = warmup, repeats
        self.cache = None if cache is None else os.fspath(cache)
        #: The lookup tables by key (see :class:`LatencyTable`).
        self.tables: dict[str, LatencyTable] = {}
        #: Where the tables came from: ``"measured"``, ``"cache"`` or ``"checkpoint"`` (``None``: not yet).
        self.source: str | None = None
        #: Layer timings run by this object (what a resumed fit must not repeat).
        self.timings = 0
        #: Device the tables were measured on.
        self.device: str | None = None
        self._layers: dict[str, tuple[str, nn.Module]] = {}  # the last traced model: name -> (key, layer)

    # ------------------------------------------------------------------ what the callback tells it
    def observe_batch(self, batch_size: int) -> None:
        """The training batch size (the first one reported is kept, unless ``batch_size`` was given)."""
        if self.batch_size is None and not self.tables:
            self.batch_size = int(batch_size)

    def settings(self) -> dict[str, Any]:
        """What a table depends on (a cache or checkpoint with other settings is not reused)."""
        return {"batch_size": self.batch_size or 32, "widths": self.widths, "device": self.device}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The tables and their settings (in the pruning callback's checkpoint entry)."""
        return {
            "version": CACHE_VERSION,
            "batch_size": self.batch_size,
            "widths": self.widths,
            "device": self.device,
            "tables": [t.as_dict() for t in self.tables.values()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the tables of :meth:`state_dict` (a resumed fit measures nothing that they cover)."""
        if not state or not state.get("tables"):
            return
        if [float(f) for f in state.get("widths", [])] != self.widths:
            return  # measured at other widths: measure again
        self.batch_size = state.get("batch_size") or self.batch_size
        self.device = state.get("device")
        self.tables = {t["key"]: LatencyTable.from_dict(t) for t in state["tables"]}
        self.source = "checkpoint"

    def _read_cache(self, device: str) -> None:
        if self.cache is None or not os.path.exists(self.cache):
            return
        try:
            with open(self.cache) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return
        if (
            data.get("version") != CACHE_VERSION
            or data.get("device") != device
            or data.get("batch_size") != (self.batch_size or 32)
            or [float(v) for v in data.get("widths", [])] != self.widths
        ):
            return
        for t in data.get("tables", []):
            self.tables.setdefault(t["key"], LatencyTable.from_dict(t))
        self.source = self.source or "cache"

    def _write_cache(self) -> None:
        if self.cache is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.cache)), exist_ok=True)
        state = {**self.state_dict(), "batch_size": self.batch_size or 32}
        with open(self.cache, "w") as f:
            json.dump(state, f, indent=1)

    # ------------------------------------------------------------------ tracing and timing
    @staticmethod
    def _trace(model: nn.Module, example_inputs: Any) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
        """Every timed layer that runs in one forward pass, with its input's shape."""
        names = {m: n for n, m in model.named_modules()}
        seen: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor) and module in names:
                seen.setdefault(names[module], (module, tuple(args[0].shape)))

        handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, TIMED_TYPES)]
        training = model.training
        try:
            model.eval()
            with torch.no_grad():
                call_model(model, example_inputs)
        finally:
            model.train(training)
            for h in handles:
                h.remove()
        return seen

    def _time(self, module: nn.Module, shape: tuple[int, ...], c_in: int, c_out: int) -> float:
        """Median forward latency (ms) of a fresh layer like ``module`` with ``c_in``/``c_out`` channels."""
        p = next(module.parameters())
        device, dtype = p.device, p.dtype
        batch = self.batch_size or 32
        if isinstance(module, nn.Linear):
            layer: nn.Module = nn.Linear(c_in, c_out, bias=module.bias is not None)
            x = torch.randn(1, *shape[1:-1], c_in, device=device, dtype=dtype)
        else:
            assert isinstance(module, nn.modules.conv._ConvNd)
            groups = c_in if module.groups > 1 else 1
            conv: Any = type(module)
            layer = conv(
                c_in,
                c_out,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=groups,
                bias=module.bias is not None,
            )
            x = torch.randn(1, c_in, *shape[2:], device=device, dtype=dtype)
        layer = layer.to(device=device, dtype=dtype)
        self.timings += 1
        return measure_latency(layer, x, batch_size=batch, warmup=self.warmup, repeats=self.repeats)

    def _grid(self, widths: Sequence[int]) -> list[int]:
        """The fractions of the widest layer, and every layer's own width (so dense costs are measured)."""
        full = max(widths)
        return sorted({max(1, round(f * full)) for f in self.widths} | set(widths))

    def build(self, model: nn.Module, example_inputs: Any) -> None:
        """Measure the tables ``model`` needs that are not known yet (from the cache, or a checkpoint)."""
        traced = self._trace(model, example_inputs)
        p = next(model.parameters(), None)
        device = str(p.device) if p is not None else "cpu"
        if not self.tables:
            self._read_cache(device)
        todo: dict[str, list[tuple[nn.Module, tuple[int, ...]]]] = {}
        for module, shape in traced.values():
            key = _key(module, shape)
            if key is not None and key not in self.tables:
                todo.setdefault(key, []).append((module, shape))
        if not todo:
            return
        self.device = device
        for key, layers in todo.items():
            module, shape = layers[0]
            ins = self._grid([_widths(m)[0] for m, _ in layers])
            outs = self._grid([_widths(m)[1] for m, _ in layers])
            if '"depthwise"' in key:
                ms = [[self._time(module, shape, w, w) for w in outs]]
                self.tables[key] = LatencyTable(key, outs, outs, ms)
            else:
                ms = [[self._time(module, shape, ci, co) for co in outs] for ci in ins]
                self.tables[key] = LatencyTable(key, ins, outs, ms)
        self.source = "measured"
        self._write_cache()

    # ------------------------------------------------------------------ Cost
    def _layer_costs(self, model: nn.Module, example_inputs: Any) -> dict[str, float]:
        self.build(model, example_inputs)
        out: dict[str, float] = {}
        self._layers = {}
        for name, (module, shape) in self._trace(model, example_inputs).items():
            key = _key(module, shape)
            if key is None or key not in self.tables:
                continue
            c_in, c_out = _widths(module)
            out[name] = self.tables[key](c_in, c_out)
            self._layers[name] = (key, module)
        return out

    def measure(self, model: nn.Module, example_inputs: Any) -> float:
        """The estimated forward latency (ms) of ``model`` at the table's batch size."""
        return float(sum(self._layer_costs(model, example_inputs).values()))

    def per_module(self, model: nn.Module, example_inputs: Any) -> dict[str, float]:
        """Estimated latency of every module (parents include their children; ``""`` is the model)."""
        leaves = self._layer_costs(model, example_inputs)
        out = {n: 0.0 for n, _ in model.named_modules()}
        for name, ms in leaves.items():
            parts = name.split(".")
            for i in range(len(parts) + 1):
                parent = ".".join(parts[:i])
                if parent in out:
                    out[parent] += ms
        return out

    def _slope(self, name: str, dim: str) -> float | None:
        """What one channel less along ``dim`` (``"in"``/``"out"``) saves in layer ``name`` (ms).

        The table's local slope at the layer's widths, but never less than its average slope over the measured
        range of that width (the chord): timing noise, flattened by the non-decreasing fit, and a GPU's
        staircase leave stretches where the local slope is zero, and a channel that looks free would be
        removed in bulk, far past the target (an event cannot take back what it removed; saving less than
        predicted only costs another round).
        """
        found = self._layers.get(name)
        if found is None:
            return None
        key, module = found
        table = self.tables[key]
        c_in, c_out = _widths(module)
        if table.depthwise:
            local = table(c_in, c_out) - table(c_in - 1, c_out - 1)
            lo, hi = table.outs[0], table.outs[-1]
            chord = (table(hi, hi) - table(lo, lo)) / (hi - lo) if hi > lo else 0.0
        elif dim == "out":
            local = table(c_in, c_out) - table(c_in, c_out - 1)
            lo, hi = table.outs[0], table.outs[-1]
            chord = (table(c_in, hi) - table(c_in, lo)) / (hi - lo) if hi > lo else 0.0
        else:
            local = table(c_in, c_out) - table(c_in - 1, c_out)
            lo, hi = table.ins[0], table.ins[-1]
            chord = (table(hi, c_out) - table(lo, c_out)) / (hi - lo) if hi > lo else 0.0
        return max(local, chord)

    def per_unit_of_layer(
        self, module: nn.Module, name: str, width: int, costs: Mapping[str, float]
    ) -> float:
        """The table's marginal latency of one channel along the pruned dimension (the one of ``width``).

        A layer whose input and output widths are equal gets the mean of the two (the graph does not say
        which side a group prunes).
        """
        if not isinstance(module, TIMED_TYPES) or name not in self._layers:
            return 0.0
        c_in, c_out = _widths(module)
        sides = [d for d, w in (("in", c_in), ("out", c_out)) if w == width] or ["out"]
        slopes = [s for s in (self._slope(name, d) for d in sides) if s is not None]
        return max(0.0, statistics.fmean(slopes)) if slopes else 0.0

    def per_cut_unit(self, cut: Cut, costs: Mapping[str, float]) -> float:
        """What one unit of a layout group's cut saves: the marginal latency along the cut's dimension."""
        module = self._layers.get(cut.name, (None, None))[1]
        p = cut.tensor
        if module is None or p is None or cut.param != "weight" or not isinstance(module, nn.Linear):
            return super().per_cut_unit(cut, costs)
        slope = self._slope(cut.name, "out" if cut.dim == 0 else "in")
        return 0.0 if slope is None or not math.isfinite(slope) else max(0.0, slope) * len(cut.units[0])

    def __repr__(self) -> str:
        return f"LatencyCost(batch_size={self.batch_size!r}, widths={self.widths!r})"
