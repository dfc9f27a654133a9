"""Ops that look across rows: convolution, GroupNorm, nearest upsampling."""

from __future__ import annotations

import torch
from torch.fx import Node

from distrifx.errors import ShapeError, ShardingError, where
from distrifx.passes.rules.registry import (RuleContext, global_shape, placement_of, register, sharded_inputs,
                                            weighted_input)
from distrifx.passes.spec import Decision, GlobalGroupNorm, HaloConv, Replicate, Shard

__all__ = ["conv_halo"]

aten = torch.ops.aten


def _pair(value: int | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def conv_halo(kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, int]:
    """Rows a patch needs before and after its own for a conv along the sharded dim.

    With H_in = stride * H_out, rank r's output rows [r*h, (r+1)*h) read input rows
    [r*h*s - p, (r+1)*h*s - s - p + (k-1)*d + 1): ``p`` rows before its patch and
    ``(k-1)*d + 1 - p - s`` after (negative: trailing rows it never reads).

    >>> conv_halo(3, 1, 1, 1), conv_halo(3, 2, 1, 1), conv_halo(2, 2, 0, 1)
    ((1, 1), (1, 0), (0, 0))
    """
    return padding, (kernel - 1) * dilation + 1 - padding - stride


@register(aten.conv2d.default)
def _conv2d(node: Node, ctx: RuleContext) -> Decision:
    x, placement = node.args[0], weighted_input(node, "conv")
    stride, padding, dilation = (_pair(node.args[i]) if len(node.args) > i else (d, d)
                                 for i, d in ((3, 1), (4, 0), (5, 1)))
    in_h, out_h = global_shape(x)[2], global_shape(node)[2]
    if isinstance(placement, Shard) and (placement.dim != 2 or not placement.plain):
        raise ShardingError(
            f"{where(node)}: conv input is sharded as {placement}; distrifx shards convs along the "
            "height (dim 2) only, in plain row blocks."
        )
    if out_h % ctx.world_size:
        raise ShapeError(
            f"{where(node)}: conv output height {out_h} does not split over {ctx.world_size} ranks."
        )
    if isinstance(placement, Shard) and in_h != stride[0] * out_h:
        raise ShapeError(
            f"{where(node)}: conv maps height {in_h} to {out_h} with stride {stride[0]}; row "
            f"patches need input height = stride x output height ({stride[0] * out_h})."
        )
    before, after = conv_halo(global_shape(node.args[1])[2], stride[0], padding[0], dilation[0])
    rewrite = HaloConv(
        dim=2,
        before=before,
        after=after,
        from_replicated=isinstance(placement, Replicate),
        out_rows_local=out_h // ctx.world_size,
        stride=stride[0],
    )
    return Decision(output=Shard(2), rewrite=rewrite)


@register(aten.group_norm.default)
def _group_norm(node: Node, ctx: RuleContext) -> Decision:
    x = node.args[0]
    placement = placement_of(x)
    if isinstance(placement, Replicate):
        return Decision(output=Replicate())
    if placement.dim < 2 or not placement.plain:
        raise ShardingError(
            f"{where(node)}: GroupNorm input is sharded as {placement}; only plain blocks of "
            "spatial dims (>= 2) may be sharded."
        )
    return Decision(output=placement, rewrite=GlobalGroupNorm(num_groups=node.args[1]))


def _nearest_scale(node: Node, dim: int) -> int:
    in_rows, out_rows = global_shape(node.args[0])[dim], global_shape(node)[dim]
    if out_rows % in_rows:
        raise ShardingError(
            f"{where(node)}: nearest upsampling from {in_rows} to {out_rows} rows is not an integer "
            "scale, so output rows would read across patches. Use an integer scale factor."
        )
    return out_rows // in_rows


@register(aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default)
def _upsample_nearest(node: Node, ctx: RuleContext) -> Decision:
    if not sharded_inputs(node):
        return Decision(output=Replicate())
    x = node.args[0]
    dim = placement_of(x).dim
    if placement_of(x) != Shard(2):
        raise ShardingError(f"{where(node)}: upsampling input sharded as {placement_of(x)}, expected S(2).")
    _nearest_scale(node, dim)
    output_size = node.args[1]
    if output_size is None:  # scale factors only: nothing global in the arguments
        return Decision(output=Shard(dim))
    local = [ctx.local_extent(node, Shard(2)), output_size[1]]
    return Decision(output=Shard(dim), args=(x, local, *node.args[2:]))
