"""Criteria on hand-built tiny modules where the right answer is known, and inside real Trainer runs."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import yaml
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_hprune import HierarchicalPruning
from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.importance import (
    ActivationImportance,
    BNScaleImportance,
    GroupTaylorImportance,
    Importance,
    IntegratedImportance,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
    normalise_scores,
    resolve_importance,
)
from lightning_hprune.core.levels import GlobalLevel
from tests.helpers import TinyCNN, loaders, trainer

ZERO = 2  # the channel each test makes unimportant


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 4),
    )


def groups_of(graph: PruningGraph) -> dict[str, Any]:
    return {g.name: g.group for g in graph.groups()}


def train_steps(model: nn.Module, crit: Importance, steps: int = 3, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model.zero_grad()
        model(torch.randn(4, 3, 4, 4, generator=g)).pow(2).mean().backward()
        crit.on_before_optimizer_step(model)


@pytest.fixture
def net_graph() -> tuple[nn.Sequential, PruningGraph]:
    net = tiny_net()
    return net, PruningGraph(net, torch.zeros(1, 3, 4, 4))


# ---------------------------------------------------------------------- magnitude / random
def test_magnitude_prunes_zero_weight_channel_first(net_graph: tuple[nn.Sequential, PruningGraph]) -> None:
    net, graph = net_graph
    with torch.no_grad():
        net[0].weight[ZERO] = 0
        net[0].bias[ZERO] = 0
        net[1].weight[ZERO] = 0
        net[3].weight[:, ZERO] = 0
    scores = MagnitudeImportance(p=1)(groups_of(graph)["0"])
    assert int(scores.argmin()) == ZERO
    assert scores[ZERO] == pytest.approx(0.0, abs=1e-3)  # BN bias/stats carry no magnitude here


def test_random_generator_state_travels_in_the_checkpoint(
    net_graph: tuple[nn.Sequential, PruningGraph], tmp_path: Any
) -> None:
    """A resumed run draws the same random scores as an unbroken one (the state loads with weights_only)."""
    _, graph = net_graph
    group = graph.groups()[0].group
    first = RandomImportance(seed=3)
    first(group)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    expected = first(group)
    resumed = RandomImportance(seed=3)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    torch.testing.assert_close(resumed(group), expected)
    assert not torch.equal(RandomImportance(seed=3)(group), expected)  # a fresh generator would differ


def test_random_is_seeded(net_graph: tuple[nn.Sequential, PruningGraph]) -> None:
    _, graph = net_graph
    group = groups_of(graph)["0"]
    a, b = RandomImportance(seed=3)(group), RandomImportance(seed=3)(group)
    assert torch.equal(a, b)
    assert not torch.equal(a, RandomImportance(seed=4)(group))


# ---------------------------------------------------------------------- taylor
def test_taylor_prunes_zero_gradient_channel_first(net_graph: tuple[nn.Sequential, PruningGraph]) -> None:
    net, graph = net_graph
    with torch.no_grad():
        net[3].weight[:, ZERO] = 0  # nothing downstream reads channel 2: its gradients are all zero
        net[0].weight[ZERO] *= 10  # ... but its own weights are large
    crit = TaylorImportance()
    train_steps(net, crit)
    crit.prepare(net)
    group = groups_of(graph)["0"]
    taylor = crit(group)
    assert int(taylor.argmin()) == ZERO
    assert taylor[ZERO] == 0.0
    assert (taylor[torch.arange(8) != ZERO] > 0).all()
    # Magnitude alone would keep it.
    assert int(MagnitudeImportance()(group).argmin()) != ZERO
    crit.reset()


def test_taylor_accumulates_every_step(net_graph: tuple[nn.Sequential, PruningGraph]) -> None:
    net, graph = net_graph
    one, two = TaylorImportance(), TaylorImportance()
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    net.zero_grad()
    net(x).pow(2).mean().backward()
    one.on_before_optimizer_step(net)
    two.on_before_optimizer_step(net)
    two.on_before_optimizer_step(net)
    assert two.steps == 2
    one.prepare(net)
    s1 = one(groups_of(graph)["0"])
    one.reset()
    two.prepare(net)
    s2 = two(groups_of(graph)["0"])
    two.reset()
    torch.testing.assert_close(s2, 2 * s1)


def test_taylor_only_reads_the_optimizer_parameters(net_graph: tuple[nn.Sequential, PruningGraph]) -> None:
    net, _ = net_graph
    crit = TaylorImportance()
    net(torch.randn(2, 3, 4, 4)).sum().backward()
    opt = torch.optim.SGD(net[3].parameters(), lr=0.1)
    crit.on_before_optimizer_step(net, opt)
    assert set(crit.state_dict()["acc"]) == {"3.weight", "3.bias"}


def test_taylor_ignores_non_finite_gradients(net_graph: tuple[nn.Sequential, PruningGraph]) -> None:
    net, _graph = net_graph
    crit = TaylorImportance()
    train_steps(net, crit, steps=1)
    before = {k: v.clone() for k, v in crit.state_dict()["acc"].items()}
    for p in net.parameters():
        p.grad = torch.full_like(p, math.inf)  # a step an AMP scaler would skip
    crit.on_before_optimizer_step(net)
    for k, v in crit.state_dict()["acc"].items():
        torch.testing.assert_close(v, before[k])


def test_taylor_statistics_follow_the_pruned_channels(net_graph: tuple[nn.Sequential, PruningGraph]) -> None:
    net, graph = net_graph
    crit = TaylorImportance()
    train_steps(net, crit)
    crit.prepare(net)
    before = crit(groups_of(graph)["0"])
    graph.prune({"0": [0, 5]})  # new nn.Parameter objects; torch-pruning slices `.grad` with them
    after = crit(groups_of(graph)["0"])
    keep = [i for i in range(8) if i not in (0, 5)]
    torch.testing.assert_close(after, before[keep])
    crit.reset()
    assert all(p.grad is None for p in net.parameters())


def test_taylor_needs_training_steps(net_graph: tuple[nn.Sequential, PruningGraph]) -> None:
    net, graph = net_graph
    with pytest.raises(RuntimeError, match="no optimizer step was seen"):
        TaylorImportance().prepare(net)
    with pytest.raises(RuntimeError, match="before `prepare"):
        TaylorImportance()(groups_of(graph)["0"])


def test_taylor_state_round_trip(net_graph: tuple[nn.Sequential, PruningGraph]) -> None:
    net, graph = net_graph
    crit = TaylorImportance()
    train_steps(net, crit)
    saved = crit.state_dict()
    crit.prepare(net)
    expected = crit(groups_of(graph)["0"])
    crit.reset()
    again = TaylorImportance()
    again.load_state_dict(saved)
    again.prepare(net)
    torch.testing.assert_close(again(groups_of(graph)["0"]), expected)
    again.reset()


# ---------------------------------------------------------------------- group taylor
def test_group_taylor_is_the_squared_sum_of_w_times_g_over_each_channels_readers(
    net_graph: tuple[nn.Sequential, PruningGraph],
) -> None:
    """Channels of conv 0 are read by conv 3 alone: the score is sum over steps of (sum_k w3[k, c] g3[k, c])^2."""
    net, graph = net_graph
    crit = GroupTaylorImportance()
    expected = torch.zeros(8)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        net.zero_grad()
        net(torch.randn(4, 3, 4, 4, generator=g)).pow(2).mean().backward()
        w, grad = net[3].weight.detach(), net[3].weight.grad
        assert grad is not None
        expected += (w * grad).sum(dim=(0, 2, 3)).pow(2)
        crit.on_before_optimizer_step(net)
    assert crit.steps == 3
    crit.prepare(net)
    torch.testing.assert_close(crit(groups_of(graph)["0"]), expected)
    crit.reset()
    assert all(p.grad is None for p in net.parameters())


def test_group_taylor_estimates_the_loss_change_of_removing_a_channel() -> None:
    """For a linear read-out, zeroing input c changes the loss by -sum_k w[k, c] g[k, c] to first order."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 3).double()
    with torch.no_grad():
        layer.weight.mul_(1e-3)  # so that removing one input is a small change: first order is exact enough
    x = torch.randn(64, 6, dtype=torch.float64)
    y = x @ torch.randn(6, 3, dtype=torch.float64)  # the inputs matter: the first-order term dominates

    def loss(m: nn.Module) -> torch.Tensor:
        return (m(x) - y).pow(2).mean()

    crit = GroupTaylorImportance()
    layer.zero_grad()
    loss(layer).backward()
    crit.on_before_optimizer_step(layer)
    crit.prepare(layer)
    carried = crit._carried(layer)
    assert carried is not None
    scores = carried[0][0].double()  # one value per input, repeated along the output dimension
    crit.reset()
    base = float(loss(layer).detach())
    exact = []
    for c in range(6):
        probe = nn.Linear(6, 3).double()
        probe.load_state_dict(layer.state_dict())
        with torch.no_grad():
            probe.weight[:, c] = 0
        exact.append((float(loss(probe).detach()) - base) ** 2)
    torch.testing.assert_close(scores, torch.tensor(exact, dtype=torch.float64), rtol=0.02, atol=0.0)


