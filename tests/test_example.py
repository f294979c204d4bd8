import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fit  # every test here runs a Trainer (or a fresh process)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_digits_example_through_the_cli(tmp_path):
    """The README's main job: ``hprune fit --config examples/digits_cnn.yaml``."""
    exe = shutil.which("hprune")
    cmd = [exe] if exe else [sys.executable, "-m", "lightning_hprune.cli"]
    proc = subprocess.run(
        [*cmd, "fit", "--config", str(ROOT / "examples" / "digits_cnn.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    for word in ("before", "after", "latency", "pruning_report.html"):  # the before/after table, the report
        assert word in out
    [report_path] = glob.glob(
        str(tmp_path / "logs" / "digits_cnn" / "csv" / "version_*" / "hprune_report.json")
    )
    with open(report_path) as f:
        report = json.load(f)
    before, after = report["before"], report["after"]
    assert before["params"] > 1_000_000
    assert report["achieved"] >= 0.5  # >= 50 % of the parameters removed
    assert after["params"] <= 0.5 * before["params"]
    assert after["val_acc"] >= 0.99 * before["val_acc"]  # >= 99 % of the dense accuracy kept
    assert after["macs"] < before["macs"]
    assert after["latency_ms"] > 0
    # logs: CSV and TensorBoard both written
    assert glob.glob(str(tmp_path / "logs" / "digits_cnn" / "tensorboard" / "version_*" / "events.*"))
    ckpts = glob.glob(str(tmp_path / "logs" / "digits_cnn" / "**" / "last.ckpt"), recursive=True)
    assert ckpts
    assert os.path.getsize(ckpts[0]) > 0
    # The CLI's checkpoint (its hyper-parameters carry LightningCLI's `_class_path`) loads in a fresh process.
    code = (
        "import sys, torch; from lightning_hprune import load_pruned; "
        "from lightning_hprune.examples.digits import DigitsCNN; "
        "m = load_pruned(DigitsCNN, sys.argv[1]); "
        "print(sum(p.numel() for p in m.parameters()), tuple(m(torch.zeros(2, 1, 16, 16)).shape))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code, ckpts[0]], capture_output=True, text=True, timeout=300, check=False
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    params, shape = loaded.stdout.split(maxsplit=1)
    assert int(params) == after["params"]
    assert shape.strip() == "(2, 10)"
