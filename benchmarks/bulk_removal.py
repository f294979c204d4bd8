"""Why a channel's own importance can mislead when many channels go at once (digits CNN, last convolution).

Trains the digits CNN like ``benchmarks/criteria.py``, then removes the same number of channels
(``--fraction`` of them, 75 % by default) from one layer (``--layer``, the last convolution by default,
whose 256 channels feed the first linear layer), chosen by:

* **random** (``--seeds`` draws, mean +- std);
* **l1**: the group's L1 weight magnitude (``MagnitudeImportance(p=1)``);
* **mean activation**: ``ActivationImportance("mean")`` on 4 training batches;
* **single-channel loss (oracle)**: the exact increase of the training loss when that channel alone is
  removed (its BatchNorm output forced to a large negative value, so the ReLU after it outputs zero),
  measured on ``--samples`` training images, one forward pass per channel;
* **the opposite of the oracle**: the channels whose single removal hurts *most* (a sanity reference).

and prints the validation accuracy of each pruned model (no fine-tuning; the BatchNorm of the pruned layer
is pruned with it, so no recalibration is needed). If the single-channel oracle removes channels that
are worse to lose *together* than a random set, then every criterion that estimates a channel's own
contribution (Taylor, activation statistics, the oracle itself) can lose to random at high ratios on
this network: channels that are individually dispensable are dispensable because other channels carry
the same information, and removing all of them together removes that information.

Run:  python benchmarks/bulk_removal.py [--fraction 0.75] [--layer features.6] [--seeds 3]
About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
import torch.nn.functional as F

from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.importance import ActivationImportance, MagnitudeImportance, RandomImportance
from lightning_hprune.examples.digits import DigitsCNN, DigitsDataModule

try:
    from benchmarks.criteria import accuracy, train_dense
except ModuleNotFoundError:  # run as a script: benchmarks/ is on the path, the repository root is not
    from criteria import accuracy, train_dense  # type: ignore[no-redef]


def pruned_accuracy(dense: dict[str, torch.Tensor], layer: str, idxs: list[int], val: object) -> float:
    model = DigitsCNN()
    model.load_state_dict(dense)
    model.eval()
    PruningGraph(model, model.example_input_array).prune({f"{layer}.0": sorted(idxs)})
    return accuracy(model, val)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=6, help="dense training epochs")
    parser.add_argument("--layer", default="features.6", help="a conv_bn block of DigitsCNN.features")
    parser.add_argument("--fraction", type=float, default=0.75, help="fraction of its channels to remove")
    parser.add_argument("--samples", type=int, default=600, help="training images for the oracle")
    parser.add_argument("--seeds", type=int, default=3, help="random draws")
    parser.add_argument("--root", default="/tmp/hprune_bench_bulk", help="Lightning's default_root_dir")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    dense, dense_acc = train_dense(args.epochs, 0, args.root)
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    val = dm.val_dataloader()
    xs = torch.cat([x for x, _ in train])[: args.samples]
    ys = torch.cat([y for _, y in train])[: args.samples]

    model = DigitsCNN()
    model.load_state_dict(dense)
    model.eval()
    graph = PruningGraph(model, model.example_input_array)
    group = {g.name: g for g in graph.groups()}[f"{args.layer}.0"]
    n = group.size
    k = int(args.fraction * n)
    bn = model.get_submodule(f"{args.layer}.1")

    with torch.no_grad():
        base = float(F.cross_entropy(model(xs), ys))
        oracle = []
        for c in range(n):
            hook = bn.register_forward_hook(
                lambda m, i, o, c=c: o.index_fill(1, torch.tensor([c]), -1e4)  # ReLU -> 0
            )
            oracle.append(float(F.cross_entropy(model(xs), ys)) - base)
            hook.remove()
    oracle_t = torch.tensor(oracle)
    activation = ActivationImportance("mean")
    activation.prepare(model, [x for x, _ in train[:4]])
    scores = {
        "l1": MagnitudeImportance(p=1)(group.group),
        "mean activation": activation(group.group),
        "single-channel loss (oracle)": oracle_t,
        "opposite of the oracle": -oracle_t,
    }
    rows = []
    rand = [
        pruned_accuracy(
            dense, args.layer, torch.argsort(RandomImportance(seed=s)(group.group))[:k].tolist(), val
        )
        for s in range(args.seeds)
    ]
    spread = f" +- {statistics.stdev(rand):.1%}" if len(rand) > 1 else ""
    rows.append((f"random ({args.seeds} seeds)", f"{statistics.mean(rand):.1%}{spread}"))
    for name, s in scores.items():
        idxs = torch.argsort(s.float(), stable=True)[:k].tolist()
        rows.append((name, f"{pruned_accuracy(dense, args.layer, idxs, val):.1%}"))

    print(
        f"\nDigitsCNN (dense accuracy {dense_acc:.1%}): {k} of the {n} channels of {args.layer} removed at once, "
        "no fine-tuning\n"
    )
    print("| channels chosen by | validation accuracy |")
    print("|---|---|")
    for name, acc in rows:
        print(f"| {name} | {acc} |")


if __name__ == "__main__":
    main()
