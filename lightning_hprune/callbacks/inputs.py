"""Finding the model input: ``example_input_array`` or the first training batch (the documented rule)."""

from __future__ import annotations

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
