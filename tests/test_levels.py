"""Each channel level removes exactly what it names (real torch-pruning graphs, real models)."""

import math

import pytest
import torch
import torch.nn as nn

from lightning_hprune.core.cost import build_cost_model, measure_cost
from lightning_hprune.core.engine import level_fractions, plan_steps, prune_level
from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.importance import Importance
from lightning_hprune.core.ledger import EventRecord, Ledger, LevelRecord
from lightning_hprune.core.levels import GlobalLevel, LayerLevel, UniformLevel, UnitLevel, WindowLevel
from lightning_hprune.core.schedules import resolve_schedule
from tests.helpers import TinyCNN

ROOTS = ("features.0", "features.3", "features.6", "head.1")


class RowNorm(Importance):
    """Score = L2 norm of the root layer's weight row: scores we control by scaling rows."""

    def __call__(self, group):
        weight = group[0].dep.target.module.weight.detach()
        return weight.flatten(1).norm(dim=1).float()


def make(widths=(24, 40, 32), seed=0):
    torch.manual_seed(seed)
    model = TinyCNN(widths=widths)
    return model, PruningGraph(model, model.example_input_array)


def set_row_scores(model, name, scores):
    """Scale the rows of layer ``name`` so that RowNorm returns exactly ``scores``."""
    w = model.get_submodule(name).weight
    with torch.no_grad():
        flat = w.view(w.shape[0], -1)
        flat.mul_((torch.as_tensor(scores, dtype=w.dtype) / flat.norm(dim=1)).unsqueeze(1))


def widths(graph):
    return {g.name: g.size for g in graph.groups()}


def kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which rows of ``before`` survive in ``after`` (rows are unique random vectors)."""
    b = before.flatten(1)
    a = after.flatten(1)
    return [int(torch.cdist(a[i : i + 1], b).argmin()) for i in range(a.shape[0])]


def run(graph, level, target_cost, round_to=1, tolerance=0.0, importance=None):
    original = {g.name: g.size for g in graph.groups()}
    return prune_level(
        graph, level, importance or RowNorm(), "macs", target_cost, original, round_to, tolerance
    )[0]


# ---------------------------------------------------------------- layer-wise
def test_layer_ratios_match_the_mapping_exactly_when_the_budget_allows():
    _model, graph = make()
    level = LayerLevel(ratios={"features.0": 0.5, "features.3": 0.25})
    run(graph, level, target_cost=0.0)  # more than the mapping can give: scale saturates at 1
    w = widths(graph)
    assert w["features.0"] == 12  # 24 * (1 - 0.5)
    assert w["features.3"] == 30  # 40 * (1 - 0.25)
    assert w["features.6"] == 32  # unmatched: untouched
    assert w["head.1"] == 32


@pytest.mark.parametrize("round_to", [4, 8])
def test_layer_ratios_are_never_exceeded_and_within_rounding(round_to):
    _model, graph = make()
    ratios = {"features.0": 0.5, "features.3": 0.3, "features.6": 0.6}
    run(graph, LayerLevel(ratios=ratios), target_cost=0.0, round_to=round_to)
    w = widths(graph)
    original = {"features.0": 24, "features.3": 40, "features.6": 32}
    for name, ratio in ratios.items():
        assert w[name] % round_to == 0
        achieved = 1 - w[name] / original[name]
        assert achieved <= ratio + 1e-9
        assert ratio - achieved < round_to / original[name]


def test_layer_ratios_scale_together_to_meet_a_smaller_budget():
    model, graph = make(widths=(64, 64, 64))
    dense = measure_cost(model, model.example_input_array, "macs")
    level = LayerLevel(ratios={"features.0": 0.6, "features.3": 0.3})
    run(graph, level, target_cost=0.85 * dense)
    w = widths(graph)
    removed0, removed3 = 64 - w["features.0"], 64 - w["features.3"]
    assert 0 < removed0 < 0.6 * 64
    assert 0 < removed3 < 0.3 * 64
    assert 0 <= removed0 - 2 * removed3 <= 1  # and kept in proportion (floor(2x) - 2 floor(x))
    assert measure_cost(model, model.example_input_array, "macs") <= 0.85 * dense
    assert w["features.6"] == 64


def test_layer_uniform_gives_every_layer_the_same_ratio():
    model, graph = make(widths=(64, 64, 64))
    dense = measure_cost(model, model.example_input_array, "macs")
    run(graph, LayerLevel(), target_cost=0.6 * dense, round_to=8)
    w = widths(graph)
    assert len({w[n] for n in ("features.0", "features.3", "features.6")}) == 1
    assert all(v % 8 == 0 for v in w.values())
    assert measure_cost(model, model.example_input_array, "macs") <= 0.6 * dense * 1.01


def test_layer_uniform_steps_equal_width_layers_one_at_a_time():
    # Three layers of equal width share their rounding thresholds: a common ratio moves all three by 8
    # channels at once. The level steps them one at a time, so it overshoots by at most one layer's step.
    model, graph = make(widths=(64, 64, 64))
    dense = measure_cost(model, model.example_input_array, "macs")
    step = 8 * max(build_cost_model(graph, graph.groups(), "macs").per_channel.values())
    run(graph, LayerLevel(), target_cost=0.7 * dense, round_to=8)
    after = measure_cost(model, model.example_input_array, "macs")
    assert after <= 0.7 * dense
    assert after > 0.7 * dense - step
    w = widths(graph)
    assert max(64 - w[n] for n in ROOTS[:3]) - min(64 - w[n] for n in ROOTS[:3]) <= 8


def test_layer_sensitivity_prunes_less_sensitive_layers_more():
    model, graph = make(widths=(64, 64, 64))
    dense = measure_cost(model, model.example_input_array, "macs")
    level = LayerLevel(sensitivity={"features.0": 4.0, "features.3": 1.0, "features.6": 2.0})
    run(graph, level, target_cost=0.7 * dense)
    w = widths(graph)
    assert w["features.3"] < w["features.6"] < w["features.0"]
    assert w["head.1"] == 32  # not named in the mapping


def test_layer_sensitivity_infinite_means_never():
    _model, graph = make(widths=(64, 64, 64))
    level = LayerLevel(sensitivity={"features.0": math.inf, "features.3": 1.0, "features.6": 2.0})
    run(graph, level, target_cost=0.0)
    w = widths(graph)
    assert w["features.0"] == 64
    assert w["features.3"] < w["features.6"] < 64


def test_layer_caps_respected_by_uniform():
    _model, graph = make(widths=(64, 64, 64))
    run(graph, LayerLevel(max_layer_ratio=0.5), target_cost=0.0)
    assert all(w >= s / 2 for w, s in zip(widths(graph).values(), (32, 64, 64, 64), strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"ratios": {"features.0": 0.9}},
            "`ratios` to map module-name patterns to numbers >= 0.0 and <= 0.8",
        ),
        ({"ratios": {"features.0": -0.1}}, "but got 'features.0': -0.1"),
        ({"ratios": []}, "`ratios` to be a non-empty mapping"),
        ({"sensitivity": {"x": "high"}}, "`sensitivity` to map module-name patterns to numbers >= 0.0"),
        ({"ratios": {"a": 0.1}, "sensitivity": {"a": 1.0}}, "at most one of the arguments"),
        ({"schedule": "weekly"}, "`schedule` to be one of"),
        ({"share": 0.0}, "`share` to be a float in (0, 1]"),
    ],
)
def test_layer_level_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match="Expected") as err:
        LayerLevel(**kwargs)
    assert message in str(err.value)


def test_layer_level_unmatched_pattern_is_reported_against_the_model():
    model, _ = make()
    with pytest.raises(ValueError, match=r"\['nothing\.\*'\] matched none"):
        LayerLevel(ratios={"features.0": 0.2, "nothing.*": 0.3}).check_model(model)
    LayerLevel(ratios={"features.*": 0.2}).check_model(model)  # matches: no error


# ---------------------------------------------------------------- unit-wise (thresholds)
@pytest.mark.parametrize(
    ("reference", "threshold", "expected_eligible"),
    [
        ("absolute", 2.5, 2),  # scores 1 and 2 of features.0 are < 2.5
        ("max", 0.5, 11),  # < 0.5 * 24 = 12: scores 1..11
        ("mean", 0.5, 6),  # < 0.5 * 12.5 = 6.25: scores 1..6
    ],
)
def test_unit_threshold_removes_exactly_the_units_under_it(reference, threshold, expected_eligible):
    model, graph = make()
    scores = torch.arange(1, 25, dtype=torch.float32)[
        torch.randperm(24, generator=torch.Generator().manual_seed(1))
    ]
    set_row_scores(model, "features.0", scores)
    for other in ROOTS[1:]:  # every other layer far above any threshold
        n = model.get_submodule(other).weight.shape[0]
        set_row_scores(model, other, torch.full((n,), 1000.0) + torch.arange(n))
    before = model.features[0].weight.detach().clone()
    # The other layers' scores are nearly equal: no unit is under 0.5 x their max or mean, or under 2.5.
    run(graph, UnitLevel(threshold=threshold, reference=reference), target_cost=0.0)
    w = widths(graph)
    assert w["features.0"] == 24 - expected_eligible
    removed = sorted(set(range(24)) - set(kept_rows(before, model.features[0].weight.detach())))
    assert sorted(scores[removed].tolist()) == list(range(1, expected_eligible + 1))
    assert (w["features.3"], w["features.6"], w["head.1"]) == (40, 32, 32)


def test_unit_threshold_respects_alignment_and_cap():
    model, graph = make(widths=(40, 40, 40))
    set_row_scores(model, "features.0", torch.cat([torch.full((30,), 0.1), torch.full((10,), 9.0)]))
    set_row_scores(model, "features.3", torch.cat([torch.full((13,), 0.1), torch.full((27,), 9.0)]))
    set_row_scores(model, "features.6", torch.full((40,), 9.0))
    set_row_scores(model, "head.1", torch.full((32,), 9.0))
    run(graph, UnitLevel(threshold=1.0, reference="absolute", max_layer_ratio=0.5), 0.0, round_to=8)
    w = widths(graph)
    assert w["features.0"] == 24  # 30 eligible, but the cap keeps >= 20, aligned up to 24
    assert w["features.3"] == 32  # 13 eligible: only 8 may go without breaking the alignment
    assert w["features.6"] == 40
    assert w["head.1"] == 32


def test_unit_threshold_removal_is_bounded_by_the_budget():
    model, graph = make(widths=(64, 64, 64))
    dense = measure_cost(model, model.example_input_array, "macs")
    level = UnitLevel(threshold=10.0, reference="mean")  # everything is eligible
    result = run(graph, level, target_cost=0.9 * dense)
    after = measure_cost(model, model.example_input_array, "macs")
    assert after <= 0.9 * dense * 1.02
    assert after > 0.75 * dense  # not the whole eligible set: the budget stopped it
    assert result.rounds == 1  # thresholds are evaluated once per event


# ---------------------------------------------------------------- window-wise
@pytest.mark.parametrize("window", [4, 8])
def test_window_level_removes_whole_contiguous_windows(window):
    model, graph = make(widths=(32, 48, 64))
    # Low scores on two windows of features.3 (and a decoy unit in a third window with a low score).
    scores = torch.full((48,), 5.0) + torch.rand(48, generator=torch.Generator().manual_seed(0))
    scores[window : 2 * window] = 0.1
    scores[3 * window : 4 * window] = 0.2
    scores[5 * window] = 0.01
    set_row_scores(model, "features.3", scores)
    for name, n in (("features.0", 32), ("features.6", 64), ("head.1", 32)):
        set_row_scores(model, name, torch.full((n,), 50.0) + torch.arange(n))
    before = model.features[3].weight.detach().clone()
    cost = measure_cost(model, model.example_input_array, "macs")
    per_channel = build_cost_model(graph, graph.groups(), "macs").per_channel["features.3"]
    # A budget of just under two windows of features.3.
    run(graph, WindowLevel(window_size=window), target_cost=cost - (2 * window - 0.5) * per_channel)
    w = widths(graph)
    assert w["features.3"] % window == 0
    removed = sorted(set(range(48)) - set(kept_rows(before, model.features[3].weight.detach())))
    assert len(removed) % window == 0
    assert removed
    windows = {i // window for i in removed}
    assert all(all(j in removed for j in range(k * window, (k + 1) * window)) for k in windows)
    assert windows == {1, 3}  # the two lowest windows; one low unit does not make a low window (mean)


def test_window_level_max_reduction_protects_windows_with_one_important_unit():
    model, graph = make(widths=(32, 32, 32))
    scores = torch.full((32,), 5.0)
    scores[0:8] = 0.1
    scores[3] = 50.0  # window 0 has one important unit
    scores[8:16] = 1.0
    set_row_scores(model, "features.3", scores)
    for name in ("features.0", "features.6", "head.1"):
        set_row_scores(model, name, torch.full((32,), 100.0))
    before = model.features[3].weight.detach().clone()
    cost = measure_cost(model, model.example_input_array, "macs")
    per_channel = build_cost_model(graph, graph.groups(), "macs").per_channel["features.3"]
    run(graph, WindowLevel(window_size=8, reduce="max"), target_cost=cost - 7.5 * per_channel)
    removed = set(range(32)) - set(kept_rows(before, model.features[3].weight.detach()))
    assert removed == set(range(8, 16))


@pytest.mark.parametrize(("window", "round_to", "step"), [(4, 8, 8), (8, 4, 8), (3, 2, 6), (8, 1, 8)])
def test_window_widths_stay_multiples_of_window_and_round_to(window, round_to, step):
    model, graph = make(widths=(30, 50, 44))  # unaligned widths are realigned first
    dense = measure_cost(model, model.example_input_array, "macs")
    run(graph, WindowLevel(window_size=window), target_cost=0.5 * dense, round_to=round_to, importance=None)
    w = widths(graph)
    changed = {
        n: v
        for n, v in w.items()
        if v != {"features.0": 30, "features.3": 50, "features.6": 44, "head.1": 32}[n]
    }
    assert changed
    assert all(v % step == 0 for v in changed.values()), w
    assert math.lcm(window, round_to) == step


def test_window_level_bad_arguments():
    with pytest.raises(ValueError, match="Expected argument `window_size` to be an integer >= 1, but got 0"):
        WindowLevel(window_size=0)
    with pytest.raises(ValueError, match="Expected argument `reduce` to be one of"):
        WindowLevel(reduce="median")


# ---------------------------------------------------------------- global and uniform keep working
def test_global_level_cap_is_respected():
    _model, graph = make(widths=(64, 64, 64))
    run(graph, GlobalLevel(max_layer_ratio=0.25), target_cost=0.0, round_to=8)
    for name, n in zip(ROOTS, (64, 64, 64, 32), strict=True):
        assert widths(graph)[name] >= n * 0.75


def test_uniform_level_still_meets_its_budget():
    model, graph = make(widths=(64, 64, 64))
    dense = measure_cost(model, model.example_input_array, "macs")
    run(graph, UniformLevel(), target_cost=0.7 * dense, round_to=8, tolerance=0.002 * dense)
    assert measure_cost(model, model.example_input_array, "macs") <= 0.7 * dense * 1.01


# ---------------------------------------------------------------- composition arithmetic
def test_level_fractions_follow_shares_and_own_schedules():
    levels = [GlobalLevel(share=0.25, schedule="constant"), WindowLevel(share=0.75)]
    linear = resolve_schedule("linear")
    first = level_fractions(levels, 0.8, 0, 4, linear, 0.9)
    assert first == pytest.approx([0.2, 0.6 / 4])
    last = level_fractions(levels, 0.8, 3, 4, linear, 0.9)
    assert sum(last) == pytest.approx(0.8)


def test_plan_steps_lets_a_level_that_fell_short_catch_up():
    levels = [GlobalLevel(share=0.5), WindowLevel(share=0.5)]
    # Event 2: each level owes 0.3 of dense in total; the first removed nothing before, the second 0.4.
    steps = plan_steps(levels, dense=100.0, start=60.0, fractions=[0.3, 0.3], removed=[0.0, 0.4 * 100])
    assert steps[0][1] == pytest.approx(40.0)  # owes 30: 60 -> 30, but never below the event's target 40
    assert steps[1][1] == pytest.approx(40.0)
    steps = plan_steps(levels, dense=100.0, start=80.0, fractions=[0.15, 0.15], removed=[0.0, 20.0])
    assert steps[0][1] == pytest.approx(70.0)  # the first level catches up its 15
    assert steps[1][1] == pytest.approx(70.0)  # the second already did more than its share


def test_the_ledger_adds_up_what_each_level_removed():
    ledger = Ledger()
    for k, levels in enumerate([[(100, 90), (90, 80)], [(80, 80), (80, 70)]]):
        ledger.add(
            EventRecord(
                event=k,
                epoch=k,
                step=k,
                measured={"macs": float(levels[-1][1])},
                target=0.0,
                removed=0.0,
                event_ratio=0.0,
                seconds=0.0,
                levels=[LevelRecord(f"l{j}", b, a, a) for j, (b, a) in enumerate(levels)],
            )
        )
    assert ledger.removed_per_level(2) == [10.0, 20.0]
    assert ledger.removed_per_level(3) == [10.0, 20.0, 0.0]  # a level that never ran owes from zero
    restored = Ledger()
    restored.load_state_dict(ledger.state_dict())
    assert restored.removed_per_level(2) == [10.0, 20.0]
    assert restored.records == ledger.records


def test_levels_have_a_readable_repr_and_distinct_names():
    names = {cls.name for cls in (GlobalLevel, UniformLevel, LayerLevel, UnitLevel, WindowLevel)}
    assert len(names) == 5
    assert "window_size=4" in repr(WindowLevel(window_size=4))


def test_row_norm_helper_sets_scores():
    model, _ = make()
    set_row_scores(model, "features.0", torch.arange(1, 25, dtype=torch.float32))
    norms = model.features[0].weight.detach().flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.arange(1, 25, dtype=torch.float32), atol=1e-4)
    assert isinstance(model.features[0], nn.Conv2d)


def test_take_cheapest_last_resort_closes_the_gap_with_the_least_overshoot():
    from lightning_hprune.core.cost import CostModel, MacsCost
    from lightning_hprune.core.levels import SelectionContext, take_cheapest

    cost = CostModel(cost=MacsCost(), total=1e6, per_channel={"big": 1000.0, "small": 10.0, "mid": 100.0})
    candidates = [(0.1, "big", [0, 1]), (0.2, "mid", [0, 1]), (0.3, "small", [0, 1]), (0.4, "small", [2, 3])]
    ctx = SelectionContext(groups=(), scores={}, cost=cost, original_size={})
    # A gap of 150: the lowest-score chunk (big: 2000) would overshoot by far more than it closes.
    assert take_cheapest(candidates, ctx, 150.0) == {"mid": [0, 1]}  # 200 >= 150: within the rule
    assert ctx.info["predicted"] == 200.0
    ctx = SelectionContext(groups=(), scores={}, cost=cost, original_size={})
    # A gap of 25: the second small chunk would overshoot by 15 to close 5, so it waits.
    assert take_cheapest(candidates, ctx, 25.0) == {"small": [0, 1]}
    ctx = SelectionContext(groups=(), scores={}, cost=cost, original_size={})
    assert take_cheapest(candidates[:1] + candidates[2:], ctx, 150.0) == {"small": [0, 1, 2, 3]}  # 40 < 150
    ctx.info.clear()
    ctx.at_least = True
    # The minimum must be reached: the cheapest next chunk that closes the rest (big), not more.
    got = take_cheapest(candidates[:1] + candidates[2:], ctx, 150.0)
    assert got == {"small": [0, 1, 2, 3], "big": [0, 1]}
    assert ctx.info["predicted"] >= 150.0


def test_the_writing_a_level_example_of_the_docs_runs():
    """`docs/levels.md`, "Writing a level": the example level, verbatim, removes one aligned unit per group."""
    from lightning_hprune.core.levels import ChannelLevel, lowest, min_keep

    class OneEach(ChannelLevel):
        name = "one_each"
        rounds = 1  # one selection per event

        def select(self, ctx, budget):
            out = {}
            for g in ctx.groups:
                floor = min_keep(ctx.original_size[g.name], g.size, self.max_layer_ratio, ctx.align(g))
                if g.size - ctx.align(g) >= floor:
                    out[g.name] = lowest(ctx.scores[g.name], ctx.align(g))
            return out

    _model, graph = make()
    before = widths(graph)
    record = run(graph, OneEach(), target_cost=0.0, round_to=8)
    assert record.rounds == 1
    assert widths(graph) == {k: v - 8 for k, v in before.items()}
    assert record.removed == dict.fromkeys(before, 8)
