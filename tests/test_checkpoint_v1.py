"""Checkpoints written by the first release (state format version 1) still resume and load.

``tests/fixtures/v1_mid_pruning.ckpt`` was written mid-pruning (two of three events done, closed loop on,
a check pending) by the release whose callback wrote ``{"version": 1, ...}``; see
``tests/fixtures/make_v1_checkpoint.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_hprune import ClosedLoop, HierarchicalPruning, load_pruned
from lightning_hprune.checkpoint import find_pruning_state, has_structure_of
from tests.fixtures.make_v1_checkpoint import CALLBACK_KWARGS, MAX_EPOCHS, MODEL_KWARGS, loaders
from tests.helpers import TinyCNN

pytestmark = pytest.mark.fit  # every test here runs a Trainer (or a fresh process)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "v1_mid_pruning.ckpt"
ROOT = Path(__file__).resolve().parents[1]


def _v1_state() -> dict:
    state = find_pruning_state(torch.load(FIXTURE, weights_only=True))
    assert state is not None
    return state


def test_fixture_is_a_version_1_checkpoint_written_mid_pruning() -> None:
    state = _v1_state()
    assert state["version"] == 1
    assert state["event_index"] == 2
    assert len(state["history"]) == 4
    assert state["adjust"]["pending_check"] == {"event": 1, "epoch": 1, "check_epoch": 2}


def test_v1_checkpoint_loads_with_load_pruned_in_a_fresh_process() -> None:
    code = (
        "import json, torch\n"
        "from lightning_hprune import load_pruned\n"
        "from tests.helpers import TinyCNN\n"
        f"m = load_pruned(TinyCNN, {str(FIXTURE)!r})\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "print(json.dumps([list(m(x).shape), m.features[0].out_channels, m.features[3].out_channels]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    shape, c0, c3 = json.loads(out.stdout.strip().splitlines()[-1])
    assert shape == [2, 4]
    assert (c0, c3) == (6, 12)  # 8 -> 6 and 16 -> 12 channels, as recorded
    model = load_pruned(TinyCNN, FIXTURE)
    assert has_structure_of(model, torch.load(FIXTURE, weights_only=True)["state_dict"])


class StartProbe(Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.params = sum(p.numel() for p in pl_module.parameters())
        opt = trainer.optimizers[0]
        self.moments_match = all(
            opt.state[p]["exp_avg"].shape == p.shape for g in opt.param_groups for p in g["params"]
        )


def test_v1_checkpoint_resumes_and_completes_the_schedule(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = TinyCNN(**MODEL_KWARGS)
    cb = HierarchicalPruning(**CALLBACK_KWARGS, closed_loop=ClosedLoop(max_drop=0.5))
    probe = StartProbe()
    trainer = pl.Trainer(
        max_epochs=MAX_EPOCHS,
        callbacks=[cb, probe],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    train, val = loaders()
    trainer.fit(model, train, val, ckpt_path=str(FIXTURE))
    assert trainer.state.finished
    # The structure was rebuilt before training restarted, the Adam moments match it.
    assert probe.params < sum(p.numel() for p in TinyCNN(**MODEL_KWARGS).parameters())
    assert probe.moments_match
    # The third event ran on top of the two recorded ones and the target was reached.
    assert cb.event_index == 3
    assert cb.history_steps()[:4] == _v1_state()["history"]
    assert len(cb.history_steps()) > 4
    assert cb.summary["achieved"] >= CALLBACK_KWARGS["target"] - 0.002
    # The pending check of event 1 was judged after the resume.
    assert any(d["action"] in ("continue", "speed_up") and d.get("event") == 1 for d in cb.decisions)
