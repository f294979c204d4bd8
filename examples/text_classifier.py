"""The text classifier end to end: fine-tune and prune MiniLM, measure it, save it, reload it with plain transformers.

    python examples/text_classifier.py                   # the full run (examples/text_classifier.yaml)
    python examples/text_classifier.py --fast            # a few batches, for CI

1. ``hprune fit`` with ``examples/text_classifier.yaml``: the bundled all-MiniLM-L6-v2 fine-tuned on standard-library
   docstrings (8 module families), pruned by the default hierarchy during the fit.
2. A before/after table: the encoder's parameters, MACs, CPU latency at batch 32 and 128 tokens (dense and pruned
   timed in turns in this process, median and interquartile range), validation accuracy and the share kept.
3. ``lightning_hprune.hf.save_pretrained`` of the pruned model, then a fresh Python process that imports only
   transformers loads it with ``AutoModelForSequenceClassification.from_pretrained`` and predicts the validation
   set: the predictions must equal the pruned model's.

Everything is also written to ``<log_dir>/text_classifier.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_hprune.cli import build_cli  # noqa: E402
from lightning_hprune.core.measure import LatencyMeasurement, compare_latency  # noqa: E402
from lightning_hprune.examples.text import MiniLMClassifier  # noqa: E402
from lightning_hprune.hf import save_pretrained  # noqa: E402

RELOAD = """
import json, sys, torch, transformers
model = transformers.AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
data = torch.load(sys.argv[2])
with torch.no_grad():
    logits = torch.cat([model(input_ids=i, attention_mask=m).logits for i, m in zip(data["ids"], data["mask"])])
