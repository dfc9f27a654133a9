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
)
from distrifx.passes.spec import Decision, Placement, Replicate, Shard

__all__ = ["view_shard_dim", "gather_first"]

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


def _reshaped_shard(x: Node, out_shape: Sequence[int], shard: Shard, n: int) -> Shard | None:
    """Where ``shard`` of ``x`` lands after a reshape to ``out_shape``, or None if it does not survive."""
    in_shape = global_shape(x)
    if shard.plain:
        out_dim = view_shard_dim(in_shape, out_shape, shard.dim, n)
        return None if out_dim is None else Shard(out_dim)
    # with replicated head/tail rows, only reshapes that leave the sharded dim itself alone
    prefix = math.prod(in_shape[: shard.dim])
    for out_dim, extent in enumerate(out_shape):
        if math.prod(out_shape[:out_dim]) == prefix and extent == in_shape[shard.dim]:
            return shard.moved(out_dim)
    return None


def gather_first(node: Node, outputs: int | None = None) -> Decision:
    """Fallback: the op cannot keep the shard, so it runs on the gathered (replicated) inputs."""
    output = Replicate() if outputs is None else (Replicate(),) * outputs
    return Decision(output=output, inputs={a: Replicate() for a, _ in sharded_inputs(node)})


def _unsharded(node: Node) -> Decision | None:
    return None if sharded_inputs(node) else Decision(output=Replicate())


@register(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
          aten.unflatten.int)
def _reshape(node: Node, ctx: RuleContext) -> Decision:
    """The shard moves where the reshape keeps it contiguous (else the input is gathered first); the
    sizes given are localized: a view's whole shape, unflatten's split sizes (flatten takes none)."""
    if (d := _unsharded(node)) is not None:
        return d
    x = node.args[0]
    shard = _reshaped_shard(x, global_shape(node), placement_of(x), ctx.world_size)
    if shard is None:
        return gather_first(node)
    local = ctx.localized(node, shard)  # checks that the sharded dim splits evenly, for flatten too
    if node.target is aten.flatten.using_ints:
        return Decision(output=shard)
    if node.target is aten.unflatten.int:
        dim = _norm(node.args[1], len(global_shape(x)))
        return Decision(output=shard, args=(x, node.args[1], local[dim : dim + len(node.args[2])]))
    return Decision(output=shard, args=(x, local))


@register(aten.permute.default)
def _permute(node: Node, ctx: RuleContext) -> Decision:
    if (d := _unsharded(node)) is not None:
        return d
    x, dims = node.args[0], node.args[1]
    perm = [_norm(d, len(global_shape(x))) for d in dims]
    shard = placement_of(x)
    return Decision(output=shard.moved(perm.index(shard.dim)))


@register(aten.transpose.int)
def _transpose(node: Node, ctx: RuleContext) -> Decision:
    if (d := _unsharded(node)) is not None:
        return d
    x, a, b = node.args
    rank = len(global_shape(x))
    a, b = _norm(a, rank), _norm(b, rank)
    shard = placement_of(x)
    return Decision(output=shard.moved({a: b, b: a}.get(shard.dim, shard.dim)))


@register(aten.unsqueeze.default)
def _unsqueeze(node: Node, ctx: RuleContext) -> Decision:
    if (d := _unsharded(node)) is not None:
        return d
    x, k = node.args
    k = _norm(k, len(global_shape(x)) + 1)
    shard = placement_of(x)
    return Decision(output=shard.moved(shard.dim + 1 if k <= shard.dim else shard.dim))


