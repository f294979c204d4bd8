"""FSDP2 mechanics without a Trainer: one process, a one-rank gloo group, real ``fully_shard`` modules.

One rank still makes every parameter a sharded ``DTensor`` with FSDP's hooks, classes and state, so
taking FSDP off, putting it back and carrying optimizer state are all exercised here in a second; the
two-process runs are in ``tests/test_fsdp.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from lightning_hprune.core.graph import PruningGraph
from lightning_hprune.core.optim_state import remap_optimizer
from lightning_hprune.core.sharding import (
    ShardingError,
    find_units,
    is_dtensor,
    is_sharded,
    releasing,
    reshard_all,
    unshard,
)
from lightning_hprune.core.undo import Snapshot

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def mesh() -> Iterator[Any]:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )


def _sharded(mesh: Any) -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    net = _net()
    fully_shard(net[0], mesh=mesh)
    fully_shard(net[3], mesh=mesh, reshard_after_forward=False)
    fully_shard(net, mesh=mesh)
    return net


def _step(net: nn.Module, opt: torch.optim.Optimizer) -> None:
    net(X).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if is_dtensor(t) else t).detach().clone()


def test_unshard_gives_the_plain_model_and_undo_puts_fsdp_back(mesh: Any) -> None:
    net = _sharded(mesh)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    _step(net, opt)
    reshard_all(net)
    sharded = list(net.parameters())
    assert all(is_dtensor(p) for p in sharded)
    values = [_full(p) for p in sharded]
    expected = net(X).detach()
    reshard_all(net)
    snapshot = Snapshot(net, [opt])
    full = unshard(net)
    assert not is_sharded(net)
    assert [type(m) for m in net] == [type(m) for m in _net()]
    plain = list(net.parameters())
    assert not any(is_dtensor(p) for p in plain)
    assert all(torch.equal(p, v) for p, v in zip(plain, values, strict=True))
    assert [full.gathered[id(s)] for s in sharded] == plain
    torch.testing.assert_close(net(X), expected, rtol=0, atol=0)
    snapshot.restore()
    full.undo()
    assert is_sharded(net)
    assert all(a is b for a, b in zip(net.parameters(), sharded, strict=True))  # the very same DTensors
    torch.testing.assert_close(net(X).detach(), expected, rtol=0, atol=0)
    _step(net, opt)  # FSDP's hooks and the optimizer work again
    reshard_all(net)
    again = unshard(net)  # and FSDP can be taken off (and applied) once more
    assert not is_sharded(net)
    again.reshard()
    assert is_sharded(net)


@pytest.mark.parametrize("hsdp", [False, True], ids=["fsdp-mesh", "hsdp-mesh"])
def test_pruning_the_gathered_model_then_resharding_carries_adam_state(mesh: Any, hsdp: bool) -> None:
    if hsdp:  # a 2-D (replicate, shard) mesh: parameters are (Replicate(), Shard(0)) DTensors
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
    net, ref = _sharded(mesh), _net()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    _step(net, opt)
    _step(ref, ref_opt)
    reshard_all(net)
    units_before = [(type(u.modules[0]).__name__, u.reshard_after_forward) for u in find_units(net)]
    state_before = {n: {k: _full(v) for k, v in opt.state[p].items()} for n, p in net.named_parameters()}
    full = unshard(net)
    removals = {"0": [1, 2, 3], "3": [0, 5]}
    with releasing(net, full.gathered.values()):
        surgery = PruningGraph(net, X[:1]).prune(removals)
    after = full.reshard()
    assert remap_optimizer(opt, surgery, list(net.parameters()), before=full.gathered, after=after) == []
    # The same prune on an unsharded twin, with the single-device path.
    ref_surgery = PruningGraph(ref, X[:1]).prune(removals)
    assert remap_optimizer(ref_opt, ref_surgery, list(ref.parameters())) == []

    assert is_sharded(net)
    assert all(is_dtensor(p) for p in net.parameters())
    assert all(len(p.placements) == (2 if hsdp else 1) for p in net.parameters())
    assert [(type(u.modules[0]).__name__, u.reshard_after_forward) for u in find_units(net)] == units_before
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in net.parameters()}
    keep0 = [i for i in range(16) if i not in removals["0"]]
    keep3 = [i for i in range(16) if i not in removals["3"]]
    new = {n: {k: _full(v) for k, v in opt.state[p].items()} for n, p in net.named_parameters()}
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(new["0.weight"][key], state_before["0.weight"][key][keep0])
        assert torch.equal(new["1.weight"][key], state_before["1.weight"][key][keep0])
        assert torch.equal(new["3.weight"][key], state_before["3.weight"][key][keep3][:, keep0])
        assert torch.equal(new["6.bias"][key], state_before["6.bias"][key])
    assert all(float(s["step"]) == 1.0 for s in new.values())
    # Training goes on exactly like the unsharded twin (one rank: FSDP averages over a single rank).
    _step(net, opt)
    _step(ref, ref_opt)
    reshard_all(net)
    for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(_full(p), q.detach(), rtol=1e-6, atol=1e-7, msg=name)


def test_releasing_frees_each_gathered_parameter_that_pruning_replaced(mesh: Any) -> None:
    net = _sharded(mesh)
    full = unshard(net)
    kept = net[6].bias  # not pruned: the output layer's bias keeps its width
    replaced = net[0].weight
    with releasing(net, full.gathered.values()):
        PruningGraph(net, X[:1]).prune({"0": [0, 1]})
    assert replaced.numel() == 0  # the gathered original: freed (the sharded one is what an undo restores)
    assert net[0].weight.shape[0] == 14
    assert kept is net[6].bias
    assert kept.numel() == 10
    net(X)  # the pruned, gathered model still runs


def test_grouped_units_placements_and_ignored_parameters_are_applied_again(mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    net = _net()
    fully_shard([net[0], net[1]], mesh=mesh)
    fully_shard(
        net,
        mesh=mesh,
        ignored_params={net[6].bias},
        shard_placement_fn=lambda p: Shard(1) if p is net[3].weight else None,
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    _step(net, opt)
    reshard_all(net)
    full = unshard(net)
    assert (
        len(full.gathered) == len(list(net.parameters())) - 1
    )  # each once, but the ignored bias: not at all
    surgery = PruningGraph(net, X[:1]).prune({"0": [3]})
    after = full.reshard()
    assert remap_optimizer(opt, surgery, list(net.parameters()), before=full.gathered, after=after) == []
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in net.parameters()}
    assert all(opt.state[p]["momentum_buffer"].shape == p.shape for p in held)  # no state lost
    units = find_units(net)
    assert [len(u.modules) for u in units] == [1, 2]  # the root, then the grouped call
    assert units[1].modules == (net[0], net[1])
    assert [(m, n, p) for m, n, p in units[0].placements] == [(net[3], "weight", Shard(1))]
    assert net[3].weight.placements == (Shard(1),)
    assert [(m, n) for m, n in units[0].ignored] == [(net[6], "bias")]
    assert not is_dtensor(net[6].bias)
    assert net[0].weight.shape[0] == 15
    net(X).sum().backward()


def test_a_dtensor_parameter_fsdp_does_not_manage_is_refused(mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    net = _net()
    net[6].weight = nn.Parameter(distribute_tensor(net[6].weight.detach(), mesh, [Replicate()]))
    fully_shard(net, mesh=mesh, ignored_params={net[6].weight})
    with pytest.raises(
        ShardingError, match=r"6\.weight is a DTensor FSDP does not manage.*tensor_parallel_size=1"
    ):
        unshard(net)
    assert is_sharded(net)  # refused before anything changed


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.conv(x))


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_Block(), _Block(), _Block())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def test_a_removed_block_drops_its_unit_and_its_optimizer_state(mesh: Any) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    net = _ResNet()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in net.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh, mp_policy=policy)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    _step(net, opt)
    reshard_all(net)
    removed = list(net.blocks[1].parameters())  # held, so that their ids stay theirs
    full = unshard(net)
    graph = PruningGraph(net, X[:1])
    with releasing(net, full.gathered.values()):
        graph.replace_with_identity(["blocks.1"])
        stream = next(g.name for g in graph.groups() if "stem" in g.outputs)  # the residual stream
        surgery = graph.prune({stream: [0, 1]})
    after = full.reshard()
    remap_optimizer(opt, surgery, list(net.parameters()), before=full.gathered, after=after)
    units = find_units(net)
    assert [u.modules[0] for u in units] == [net, net.blocks[0], net.blocks[2]]  # blocks.1's unit is gone
    assert all(u.mp_policy == policy for u in units)
    assert all(is_dtensor(p) for p in net.parameters())
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in net.parameters()}
    assert removed
    assert not {id(p) for p in removed} & {id(p) for p in opt.state}
    assert net.blocks[0].conv.weight.shape == (6, 6, 3, 3)
    assert all(opt.state[p]["momentum_buffer"].shape == p.shape for p in held)
    _step(net, opt)  # bf16 forward through the re-applied policy, then an SGD step
