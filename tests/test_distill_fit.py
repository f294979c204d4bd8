"""Distillation inside real fits: the loss the optimizer sees, the frozen teacher, refusals, resume, rollbacks."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_hprune import ClosedLoop, Distillation, GlobalLevel, HiddenStates, HierarchicalPruning
from lightning_hprune.checkpoint import find_pruning_state
from lightning_hprune.core.distill import DistillationError
from tests.helpers import TinyCNN, loaders, random_images, trainer
from tests.test_resume import EpochSeededSampler

pytestmark = pytest.mark.fit  # every test here runs a Trainer

ALPHA, T = 0.7, 3.0


class Recorder(TinyCNN):
    """TinyCNN whose step keeps what it computed: the inputs, its logits and the loss it returns."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.seen = (x, logits.detach(), loss.detach())
        return loss


def expected_term(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``ALPHA * T**2 * KL(p_teacher || p_student)``, averaged over the batch, written out."""
    p_t = torch.softmax(teacher.float() / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(student.float() / T, -1))).sum(-1)
    return ALPHA * T**2 * kl.mean()


class LossProbe(Callback):
    """Placed before the pruning callback: copies the dense model just before the first event, then checks
    every backward's loss against the user's loss plus the term recomputed with that copy, and that the
    callback's teacher equals the copy (never changes), is frozen and is not part of the model."""

    def __init__(self, accumulate: int = 1, autocast: bool = False) -> None:
        self.accumulate, self.autocast = accumulate, autocast
        self.reference: nn.Module | None = None
        self.checked = 0
        self.terms: list[float] = []
        self.max_error = 0.0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reference is None:
            self.reference = copy.deepcopy(pl_module).eval()  # the pruning event follows (same hook, later)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self.reference is None:
            return
        cb = next(c for c in trainer.callbacks if isinstance(c, HierarchicalPruning))
        teacher = cb.distiller.teacher  # type: ignore[union-attr]
        assert teacher is not None
        assert not teacher.training
        assert all(not p.requires_grad for p in teacher.parameters())
        live = {id(p) for p in pl_module.parameters()} | {
            id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]
        }
        assert not live & {id(p) for p in teacher.parameters()}
        for k, v in self.reference.state_dict().items():
            assert torch.equal(teacher.state_dict()[k], v), f"the teacher changed: {k}"
        x, student, user = pl_module.seen  # type: ignore[attr-defined]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            reference_logits = self.reference(x)
        term = expected_term(student, reference_logits)
        expected = (user.float() + term) / self.accumulate
        self.max_error = max(self.max_error, float((loss.float() - expected).abs()))
        torch.testing.assert_close(loss.float(), expected, rtol=1e-5, atol=1e-6)
        self.terms.append(float(term))
        self.checked += 1


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param({}, id="plain"),
        pytest.param({"accumulate_grad_batches": 2}, id="accumulate-2"),
        pytest.param({"precision": "bf16-mixed", "accumulate_grad_batches": 2}, id="bf16-mixed"),
    ],
)
def test_optimizer_sees_the_user_loss_plus_the_documented_term(tmp_path: Path, setup: dict[str, Any]) -> None:
    pl.seed_everything(0)
    model = Recorder(optimizer="adam", lr=0.01)
    probe = LossProbe(setup.get("accumulate_grad_batches", 1), autocast="precision" in setup)
    pruning = HierarchicalPruning(
        target=0.5,
        end_epoch=1,
        round_to=4,
        measure_latency=False,
        verbose=False,
        distillation=Distillation(alpha=ALPHA, temperature=T),
    )
    t = trainer(tmp_path, [probe, pruning], max_epochs=3, num_sanity_val_steps=0, **setup)
    train, val = loaders(n=128, batch_size=32)
    t.fit(model, train, val)
    assert pruning.event_index == 2
    assert probe.checked == 2 * 4  # every step of epochs 1 and 2 (4 batches each), after the first event
    assert all(term > 0 for term in probe.terms)  # the pruned student differs from the teacher
    # logged: the term and its share of the total loss, aggregated per epoch
    (path,) = tmp_path.glob("logs/version_*/metrics.csv")
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("hprune/distill_loss")]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0 < float(r["hprune/distill_share"]) < 1 for r in rows)
    epoch2 = sum(probe.terms[4:]) / 4
    assert float(rows[1]["hprune/distill_loss"]) == pytest.approx(epoch2, rel=1e-4)
    # the report states the teacher's measured cost
    report = json.loads(next(tmp_path.glob("logs/version_*/hprune_report.json")).read_text())
    cost = report["distillation"]
    assert cost["source"] == "dense"
    assert cost["steps"] == 8
    assert cost["teacher_bytes"] == sum(p.numel() * 4 for p in probe.reference.parameters()) + sum(  # type: ignore[union-attr]
        b.numel() * b.element_size()
        for b in probe.reference.buffers()  # type: ignore[union-attr]
    )
    assert cost["teacher_ms_per_step"] > 0
    assert 0 < cost["extra_share_of_step"] < 1


