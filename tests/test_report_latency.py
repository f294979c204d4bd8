"""Latency worth quoting (core, no Trainer): quartiles, interleaved comparisons, the budget, the dense copy."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

from lightning_hprune import GlobalLevel, LatencyMeasurement
from lightning_hprune.core.measure import (
    LatencyStats,
    compare_latency,
    compare_separate,
    cpu_copy,
    latency_stats,
    quartiles,
    resolve_latency,
)
from lightning_hprune.core.schedules import EventSchedule
from lightning_hprune.core.session import PruningSession
from tests.test_session import ResNet1d


class Sleeper(nn.Module):
    """A forward pass that takes ``ms`` milliseconds (sleeping: independent of the CPU's load)."""

    def __init__(self, ms: float) -> None:
        super().__init__()
        self.ms = ms
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.ms / 1e3)
        return self.lin(x)


FAST = LatencyMeasurement(batch_size=2, warmup=1, rounds=6, repeats=2)


def test_quartiles_and_stats() -> None:
    assert quartiles([5.0]) == (5.0, 5.0, 5.0)
    assert quartiles([1, 2, 3, 4, 5]) == (2.0, 3.0, 4.0)
    s = LatencyStats.of([1, 2, 3, 4, 5])
    assert (s.median_ms, s.iqr_ms, s.samples) == (3.0, 2.0, 5)
    with pytest.raises(ValueError, match="at least one value"):
        quartiles([])


def test_settings_are_checked_and_resolved() -> None:
    assert resolve_latency(False) is None
    assert resolve_latency(True) == LatencyMeasurement()
    assert not LatencyMeasurement().per_event  # per-event latency is opt-in
    with pytest.raises(ValueError, match=r"Expected argument `rounds` to be an integer >= 2, but got 1"):
        LatencyMeasurement(rounds=1)
    with pytest.raises(ValueError, match=r"Expected argument `budget_s` to be a positive number, but got 0"):
        LatencyMeasurement(budget_s=0)
    with pytest.raises(
        ValueError, match=r"Expected argument `measure_latency` to be a bool or a `LatencyMeasurement`"
    ):
        resolve_latency("events")  # type: ignore[arg-type]


def test_interleaved_comparison_finds_the_faster_model() -> None:
    c = compare_latency(Sleeper(6.0), Sleeper(2.0), torch.zeros(1, 4), FAST)
    assert c.interleaved
    assert c.verdict == "faster"
    assert 0.2 < c.ratio < 0.6  # about 2/6, plus the linear layer and the timer's overhead
    assert c.ratio_q1 <= c.ratio <= c.ratio_q3 < 1
    assert c.dense.samples == c.pruned.samples == 12  # rounds x repeats each
    assert c.as_dict()["verdict"] == "faster"
    slower = compare_latency(Sleeper(2.0), Sleeper(6.0), torch.zeros(1, 4), FAST)
    assert slower.verdict == "slower"
    assert slower.ratio > 1.5


def test_budget_bounds_the_measurement() -> None:
    settings = LatencyMeasurement(batch_size=1, warmup=1, rounds=40, repeats=10, budget_s=0.2)
    start = time.perf_counter()
    c = compare_latency(Sleeper(5.0), Sleeper(5.0), torch.zeros(1, 4), settings)
    assert time.perf_counter() - start < 1.5  # 800 passes of 5 ms would take 4 s
    assert c.pruned.samples >= 5  # never fewer than 5 rounds
    stats = latency_stats(Sleeper(5.0), torch.zeros(1, 4), settings)
    assert 5 <= stats.samples < 400


def test_separate_measurements_are_inconclusive_when_their_spreads_overlap() -> None:
    a, b = LatencyStats(10.0, 8.0, 12.0, 10), LatencyStats(9.0, 7.0, 11.0, 10)
    c = compare_separate(a, b, "cpu", 32, 0.1, "dense_copy=False")
    assert not c.interleaved
    assert c.verdict == "inconclusive"
    assert c.ratio == pytest.approx(0.9)
    assert (c.ratio_q1, c.ratio_q3) == (pytest.approx(7 / 12), pytest.approx(11 / 8))
    clear = compare_separate(
        LatencyStats(10.0, 9.5, 10.5, 10), LatencyStats(5.0, 4.8, 5.2, 10), "cpu", 32, 0.1, ""
    )
    assert clear.verdict == "faster"


def test_cpu_copy_is_independent_and_equal() -> None:
    model = ResNet1d(c=8).eval()
    clone = cpu_copy(model)
    x = torch.randn(2, 2, 32)
    torch.testing.assert_close(clone(x), model(x))
    ours = {p.data_ptr() for p in model.parameters()}
    assert not ours & {p.data_ptr() for p in clone.parameters()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(next(model.parameters()), next(clone.parameters()))


def _session(latency: bool | LatencyMeasurement) -> tuple[PruningSession, nn.Module]:
    torch.manual_seed(0)
    model = ResNet1d(c=16)
    session = PruningSession(
        [GlobalLevel()], target=0.5, schedule=EventSchedule(0, 1), round_to=4, measure_latency=latency
    )
    session.use_example_input(torch.randn(1, 2, 32))
    for epoch in range(2):
        plan = session.plan(model)
        result = session.execute(model, plan)
        session.record(model, plan, result, epoch, epoch)
    return session, model


def test_session_measures_at_the_ends_by_default_and_per_event_on_request() -> None:
    session, model = _session(FAST)
    assert {"dense_latency_ms", "dense_latency_q1_ms", "dense_latency_q3_ms"} <= set(session.ledger.baseline)
    assert all("latency_ms" not in r.measured for r in session.ledger.records)  # off per event
    assert session.dense_copy is not None  # the CPU copy for the end
    final = session.final_latency(model)
    assert final is not None
    assert final.interleaved
    assert final.dense.samples == final.pruned.samples == 12
    assert session.dense_copy is None  # released after the measurement
    assert session.latency_seconds > 0

    per_event, _ = _session(LatencyMeasurement(batch_size=2, warmup=1, rounds=3, repeats=1, per_event=True))
    assert all(
        r.measured["latency_q1_ms"] <= r.measured["latency_ms"] <= r.measured["latency_q3_ms"]
        for r in per_event.ledger.records
    )

    off, model = _session(False)
    assert "dense_latency_ms" not in off.ledger.baseline
    assert off.dense_copy is None
    assert off.final_latency(model) is None


def test_without_the_dense_copy_the_end_is_compared_with_the_start_and_says_so() -> None:
    session, model = _session(
        LatencyMeasurement(batch_size=2, warmup=1, rounds=4, repeats=2, dense_copy=False)
    )
    assert session.dense_copy is None
    final = session.final_latency(model)
    assert final is not None
    assert not final.interleaved
    assert "not interleaved (dense_copy=False)" in final.note
    assert final.dense.median_ms == session.ledger.baseline["dense_latency_ms"]
