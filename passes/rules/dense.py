"""Per-token ops (linear, layer norm, softmax, reductions) and attention."""

from __future__ import annotations

import torch
from torch.fx import Node

from distrifx.errors import ShardingError, where
from distrifx.passes.rules.registry import (RuleContext, global_shape, placement_of, register, sharded_inputs,
                                            weighted_input)
from distrifx.passes.rules.views import gather_first
from distrifx.passes.spec import Decision, GatherKV, Placement, Replicate, Shard

aten = torch.ops.aten


@register(aten.linear.default)
def _linear(node: Node, ctx: RuleContext) -> Decision:
    x, placement = node.args[0], weighted_input(node, "linear")
    if isinstance(placement, Replicate):
        return Decision(output=Replicate())
    if placement.dim == len(global_shape(x)) - 1:
        return gather_first(node)
    return Decision(output=placement)


@register(aten.layer_norm.default, aten.rms_norm.default)
def _layer_norm(node: Node, ctx: RuleContext) -> Decision:
    x, normalized = node.args[0], node.args[1]
    placement = placement_of(x)
    if isinstance(placement, Replicate):
        return Decision(output=Replicate())
    if placement.dim >= len(global_shape(x)) - len(normalized):
        return gather_first(node)
    return Decision(output=placement)


@register(aten.softmax.int, aten._softmax.default, aten.log_softmax.int)
def _softmax(node: Node, ctx: RuleContext) -> Decision:
    x, dim = node.args[0], node.args[1]
    placement = placement_of(x)
    if isinstance(placement, Replicate):
        return Decision(output=Replicate())
    if dim % len(global_shape(x)) == placement.dim:
        return gather_first(node)
    return Decision(output=placement)


@register(aten.mean.default, aten.sum.default)
def _reduce_all(node: Node, ctx: RuleContext) -> Decision:
    """A reduction over every element: gathered first when its input is sharded."""
    return gather_first(node) if sharded_inputs(node) else Decision(output=Replicate())


@register(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
          aten.var.correction, aten.std.correction)
def _reduce(node: Node, ctx: RuleContext) -> Decision:
    x = node.args[0]
    placement = placement_of(x)
    if isinstance(placement, Replicate):
        return Decision(output=Replicate())
    rank = len(global_shape(x))
    dims = node.args[1] if len(node.args) > 1 else None
    dims = [dims] if isinstance(dims, int) else list(dims or range(rank))  # None or []: every dim
    dims = {d % rank for d in dims}
    if placement.dim in dims:
        return gather_first(node)
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    removed = 0 if keepdim else sum(1 for d in dims if d < placement.dim)
    return Decision(output=placement.moved(placement.dim - removed))


@register(aten.scaled_dot_product_attention.default)
def _sdpa(node: Node, ctx: RuleContext) -> Decision:
    """Queries keep their shard; sharded keys/values are gathered; replicated ones (text) are used as is."""
    if not sharded_inputs(node):
        return Decision(output=Replicate())
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    pq, pk, pv = placement_of(q), placement_of(k), placement_of(v)
    rank = len(global_shape(q))
    seq = rank - 2
    for name, p in (("query", pq), ("key", pk), ("value", pv)):
        if isinstance(p, Shard) and p.dim != seq:
            raise ShardingError(
                f"{where(node)}: attention {name} is sharded on dim {p.dim}; only the token "
                f"dim ({seq}) may be sharded. Pass {name} as (batch, heads, tokens, head_dim), as "
                "F.scaled_dot_product_attention expects: transpose heads and tokens before the call."
            )
    if isinstance(pk, Shard) != isinstance(pv, Shard):
        raise ShardingError(f"{where(node)}: keys and values must be both sharded or both replicated. Compute "
                            "both from the same tokens: the image (self-attention) or the text (cross-attention).")
    if node.kwargs.get("is_causal") or (len(node.args) > 5 and node.args[5]):
        raise ShardingError(f"{where(node)}: causal attention over image patches is not supported. Pass the "
                            "causal mask as attn_mask instead (e.g. torch.ones(L, S, dtype=torch.bool).tril()), "
                            "which each rank slices to its queries.")
    inputs: dict[Node, Placement] = {}
    if isinstance(mask, Node) and isinstance(pq, Shard):
        if isinstance(placement_of(mask), Shard):
            raise ShardingError(f"{where(node)}: a sharded attention mask is not supported. Build the mask from "
                                "replicated values (parameters, shapes, text inputs), not from the sharded latent.")
        if global_shape(mask)[-2] != 1:
            inputs[mask] = pq.moved(len(global_shape(mask)) - 2)
    output = pq
    rewrite = GatherKV(seq_dim=seq) if isinstance(pk, Shard) else None
    return Decision(output=output, inputs=inputs, rewrite=rewrite)


@register(aten.einsum.default)
def _einsum(node: Node, ctx: RuleContext) -> Decision:
    """The sharded dim's letter keeps its shard if it survives into the output, else gather."""
    equation, operands = node.args[0], node.args[1]
    if not sharded_inputs(node):
        return Decision(output=Replicate())
    lhs, out = equation.replace(" ", "").split("->")
    subscripts = lhs.split(",")
    letters = {subscripts[i][p.dim] for i, t in enumerate(operands) if isinstance(p := placement_of(t), Shard)}
    shards = {placement_of(t) for t in operands if isinstance(placement_of(t), Shard)}
    if len(letters) != 1 or len(shards) != 1 or "..." in equation or next(iter(letters)) not in out:
        return gather_first(node)
    (letter,), (shard,) = letters, shards
    inputs: dict[Node, Placement] = {
        t: shard.moved(subscripts[i].index(letter))
        for i, t in enumerate(operands)
        if isinstance(placement_of(t), Replicate) and letter in subscripts[i]
        and global_shape(t)[subscripts[i].index(letter)] != 1
    }
    return Decision(output=shard.moved(out.index(letter)), inputs=inputs)