def test_group_taylor_statistics_follow_the_pruned_channels(
    net_graph: tuple[nn.Sequential, PruningGraph],
) -> None:
    net, graph = net_graph
    crit = GroupTaylorImportance()
    train_steps(net, crit)
    crit.prepare(net)
    before = crit(groups_of(graph)["0"])
    graph.prune({"0": [0, 5]})
    after = crit(groups_of(graph)["0"])
    keep = [i for i in range(8) if i not in (0, 5)]
    torch.testing.assert_close(after, before[keep])
    crit.reset()


def test_group_taylor_sums_over_processes_and_round_trips_its_state(
    net_graph: tuple[nn.Sequential, PruningGraph],
) -> None:
    net, graph = net_graph
    crit = GroupTaylorImportance()
    train_steps(net, crit)
    saved = crit.state_dict()
    assert all(v.dim() == 1 for v in saved["acc"].values())  # one value per input channel, not a model copy
    crit.prepare(net)
    alone = crit(groups_of(graph)["0"])
    crit.reset()
    again = GroupTaylorImportance()
    again.load_state_dict(saved)
    again.prepare(net, reduce=lambda t: 2 * t)  # two processes with the same statistics
    torch.testing.assert_close(again(groups_of(graph)["0"]), 2 * alone)
    again.reset()
    with pytest.raises(RuntimeError, match="no optimizer step was seen"):
        GroupTaylorImportance().prepare(net)


