"""Finding the model input: ``example_input_array`` or the first training batch (the documented rule)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def model_input_from_batch(batch: Any) -> torch.Tensor | None:
    """The documented rule for finding the model input in a training batch.

    A tensor is the input; for a tuple or list, its first element; for a dict, the value under ``"x"``,
    ``"input"``, ``"inputs"``, ``"input_ids"`` or ``"image"`` (a dict of several model inputs must be given as
    ``example_input_array``). Returns ``None`` when no input tensor is found.
    """
    x: Any = batch
    if isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
    elif isinstance(batch, dict):
        x = next((batch[k] for k in ("x", "input", "inputs", "input_ids", "image") if k in batch), None)
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    return x


def example_from_batch(batch: Any) -> Any:
    """The first sample of the batch's model input (see :func:`model_input_from_batch`), on the CPU."""
    x = model_input_from_batch(batch)
    return None if x is None else x[:1].detach().cpu().clone()


def calibration_from_batch(batch: Any, example: Any) -> Any:
    """The model input of a training batch in the form the model is called with: that of the example input.

    Calibration inputs (block scores, activation criteria) are passed to the model as the example input is
    (a tensor positionally, a tuple as positional arguments, a dict as keyword arguments), so they must have
    its form:

    * a tensor example input (or none yet): the documented rule, :func:`model_input_from_batch`;
    * a dict of keyword arguments: those keys of a dict batch; with a single key (``{"input_ids": ...}``), also
      the tensor the documented rule finds in any other batch (a bare tensor of token ids, a tuple's first
      element), when it has the example's dtype and number of dimensions;
    * a tuple of positional arguments: the first ``len(example)`` elements of a tuple/list batch, when they
      are tensors of the example's dtypes and numbers of dimensions; a 1-tuple holding a dict (``forward``
      takes the dict whole): that dict's keys of a dict batch, as a 1-tuple.

    Returns ``None`` when the batch does not have the example input's form (the levels and criteria then use
    the example input itself).
    """
    if example is None or isinstance(example, torch.Tensor):
        return model_input_from_batch(batch)
    if isinstance(example, Mapping):
        if isinstance(batch, Mapping) and example and all(k in batch for k in example):
            return {k: batch[k] for k in example}
        if len(example) == 1 and not isinstance(batch, Mapping):
            [(key, want)] = example.items()
            got = model_input_from_batch(batch)
            if (
                isinstance(want, torch.Tensor)
                and got is not None
                and (got.dtype, got.dim()) == (want.dtype, want.dim())
            ):
                return {key: got}
        return None
    if isinstance(example, tuple) and example:
        if len(example) == 1 and isinstance(example[0], Mapping):
            inner = calibration_from_batch(batch, example[0])
            return None if inner is None else (inner,)
        if not isinstance(batch, (tuple, list)) or len(batch) < len(example):
            return None
        args = tuple(batch[: len(example)])
        for got, want in zip(args, example, strict=True):
            if isinstance(want, torch.Tensor) != isinstance(got, torch.Tensor):
                return None
            if isinstance(want, torch.Tensor) and (got.dtype != want.dtype or got.dim() != want.dim()):
                return None
        return args
    return None


def first_sample(example: Any) -> Any:
    """The first sample of an example input (tensor, tuple or dict of tensors), detached, on the CPU."""
    if isinstance(example, torch.Tensor):
        return example[:1].detach().cpu().clone() if example.dim() > 0 else example.detach().cpu()
    if isinstance(example, dict):
        return {k: first_sample(v) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return tuple(first_sample(v) for v in example)
    return example


def batch_size_of(x: torch.Tensor | None) -> int | None:
    """The batch size of a model input found by :func:`model_input_from_batch` (``None`` without one)."""
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None
