"""The simplify pass: identities and metadata checks leave the captured graph, nothing else does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distrifx
from distrifx.capture import capture
from distrifx.inspect import graph_calls
from distrifx.models import random_unet, unet_inputs
from distrifx.passes import PassContext, Phase, build_rank_graph
from distrifx.passes.simplify import identity, simplify

aten = torch.ops.aten


class _Casts(nn.Module):
    """Eval dropout, a cast to the dtype a tensor has, real casts and a forced copy."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.1)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.lin(x)).to(torch.float32)
        return y + y.to(torch.float64).sum().to(y.dtype) + y.to(torch.float32, copy=True)


def _targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _captured(model: nn.Module, *args: torch.Tensor) -> torch.fx.GraphModule:
    return capture(model.eval(), args, {}).graph_module


def test_identities_and_checks_go_and_real_casts_stay():
    model, x = _Casts(), torch.randn(2, 4)
    gm = _captured(model, x)
    before = _targets(gm)
    assert aten.dropout.default in before and aten._assert_tensor_metadata.default in before

    result = simplify(gm, PassContext(rank=0, world_size=1))

    after = _targets(gm)
    assert result.modified
    assert aten.dropout.default not in after and aten._assert_tensor_metadata.default not in after
    casts = [n for n in gm.graph.nodes if n.target is aten.to.dtype]
    # to float64, back to float32, and the forced copy; the cast of a float32 tensor to float32 is gone
    assert [(n.args[1], n.args[3] if len(n.args) > 3 else False) for n in casts] == [
        (torch.float64, False), (torch.float32, False), (torch.float32, True)]
    assert torch.equal(gm(x)[0], model(x))
    assert not simplify(gm, PassContext(rank=0, world_size=1)).modified  # idempotent


def test_dropout_that_drops_stays():
    gm = _captured(_Casts(), torch.randn(2, 4))
    (drop,) = [n for n in gm.graph.nodes if n.target is aten.dropout.default]
    drop.args = (drop.args[0], drop.args[1], True)  # as a training graph would have it
    simplify(gm, PassContext(rank=0, world_size=1))
    assert aten.dropout.default in _targets(gm)


def test_a_rank_makes_fewer_calls_per_step_with_the_pass():
    unet = random_unet("sdxl")
    args, kwargs = unet_inputs(unet)
    captured = capture(unet.eval(), args, kwargs)
    ctx = PassContext(rank=1, world_size=2, phase=Phase.STALE)
    with captured.lock:  # this capture is fresh: nothing simplified it yet
        unsimplified = build_rank_graph(captured.graph_module, ctx, skip=("simplify",))
    plan = distrifx.explain(unet, args, kwargs, world_size=2, rank=1, mode="stale")
    assert plan.calls(Phase.STALE) < graph_calls(unsimplified)
    assert f" collectives, {plan.calls(Phase.STALE)} calls" in plan.summary()


def test_a_unets_rank_graphs_keep_no_dropout_or_check():
    """(That they stay exact is every sync test's business.)"""
    unet = random_unet("sd15")
    args, kwargs = unet_inputs(unet)
    plan = distrifx.explain(unet, args, kwargs, world_size=2, mode="stale")
    left = {t for gm in plan.graphs.values() for t in _targets(gm)}
    assert aten.conv2d.default in left
    assert not left & {aten.dropout.default, aten._assert_tensor_metadata.default}


def test_registering_an_identity_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        identity(aten.dropout.default)(lambda node: True)
