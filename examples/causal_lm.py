"""The causal LM end to end: train a byte-level Llama on Python's source while pruning it, measure, save, reload.

    python examples/causal_lm.py           # the full run (examples/causal_lm.yaml): 25 min on a busy 2-core CPU
    python examples/causal_lm.py --fast    # a few batches, for CI

Prints validation perplexity (per byte) dense vs pruned, parameters, MACs and CPU throughput (tokens/s of a forward
pass at batch 32 x 128, dense and pruned timed in turns, median and interquartile range); then saves the pruned
model with ``save_pretrained``, reloads it in a fresh process with plain ``transformers`` only, and generates a few
bytes with a key/value cache, which must equal the pruned model's own greedy continuation. Everything is also written
to ``<log_dir>/causal_lm.json``.
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
from lightning_hprune.examples.causal_lm import ByteLlama  # noqa: E402
from lightning_hprune.hf import save_pretrained  # noqa: E402

PROMPT = b"def read_file(path):\n    "
RELOAD = """
import json, sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
prompt = torch.tensor([list(sys.argv[2].encode())])
out = model.generate(prompt, max_new_tokens=int(sys.argv[3]), do_sample=False, use_cache=True)
print(json.dumps({"tokens": out[0].tolist(), "imported": "lightning_hprune" in sys.modules,
                  "config": {k: getattr(model.config, k) for k in ("num_hidden_layers", "hidden_size",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")}}))
"""


def throughput(
    dense: torch.nn.Module, pruned: torch.nn.Module, settings: LatencyMeasurement, length: int = 128
) -> dict:
    """Forward tokens per second of both models at ``settings.batch_size`` x ``length``, timed in alternating rounds.

    Median and interquartile range of each model's tokens per second, from :func:`compare_latency`'s quartiles.
    """
    cmp = compare_latency(dense, pruned, torch.randint(0, 256, (1, length)), settings)
    tokens = settings.batch_size * length
    return {
        name: {
            "tokens_per_s": tokens / (stats.median_ms / 1e3),
            "iqr_tokens_per_s": tokens / (stats.q1_ms / 1e3) - tokens / (stats.q3_ms / 1e3),
        }
        for name, stats in (("dense", cmp.dense), ("pruned", cmp.pruned))
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example (see the module docstring); returns what it writes to ``causal_lm.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "causal_lm.yaml"))
    parser.add_argument("--fast", action="store_true", help="a few batches (CI): numbers mean nothing")
    parser.add_argument("--root", default=None, help="where logs go (default: the YAML's)")
    parser.add_argument("--new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    if args.fast:
        config["data"]["init_args"].update(train_windows=64, val_windows=32, length=32)
        config["model"]["init_args"].update(length=32, layers=3)
        config["trainer"].update(max_epochs=3, enable_progress_bar=False)
        config["trainer"]["callbacks"][0]["init_args"].update(
            start_epoch=0, end_epoch=1, measure_latency=False
        )
        args.new_tokens = 8
    if args.root:
        config["trainer"]["default_root_dir"] = args.root
        for logger in config["trainer"].get("logger", []):
            logger["init_args"]["save_dir"] = args.root
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
        path = f.name
    cli = build_cli(["fit", "--config", path])
    os.unlink(path)
    model, trainer = cli.model, cli.trainer
    assert isinstance(model, ByteLlama)
    pruning = next(c for c in trainer.callbacks if hasattr(c, "session"))
    summary = pruning.summary
    dense = ByteLlama(
        **{k: v for k, v in model.hparams.items() if k in ByteLlama.__init__.__code__.co_varnames}
    )
    if args.fast:
        speed = throughput(
            dense, model, LatencyMeasurement(batch_size=4, warmup=1, rounds=2, repeats=1), length=32
        )
    else:
        speed = throughput(
            dense, model, LatencyMeasurement(batch_size=32, warmup=1, rounds=10, repeats=1, budget_s=300.0)
        )
    result: dict[str, Any] = {
        "val_ppl": {"before": summary["before"]["val_ppl"], "after": summary["after"]["val_ppl"]},
        "params": {"before": summary["before"]["params"], "after": summary["after"]["params"]},
        "macs": {"before": summary["before"]["macs"], "after": summary["after"]["macs"]},
        "throughput_b32_s128": speed,
        "structure": pruning.session.graph.family.describe() if pruning.session.graph else None,
    }
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    out = save_pretrained(model, log_dir / "pruned_model")
    model.eval()
    prompt = torch.tensor([list(PROMPT)])
    with torch.no_grad():
        mine = model.net.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, use_cache=True)[
            0
        ].tolist()
    (log_dir / "causal_lm.json").write_text(json.dumps(result, indent=2))  # kept if the reload fails
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, out, PROMPT.decode(), str(args.new_tokens)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tempfile.gettempdir(),
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"reloading {out} with plain transformers in a fresh process failed (exit {proc.returncode}); "
            f"the fit's numbers are in {log_dir / 'causal_lm.json'}. Its stderr:\n{proc.stderr[-4000:]}"
        )
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])
    result["reload"] = {
        "generation_equal": reloaded["tokens"] == mine,
        "library_imported": reloaded["imported"],
        "config": reloaded["config"],
        "text": bytes(t for t in reloaded["tokens"][len(PROMPT) :] if t < 256).decode("utf-8", "replace"),
    }
    (log_dir / "causal_lm.json").write_text(json.dumps(result, indent=2))
    p, m, s, v = result["params"], result["macs"], speed, result["val_ppl"]
    rows = [
        ("params", f"{p['before']:,.0f}", f"{p['after']:,.0f}", p["after"] / p["before"]),
        ("MACs", f"{m['before']:,.0f}", f"{m['after']:,.0f}", m["after"] / m["before"]),
        (
            "tokens/s b32 s128",
            f"{s['dense']['tokens_per_s']:,.0f} +- {s['dense']['iqr_tokens_per_s'] / 2:,.0f}",
            f"{s['pruned']['tokens_per_s']:,.0f} +- {s['pruned']['iqr_tokens_per_s'] / 2:,.0f}",
            s["pruned"]["tokens_per_s"] / s["dense"]["tokens_per_s"],
        ),
        ("val_ppl (bytes)", f"{v['before']:.3f}", f"{v['after']:.3f}", v["after"] / v["before"]),
    ]
    print(f"\n{'':<18}{'before':>22}{'after':>22}{'ratio':>8}")
    for name, b, a, r in rows:
        print(f"{name:<18}{b:>22}{a:>22}{r:>8.3f}")
    print(f"pruned: {result['structure']}")
    print(
        f"reloaded with plain transformers (library imported: {reloaded['imported']}), config {reloaded['config']}"
    )
    print(f"greedy continuation equal to the pruned model's: {result['reload']['generation_equal']}")
    print(f"{PROMPT.decode()}{result['reload']['text']}")
    return result


if __name__ == "__main__":
    main()
