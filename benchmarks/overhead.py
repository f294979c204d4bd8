"""The pruning callback's own cost: its share of fit wall time, hook by hook, and one event against model size.

    OMP_NUM_THREADS=1 python benchmarks/overhead.py                 # both parts (a few minutes on 2 CPU cores)
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --part fit --runs 2 --max-epochs 14
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --part events --sizes resnet18 tiny small

Part ``fit``: the bundled digits example (``examples/digits_cnn.py``: ``DigitsCNN`` on scikit-learn's digits,
``HierarchicalPruning(target=0.5, cost="params", start_epoch=3, end_epoch=8, monitor="val_acc")`` with every
other argument at its default, 14 epochs, a CSV logger and Lightning's default checkpointing). Every hook
method of the callback instance is wrapped with a timer, and so are the pieces inside them: calibration
capture (``Calibration.add``), criterion accumulation (``Importance.on_before_optimizer_step``), events
(``PruningCallback._event``), latency measurement (the session's own ``latency_seconds``: the dense model
before the first event and the end-of-fit interleaved comparison), logging (``reporting.log_event``,
``log_decision``, ``log_validation``), within it the width snapshot (``reporting.kept_widths``: the channel
groups of the model the event left, which the next event reuses), and the end-of-fit report
(``reporting.finish`` without its latency measurement; within it ``write_report_files``). The rows are
disjoint (nested pieces are counted once, where they are listed) and add up to all hooks. The table gives
each one's seconds and share of ``trainer.fit``'s wall time, as mean and range over ``--runs`` runs; the JSON
also keeps the end-of-fit latency ratio with its spread and the files the report wrote.

Part ``events``: one event's wall time and peak extra resident memory against model size, from a
torchvision ResNet-18 to Llama decoders (``benchmarks/event_scaling.py``), with the log-log growth slope.

Writes ``benchmarks/results/overhead.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))

from lightning_hprune import HierarchicalPruning
from lightning_hprune.callbacks import base as callback_base
from lightning_hprune.callbacks import reporting
from lightning_hprune.examples.digits import DigitsCNN, DigitsDataModule

#: Lightning hooks the pruning callback defines (each one is timed on the instance).
HOOKS = (
    "setup",
    "on_fit_start",
    "on_train_batch_start",
    "on_before_optimizer_step",
    "on_train_epoch_end",
    "on_validation_end",
    "on_save_checkpoint",
    "state_dict",
    "on_train_end",
    "teardown",
)
#: The logging functions of ``lightning_hprune.callbacks.reporting`` the hooks call.
LOGGING = ("log_event", "log_decision", "log_validation")


class Timers:
    """Accumulated wall time and call count per label; ``inside`` also books a call under ``label in outer``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.active: list[str] = []

    def wrap(self, label: str, fn: Callable[..., Any], inside: tuple[str, ...] = ()) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            outer = [o for o in inside if o in self.active]
            self.active.append(label)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.active.pop()
                self.seconds[label] += spent
                self.calls[label] += 1
                for o in outer:
                    self.seconds[f"{label} in {o}"] += spent
                    self.calls[f"{label} in {o}"] += 1

        return timed


