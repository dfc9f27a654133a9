"""Ops that look across rows: convolution, GroupNorm, nearest upsampling."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import Node

from distrifx.errors import ShapeError, ShardingError, where
from distrifx.passes.rules.registry import (RuleContext, global_shape, placement_of, register, sharded_inputs,
                                            weighted_input)
from distrifx.passes.spec import Decision, GlobalGroupNorm, HaloConv, Replicate, Shard

__all__ = ["conv_args", "conv_halo"]

aten = torch.ops.aten


def _pair(value: int | Sequence[int]) -> list[int]:
    """A conv's (height, width) argument, given as an int or a one- or two-element list."""
    return [value, value] if isinstance(value, int) else [value[0], value[-1]]


def conv_args(args: Sequence[Any], padding: int | str = 0) -> tuple[Any, ...]:
    """(x, weight, bias, stride, padding, dilation, groups) of a conv2d with the schema's defaults filled
    in (``padding``: the overload's default), stride, padding and dilation as [height, width] lists; a
    "same"/"valid" padding stays a string."""
    defaults = (None, None, None, 1, padding, 1, 1)
    x, w, b, stride, pad, dilation, groups = (*args, *defaults[len(args):])
    return x, w, b, _pair(stride), pad if isinstance(pad, str) else _pair(pad), _pair(dilation), groups


def conv_halo(kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, int]:
    """Rows a patch needs before and after its own for a conv along the sharded dim.

    With H_in = stride * H_out, rank r's output rows [r*h, (r+1)*h) read input rows
    [r*h*s - p, (r+1)*h*s - s - p + (k-1)*d + 1): ``p`` rows before its patch and
    ``(k-1)*d + 1 - p - s`` after (negative: trailing rows it never reads).

    >>> conv_halo(3, 1, 1, 1), conv_halo(3, 2, 1, 1), conv_halo(2, 2, 0, 1)
    ((1, 1), (1, 0), (0, 0))
    """
    return padding, (kernel - 1) * dilation + 1 - padding - stride


def _check_halo(node: Node, ctx: RuleContext, before: int, after: int) -> None:
    """A ShapeError unless each rank's input patch holds the rows its neighbours' halos take from it."""
    in_h = global_shape(node.args[0])[2]
    local, halo = in_h // ctx.world_size, max(before, after)
    if halo > local:
        raise ShapeError(
            f"{where(node)}: conv needs {before} rows before and {after} rows after each row patch, but each "
            f"of the {ctx.world_size} ranks holds only {local} of its {in_h} input rows, and a halo may only "
            f"reach the neighbouring patch. This conv needs at least {halo * ctx.world_size} input rows "
            f"({halo} per rank): make the model input at least {math.ceil(halo * ctx.world_size / in_h)}x "
            f"taller, or use at most {in_h // halo} ranks."
        )


