"""Attention heads as units: find multi-head attention layers and prune whole heads consistently.

torch-pruning couples an attention layer's query/key/value projections with the output projection, but it
sees their output features as independent channels. Removing an arbitrary subset of them breaks the
layer's ``reshape(..., num_heads, head_dim)`` (an error) or, worse, silently regroups channels of
different heads into new ones. So a group rooted at an attention projection is pruned in whole heads:
its units are heads (each the ``head_dim`` channels of one head in every projection), the criteria's
channel scores are averaged per head, and after the surgery the layer's head count is updated.

Two layouts are recognised by duck typing (no import of timm or transformers):

* **fused** (timm ``Attention``, ViT/DeiT/MobileViT-style): a child ``qkv`` :class:`~torch.nn.Linear` whose
  ``3 * num_heads * head_dim`` outputs are laid out ``[q | k | v]``, head-major inside each; ``num_heads``
  (and ``attn_dim`` when present) are updated;
* **fused with a relative position bias table** (timm Swin ``WindowAttention``): the same ``qkv``, no
  ``head_dim`` attribute (the forward reshapes with ``-1``), and a ``relative_position_bias_table``
  parameter with one column per head. Removing a head removes its column of the table too. A module with
  any other parameter of its own (BEiT's separate ``q_bias``/``v_bias``) is not recognised;
* **separate** (Hugging Face encoders): three :class:`~torch.nn.Linear` children named
  ``query``/``key``/``value`` (BERT, RoBERTa, MiniLM, ViT) or ``q_lin``/``k_lin``/``v_lin`` (DistilBERT),
  with the same number of outputs, a multiple of the module's ``attention_head_size`` or ``head_dim``;
  the head count attributes it has (``num_attention_heads``, ``n_heads``, ``num_heads``) and
  ``all_head_size`` are updated. Their forward infers the head count from the width
  (``view(..., -1, head_dim)``).

A module that looks like attention (it has a head count ``num_heads``/``num_attention_heads``/``n_heads``/
``n_head``, or a head size ``head_dim``/``attention_head_size``/``head_size``) but matches neither layout
(fused GPT-2 ``c_attn``, ``q_proj``/``k_proj``/``v_proj`` decoders, ...) is *protected*: groups that
change the output width of its projections are not pruned at all (see :func:`protected_modules`), rather
than risk a broken layer.
Heads are never re-sized: ``head_dim`` stays what the architecture chose (a multiple of 8 in practice,
which is also what keeps attention fast).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn as nn

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size", "head_size")
#: Names of separate query/key/value projections.
SEPARATE_PROJECTIONS = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))


@dataclass(frozen=True)
class HeadLayout:
    """How the output channels of one attention layer's projections split into heads.

    Attributes:
        module: name of the attention module (whose head count is updated after pruning).
        projections: names of the projections whose outputs are head-structured (``qkv``, or the three
            separate ones); any of them may be the root of the torch-pruning group.
        segments: 3 for a fused ``[q | k | v]`` projection, 1 for separate projections.
        style: ``"fused"`` or ``"separate"``.
        head_size_attr: the module's attribute holding ``head_dim``.

    """

    module: str
    projections: tuple[str, ...]
    segments: int
    style: str
    head_size_attr: str = "head_dim"
    tables: tuple[str, ...] = ()
    head_dim: int = 0

    def heads(self, model: nn.Module) -> tuple[int, int]:
        """The current ``(num_heads, head_dim)`` of the layer (the count is read from the projection width)."""
        attn = model.get_submodule(self.module)
        d = self.head_dim or int(getattr(attn, self.head_size_attr))
        projection = model.get_submodule(self.projections[0])
        assert isinstance(projection, nn.Linear)
        return projection.out_features // (self.segments * d), d

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

    def table_names(self) -> list[str]:
        """Parameter names of the layer's per-head tables, which torch-pruning must not slice itself."""
        prefix = f"{self.module}." if self.module else ""
        return [prefix + t for t in self.tables]

    def prune_tables(self, model: nn.Module, heads: Sequence[int]) -> None:
        """Remove the columns of ``heads`` from every per-head table (new parameters, recorded for optimizers)."""
        if not self.tables:
            return
        from torch_pruning.pruner import function as tp_function

        n, _ = self.heads(model)
        keep = [h for h in range(n) if h not in {int(i) for i in heads}]
        attn = model.get_submodule(self.module)
        for name in self.tables:
            table = attn._parameters[name]
            assert table is not None
            # through torch-pruning's slicing function, so that the parameter surgery records the change
            attn._parameters[name] = tp_function.LinearPruner()._prune_parameter_and_grad(
                table, keep, table.dim() - 1
            )

    def sync_heads(self, model: nn.Module) -> None:
        """After pruning: set the layer's head-count (and width) attributes from its projections' width."""
        attn = model.get_submodule(self.module)
        left, d = self.heads(model)
        counts = ("num_heads",) if self.style == "fused" else ("num_attention_heads", "n_heads", "num_heads")
        for count in counts:
            if _int_attr(attn, count):
                setattr(attn, count, left)
        for width in ("attn_dim", "all_head_size"):
            if _int_attr(attn, width):
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
    table = module._parameters.get("relative_position_bias_table")
    if (
        qkv is not None
        and heads
        and dim is None
        and table is not None
        and table.dim() == 2
        and table.shape[1] == heads
        and set(module._parameters) == {"relative_position_bias_table"}
        and qkv.out_features % (3 * heads) == 0
    ):
        return HeadLayout(
            module=name,
            projections=(f"{prefix}qkv",),
            segments=3,
            style="fused",
            tables=("relative_position_bias_table",),
            head_dim=qkv.out_features // (3 * heads),
        )
    size_attr = next((a for a in ("attention_head_size", "head_dim") if _int_attr(module, a)), None)
    for triple in SEPARATE_PROJECTIONS:
        q, k, v = (_linear(module, n) for n in triple)
        if q is None or k is None or v is None or size_attr is None:
            continue
        d = _int_attr(module, size_attr) or 0
        if q.out_features == k.out_features == v.out_features and q.out_features % d == 0:
            names = tuple(f"{prefix}{n}" for n in triple)
            return HeadLayout(
                module=name, projections=names, segments=1, style="separate", head_size_attr=size_attr
            )
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
        if not any(_int_attr(module, a) for a in HEAD_COUNT_ATTRS + HEAD_SIZE_ATTRS):
            continue
        prefix = f"{name}." if name else ""
        for child_name, child in module.named_children():
            if isinstance(child, (nn.Linear, nn.modules.conv._ConvNd)) or type(child).__name__ == "Conv1D":
                out[prefix + child_name] = name
    return out