def fit_once(max_epochs: int, root: str) -> dict[str, Any]:
    """One run of the digits example with every hook and piece of the callback timed."""
    timers = Timers()
    pl.seed_everything(0, verbose=False)
    cb = HierarchicalPruning(
        target=0.5, cost="params", start_epoch=3, end_epoch=8, monitor="val_acc", verbose=False
    )
    for hook in HOOKS:
        setattr(cb, hook, timers.wrap(f"hook {hook}", getattr(cb, hook)))
    cb._event = timers.wrap("event (all of it)", cb._event)  # type: ignore[method-assign]
    session = cb.session
    session.calibration.add = timers.wrap("calibration capture", session.calibration.add)  # type: ignore[method-assign]
    imp = session.importance
    imp.on_before_optimizer_step = timers.wrap("criterion accumulation", imp.on_before_optimizer_step)  # type: ignore[method-assign]
    originals = {
        name: getattr(reporting, name) for name in (*LOGGING, "finish", "kept_widths", "write_report_files")
    }
    for name in LOGGING:
        setattr(reporting, name, timers.wrap("logging", originals[name], inside=("event (all of it)",)))
    reporting.kept_widths = timers.wrap("kept widths", originals["kept_widths"], inside=("logging",))  # type: ignore[assignment]
    reporting.finish = timers.wrap("end-of-fit report (all of it)", originals["finish"])  # type: ignore[assignment]
    reporting.write_report_files = timers.wrap("report files", originals["write_report_files"])  # type: ignore[assignment]
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[cb],
        logger=pl.loggers.CSVLogger(root, name="csv"),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        default_root_dir=root,
    )
    try:
        start = time.perf_counter()
        trainer.fit(DigitsCNN(), DigitsDataModule())
        fit_s = time.perf_counter() - start
    finally:
        for name, fn in originals.items():
            setattr(reporting, name, fn)
    assert callback_base.reporting is reporting
    s = dict(timers.seconds)
    latency = session.latency_seconds
    in_events = float(getattr(session, "_overhead_event_latency", 0.0))  # the dense baseline, in `plan`
    hooks_total = sum(v for k, v in s.items() if k.startswith("hook "))
    snapshot = s.get("kept widths in logging", 0.0)
    rows = {
        "batch hooks (on_train_batch_start + on_before_optimizer_step)": s.get(
            "hook on_train_batch_start", 0.0
        )
        + s.get("hook on_before_optimizer_step", 0.0),
        "  of which calibration capture": s.get("calibration capture", 0.0),
        "  of which criterion accumulation": s.get("criterion accumulation", 0.0),
        "events (without the dense latency before the first, the width snapshot and logging)": s.get(
            "event (all of it)", 0.0
        )
        - in_events
        - s.get("logging in event (all of it)", 0.0),
        "width snapshot after each event (channel regrouping, reused by the next event)": snapshot,
        "logging (metrics to the loggers, the timeline)": s.get("logging", 0.0) - snapshot,
        "latency measurement (dense before the first event + end of fit)": latency,
        "end-of-fit report (without latency)": s.get("end-of-fit report (all of it)", 0.0)
        - (latency - in_events),
        "  of which report files (SVG figures, HTML, JSON)": s.get("report files", 0.0),
        "set-up, tracing, checkpoint state (setup, on_fit_start, state_dict, ...)": s.get("hook setup", 0.0)
        + s.get("hook on_fit_start", 0.0)
        + s.get("hook state_dict", 0.0)
        + s.get("hook on_save_checkpoint", 0.0)
        + s.get("hook teardown", 0.0),
    }
    counted = sum(v for k, v in rows.items() if not k.startswith("  "))
    rows["rest of the hooks (validation-end and epoch-end checks)"] = hooks_total - counted
    rows["all hooks of the callback"] = hooks_total
    lat = cb.summary.get("latency") or {}
    return {
        "fit_s": fit_s,
        "rows": rows,
        "raw": s,
        "calls": dict(timers.calls),
        "latency_s": latency,
        "latency": {
            k: lat.get(k)
            for k in ("ratio", "ratio_q1", "ratio_q3", "verdict", "interleaved", "dense", "pruned")
        },
        "baseline_latency": cb.summary.get("baseline_latency"),
        "report_files": sorted(os.listdir(reporting.run_dir(trainer))),
        "events": len(cb.records),
        "achieved": cb.summary.get("achieved"),
        "val_acc": cb.summary.get("after", {}).get("val_acc"),
    }


