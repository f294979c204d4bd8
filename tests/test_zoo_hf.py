"""A zoo of Hugging Face transformers (tiny configs, random weights), each pruned inside a real Lightning fit.

Every model is wrapped in a small LightningModule that calls it with keyword arguments, fitted for two short
epochs on random data with ``HierarchicalPruning(target=..., cost=..., start_epoch=0, end_epoch=1)`` and
otherwise the default settings (the default hierarchy, ``uniform_widths=True``). It must prune to its target,
remove the units ``docs/support.md`` says it does (layers, heads with ``num_attention_heads %
num_key_value_heads == 0``, FFN, hidden size) and protect the ones it says are protected, keep ``config``
true to the modules, keep its output shape, train a finite step afterwards, reload with
:func:`lightning_hprune.load_pruned` from the fit's checkpoint to identical outputs, and (decoders) generate
with a key/value cache. The known layouts are then saved with :func:`lightning_hprune.hf.save_pretrained` and
reloaded, all in one fresh process that never imports lightning_hprune, by plain ``from_pretrained``: same
outputs, same greedy tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_hprune import HierarchicalPruning, load_pruned
from lightning_hprune.core.families import SwinFamily, TransformerFamily, detect
from lightning_hprune.core.families.pretrained import config_mismatches
from lightning_hprune.hf import save_pretrained
from tests.helpers import trainer as quiet_trainer
from tests.zoo import BY_NAME as FAMILY_BY_NAME
from tests.zoo import IMAGE, logits
from tests.zoo import Case as FamilyCase

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
LENGTH = 12  # tokens per sequence
BATCH = 4
SAMPLES = 8  # two batches per epoch


def _swin() -> nn.Module:
    config = transformers.SwinConfig(
        image_size=IMAGE,
        patch_size=4,
        embed_dim=32,
        depths=[2, 2],
        num_heads=[8, 16],  # head size 4: a head step removes an eighth of every stage's width
        window_size=4,
        mlp_ratio=4.0,
        num_labels=3,
    )
    return transformers.SwinForImageClassification(config)


SWIN = FamilyCase("swin", _swin, "AutoModelForImageClassification", kind="pixels")


@dataclass(frozen=True)
class HFCase:
    """One model of the zoo, its pruning target, and what docs/support.md says pruning removes from it."""

    model: FamilyCase
    target: float
    cost: str
    removed: frozenset[str]  # kinds of unit that must go: "layers", "heads", "ffn", "hidden"
    protected: frozenset[str] = field(default_factory=frozenset)  # kinds the layout protects, with a reason
    known: bool = True  # a known layout (families): config kept true, save_pretrained round trip
    #: False: the target is more than the layout lets the default hierarchy remove; every prunable kind ends
    #: at its limit, below the target, and the callback warns
    reached: bool = True

    @property
    def name(self) -> str:
        return self.model.name


ALL = frozenset({"layers", "heads", "ffn", "hidden"})


def _variant(name: str, **config: Any) -> FamilyCase:
    """A model of ``tests/zoo.py`` with some config values changed (more, narrower heads: finer steps)."""
    base = FAMILY_BY_NAME[name]

    def build() -> nn.Module:
        model = base.build()
        cfg = copy.deepcopy(model.config)
        for key, value in config.items():
            setattr(cfg, key, value)
        return type(model)(cfg)

    return dataclasses.replace(base, build=build)


def _case(name: str, target: float, cost: str, config: dict[str, Any] | None = None, **kw: Any) -> HFCase:
    model = _variant(name, **config) if config else FAMILY_BY_NAME[name]
    return HFCase(model, target, cost, kw.pop("removed", ALL), **kw)


CASES = [
    # encoders
    _case("bert", 0.5, "macs", {"num_attention_heads": 8}),
    _case("roberta", 0.5, "params", {"num_attention_heads": 8}),
    _case("distilbert", 0.5, "macs", {"n_heads": 8, "n_layers": 4}),
    _case(
        "albert",
        0.5,
        "params",
        {"num_attention_heads": 8},
        removed=frozenset({"heads", "ffn", "hidden"}),
        protected=frozenset({"layers"}),
    ),
    _case("electra", 0.5, "macs", {"num_attention_heads": 8}),
    _case("vit", 0.5, "params"),
    _case("deit", 0.5, "macs"),
    # Swin: heads go with their channels of every stage's width (head size kept, widths embed_dim * 2**i)
    HFCase(SWIN, 0.5, "params", frozenset({"heads", "ffn", "hidden", "layers"})),
    _case("t5-encoder", 0.5, "params", {"num_heads": 8, "d_kv": 6}),
    # encoder and decoder: layers of both stacks, both FFN widths, and heads of every attention tied with d_model
    _case("bart-cls", 0.4, "macs", {"encoder_attention_heads": 8, "decoder_attention_heads": 8}),
    # with scale_embedding=True (real mBART checkpoints) d_model, hence the heads, are protected: out of reach
    HFCase(
        dataclasses.replace(_variant("bart-cls", scale_embedding=True), name="bart-scaled"),
        0.5,
        "macs",
        frozenset({"layers", "ffn"}),
        frozenset({"heads", "hidden"}),
        reached=False,
    ),
    # decoders
    # Llama: head counts stay divisors of the current one (LlamaConfig's hidden_size % heads == 0), so a step
    # halves the heads, more than this target's share of them: they stay
    _case("llama", 0.5, "params", removed=frozenset({"layers", "ffn", "hidden"})),
    # at a deeper target the halving step fits: Llama query heads go too (8 -> 4, key/value groups kept whole)
    HFCase(dataclasses.replace(FAMILY_BY_NAME["llama"], name="llama-0.75"), 0.75, "params", ALL),
    _case("qwen2", 0.5, "macs"),
    _case("qwen3", 0.5, "params"),
    _case("mistral", 0.5, "macs"),
    _case("phi3", 0.5, "params"),
    _case("gpt2", 0.5, "macs", {"n_head": 8}),
    _case("llama-cls", 0.5, "params", removed=frozenset({"layers", "ffn", "hidden"})),
    _case("qwen2-cls", 0.5, "params"),
    _case("gpt2-cls", 0.5, "params", {"n_head": 8}),
]
BY_NAME = {c.name: c for c in CASES}


def _data(case: FamilyCase, samples: int = SAMPLES, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of random data as a Hugging Face collator gives it: the model inputs and the labels.

    Labels are classes, token classes (T5) or, for language models, the tokens themselves.
    """
    g = torch.Generator().manual_seed(seed + 1000)
    x = case.inputs(batch=samples, length=LENGTH, seed=seed)
    if case.kind != "pixels":
        x["attention_mask"] = torch.ones_like(x["input_ids"])
    if case.causal:
        x["labels"] = x["input_ids"].clone()
    else:
        x["labels"] = torch.randint(
            0, 2, (samples, LENGTH) if case.name.startswith("t5") else (samples,), generator=g
        )
    return x


