"""Errors found on the way, each moved earlier or made exact (real Trainer runs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_hprune import HierarchicalPruning
from tests.helpers import TinyCNN, loaders, trainer

pytestmark = pytest.mark.fit


class EpochMetric(TinyCNN):
    """Monitors a metric that the training step logs per epoch (it reaches callback_metrics after validation)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_epoch_loss", loss, on_step=False, on_epoch=True)
        return loss


def test_a_training_epoch_metric_is_not_a_false_alarm(tmp_path):
    cb = HierarchicalPruning(
        target=0.3, monitor="train_epoch_loss", mode="min", start_epoch=0, end_epoch=0, verbose=False
    )
    t = trainer(tmp_path, [cb], max_epochs=1)
    train, val = loaders(n=32)
    t.fit(EpochMetric(), train, val)
    assert cb.event_index == 1


class DictForward(TinyCNN):
    """``forward`` takes the whole batch dict."""

    def forward(self, batch):
        return super().forward(batch["pixels"])

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch), batch["label"])
        return loss


def test_a_dict_batch_taken_whole_is_refused_with_the_one_tuple_form(tmp_path):
    samples = [{"pixels": torch.randn(3, 8, 8), "label": i % 4} for i in range(8)]
    model = DictForward(set_example_input=False)
    t = trainer(tmp_path, [HierarchicalPruning(verbose=False)], max_epochs=1)
    with pytest.raises(
        ValueError,
        match=r"dict \('pixels', 'label'\) that `forward` takes whole.*example_input_array = \(\{'pixels': x, \.\.\.\},\)",
    ):
        t.fit(model, DataLoader(samples, batch_size=4))
    assert t.global_step == 0  # found when the example input was chosen, before a training step
    # ...and the suggested form works
    model = DictForward(set_example_input=False)
    model.example_input_array = ({"pixels": torch.zeros(1, 3, 8, 8)},)
    cb = HierarchicalPruning(target=0.3, start_epoch=0, end_epoch=0, verbose=False)
    t = trainer(tmp_path, [cb], max_epochs=1)
    t.fit(model, DataLoader(samples, batch_size=4))
    assert cb.event_index == 1


def test_load_from_checkpoint_of_a_pruned_model_points_at_load_pruned(tmp_path):
    cb = HierarchicalPruning(target=0.5, start_epoch=0, end_epoch=0, verbose=False, measure_latency=False)
    t = trainer(tmp_path, [cb], max_epochs=1, enable_checkpointing=True)
    train, val = loaders(n=32)
    t.fit(TinyCNN(), train, val)
    path = t.checkpoint_callback.best_model_path
    checkpoint = torch.load(path, weights_only=True)
    hint = checkpoint["lightning_hprune"]["how_to_load"]
    assert "lightning_hprune.load_pruned(MyModule, path)" in hint
    assert "restore_structure" in hint
    with pytest.raises(RuntimeError, match="size mismatch"):
        TinyCNN.load_from_checkpoint(path)  # what the hint (and docs/faq.md) is for
