"""Early checks of what only a running fit shows: the monitored metric's name, a dict batch's layout.

Each returns the error message (or ``None``) so that the callback raises it as early as the information
exists: the monitor at the end of the first validation (the sanity check when it already logs it), the
example input's layout when it is chosen, before any training step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn

from lightning_hprune.callbacks.inputs import first_sample
from lightning_hprune.core.graph import call_model, model_device_dtype, move_to, preserved_modes


def logged_names(trainer: pl.Trainer) -> set[str]:
    """Every metric name logged so far: the callback metrics and what the training steps logged this epoch.

    A metric logged with ``on_epoch=True`` in ``training_step`` reaches ``callback_metrics`` only at the end of
    the training epoch, after the first validation; its name is already in the training loop's results.
    """
    names = {str(k) for k in trainer.callback_metrics}
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    results = getattr(loop, "_results", None)
    for key in getattr(results, "keys", list)():
        name = str(key).split(".", 1)[-1]
        names.update({name, f"{name}_step", f"{name}_epoch"})
    return names


def monitor_error(trainer: pl.Trainer, monitor: str | None, owner: str) -> str | None:
    """The error for a ``monitor`` that the first validation did not log (``None`` when it is logged).

    During the sanity check only validation metrics exist, so a miss there is not final (the monitor may
    be a training metric): ``None`` then, and the first real validation decides.
    """
    if monitor is None or trainer.sanity_checking:
        return None
    names = logged_names(trainer)
    if monitor in names:
        return None
    shown = sorted(str(k) for k in trainer.callback_metrics)
    return (
        f"{owner}(monitor={monitor!r}) expected the metric {monitor!r} to be logged by the end of the first "
        f"validation (epoch {trainer.current_epoch}), but the logged metrics are {shown}. Log it with "
        f"`self.log({monitor!r}, ...)` in a validation or training step, or fix the name (pruning uses it at "
        "every event, and the closed loop to judge them)."
    )


def _runs(model: nn.Module, example: Any) -> BaseException | None:
    device, dtype = model_device_dtype(model)
    try:
        with torch.no_grad(), preserved_modes(model):
            model.eval()
            call_model(model, move_to(example, device, dtype))
    except Exception as err:
        return err
    return None


def dict_example_error(model: nn.Module, batch: Any, chosen: Any) -> str | None:
    """The error for a dict batch whose ``forward`` takes the whole dict (``None`` when the choice works).

    ``chosen`` is the example input picked from the batch by the documented rule (a tensor under ``x`` /
    ``input`` / ... or ``None``). When the model does not run on it but runs on the whole dict as one
    positional argument, the user meant ``example_input_array = ({...},)``: a 1-tuple, because a dict alone
    is passed as keyword arguments (Lightning's convention).
    """
    if not isinstance(batch, Mapping):
        return None
    failure = _runs(model, chosen) if chosen is not None else TypeError("no input tensor found")
    if failure is None:
        return None
    whole = first_sample(dict(batch))
    if _runs(model, (whole,)) is not None:
        return None  # neither works: the tracing error (or the generic one) says more
    keys = ", ".join(repr(k) for k in batch)
    first = next(iter(batch), "pixels")
    took = "the tensor under a key of the rule" if chosen is not None else "no tensor (no key of the rule)"
    return (
        f"Expected the example input to be what `{type(model).__name__}.forward` takes, but the training batch is "
        f"a dict ({keys}) that `forward` takes whole, while the documented rule took {took} from it "
        f"(forward then raised {type(failure).__name__}: {failure}). Set the example input to the dict as one "
        f"positional argument, a 1-tuple: `self.example_input_array = ({{{first!r}: x, ...}},)` (a dict alone "
        "is passed as keyword arguments, `forward(**d)`)."
    )