class TokenLM(pl.LightningModule):
    """A tiny language model called like a Hugging Face one: ``self.lm(input_ids=..., attention_mask=...)``."""

    def __init__(self, vocab: int = 24, width: int = 32) -> None:
        super().__init__()

        class LM(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = nn.Embedding(vocab, 16)
                self.mlp = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 16))
                self.out = nn.Linear(16, vocab)

            def forward(
                self, input_ids: torch.Tensor, attention_mask: torch.Tensor
            ) -> dict[str, torch.Tensor]:
                h = self.embed(input_ids)
                return {"logits": self.out(h + self.mlp(h))}

        self.lm = LM()
        self.example_input_array = {
            "input_ids": torch.zeros(1, 6, dtype=torch.long),
            "attention_mask": torch.ones(1, 6, dtype=torch.long),
        }

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask)["logits"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        out = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out["logits"][:, :-1]
        target = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        self.seen = (batch, out["logits"].detach(), loss.detach())
        return {"loss": loss, "tokens": int(batch["attention_mask"].sum())}

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def token_batches(n: int = 32, length: int = 6, vocab: int = 24) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    rows = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(n)]
    return DataLoader(rows, batch_size=8)


class TokenProbe(Callback):
    def __init__(self) -> None:
        self.reference: nn.Module | None = None
        self.checked = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reference is None:
            self.reference = copy.deepcopy(pl_module.lm).eval()  # type: ignore[attr-defined]

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self.reference is None:
            return
        batch, student, user = pl_module.seen  # type: ignore[attr-defined]
        with torch.no_grad():
            teacher = self.reference(**batch)["logits"]
        p_t = torch.softmax(teacher / T, -1)
        kl = (p_t * (torch.log(p_t) - torch.log_softmax(student / T, -1))).sum(-1)
        m = batch["attention_mask"].float()
        term = ALPHA * T**2 * (kl * m).sum() / m.sum()  # token level, real tokens only
        torch.testing.assert_close(loss, user + term, rtol=1e-5, atol=1e-6)
        self.checked += 1


def test_token_level_term_over_real_tokens_of_a_dict_returning_child(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = TokenLM()
    probe = TokenProbe()
    pruning = HierarchicalPruning(
        target=0.3,
        levels=[GlobalLevel()],
        end_epoch=0,
        round_to=4,
        measure_latency=False,
        verbose=False,
        distillation=Distillation(alpha=ALPHA, temperature=T),
    )
    t = trainer(tmp_path, [probe, pruning], max_epochs=2, logger=False)
    t.fit(model, token_batches())
    assert pruning.distiller is not None
    assert pruning.distiller.target == "lm"  # the child `training_step` calls, found automatically
    assert model.lm.mlp[0].out_features < 32  # pruned
    assert probe.checked == 4


class TupleNet(TinyCNN):
    def forward(self, x: torch.Tensor) -> Any:
        h = self.features(x)
        return h.mean((2, 3)), self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x)[1], y)


def _refused(tmp_path: Path, model: pl.LightningModule, distillation: Distillation, match: str) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruning = HierarchicalPruning(
        target=0.5, round_to=4, measure_latency=False, verbose=False, distillation=distillation
    )
    t = trainer(tmp_path, [pruning], max_epochs=2, logger=False, num_sanity_val_steps=0)
    train, val = loaders(n=64)
    with pytest.raises(DistillationError, match=match):
        t.fit(model, train, val)
    assert t.global_step == 0  # refused before the first optimizer step
    assert pruning.event_index == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "training_step" not in model.__dict__  # unwrapped in teardown


def test_teacher_with_other_output_shape_is_refused_before_training(tmp_path: Path) -> None:
    pl.seed_everything(0)
    _refused(
        tmp_path,
        TinyCNN(),
        Distillation(teacher=TinyCNN(classes=5)),
        r"student `TinyCNN` gave Tensor\[32, 4\] float32 and the teacher \(TinyCNN\) Tensor\[32, 5\] float32",
    )


