"""Hugging Face round trips: save a pruned model so that plain ``from_pretrained`` loads it.

With the default ``uniform_widths=True``, pruning keeps one width per kind (heads, key/value heads, FFN,
hidden size) across layers and rewrites the model's config after every event, so the model's own
``save_pretrained`` writes a config that matches its weights and ``AutoModel...from_pretrained`` (in a
process that never imports lightning_hprune) rebuilds it exactly. :func:`save_pretrained` does that for a
LightningModule that holds the Hugging Face model, after checking that the config is true.

With ``uniform_widths=False`` layers get their own widths, which one config value cannot describe: the model's
``save_pretrained`` is then refused with a message, and :func:`~lightning_hprune.load_pruned` is the way back.
"""

from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from lightning_hprune.core.families.pretrained import (
    PerLayerWidthsError,
    config_mismatches,
    find_pretrained,
    refusal,
    shape_mismatches,
)

__all__ = [
    "PerLayerWidthsError",
    "config_mismatches",
    "find_pretrained",
    "save_pretrained",
    "shape_mismatches",
]


def save_pretrained(model: nn.Module, path: str | os.PathLike[str], **kwargs: Any) -> str:
    """``save_pretrained`` of the Hugging Face model inside ``model`` (a LightningModule or the model itself).

    Args:
        model: the pruned model, or a module holding it.
        path: the directory to write.
        **kwargs: passed to the model's ``save_pretrained`` (``safe_serialization``, ...).

    Returns:
        ``path``.

    Raises:
        PerLayerWidthsError: the layers have different widths (``uniform_widths=False``), or the config does
            not describe the modules (also for models of no known layout, pruned through torch-pruning's
            graph: a model built from the config would have other parameter shapes); the
            message says what differs and what to use instead.

    """
    _, hf = find_pretrained(model)
    problems = config_mismatches(hf) or shape_mismatches(hf)
    if problems:
        raise PerLayerWidthsError(refusal(type(hf).__name__, problems))
    type(hf).save_pretrained(hf, os.fspath(path), **kwargs)  # type: ignore[attr-defined]
    return os.fspath(path)