def _samples(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["labels"]))]


class HFModule(pl.LightningModule):
    """A Hugging Face model in a LightningModule that takes dict batches and calls it with keyword arguments."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.case = BY_NAME[name].model
        torch.manual_seed(0)
        self.net = self.case.build()
        self.example_input_array = self.model_inputs(_data(self.case, samples=1))
        self.losses: list[float] = []

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k != "labels"}

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        out = self.net(**inputs)
        return out.logits if getattr(out, "logits", None) is not None else out[0]

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, y = self(**self.model_inputs(batch)), batch["labels"]
        if self.case.causal:  # next-token prediction
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shape(model: nn.Module) -> dict[str, Any]:
    family = detect(model)
    if isinstance(family, SwinFamily):  # per stage i: widths, heads and MLPs are 2**i times stage 0's
        stages = family._read()
        blocks = [(i, b) for i, st in enumerate(stages) for b in st.blocks]
        return {
            "layers": len(blocks),
            "heads": {b.heads / 2**i for i, b in blocks},
            "kv": {b.heads / 2**i for i, b in blocks},
            "ffn": {b.ffn / 2**i for i, b in blocks},
            "hidden": stages[0].width,
            "head_dim": {b.head_dim for _, b in blocks},
        }
    assert isinstance(family, TransformerFamily), type(model).__name__
    layers = family._read()
    return {
        "layers": len(family.layers(model)),  # every layer stack's (BART: the encoder's and the decoder's)
        "heads": {lay.heads for lay in layers},
        "kv": {lay.kv for lay in layers},
        "ffn": {lay.ffn for lay in layers},
        "hidden": family.hidden_size(),
        "head_dim": {lay.head_dim for lay in layers},
    }


@dataclass
class Fitted:
    """What a fit left: the module, the callback, the trainer's checkpoint, timings."""

    module: HFModule
    callback: HierarchicalPruning
    dense: nn.Module  # the Hugging Face model as built, before the fit
    checkpoint: Path
    outputs: torch.Tensor  # eval-mode outputs right after the fit, on the probe inputs
    probe: dict[str, torch.Tensor]
    seconds: float
    warnings: list[str]


