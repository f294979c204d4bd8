"""Pruned checkpoints: the structure is stored as plain data and replayed before the weights load.

A checkpoint written while a pruning callback was attached holds, under ``checkpoint["callbacks"][state_key]``,
the pruning history (module names and channel indices, plain ``str``/``int``/``list``/``dict``) and one
example input (a tensor). No module is pickled, so ``torch.load(path, weights_only=True)`` reads it.

Three ways to get a pruned model back:

* inference in a fresh process, one call: ``model = lightning_hprune.load_pruned(MyModule, path)``;
* ``MyModule.load_from_checkpoint(path)``, after adding this hook to ``MyModule``::

      def on_load_checkpoint(self, checkpoint):
          lightning_hprune.restore_structure(self, checkpoint)

* resuming training: ``trainer.fit(model, ckpt_path=path)`` with the pruning callback attached rebuilds the
  structure before Lightning loads the weights (nothing to add).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn as nn

from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.session import history_of

STATE_MARKER = "lightning_hprune"

#: Written at the top level of every checkpoint of a pruned model (``checkpoint["lightning_hprune"]``).
LOAD_HINT = {
    "pruned": True,
    "how_to_load": (
        "This checkpoint holds a pruned model: its tensors are smaller than a freshly built model's, so "
        "MyModule.load_from_checkpoint(path) alone fails with 'size mismatch'. Use "
        "lightning_hprune.load_pruned(MyModule, path), or add "
        "`def on_load_checkpoint(self, checkpoint): lightning_hprune.restore_structure(self, checkpoint)` "
        "to MyModule; to resume training, trainer.fit(model, ckpt_path=path) with the pruning callback."
    ),
}

T = TypeVar("T", bound=nn.Module)


def find_pruning_state(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """Return the pruning state stored in a Lightning checkpoint dict, if any.

    With several cooperating pruning callbacks, the leading one's entry holds the state; the others' entries
    only point at it (``"member_of"``).
    """
    for value in (checkpoint.get("callbacks") or {}).values():
        if isinstance(value, Mapping) and value.get("marker") == STATE_MARKER and "member_of" not in value:
            return dict(value)
    return None


def pruning_history(checkpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The structural history recorded in a Lightning checkpoint dict (empty when it records no pruning)."""
    state = find_pruning_state(checkpoint)
    return history_of(state) if state else []


def has_structure_of(model: nn.Module, state_dict: Mapping[str, Any]) -> bool:
    """Whether ``model`` has exactly the tensors (names and shapes) of ``state_dict``."""
    own = model.state_dict()
    if set(own) != set(state_dict):
        return False
    return all(
        not isinstance(v, torch.Tensor) or tuple(own[k].shape) == tuple(v.shape)
        for k, v in state_dict.items()
    )


def restore_structure(
    model: nn.Module, checkpoint: Mapping[str, Any], ignored_layers: list[nn.Module] | None = None
) -> PruningGraph | None:
    """Rebuild the pruned structure recorded in ``checkpoint`` on an unpruned ``model``, in place.

    Safe to call twice: when ``model`` already has the checkpoint's structure (its tensors have the names
    and shapes of ``checkpoint["state_dict"]``), nothing is pruned again.

    Args:
        model: a freshly built (unpruned) model of the checkpoint's architecture.
        checkpoint: a Lightning checkpoint dict (``torch.load(path, weights_only=True)``).
        ignored_layers: modules the pruning callback was told to leave alone.

    Returns:
        The dependency graph of the pruned model (its ``history`` is the checkpoint's), or ``None`` when the
        checkpoint records no pruning.

    Raises:
        PruningError: the recorded history does not fit ``model`` (another architecture).

    """
    state = find_pruning_state(checkpoint)
    history = history_of(state) if state else []
    if not state or not history:
        return None
    if state.get("example_input") is None:
        raise ValueError(
            "Expected the checkpoint's pruning state to hold an `example_input` to trace the model with, but "
            "got None."
        )
    graph = PruningGraph(model, state["example_input"], ignored_layers=ignored_layers or [])
    weights = checkpoint.get("state_dict")
    if isinstance(weights, Mapping) and has_structure_of(model, weights):
        graph.history = history  # already restored (e.g. by a module hook): record, do not prune again
    else:
        graph.replay(history)
    return graph


