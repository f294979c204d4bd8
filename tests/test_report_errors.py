"""Errors found on the way, each moved earlier or made exact (real Trainer runs)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
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


class TwoInputs(TinyCNN):
    """``forward`` needs two inputs, keyword-only or positional, as ``example_input_array`` says."""

    def __init__(self, form: str) -> None:
        super().__init__(set_example_input=False)
        self.form = form
        x, scale = torch.zeros(1, 3, 8, 8), torch.ones(1, 1, 1, 1)
        self.example_input_array = {"x": x, "scale": scale} if form == "dict" else (x, scale)

    def forward(self, *args, **kwargs):
        if self.form == "dict":
            assert not args, "called positionally"  # what calibration did: forward(batch["x"])
            x, scale = kwargs["x"], kwargs["scale"]
        else:
            x, scale = args  # calibration did forward(batch[0]): "not enough values to unpack"
        return super().forward(x * scale)

    def training_step(self, batch, batch_idx):
        if self.form == "dict":
            return F.cross_entropy(self(x=batch["x"], scale=batch["scale"]), batch["label"])
        x, scale, label = batch
        return F.cross_entropy(self(x, scale), label)


@pytest.mark.parametrize("form", ["dict", "tuple"])
def test_calibration_batches_reach_forward_as_the_example_input_does(form, tmp_path):
    """Block scores and activation criteria run the kept training batches through the model: they are kept in
    the example input's form (keyword arguments, positional arguments), not as the one tensor the example-input
    rule takes from a batch."""
    samples = [(torch.randn(3, 8, 8), torch.ones(1, 1, 1), i % 4) for i in range(8)]
    if form == "dict":
        samples = [{"x": x, "scale": s, "label": y} for x, s, y in samples]
    cb = HierarchicalPruning(target=0.3, importance="activation", start_epoch=0, end_epoch=0, verbose=False)
    t = trainer(tmp_path, [cb], max_epochs=1)
    t.fit(TwoInputs(form), DataLoader(samples, batch_size=4))
    assert cb.event_index == 1


def test_a_batch_of_another_form_than_the_example_input_is_not_kept_for_calibration():
    from lightning_hprune.callbacks.inputs import calibration_from_batch

    x, m = torch.zeros(4, 6, dtype=torch.long), torch.ones(4, 6, dtype=torch.long)
    example = {"input_ids": x[:1], "attention_mask": m[:1]}
    batch = {"input_ids": x, "attention_mask": m, "labels": x}
    assert calibration_from_batch(batch, example).keys() == {"input_ids", "attention_mask"}
    assert calibration_from_batch((x, m), example) is None  # keys unknown: the example input is used
    assert calibration_from_batch((x, m, x[:, 0]), (x[:1], m[:1])) == (x, m)
    assert calibration_from_batch((x, x[:, 0]), (x[:1], m[:1])) is None  # a label, not a second input
    assert calibration_from_batch(batch, ({"input_ids": x[:1]},)) == ({"input_ids": x},)
    assert calibration_from_batch((x, m), x[:1]) is x  # a tensor example: the documented rule
    # one keyword argument (`forward(input_ids)` with `example_input_array = {"input_ids": ...}`) and batches of
    # bare token ids: the tensor is that argument, when dtype and dimensions agree
    assert calibration_from_batch(x, {"input_ids": x[:1]})["input_ids"] is x
    assert calibration_from_batch((x, m), {"input_ids": x[:1]})["input_ids"] is x
    assert calibration_from_batch(x.float(), {"input_ids": x[:1]}) is None
    assert calibration_from_batch(x[0], {"input_ids": x[:1]}) is None


class OnlyKeyword(pl.LightningModule):
    """`forward(*, input_ids)` called with a one-key `example_input_array`; batches are bare tensors of ids."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 16)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
        self.example_input_array = {"input_ids": torch.zeros(1, 6, dtype=torch.long)}
        self.seen: list[int] = []

    def forward(self, *, input_ids: torch.Tensor) -> torch.Tensor:
        self.seen.append(int(input_ids.shape[0]))
        return self.net(self.emb(input_ids))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self(input_ids=batch)
        return F.cross_entropy(logits.reshape(-1, 16), batch.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_activation_criteria_take_tensor_batches_for_a_one_keyword_example_input(tmp_path):
    """The causal LM's form (bare tensor batches, `{"input_ids": ...}` example): calibration is kept, no failure."""
    ids = torch.randint(0, 16, (16, 6), generator=torch.Generator().manual_seed(0))
    model = OnlyKeyword()
    cb = HierarchicalPruning(
        target=0.3,
        importance="activation",
        start_epoch=0,
        end_epoch=0,
        measure_latency=False,
        verbose=False,
        round_to=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "scores from the example input alone" fallback
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|log_every_n).*")
        trainer(tmp_path, [cb], max_epochs=1).fit(model, DataLoader(ids, batch_size=4))
    assert cb.event_index == 1
    assert cb.records[-1]["removed"] > 0.25
    assert (
        4 in model.seen[-3:]
    )  # the event ran kept training batches (batch 4), not only the 1-sample example