def _fit(case: HFCase, root: Path) -> Fitted:
    pl.seed_everything(0)
    module = HFModule(case.name)
    dense = copy.deepcopy(module.net)
    data = _samples(_data(case.model))
    cb = HierarchicalPruning(
        target=case.target,
        cost=case.cost,
        start_epoch=0,
        end_epoch=1,
        measure_latency=False,
        verbose=False,
    )
    trainer = quiet_trainer(
        root, [cb], max_epochs=2, logger=False, limit_val_batches=0, enable_checkpointing=True
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(data, batch_size=BATCH))
    seconds = time.perf_counter() - start
    assert trainer.state.finished
    [checkpoint] = (root / "checkpoints").glob("*.ckpt")
    probe = module.model_inputs(_data(case.model, samples=2, seed=1))
    module.eval()
    with torch.no_grad():
        outputs = module(**probe)
    return Fitted(module, cb, dense, checkpoint, outputs, probe, seconds, [str(w.message) for w in caught])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Fitted]:
    """Each model's fit, run once per test session and shared by the tests of this file."""
    cache: dict[str, Fitted] = {}

    def get(name: str) -> Fitted:
        if name not in cache:
            cache[name] = _fit(BY_NAME[name], tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.mark.fit
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hf_model_prunes_in_a_fit_keeps_its_config_trains_and_reloads(
    case: HFCase, fitted: Callable[[str], Fitted]
) -> None:
    run = fitted(case.name)
    module, cb, dense = run.module, run.callback, run.dense
    hf = module.net

    # pruned to the target, in the requested cost
    assert _params(hf) < _params(dense)
    achieved = cb.summary["achieved"]
    short = [w for w in run.warnings if "more than 2 points from the target" in w]
    if case.reached:
        assert case.target - 0.002 <= achieved <= case.target + 0.03, (case.name, achieved)
    else:
        assert achieved < case.target - 0.02, (case.name, achieved)
        assert short, run.warnings  # and the callback says so, naming what the structure protects
        assert all("structure keeps these parts from being pruned" in w for w in short), short
        assert not any("Use a smaller `round_to`" in w for w in short), short
    ops = {h["op"] for h in cb.history_steps()}
    assert cb.session.graph is not None
    protected = cb.session.graph.protected_groups

    # the units docs/support.md names went, the protected ones stayed (with a reason)
    if case.known:
        before, now = _shape(dense), _shape(hf)
        gone = set()
        if now["layers"] < before["layers"]:
            gone.add("layers")
        if max(now["heads"]) < max(before["heads"]):
            gone.add("heads")
        if max(now["ffn"]) < max(before["ffn"]):
            gone.add("ffn")
        if now["hidden"] < before["hidden"]:
            gone.add("hidden")
        assert gone == case.removed, (case.name, before, now, ops)
        for kind in case.protected:
            assert kind in protected, (kind, protected)
        for kind in ("heads", "kv", "ffn", "head_dim"):
            assert len(now[kind]) == 1, (kind, now)  # uniform widths: one value per kind for every layer
        assert now["head_dim"] == before["head_dim"]  # heads are never cut through
        if not case.reached:  # every prunable kind at its limit: FFN at the 80 % floor, a layer gone
            assert max(now["ffn"]) <= math.ceil(0.2 * max(before["ffn"])), now
        [heads], [kv] = now["heads"], now["kv"]
        assert heads % kv == 0  # query heads stay grouped by key/value head
        # the config describes the modules: the library's own check, and a model built from the config alone
        assert config_mismatches(hf) == []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rebuilt = type(hf)(copy.deepcopy(hf.config))
        assert {n: p.shape for n, p in rebuilt.state_dict().items()} == {
            n: p.shape for n, p in hf.state_dict().items()
        }
        cfg = hf.config
        family = detect(hf)
        if isinstance(family, SwinFamily):  # stage i: embed_dim * 2**i wide, num_heads[i] heads
            assert cfg.embed_dim == now["hidden"]
            assert list(cfg.num_heads) == [int(heads * 2**i) for i in range(len(cfg.depths))]
            assert sum(cfg.depths) == now["layers"]
        else:
            assert isinstance(family, TransformerFamily)
            assert cfg.num_attention_heads == heads
            assert cfg.hidden_size == now["hidden"]
        if isinstance(family, TransformerFamily) and family.layout.kv_key:
            assert getattr(cfg, family.layout.kv_key) == kv
        stacks = family.stacks() if isinstance(family, TransformerFamily) else []
        for layout in stacks:  # renumbered for key/value caches, per layer list (BART: two)
            stack = family._layer_list(layout)
            indices = [m.layer_idx for m in stack.modules() if isinstance(m.__dict__.get("layer_idx"), int)]
            if indices:
                assert sorted(set(indices)) == list(range(len(stack)))
        if (
            isinstance(family, TransformerFamily) and family.layout.decoder is not None
        ):  # the decoder's config is true too, and it was pruned
            decoder = family._read(family.layout.decoder)
            dense_family = detect(dense)
            assert isinstance(dense_family, TransformerFamily)
            dense_decoder = dense_family._read(dense_family.layout.decoder)  # type: ignore[arg-type]
            assert {lay.heads for lay in decoder} == {lay.cross_heads for lay in decoder}
            assert decoder[0].heads * decoder[0].head_dim == now["hidden"]
            assert getattr(cfg, family.layout.decoder.heads_key) == decoder[0].heads
            assert (
                getattr(cfg, family.layout.decoder.intermediate_key) == decoder[0].ffn < dense_decoder[0].ffn
            )
    # output shape kept; training continues with finite losses and gradients
    with torch.no_grad():
        dense_out = logits(dense.eval(), run.probe)
    assert run.outputs.shape == dense_out.shape
    assert all(math.isfinite(v) for v in module.losses)

    # the fit's checkpoint reloads to identical outputs
    loaded = load_pruned(HFModule, run.checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**run.probe), run.outputs)
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in module.parameters()]

    # decoders generate with a key/value cache, the same tokens as without one
    if case.model.causal:
        ids = run.probe["input_ids"][:1, :4]
        with torch.no_grad():
            cached = hf.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=True)
            uncached = hf.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False)
        assert cached.shape == (1, 8)
        assert cached.tolist() == uncached.tolist()

    # one more training step (on a copy: the fit's model stays as it was for the reload test)
    trained = copy.deepcopy(module).train()
    opt = torch.optim.SGD(trained.parameters(), lr=0.01)
    loss = trained.loss(_data(case.model, samples=2, seed=2))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in trained.parameters() if p.grad is not None)


