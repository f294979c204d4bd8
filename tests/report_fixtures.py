"""A real pruning summary built with the Lightning-free session (no Trainer): for the report's core tests."""

from __future__ import annotations

from typing import Any

import torch

from lightning_hprune import BlockLevel, ClosedLoop, GlobalLevel
from lightning_hprune.callbacks import reporting
from lightning_hprune.core.measure import LatencyMeasurement
from lightning_hprune.core.schedules import EventSchedule
from lightning_hprune.core.session import PruningSession
from tests.test_session import ResNet1d

#: The monitored metric the fake run "measures" after each epoch's validation (epoch 1 drops too far).
METRIC = {0: 0.90, 1: 0.80, 2: 0.89, 3: 0.885, 4: 0.888, 5: 0.89}


def closed_loop_summary(latency: bool = True) -> dict[str, Any]:
    """Prune a residual net in 4 scheduled events with a closed loop that rolls one back; return the summary."""
    torch.manual_seed(0)
    model = ResNet1d(c=32, blocks=4)
    session = PruningSession(
        [
            BlockLevel(patterns=["net.3", "net.4"], max_blocks=1, share=0.5, schedule="constant"),
            GlobalLevel(share=0.5),
        ],
        target=0.75,
        schedule=EventSchedule(start_epoch=0, end_epoch=3),
        round_to=4,
        monitor="val_acc",
        closed_loop=ClosedLoop(max_drop=0.05, max_retries=2),
        measure_latency=LatencyMeasurement(batch_size=4, warmup=1, rounds=5, repeats=2) if latency else False,
    )
    session.use_example_input(torch.randn(1, 2, 32))
    for epoch in range(6):
        session.timeline.add_metric(epoch, 10 * epoch, METRIC[epoch])
        session.judge(epoch, 10 * epoch, METRIC[epoch], max_epochs=6)
        if session.due(epoch):
            session.calibration.add(torch.randn(8, 2, 32))
            plan = session.plan(model, METRIC[epoch])
            result = session.execute(model, plan)
            record, _ = session.record(model, plan, result, epoch, 10 * epoch, METRIC[epoch], 6)
            session.timeline.add_widths(record.event, record.epoch, reporting.kept_widths(session))
    final = session.measure(model)
    return reporting.summarize(session, final, METRIC[5], model, session.final_latency(model))