print(json.dumps({"pred": logits.argmax(-1).tolist(), "imported": "lightning_hprune" in sys.modules}))
"""


def latency(
    dense: torch.nn.Module, pruned: torch.nn.Module, settings: LatencyMeasurement, length: int = 128
) -> dict:
    """Forward latency of both models at ``settings.batch_size`` x ``length`` tokens, timed in alternating rounds (ms)."""
    ids = torch.randint(1000, 2000, (1, length))
    return compare_latency(dense, pruned, (ids, torch.ones_like(ids)), settings).as_dict()


def encoder_params(model: MiniLMClassifier) -> int:
    """Parameters of the encoder (embeddings and layers; not the pooler and the classifier)."""
    bert = model.net.bert
    return sum(p.numel() for n, p in bert.named_parameters() if not n.startswith("pooler."))


def _fit(config: dict[str, Any]) -> Any:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
        path = f.name
    try:
        return build_cli(["fit", "--config", path])
    finally:
        os.unlink(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example (see the module docstring); returns what it writes to ``text_classifier.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "text_classifier.yaml"))
    parser.add_argument("--fast", action="store_true", help="a few batches (CI): numbers mean nothing")
    parser.add_argument("--root", default=None, help="where logs go (default: the YAML's)")
    parser.add_argument(
        "--with-dense",
        action="store_true",
        help="also fine-tune the dense model for the same epochs, for comparison",
    )
    args = parser.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    if args.fast:
        config["data"]["init_args"].update(limit=64, val_limit=64, max_length=32)
        config["model"]["init_args"]["max_length"] = 32
        config["trainer"].update(max_epochs=2, limit_train_batches=2, enable_progress_bar=False)
        config["trainer"]["callbacks"][0]["init_args"].update(
            start_epoch=1, end_epoch=1, measure_latency=False
        )
    if args.root:
        config["trainer"]["default_root_dir"] = args.root
        for logger in config["trainer"].get("logger", []):
            logger["init_args"]["save_dir"] = args.root
    dense_acc = None
    if args.with_dense:  # the same fit without the pruning callback: the accuracy to keep
        plain = yaml.safe_load(yaml.safe_dump(config))
        plain["trainer"]["callbacks"] = [
            c for c in plain["trainer"]["callbacks"] if "Pruning" not in c["class_path"]
        ]
        plain["trainer"]["default_root_dir"] = str(Path(plain["trainer"]["default_root_dir"]) / "dense")
        for logger in plain["trainer"].get("logger", []):
            logger["init_args"]["save_dir"] = plain["trainer"]["default_root_dir"]
        dense_cli = _fit(plain)
        dense_acc = float(dense_cli.trainer.callback_metrics["val_acc"])
    cli = _fit(config)
    model, trainer = cli.model, cli.trainer
    assert isinstance(model, MiniLMClassifier)
    pruning = next(c for c in trainer.callbacks if hasattr(c, "session"))
    summary = pruning.summary
    dense = MiniLMClassifier(max_length=model.hparams["max_length"])  # the dense architecture, for timing
    if args.fast:
        timing = latency(
            dense, model, LatencyMeasurement(batch_size=4, warmup=1, rounds=2, repeats=1), length=32
        )
    else:
        timing = latency(
            dense, model, LatencyMeasurement(batch_size=32, rounds=12, repeats=1, budget_s=300.0)
        )
    before_acc, after_acc = summary["before"]["val_acc"], summary["after"]["val_acc"]
    result: dict[str, Any] = {
        "dense_fine_tuned_val_acc": dense_acc,
        "encoder_params": {"before": encoder_params(dense), "after": encoder_params(model)},
        "macs": {"before": summary["before"]["macs"], "after": summary["after"]["macs"]},
        "latency_b32_s128": timing,
        "val_acc": {"before": before_acc, "after": after_acc, "retained": after_acc / before_acc},
        "structure": pruning.session.graph.family.describe() if pruning.session.graph else None,
    }
    # Save for plain transformers and reload in a fresh process that never imports lightning_hprune.
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    out = save_pretrained(model, log_dir / "pruned_model")
    val = trainer.datamodule.val_dataloader()
    ids, mask = zip(*[(b[0], b[1]) for b in val], strict=True)
    torch.save({"ids": list(ids), "mask": list(mask)}, log_dir / "val_inputs.pt")
    model.eval()
    with torch.no_grad():
        mine = torch.cat([model(i, m) for i, m in zip(ids, mask, strict=True)]).argmax(-1).tolist()
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, out, str(log_dir / "val_inputs.pt")],
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),
    )
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])
    result["reload"] = {
        "predictions_equal": reloaded["pred"] == mine,
        "n": len(mine),
        "library_imported": reloaded["imported"],
    }
    (log_dir / "text_classifier.json").write_text(json.dumps(result, indent=2))
    e, m, t = result["encoder_params"], result["macs"], timing
    rows = [
        ("encoder params", f"{e['before']:,}", f"{e['after']:,}", e["after"] / e["before"]),
        ("MACs", f"{m['before']:,.0f}", f"{m['after']:,.0f}", m["after"] / m["before"]),
        (
            "latency b32 s128",
            f"{t['dense']['median_ms']:.0f} ms +- {t['dense']['iqr_ms'] / 2:.0f}",
            f"{t['pruned']['median_ms']:.0f} ms +- {t['pruned']['iqr_ms'] / 2:.0f}",
            t["pruned"]["median_ms"] / t["dense"]["median_ms"],
        ),
        ("val_acc", f"{before_acc:.4f}", f"{after_acc:.4f}", after_acc / before_acc),
    ]
    print(f"\n{'':<18}{'before':>22}{'after':>22}{'ratio':>8}")
    for name, b, a, r in rows:
        print(f"{name:<18}{b:>22}{a:>22}{r:>8.3f}")
    if dense_acc is not None:
        print(
            f"dense model fine-tuned for the same {config['trainer']['max_epochs']} epochs: val_acc {dense_acc:.4f}; "
            f"the pruned model keeps {after_acc / dense_acc:.1%} of it"
        )
    print(f"pruned: {result['structure']}")
    print(
        f"plain transformers reload (fresh process, library not imported): predictions equal on "
        f"{result['reload']['n']} validation docstrings: {result['reload']['predictions_equal']}"
    )
    return result


if __name__ == "__main__":
    main()