RELOAD = """
import json, sys, torch, warnings, transformers
warnings.filterwarnings("ignore")
root = sys.argv[1]
out = {}
for name, case in json.load(open(root + "/cases.json")).items():
    model = getattr(transformers, case["auto"]).from_pretrained(root + "/" + name).eval()
    ref = torch.load(root + "/" + name + "/reference.pt")
    with torch.no_grad():
        res = model(**ref["inputs"])
        got = res.logits if getattr(res, "logits", None) is not None else res[0]
        gen = None
        if case["generated"] is not None:
            ids = ref["inputs"]["input_ids"][:1, :4]
            gen = model.generate(ids, max_new_tokens=4, do_sample=False).tolist()
    out[name] = {"diff": float((got - ref["outputs"]).abs().max()), "shape": list(got.shape),
                 "generated": gen, "class": type(model).__name__}
out["hprune imported"] = any(m.split(".")[0] == "lightning_hprune" for m in sys.modules)
print(json.dumps(out))
"""


@pytest.mark.fit
def test_fitted_models_reload_with_plain_from_pretrained_in_one_fresh_process(
    fitted: Callable[[str], Fitted], tmp_path: Path
) -> None:
    """Every known layout of the zoo, pruned in its fit with the default ``uniform_widths=True``, saved with
    ``hf.save_pretrained`` and reloaded by plain transformers in one process that never imports the library."""
    expected = {}
    for case in CASES:
        if not case.known:
            continue
        run = fitted(case.name)
        hf = run.module.net
        directory = tmp_path / case.name
        save_pretrained(run.module, directory)
        torch.save({"inputs": run.probe, "outputs": run.outputs}, directory / "reference.pt")
        generated = None
        if case.model.causal:
            with torch.no_grad():
                ids = run.probe["input_ids"][:1, :4]
                generated = hf.generate(ids, max_new_tokens=4, do_sample=False).tolist()
        expected[case.name] = {"auto": case.model.auto, "generated": generated, "class": type(hf).__name__}
    (tmp_path / "cases.json").write_text(json.dumps(expected))
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results.pop("hprune imported") is False  # plain transformers: the library was never imported
    assert set(results) == set(expected)
    for name, r in results.items():
        assert r["class"] == expected[name]["class"], name
        assert r["shape"] == list(fitted(name).outputs.shape), name
        assert r["diff"] <= 1e-5, (name, r["diff"])
        assert r["generated"] == expected[name]["generated"], name


