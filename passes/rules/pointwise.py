"""Elementwise ops: the output keeps the shard of its inputs (with broadcasting)."""

from __future__ import annotations

import torch
from torch.fx import Node

from distrifx.errors import ShardingError, where
from distrifx.passes.rules.registry import (
    RuleContext,
    global_shape,
    placement_of,
    register,
    sharded_inputs,
    tensor_args,
)
from distrifx.passes.spec import Decision, Placement, Replicate

__all__ = ["pointwise", "POINTWISE_OPS"]

aten = torch.ops.aten

POINTWISE_OPS = (
    aten.add, aten.sub, aten.mul, aten.div, aten.rsub, aten.neg, aten.abs, aten.pow,
    aten.exp, aten.log, aten.sqrt, aten.rsqrt, aten.reciprocal, aten.square, aten.sin, aten.cos,
    aten.tanh, aten.sigmoid, aten.erf, aten.silu, aten.gelu, aten.relu, aten.leaky_relu,
    aten.mish, aten.softplus, aten.hardswish, aten.clamp, aten.clamp_min, aten.clamp_max,
    aten.maximum, aten.minimum, aten.where, aten.lerp, aten.addcmul, aten.masked_fill,
    aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.logical_not,
    aten.clone, aten.contiguous, aten.alias, aten.detach, aten.to, aten._to_copy, aten.type_as,
    aten.dropout, aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like,
    aten.nan_to_num, aten.float_power,
)


def pointwise(node: Node, ctx: RuleContext) -> Decision:
    """Elementwise with broadcasting: dims align from the right.

    A replicated operand that is full-size along the sharded dim is sliced locally (no
    communication); one that broadcasts along it (size 1 or missing) is used as is.
    """
    out_rank = len(global_shape(node))
    shards = {p.moved(p.dim + out_rank - len(global_shape(a))) for a, p in sharded_inputs(node)}
    if not shards:
        return Decision(output=Replicate())
    if len(shards) > 1:
        raise ShardingError(
            f"{where(node)}: operands are sharded differently ({', '.join(sorted(map(str, shards)))}); "
            "distrifx keeps one spatial shard per tensor. Add a rule for this op that reshards "
            "explicitly (docs/rules.md)."
        )
    (out,) = shards
    inputs: dict[Node, Placement] = {}
    for arg in tensor_args(node):
        if not isinstance(placement_of(arg), Replicate):
            continue
        arg_dim = out.dim - (out_rank - len(global_shape(arg)))
        if arg_dim >= 0 and global_shape(arg)[arg_dim] != 1:
            inputs[arg] = out.moved(arg_dim)
    return Decision(output=out, inputs=inputs)


register(*POINTWISE_OPS)(pointwise)
