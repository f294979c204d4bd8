"""Resuming from checkpoints written mid-pruning ends exactly where an uninterrupted run ends.

The comparison is made honest: the data order of every epoch comes from a sampler seeded by the epoch
(Lightning does not checkpoint the global RNG, so ``shuffle=True`` would differ after any resume, pruning
or not), the model has no dropout, and a witness checks that the pruning events draw nothing from the
global RNG. Everything else that a pruning event reads (the example input, the calibration batches, the
criterion's statistics, the history, the schedule position) must come from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Sampler

from lightning_hprune import HierarchicalPruning
from lightning_hprune.checkpoint import find_pruning_state
from lightning_hprune.core.importance import Importance, IntegratedImportance, MagnitudeImportance
from tests.helpers import TinyCNN, random_images, trainer

pytestmark = pytest.mark.fit  # every test here runs a Trainer (or a fresh process)

MAX_EPOCHS = 5  # events at the ends of epochs 0, 1 and 2; epochs 3 and 4 recover
RESUME_EPOCH = 1  # a checkpoint after the second of three events


class EpochSeededSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on the epoch (Lightning calls ``set_epoch``)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class RngWitness(Callback):
    """Two instances around the pruning callback: the event must leave the global RNG untouched."""

    def __init__(self, peer: RngWitness | None = None) -> None:
        self.peer = peer
        self.state: torch.Tensor | None = None
        self.checked = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.peer is None:
            self.state = torch.get_rng_state()
        else:
            assert self.peer.state is not None
            assert torch.equal(self.peer.state, torch.get_rng_state()), "a pruning event consumed global RNG"
            self.checked += 1


class StartProbe(Callback):
    """What the model, optimizer and callback look like when training (re)starts."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, HierarchicalPruning))
        opt = trainer.optimizers[0]
        self.shapes = {n: tuple(p.shape) for n, p in pl_module.named_parameters()}
        self.event_index = cb.event_index
        self.records = len(cb.records)
        self.opt_params_are_live = {id(p) for g in opt.param_groups for p in g["params"]} == {
            id(p) for p in pl_module.parameters()
        }
        params = [p for g in opt.param_groups for p in g["params"]]
        self.params_with_state = sum(1 for p in params if opt.state.get(p))
        self.moment_shapes_match = all(
            opt.state[p]["exp_avg"].shape == p.shape for p in params if opt.state.get(p)
        )
        self.lr = opt.param_groups[0]["lr"]


def _taylor_and_activation() -> Importance:
    return IntegratedImportance(["taylor", "activation"])


def _fit(
    root: Path,
    importance: Callable[[], Importance],
    save_on_train_epoch_end: bool,
    ckpt_path: str | None = None,
) -> dict[str, Any]:
    pl.seed_everything(0)
    model = TinyCNN(optimizer="adam", lr=0.01, scheduler="step")
    train = random_images(128, seed=0)
    train_loader = DataLoader(train, batch_size=32, sampler=EpochSeededSampler(len(train)))
    val_loader = DataLoader(random_images(32, seed=1), batch_size=32)
    pruning = HierarchicalPruning(
        target=0.5, importance=importance(), round_to=4, measure_latency=False, verbose=False
    )
    before = RngWitness()
    after = RngWitness(peer=before)
    probe = StartProbe()
    checkpoints = ModelCheckpoint(
        dirpath=str(root / "ckpt"),
        filename="{epoch}",
        save_top_k=-1,
        save_on_train_epoch_end=save_on_train_epoch_end,
    )
    t = trainer(
        root,
        [before, pruning, after, probe, checkpoints],
        max_epochs=MAX_EPOCHS,
        enable_checkpointing=True,
        num_sanity_val_steps=0,
    )
    t.fit(model, train_loader, val_loader, ckpt_path=ckpt_path)
    return {"model": model, "pruning": pruning, "trainer": t, "witness": after, "probe": probe}