def test_group_taylor_scores_attention_heads_from_their_output_projection() -> None:
    """A head whose output-projection columns are zero changes nothing when removed: it scores 0, the others not."""
    from lightning_hprune.core.families import detect
    from tests.zoo import BY_NAME

    case = BY_NAME["bert"]
    torch.manual_seed(0)
    model = case.build()
    graph = PruningGraph(model, case.inputs(batch=1))
    [heads] = [g for g in graph.groups() if g.name == "heads"]
    slot = heads.slots[0]
    [reader] = [c for c in slot.cuts if c.role == "in" and c.param == "weight"]
    with torch.no_grad():
        w = reader.tensor
        assert w is not None
        w.index_fill_(reader.dim, torch.tensor(reader.units[1]), 0.0)
    crit = GroupTaylorImportance()
    for seed in range(2):
        model.zero_grad()
        model(**case.inputs(seed=seed)).logits.pow(2).mean().backward()
        crit.on_before_optimizer_step(model)
    crit.prepare(model)
    scores = crit.score_cuts(slot.cuts)
    crit.reset()
    assert detect(model) is not None
    assert scores.shape == (len(reader.units),)
    assert float(scores[1]) == 0.0
    assert bool((scores[torch.arange(len(scores)) != 1] > 0).all())


class RecordingTaylor(TaylorImportance):
    """Remembers how many optimizer steps fed each event, and a copy of its statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.steps_per_event: list[int] = []
        self.acc_per_event: list[dict[str, torch.Tensor]] = []

    def prepare(self, model: nn.Module, calibration: Any = (), reduce: Any = None) -> None:
        self.steps_per_event.append(self.steps)
        self.acc_per_event.append({k: v.clone() for k, v in self.state_dict()["acc"].items()})
        super().prepare(model, calibration, reduce)


class CountingCNN(TinyCNN):
    """Counts training forward passes (train mode, autograd on) and backward passes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.forward_calls = 0
        self.backward_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training and torch.is_grad_enabled():
            self.forward_calls += 1
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad: torch.Tensor) -> None:
        self.backward_calls += 1


