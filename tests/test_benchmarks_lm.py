"""The causal LM task of both benchmarks, in its smoke version (``--quick``): every row there, every metric finite.

The numbers of a ``--quick`` run mean nothing (a 2-layer byte Llama, a few batches of the ``asyncio``
package's source); what is checked is the whole path the full runs take: the dense pre-training, both
pruning fits (the distilled one with a token-level teacher), every method of the comparison, the
Torch-Pruning attempt (a finished loop, or a measured "not possible"), and the JSON each writes.
"""

import json
import math

import pytest
import torch

pytestmark = pytest.mark.fit


def _keep_threads(fn, *args):
    threads = torch.get_num_threads()
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)  # the benchmarks train on one thread


def test_distillation_benchmark_causal_lm_quick(tmp_path):
    from benchmarks.distillation import TASKS, main

    path = tmp_path / "distillation.json"
    args = ["--tasks", "causal_lm", "--quick", "--seeds", "1", "--root", str(tmp_path), "--json", str(path)]
    out = _keep_threads(main, args)
    saved = json.loads(path.read_text())
    assert saved["rows"] == json.loads(json.dumps(out["rows"]))
    assert saved["metrics"] == {"causal_lm": "val_ppl (min)"}
    rows = {r["variant"]: r for r in saved["rows"]}
    assert set(rows) == {"no distillation", "distillation"}
    dense_params = sum(p.numel() for p in TASKS["causal_lm"].quick().build().parameters())
    for row in rows.values():
        assert row["task"] == "causal_lm"
        assert math.isfinite(row["metric"])
        assert row["metric"] > 1.0
        assert math.isfinite(row["dense"])
        assert row["dense"] > 1.0
        assert len(row["dense_curve"]) == saved["tasks"]["causal_lm"]["pretrain_epochs"]
        assert all(math.isfinite(v) for v in row["dense_curve"])
        assert row["params"] < dense_params  # pruned
        assert row["macs"] > 0
        assert len(row["epochs_s"]) == saved["tasks"]["causal_lm"]["epochs"]
    assert rows["no distillation"]["distillation"] is None
    teacher = rows["distillation"]["distillation"]
    assert teacher["teacher_parameters"] == dense_params  # the dense copy
    assert teacher["teacher_ms_per_step"] > 0


def test_compare_benchmark_causal_lm_quick(tmp_path):
    from benchmarks.compare import METHODS, main

    path = tmp_path / "compare.json"
    args = ["--task", "causal_lm", "--quick", "--seeds", "0", "--tp-timeout", "10", "--out", str(path)]
    out = _keep_threads(main, args)
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(out))
    assert (saved["task"], saved["metric"], saved["mode"]) == ("causal_lm", "val_ppl", "min")
    rows = {r["method"]: r for r in saved["rows"]}
    assert list(rows) == list(METHODS)
    dense = rows["dense"]
    for method, row in rows.items():
        if "status" in row:  # only the Torch-Pruning methods may be impossible, and then from a real attempt
            assert method.startswith("Torch-Pruning")
            assert row["status"].startswith("not possible: ")
            assert row["attempt"]["finished"] is False
            assert row["attempt"]["seconds"] > 0
            continue
        assert math.isfinite(row["val_ppl"])
        assert row["val_ppl"] > 1.0
        assert math.isfinite(row["latency_ratio"])
        assert row["latency_ratio"] > 0
        assert row["fit_s"] > 0
    assert rows["ModelPruning l1_unstructured"]["nonzero_weights"] < dense["nonzero_weights"]
    assert rows["ModelPruning l1_unstructured"]["params"] == dense["params"]  # masks do not shrink the model
    assert rows["HierarchicalPruning defaults"]["macs"] <= 0.51 * dense["macs"]  # the target is a minimum
    assert rows["HierarchicalPruning defaults"]["params"] < dense["params"]


def test_compare_benchmark_mnist_quick_runs_torch_prunings_iterative_pruner(tmp_path):
    """The iterative pruner, stepped at the end of the same epochs as ours, reaches the same MACs as the loop."""
    from benchmarks.compare import main

    path = tmp_path / "compare.json"
    methods = ["Torch-Pruning loop", "Torch-Pruning iterative"]
    args = ["--quick", "--seeds", "0", "--epochs", "3", "--methods", *methods, "--out", str(path)]
    out = _keep_threads(main, args)
    rows = {r["method"]: r for r in out["rows"]}
    dense, iterative = rows["dense"], rows["Torch-Pruning iterative"]
    assert iterative["params"] < dense["params"]  # really smaller, not masked
    assert iterative["macs"] <= 0.5 * dense["macs"]
    assert iterative["macs"] >= 0.4 * dense["macs"]  # the ratio was searched for the target, not overshot
    assert math.isfinite(iterative["latency_ratio"])


def test_compare_benchmark_text_quick_prunes_minilm_with_every_method(tmp_path):
    """The text task: Torch-Pruning's BERT recipe runs on MiniLM (loop and iterative), ours prunes it too."""
    from benchmarks.compare import METHODS, main

    path = tmp_path / "compare.json"
    out = _keep_threads(main, ["--task", "text", "--quick", "--seeds", "0", "--out", str(path)])
    rows = {r["method"]: r for r in out["rows"]}
    assert list(rows) == list(METHODS)
    dense = rows["dense"]
    for method in ("Torch-Pruning loop", "Torch-Pruning iterative", "HierarchicalPruning defaults"):
        assert "status" not in rows[method], rows[method]
        assert rows[method]["params"] < dense["params"]
        assert rows[method]["macs"] <= 0.51 * dense["macs"]
        assert 0.0 <= rows[method]["val_acc"] <= 1.0
    assert rows["ModelPruning l1_unstructured"]["params"] == dense["params"]