VARIANTS = {
    # Lightning's default: the checkpoint is written at the end of the training epoch, after the event.
    "train-epoch-end": (MagnitudeImportance, True),
    # Written at validation end, *before* the event of that epoch: Lightning re-runs the epoch-end hooks
    # on resume, so the event runs from checkpointed calibration batches and gradient statistics.
    "validation-end": (_taylor_and_activation, False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_resume_mid_pruning_matches_uninterrupted_run(tmp_path: Path, variant: str) -> None:
    importance, on_train_end = VARIANTS[variant]
    full = _fit(tmp_path / "full", importance, on_train_end)
    assert full["pruning"].event_index == 3
    assert full["witness"].checked == MAX_EPOCHS  # the RNG was left alone around every epoch end

    path = tmp_path / "full" / "ckpt" / f"epoch={RESUME_EPOCH}.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    state = find_pruning_state(checkpoint)
    assert state is not None
    if on_train_end:
        assert state["schedule"]["position"] == 2  # mid-pruning: two of three events done
        assert state["calibration"]["batches"] == []  # cleared by the event
    else:
        assert state["schedule"]["position"] == 1  # the second event runs on resume
        assert len(state["calibration"]["batches"]) == 4  # the last batches of the event epoch travel along
        taylor = state["importance"]["criteria"][0]
        assert taylor["steps"] == 4
        assert taylor["acc"]

    resumed = _fit(tmp_path / "resumed", importance, on_train_end, ckpt_path=str(path))

    # The structure was rebuilt before training restarted, with the optimizer state matching it.
    probe = resumed["probe"]
    assert probe.event_index == state["schedule"]["position"]
    assert probe.records == state["schedule"]["position"]
    assert probe.opt_params_are_live
    assert probe.moment_shapes_match
    assert probe.params_with_state == len(probe.shapes)  # Adam moments restored for every parameter
    assert probe.shapes == {n: tuple(checkpoint["state_dict"][n].shape) for n in probe.shapes}
    assert sum(torch.Size(s).numel() for s in probe.shapes.values()) < sum(
        p.numel() for p in TinyCNN().parameters()
    )

    # Same architecture, same weights, same history and callback state.
    a, b = full["pruning"], resumed["pruning"]
    assert b.history_steps() == a.history_steps()
    assert b.event_index == a.event_index == 3
    assert [r["removed"] for r in b.records] == [r["removed"] for r in a.records]
    assert [r["epoch"] for r in b.records] == [0, 1, 2]
    assert b.baseline == a.baseline
    sd_a, sd_b = full["model"].state_dict(), resumed["model"].state_dict()
    assert {k: v.shape for k, v in sd_a.items()} == {k: v.shape for k, v in sd_b.items()}
    for key in sd_a:
        torch.testing.assert_close(sd_b[key], sd_a[key], rtol=1e-4, atol=1e-6, msg=key)

    # Optimizer moments/steps and the LR schedule continued from the checkpoint.
    opt_a, opt_b = full["trainer"].optimizers[0], resumed["trainer"].optimizers[0]
    for pa, pb in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"], strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_b.state[pb][key], opt_a.state[pa][key], rtol=1e-4, atol=1e-7)
    sched_a = full["trainer"].lr_scheduler_configs[0].scheduler.state_dict()
    sched_b = resumed["trainer"].lr_scheduler_configs[0].scheduler.state_dict()
    assert sched_b == sched_a
    assert opt_b.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**MAX_EPOCHS)


def test_training_in_chunks_continues_the_schedule(tmp_path: Path) -> None:
    """`max_epochs=2`, then `fit(ckpt_path=...)` with `max_epochs=6`: the schedule goes on to its target."""

    def callback() -> HierarchicalPruning:
        return HierarchicalPruning(
            target=0.5, start_epoch=0, end_epoch=3, round_to=4, measure_latency=False, verbose=False
        )

    pl.seed_everything(0)
    first = callback()
    checkpoints = ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), save_last=True, save_on_train_epoch_end=True
    )
    t = trainer(
        tmp_path, [first, checkpoints], max_epochs=2, enable_checkpointing=True, num_sanity_val_steps=0
    )
    train = DataLoader(random_images(64, seed=0), batch_size=32)
    val = DataLoader(random_images(32, seed=1), batch_size=32)
    with pytest.warns(UserWarning, match=r"2 of 4 events run in this fit"):
        t.fit(TinyCNN(), train, val)
    assert first.event_index == 2
    assert first.records[-1]["removed"] < 0.5 - 0.05  # half-way through the schedule

    second = callback()
    t2 = trainer(tmp_path / "more", [second], max_epochs=6, num_sanity_val_steps=0)
    model = TinyCNN()
    t2.fit(model, train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.event_index == 4
    assert [r["epoch"] for r in second.records] == [0, 1, 2, 3]
    assert second.history_steps()[: len(first.history_steps())] == first.history_steps()
    assert second.summary["achieved"] >= 0.5 - 0.002
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in TinyCNN().parameters())