@pytest.mark.fit
@pytest.mark.parametrize(("accumulate", "expected_steps"), [(1, 4), (2, 2)])
def test_taylor_in_trainer_counts_optimizer_steps_without_extra_passes(
    tmp_path: Any, accumulate: int, expected_steps: int
) -> None:
    pl.seed_everything(0)
    counts = {}
    for name in ("taylor", "l2"):
        pl.seed_everything(0)
        crit: Importance = RecordingTaylor() if name == "taylor" else MagnitudeImportance()
        cb = HierarchicalPruning(
            target=0.3,
            levels=[GlobalLevel()],
            importance=crit,
            end_epoch=0,
            measure_latency=False,
            verbose=False,
        )
        model = CountingCNN()
        train, _ = loaders(n=128, batch_size=32)
        trainer(tmp_path / name, [cb], max_epochs=1, accumulate_grad_batches=accumulate).fit(model, train)
        counts[name] = (model.forward_calls, model.backward_calls)
        if isinstance(crit, RecordingTaylor):
            assert crit.steps_per_event == [expected_steps]
            assert crit.steps == 0  # reset after the event
            assert all(p.grad is None for p in model.parameters())
        assert cb.records
        assert cb.records[0]["removed"] > 0.2
    # No extra training forward or backward pass: one of each per batch, as with magnitude.
    assert counts["taylor"] == counts["l2"] == (4, 4)


@pytest.mark.fit
def test_taylor_reads_unscaled_amp_gradients(tmp_path: Any) -> None:
    accs = {}
    for name, plugins in {
        "fp32": [],
        "fp16": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))],
    }.items():
        pl.seed_everything(0)
        crit = RecordingTaylor()
        cb = HierarchicalPruning(
            target=0.3,
            levels=[GlobalLevel()],
            importance=crit,
            end_epoch=0,
            measure_latency=False,
            verbose=False,
        )
        train, _ = loaders(n=64, batch_size=32)
        trainer(tmp_path / name, [cb], max_epochs=1, plugins=plugins).fit(TinyCNN(), train)
        accs[name] = crit.acc_per_event[0]["features.0.weight"].sum()
    # Scaled gradients would be 65536x larger; unscaled fp16 gradients match fp32 within rounding.
    assert float(accs["fp16"] / accs["fp32"]) == pytest.approx(1.0, rel=0.05)


# ---------------------------------------------------------------------- activation
def dead_channel_net() -> tuple[nn.Sequential, PruningGraph]:
    net = tiny_net()
    with torch.no_grad():
        net[1].weight[ZERO] = 0.0
        net[1].bias[ZERO] = -1.0  # after ReLU, channel 2 is always zero
    return net, PruningGraph(net, torch.zeros(1, 3, 4, 4))


def calibration(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(8, 3, 4, 4, generator=g) for _ in range(n)]


