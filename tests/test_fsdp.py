"""FSDP2 (``fully_shard`` under ``ModelParallelStrategy``): two CPU processes (gloo) prune the sharded model in place.

One launch of two processes (``python -m tests.test_fsdp OUT``; Lightning starts the second rank) runs, in
order, on the same data and seeds:

1. ``ddp``: the reference, a plain TinyCNN under ``strategy="ddp"``;
2. ``fsdp``: the same run with ``fully_shard`` applied in ``configure_model`` (each convolution, the head
   and the root), writing a sharded (distributed) checkpoint at every epoch end, with probes that
   gather the parameters and Adam's state just before and just after the first event;
3. ``resumed_sharded``: ``fit(ckpt_path=<fsdp's sharded checkpoint after event 0>)``, writing full
   (single-file) checkpoints;
4. ``resumed_full``: ``fit(ckpt_path=<resumed_sharded's full checkpoint after event 1>)``.

Events end epochs 0, 1 and 2 (of 4). The test reads back what rank 0 (and rank 1) wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_hprune import HierarchicalPruning, load_pruned
from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.optim_state import record_parameter_surgery
from lightning_hprune.core.sharding import is_dtensor, is_sharded, reshard_all
from tests.helpers import TinyCNN, loaders

pytestmark = [
    pytest.mark.fit,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4


class ShardedCNN(TinyCNN):
    """TinyCNN whose ``configure_model`` shards it with FSDP2: one unit per convolution, the head, the root."""

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is None or is_sharded(self):
            return  # not under ModelParallelStrategy, or already sharded (configure_model is idempotent)
        from torch.distributed.fsdp import fully_shard

        dp = mesh["data_parallel"]
        for layer in self.features:
            if isinstance(layer, torch.nn.Conv2d):
                fully_shard(layer, mesh=dp)
        fully_shard(self.head, mesh=dp)
        fully_shard(self, mesh=dp)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if is_dtensor(t) else t).detach().cpu().clone()


class StateProbe(Callback):
    """At the end of ``epoch``: every parameter and its optimizer state, gathered (a collective on every rank)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.seen: dict[str, Any] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        reshard_all(pl_module)  # the root unit keeps its parameters gathered after a no-grad forward
        opt = trainer.optimizers[0]
        params, state = {}, {}
        for name, p in pl_module.named_parameters():
            params[name] = _full(p)
            s = opt.state.get(p, {})
            state[name] = {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        pruning = next(c for c in trainer.callbacks if isinstance(c, HierarchicalPruning))
        self.seen = {
            "history_len": len(pruning.history_steps()),
            "params": params,
            "state": state,
            "optimizer_holds_live_params": held == {id(p) for p in pl_module.parameters()},
            "sharded": all(is_dtensor(p) for p in pl_module.parameters()),
        }


class BroadcastBuffers(Callback):
    """Rank 0's buffers on every rank before each step and checkpoint, as DDP does (``broadcast_buffers``).

    FSDP2 shards parameters only: each rank's BatchNorm running statistics follow its own batches, and a
    distributed checkpoint keeps one copy of such replicated tensors, so a resumed run would continue
    from another rank's statistics. Keeping them equal makes "ends equal to the unbroken run" exact.
    """

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int
    ) -> None:
        for b in pl_module.buffers():
            dist.broadcast(b, src=0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_train_batch_start(trainer, pl_module, None, -1)  # before the epoch's checkpoint


def _strategy(kind: str, distributed_checkpoint: bool = True) -> Any:
    from lightning.pytorch.strategies import ModelParallelStrategy

    if kind == "ddp":
        return "ddp"
    return ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=distributed_checkpoint
    )


def _fit(
    out: Path, name: str, kind: str, ckpt_path: str | None = None, distributed_checkpoint: bool = True
) -> None:
    pl.seed_everything(0)
    model = (ShardedCNN if kind == "fsdp" else TinyCNN)(
        widths=(16, 16, 16), optimizer="adam", lr=0.01, scheduler="step"
    )
    # Activation statistics: each rank scores its own calibration batches and the scores are summed
    # across ranks before rank 0 decides (under DDP and FSDP2 alike).
    pruning = HierarchicalPruning(
        target=0.5, end_epoch=2, round_to=4, importance="activation", measure_latency=False, verbose=False
    )
    before, after = StateProbe(0), StateProbe(0)
    checkpoints = ModelCheckpoint(
        dirpath=str(out / f"{name}_ckpt"), filename="{epoch}", save_top_k=-1, every_n_epochs=1
    )
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=2,
        strategy=_strategy(kind, distributed_checkpoint),
        callbacks=[BroadcastBuffers(), before, pruning, after, checkpoints],
        logger=False,
        default_root_dir=str(out / name),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    train, val = loaders(n=64, batch_size=16)
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    else:
        weights = model.state_dict()
    opt = trainer.optimizers[0]
    torch.save(
        {
            "finished": trainer.state.finished,
            "global_step": trainer.global_step,
            "history": pruning.history_steps(),
            "event_epochs": [r["epoch"] for r in pruning.records],
            "removed": pruning.summary["achieved"] if hasattr(pruning, "summary") else None,
            "weights": {k: v.detach().cpu().clone() for k, v in weights.items()},
            "shapes": {n: tuple(p.shape) for n, p in model.named_parameters()},
            "sharded": all(is_dtensor(p) for p in model.parameters()),
            "lr": opt.param_groups[0]["lr"],
            "steps": [float(s["step"]) for s in opt.state.values()],
            "before": before.seen,
            "after": after.seen,
        },
        out / f"{name}_rank{trainer.global_rank}.pt",
    )


