"""Export a pruned model for deployment: ``torch.export``, TorchScript, and ONNX when ``onnx`` is installed.

A pruned model is an ordinary model with smaller layers, so the standard exporters apply; this module adds
what makes them dependable for pruned checkpoints: the example input is the one the pruning callback traced
with (kept in the checkpoint), the batch dimension is exported as dynamic, a ``LightningModule`` is exported
outside a ``Trainer``, the model's train/eval modes are left as they were, and the exported artifact is
loaded back and compared with the module (``check=True``).

Example::

    model = lightning_hprune.load_pruned(MyModule, "last.ckpt")
    lightning_hprune.export_pruned(model, "model.pt2")                     # torch.export
    lightning_hprune.export_pruned(model, "model.onnx", format="onnx")    # needs `pip install onnx onnxscript`
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lightning_hprune.core.graph import preserved_modes, tensors_in
from lightning_hprune.core.measure import batch_of
from lightning_hprune.core.validation import check_choice

FORMATS = ("torch.export", "torchscript", "onnx")


class ExportMismatchError(RuntimeError):
    """The exported model's outputs differ from the module's."""


def export_pruned(
    model: nn.Module,
    path: str | os.PathLike[str],
    format: str = "torch.export",
    example_input: Any = None,
    dynamic_batch: bool = True,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> Path:
    """Export ``model`` (in eval mode) to ``path`` and check that the export computes what the model does.

    Args:
        model: the (pruned) model, e.g. from :func:`~lightning_hprune.load_pruned`.
        path: the file to write (``.pt2`` for ``torch.export``, ``.pt`` for TorchScript, ``.onnx``).
        format: ``"torch.export"`` (an ``ExportedProgram``), ``"torchscript"`` (traced) or ``"onnx"``.
        example_input: inputs of one forward call: a tensor, a tuple of positional arguments or a dict of
            keyword arguments (default: the model's ``example_input_array``, which ``load_pruned`` sets from
            the checkpoint when the module does not).
        dynamic_batch: export the first dimension of every input tensor as dynamic (not for TorchScript,
            whose traces take any batch size when the model does not branch on it).
        check: load the exported file back and compare its outputs on a batch of three with the model's.
        atol: absolute tolerance of the check.
        rtol: relative tolerance of the check.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no example input, or an unknown ``format``.
        ModuleNotFoundError: ``format="onnx"`` without the ``onnx`` and ``onnxscript`` packages.
        ExportMismatchError: the exported outputs differ from the model's.

    """
    check_choice("format", format, FORMATS)
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if example_input is None:
        raise ValueError(
            f"Expected argument `example_input` to be the inputs of one forward call of {type(model).__name__} "
            "(or the model to have `example_input_array`), but got None."
        )
    if format == "onnx":
        _require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # Batches of two: exporters specialise a dimension of size 1, which would freeze the batch size.
    traced_with = _to(batch_of(example_input, 2), device)
    with preserved_modes(model), _outside_trainer(model):
        model.eval()
        if format == "torch.export":
            _export_program(model, traced_with, path, dynamic_batch)
        elif format == "torchscript":
            _export_torchscript(model, traced_with, path)
        else:
            _export_onnx(model, traced_with, path, dynamic_batch)
        if check:
            probe = _to(batch_of(example_input, 3), device)
            with torch.no_grad():
                expected = _call(model, probe)
            actual = load_exported(path, format)(probe)
            _compare(expected, actual, format, atol, rtol)
    return path


def load_exported(path: str | os.PathLike[str], format: str = "torch.export") -> Any:
    """Load an artifact written by :func:`export_pruned` as a callable taking the same inputs as the model.

    ONNX files run with ``onnxruntime`` when it is installed, otherwise with ``onnx``'s reference evaluator
    (slow; meant for checks); their outputs come back as a list of tensors.
    """
    check_choice("format", format, FORMATS)
    if format == "torch.export":
        module = torch.export.load(str(path)).module()
        return lambda inputs: _call(module, inputs)
    if format == "torchscript":
        scripted = torch.jit.load(str(path))
        return lambda inputs: _call(scripted, inputs)
    return _onnx_runner(Path(path))


# ---------------------------------------------------------------------- exporters
def _export_program(model: nn.Module, inputs: Any, path: Path, dynamic_batch: bool) -> None:
    args, kwargs = _split(inputs)
    dynamic = _dynamic_shapes(inputs) if dynamic_batch else None
    program = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic)
    torch.export.save(program, str(path))


def _export_torchscript(model: nn.Module, inputs: Any, path: Path) -> None:
    args, kwargs = _split(inputs)
    traced = torch.jit.trace(model, example_kwarg_inputs=kwargs) if kwargs else torch.jit.trace(model, args)
    torch.jit.save(traced, str(path))


def _export_onnx(model: nn.Module, inputs: Any, path: Path, dynamic_batch: bool) -> None:
    args, kwargs = _split(inputs)
    dynamic = _dynamic_shapes(inputs) if dynamic_batch else None
    torch.onnx.export(
        model, args, str(path), kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic, verbose=False
    )


# ---------------------------------------------------------------------- helpers
def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"Exporting to ONNX needs the packages {missing}: `pip install onnx onnxscript` "
            "(and `onnxruntime` to run the exported model)."
        )


def _onnx_runner(path: Path) -> Any:
    import numpy as np
    import onnx

    model = onnx.load(str(path))
    names = [i.name for i in model.graph.input]
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_ort(feeds: dict[str, Any]) -> list[Any]:
            return list(session.run(None, feeds))

        run = run_ort
    else:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(model)

        def run_reference(feeds: dict[str, Any]) -> list[Any]:
            return list(evaluator.run(None, feeds))

        run = run_reference

    def call(inputs: Any) -> list[torch.Tensor]:
        tensors = tensors_in(inputs)
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
        return [torch.from_numpy(np.asarray(o)) for o in run(feeds)]

    return call


@contextmanager
def _outside_trainer(model: nn.Module) -> Iterator[None]:
    # A LightningModule's `trainer` property raises when it has no Trainer; exporters probe attributes.
    modules = [m for m in model.modules() if hasattr(m, "_jit_is_scripting")]
    saved = [m._jit_is_scripting for m in modules]
    for m in modules:
        m._jit_is_scripting = True  # type: ignore[assignment]
    try:
        yield
    finally:
        for m, value in zip(modules, saved, strict=True):
            m._jit_is_scripting = value


def _split(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple):
        return inputs, {}
    return (inputs,), {}


def _dynamic_shapes(inputs: Any) -> Any:
    batch = torch.export.Dim("batch")

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return {0: batch}
        if isinstance(x, Mapping):
            return {k: spec(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(spec(v) for v in x)
        return None

    if isinstance(inputs, Mapping):
        return {k: spec(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(spec(v) for v in inputs)
    return (spec(inputs),)


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs


def _call(model: Any, inputs: Any) -> Any:
    args, kwargs = _split(inputs)
    return model(*args, **kwargs)


def _compare(expected: Any, actual: Any, format: str, atol: float, rtol: float) -> None:
    want, got = tensors_in(expected), tensors_in(actual)
    if len(want) != len(got):
        raise ExportMismatchError(
            f"The {format} export returns {len(got)} tensors, but the model returns {len(want)}."
        )
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        g = g.to(w.device, w.dtype)
        if w.shape != g.shape or not torch.allclose(w, g, atol=atol, rtol=rtol):
            diff = (w - g).abs().max().item() if w.shape == g.shape else float("nan")
            raise ExportMismatchError(
                f"Output {i} of the {format} export differs from the model's: shapes {tuple(g.shape)} vs "
                f"{tuple(w.shape)}, largest difference {diff:.3g} (atol={atol}, rtol={rtol})."
            )
