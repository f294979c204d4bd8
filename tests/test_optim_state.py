import pytest
import torch
import torch.nn as nn

from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.optim_state import remap_optimizer


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 5),
    )


def _train_steps(model, opt, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 3, 4, 4)).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize(
    ("make_opt", "keys"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), ["momentum_buffer"]),
        (lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True), ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
        (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1), ["exp_avg", "exp_avg_sq"]),
        (lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5), ["square_avg", "momentum_buffer"]),
    ],
)
def test_optimizer_state_follows_kept_channels(make_opt, keys):
    model = _net()
    opt = make_opt(model.parameters())
    _train_steps(model, opt)
    before = {
        id(p): (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
        for p in model.parameters()
    }
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]

    graph = PruningGraph(model, torch.randn(1, 3, 4, 4))
    surgery = graph.prune({"0": [1, 5, 7], "3": [0, 2]})
    problems = remap_optimizer(opt, surgery, model.parameters())
    assert problems == []

    live = list(model.parameters())
    assert [p for g in opt.param_groups for p in g["params"]] == live
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == hyper
    changed = {id(c.new): c for c in surgery.changes}
    assert len(changed) >= 6  # conv0 w/b, bn w/b, conv3 w/b, linear w
    for p in live:
        state = opt.state[p]
        if id(p) in changed:
            c = changed[id(p)]
            old_w, old_state = before[id(c.old)]
            # The recorded indices reproduce the new weights from the old ones...
            assert torch.equal(c.apply(old_w), p.detach())
            # ...and the optimizer state was sliced with exactly the same indices.
            for k in keys:
                assert torch.equal(state[k], c.apply(old_state[k])), k
            if "step" in old_state:
                assert torch.equal(state["step"], old_state["step"])
        else:
            old_w, old_state = before[id(p)]
            for k in keys:
                assert torch.equal(state[k], old_state[k])
    # the optimizer still steps on the pruned model
    _train_steps(model, opt, 1)


def test_removed_parameters_leave_the_optimizer():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train_steps(model, opt)
    graph = PruningGraph(model, torch.randn(1, 3, 4, 4))
    graph.replace_with_identity(["3"])  # 16 -> 16 conv, same shapes: can go
    surgery = graph.prune({})
    remap_optimizer(opt, surgery, model.parameters())
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))
    assert set(map(id, opt.state)) <= {id(p) for p in model.parameters()}