@pytest.mark.parametrize("statistic", ["mean", "apoz"])
def test_activation_prunes_always_zero_channel_first(statistic: str) -> None:
    net, graph = dead_channel_net()
    net.eval()
    crit = ActivationImportance(statistic=statistic)
    crit.prepare(net, calibration())
    scores = crit(groups_of(graph)["0"])
    assert int(scores.argmin()) == ZERO
    assert scores[ZERO] == 0.0
    assert (scores[torch.arange(8) != ZERO] > 0).all()
    if statistic == "apoz":
        assert (scores <= 1).all()  # 1 - fraction of zeros
    # hooks are gone, and the modes were kept
    assert all(not m._forward_hooks for m in net.modules())
    assert not net.training
    crit.reset()


def test_weighted_activation_drops_an_active_channel_the_next_layer_ignores() -> None:
    """A busy channel whose consuming weights are zero contributes nothing: only `weighted=True` sees it."""
    net = tiny_net()
    with torch.no_grad():
        net[1].bias[ZERO] = 5.0  # the most active channel after ReLU ...
        net[3].weight[:, ZERO] = 0.0  # ... that the next convolution never reads
    graph = PruningGraph(net, torch.zeros(1, 3, 4, 4))
    plain, weighted = ActivationImportance(), ActivationImportance(weighted=True)
    for crit in (plain, weighted):
        crit.prepare(net, calibration())
    assert int(plain(groups_of(graph)["0"]).argmax()) == ZERO
    scores = weighted(groups_of(graph)["0"])
    assert int(scores.argmin()) == ZERO
    assert scores[ZERO] == 0.0
    with pytest.raises(ValueError, match="`weighted` to be a bool"):
        ActivationImportance(weighted="yes")  # type: ignore[arg-type]


def test_activation_runs_in_eval_mode_without_touching_bn_statistics() -> None:
    net, _graph = dead_channel_net()
    net.train()
    running = net[1].running_mean.clone()
    crit = ActivationImportance()
    crit.prepare(net, calibration())
    assert torch.equal(net[1].running_mean, running)
    assert net.training
    assert net[1].training


def test_activation_statistics_follow_pruning() -> None:
    net, graph = dead_channel_net()
    crit = ActivationImportance()
    crit.prepare(net, calibration())
    before = crit(groups_of(graph)["0"])
    graph.prune({"0": [0, 5]})  # widths change: statistics are gathered again on the pruned model
    after = crit(groups_of(graph)["0"])
    keep = [i for i in range(8) if i not in (0, 5)]
    torch.testing.assert_close(after, before[keep])
    assert int(after.argmin()) == keep.index(ZERO)


def test_activation_uses_the_last_n_batches() -> None:
    net, graph = dead_channel_net()
    batches = calibration(3)
    last = ActivationImportance(num_batches=1)
    last.prepare(net, batches)
    only = ActivationImportance()
    only.prepare(net, batches[-1:])
    torch.testing.assert_close(last(groups_of(graph)["3"]), only(groups_of(graph)["3"]))


def test_activation_needs_calibration(net_graph: tuple[nn.Sequential, PruningGraph]) -> None:
    net, _ = net_graph
    with pytest.raises(RuntimeError, match="calibration_batches"):
        ActivationImportance().prepare(net, [])


def test_activation_reduce_is_applied(net_graph: tuple[nn.Sequential, PruningGraph]) -> None:
    net, graph = net_graph
    plain, doubled = ActivationImportance(), ActivationImportance()
    plain.prepare(net, calibration())
    calls = []

    def fake_sum_over_two_processes(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.numel())
        return 2 * t  # two identical processes: sums and counts both double, means are unchanged

    doubled.prepare(net, calibration(), reduce=fake_sum_over_two_processes)
    assert len(calls) == 1  # one collective for all layers
    torch.testing.assert_close(doubled(groups_of(graph)["0"]), plain(groups_of(graph)["0"]))


