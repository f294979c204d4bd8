"""Hugging Face transformers, pruned by their known structure: layers, heads, key/value groups, FFN, hidden size.

One generic :class:`TransformerFamily` reads a declarative :class:`Layout` (where each projection, norm and
embedding lives) and builds the slots of a model as it is now:

* ``<layer>:kv`` — whole key/value groups of a layer (for multi-head attention, where every head has its own
  keys and values, these are the heads): the key and value rows of the group, the query rows and output
  columns of the query heads that share it;
* ``<layer>:heads:<g>`` — the query heads that share key/value group ``g`` (grouped-query attention only);
  removing the same number from every group keeps ``num_attention_heads % num_key_value_heads == 0``;
* ``<layer>:ffn`` — the FFN width: the rows of every up projection (``gate`` and ``up`` coupled, fused
  ``gate_up_proj`` included) and the columns of the down projection;
* ``hidden`` — the residual stream: embeddings, every norm, every projection's input or output, the
  output head (a tied output embedding is cut once and stays tied).

Heads are never cut through and ``head_dim`` (hence the rotary dimensions) never changes. Models that derive
their head size as ``hidden_size / num_attention_heads`` (BERT, GPT-2) can only keep a plain
``from_pretrained``-loadable config if the hidden size shrinks with the head count, so in uniform mode a head
there takes ``head_dim`` hidden channels with it (and the hidden size is not pruned on its own).
Layers are removed from the layer list; ``layer_idx`` (used by key/value caches), ``num_hidden_layers`` and
``layer_types`` follow.

Layouts may also pin layers (T5's layer 0 holds the relative position bias every layer uses: never removed,
and the same heads go from every layer with their bias column), repeat one layer (ALBERT: no layer removal),
name raw parameters that carry the hidden size (ViT's class token and position embeddings), or protect the
hidden size.

An encoder-decoder (BART, mBART) has two layer stacks (``Layout.decoder``), and its decoder layers a
cross-attention (``Layout.cross``, slot ``<layer>.encoder_attn:kv``). Both stacks share the hidden size; each
has its own layer count, FFN width (groups ``ffn`` and ``decoder:ffn``) and head count. Every attention
derives its head size as ``d_model / heads``, so in uniform mode the heads of all attentions and ``d_model``
are one tied group: a unit takes ``lcm(head sizes)`` hidden channels and, from each attention, that many
channels' worth of heads. Every stack keeps at least one layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch.nn as nn

from lightning_hprune.core.cuts import Cut
from lightning_hprune.core.families.base import (
    Family,
    FamilyGroup,
    Slot,
    fix_attributes,
    outermost_hf_model,
    proj_cuts,
)
from lightning_hprune.core.families.pretrained import guard_save_pretrained
from lightning_hprune.core.graph import PruningError


@dataclass(frozen=True)
class Layout:
    """Where a transformer keeps its parts. Paths inside a layer are relative to it; ``{base}`` is the base model.

    Attributes:
        model_types: the ``config.model_type`` values this layout describes.
        layers: the layer list.
        attention: the attention module.
        q, k, v: the query/key/value projections (the same path three times: fused ``[q | k | v]``).
        o: the attention's output projection.
        up: the FFN's input projections (``gate`` and ``up``; the same path twice: fused ``[gate | up]``).
        down: the FFN's output projection.
        norms: the layer's norms over the hidden size.
        head_dim_key: the config key of the head size; ``None`` when the model derives it from
            ``hidden_size / num_attention_heads``.
        kv_key: the config key of the key/value head count (``None``: one per query head).
        intermediate_key: the config key of the FFN width.
        heads_from_config: the attention's forward reads the head count from the config (every layer must
            keep the same count).
        heads_divide_hidden: the config refuses a hidden size that is not a multiple of the head count
            (``LlamaConfig``): in uniform mode head counts stay divisors of the current one and the hidden size a
            multiple of it.
        attention_attrs: sets the attention module's own head attributes: ``f(module, heads, kv_heads, head_dim)``.
        head_size_attrs: the attention module's attributes that hold the head size (the first one set wins).
        layer_count_key: the config key of the layer count (``None``: the layer list is repeated, as ALBERT
            runs one shared layer ``num_hidden_layers`` times; layers are then not removed).
        pinned: a path inside a layer; a layer that has it is never removed (T5's layer 0 holds the relative
            position bias every layer uses).
        head_tables: paths inside a layer of embedding tables with one column per head (T5's
            ``relative_attention_bias``): a head removed takes its column with it.
        shared_heads: the same heads are removed from every layer (T5: layer 0's position bias, one row per
            head, is added to every layer's attention scores); implies ``heads_from_config``.
        hidden_params: names of raw parameters outside the layers whose last dimension is the hidden size
            (ViT's ``cls_token``, ``position_embeddings``, DeiT's ``distillation_token``).
        protect_hidden: why the hidden size is never pruned (``None``: it is).
        heads_key: the config key of the query head count (BART's encoder: ``encoder_attention_heads``).
        cross: ``(attention, q, k, v, o)`` paths of a cross-attention inside each layer (BART's decoder:
            ``encoder_attn``), with as many heads as the self-attention (one config value for both): its
            heads are a slot of their own (``<layer>.<attention>:kv``), tied with the self-attention's.
        decoder: a second layer stack of an encoder-decoder model (BART's decoder), with its own paths and
            config keys; it shares the hidden size, and in uniform mode the heads of both stacks are one
            tied group (see :meth:`TransformerFamily.groups`).
        scale_key: a config flag that scales the embeddings by ``sqrt(hidden size)`` (BART's
            ``scale_embedding``); while it is set the hidden size is protected, since a model rebuilt from a
            smaller hidden size would scale its embeddings differently.

    """

    model_types: tuple[str, ...]
    layers: str
    attention: str
    q: str
    k: str
    v: str
    o: str
    up: tuple[str, ...]
    down: str
    norms: tuple[str, ...]
    head_dim_key: str | None = "head_dim"
    kv_key: str | None = "num_key_value_heads"
    intermediate_key: str = "intermediate_size"
    heads_from_config: bool = False
    heads_divide_hidden: bool = False
    attention_attrs: Callable[[nn.Module, int, int, int], None] | None = None
    head_size_attrs: tuple[str, ...] = ("head_dim",)
    layer_count_key: str | None = "num_hidden_layers"
    pinned: str | None = None
    head_tables: tuple[str, ...] = ()
    shared_heads: bool = False
    hidden_params: tuple[str, ...] = ()
    protect_hidden: str | None = None
    heads_key: str = "num_attention_heads"
    cross: tuple[str, str, str, str, str] | None = None
    decoder: Layout | None = None
    scale_key: str | None = None

    def parts(self) -> tuple[str, ...]:
        """Every path inside a layer that the layout names."""
        return (
            self.attention,
            self.q,
            self.k,
            self.v,
            self.o,
            *self.up,
            self.down,
            *self.norms,
            *(self.cross or ()),
        )

    def fused_qkv(self) -> bool:
        """Whether q, k and v come from one projection."""
        return self.q == self.k == self.v

    def fused_up(self) -> bool:
        """Whether the FFN's input projections are one fused projection."""
        return len(self.up) > 1 and len(set(self.up)) == 1


def _llama_attrs(attn: nn.Module, heads: int, kv: int, head_dim: int) -> None:
    attn.num_key_value_groups = heads // kv  # type: ignore[assignment]
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = kv  # type: ignore[assignment]
    if hasattr(attn, "num_heads"):
        attn.num_heads = heads  # type: ignore[assignment]


def _gpt2_attrs(attn: nn.Module, heads: int, kv: int, head_dim: int) -> None:
    attn.num_heads = heads  # type: ignore[assignment]
    attn.split_size = heads * head_dim  # type: ignore[assignment]


def _bert_attrs(attn: nn.Module, heads: int, kv: int, head_dim: int) -> None:
    attn.num_attention_heads = heads  # type: ignore[assignment]
    attn.all_head_size = heads * head_dim  # type: ignore[assignment]


LLAMA = Layout(
    model_types=("llama",),
    layers="{base}layers",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    up=("mlp.gate_proj", "mlp.up_proj"),
    down="mlp.down_proj",
    norms=("input_layernorm", "post_attention_layernorm"),
    heads_divide_hidden=True,
    attention_attrs=_llama_attrs,
)
MISTRAL_QWEN = Layout(
    model_types=("mistral", "qwen2", "qwen3"),
    layers="{base}layers",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    up=("mlp.gate_proj", "mlp.up_proj"),
    down="mlp.down_proj",
    norms=("input_layernorm", "post_attention_layernorm"),
    attention_attrs=_llama_attrs,
)
PHI3 = Layout(
    model_types=("phi3",),
    layers="{base}layers",
    attention="self_attn",
    q="self_attn.qkv_proj",
    k="self_attn.qkv_proj",
    v="self_attn.qkv_proj",
    o="self_attn.o_proj",
    up=("mlp.gate_up_proj", "mlp.gate_up_proj"),
    down="mlp.down_proj",
    norms=("input_layernorm", "post_attention_layernorm"),
    heads_from_config=True,
    attention_attrs=_llama_attrs,
)
GPT2 = Layout(
    model_types=("gpt2",),
    layers="{base}h",
    attention="attn",
    q="attn.c_attn",
    k="attn.c_attn",
    v="attn.c_attn",
    o="attn.c_proj",
    up=("mlp.c_fc",),
    down="mlp.c_proj",
    norms=("ln_1", "ln_2"),
    head_dim_key=None,
    kv_key=None,
    intermediate_key="n_inner",
    attention_attrs=_gpt2_attrs,
)
BERT = Layout(
    model_types=("bert", "roberta", "electra", "xlm-roberta", "camembert"),
    layers="{base}encoder.layer",
    attention="attention.self",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    up=("intermediate.dense",),
    down="output.dense",
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    head_dim_key=None,
    kv_key=None,
    attention_attrs=_bert_attrs,
    head_size_attrs=("attention_head_size",),
)


def _distilbert_attrs(attn: nn.Module, heads: int, kv: int, head_dim: int) -> None:
    attn.n_heads = heads  # type: ignore[assignment]
    attn.dim = heads * head_dim  # type: ignore[assignment]


def _heads_attr(attr: str) -> Callable[[nn.Module, int, int, int], None]:
    def set_heads(attn: nn.Module, heads: int, kv: int, head_dim: int) -> None:
        setattr(attn, attr, heads)

    return set_heads


def _t5_attrs(attn: nn.Module, heads: int, kv: int, head_dim: int) -> None:
    attn.n_heads = heads  # type: ignore[assignment]
    attn.inner_dim = heads * head_dim  # type: ignore[assignment]


DISTILBERT = Layout(
    model_types=("distilbert",),
    layers="{base}transformer.layer",
    attention="attention",
    q="attention.q_lin",
    k="attention.k_lin",
    v="attention.v_lin",
    o="attention.out_lin",
    up=("ffn.lin1",),
    down="ffn.lin2",
    norms=("sa_layer_norm", "output_layer_norm"),
    head_dim_key=None,
    kv_key=None,
    intermediate_key="hidden_dim",
    attention_attrs=_distilbert_attrs,
    head_size_attrs=("attention_head_size",),
)
ALBERT = Layout(
    model_types=("albert",),
    layers="{base}encoder.albert_layer_groups.0.albert_layers",
    attention="attention",
    q="attention.query",
    k="attention.key",
    v="attention.value",
    o="attention.dense",
    up=("ffn",),
    down="ffn_output",
    norms=("attention.LayerNorm", "full_layer_layer_norm"),
    head_dim_key=None,
    kv_key=None,
    attention_attrs=_bert_attrs,
    head_size_attrs=("attention_head_size",),
    layer_count_key=None,
)
VIT = Layout(
    model_types=("vit", "deit"),
    layers="{base}layers",
    attention="attention",
    q="attention.q_proj",
    k="attention.k_proj",
    v="attention.v_proj",
    o="attention.o_proj",
    up=("mlp.fc1",),
    down="mlp.fc2",
    norms=("layernorm_before", "layernorm_after"),
    kv_key=None,
    attention_attrs=_heads_attr("num_attention_heads"),
    hidden_params=("cls_token", "distillation_token", "mask_token", "position_embeddings"),
)
T5_GATED = Layout(
    model_types=("t5", "mt5", "umt5"),
    layers="{base}encoder.block",
    attention="layer.0.SelfAttention",
    q="layer.0.SelfAttention.q",
    k="layer.0.SelfAttention.k",
    v="layer.0.SelfAttention.v",
    o="layer.0.SelfAttention.o",
    up=("layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1"),
    down="layer.1.DenseReluDense.wo",
    norms=("layer.0.layer_norm", "layer.1.layer_norm"),
    head_dim_key="d_kv",
    kv_key=None,
    intermediate_key="d_ff",
    heads_from_config=True,
    attention_attrs=_t5_attrs,
    head_size_attrs=("key_value_proj_dim",),
    pinned="layer.0.SelfAttention.relative_attention_bias",
    head_tables=("layer.0.SelfAttention.relative_attention_bias",),
    shared_heads=True,
)
T5 = replace(T5_GATED, up=("layer.1.DenseReluDense.wi",))
#: BART's decoder: self-attention, cross-attention (``encoder_attn``, the same head count) and FFN per layer.
BART_DECODER = Layout(
    model_types=("bart", "mbart"),
    layers="{base}decoder.layers",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.out_proj",
    up=("fc1",),
    down="fc2",
    norms=("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"),
    head_dim_key=None,
    kv_key=None,
    intermediate_key="decoder_ffn_dim",
    attention_attrs=_heads_attr("num_heads"),
    layer_count_key="decoder_layers",
    heads_key="decoder_attention_heads",
    cross=(
        "encoder_attn",
        "encoder_attn.q_proj",
        "encoder_attn.k_proj",
        "encoder_attn.v_proj",
        "encoder_attn.out_proj",
    ),
)
#: BART and mBART (``BartModel``, ``...ForSequenceClassification``, ``...ForConditionalGeneration``): the
#: encoder, with the decoder as a second stack. Every attention derives its head size as d_model / heads.
BART = Layout(
    model_types=("bart", "mbart"),
    layers="{base}encoder.layers",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.out_proj",
    up=("fc1",),
    down="fc2",
    norms=("self_attn_layer_norm", "final_layer_norm"),
    head_dim_key=None,
    kv_key=None,
    intermediate_key="encoder_ffn_dim",
    attention_attrs=_heads_attr("num_heads"),
    layer_count_key="encoder_layers",
    heads_key="encoder_attention_heads",
    decoder=BART_DECODER,
    scale_key="scale_embedding",
)
LAYOUTS: tuple[Layout, ...] = (
    LLAMA,
    MISTRAL_QWEN,
    PHI3,
    GPT2,
    BERT,
    DISTILBERT,
    ALBERT,
    VIT,
    T5_GATED,
    T5,
    BART,
)


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _fits(module: nn.Module, layout: Layout, base: str) -> bool:
    """Whether ``module`` has the layer list of ``layout`` and its first layer every part the layout names."""
    layers = _get(module, layout.layers.format(base=base))
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    if not all(_get(layers[0], rel) is not None for rel in layout.parts()):
        return False
    return layout.decoder is None or _fits(module, layout.decoder, base)


@dataclass
class _Layer:
    """One layer as it is now."""

    name: str
    module: nn.Module
    heads: int
    kv: int
    head_dim: int
    ffn: int
    layout: Layout  # the stack's layout (the first one, or its decoder)
    cross_heads: int = 0  # heads of the cross-attention (``Layout.cross``), 0 without one


@dataclass
class TransformerFamily(Family):
    """A Hugging Face transformer described by a :class:`Layout` (see the module docstring)."""

    layout: Layout
    prefix: str  # the Hugging Face model's name inside the pruned model ("" when it is the model)
    base: str  # the base model's name relative to the Hugging Face model ("model.", "bert.", "" ...)
    hf: nn.Module
    name: str = "transformer"
    #: Groups left out, and why (a module reading the hidden size that the layout does not know, ...).
    protected: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ detection
    @classmethod
    def detect(cls, model: nn.Module) -> TransformerFamily | None:
        """The outermost Hugging Face model with a known ``config.model_type``, if any."""
        found = outermost_hf_model(model)
        if found is None:
            return None
        name, module, model_type = found
        prefix = getattr(module, "base_model_prefix", "")
        base = f"{prefix}." if prefix and prefix in module._modules else ""
        # The first layout of this model type whose layer list and first layer's parts exist (T5 comes with
        # a plain or a gated FFN).
        for layout in (lay for lay in LAYOUTS if model_type in lay.model_types):
            if _fits(module, layout, base):
                return cls(
                    layout=layout, prefix=f"{name}." if name else "", base=base, hf=module, name=model_type
                )
        return None

    # ------------------------------------------------------------------ reading the structure
    @property
    def config(self) -> Any:
        """The Hugging Face config."""
        return self.hf.config

    def _abs(self, rel: str) -> str:
        return f"{self.prefix}{rel}"

    def stacks(self) -> tuple[Layout, ...]:
        """The layouts of the layer stacks: the layout itself, then its decoder (encoder-decoder models)."""
        return (self.layout,) if self.layout.decoder is None else (self.layout, self.layout.decoder)

    def _layer_list(self, layout: Layout | None = None) -> nn.ModuleList:
        layers = _get(self.hf, (layout or self.layout).layers.format(base=self.base))
        assert isinstance(layers, nn.ModuleList)
        return layers

    def _stack_layers(self, layout: Layout) -> list[str]:
        path = self._abs(layout.layers.format(base=self.base))
        return [f"{path}.{i}" for i in range(len(self._layer_list(layout)))]

    def layers(self, model: nn.Module) -> list[str]:
        """Absolute names of the layers, in order (the encoder's, then the decoder's)."""
        return [name for layout in self.stacks() for name in self._stack_layers(layout)]

    def removable_layers(self, model: nn.Module) -> list[str]:
        """The layers that may be removed: none when the layer list is repeated, never a pinned one."""
        out = []
        for layout in self.stacks():
            if layout.layer_count_key is None:
                continue
            out += [
                name
                for name, layer in zip(self._stack_layers(layout), self._layer_list(layout), strict=True)
                if layout.pinned is None or _get(layer, layout.pinned) is None
            ]
        return out

    def can_remove_layers(self, model: nn.Module, names: Sequence[str]) -> bool:
        """Whether removing ``names`` together leaves every layer stack at least one layer."""
        return all(
            len(set(names) & set(stack)) < len(stack) for stack in map(self._stack_layers, self.stacks())
        )

    @staticmethod
    def _head_dim(layer: nn.Module, layout: Layout, attention: str | None = None) -> int:
        attn = layer.get_submodule(attention or layout.attention)
        for attr in layout.head_size_attrs:
            value = getattr(attn, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        raise PruningError(f"Cannot read the head size of {type(attn).__name__} ({layout.head_size_attrs}).")

    @staticmethod
    def _out_width(module: nn.Module) -> int:
        w = module._parameters["weight"]
        assert w is not None
        return int(w.shape[_dim(module, "out")])

    @staticmethod
    def _in_width(module: nn.Module) -> int:
        w = module._parameters["weight"]
        assert w is not None
        return int(w.shape[_dim(module, "in")])

    def _read(self, layout: Layout | None = None) -> list[_Layer]:
        """The layers of one stack as they are now (default: the first stack, a decoder-only model's layers)."""
        lay = layout or self.layout
        out = []
        base = self._abs(lay.layers.format(base=self.base))
        for i, layer in enumerate(self._layer_list(lay)):
            hd = self._head_dim(layer, lay)
            q_width = self._out_width(layer.get_submodule(lay.q))
            if lay.fused_qkv():
                heads = int(self._in_width(layer.get_submodule(lay.o))) // hd
                kv = heads if lay.kv_key is None else (q_width // hd - heads) // 2
            else:
                heads = q_width // hd
                kv = self._out_width(layer.get_submodule(lay.k)) // hd
            ffn = self._in_width(layer.get_submodule(lay.down))
            cross = 0
            if lay.cross is not None:
                if self._head_dim(layer, lay, lay.cross[0]) != hd:
                    raise PruningError(
                        f"Expected the cross-attention of {base}.{i} to have the self-attention's head size {hd}, "
                        f"but it has {self._head_dim(layer, lay, lay.cross[0])}."
                    )
                cross = self._out_width(layer.get_submodule(lay.cross[1])) // hd
            out.append(
                _Layer(
                    name=f"{base}.{i}",
                    module=layer,
                    heads=heads,
                    kv=kv,
                    head_dim=hd,
                    ffn=ffn,
                    layout=lay,
                    cross_heads=cross,
                )
            )
        return out

    def _all_layers(self) -> list[_Layer]:
        """The layers of every stack, the encoder's first."""
        return [lay for layout in self.stacks() for lay in self._read(layout)]

    def hidden_size(self) -> int:
        """The residual stream's width, read from the first layer's first norm."""
        layer = self._layer_list()[0]
        w = layer.get_submodule(self.layout.norms[0])._parameters["weight"]
        assert w is not None
        return int(w.shape[0])

    def uniform(self, model: nn.Module) -> bool:
        """Whether every layer of each stack has the same head, key/value and FFN widths.

        A cross-attention has the head count of its layer's self-attention (one config value for both).
        """
        for layout in self.stacks():
            layers = self._read(layout)
            if len({(lay.heads, lay.kv, lay.ffn, lay.cross_heads) for lay in layers}) > 1:
                return False
            if layout.cross is not None and any(lay.cross_heads != lay.heads for lay in layers):
                return False
        return True

    # ------------------------------------------------------------------ cuts
    #: Cuts of a projection's output rows or input columns (:func:`~lightning_hprune.core.families.base.proj_cuts`).
    _proj_cuts = staticmethod(proj_cuts)

    def _layer_slots(self, lay: _Layer) -> list[Slot]:
        layout, hd, n_rep = lay.layout, lay.head_dim, lay.heads // lay.kv
        m = lay.module

        def path(rel: str) -> tuple[str, nn.Module]:
            return f"{lay.name}.{rel}", m.get_submodule(rel)

        q_name, q = path(layout.q)
        k_name, k = path(layout.k)
        v_name, v = path(layout.v)
        o_name, o = path(layout.o)
        q_off, k_off, v_off = 0, 0, 0
        if layout.fused_qkv():
            k_off, v_off = lay.heads * hd, (lay.heads + lay.kv) * hd
        attn = f"{lay.name}.{layout.attention}"
        slots = []
        # whole key/value groups (the heads themselves for multi-head attention)
        group_q = [[q_off + g * n_rep * hd + t for t in range(n_rep * hd)] for g in range(lay.kv)]
        group_kv = [[g * hd + t for t in range(hd)] for g in range(lay.kv)]
        cuts = self._proj_cuts(q_name, q, "out", group_q)
        cuts += self._proj_cuts(k_name, k, "out", [[k_off + i for i in u] for u in group_kv])
        cuts += self._proj_cuts(v_name, v, "out", [[v_off + i for i in u] for u in group_kv])
        cuts += self._proj_cuts(o_name, o, "in", [[i - q_off for i in u] for u in group_q])
        for rel in layout.head_tables:  # one column per head (multi-head attention: a group is a head)
            table = _get(m, rel)
            if table is not None and table._parameters.get("weight") is not None:
                cuts.append(
                    Cut(table, f"{lay.name}.{rel}", "weight", 1, "embed", tuple((g,) for g in range(lay.kv)))
                )
        slots.append(Slot(f"{lay.name}:kv", lay.kv, tuple(cuts), core=((attn, 1.0 / lay.kv),)))
        if layout.cross is not None:  # the cross-attention's heads: every head has its own keys and values
            c_attn, *c_proj = layout.cross
            (cq_name, cq), (ck_name, ck), (cv_name, cv), (co_name, co) = (path(rel) for rel in c_proj)
            units = [[h * hd + t for t in range(hd)] for h in range(lay.cross_heads)]
            cuts = self._proj_cuts(cq_name, cq, "out", units)
            cuts += self._proj_cuts(ck_name, ck, "out", units)
            cuts += self._proj_cuts(cv_name, cv, "out", units)
            cuts += self._proj_cuts(co_name, co, "in", units)
            slots.append(
                Slot(
                    f"{lay.name}.{c_attn}:kv",
                    lay.cross_heads,
                    tuple(cuts),
                    core=((f"{lay.name}.{c_attn}", 1.0 / lay.cross_heads),),
                )
            )
        # query heads inside each key/value group
        if n_rep > 1:
            for g in range(lay.kv):
                heads = [[q_off + (g * n_rep + r) * hd + t for t in range(hd)] for r in range(n_rep)]
                cuts = self._proj_cuts(q_name, q, "out", heads)
                cuts += self._proj_cuts(o_name, o, "in", [[i - q_off for i in u] for u in heads])
                slots.append(
                    Slot(f"{lay.name}:heads:{g}", n_rep, tuple(cuts), core=((attn, 1.0 / lay.heads),))
                )
        # FFN width
        up_cuts: list[Cut] = []
        if layout.fused_up():
            name, module = path(layout.up[0])
            for j in range(len(layout.up)):
                up_cuts += self._proj_cuts(name, module, "out", [[j * lay.ffn + c] for c in range(lay.ffn)])
        else:
            for rel in layout.up:
                name, module = path(rel)
                up_cuts += self._proj_cuts(name, module, "out", [[c] for c in range(lay.ffn)])
        d_name, d = path(layout.down)
        up_cuts += self._proj_cuts(d_name, d, "in", [[c] for c in range(lay.ffn)])
        slots.append(Slot(f"{lay.name}:ffn", lay.ffn, tuple(up_cuts)))
        return slots

    def _hidden_slot(self, layers: Sequence[_Layer], model: nn.Module | None = None) -> Slot | None:
        layout, width = self.layout, self.hidden_size()
        if layout.protect_hidden is not None:
            self.protected["hidden"] = layout.protect_hidden
            return None
        if layout.scale_key is not None and getattr(self.config, layout.scale_key, False):
            self.protected["hidden"] = (
                f"config.{layout.scale_key}=True scales the embeddings by sqrt(hidden size): a model rebuilt from "
                "a smaller hidden size would scale them differently"
            )
            return None
        units = tuple((c,) for c in range(width))
        cuts: list[Cut] = []
        covered: set[int] = set()

        def add(name: str, module: nn.Module, role: str) -> None:
            if role in ("out", "in"):
                cuts.extend(self._proj_cuts(name, module, role, units))
            elif role == "embed":
                cuts.append(Cut(module, name, "weight", 1, role, units))
            else:  # norm
                for pname in ("weight", "bias"):
                    if module._parameters.get(pname) is not None:
                        cuts.append(Cut(module, name, pname, 0, role, units))
            covered.update(id(p) for p in module.parameters(recurse=False))

        for lay in layers:
            m, lo = lay.module, lay.layout
            readers = [lo.q] if lo.fused_qkv() else [lo.q, lo.k, lo.v]
            readers += list(dict.fromkeys(lo.up))
            writers = [lo.o, lo.down]
            if lo.cross is not None:  # its queries read the layer's stream, its keys and values the encoder's
                readers += list(lo.cross[1:4])
                writers.append(lo.cross[4])
            for rel in readers:
                add(f"{lay.name}.{rel}", m.get_submodule(rel), "in")
            for rel in writers:
                add(f"{lay.name}.{rel}", m.get_submodule(rel), "out")
            for rel in lo.norms:
                add(f"{lay.name}.{rel}", m.get_submodule(rel), "norm")
        # Outside the layers, in the whole pruned model (a head of the user's around the Hugging Face model
        # included): embeddings, norms, linear layers are found by shape; nothing else may use `width`.
        root = model if model is not None else self.hf
        root_prefix = "" if model is not None else self.prefix
        inside = {id(p) for lay in layers for p in lay.module.parameters()}
        for name, module in root.named_modules():
            own = [p for p in module.parameters(recurse=False) if id(p) not in inside]
            if not own:
                continue
            full = f"{root_prefix}{name}"
            w = module._parameters.get("weight")
            # Raw parameters known by name (ViT's class token ...): the hidden size is their last dimension.
            for pname in layout.hidden_params:
                raw = module._parameters.get(pname)
                if raw is not None and id(raw) not in inside and raw.dim() >= 1 and raw.shape[-1] == width:
                    cuts.append(Cut(module, full, pname, raw.dim() - 1, "embed", units))
                    covered.add(id(raw))
            if isinstance(module, nn.Embedding) and w is not None and w.shape[1] == width:
                add(full, module, "embed")
            elif _is_norm(module) and w is not None and w.dim() == 1 and w.shape[0] == width:
                add(full, module, "norm")
            elif (isinstance(module, nn.Linear) or _conv1d(module) or _plain_conv(module)) and w is not None:
                if w.shape[_dim(module, "in")] == width:
                    add(full, module, "in")
                if w.shape[_dim(module, "out")] == width:
                    add(full, module, "out")
        # Layers of the known kinds were sorted above by the position of `width` in their weights (an embedding
        # of 64 positions is not a reader of a hidden size of 64); any other module using `width` is unknown.
        known = (nn.Linear, nn.Embedding, nn.LayerNorm)
        unknown = [
            f"{n}.{pn}"
            for n, mod in root.named_modules()
            if not isinstance(mod, known) and not _conv1d(mod) and not _is_norm(mod) and not _plain_conv(mod)
            for pn, p in mod.named_parameters(recurse=False)
            if id(p) not in covered and width in p.shape
        ]
        if unknown:
            self.protected["hidden"] = (
                f"{unknown[:3]} use the hidden size but the {self.name} layout does not name them"
            )
            return None
        return Slot("hidden", width, tuple(cuts))

    def slots(self, model: nn.Module) -> dict[str, Slot]:
        """Every slot, by name."""
        layers = self._all_layers()
        out = {s.name: s for lay in layers for s in self._layer_slots(lay)}
        hidden = self._hidden_slot(layers, model)
        if hidden is not None:
            out[hidden.name] = hidden
        return out

    # ------------------------------------------------------------------ groups
    def groups(self, model: nn.Module, uniform: bool, ignored: Sequence[nn.Module] = ()) -> list[FamilyGroup]:
        """The layout groups (see the module docstring); groups whose output layers are ignored are left out.

        With a second layer stack (an encoder-decoder model), the heads of every attention of both stacks are
        one tied group in uniform mode: with a derived head size (BART) every attention's head size is
        d_model / its head count, so d_model can only shrink in multiples of the least common multiple of the
        head sizes, each unit taking that many hidden channels and as many heads of each attention as fit in
        them. Each stack's FFN is a tied group of its own (``ffn``, ``decoder:ffn``).
        """
        layers = self._all_layers()
        if uniform and not self.uniform(model):
            raise PruningError(
                f"The {self.name} model has per-layer widths (heads/FFN differ between layers), which uniform "
                "pruning cannot tie: prune it with `uniform_widths=False`."
            )
        self.protected.clear()
        if self.layout.layer_count_key is None:
            self.protected["layers"] = (
                f"the {self.name} model runs one shared layer config.num_hidden_layers times: whole layers are not "
                "removed (heads and FFN cut from the shared layer apply to every repetition)"
            )
        per_layer = {lay.name: self._layer_slots(lay) for lay in layers}
        hidden = self._hidden_slot(layers, model)
        derived = self.layout.head_dim_key is None
        specs: list[tuple[str, str, list[Slot]]] = []  # (name, kind, slots)
        tie_heads = uniform or self.layout.heads_from_config or self.layout.shared_heads
        head_dims = {lay.head_dim for lay in layers}
        unit = math.lcm(*head_dims)  # hidden channels per unit of the tied heads (derived head sizes)
        if derived and uniform and hidden is None:
            # The config derives the head size from hidden_size / num_attention_heads: heads cannot go alone.
            self.protected["heads"] = (
                "the head size is hidden_size / num_attention_heads, and the hidden size is protected"
            )
        elif derived and uniform and hidden is not None and hidden.size // unit < 2:
            reason = (
                f"the head sizes {sorted(head_dims)} (d_model / each stack's head count) both stay only if d_model "
                f"shrinks in multiples of {unit}, and d_model is {hidden.size}"
            )
            self.protected["heads"] = self.protected["hidden"] = reason
            hidden = None
        if derived and uniform and hidden is None:
            tie_heads = False
            per_layer = {k: [s for s in v if s.name.endswith(":ffn")] for k, v in per_layer.items()}
        if tie_heads:
            head_dim = {s.name: lay.head_dim for lay in layers for s in per_layer[lay.name]}
            kv = [s for slots in per_layer.values() for s in slots if s.name.endswith(":kv")]
            q = [s for slots in per_layer.values() for s in slots if ":heads:" in s.name]
            if derived and uniform and hidden is not None:
                kv = [
                    s if head_dim[s.name] == unit else replace(s, per_unit=unit // head_dim[s.name])
                    for s in kv
                ]
                kv = [*kv, Slot(hidden.name, hidden.size, hidden.cuts, per_unit=unit)]
            specs.append(("kv" if q else "heads", "heads", kv))
            if q:
                specs.append(("heads", "heads", q))
        for lay in layers:
            slots = per_layer[lay.name]
            if not tie_heads and slots[0].name.endswith(":kv"):
                specs.append((f"{lay.name}:kv", "heads", [slots[0]]))
                q = [s for s in slots if ":heads:" in s.name]
                if q:
                    specs.append((f"{lay.name}:heads", "heads", q))
                specs += [(s.name, "heads", [s]) for s in slots[1:] if s.name.endswith(":kv")]  # cross
        for i, layout in enumerate(self.stacks()):
            ffn = [
                s
                for lay in layers
                if lay.layout is layout
                for s in per_layer[lay.name]
                if s.name.endswith(":ffn")
            ]
            if uniform:
                specs.append(("ffn" if i == 0 else "decoder:ffn", "channels", ffn))
            else:
                specs += [(s.name, "channels", [s]) for s in ffn]
        if hidden is not None and not (derived and uniform):
            specs.append(("hidden", "channels", [hidden]))
        allowed: dict[str, tuple[int, ...]] = {}
        step: dict[str, int] = {}
        if uniform and self.layout.heads_divide_hidden and layers:
            first = layers[0]
            n_rep = first.heads // first.kv
            kv_name = "kv" if n_rep > 1 else "heads"
            allowed[kv_name] = tuple(d for d in range(1, first.kv + 1) if first.kv % d == 0)
            if n_rep > 1:
                allowed["heads"] = tuple(d for d in range(1, n_rep + 1) if n_rep % d == 0)
            step["hidden"] = first.heads
        ignored_ids = {id(m) for m in ignored}
        out = []
        for name, kind, slots in specs:
            touched = {id(c.module) for s in slots for c in s.cuts if c.role in ("out", "norm", "embed")}
            if touched & ignored_ids:
                self.protected[name] = "an ignored layer's output width would change"
                continue
            size = min(s.size // s.per_unit for s in slots)
            modules = tuple(dict.fromkeys(c.name for s in slots for c in s.cuts))
            out.append(
                FamilyGroup(
                    name=name,
                    size=size,
                    modules=modules,
                    group=None,
                    units=() if kind == "heads" else None,
                    outputs=tuple(s.name for s in slots),
                    slots=tuple(slots),
                    allowed=allowed.get(name),
                    step=step.get(name),
                    shared=self.layout.shared_heads and kind == "heads",
                )
            )
        return out

    # ------------------------------------------------------------------ changing the structure
    def remove_layers(self, model: nn.Module, names: Sequence[str]) -> None:
        """Remove layers from their layer list, renumber ``layer_idx`` (per stack) and update the config."""
        all_names = self.layers(model)
        bad = [n for n in names if n not in all_names]
        if bad:
            raise PruningError(
                f"Only whole layers ({all_names[:2]}, ...) can be removed from a {self.name} model, but got {bad}."
            )
        removable = self.removable_layers(model)
        kept = [n for n in names if n not in removable]
        if kept:
            reason = (
                "its layer list is repeated (config.num_hidden_layers times)"
                if self.layout.layer_count_key is None
                else f"they hold {self.layout.pinned}, which every layer uses"
            )
            raise PruningError(f"Cannot remove {kept} from the {self.name} model: {reason}.")
        stacks = self.stacks()
        for layout in stacks:  # every stack keeps a layer (checked for all before any goes)
            stack = self._stack_layers(layout)
            if len(set(names) & set(stack)) >= len(stack):
                where = (
                    f"the {self.name} model"
                    if len(stacks) == 1
                    else self._abs(layout.layers.format(base=self.base))
                )
                raise PruningError(f"Cannot remove all {len(stack)} layers of {where}.")
        for i, layout in enumerate(self.stacks()):
            stack = self._stack_layers(layout)
            gone = sorted((stack.index(n) for n in set(names) if n in stack), reverse=True)
            if not gone:
                continue
            layer_list = self._layer_list(layout)
            for index in gone:
                del layer_list[index]
                types = getattr(self.config, "layer_types", None) if i == 0 else None
                if isinstance(types, list) and len(types) > index:
                    del types[index]
            for j, layer in enumerate(layer_list):
                for sub in layer.modules():
                    if isinstance(sub.__dict__.get("layer_idx"), int):
                        sub.layer_idx = j  # type: ignore[assignment]
        self.sync(model)

    def sync(self, model: nn.Module) -> None:
        """Set the config and every attention module's head attributes from the parameters' shapes."""
        config = self.config
        for layout in self.stacks():
            layers = self._read(layout)
            for lay in layers:
                for rel in layout.parts():
                    fix_attributes(lay.module.get_submodule(rel))
                if layout.attention_attrs is not None:
                    layout.attention_attrs(
                        lay.module.get_submodule(layout.attention), lay.heads, lay.kv, lay.head_dim
                    )
                    if layout.cross is not None:
                        layout.attention_attrs(
                            lay.module.get_submodule(layout.cross[0]),
                            lay.cross_heads,
                            lay.cross_heads,
                            lay.head_dim,
                        )
        for module in model.modules():
            fix_attributes(module)
        config.hidden_size = self.hidden_size()
        for layout in self.stacks():
            layers = self._read(layout)
            if layout.layer_count_key is not None:
                setattr(config, layout.layer_count_key, len(layers))
            if len({lay.heads for lay in layers}) == 1:
                setattr(config, layout.heads_key, layers[0].heads)
            if layout.kv_key is not None and len({lay.kv for lay in layers}) == 1:
                setattr(config, layout.kv_key, layers[0].kv)
            if layout.head_dim_key is not None:
                setattr(config, layout.head_dim_key, layers[0].head_dim)
            if len({lay.ffn for lay in layers}) == 1:
                setattr(config, layout.intermediate_key, layers[0].ffn)
        for module in self.hf.modules():  # GPT-2 and others keep the hidden size as `embed_dim`
            if isinstance(module.__dict__.get("embed_dim"), int):
                module.embed_dim = config.hidden_size  # type: ignore[assignment]
        if not self.uniform(model):  # one config value per width cannot describe the layers any more
            guard_save_pretrained(self.hf)

    def describe(self) -> str:
        """One line for logs."""
        parts = []
        for layout in self.stacks():
            layers = self._read(layout)
            where = "" if layout is self.layout else f"{layout.layers.format(base='')}: "
            parts.append(
                f"{where}{len(layers)} layers, {layers[0].heads} heads ({layers[0].kv} key/value) of "
                f"{layers[0].head_dim}, FFN {layers[0].ffn}"
            )
        return f"{self.name}: " + "; ".join(parts) + f", hidden {self.hidden_size()}"


def _conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _plain_conv(module: nn.Module) -> bool:
    """An ungrouped 2-d convolution (ViT's patch projection): weight ``[out, in, kh, kw]`` like a linear layer."""
    return isinstance(module, nn.Conv2d) and module.groups == 1


def _dim(module: nn.Module, role: str) -> int:
    """The weight dimension of a projection's outputs (``"out"``) or inputs (``"in"``): HF ``Conv1D`` is ``[in, out]``."""
    if _conv1d(module):
        return 1 if role == "out" else 0
    return 0 if role == "out" else 1


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def config_summary(config: Any, keys: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The config values a pruned model's structure depends on (for reports and tests)."""
    names = keys or {
        "num_hidden_layers": "num_hidden_layers",
        "hidden_size": "hidden_size",
        "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": "num_key_value_heads",
        "head_dim": "head_dim",
        "intermediate_size": "intermediate_size",
    }
    return {k: getattr(config, v, None) for k, v in names.items()}