def read_checkpoint(checkpoint_path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint as one dict, read with ``weights_only=True``: a file, or a sharded directory.

    A sharded checkpoint (written by ``ModelParallelStrategy`` or ``FSDPStrategy`` with distributed
    checkpointing: a directory of ``torch.distributed.checkpoint`` shards plus ``meta.pt``) is assembled in
    CPU memory, in one process.
    """
    path = Path(checkpoint_path)
    if not path.is_dir():
        return torch.load(path, map_location=map_location, weights_only=True)
    meta = path / "meta.pt"
    if not meta.is_file():
        raise ValueError(
            f"Expected {os.fspath(checkpoint_path)!r} to be a checkpoint file or a sharded checkpoint directory "
            f"with a 'meta.pt', but it is a directory holding {sorted(p.name for p in path.iterdir())[:8]}."
        )
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        consolidated = Path(tmp) / "consolidated.pt"
        dcp_to_torch_save(path, consolidated)
        checkpoint = torch.load(consolidated, map_location=map_location, weights_only=True)
    checkpoint.update(torch.load(meta, map_location=map_location, weights_only=True))
    return checkpoint


def load_pruned(
    module_cls: type[T],
    checkpoint_path: str | os.PathLike[str],
    map_location: Any = "cpu",
    strict: bool = True,
    **kwargs: Any,
) -> T:
    """Load a pruned model for inference in a fresh process, reading the file with ``weights_only=True``.

    The module is built from the checkpoint's hyper-parameters (``save_hyperparameters()``) updated with
    ``kwargs``, the recorded structure is replayed on it, then the weights are loaded (strictly by default).

    Args:
        module_cls: the model's class (a ``LightningModule`` or any ``nn.Module``).
        checkpoint_path: a checkpoint written while a pruning callback was attached: a file, or the directory
            of a sharded checkpoint (see :func:`read_checkpoint`).
        map_location: where to load the tensors.
        strict: load the weights strictly.
        kwargs: constructor arguments added to (or replacing) the saved hyper-parameters.

    Returns:
        The pruned model, in eval mode. A ``LightningModule`` without ``example_input_array`` gets the
        example input stored in the checkpoint (see :func:`~lightning_hprune.export.export_pruned`).

    Example::

        model = lightning_hprune.load_pruned(MyModule, "checkpoints/last.ckpt")
        model(x)

    """
    checkpoint = read_checkpoint(checkpoint_path, map_location)
    if "state_dict" not in checkpoint:
        raise ValueError(
            f"Expected {os.fspath(checkpoint_path)!r} to be a Lightning checkpoint with a 'state_dict', but "
            f"its keys are {sorted(checkpoint)}."
        )
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    # Bookkeeping keys, not constructor arguments: LightningCLI records `_class_path` (and `_instantiator`).
    for key in ("_instantiator", "_class_path"):
        hparams.pop(key, None)
    hparams.update(kwargs)
    try:
        model = module_cls(**hparams)
    except TypeError as err:
        raise TypeError(
            f"Expected the checkpoint's hyper-parameters {sorted(hparams)} to build {module_cls.__name__}, but "
            f"its constructor raised: {err}. Call `self.save_hyperparameters()` in its `__init__`, or pass the "
            "constructor arguments to `load_pruned` as keyword arguments."
        ) from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `module_cls` to build an `nn.Module`, but got {type(model).__name__}.")
    restore_structure(model, checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=strict)
    state = find_pruning_state(checkpoint)
    if state is not None and getattr(model, "example_input_array", False) is None:
        model.example_input_array = state["example_input"]  # for export and summaries
    model.eval()
    return model
