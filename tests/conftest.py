"""Test-suite settings: one intra-op thread per process; Trainer fits are marked.

The suite runs on 2 cores and some tests start two DDP processes; with several OpenMP threads per
process the cores are oversubscribed and small training steps became ~20x slower.

Tests that build a Lightning ``Trainer`` or start a fresh Python process carry ``@pytest.mark.fit``; the
others are the core tests (``pytest -m "not fit"``, a few seconds). An unmarked test that builds a
Trainer or starts a process fails, so the split stays true.
"""

import os
import subprocess
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fits_are_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("fit") is None:

        def refuse(what: str) -> Any:
            def guard(*args: Any, **kwargs: Any) -> None:
                raise AssertionError(f"{request.node.nodeid} {what}: mark it `@pytest.mark.fit`.")

            return guard

        monkeypatch.setattr(pl.Trainer, "__init__", refuse("builds a Lightning Trainer"))
        monkeypatch.setattr(subprocess.Popen, "__init__", refuse("starts a process"))