def _conv(node: Node, ctx: RuleContext, args: Sequence[Any]) -> Decision:
    """The conv2d rule, for the conv ``args`` (numeric padding) of ``node``."""
    x, w, _, stride, padding, dilation, _ = conv_args(args)
    placement = weighted_input(node, "conv")
    in_h, out_h = global_shape(x)[2], global_shape(node)[2]
    if isinstance(placement, Shard) and (placement.dim != 2 or not placement.plain):
        raise ShardingError(
            f"{where(node)}: conv input is sharded as {placement}; distrifx shards convs along the "
            "height (dim 2) only, in plain row blocks. Feed the conv the (B, C, H, W) activation itself: "
            "move a permute, or a cat/pad along the height, after the conv."
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
    before, after = conv_halo(global_shape(w)[2], stride[0], padding[0], dilation[0])
    if isinstance(placement, Shard):
        _check_halo(node, ctx, before, after)
    rewrite = HaloConv(
        dim=2,
        before=before,
        after=after,
        from_replicated=isinstance(placement, Replicate),
        out_rows_local=out_h // ctx.world_size,
        stride=stride[0],
    )
    return Decision(output=Shard(2), rewrite=rewrite)


@register(aten.conv2d.default)
def _conv2d(node: Node, ctx: RuleContext) -> Decision:
    return _conv(node, ctx, node.args)


def _numeric_padding(node: Node, mode: str, dilation: list[int]) -> list[int]:
    """The [height, width] padding equal to ``padding=mode``: none for "valid", half the effective
    kernel for "same" (which must then be odd: even ones pad one row more after than before)."""
    if mode == "valid":
        return [0, 0]
    spans = [d * (k - 1) for d, k in zip(dilation, global_shape(node.args[1])[2:])]
    if any(span % 2 for span in spans):
        raise ShardingError(
            f"{where(node)}: padding='same' with kernel {list(global_shape(node.args[1])[2:])} and dilation "
            f"{dilation} pads one row or column more after than before; distrifx shards convs with "
            "symmetric padding only. Use an odd kernel (or dilation x (kernel - 1) even), or pad explicitly "
            "with F.pad and use padding=0."
        )
    return [span // 2 for span in spans]


@register(aten.conv2d.padding)
def _conv2d_padding(node: Node, ctx: RuleContext) -> Decision:
    """``padding="same"/"valid"``: the conv2d rule on the equal numeric padding, which the per-rank graph gets."""
    x, w, bias, stride, mode, dilation, groups = conv_args(node.args, padding="valid")
    args = (x, w, bias, stride, _numeric_padding(node, mode, dilation), dilation, groups)
    return dataclasses.replace(_conv(node, ctx, args), args=args)


@register(aten.group_norm.default)
def _group_norm(node: Node, ctx: RuleContext) -> Decision:
    x = node.args[0]
    placement = placement_of(x)
    if isinstance(placement, Replicate):
        return Decision(output=Replicate())
    if placement.dim < 2 or not placement.plain:
        raise ShardingError(
            f"{where(node)}: GroupNorm input is sharded as {placement}; only plain blocks of "
            "spatial dims (>= 2) may be sharded. Normalize the (B, C, H, W) or (B, C, tokens) activation "
            "itself: move a permute, or a cat/pad along the sharded dim, after the GroupNorm."
        )
    return Decision(output=placement, rewrite=GlobalGroupNorm(num_groups=node.args[1]))


def _row_scale(node: Node) -> float | None:
    """The row scale factor ``node`` was given (PyTorch then reads input row floor(i / scale) for output
    row i), or None when only the output size was."""
    if node.target is aten.upsample_nearest2d.vec:
        scales = node.args[2] if len(node.args) > 2 else None
        return None if scales is None else scales[0]
    return node.args[2] if len(node.args) > 2 else None


def _nearest_scale(node: Node, dim: int) -> int:
    in_rows, out_rows = global_shape(node.args[0])[dim], global_shape(node)[dim]
    if out_rows % in_rows:
        raise ShardingError(
            f"{where(node)}: nearest upsampling from {in_rows} to {out_rows} rows is not an integer "
            "scale, so output rows would read across patches. Use an integer scale factor."
        )
    scale = _row_scale(node)
    if scale is not None and scale != out_rows // in_rows:
        raise ShardingError(
            f"{where(node)}: nearest upsampling by scale factor {scale} maps {in_rows} rows to {out_rows}, "
            f"but reads input row floor(i / {scale}) for output row i, not floor(i / {out_rows // in_rows}), "
            "so row patches cannot upsample locally. Use an integer scale factor, or pass the output size "
            f"(size=({out_rows}, ...)) instead."
        )
    return out_rows // in_rows


@register(aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default)
def _upsample_nearest(node: Node, ctx: RuleContext) -> Decision:
    if not sharded_inputs(node):
        return Decision(output=Replicate())
    x = node.args[0]
    dim = placement_of(x).dim
    if placement_of(x) != Shard(2):
        raise ShardingError(
            f"{where(node)}: upsampling input sharded as {placement_of(x)}, expected S(2). Upsample the "
            "(B, C, H, W) activation itself: move a permute, or a cat/pad along the height, after the upsampling."
        )
    _nearest_scale(node, dim)
    output_size = node.args[1]
    if output_size is None:  # scale factors only: nothing global in the arguments
        return Decision(output=Shard(dim))
    local = [ctx.local_extent(node, Shard(2)), output_size[1]]
    return Decision(output=Shard(dim), args=(x, local, *node.args[2:]))
