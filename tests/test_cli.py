from pathlib import Path

import pytest
import yaml

from lightning_hprune import HierarchicalPruning
from lightning_hprune.cli import build_cli

pytestmark = pytest.mark.fit  # every test here runs a Trainer (or a fresh process)

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_configures_model_data_and_callback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(ROOT / "examples" / "digits_cnn.yaml")], run=False)
    [cb] = [c for c in cli.trainer.callbacks if isinstance(c, HierarchicalPruning)]
    assert cb.target == 0.5
    assert cb.cost == "params"
    assert cb.monitor == "val_acc"
    assert (cb.start_epoch, cb.end_epoch) == (3, 8)
    assert type(cli.model).__name__ == "DigitsCNN"


def test_cli_runs_a_short_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((ROOT / "examples" / "digits_cnn.yaml").read_text())
    config["trainer"]["max_epochs"] = 2
    config["data"]["init_args"]["limit"] = 128
    config["trainer"]["callbacks"][0]["init_args"].update(start_epoch=0, end_epoch=0, target=0.3)
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path)])
    [cb] = [c for c in cli.trainer.callbacks if isinstance(c, HierarchicalPruning)]
    assert cb.event_index == 1
    assert cb.records[-1]["removed"] == pytest.approx(0.3, abs=0.02)


def test_cli_rejects_bad_callback_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((ROOT / "examples" / "digits_cnn.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["target"] = 1.5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(
        ValueError, match=r"Expected argument `target` to be a float in \(0, 1\), but got 1.5"
    ):
        build_cli(["--config", str(path)], run=False)
