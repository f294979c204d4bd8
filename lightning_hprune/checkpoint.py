"""Pruned checkpoints: the structure is stored as plain data and replayed before weights load.

A checkpoint written while :class:`~lightning_hprune.HierarchicalPruning` was attached holds, under
``checkpoint["callbacks"][state_key]``, the pruning history (module names and channel indices) and one
example input. Nothing is pickled, so ``torch.load(path, weights_only=True)`` reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch
import torch.nn as nn

from lightning_hprune.core.graph import PruningGraph

STATE_MARKER = "lightning_hprune"

T = TypeVar("T")


def find_pruning_state(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """Return the pruning callback state stored in a Lightning checkpoint dict, if any."""
    for value in (checkpoint.get("callbacks") or {}).values():
        if isinstance(value, Mapping) and value.get("marker") == STATE_MARKER:
            return dict(value)
    return None


def restore_structure(
    model: nn.Module, checkpoint: Mapping[str, Any], ignored_layers: list[nn.Module] | None = None
) -> PruningGraph | None:
    """Rebuild the pruned structure recorded in ``checkpoint`` on an unpruned ``model``, in place.

    Returns:
        The dependency graph of the pruned model, or ``None`` when the checkpoint records no pruning.

    """
    state = find_pruning_state(checkpoint)
    if not state or not state.get("history"):
        return None
    graph = PruningGraph(model, state["example_input"], ignored_layers=ignored_layers or [])
    graph.replay(state["history"])
    return graph


def load_pruned(module_cls: type[T], checkpoint_path: str, map_location: Any = "cpu", **kwargs: Any) -> T:
    """Load a pruned LightningModule for inference in a fresh process, with ``weights_only=True``.

    The module is built from the checkpoint's hyper-parameters (plus ``kwargs``), the recorded structure is
    replayed, then the weights are loaded strictly.
    """
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    hparams.update(kwargs)
    model = module_cls(**hparams)
    assert isinstance(model, nn.Module)
    restore_structure(model, checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    model.eval()
    return model
