"""Shape ops: views, permutes, concatenation, splitting, slicing.

A view keeps a contiguous shard when the dims before the sharded one are untouched (their product
is the same before and after) and the new dim at that position splits evenly: then each rank's
rows are still one contiguous block. Otherwise the input is gathered first (a visible
redistribution in the plan).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch.fx import Node

from distrifx.passes.rules.registry import (
    RuleContext,
    global_shape,
    placement_of,
    register,
    sharded_inputs,
    tensor_args,
)
from distrifx.passes.spec import Decision, Placement, Replicate, Shard

__all__ = ["view_shard_dim"]

aten = torch.ops.aten


def _norm(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def view_shard_dim(in_shape: Sequence[int], out_shape: Sequence[int], dim: int, n: int) -> int | None:
    """The output dim that holds a contiguous ``n``-way shard of input ``dim`` after a reshape, or None.

    >>> view_shard_dim((2, 8, 4, 4), (2, 8, 16), 2, 2)    # (B, C, H, W) -> (B, C, H*W)
    2
    >>> view_shard_dim((2, 16, 8), (32, 8), 1, 2) is None  # merged with batch: interleaved
    True
    """
    prefix = math.prod(in_shape[:dim])
    for out_dim in range(len(out_shape)):
        if math.prod(out_shape[:out_dim]) == prefix and out_shape[out_dim] % n == 0 and out_shape[out_dim] > 1:
            return out_dim
        if math.prod(out_shape[:out_dim]) > prefix:
            break
    return None


def _gather_first(node: Node) -> Decision:
    """Fallback: the op cannot keep the shard, so it runs on the gathered (replicated) input."""
    return Decision(output=Replicate(), inputs={a: Replicate() for a, _ in sharded_inputs(node)})


def _unsharded(node: Node) -> Decision | None:
    return None if sharded_inputs(node) else Decision(output=Replicate())


def _localized(shape: Sequence[int], dim: int, n: int) -> list[int]:
    out = list(shape)
    out[dim] //= n
    return out


@register(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _view(node: Node, ctx: RuleContext) -> Decision:
    if (d := _unsharded(node)) is not None:
        return d
    x = node.args[0]
    (shard,) = [p for a, p in sharded_inputs(node)]
    out_shape = global_shape(node)
    out_dim = view_shard_dim(global_shape(x), out_shape, shard.dim, ctx.world_size)
    if out_dim is None:
        return _gather_first(node)
    ctx.local_extent(node, out_dim)
    return Decision(output=Shard(out_dim), args=(x, _localized(out_shape, out_dim, ctx.world_size)))


@register(aten.flatten.using_ints)
def _flatten(node: Node, ctx: RuleContext) -> Decision:
    if (d := _unsharded(node)) is not None:
        return d
    x = node.args[0]
    out_dim = view_shard_dim(global_shape(x), global_shape(node), placement_of(x).dim, ctx.world_size)
    if out_dim is None:
        return _gather_first(node)
    ctx.local_extent(node, out_dim)
    return Decision(output=Shard(out_dim))  # flatten takes no sizes: nothing to localize


@register(aten.permute.default)
def _permute(node: Node, ctx: RuleContext) -> Decision:
    if (d := _unsharded(node)) is not None:
        return d
    x, dims = node.args[0], node.args[1]
    rank = len(global_shape(x))
    perm = [_norm(d, rank) for d in dims]
    return Decision(output=Shard(perm.index(placement_of(x).dim)))


@register(aten.transpose.int)
def _transpose(node: Node, ctx: RuleContext) -> Decision:
    if (d := _unsharded(node)) is not None:
        return d
    x, a, b = node.args
    rank = len(global_shape(x))
    a, b = _norm(a, rank), _norm(b, rank)
    dim = placement_of(x).dim
    return Decision(output=Shard({a: b, b: a}.get(dim, dim)))


@register(aten.unsqueeze.default)
def _unsqueeze(node: Node, ctx: RuleContext) -> Decision:
    if (d := _unsharded(node)) is not None:
        return d
    x, k = node.args
    k = _norm(k, len(global_shape(x)) + 1)
    dim = placement_of(x).dim
    return Decision(output=Shard(dim + 1 if k <= dim else dim))


@register(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(node: Node, ctx: RuleContext) -> Decision:
    if (d := _unsharded(node)) is not None:
        return d
    x = node.args[0]
    in_shape = global_shape(x)
    dims = node.args[1] if len(node.args) > 1 else range(len(in_shape))
    dims = [dims] if isinstance(dims, int) else dims
    removed = {_norm(d, len(in_shape)) for d in dims if in_shape[_norm(d, len(in_shape))] == 1}
    dim = placement_of(x).dim
    return Decision(output=Shard(dim - sum(1 for r in removed if r < dim)))


@register(aten.expand.default)
def _expand(node: Node, ctx: RuleContext) -> Decision:
    if (d := _unsharded(node)) is not None:
        return d
    x, sizes = node.args[0], list(node.args[1])
    dim = placement_of(x).dim + len(sizes) - len(global_shape(x))
    if sizes[dim] != -1:
        sizes[dim] = ctx.local_extent(node, dim)
    return Decision(output=Shard(dim), args=(x, sizes))


def _join(node: Node, ctx: RuleContext, new_dim: bool) -> Decision:
    tensors, cat_dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    out_rank = len(global_shape(node))
    cat_dim = _norm(cat_dim, out_rank)
    shards = {p.dim + (new_dim and p.dim >= cat_dim) for _, p in sharded_inputs(node)}
    if not shards:
        return Decision(output=Replicate())
    if len(shards) > 1 or cat_dim in shards:
        return _gather_first(node)
    (out_dim,) = shards
    in_dim = out_dim - (new_dim and out_dim > cat_dim)
    inputs: dict[Node, Placement] = {
        t: Shard(in_dim) for t in tensors if isinstance(t, Node) and isinstance(placement_of(t), Replicate)
    }
    return Decision(output=Shard(out_dim), inputs=inputs)


@register(aten.cat.default)
def _cat(node: Node, ctx: RuleContext) -> Decision:
    return _join(node, ctx, new_dim=False)


@register(aten.stack.default)
def _stack(node: Node, ctx: RuleContext) -> Decision:
    return _join(node, ctx, new_dim=True)


@register(aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int)
def _split(node: Node, ctx: RuleContext) -> Decision:
    count = len(node.meta["val"])
    if not sharded_inputs(node):
        return Decision(output=(Replicate(),) * count)
    x = node.args[0]
    rank = len(global_shape(x))
    if node.target is aten.unbind.int:
        split_dim = node.args[1] if len(node.args) > 1 else 0
    else:
        split_dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    split_dim = _norm(split_dim, rank)
    dim = placement_of(x).dim
    if split_dim == dim:
        return Decision(output=(Replicate(),) * count, inputs={x: Replicate()})
    if node.target is aten.unbind.int:
        dim -= split_dim < dim
    return Decision(output=(Shard(dim),) * count)


@register(operator.getitem)
def _getitem(node: Node, ctx: RuleContext) -> Decision:
    source, index = node.args
    placements = placement_of(source)
    return Decision(output=placements[index] if isinstance(placements, tuple) else Replicate())


@register(aten.slice.Tensor)
def _slice(node: Node, ctx: RuleContext) -> Decision:
    if (d := _unsharded(node)) is not None:
        return d
    x = node.args[0]
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, len(global_shape(x)))
    shard = placement_of(x)
    if dim != shard.dim:
        return Decision(output=shard)
    if global_shape(node) == global_shape(x):  # a full slice is the identity on every rank
        return Decision(output=shard, args=(x, dim, None, None, 1))
    return _gather_first(node)


@register(aten.select.int)
def _select(node: Node, ctx: RuleContext) -> Decision:
    if (d := _unsharded(node)) is not None:
        return d
    x, dim, _ = node.args
    dim = _norm(dim, len(global_shape(x)))
    shard = placement_of(x)
    if dim == shard.dim:
        return _gather_first(node)
    return Decision(output=Shard(shard.dim - (dim < shard.dim)))


@register(aten._assert_tensor_metadata.default)
def _assert_metadata(node: Node, ctx: RuleContext) -> Decision:
    # The check's size/stride are global; the per-rank tensor keeps dtype/device/layout only.
    return Decision(output=None, args=(node.args[0],), kwargs={
        k: v for k, v in node.kwargs.items() if k in ("dtype", "device", "layout")
    })
