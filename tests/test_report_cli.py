"""The command line: the default hierarchy is visible in --print_config, every option in --help."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_hprune.cli import main

pytestmark = pytest.mark.fit  # LightningCLI

ROOT = Path(__file__).resolve().parents[1]


def test_print_config_shows_the_default_hierarchy(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "examples" / "digits_cnn.yaml"), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    [pruning] = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("HierarchicalPruning")]
    levels = pruning["init_args"]["levels"]
    assert [lv["class_path"] for lv in levels] == [
        "lightning_hprune.core.blocks.BlockLevel",
        "lightning_hprune.core.levels.GlobalLevel",
    ]
    assert [lv["init_args"]["share"] for lv in levels] == [0.25, 0.75]
    assert pruning["init_args"]["measure_latency"] is True


def test_callback_help_lists_every_option(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--trainer.callbacks.help", "HierarchicalPruning"])
    out = capsys.readouterr().out
    for option in (
        "levels",
        "target",
        "monitor",
        "closed_loop",
        "sensitivity",
        "measure_latency",
        "png_figures",
    ):
        assert f"--trainer.callbacks.{option}" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "hprune report LOG_DIR" in capsys.readouterr().out