def test_output_without_logits_is_refused_before_training(tmp_path: Path) -> None:
    pl.seed_everything(0)
    _refused(
        tmp_path,
        TupleNet(),
        Distillation(),
        r"returned a tuple of \(Tensor\[32, 32\] float32, Tensor\[32, 4\] float32\).*logits_key",
    )


def test_manual_optimization_is_refused_in_setup(tmp_path: Path) -> None:
    class Manual(TinyCNN):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            opt.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(loss)
            opt.step()  # type: ignore[union-attr]

    pruning = HierarchicalPruning(verbose=False, distillation=Distillation())
    t = trainer(tmp_path, [pruning], max_epochs=1, logger=False)
    train, val = loaders(n=32)
    with pytest.raises(RuntimeError, match=r"automatic optimization.*manual_backward"):
        t.fit(Manual(), train, val)
    assert t.global_step == 0


def test_closed_loop_rollback_keeps_the_teacher_and_the_hidden_maps(tmp_path: Path) -> None:
    """A rolled-back event restores the model, not the teacher; the hidden-state maps follow the ledger."""
    pl.seed_everything(0)
    pruning = HierarchicalPruning(
        target=0.95,
        levels=[GlobalLevel(max_layer_ratio=0.97)],
        schedule="constant",
        start_epoch=1,
        end_epoch=1,
        round_to=1,
        importance="random",
        monitor="val_acc",
        measure_latency=False,
        verbose=False,
        closed_loop=ClosedLoop(max_drop=0.02, max_retries=2),
        distillation=Distillation(hidden=HiddenStates(["features.4"])),
    )
    seen: list[list[float]] = []

    class TeacherWatch(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            d = pruning.distiller
            if d is not None and d.teacher is not None:
                from lightning_hprune.core.distill import fingerprint

                seen.append(fingerprint(d.teacher))
                width = trainer.lightning_module.features[4].num_features
                idx = d.maps.current(len(pruning.session.ledger.records)).get("features.4")
                assert (idx is None and width == 32) or len(idx) == width

    model = TinyCNN(lr=0.02)
    t = trainer(tmp_path, [pruning, TeacherWatch()], max_epochs=5, logger=False)
    train, val = loaders(n=128, batch_size=32)
    t.fit(model, train, val)
    actions = [d["action"] for d in pruning.decisions]
    assert "roll_back" in actions
    assert len(seen) == 3 * 4  # epochs 2-4 distil (the teacher was taken at the end of epoch 1)
    assert all(fp == seen[0] for fp in seen)


def _resume_fit(root: Path, ckpt_path: str | None = None, seed: int = 0) -> dict[str, Any]:
    pl.seed_everything(seed)  # the resumed run's fresh model has another initialisation
    model = TinyCNN(optimizer="adam", lr=0.01)
    train = random_images(128, seed=0)
    loader = DataLoader(train, batch_size=32, sampler=EpochSeededSampler(len(train)))
    val = DataLoader(random_images(32, seed=1), batch_size=32)
    pruning = HierarchicalPruning(
        target=0.5, end_epoch=2, round_to=4, measure_latency=False, verbose=False, distillation=Distillation()
    )
    checkpoints = ModelCheckpoint(dirpath=str(root / "ckpt"), filename="{epoch}", save_top_k=-1)
    t = trainer(root, [pruning, checkpoints], max_epochs=4, enable_checkpointing=True, num_sanity_val_steps=0)
    t.fit(model, loader, val, ckpt_path=ckpt_path)
    return {"model": model, "pruning": pruning}


def test_resume_restores_the_same_teacher_from_the_checkpoint(tmp_path: Path) -> None:
    full = _resume_fit(tmp_path / "full")
    teacher = full["pruning"].distiller.teacher.state_dict()
    ckpt = tmp_path / "full" / "ckpt" / "epoch=1.ckpt"
    raw = torch.load(ckpt, weights_only=True)  # plain data
    state = find_pruning_state(raw)
    assert state is not None
    stored = state["distillation"]["teacher"]["state_dict"]
    assert set(stored) == set(teacher)
    for k, v in teacher.items():
        assert torch.equal(stored[k], v), k

    # stored once: the checkpoint's tensors are the model's, the optimizer's, the teacher's and a few small ones
    def nbytes(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(nbytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(nbytes(v) for v in obj)
        return 0

    teacher_bytes = nbytes(stored)
    rest = nbytes(raw) - nbytes(raw["state_dict"]) - nbytes(raw["optimizer_states"]) - teacher_bytes
    assert 0 <= rest < 0.05 * teacher_bytes
    resumed = _resume_fit(tmp_path / "resumed", ckpt_path=str(ckpt), seed=1)
    again = resumed["pruning"].distiller.teacher.state_dict()
    for k, v in teacher.items():
        assert torch.equal(again[k], v), k
    # and the resumed run ends where the unbroken one does
    for k, v in full["model"].state_dict().items():
        torch.testing.assert_close(resumed["model"].state_dict()[k], v, msg=k)


def test_teacher_from_a_checkpoint_path_is_used_from_the_first_step(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dense = TinyCNN()
    t = trainer(tmp_path / "dense", [], max_epochs=1, logger=False, enable_checkpointing=True)
    train, val = loaders(n=64)
    t.fit(dense, train, val)
    path = next((tmp_path / "dense").rglob("*.ckpt"))

    def fit(epochs: int, ckpt_path: str | None = None) -> tuple[LossProbe, HierarchicalPruning]:
        probe = LossProbe()
        probe.reference = copy.deepcopy(dense).eval()
        pruning = HierarchicalPruning(
            target=0.5,
            round_to=4,
            measure_latency=False,
            verbose=False,
            distillation=Distillation(alpha=ALPHA, temperature=T, teacher=str(path)),
        )
        saver = ModelCheckpoint(dirpath=str(tmp_path / "student"), save_last=True)
        t = trainer(
            tmp_path, [probe, pruning, saver], max_epochs=epochs, logger=False, enable_checkpointing=True
        )
        t.fit(Recorder(), train, val, ckpt_path=ckpt_path)
        return probe, pruning

    probe, pruning = fit(2)
    assert probe.checked == 2 * 2  # from the very first step
    assert pruning.distiller is not None
    assert pruning.distiller.report()["source"] == "path"
    # a resumed fit distils from the same path again, from its first step (the teacher is not stored)
    state = find_pruning_state(torch.load(tmp_path / "student" / "last.ckpt", weights_only=True))
    assert state is not None
    assert state["distillation"]["teacher"] is None
    probe, pruning = fit(3, ckpt_path=str(tmp_path / "student" / "last.ckpt"))
    assert probe.checked == 2


def test_hidden_state_term_uses_the_teacher_channels_the_student_kept(tmp_path: Path) -> None:
    """``HiddenStates``: the term adds ``weight * MSE(student, teacher[:, kept])``; the kept channels are the
    ones pruning kept (checked against the weights right after the first event)."""
    pl.seed_everything(0)
    model = Recorder(optimizer="adam", lr=0.01)
    bn = model.features[4]  # the BatchNorm after the second conv
    seen: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if module is bn:  # the teacher copy is made without this hook
            seen["student"] = output.detach()

    bn.register_forward_hook(keep)
    pruning = HierarchicalPruning(
        target=0.5,
        end_epoch=1,
        round_to=4,
        measure_latency=False,
        verbose=False,
        importance="l2",  # the first event must leave the first conv whole (the test reads conv 3's rows only)
        distillation=Distillation(
            alpha=ALPHA, temperature=T, hidden=HiddenStates(["features.4"], weight=0.3)
        ),
    )

    class Probe(Callback):
        def __init__(self) -> None:
            self.reference: nn.Module | None = None
            self.checked = 0
            self.events_seen: set[int] = set()

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if self.reference is None:
                self.reference = copy.deepcopy(pl_module).eval()

        def on_before_backward(self, trainer: pl.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
            if self.reference is None:
                return
            d = pruning.distiller
            assert d is not None
            events = len(pruning.session.ledger.records)
            kept = d.maps.current(events).get("features.4")
            idx = torch.arange(32) if kept is None else torch.tensor(kept)
            assert len(idx) == bn.num_features
            if events not in self.events_seen:  # right after an event, before any optimizer step
                self.events_seen.add(events)
                if events == 1:  # the second conv's kept rows are the teacher's, exactly
                    torch.testing.assert_close(
                        pl_module.features[3].weight, self.reference.features[3].weight[idx]
                    )
            x, student, user = pl_module.seen
            with torch.no_grad():
                reference_logits = self.reference(x)
                teacher_h = self.reference.features[:5](x)[:, idx]
            hidden = 0.3 * (seen["student"] - teacher_h).pow(2).mean()
            torch.testing.assert_close(
                loss, user + expected_term(student, reference_logits) + hidden, rtol=1e-5, atol=1e-6
            )
            self.checked += 1

    probe = Probe()
    t = trainer(tmp_path, [probe, pruning], max_epochs=3, logger=False, num_sanity_val_steps=0)
    train, val = loaders(n=128, batch_size=32)
    t.fit(model, train, val)
    assert probe.checked == 8
    assert probe.events_seen == {1, 2}
    assert bn.num_features < 32
