"""Attention heads as units: find multi-head attention layers and prune whole heads consistently.

torch-pruning couples an attention layer's query/key/value projections with the output projection, but it
sees their output features as independent channels. Removing an arbitrary subset of them breaks the
layer's ``reshape(..., num_heads, head_dim)`` (an error) or, worse, silently regroups channels of
different heads into new ones. So a group rooted at an attention projection is pruned in whole heads:
its units are heads (each the ``head_dim`` channels of one head in every projection), the criteria's
channel scores are averaged per head, and after the surgery the layer's head count is updated.

Two layouts are recognised by duck typing (no import of timm or transformers):

* **fused** (timm ``Attention``, ViT/DeiT/Swin-style): a child ``qkv`` :class:`~torch.nn.Linear` whose
  ``3 * num_heads * head_dim`` outputs are laid out ``[q | k | v]``, head-major inside each; ``num_heads``
  (and ``attn_dim`` when present) are updated;
* **separate** (Hugging Face BERT/RoBERTa/ViT ``*SelfAttention``): children ``query``, ``key`` and
  ``value`` :class:`~torch.nn.Linear` of ``num_attention_heads * attention_head_size`` outputs;
  ``num_attention_heads`` and ``all_head_size`` are updated.

A module that looks like attention (it has a ``num_heads``/``num_attention_heads``/``n_heads``/``n_head``
attribute) but matches neither layout is *protected*: groups that change the output width of its
projections are not pruned at all (see :func:`protected_modules`), rather than risk a broken layer.
Heads are never re-sized: ``head_dim`` stays what the architecture chose (a multiple of 8 in practice,
which is also what keeps attention fast).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn as nn

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")


@dataclass(frozen=True)
class HeadLayout:
    """How the output channels of one attention layer's projections split into heads.

    Attributes:
        module: name of the attention module (whose head count is updated after pruning).
        projections: names of the projections whose outputs are head-structured (``qkv``, or
            ``query``/``key``/``value``); any of them may be the root of the torch-pruning group.
        segments: 3 for a fused ``[q | k | v]`` projection, 1 for separate projections.
        style: ``"fused"`` or ``"separate"``.

    """

    module: str
    projections: tuple[str, ...]
    segments: int
    style: str

    def heads(self, model: nn.Module) -> tuple[int, int]:
        """The current ``(num_heads, head_dim)`` of the layer."""
        attn = model.get_submodule(self.module)
        if self.style == "fused":
            return int(getattr(attn, "num_heads")), int(getattr(attn, "head_dim"))  # noqa: B009
        return int(getattr(attn, "num_attention_heads")), int(getattr(attn, "attention_head_size"))  # noqa: B009

    def channels(self, model: nn.Module, heads: Sequence[int]) -> list[int]:
        """Output-channel indices (in a projection's current numbering) of the given heads."""
        n, d = self.heads(model)
        bad = [h for h in heads if not 0 <= int(h) < n]
        if bad:
            raise ValueError(f"Heads {bad} of {self.module!r} are outside [0, {n}).")
        return sorted(
            s * n * d + int(h) * d + j for s in range(self.segments) for h in heads for j in range(d)
        )

    def units(self, model: nn.Module) -> tuple[tuple[int, ...], ...]:
        """Channel indices of every head, in head order."""
        n, _ = self.heads(model)
        return tuple(tuple(self.channels(model, [h])) for h in range(n))

    def set_heads(self, model: nn.Module, removed: int) -> None:
        """Record on the attention module that ``removed`` heads are gone."""
        attn = model.get_submodule(self.module)
        n, d = self.heads(model)
        left = n - removed
        count, width = (
            ("num_heads", "attn_dim") if self.style == "fused" else ("num_attention_heads", "all_head_size")
        )
        setattr(attn, count, left)
        if isinstance(getattr(attn, width, None), int):
            setattr(attn, width, left * d)


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = module._modules.get(name)
    return child if isinstance(child, nn.Linear) else None


def _int_attr(module: nn.Module, name: str) -> int | None:
    value = module.__dict__.get(name, getattr(module, name, None))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def layout_of(name: str, module: nn.Module) -> HeadLayout | None:
    """The head layout of ``module`` when it is a recognised attention layer, else ``None``."""
    prefix = f"{name}." if name else ""
    qkv = _linear(module, "qkv")
    heads, dim = _int_attr(module, "num_heads"), _int_attr(module, "head_dim")
    if qkv is not None and heads and dim and qkv.out_features == 3 * heads * dim:
        return HeadLayout(module=name, projections=(f"{prefix}qkv",), segments=3, style="fused")
    q, k, v = (_linear(module, n) for n in ("query", "key", "value"))
    heads, dim = _int_attr(module, "num_attention_heads"), _int_attr(module, "attention_head_size")
    separate = q is not None and k is not None and v is not None and bool(heads) and bool(dim)
    if separate and q.out_features == k.out_features == v.out_features == heads * dim:  # type: ignore[union-attr,operator]
        names = tuple(f"{prefix}{n}" for n in ("query", "key", "value"))
        return HeadLayout(module=name, projections=names, segments=1, style="separate")
    return None


def find_layouts(model: nn.Module) -> dict[str, HeadLayout]:
    """Every recognised attention layer of ``model``, keyed by the name of each of its projections."""
    out: dict[str, HeadLayout] = {}
    for name, module in model.named_modules():
        layout = layout_of(name, module)
        if layout is not None:
            for proj in layout.projections:
                out[proj] = layout
    return out


def protected_modules(model: nn.Module) -> dict[str, str]:
    """Child layers of unrecognised attention modules: layer name -> attention module name.

    A group that changes the output width of one of these layers is never pruned (torch-pruning would cut
    through heads the layer's forward still counts).
    """
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) or layout_of(name, module) is not None:
            continue  # torch-pruning's own pruner keeps nn.MultiheadAttention consistent
        if not any(_int_attr(module, a) for a in HEAD_COUNT_ATTRS):
            continue
        prefix = f"{name}." if name else ""
        for child_name, child in module.named_children():
            if isinstance(child, (nn.Linear, nn.modules.conv._ConvNd)) or type(child).__name__ == "Conv1D":
                out[prefix + child_name] = name
    return out
