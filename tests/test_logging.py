import csv
import glob
import json
import os

import lightning.pytorch as pl
import pytest

from lightning_hprune import HierarchicalPruning
from tests.helpers import TinyCNN, loaders, trainer

pytestmark = pytest.mark.fit  # every test here runs a Trainer (or a fresh process)


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _series(rows, key):
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def test_csv_and_tensorboard_series(tmp_path):
    pl.seed_everything(0)
    csv_logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    tb_logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    # L2 magnitude: this test is about the logged series; group Taylor's choice on this toy lands 3 points past
    cb = HierarchicalPruning(
        target=0.5, start_epoch=1, end_epoch=3, monitor="val_acc", verbose=False, importance="l2"
    )
    t = trainer(tmp_path, [cb], max_epochs=5, logger=[csv_logger, tb_logger])
    train, val = loaders()
    t.fit(TinyCNN(widths=(64, 64, 64)), train, val)

    rows = _read_csv(os.path.join(csv_logger.log_dir, "metrics.csv"))
    params = _series(rows, "hprune/params")
    macs = _series(rows, "hprune/macs")
    removed = _series(rows, "hprune/removed")
    event_ratio = _series(rows, "hprune/event_ratio")
    times = _series(rows, "hprune/event_time_s")
    metric = _series(rows, "hprune/val_acc")
    retained = _series(rows, "hprune/retained_val_acc")
    assert len(params) == len(macs) == len(removed) == len(event_ratio) == len(times) == 3
    assert params == sorted(params, reverse=True)  # non-increasing
    assert macs == sorted(macs, reverse=True)
    assert removed == sorted(removed)
    assert abs(removed[-1] - 0.5) <= 0.02
    assert all(0 <= r < 1 for r in event_ratio)
    # the event ratios compose to the total fraction removed
    kept = 1.0
    for r in event_ratio:
        kept *= 1 - r
    assert 1 - kept == pytest.approx(removed[-1], abs=1e-6)
    assert all(s > 0 for s in times)
    # retained = metric / metric before the first event
    assert len(metric) == len(retained) == 3
    assert retained[0] == pytest.approx(1.0)
    for m, r in zip(metric, retained, strict=True):
        assert r == pytest.approx(m / metric[0])
    # latency is measured at the ends only by default (per event: opt-in), the final values are logged
    assert _series(rows, "hprune/latency_ms") == []
    assert len(_series(rows, "hprune/final_latency_ms")) == 1
    assert _series(rows, "hprune/final_params") == [params[-1]]
    assert _series(rows, "hprune/final_removed")[0] == pytest.approx(removed[-1])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(tb_logger.log_dir, "events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(tb_logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "hprune/params",
        "hprune/macs",
        "hprune/removed",
        "hprune/retained_val_acc",
        "hprune/global/channels_removed",
    ):
        assert tag in tags
    assert [e.value for e in acc.Scalars("hprune/params")] == pytest.approx(params)

    # the end-of-fit report with before/after and the final structure lands in the log dir
    with open(os.path.join(t.log_dir, "hprune_report.json")) as f:
        report = json.load(f)
    assert report["after"]["params"] == params[-1]
    assert report["before"]["params"] > report["after"]["params"]
    assert report["structure"]["widths"]
    assert any(w["after"] < w["before"] for w in report["structure"]["widths"].values())

    # visual analysis: the curves figure is drawn from the same series
    from lightning_hprune.report import curves

    png = os.path.join(t.log_dir, "hprune_pruning_curve.png")
    assert os.path.getsize(png) > 1000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    series = curves(report)
    assert series["params"][1:] == pytest.approx(params)
    assert series["params"][0] == report["before"]["params"]
    assert series["val_acc"][:3] == pytest.approx(metric)


def test_monitor_never_logged_raises_clearly(tmp_path):
    cb = HierarchicalPruning(monitor="val_accuracy", start_epoch=0, end_epoch=0, verbose=False)
    t = trainer(tmp_path, [cb], max_epochs=1)
    train, val = loaders()
    # detected at the end of the first validation, before the event at the end of that epoch
    with pytest.raises(
        ValueError, match=r"metric 'val_accuracy'.*first validation.*logged metrics are \[.*'val_acc'"
    ):
        t.fit(TinyCNN(), train, val)
    assert t.current_epoch == 0
    assert cb.event_index == 0