# ---------------------------------------------------------------------- bn scale
def test_bn_scale_prunes_zero_gamma_first(net_graph: tuple[nn.Sequential, PruningGraph]) -> None:
    net, graph = net_graph
    with torch.no_grad():
        net[1].weight.copy_(torch.linspace(0.5, 1.5, 8))
        net[1].weight[ZERO] = 0.0
    scores = BNScaleImportance()(groups_of(graph)["0"])
    torch.testing.assert_close(scores, net[1].weight.detach().abs())
    assert int(scores.argmin()) == ZERO


def test_bn_scale_falls_back_to_magnitude_without_norm(net_graph: tuple[nn.Sequential, PruningGraph]) -> None:
    _, graph = net_graph
    group = groups_of(graph)["3"]  # conv -> ReLU -> linear: no normalisation layer
    torch.testing.assert_close(BNScaleImportance()(group), MagnitudeImportance()(group))


# ---------------------------------------------------------------------- integrated
class Fixed(Importance):
    def __init__(self, values: list[float]) -> None:
        self.values = values

    def __call__(self, group: Any) -> torch.Tensor:
        return torch.tensor(self.values)


def test_integrated_normalises_each_criterion_per_layer(
    net_graph: tuple[nn.Sequential, PruningGraph],
) -> None:
    _, graph = net_graph
    group = groups_of(graph)["0"]
    a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    b = [8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    small = IntegratedImportance([Fixed(a), Fixed(b)])(group)
    huge = IntegratedImportance([Fixed([1e6 * v for v in a]), Fixed(b)])(group)
    torch.testing.assert_close(small, huge)  # a criterion's scale does not dominate
    ta, tb = torch.tensor(a), torch.tensor(b)
    torch.testing.assert_close(small, ta / ta.mean() + tb / tb.mean())
    weighted = IntegratedImportance([Fixed(a), Fixed(b)], weights=[0.0, 2.0])(group)
    torch.testing.assert_close(weighted, 2 * tb / tb.mean())
    ranks = IntegratedImportance([Fixed(a)], normalizer="rank")(group)
    torch.testing.assert_close(ranks, torch.arange(8.0) / 7)


def test_integrated_combines_real_criteria_and_forwards_hooks() -> None:
    net, graph = dead_channel_net()
    with torch.no_grad():
        net[3].weight[:, ZERO] = 0
    crit = IntegratedImportance(["taylor", "activation", "bn_scale"], weights=[1, 1, 1])
    assert crit.needs_training_statistics
    assert crit.needs_calibration
    train_steps(net, crit)
    crit.prepare(net, calibration())
    scores = crit(groups_of(graph)["0"])
    assert int(scores.argmin()) == ZERO
    crit.reset()
    assert all(p.grad is None for p in net.parameters())


def test_integrated_from_yaml() -> None:
    text = """
    class_path: lightning_hprune.core.importance.IntegratedImportance
    init_args:
      criteria:
        - class_path: lightning_hprune.core.importance.TaylorImportance
        - class_path: lightning_hprune.core.importance.MagnitudeImportance
          init_args: {p: 1}
        - apoz
      weights: [0.5, 0.3, 0.2]
    """
    crit = resolve_importance(yaml.safe_load(text))
    assert isinstance(crit, IntegratedImportance)
    assert [type(c).__name__ for c in crit.criteria] == [
        "TaylorImportance",
        "MagnitudeImportance",
        "ActivationImportance",
    ]
    assert crit.criteria[1].p == 1
    assert crit.criteria[2].statistic == "apoz"
    assert crit.weights == [0.5, 0.3, 0.2]


def test_integrated_through_jsonargparse() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(HierarchicalPruning, "prune")
    cfg = parser.parse_string(
        yaml.safe_dump(
            {
                "prune": {
                    "target": 0.4,
                    "importance": {
                        "class_path": "lightning_hprune.core.importance.IntegratedImportance",
                        "init_args": {
                            "criteria": [
                                {"class_path": "lightning_hprune.core.importance.TaylorImportance"},
                                {"class_path": "lightning_hprune.core.importance.BNScaleImportance"},
                            ],
                            "weights": [2.0, 1.0],
                        },
                    },
                }
            }
        )
    )
    cb = parser.instantiate_classes(cfg).prune
    assert isinstance(cb.importance, IntegratedImportance)
    assert [type(c).__name__ for c in cb.importance.criteria] == ["TaylorImportance", "BNScaleImportance"]
    assert cb.importance.weights == [2.0, 1.0]


def test_normalise_scores_handles_zeros() -> None:
    assert torch.equal(normalise_scores(torch.zeros(4)), torch.zeros(4))


# ---------------------------------------------------------------------- names and errors
@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("l1", MagnitudeImportance),
        ("l2", MagnitudeImportance),
        ("magnitude", MagnitudeImportance),
        ("random", RandomImportance),
        ("taylor", TaylorImportance),
        ("group_taylor", GroupTaylorImportance),
        ("activation", ActivationImportance),
        ("apoz", ActivationImportance),
        ("bn_scale", BNScaleImportance),
    ],
)
def test_resolve_names(name: str, cls: type) -> None:
    assert isinstance(resolve_importance(name), cls)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: resolve_importance("taylr"), "Expected argument `importance` to be one of"),
        (lambda: resolve_importance(3), "Expected argument `importance`"),
        (lambda: ActivationImportance(statistic="median"), "Expected argument `statistic`"),
        (lambda: ActivationImportance(num_batches=0), "Expected argument `num_batches`"),
        (lambda: TaylorImportance(bias="yes"), "Expected argument `bias`"),
        (lambda: IntegratedImportance([]), "Expected argument `criteria`"),
        (lambda: IntegratedImportance("l2"), "Expected argument `criteria`"),
        (lambda: IntegratedImportance(["l2", "taylor"], weights=[1.0]), "Expected argument `weights`"),
        (lambda: IntegratedImportance(["l2"], weights=[-1.0]), "Expected argument `weights`"),
        (lambda: IntegratedImportance(["l2"], weights=[0.0]), "positive sum"),
        (lambda: IntegratedImportance(["l2"], normalizer="z"), "Expected argument `normalizer`"),
        (lambda: resolve_importance({"class_path": "torch.nn.Linear"}), "`Importance` subclass"),
        (lambda: resolve_importance({"init_args": {}}), "class_path"),
    ],
)
def test_bad_arguments(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------------- end to end
@pytest.mark.parametrize(
    "importance",
    ["taylor", "group_taylor", "activation", "apoz", "activation_weighted", "bn_scale", "integrated"],
)
@pytest.mark.fit
def test_each_criterion_prunes_during_fit(tmp_path: Any, importance: str) -> None:
    pl.seed_everything(0)
    crit: Any = importance
    if importance == "integrated":
        crit = IntegratedImportance(["taylor", "l2", "apoz"], weights=[0.5, 0.25, 0.25])
    cb = HierarchicalPruning(
        target=0.5,
        levels=[GlobalLevel()],
        importance=crit,
        end_epoch=1,
        measure_latency=False,
        monitor="val_acc",
        verbose=False,
        round_to=4,  # TinyCNN's layers are 8-32 wide: steps of 8 would make the target a matter of luck
    )
    model = TinyCNN()
    train, val = loaders(n=96, batch_size=32)
    trainer(tmp_path, [cb], max_epochs=3).fit(model, train, val)
    assert len(cb.records) == 2
    assert cb.records[-1]["removed"] == pytest.approx(0.5, abs=0.05)
    assert all(p.grad is None or p.grad.shape == p.shape for p in model.parameters())
    assert [d["action"] for d in cb.decisions] == ["pruned", "pruned"]
