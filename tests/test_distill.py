"""The Lightning-free parts of distillation: the loss, finding logits, the teacher copy, capture, channel maps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_hprune import Distillation, HiddenStates
from lightning_hprune.core.distill import (
    ChannelMaps,
    DistillationError,
    ForwardCapture,
    find_argument,
    fingerprint,
    frozen_copy,
    hidden_loss,
    logit_loss,
    logits_of,
    tensor_bytes,
    token_mask,
)
from lightning_hprune.core.graph import PruningGraph


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """KL(p_t || p_s) per row, written out."""
    p_t = torch.softmax(teacher / t, -1)
    return (p_t * (torch.log(p_t) - torch.log_softmax(student / t, -1))).sum(-1)


def test_logit_loss_is_t_squared_kl_averaged_over_samples() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    expected = 3.0**2 * reference_kl(s, t, 3.0).mean()
    torch.testing.assert_close(logit_loss(s, t, 3.0), expected)
    assert float(logit_loss(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    # gradients reach the student only
    s.requires_grad_(True)
    t.requires_grad_(True)
    logit_loss(s, t, 2.0).backward()
    assert s.grad is not None
    assert t.grad is None


def test_token_level_loss_averages_over_the_real_tokens_only() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 11, generator=g), torch.randn(2, 4, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    kl = reference_kl(s, t, 1.0)
    expected = (kl * mask).sum() / mask.sum()
    torch.testing.assert_close(logit_loss(s, t, 1.0, token_mask(s, mask)), expected)
    # a padded position's logits do not matter
    s2 = s.clone()
    s2[0, 3] += 100.0
    torch.testing.assert_close(logit_loss(s2, t, 1.0, token_mask(s2, mask)), expected)
    with pytest.raises(DistillationError, match=r"padding mask .* shape \[2, 4\], but got Tensor\[2, 5\]"):
        token_mask(s, torch.ones(2, 5))
    assert token_mask(torch.randn(2, 3), torch.ones(2, 9)) is None  # sequence classification: no token mask


def test_logits_are_found_in_tensors_dicts_model_outputs_and_tuples() -> None:
    from transformers.modeling_outputs import CausalLMOutput, SequenceClassifierOutput

    x = torch.randn(2, 3)
    assert logits_of(x) is x
    assert logits_of({"logits": x, "loss": x.sum()}) is x
    assert logits_of({"scores": x}, "scores") is x
    assert logits_of(SequenceClassifierOutput(logits=x)) is x
    assert logits_of(CausalLMOutput(loss=x.sum(), logits=x)) is x
    assert logits_of((x.sum(), x), 1) is x
    with pytest.raises(
        DistillationError, match=r"returned a tuple of \(Tensor\[2, 3\] float32, Tensor\[2\] float32\)"
    ):
        logits_of((x, x[:, 0]))
    with pytest.raises(DistillationError, match=r"under 'logits'.*returned dict \{'out': Tensor\[2, 3\]"):
        logits_of({"out": x})
    with pytest.raises(DistillationError, match="returned Tensor"):
        logits_of(torch.randint(0, 3, (2, 3)))  # integer "logits" are not logits


def test_mask_is_read_from_keyword_or_batch_dict() -> None:
    m = torch.ones(2, 3)
    assert find_argument((), {"attention_mask": m}, "attention_mask") is m
    assert find_argument(({"input_ids": m, "attention_mask": m},), {}, "attention_mask") is m
    assert find_argument((m,), {}, "attention_mask") is None
    assert find_argument((), {"attention_mask": m}, None) is None


def test_hidden_loss_on_kept_channels() -> None:
    t = torch.randn(2, 5, 6)
    idx = torch.tensor([0, 2, 5])
    s = t[..., idx].clone().requires_grad_(True)
    assert float(hidden_loss(s, t, "mse", -1, idx).detach()) == pytest.approx(0.0)
    assert float(hidden_loss(s, t, "cosine", -1, idx).detach()) == pytest.approx(0.0, abs=1e-6)
    s2 = s.detach() + 1.0
    assert float(hidden_loss(s2, t, "mse", -1, idx)) == pytest.approx(1.0)
    with pytest.raises(DistillationError, match="student's shape"):
        hidden_loss(s2, t, "mse", -1, None)


def test_frozen_copy_is_one_detached_copy_on_its_dtype() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    owner = object()
    model.owner = owner  # type: ignore[assignment]
    teacher = frozen_copy(model, dtype=torch.bfloat16, skip=[owner])
    assert teacher.owner is None  # skipped, not copied
    assert not teacher.training
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in teacher.parameters())
    assert teacher[1].num_batches_tracked.dtype == torch.long  # integer buffers keep their dtype
    for p, q in zip(model.parameters(), teacher.parameters(), strict=True):
        assert p.data_ptr() != q.data_ptr()
        torch.testing.assert_close(p.detach().to(torch.bfloat16), q)
    assert model.training  # the original is untouched
    assert all(p.requires_grad for p in model.parameters())
    # 108 floating values in bf16 (2 bytes each) and the long `num_batches_tracked` (8 bytes)
    assert (tensor_bytes(model), tensor_bytes(teacher)) == (108 * 4 + 8, 108 * 2 + 8)
    t2 = frozen_copy(tied)
    assert t2[0].weight is t2[1].weight  # ties survive
    fp = fingerprint(teacher)
    with torch.no_grad():
        teacher[0].weight[0, 0] += 1
    assert fingerprint(teacher) != fp


def test_frozen_copy_from_stored_weights_refuses_another_structure() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    teacher = frozen_copy(model, weights=trained.state_dict())
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[k], v)
    small = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    with pytest.raises(DistillationError, match=r"freshly built \(unpruned\) module"):
        frozen_copy(model, weights=small.state_dict())


def test_forward_capture_records_outermost_calls_and_leaves_no_hooks() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.head(self.body(x)) * scale

    net = Net()
    x = torch.randn(2, 3)
    with ForwardCapture({"": net, "body": net.body, "head": net.head}, {"body": net.body}) as cap:
        net(x, scale=2.0)
        net.head(torch.randn(5, 4))
    assert [c.name for c in cap.calls] == ["", "head"]
    first = cap.calls[0]
    assert first.args[0] is x
    assert first.kwargs == {"scale": 2.0}
    assert first.taps["body"].shape == (2, 4)
    assert not cap.calls[1].taps
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_channel_maps_follow_a_real_prune() -> None:
    """After pruning, the student's first conv output is the teacher's on the mapped channels, exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 16, 2),
    ).eval()
    teacher = frozen_copy(model)
    graph = PruningGraph(model, torch.randn(1, 3, 4, 4))
    maps = ChannelMaps()
    layer = model[1]  # the BatchNorm after the first conv: its output is the hidden state
    for events, removal in enumerate(([1, 4, 6], [0, 2]), start=1):
        old = id(layer.weight)
        surgery = graph.prune({"0": removal})
        change = surgery.old_to_change()[old]
        maps.update(events, {"1": [k for d, k in change.ops if d == 0]})
    # [0, 2, 3, 5, 7] after the first prune; the second drops positions 0 and 2 of those
    assert maps.current(2)["1"] == [2, 5, 7]
    assert maps.current(1)["1"] == [0, 2, 3, 5, 7]  # a rolled-back ledger reads the earlier map
    x = torch.randn(2, 3, 4, 4)
    idx = torch.tensor(maps.current(2)["1"])
    with torch.no_grad():
        torch.testing.assert_close(model[:2](x), teacher[:2](x)[:, idx])
    restored = ChannelMaps()
    restored.load_state_dict(maps.state_dict())
    assert restored.maps == maps.maps


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0}, "`alpha` to be a positive number"),
        ({"temperature": -1.0}, "`temperature` to be a positive number"),
        ({"teacher": 3}, "`teacher` to be None"),
        ({"teacher": "/no/such/file.ckpt"}, "is not a file"),
        ({"dtype": "int8"}, "`dtype` to be None, 'bf16'"),
        ({"device": "nowhere"}, "`device` to be None or a device"),
        ({"logits_key": 1.5}, "`logits_key` to be a key"),
        ({"module": 3}, "`module` to be a submodule name"),
        ({"hidden": ["a"]}, "`hidden` to be a `HiddenStates`"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Distillation(**kwargs)


def test_hidden_states_arguments() -> None:
    assert HiddenStates(["a", "b"]).pairs == [("a", "a"), ("b", "b")]
    assert HiddenStates({"a": "x"}, loss="cosine").pairs == [("a", "x")]
    with pytest.raises(ValueError, match="`layers` to be a non-empty list"):
        HiddenStates([])
    with pytest.raises(ValueError, match="`loss` to be one of"):
        HiddenStates(["a"], loss="l1")
    d = Distillation(dtype="bf16", device="cpu", hidden=HiddenStates(["a"]))
    assert d.dtype == torch.bfloat16
    assert "hidden=HiddenStates(layers=['a']" in repr(d)


def test_kl_matches_torch_reference_for_random_logits() -> None:
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    torch.testing.assert_close(
        logit_loss(s, t, 1.0),
        F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean"),
    )
