"""Rewriters: emit the per-rank form of the ops that need other patches.

One function per :class:`~distrifx.passes.spec.Rewrite` type, in a registry. Each gets the
builder, the old node, its rewrite description and the node's already-mapped arguments, and
returns the new node. The exchange *form* (sync, stale, none) comes from the builder, so each
rewriter is written once for all modes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import Node

from torch.fx import map_arg

from distrifx.config import GNVariant, KVExchange
from distrifx.passes import kernels
from distrifx.passes.builder import Builder, Form, Payload, form_for
from distrifx.passes.kv_source import FLOPS_PER_BYTE, KVSource, find_kv_source, prefer_hidden
from distrifx.passes.rules.registry import add_unique, global_shape, placement_of
from distrifx.passes.rules.spatial import conv_args
from distrifx.passes.spec import GatherKV, GlobalGroupNorm, HaloConv, Rewrite
from distrifx.runtime import ops

__all__ = ["REWRITERS", "rewriter"]

aten = torch.ops.aten
RewriterFn = Callable[[Builder, Node, Any, tuple, dict], Node]
REWRITERS: dict[type[Rewrite], RewriterFn] = {}


def rewriter(kind: type[Rewrite]) -> Callable[[RewriterFn], RewriterFn]:
    def deco(fn: RewriterFn) -> RewriterFn:
        add_unique(REWRITERS, kind, fn, "a rewriter")
        return fn

    return deco


@rewriter(HaloConv)
def _halo_conv(b: Builder, node: Node, rw: HaloConv, args: tuple, kwargs: dict) -> Node:
    x, w, bias, stride, padding, dilation, groups = conv_args(args)  # numeric padding: the rule's args
    kernel = global_shape(node.args[1])[2]
    if rw.from_replicated:
        window = (rw.out_rows_local - 1) * rw.stride + (kernel - 1) * dilation[0] + 1
        start = b.ctx.rank * rw.out_rows_local * rw.stride
        padded = b.call(aten.constant_pad_nd.default, (x, [0, 0, padding[0], padding[0]])) if padding[0] else x
        x_in = b.call(aten.slice.Tensor, (padded, rw.dim, start, start + window))
    else:
        local_rows = global_shape(node.args[0])[rw.dim] // b.ctx.world_size
        own = x if rw.after >= 0 else b.call(aten.slice.Tensor, (x, rw.dim, 0, local_rows + rw.after))
        before, after = rw.before, max(rw.after, 0)
        x_in = own
        if before or after:
            now, stale = b.exchange(f"halo_{node.name}", "halo", ops.neighbour_rows_start,
                                    (x, rw.dim, before, after), Payload.of(node.args[0], rw.dim, local_rows))
            rows = now if now is not None else stale
            if rows is None:  # naive: the patch border is zero-padded like the image border
                x_in = b.call(aten.constant_pad_nd.default, (own, [0, 0, before, after]))
            else:
                prev, nxt = b.trace(kernels.halo_split, rows, rw.dim, before, after)
                x_in = b.call(aten.cat.default, ([prev, own, nxt], rw.dim))
    return b.call(aten.conv2d.default, (x_in, w, bias, stride, [0, padding[1]], dilation, groups))


@rewriter(GlobalGroupNorm)
def _group_norm(b: Builder, node: Node, rw: GlobalGroupNorm, args: tuple, kwargs: dict) -> Node:
    x, groups = args[0], rw.num_groups
    weight, bias, eps = (tuple(args[2:5]) + (None, None, 1e-5)[len(args) - 2:])[:3]
    shape = global_shape(node)
    spec = kernels.GroupNormInput(batch=shape[0], channels=shape[1], spatial=math.prod(shape[2:]) // b.ctx.world_size,
                                  ndim=len(shape), groups=groups, eps=eps, dtype=node.meta["val"].dtype)
    stats = b.trace(kernels.group_stats, x, spec)
    now, stale = b.exchange(f"gn_{node.name}", "gn", ops.all_gather_start, (stats, 0),
                            Payload((1, spec.batch, groups, 2), torch.float32))
    if stale is not None and b.ctx.gn_variant is GNVariant.CORRECTED:
        mean, var = b.trace(kernels.corrected_group_stats, stale, stats, b.ctx.rank)
    else:  # fresh global (sync), previous step's global (stale), or local only (separate)
        mean, var = b.trace(kernels.combine_group_stats, next(s for s in (now, stale, stats) if s is not None))
    return b.trace(kernels.group_norm_apply, x, mean, var, weight, bias, spec)


def _gather_tokens(b: Builder, name: str, old: Node, new: Node, seq_dim: int) -> Node:
    """All ranks' tokens of ``old`` in this phase's form: fresh, stale with this rank's fresh, or local."""
    shard = placement_of(old)
    head, block, tail = b.split_segment(new, old, shard)
    payload = b.block_payload(old, shard)
    now, stale = b.exchange(name, "kv", ops.all_gather_start, (block, seq_dim), payload)
    if now is not None:
        middle = now
    elif stale is not None:
        middle = b.trace(kernels.splice_own, stale, block, seq_dim, b.ctx.rank, payload.shape[seq_dim],
                         b.ctx.world_size)
    else:
        middle = block
    return b.join_segment(head, middle, tail, seq_dim)


def _exchange_hidden(b: Builder, node: Node) -> KVSource | None:
    """The K/V source to exchange instead of K and V, if the options and the cost model say so."""
    source = find_kv_source(node)
    if source is None or form_for("kv", b.ctx) is Form.NONE or b.ctx.kv_exchange is KVExchange.KV:
        return None
    if b.ctx.kv_exchange is KVExchange.HIDDEN:
        return source
    device = source.hidden.meta["val"].device.type
    return source if prefer_hidden(source, b.ctx.world_size, FLOPS_PER_BYTE.get(device, FLOPS_PER_BYTE["cpu"])) else None


def _project(b: Builder, chain: tuple[Node, ...], hidden: Node) -> Node:
    """Re-run a K or V projection chain (global shapes) on the gathered hidden states."""
    value = hidden
    for old in chain:
        rest = map_arg(old.args[1:], lambda n: b.env[n])
        value = b.call(old.target, (value, *rest), map_arg(old.kwargs, lambda n: b.env[n]))
    return value


@rewriter(GatherKV)
def _gather_kv(b: Builder, node: Node, rw: GatherKV, args: tuple, kwargs: dict) -> Node:
    """Queries stay local; keys/values cover every rank's tokens (gathered directly, or projected
    from gathered hidden states when that is cheaper)."""
    q, k, v, *rest = args
    source = _exchange_hidden(b, node)
    if source is not None:
        seq = placement_of(source.hidden).dim
        hidden = _gather_tokens(b, f"h_{node.name}", source.hidden, b.env[source.hidden], seq)
        k, v = (_project(b, chain, hidden) for chain in source.chains)
    else:
        k, v = (_gather_tokens(b, f"{tag}_{node.name}", old, new, rw.seq_dim)
                for tag, old, new in (("k", node.args[1], k), ("v", node.args[2], v)))
    return b.call(node.target, (q, k, v, *rest), kwargs)
