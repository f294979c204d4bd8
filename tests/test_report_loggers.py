"""Figures and the report in the user's loggers, read back from their files (real Trainer runs)."""

from __future__ import annotations

import csv
import glob
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import lightning.pytorch as pl
import pytest
from PIL import Image

from lightning_hprune import HierarchicalPruning, LatencyMeasurement
from lightning_hprune.report import HTML_NAME, JSON_NAME
from lightning_hprune.report.tables import fmt_count
from tests.helpers import TinyCNN, loaders, trainer

pytestmark = pytest.mark.fit

FIGURES = {"pruning_curve", "over_epochs", "hierarchy"}
LATENCY = LatencyMeasurement(batch_size=8, warmup=1, rounds=5, repeats=2)


def _callback(**kwargs):
    return HierarchicalPruning(
        target=0.5,
        start_epoch=0,
        end_epoch=1,
        monitor="val_acc",
        round_to=4,
        measure_latency=LATENCY,
        **kwargs,
    )


def _last(rows, key):
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return values[-1] if values else None


def _png_ok(path) -> None:
    with Image.open(path) as img:
        img.load()
        assert img.width >= 600
        assert len(img.convert("RGB").getcolors(1 << 20) or []) > 50


def test_figures_reach_tensorboard_mlflow_wandb_and_files(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.setenv(
        "MLFLOW_ALLOW_FILE_STORE", "true"
    )  # the local file store (mlflow 3 prefers a database)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    pl.seed_everything(0)
    csv_logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    tb = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    mlflow = pl.loggers.MLFlowLogger(experiment_name="hprune", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    wandb = pl.loggers.WandbLogger(project="hprune", save_dir=str(tmp_path), offline=True)
    cb = _callback()
    t = trainer(tmp_path, [cb], max_epochs=3, logger=[csv_logger, tb, mlflow, wandb])
    train, val = loaders(n=64)
    t.fit(TinyCNN(widths=(32, 32, 32)), train, val)
    wandb_dir = Path(wandb.experiment.dir)
    wandb.experiment.finish()

    # the run's directory is the first TensorBoard/CSV logger's log_dir: the report and every figure
    run = Path(csv_logger.log_dir)
    report = json.loads((run / JSON_NAME).read_text())
    for name in FIGURES:
        _png_ok(run / f"hprune_{name}.png")  # drawn because TensorBoard, MLflow and W&B take images
        svg = ET.parse(run / f"hprune_{name}.svg").getroot()
        assert svg.get("data-figure") == name
        assert svg.findall(".//{http://www.w3.org/2000/svg}g[@class='series']") or name == "hierarchy"
    assert not list(tmp_path.glob("hprune_*"))  # nothing in the current directory

    # the report's numbers are the logged ones
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert report["after"]["params"] == _last(rows, "hprune/final_params")
    assert report["after"]["macs"] == _last(rows, "hprune/final_macs")
    assert report["achieved"] == pytest.approx(_last(rows, "hprune/final_removed"))
    assert report["after"]["val_acc"] == pytest.approx(_last(rows, "hprune/final_val_acc"))
    lat = report["latency"]
    assert lat["interleaved"]
    assert lat["pruned"]["median_ms"] == pytest.approx(_last(rows, "hprune/final_latency_ms"))
    assert lat["dense"]["median_ms"] == pytest.approx(_last(rows, "hprune/final_dense_latency_ms"))
    assert lat["ratio"] == pytest.approx(_last(rows, "hprune/final_latency_ratio"))
    assert lat["ratio_q1"] <= lat["ratio"] <= lat["ratio_q3"]
    assert [e["params"] for e in report["events_log"]] == [
        float(r["hprune/params"]) for r in rows if r.get("hprune/params")
    ]
    page = (run / HTML_NAME).read_text()
    assert fmt_count(_last(rows, "hprune/final_params")) in page
    assert f"{_last(rows, 'hprune/final_latency_ratio'):.3f}" in page

    # TensorBoard: the images are in the event file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert {f"hprune/{n}" for n in FIGURES} <= set(acc.Tags()["images"])
    image = acc.Images("hprune/pruning_curve")[-1]
    assert image.width >= 600
    assert image.height >= 300
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"

    # MLflow's local file store: the figures and the report as the run's artifacts
    artifacts = Path(mlflow.save_dir) / mlflow.experiment_id / mlflow.run_id / "artifacts" / "hprune"
    for name in FIGURES:
        _png_ok(artifacts / f"{name}.png")
    assert json.loads((artifacts / JSON_NAME).read_text())["after"] == report["after"]
    assert (artifacts / HTML_NAME).read_text() == page

    # W&B offline run: the images as media files, the report as run files, the images in the history
    media = glob.glob(str(wandb_dir / "media" / "images" / "hprune" / "*.png"))
    assert {os.path.basename(p).split("_")[0] for p in media} >= {"pruning", "over", "hierarchy"}
    for path in media:
        _png_ok(path)
    assert json.loads((wandb_dir / JSON_NAME).read_text())["after"] == report["after"]
    # the run's record file (what `wandb sync` uploads) logs the images under their keys
    [records] = glob.glob(str(wandb_dir.parent / "run-*.wandb"))
    data = Path(records).read_bytes()
    for name in FIGURES:
        assert f"hprune/{name}".encode() in data
        assert f"media/images/hprune/{name}_".encode() in data
    assert b"images/separated" in data
    assert b"hprune/final_params" in data


def _bare_trainer(**kwargs):
    return pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def test_without_a_logger_the_report_goes_to_a_run_directory_not_the_current_one(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    train, val = loaders(n=32)
    for expected in ("version_0", "version_1"):  # one directory per run
        t = _bare_trainer(callbacks=[_callback()], default_root_dir=str(tmp_path / "root"))
        t.fit(TinyCNN(), train, val)
        run = tmp_path / "root" / "hprune_logs" / expected
        assert (run / JSON_NAME).is_file()
        assert (run / HTML_NAME).is_file()
        assert {p.name for p in run.glob("hprune_*.svg")} == {f"hprune_{n}.svg" for n in FIGURES}
        assert list(run.glob("*.png")) == []  # no logger takes images: no matplotlib figure is drawn
    assert list(work.iterdir()) == []  # nothing in the current directory
    # no logger and no default_root_dir: Lightning's root is the current directory; still a run directory
    t = _bare_trainer(callbacks=[_callback()])
    t.fit(TinyCNN(), train, val)
    assert [p.name for p in work.iterdir()] == ["hprune_logs"]
    assert (work / "hprune_logs" / "version_0" / HTML_NAME).is_file()


def test_png_figures_asks_for_the_png_files_without_an_image_logger(tmp_path):
    train, val = loaders(n=32)
    t = _bare_trainer(callbacks=[_callback(png_figures=True)], default_root_dir=str(tmp_path))
    t.fit(TinyCNN(), train, val)
    run = tmp_path / "hprune_logs" / "version_0"
    for name in FIGURES:
        _png_ok(run / f"hprune_{name}.png")
        assert (run / f"hprune_{name}.svg").is_file()
    report = json.loads((run / JSON_NAME).read_text())
    assert report["files"]["figures"]["pruning_curve"] == {
        "svg": "hprune_pruning_curve.svg",
        "png": "hprune_pruning_curve.png",
    }
    with pytest.raises(ValueError, match=r"`png_figures` to be a bool, but got 'yes'"):
        _callback(png_figures="yes")
