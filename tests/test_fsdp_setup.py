"""Sharded strategies in ``setup``: what is supported, what is refused (and how), before any training step.

The checks only read the strategy, so real strategy objects are handed to ``setup`` with a stand-in
Trainer (no processes are started; FSDP1 cannot even build a Trainer on a CPU machine).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lightning_hprune import ClosedLoop, HierarchicalPruning
from tests.helpers import TinyCNN


def _setup(strategy: Any, **kwargs: Any) -> tuple[HierarchicalPruning, TinyCNN]:
    cb = HierarchicalPruning(**{"target": 0.5, "measure_latency": False, "verbose": False, **kwargs})
    model = TinyCNN()
    trainer = SimpleNamespace(strategy=strategy, callbacks=[cb], max_epochs=4, is_global_zero=True)
    cb.setup(trainer, model, "fit")  # type: ignore[arg-type]
    return cb, model


def _fsdp2() -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def test_fsdp2_under_model_parallel_strategy_is_set_up_to_rebuild_inside_the_strategys_loading() -> None:
    strategy = _fsdp2()
    original = strategy.load_checkpoint
    cb, model = _setup(strategy)
    # The strategy loads the weights itself (after `configure_model`): the structure is rebuilt there.
    assert "load_checkpoint" in vars(strategy)
    assert strategy.load_checkpoint != original
    assert "on_load_checkpoint" not in vars(model)  # not the single-device hook
    cb.teardown(SimpleNamespace(strategy=strategy), model, "fit")  # type: ignore[arg-type]
    assert "load_checkpoint" not in vars(strategy)


def test_tensor_parallelism_is_refused_in_setup() -> None:
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    with pytest.raises(
        RuntimeError, match=r"expected `tensor_parallel_size=1`, got 2.*tensor_parallel_size=1\) while"
    ):
        _setup(strategy)
    assert "load_checkpoint" not in vars(strategy)


def test_closed_loop_with_fsdp2_is_refused_in_setup() -> None:
    with pytest.raises(
        RuntimeError, match=r"closed_loop=\.\.\.\) is not supported with ModelParallelStrategy"
    ):
        _setup(_fsdp2(), monitor="val_acc", closed_loop=ClosedLoop(max_drop=0.05))


@pytest.mark.parametrize("importance", ["taylor", {"criteria": ["taylor", "l2"]}])
def test_criteria_with_gradient_statistics_are_refused_with_fsdp2(importance: Any) -> None:
    if isinstance(importance, dict):
        from lightning_hprune.core.importance import IntegratedImportance

        importance = IntegratedImportance(**importance)
    with pytest.raises(
        RuntimeError, match=r"gradient statistics would be gathered from sharded gradients.*'l2'"
    ):
        _setup(_fsdp2(), importance=importance)


def test_criteria_without_training_statistics_are_accepted_with_fsdp2() -> None:
    for importance in ("l1", "l2", "activation", "bn_scale", "random"):
        _setup(_fsdp2(), importance=importance)


def test_fsdp1_is_refused_in_setup_pointing_to_fsdp2() -> None:
    with pytest.raises(
        RuntimeError,
        match=r"FSDPStrategy strategy \(FSDP1's flat parameters.*ModelParallelStrategy\(.*fully_shard",
    ):
        _setup(FSDPStrategy())