def patch_latency_split() -> Callable[[], None]:
    """Record how much of the session's latency time is spent inside events (the baseline measurement)."""
    from lightning_hprune.core.session import PruningSession

    original = PruningSession.plan

    def plan(self: PruningSession, *args: Any, **kwargs: Any) -> Any:
        before = self.latency_seconds
        try:
            return original(self, *args, **kwargs)
        finally:
            self._overhead_event_latency = getattr(self, "_overhead_event_latency", 0.0) + (  # type: ignore[attr-defined]
                self.latency_seconds - before
            )

    PruningSession.plan = plan  # type: ignore[method-assign]

    def undo() -> None:
        PruningSession.plan = original  # type: ignore[method-assign]

    return undo


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fit_part(runs: int, max_epochs: int) -> dict[str, Any]:
    undo = patch_latency_split()
    try:
        results = []
        for r in range(runs):
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            with tempfile.TemporaryDirectory() as root:
                results.append(fit_once(max_epochs, root))
            # the machine is shared: the 1-minute load average before and after the run says how busy it was
            results[-1]["load_average"] = [load, os.getloadavg()[0] if load is not None else None]
            print(
                f"run {r}: fit {results[-1]['fit_s']:.1f} s, callback {results[-1]['rows']['all hooks of the callback']:.2f} s, "
                f"load average {results[-1]['load_average']}",
                flush=True,
            )
    finally:
        undo()
    return {"runs": results, "max_epochs": max_epochs}


def fit_table(part: dict[str, Any]) -> str:
    runs = part["runs"]
    lines = [
        "| what | seconds (mean, range) | share of fit time (mean, range) |",
        "|---|---|---|",
    ]
    fit = [r["fit_s"] for r in runs]
    lines.append(f"| `trainer.fit` | {statistics.mean(fit):.1f} ({min(fit):.1f}-{max(fit):.1f}) | 100 % |")
    for label in runs[0]["rows"]:
        secs = [r["rows"][label] for r in runs]
        shares = [100 * r["rows"][label] / r["fit_s"] for r in runs]
        name = label.replace("  of which", "&nbsp;&nbsp;of which")
        bold = "**" if label.startswith("all hooks") else ""
        lines.append(
            f"| {bold}{name}{bold} | {bold}{statistics.mean(secs):.3f} ({min(secs):.3f}-{max(secs):.3f}){bold} | "
            f"{bold}{statistics.mean(shares):.2f} % ({min(shares):.2f}-{max(shares):.2f}){bold} |"
        )
    return "\n".join(lines)


def events_part(sizes: list[str], dtype: str) -> dict[str, Any]:
    import event_scaling

    rows = []
    for s in sizes:
        rows.append(event_scaling.one(s, getattr(torch, dtype), 16))
        print(f"{s}: {rows[-1]['event_s']:.1f} s", flush=True)
    return {"rows": rows, "slope": event_scaling.slope(rows), "dtype": dtype}


def main() -> None:
    import event_scaling

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["fit", "events", "both"], default="both")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=14)
    parser.add_argument(
        "--sizes", nargs="+", default=["resnet18", "tiny", "small"], choices=list(event_scaling.BUILDERS)
    )
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out: dict[str, Any] = {
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "command": " ".join(["python", *sys.argv]),
    }
    if Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        out = {**{k: v for k, v in previous.items() if k in ("fit", "events")}, **out}
    if args.part in ("fit", "both"):
        out["fit"] = {**fit_part(args.runs, args.max_epochs), "command": out["command"]}
    if args.part in ("events", "both"):
        out["events"] = {**events_part(args.sizes, args.dtype), "command": out["command"]}
    print(f"machine: {out['machine']}")
    if "fit" in out:
        print(
            f"\n## Share of fit time (digits example, {out['fit']['max_epochs']} epochs, {len(out['fit']['runs'])} runs)\n"
        )
        print(fit_table(out["fit"]))
    if "events" in out:
        print(f"\n## One event against model size ({out['events']['dtype']})\n")
        print(event_scaling.table(out["events"]["rows"]))
        if out["events"]["slope"] is not None:
            print(f"\nevent time grows as params^{out['events']['slope']:.2f} (log-log slope)")
        mem = event_scaling.slope(out["events"]["rows"], "peak_extra_bytes")
        if mem is not None and math.isfinite(mem):
            print(f"peak extra memory grows as params^{mem:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