# ---------------------------------------------------------------------- regressions found here (no Trainer)
@pytest.mark.parametrize("name", ["qwen2", "phi3"])
def test_query_heads_of_every_key_value_group_replay_together(name: str) -> None:
    """The query heads of all key/value groups are cut in one call (a layer's groups must keep equal sizes);
    the history replays them in one call too. One at a time, the second group's slot was read from the
    half-pruned layer (7 heads / 2 groups = 3 per group) and ``load_pruned`` failed with "units [3] outside
    [0, 3)"."""
    from lightning_hprune.core.graph import PruningGraph

    case = FAMILY_BY_NAME[name]
    torch.manual_seed(0)
    model = case.build().eval()
    graph = PruningGraph(model, case.inputs(batch=1))
    assert graph.family is not None
    slots = graph.family.slots(model)
    plan = {n: [slots[n].size - 1] for n in slots if ":heads:" in n}  # the last query head of every group
    assert len(plan) == 2 * len(model.model.layers)
    graph.prune(plan)
    assert {h.get("batch") for h in graph.history} == {len(plan)}
    fresh = case.build().eval()
    PruningGraph(fresh, case.inputs(batch=1)).replay(graph.history)
    assert {n: p.shape for n, p in fresh.named_parameters()} == {
        n: p.shape for n, p in model.named_parameters()
    }
    assert fresh.config.num_attention_heads == model.config.num_attention_heads == 6
    fresh.load_state_dict(model.state_dict())
    x = case.inputs()
    torch.testing.assert_close(logits(fresh, x), logits(model, x))


@pytest.mark.fit
@pytest.mark.parametrize("importance", ["taylor", "group_taylor"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_gradient_criteria_prune_known_layouts_in_a_fit(name: str, importance: str, tmp_path: Path) -> None:
    """The gradient criteria score layout groups (heads, key/value groups, FFN, hidden) from their cuts."""
    pl.seed_everything(0)
    module = HFModule(name)
    before = _params(module.net)
    cb = HierarchicalPruning(
        target=0.4, importance=importance, start_epoch=0, end_epoch=1, measure_latency=False, verbose=False
    )
    data = _samples(_data(BY_NAME[name].model))
    quiet_trainer(tmp_path, [cb], max_epochs=2, logger=False, limit_val_batches=0).fit(
        module, DataLoader(data, batch_size=BATCH)
    )
    assert cb.records
    assert cb.records[-1]["removed"] >= 0.35
    assert _params(module.net) < before
    assert config_mismatches(module.net) == []
    assert all(p.grad is None for p in module.parameters())  # the carriers are gone after the events
    assert all(math.isfinite(v) for v in module.losses)