def _fit_failing(out: Path) -> None:
    """An event that fails after the model was sharded again, while carrying the optimizer state."""
    from lightning_hprune.callbacks import strategies

    pl.seed_everything(0)
    model = ShardedCNN(widths=(16, 16, 16), optimizer="adam", lr=0.01)
    before = StateProbe(0)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy=_strategy("fsdp"),
        callbacks=[
            BroadcastBuffers(),
            before,
            HierarchicalPruning(target=0.5, measure_latency=False, verbose=False),
        ],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(out / "failing"),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    train, val = loaders(n=64, batch_size=16)
    original = strategies.remap_optimizer

    def failing(*args: Any, **kwargs: Any) -> list[str]:
        raise RuntimeError("injected failure while carrying the optimizer state")

    strategies.remap_optimizer = failing  # type: ignore[assignment]
    error = ""
    try:
        trainer.fit(model, train, val)
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    finally:
        strategies.remap_optimizer = original  # type: ignore[assignment]
    restored = StateProbe(0)
    restored.on_train_epoch_end(trainer, model)
    # The FSDP hooks work again: one more training step, then the weights are gathered.
    opt = trainer.optimizers[0]
    x, y = next(iter(train))
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    reshard_all(model)
    stepped = {n: _full(p) for n, p in model.named_parameters()}
    torch.save(
        {"error": error, "before": before.seen, "restored": restored.seen, "stepped": stepped},
        out / f"failing_rank{trainer.global_rank}.pt",
    )


