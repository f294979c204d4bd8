"""Hugging Face Swin (``SwinModel``, ``SwinForImageClassification``), pruned by its known structure.

``SwinConfig`` describes a model with few numbers: stage ``i`` is ``embed_dim * 2**i`` wide, has
``depths[i]`` blocks of ``num_heads[i]`` heads, each of ``embed_dim * 2**i / num_heads[i]`` channels (the
attention's inner width is the stage width), and an MLP ``int(mlp_ratio * width)`` wide, one ratio for every
stage; ``PatchMerging`` between stages concatenates 4 neighbours (``4 * width`` channels: a norm, then a
``Linear`` to the next stage's width). So the slots of a model as it is now are:

* ``<block>:heads`` — the heads of one block's window attention: their ``q/k/v`` rows, ``o_proj`` columns
  and their column of the ``relative_position_bias_table``;
* ``<block>:ffn`` — one block's MLP width (``fc1`` rows, ``fc2`` columns);
* ``<stage>:hidden`` — one stage's residual width: its blocks' norms, every projection's input or output,
  the patch embedding (stage 0, with ``mask_token``/``position_embeddings``) or the previous stage's merging
  ``reduction`` rows, its own merging ``norm`` and ``reduction`` columns (each channel 4 times, once per
  neighbour), or, for the last stage, the final ``layernorm`` and the readers of the pooled features (the
  classifier, a user's head, found by shape).

In uniform mode (the default: what the config can describe) they are tied into two layout groups:

* ``heads`` — the head size stays, so a head cannot go without its channels of the stage width, and the
  widths must keep the ``2**i`` rule: one unit removes ``u`` channels of ``embed_dim``, ``u * 2**i`` of
  stage ``i``'s width and ``u * 2**i / head_dim_i`` heads of every block of stage ``i`` (``u`` is the least
  width for which these are whole heads: one stage-0 head when the head size is the same in every stage).
  When no ``u`` leaves two units (heads that do not scale with the stage widths), or something outside the
  layout reads the width, the group is ``protected`` with the reason; the hidden size is never pruned alone.
* ``ffn`` — one unit removes one MLP channel of every block of stage 0 and ``2**i`` of stage ``i``: the MLP
  stays ``int(mlp_ratio * width)`` for one ratio (written to the config, and checked to reproduce every
  width); a config whose MLP widths do not double from stage to stage keeps them (``protected``).

Swin alternates unshifted and shifted windows by a block's index in its stage (``shift_size = 0`` for even,
``window_size // 2`` for odd indices). Removing any block but the last ones of a stage would shift the windows
of the blocks after it in a model rebuilt from the config, so only trailing blocks of a stage are removable,
and never a stage's last remaining one; ``depths`` follows, as do the blocks' drop-path rates (the config
spreads ``drop_path_rate`` over ``sum(depths)`` blocks).

With ``uniform_widths=False`` every block's heads and MLP and every stage's width are groups of their own;
the config can then no longer describe the model and its ``save_pretrained`` refuses (``guard_save_pretrained``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch.nn as nn

from lightning_hprune.core.cuts import Cut
from lightning_hprune.core.families.base import (
    Family,
    FamilyGroup,
    Slot,
    fix_attributes,
    norm_cuts,
    outermost_hf_model,
    proj_cuts,
)
from lightning_hprune.core.families.pretrained import guard_save_pretrained
from lightning_hprune.core.graph import PruningError

#: What every block must have (relative to the block), besides the stage's ``blocks`` list.
_BLOCK_PARTS = (
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
    "attention.o_proj",
    "attention.relative_position_bias",
    "layernorm_before",
    "layernorm_after",
    "mlp.fc1",
    "mlp.fc2",
)
_TABLE = "relative_position_bias_table"


def _fits(core: nn.Module) -> bool:
    """Whether ``core`` is a ``SwinModel``: patch embeddings, stages of blocks, the final layer norm."""
    try:
        proj = core.get_submodule("embeddings.patch_embeddings.projection")
        stages = core.get_submodule("encoder.layers")
        final = core.get_submodule("layernorm")
    except AttributeError:
        return False
    if not isinstance(proj, nn.Conv2d) or not isinstance(final, nn.LayerNorm):
        return False
    if not isinstance(stages, nn.ModuleList) or len(stages) == 0:
        return False
    for stage in stages:
        blocks = getattr(stage, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            return False
        try:
            for rel in _BLOCK_PARTS:
                blocks[0].get_submodule(rel)
        except AttributeError:
            return False
        bias = blocks[0].get_submodule("attention.relative_position_bias")
        if _TABLE not in bias._parameters or not isinstance(
            getattr(blocks[0].attention, "head_dim", None), int
        ):
            return False
    return True


@dataclass
class _Block:
    """One block as it is now."""

    name: str
    module: Any  # a SwinLayer (typed loosely: its parts are read by attribute)
    heads: int
    head_dim: int
    ffn: int


@dataclass
class _Stage:
    """One stage as it is now."""

    name: str
    module: Any  # a SwinStage
    width: int
    blocks: list[_Block]


def mlp_ratio_for(widths: Sequence[int], ffns: Sequence[int], first: float | None = None) -> float | None:
    """A ratio ``r`` with ``int(r * widths[i]) == ffns[i]`` for every stage (``first`` tried first), or ``None``.

    ``ffns[0] / widths[0]`` may round to just below the ratio (``int`` then gives one channel less): the next
    few floats above it are tried too.
    """
    candidates = [] if first is None else [float(first)]
    r = ffns[0] / widths[0]
    for _ in range(4):
        candidates.append(r)
        r = math.nextafter(r, math.inf)
    for ratio in candidates:
        if all(int(ratio * w) == f for w, f in zip(widths, ffns, strict=True)):
            return ratio
    return None


@dataclass
class SwinFamily(Family):
    """A Hugging Face Swin image model (see the module docstring)."""

    prefix: str  # the Hugging Face model's name inside the pruned model ("" when it is the model)
    base: str  # the SwinModel's name relative to the Hugging Face model ("swin." or "")
    hf: nn.Module
    name: str = "swin"
    #: Groups left out, and why.
    protected: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ detection
    @classmethod
    def detect(cls, model: nn.Module) -> SwinFamily | None:
        """The outermost Hugging Face model of ``model_type == "swin"`` holding a ``SwinModel``, if any."""
        found = outermost_hf_model(model)
        if found is None or found[2] != "swin":
            return None
        name, module, _ = found
        base = "swin." if isinstance(module._modules.get("swin"), nn.Module) else ""
        core = module.get_submodule(base[:-1]) if base else module
        if not _fits(core):
            return None  # a Swin backbone (per-stage norms) or another head: the traced graph handles it
        return cls(prefix=f"{name}." if name else "", base=base, hf=module)

    # ------------------------------------------------------------------ reading the structure
    @property
    def config(self) -> Any:
        """The Hugging Face config."""
        return self.hf.config

    def _core(self) -> Any:
        return self.hf.get_submodule(self.base[:-1]) if self.base else self.hf

    def _core_name(self) -> str:
        return f"{self.prefix}{self.base}"

    def _read(self) -> list[_Stage]:
        out = []
        for i, stage in enumerate(self._core().encoder.layers):
            sname = f"{self._core_name()}encoder.layers.{i}"
            blocks = []
            for j, block in enumerate(stage.blocks):
                attn = block.attention
                hd = int(attn.head_dim)
                blocks.append(
                    _Block(
                        name=f"{sname}.blocks.{j}",
                        module=block,
                        heads=int(attn.q_proj.weight.shape[0]) // hd,
                        head_dim=hd,
                        ffn=int(block.mlp.fc1.weight.shape[0]),
                    )
                )
            width = int(stage.blocks[0].layernorm_before.weight.shape[0])
            out.append(_Stage(name=sname, module=stage, width=width, blocks=blocks))
        return out

    def _structure_problems(self, stages: Sequence[_Stage]) -> list[str]:
        """Why no ``SwinConfig`` can describe the modules (empty: one can)."""
        problems = []
        w0 = stages[0].width
        for i, st in enumerate(stages):
            if st.width != w0 * 2**i:
                problems.append(f"stage {i} is {st.width} wide, not embed_dim * 2**{i} = {w0 * 2**i}")
            if len({b.heads for b in st.blocks}) > 1:
                problems.append(f"the blocks of stage {i} have {[b.heads for b in st.blocks]} heads")
            problems += [
                f"{b.name} has {b.heads} heads of {b.head_dim} channels in a stage {st.width} wide"
                for b in st.blocks
                if b.heads * b.head_dim != st.width
            ]
            if len({b.ffn for b in st.blocks}) > 1:
                problems.append(f"the MLPs of stage {i} are {[b.ffn for b in st.blocks]} wide")
        ffns = [st.blocks[0].ffn for st in stages]
        if mlp_ratio_for([st.width for st in stages], ffns) is None:
            problems.append(
                f"no mlp_ratio gives MLP widths {ffns} for stage widths {[st.width for st in stages]}"
            )
        return problems

    def uniform(self, model: nn.Module) -> bool:
        """Whether one ``SwinConfig`` can describe the modules (stage widths, heads, head sizes, MLP widths)."""
        return not self._structure_problems(self._read())

    def mismatches(self, model: nn.Module) -> list[str]:
        """What the config says that the modules contradict."""
        stages = self._read()
        problems = self._structure_problems(stages)
        config = self.config
        expect: dict[str, Any] = {
            "embed_dim": stages[0].width,
            "depths": [len(st.blocks) for st in stages],
            "num_heads": [st.blocks[0].heads for st in stages],
            "hidden_size": stages[-1].width,
        }
        for key, value in expect.items():
            got = getattr(config, key, None)
            if (list(got) if isinstance(got, (list, tuple)) else got) != value:
                problems.append(f"config.{key}={got!r} but the modules have {value!r}")
        ratio = getattr(config, "mlp_ratio", None)
        for st in stages:
            built = int(ratio * st.width) if isinstance(ratio, (int, float)) else None
            if built != st.blocks[0].ffn:
                problems.append(
                    f"config.mlp_ratio={ratio!r} builds MLPs {built} wide in {st.name}, but they are {st.blocks[0].ffn}"
                )
        return problems

    def layers(self, model: nn.Module) -> list[str]:
        """Names of every block, stage by stage."""
        return [b.name for st in self._read() for b in st.blocks]

    def removable_layers(self, model: nn.Module) -> list[str]:
        """The last block of every stage that has more than one (removing it keeps the shifted-window pattern)."""
        return [st.blocks[-1].name for st in self._read() if len(st.blocks) > 1]

    # ------------------------------------------------------------------ slots
    @staticmethod
    def _head_slot(b: _Block) -> Slot:
        attn, hd = b.module.attention, b.head_dim
        units = [[h * hd + t for t in range(hd)] for h in range(b.heads)]
        cuts: list[Cut] = []
        for rel in ("q_proj", "k_proj", "v_proj"):
            cuts += proj_cuts(f"{b.name}.attention.{rel}", attn.get_submodule(rel), "out", units)
        cuts += proj_cuts(f"{b.name}.attention.o_proj", attn.o_proj, "in", units)
        table = attn.relative_position_bias
        cuts.append(  # one column per head
            Cut(
                table,
                f"{b.name}.attention.relative_position_bias",
                _TABLE,
                1,
                "embed",
                tuple((h,) for h in range(b.heads)),
            )
        )
        return Slot(f"{b.name}:heads", b.heads, tuple(cuts), core=((f"{b.name}.attention", 1.0 / b.heads),))

    @staticmethod
    def _ffn_slot(b: _Block) -> Slot:
        units = [[c] for c in range(b.ffn)]
        mlp = b.module.mlp
        cuts = proj_cuts(f"{b.name}.mlp.fc1", mlp.fc1, "out", units)
        cuts += proj_cuts(f"{b.name}.mlp.fc2", mlp.fc2, "in", units)
        return Slot(f"{b.name}:ffn", b.ffn, tuple(cuts))

    def _hidden_slot(self, index: int, stages: Sequence[_Stage], model: nn.Module) -> tuple[Slot | None, str]:
        """One stage's residual width, or ``None`` and why it cannot be cut."""
        st, core, cp = stages[index], self._core(), self._core_name()
        w = st.width
        units = [[c] for c in range(w)]
        cuts: list[Cut] = []
        if index == 0:
            emb = core.embeddings
            cuts += proj_cuts(
                f"{cp}embeddings.patch_embeddings.projection", emb.patch_embeddings.projection, "out", units
            )
            cuts += norm_cuts(f"{cp}embeddings.norm", emb.norm, units)
            for pname in ("mask_token", "position_embeddings"):
                raw = emb._parameters.get(pname)
                if raw is not None:
                    cuts.append(
                        Cut(emb, f"{cp}embeddings", pname, raw.dim() - 1, "embed", tuple(map(tuple, units)))
                    )
        else:
            prev = stages[index - 1]
            cuts += proj_cuts(
                f"{prev.name}.downsample.reduction", prev.module.downsample.reduction, "out", units
            )
        for b in st.blocks:
            for rel in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "mlp.fc1"):
                cuts += proj_cuts(f"{b.name}.{rel}", b.module.get_submodule(rel), "in", units)
            for rel in ("attention.o_proj", "mlp.fc2"):
                cuts += proj_cuts(f"{b.name}.{rel}", b.module.get_submodule(rel), "out", units)
            for rel in ("layernorm_before", "layernorm_after"):
                cuts += norm_cuts(f"{b.name}.{rel}", b.module.get_submodule(rel), units)
        merge = getattr(st.module, "downsample", None)
        if merge is not None:  # channel c is at c, w + c, 2w + c, 3w + c of the 4 concatenated neighbours
            four = [[j * w + c for j in range(4)] for c in range(w)]
            cuts += norm_cuts(f"{st.name}.downsample.norm", merge.norm, four)
            cuts += proj_cuts(f"{st.name}.downsample.reduction", merge.reduction, "in", four)
            return Slot(f"{st.name}:hidden", w, tuple(cuts)), ""
        # the last stage: the final norm, and whatever reads the pooled features outside the SwinModel
        cuts += norm_cuts(f"{cp}layernorm", core.layernorm, units)
        inside = {id(m) for m in core.modules()}
        root, root_prefix = (
            (model, "") if any(m is self.hf for m in model.modules()) else (self.hf, self.prefix)
        )
        unknown = []
        for name, module in root.named_modules():
            if id(module) in inside or not module._parameters:
                continue
            wt = module._parameters.get("weight")
            linear = isinstance(module, nn.Linear) and wt is not None and module.in_features == w
            conv = isinstance(module, nn.Conv2d) and module.groups == 1 and module.in_channels == w
            if linear or conv:  # the classifier, a user's head, the masked-image decoder's convolution
                cuts += proj_cuts(f"{root_prefix}{name}", module, "in", units)
            elif isinstance(module, nn.LayerNorm) and wt is not None and tuple(wt.shape) == (w,):
                cuts += norm_cuts(f"{root_prefix}{name}", module, units)
            elif not isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
                unknown += [
                    f"{root_prefix}{name}.{pn}"
                    for pn, p in module._parameters.items()
                    if p is not None and w in p.shape
                ]
        if unknown:
            return (
                None,
                f"{unknown[:3]} use the last stage's width ({w}) but the swin layout does not name them",
            )
        return Slot(f"{st.name}:hidden", w, tuple(cuts)), ""

    def slots(self, model: nn.Module) -> dict[str, Slot]:
        """Every slot, by name."""
        stages = self._read()
        out: dict[str, Slot] = {}
        for i, st in enumerate(stages):
            for b in st.blocks:
                out[f"{b.name}:heads"] = self._head_slot(b)
                out[f"{b.name}:ffn"] = self._ffn_slot(b)
            hidden, _ = self._hidden_slot(i, stages, model)
            if hidden is not None:
                out[hidden.name] = hidden
        return out

    # ------------------------------------------------------------------ groups
    @staticmethod
    def head_unit(stages: Sequence[_Stage]) -> tuple[int, str]:
        """Channels of ``embed_dim`` one tied head unit removes (whole heads in every stage), or 0 and why not."""
        unit = 1
        for i, st in enumerate(stages):
            hd = st.blocks[0].head_dim
            unit = math.lcm(unit, hd // math.gcd(hd, 2**i))
        w0 = stages[0].width
        if w0 % unit or w0 // unit < 2:
            sizes = [st.blocks[0].head_dim for st in stages]
            return 0, (
                f"the head size is stage width / num_heads (head sizes {sizes} for widths "
                f"{[st.width for st in stages]}), and the least cut of embed_dim={w0} that removes whole heads in "
                f"every stage ({unit} channels) leaves no width to keep"
            )
        return unit, ""

    def groups(self, model: nn.Module, uniform: bool, ignored: Sequence[nn.Module] = ()) -> list[FamilyGroup]:
        """The layout groups (see the module docstring); groups whose output layers are ignored are left out."""
        stages = self._read()
        if uniform and not self.uniform(model):
            raise PruningError(
                f"The {self.name} model has widths no SwinConfig describes ({self._structure_problems(stages)[:2]}), "
                "which uniform pruning cannot tie: prune it with `uniform_widths=False`."
            )
        self.protected.clear()
        if not self.removable_layers(model):
            self.protected["layers"] = "every stage has one block left (a stage keeps at least one)"
        hidden = [self._hidden_slot(i, stages, model) for i in range(len(stages))]
        specs: list[tuple[str, str, list[Slot], tuple[int, ...] | None]] = []
        if uniform:
            widths = [st.width for st in stages]
            ffns = [st.blocks[0].ffn for st in stages]
            unit, why = self.head_unit(stages)
            refused = next((reason for slot, reason in hidden if slot is None), "")
            if refused:
                self.protected["heads"] = f"each head takes channels of its stage's width, and {refused}"
            elif why:
                self.protected["heads"] = why
            else:
                tied: list[Slot] = []
                for i, st in enumerate(stages):
                    slot = hidden[i][0]
                    assert slot is not None
                    tied.append(replace(slot, per_unit=unit * 2**i))
                    per = unit * 2**i // st.blocks[0].head_dim
                    tied += [replace(self._head_slot(b), per_unit=per) for b in st.blocks]
                count = stages[0].width // unit
                keep = tuple(
                    k
                    for k in range(1, count + 1)
                    if mlp_ratio_for([k * unit * 2**i for i in range(len(stages))], ffns) is not None
                )
                specs.append(("heads", "heads", tied, keep))
            if any(f != ffns[0] * 2**i for i, f in enumerate(ffns)):
                self.protected["ffn"] = (
                    f"the MLP widths {ffns} do not double from stage to stage (int(mlp_ratio * width) rounds), so "
                    "no cut keeps one mlp_ratio for every stage"
                )
            else:
                tied = [
                    replace(self._ffn_slot(b), per_unit=2**i)
                    for i, st in enumerate(stages)
                    for b in st.blocks
                ]
                keep = tuple(
                    m
                    for m in range(1, ffns[0] + 1)
                    if mlp_ratio_for(widths, [m * 2**i for i in range(len(stages))])
                )
                specs.append(("ffn", "channels", tied, keep))
        else:
            for i, st in enumerate(stages):
                specs += [(f"{b.name}:heads", "heads", [self._head_slot(b)], None) for b in st.blocks]
                specs += [(f"{b.name}:ffn", "channels", [self._ffn_slot(b)], None) for b in st.blocks]
                slot, reason = hidden[i]
                if slot is None:
                    self.protected[f"{st.name}:hidden"] = reason
                else:
                    specs.append((slot.name, "channels", [slot], None))
        ignored_ids = {id(m) for m in ignored}
        out = []
        for name, kind, slots, allowed in specs:
            touched = {id(c.module) for s in slots for c in s.cuts if c.role in ("out", "norm", "embed")}
            if touched & ignored_ids:
                self.protected[name] = "an ignored layer's output width would change"
                continue
            out.append(
                FamilyGroup(
                    name=name,
                    size=min(s.size // s.per_unit for s in slots),
                    modules=tuple(dict.fromkeys(c.name for s in slots for c in s.cuts)),
                    group=None,
                    units=() if kind == "heads" else None,
                    outputs=tuple(s.name for s in slots),
                    slots=tuple(slots),
                    allowed=allowed,
                )
            )
        return out

    # ------------------------------------------------------------------ changing the structure
    def remove_layers(self, model: nn.Module, names: Sequence[str]) -> None:
        """Remove trailing blocks of stages, then update ``depths`` and the drop-path rates."""
        stages = self._read()
        by_stage: dict[int, list[int]] = {}
        where = {b.name: (i, j) for i, st in enumerate(stages) for j, b in enumerate(st.blocks)}
        bad = [n for n in names if n not in where]
        if bad:
            raise PruningError(
                f"Only whole blocks ({list(where)[:2]}, ...) can be removed from a {self.name} model, but got {bad}."
            )
        for n in dict.fromkeys(names):
            i, j = where[n]
            by_stage.setdefault(i, []).append(j)
        for i, idxs in by_stage.items():
            depth = len(stages[i].blocks)
            if len(idxs) >= depth:
                raise PruningError(
                    f"Cannot remove all {depth} blocks of {stages[i].name}: a stage keeps at least one."
                )
            if sorted(idxs) != list(range(depth - len(idxs), depth)):
                raise PruningError(
                    f"Cannot remove blocks {sorted(idxs)} of {stages[i].name} ({depth} blocks): Swin alternates "
                    "unshifted and shifted windows by a block's index in its stage, so only its last blocks can go "
                    "(a model rebuilt from the config would shift the windows of the blocks after a removed one)."
                )
        for i, idxs in by_stage.items():
            blocks = stages[i].module.blocks
            for j in sorted(idxs, reverse=True):
                del blocks[j]
        self.sync(model)

    def _drop_paths(self, stages: Sequence[_Stage]) -> None:
        """Give every block the drop-path rate a model built from the config gives it."""
        blocks = [b.module for st in stages for b in st.blocks]
        rate = float(getattr(self.config, "drop_path_rate", 0.0) or 0.0)
        make = getattr(sys.modules.get(type(blocks[0]).__module__), "SwinDropPath", None)
        for g, block in enumerate(blocks):
            p = rate * g / max(len(blocks) - 1, 1)
            current = getattr(block, "drop_path", None)
            if hasattr(current, "drop_prob") and p > 0.0:
                current.drop_prob = p  # type: ignore[union-attr]
            elif p > 0.0 and make is not None:
                block.drop_path = make(p)
            elif p == 0.0 and not isinstance(current, nn.Identity):
                block.drop_path = nn.Identity()

    def sync(self, model: nn.Module) -> None:
        """Set the config and the modules' size attributes from the parameters' shapes."""
        for module in model.modules():
            fix_attributes(module)
        stages = self._read()
        for st in stages:
            for b in st.blocks:
                b.module.attention.num_attention_heads = b.heads
        core, config = self._core(), self.config
        if isinstance(core.__dict__.get("num_features"), int):
            core.num_features = stages[-1].width
        config.embed_dim = stages[0].width
        config.depths = [len(st.blocks) for st in stages]
        if all(len({b.heads for b in st.blocks}) == 1 for st in stages):
            config.num_heads = [st.blocks[0].heads for st in stages]
        config.hidden_size = stages[-1].width
        if all(len({b.ffn for b in st.blocks}) == 1 for st in stages):
            ratio = mlp_ratio_for(
                [st.width for st in stages], [st.blocks[0].ffn for st in stages], first=config.mlp_ratio
            )
            if ratio is not None:
                config.mlp_ratio = ratio
        self._drop_paths(stages)
        if self.mismatches(model):  # no SwinConfig describes the modules any more
            guard_save_pretrained(self.hf)

    def describe(self) -> str:
        """One line for logs."""
        stages = self._read()
        return f"{self.name}: " + ", ".join(
            f"stage {i}: {len(st.blocks)} blocks, {st.width} wide, {st.blocks[0].heads} heads of "
            f"{st.blocks[0].head_dim}, MLP {st.blocks[0].ffn}"
            for i, st in enumerate(stages)
        )