@register(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(node: Node, ctx: RuleContext) -> Decision:
    if (d := _unsharded(node)) is not None:
        return d
    x = node.args[0]
    in_shape = global_shape(x)
    dims = node.args[1] if len(node.args) > 1 else range(len(in_shape))
    dims = [dims] if isinstance(dims, int) else dims
    removed = {_norm(d, len(in_shape)) for d in dims if in_shape[_norm(d, len(in_shape))] == 1}
    shard = placement_of(x)
    return Decision(output=shard.moved(shard.dim - sum(1 for r in removed if r < shard.dim)))


@register(aten.expand.default)
def _expand(node: Node, ctx: RuleContext) -> Decision:
    if (d := _unsharded(node)) is not None:
        return d
    x, sizes = node.args[0], list(node.args[1])
    shard = placement_of(x)
    shard = shard.moved(shard.dim + len(sizes) - len(global_shape(x)))
    if sizes[shard.dim] != -1:
        sizes[shard.dim] = ctx.local_extent(node, shard)
    return Decision(output=shard, args=(x, sizes))


def _cat_along_shard(node: Node, tensors: Sequence[Node], dim: int) -> Decision:
    """One sharded input among replicated ones along the cat dim: they become head/tail rows."""
    sharded = [i for i, t in enumerate(tensors) if isinstance(placement_of(t), Shard)]
    if len(sharded) != 1:
        return gather_first(node)
    (i,) = sharded
    shard = placement_of(tensors[i])
    head = sum(global_shape(t)[dim] for t in tensors[:i]) + shard.head
    tail = sum(global_shape(t)[dim] for t in tensors[i + 1 :]) + shard.tail
    return Decision(output=Shard(dim, head, tail))


def _join(node: Node, ctx: RuleContext, new_dim: bool) -> Decision:
    tensors, cat_dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    cat_dim = _norm(cat_dim, len(global_shape(node)))
    shards = {p.moved(p.dim + (new_dim and p.dim >= cat_dim)) for _, p in sharded_inputs(node)}
    if not shards:
        return Decision(output=Replicate())
    if not new_dim and any(s.dim == cat_dim for s in shards):
        return _cat_along_shard(node, tensors, cat_dim)
    if len(shards) > 1:
        return gather_first(node)
    (out,) = shards
    arg = out.moved(out.dim - (new_dim and out.dim > cat_dim))
    inputs: dict[Node, Placement] = {
        t: arg for t in tensors if isinstance(t, Node) and isinstance(placement_of(t), Replicate)
    }
    return Decision(output=out, inputs=inputs)


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
    shard = placement_of(x)
    if split_dim == shard.dim and node.target is aten.split_with_sizes.default:
        return _split_segments(node, ctx, shard)
    if split_dim == shard.dim:
        return gather_first(node, outputs=count)
    if node.target is aten.unbind.int:
        shard = shard.moved(shard.dim - (split_dim < shard.dim))
    return Decision(output=(shard,) * count)


def _split_segments(node: Node, ctx: RuleContext, shard: Shard) -> Decision:
    """Splitting exactly into head, sharded segment and tail: each piece keeps its own placement."""
    x, sizes = node.args[0], list(node.args[1])
    extent = global_shape(x)[shard.dim]
    segment = extent - shard.head - shard.tail
    pieces = [(shard.head, Replicate()), (segment, Shard(shard.dim)), (shard.tail, Replicate())]
    pieces = [(size, p) for size, p in pieces if size]
    if sizes != [size for size, _ in pieces]:
        return gather_first(node, outputs=len(sizes))
    block = ctx.local_extent(x, shard) - shard.head - shard.tail
    local = [block if isinstance(p, Shard) else size for size, p in pieces]
    return Decision(output=tuple(p for _, p in pieces), args=(x, local, *node.args[2:]))


@register(operator.getitem)
def _getitem(node: Node, ctx: RuleContext) -> Decision:
    source, index = node.args
    placements = placement_of(source)
    return Decision(output=placements[index] if isinstance(placements, tuple) else Replicate())


@register(aten.slice.Tensor)
def _slice(node: Node, ctx: RuleContext) -> Decision:
    """Along the sharded dim: the whole dim, or exactly its head, its sharded segment or its tail."""
    if (d := _unsharded(node)) is not None:
        return d
    x = node.args[0]
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, len(global_shape(x)))
    extent = global_shape(x)[dim]
    shard = placement_of(x)
    if dim != shard.dim:
        return Decision(output=shard)
    start, end = (node.args[2] if len(node.args) > 2 else 0) or 0, node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    end = extent if end is None else min(end, extent)
    start, end = _norm(start, extent), _norm(end, extent)
    local = ctx.local_extent(x, shard)
    block = local - shard.head - shard.tail
    pieces = {
        (0, extent): (shard, 0, local),
        (0, shard.head): (Replicate(), 0, shard.head),
        (shard.head, extent - shard.tail): (Shard(dim), shard.head, shard.head + block),
        (extent - shard.tail, extent): (Replicate(), shard.head + block, local),
    }
    if step != 1 or (start, end) not in pieces:
        return gather_first(node)
    placement, lo, hi = pieces[(start, end)]
    return Decision(output=placement, args=(x, dim, lo, hi, 1))


@register(aten.select.int)
def _select(node: Node, ctx: RuleContext) -> Decision:
    if (d := _unsharded(node)) is not None:
        return d
    x, dim, _ = node.args
    dim = _norm(dim, len(global_shape(x)))
    shard = placement_of(x)
    if dim == shard.dim:
        return gather_first(node)
    return Decision(output=shard.moved(shard.dim - (dim < shard.dim)))


@register(aten._assert_tensor_metadata.default)
def _assert_metadata(node: Node, ctx: RuleContext) -> Decision:
    # The check's size/stride are global; the per-rank tensor keeps dtype/device/layout only.
    return Decision(output=None, args=(node.args[0],), kwargs={
        k: v for k, v in node.kwargs.items() if k in ("dtype", "device", "layout")
    })