def run_ranks(out: Path) -> None:
    """Every run, one after the other, in the same two processes (``python -m tests.test_fsdp OUT``)."""
    torch.set_num_threads(1)
    _fit(out, "ddp", "ddp")
    _fit(out, "fsdp", "fsdp")
    _fit(
        out, "resumed_sharded", "fsdp", str(out / "fsdp_ckpt" / "epoch=0.ckpt"), distributed_checkpoint=False
    )
    _fit(out, "resumed_full", "fsdp", str(out / "resumed_sharded_ckpt" / "epoch=1.ckpt"))
    _fit_failing(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_fsdp", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    loaded = {p.stem: torch.load(p, weights_only=True) for p in out.glob("*_rank*.pt")}
    loaded["out"] = out
    return loaded


@pytest.mark.slow  # one launch of two processes, four short fits: about a minute on 2 busy cores
def test_fsdp2_prunes_in_place_like_ddp(runs: dict[str, Any]) -> None:
    ddp, fsdp = runs["ddp_rank0"], runs["fsdp_rank0"]
    assert ddp["finished"]
    assert fsdp["finished"]
    assert runs["fsdp_rank1"]["finished"]
    assert ddp["event_epochs"] == fsdp["event_epochs"] == [0, 1, 2]
    # Same architecture: the same channels removed at every event, on both ranks.
    assert fsdp["history"]
    assert fsdp["history"] == ddp["history"] == runs["fsdp_rank1"]["history"]
    assert fsdp["shapes"] == ddp["shapes"]
    assert fsdp["shapes"]["features.0.weight"][0] < 16
    assert fsdp["removed"] == pytest.approx(ddp["removed"])
    # Still sharded after the last event, and training went on to the end with the LR schedule intact.
    assert fsdp["sharded"]
    assert fsdp["global_step"] == ddp["global_step"] == EPOCHS * 2
    assert fsdp["lr"] == pytest.approx(0.01 * 0.5**EPOCHS)
    # The weights equal DDP's bit for bit. Tolerance 0, and why it holds: DDP all-reduces and FSDP2
    # reduce-scatters the same two per-rank gradients; with two ranks the float32 sum a + b does not depend
    # on the order, and averaging divides by 2, which is exact. (With more ranks the summation order
    # differs and a comparison would need float32 rounding, about 1e-6 relative per step.)
    assert fsdp["weights"].keys() == ddp["weights"].keys()
    for key, value in ddp["weights"].items():
        torch.testing.assert_close(fsdp["weights"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_fsdp2_event_carries_the_sharded_optimizer_state(runs: dict[str, Any]) -> None:
    fsdp = runs["fsdp_rank0"]
    before, after = fsdp["before"], fsdp["after"]
    assert before["sharded"]
    assert after["sharded"]  # sharded again right after the event
    assert after["optimizer_holds_live_params"]
    # What the first event removed, replayed on an unsharded copy with the gathered pre-event weights:
    # it gives, for every parameter, the kept indices along each dimension.
    assert before["history_len"] == 0
    first = fsdp["history"][: after["history_len"]]
    assert first
    model = TinyCNN(widths=(16, 16, 16))
    model.load_state_dict({**model.state_dict(), **before["params"]})
    names = {id(p): n for n, p in model.named_parameters()}
    graph = PruningGraph(model, torch.zeros(1, 3, 8, 8))
    with record_parameter_surgery() as surgery:
        graph.replay(first)
    changes = {names[id(c.old)]: c for c in surgery.changes}
    assert set(after["params"]) == set(before["params"])
    for name, p in model.named_parameters():
        assert torch.equal(after["params"][name], p.detach()), name  # the replay explains the new weights
        old, new = before["state"][name], after["state"][name]
        assert set(new) == {"step", "exp_avg", "exp_avg_sq"}, name
        assert float(new["step"]) == float(old["step"]) == 2.0
        for key in ("exp_avg", "exp_avg_sq"):
            expected = changes[name].apply(old[key]) if name in changes else old[key]
            assert torch.equal(new[key], expected), (name, key)  # equal by value for the kept channels
    assert any(name in changes for name in ("features.0.weight", "features.3.weight", "head.1.weight"))


@pytest.mark.slow
def test_fsdp2_resume_mid_pruning_from_sharded_and_full_checkpoints(runs: dict[str, Any]) -> None:
    fsdp = runs["fsdp_rank0"]
    sharded_ckpt = runs["out"] / "fsdp_ckpt" / "epoch=0.ckpt"
    full_ckpt = runs["out"] / "resumed_sharded_ckpt" / "epoch=1.ckpt"
    assert sharded_ckpt.is_dir()  # a distributed checkpoint: one shard file per rank + meta.pt
    assert (sharded_ckpt / "meta.pt").is_file()
    assert full_ckpt.is_file()
    for name in ("resumed_sharded", "resumed_full"):
        for rank in (0, 1):
            resumed = runs[f"{name}_rank{rank}"]
            assert resumed["finished"], name
            assert resumed["history"] == fsdp["history"], name
            assert resumed["shapes"] == fsdp["shapes"], name
            assert resumed["global_step"] == fsdp["global_step"], name
            assert resumed["lr"] == pytest.approx(fsdp["lr"]), name
            assert resumed["sharded"], name
        assert runs[f"{name}_rank0"]["event_epochs"] == [
            0,
            1,
            2,
        ]  # the earlier records came with the checkpoint
        # The resumed run ends exactly where the unbroken one did.
        for key, value in fsdp["weights"].items():
            torch.testing.assert_close(
                runs[f"{name}_rank0"]["weights"][key], value, rtol=0, atol=0, msg=f"{name}: {key}"
            )


@pytest.mark.slow
def test_load_pruned_reads_sharded_and_full_checkpoints_in_one_process(runs: dict[str, Any]) -> None:
    out = runs["out"]
    for path, name in (
        (out / "fsdp_ckpt" / "epoch=0.ckpt", "sharded"),
        (out / "resumed_sharded_ckpt" / "epoch=1.ckpt", "full"),
    ):
        model = load_pruned(TinyCNN, path)  # strict: the rebuilt structure has exactly the stored shapes
        dense = TinyCNN(widths=(16, 16, 16))
        assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters()), name
        assert torch.isfinite(model(torch.zeros(2, 3, 8, 8))).all(), name
    # The full checkpoint after event 1 holds the weights the resumed run had then: the same as the unbroken run's.
    full = load_pruned(TinyCNN, out / "resumed_sharded_ckpt" / "epoch=1.ckpt")
    unbroken = load_pruned(TinyCNN, out / "fsdp_ckpt" / "epoch=1.ckpt")
    for (key, a), b in zip(full.state_dict().items(), unbroken.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


@pytest.mark.slow
def test_fsdp2_failed_event_leaves_the_sharded_model_and_optimizer_as_before(runs: dict[str, Any]) -> None:
    for rank in (0, 1):
        failing = runs[f"failing_rank{rank}"]
        assert "PruningError" in failing["error"]
        assert "injected failure while carrying the optimizer state" in failing["error"]
        assert "exactly as they were before the event" in failing["error"]
        before, restored = failing["before"], failing["restored"]
        assert restored["sharded"]
        assert restored["optimizer_holds_live_params"]
        assert restored["history_len"] == 0
        assert restored["params"].keys() == before["params"].keys()
        for name, value in before["params"].items():
            assert torch.equal(restored["params"][name], value), name
            for key, s in before["state"][name].items():
                assert torch.equal(torch.as_tensor(restored["state"][name][key]), torch.as_tensor(s)), (
                    name,
                    key,
                )
        assert restored["params"]["features.0.weight"].shape[0] == 16
    # Both ranks trained one more step through the restored FSDP hooks, and agree.
    r0, r1 = runs["failing_rank0"]["stepped"], runs["failing_rank1"]["stepped"]
    for name, value in r0.items():
        assert torch.equal(r1[name], value), name
        assert not torch.equal(value, runs["failing_rank0"]["before"]["params"][name]), name


if __name__ == "__main__":
    run_ranks(Path(sys.argv[1]))
