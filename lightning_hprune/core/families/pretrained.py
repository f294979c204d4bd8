"""Keeping a pruned Hugging Face model loadable by plain ``from_pretrained`` (or saying why it is not).

:func:`config_mismatches` lists what a model's config says that its modules contradict; while the layers have
different widths (``uniform_widths=False``), or while its parameters have shapes its config would not build (a
model of no known layout pruned through torch-pruning's graph), :func:`guard_save_pretrained` makes the model's
own ``save_pretrained`` refuse with a message saying why and what to use instead.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn as nn


class PerLayerWidthsError(RuntimeError):
    """A model whose config cannot describe its modules cannot be saved for plain ``from_pretrained``."""


def find_pretrained(model: nn.Module) -> tuple[str, nn.Module]:
    """The outermost Hugging Face ``PreTrainedModel`` inside ``model`` (``model`` itself included), with its name.

    Raises:
        ValueError: there is none.

    """
    for name, module in model.named_modules():
        if (
            hasattr(module, "save_pretrained")
            and hasattr(module, "config")
            and hasattr(module, "base_model_prefix")
        ):
            return name, module
    raise ValueError(
        f"Expected {type(model).__name__} to hold a Hugging Face `PreTrainedModel` (with `config` and "
        "`save_pretrained`), but found none among its modules."
    )


def config_mismatches(model: nn.Module) -> list[str]:
    """What the config says that the modules contradict (empty: the config is true, or the layout is unknown)."""
    from lightning_hprune.core.families import TransformerFamily, detect

    family = detect(model)
    if family is None:
        return []
    if not isinstance(family, TransformerFamily):  # another layout (Swin) says itself
        return family.mismatches(model)
    config, problems = family.config, []
    expect: dict[str, int] = {"hidden_size": family.hidden_size()}
    for layout in family.stacks():  # the encoder's layers (or a decoder-only model's), then a decoder's
        layers = family._read(layout)
        if layout.layer_count_key is not None:
            expect[layout.layer_count_key] = len(layers)
        if len({lay.heads for lay in layers}) == 1:
            expect[layout.heads_key] = layers[0].heads
        if layout.kv_key and len({lay.kv for lay in layers}) == 1:
            expect[layout.kv_key] = layers[0].kv
        if (
            len({lay.ffn for lay in layers}) == 1
            and getattr(config, layout.intermediate_key, None) is not None
        ):
            expect[layout.intermediate_key] = layers[0].ffn
    if not family.uniform(model):
        layers = family._all_layers()
        problems.append(
            "layers have different widths: "
            + ", ".join(
                f"{lay.name}: {lay.heads} heads"
                + (f" ({lay.cross_heads} cross-attention)" if lay.layout.cross is not None else "")
                + f", {lay.kv} kv, FFN {lay.ffn}"
                for lay in layers[:4]
            )
        )
    for key, value in expect.items():
        if getattr(config, key, None) != value:
            problems.append(f"config.{key}={getattr(config, key, None)!r} but the modules have {value!r}")
    return problems


def refusal(name: str, problems: list[str]) -> str:
    """The message of a refused ``save_pretrained``."""
    return (
        f"Cannot save {name} for plain `from_pretrained`: its config cannot describe its modules ("
        + "; ".join(problems)
        + "). Prune with `uniform_widths=True` (the default: one width per kind across layers) to keep a loadable "
        "config, or save a Lightning checkpoint and reload it with `lightning_hprune.load_pruned(...)`."
    )


def shape_mismatches(hf: nn.Module, limit: int = 3) -> list[str]:
    """Parameters whose shapes differ from those of a model built from ``hf.config`` (on the meta device).

    What plain ``from_pretrained`` would refuse (a size mismatch), for any Hugging Face model: the known
    layouts keep their config true, a model pruned through torch-pruning's graph (no known layout) does not.
    """
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        fresh = type(hf)(copy.deepcopy(hf.config))
    want = {n: tuple(t.shape) for n, t in fresh.state_dict().items()}
    differ = [
        f"{n} is {tuple(t.shape)} but the config builds {want[n]}"
        for n, t in hf.state_dict().items()
        if n in want and tuple(t.shape) != want[n]
    ]
    if len(differ) > limit:
        differ = [*differ[:limit], f"{len(differ) - limit} more"]
    return differ


class RefusingSave:
    """Stands in for a model's ``save_pretrained`` while its config cannot describe it."""

    def __init__(self, model: nn.Module) -> None:
        self.original = type(model).save_pretrained.__get__(model)  # type: ignore[attr-defined]
        self.model_name = type(model).__name__
        self._model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Refuse while the config cannot describe the model; save as usual when it can."""
        problems = config_mismatches(self._model) or shape_mismatches(self._model)
        if problems:
            raise PerLayerWidthsError(refusal(self.model_name, problems))
        return self.original(*args, **kwargs)

    def __reduce__(self) -> Any:
        return (RefusingSave, (self._model,))


def guard_save_pretrained(model: nn.Module) -> None:
    """Make the Hugging Face model's own ``save_pretrained`` refuse while its config cannot describe it."""
    try:
        _, hf = find_pretrained(model)
    except ValueError:
        return
    if not isinstance(hf.__dict__.get("save_pretrained"), RefusingSave):
        hf.__dict__["save_pretrained"] = RefusingSave(hf)
