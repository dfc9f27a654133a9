"""The math the rewrites put into per-rank graphs, written as plain torch functions.

The shard pass traces them into the graph with FX proxies, so each one is readable here and
becomes ordinary graph nodes there. Shapes they need are passed as Python ints (static per rank).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "GroupNormInput",
    "group_stats",
    "combine_group_stats",
    "corrected_group_stats",
    "group_norm_apply",
    "splice_own",
    "halo_split",
    "pack",
    "unpack_gathered",
    "pack_rows",
    "unpack_rows",
]


@dataclass(frozen=True)
class GroupNormInput:
    """What the GroupNorm kernels know of this rank's input when the graph is built.

    Plain Python values: traced, they become constants of the ops, not nodes that compute them.
    """

    batch: int
    channels: int
    spatial: int  # elements per channel in this rank's patch
    ndim: int
    groups: int
    eps: float
    dtype: torch.dtype

    @property
    def per_group(self) -> int:
        return self.channels // self.groups


def _cast(x: torch.Tensor, have: torch.dtype, want: torch.dtype) -> torch.Tensor:
    """``x`` (of dtype ``have``, known when the graph is built) as ``want``; no op when they are the same."""
    return x if have == want else x.to(want)


def group_stats(x: torch.Tensor, spec: GroupNormInput) -> torch.Tensor:
    """Per-(batch, group) ``[mean, biased var]`` of this rank's patch, shaped (1, B, G, 2), in fp32.

    Taken from ``native_group_norm`` (its normalized output is unused): on CPU its vectorized
    statistics are an order of magnitude faster than ``var_mean``. The variance comes back from
    its ``rstd = (var + eps) ** -0.5``.
    """
    x32 = _cast(x, spec.dtype, torch.float32).contiguous()
    _, mean, rstd = torch.ops.aten.native_group_norm(x32, None, None, spec.batch, spec.channels, spec.spatial,
                                                      spec.groups, spec.eps)
    return torch.stack([mean, rstd.pow(-2) - spec.eps], -1).unsqueeze(0)


def combine_group_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global mean and biased variance from N equal-sized patches' (N, B, G, 2) stats.

    Chan's parallel formula: var = mean_k(var_k + (mean_k - mean)^2). It equals
    E[x^2] - E[x]^2 exactly in real arithmetic, but never goes negative and loses no precision
    when the mean is large.
    """
    means, variances = stats.unbind(-1)
    mean = means.mean(0)
    return mean, (variances + (means - mean).square()).mean(0)


def corrected_group_stats(
    stale: torch.Tensor, fresh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DistriFusion's corrected asynchronous GroupNorm statistics.

    With B_k the previous step's [E[x], E[x^2]] of rank k (from ``stale``, (N, B, G, 2) as
    [mean, var]) and s this step's local ones (``fresh``, (1, B, G, 2)):
    full = sum_k B_k / N + (s - B_rank); var = full_2 - full_1^2, falling back to the local
    variance where that is negative. No Bessel factor: GroupNorm's variance is biased. The moments
    are taken about the previous step's global mean c (the same result in real arithmetic): about
    zero, E[x^2] - E[x]^2 would cancel away the variance of activations whose mean is large.
    """
    means, variances = torch.cat([stale, fresh]).unbind(-1)
    c = means[:-1].mean(0)
    shifted = means - c
    moments = torch.stack([shifted, variances + shifted.square()], -1)  # [B_0 .. B_N-1, s], about c
    mean, second = (moments[:-1].mean(0) + moments[-1] - moments[rank]).unbind(-1)
    var = second - mean.square()
    return mean + c, torch.where(var < 0, variances[-1], var)


def group_norm_apply(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    spec: GroupNormInput,
) -> torch.Tensor:
    """GroupNorm of ``x`` (B, C, spatial...) with given (B, G) statistics and affine.

    Folds statistics and affine into one per-channel scale and shift, computed per (batch,
    group, channel in group), so the activation is read once (``x * scale + shift``) and the
    small tensors take a handful of ops. A half-precision ``x`` is normalized in float32 and rounded
    once, as torch's GroupNorm does: ``x * scale`` and ``shift`` nearly cancel where the mean is large.
    """
    groups, per_group = spec.groups, spec.per_group
    scale = torch.rsqrt(var + spec.eps).unsqueeze(-1)  # (B, G, 1)
    if weight is not None:
        scale = scale * weight.view(groups, per_group)
    shift = -mean.unsqueeze(-1) * scale if bias is None else torch.addcmul(
        bias.view(groups, per_group), mean.unsqueeze(-1), scale, value=-1)
    shape = (spec.batch, spec.channels) + (1,) * (spec.ndim - 2)

    def per_channel(t: torch.Tensor) -> torch.Tensor:
        return t.expand(spec.batch, groups, per_group).reshape(shape)

    y = torch.addcmul(per_channel(shift), _cast(x, spec.dtype, torch.float32), per_channel(scale))
    return _cast(y, torch.float32, spec.dtype)


def splice_own(
    stale: torch.Tensor, fresh: torch.Tensor, dim: int, rank: int, size: int, world_size: int
) -> torch.Tensor:
    """``stale`` (all ranks' blocks along ``dim``) with block ``rank`` (of ``size``) replaced by ``fresh``."""
    before = [stale.narrow(dim, 0, rank * size)] if rank > 0 else []
    after = [stale.narrow(dim, (rank + 1) * size, (world_size - rank - 1) * size)] if rank < world_size - 1 else []
    return torch.cat([*before, fresh, *after], dim)


def halo_split(rows: torch.Tensor, dim: int, before: int, after: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the ``[previous patch rows; next patch rows]`` tensor of a halo exchange."""
    return rows.narrow(dim, 0, before), rows.narrow(dim, before, after)


def _rows_shape(shape: Sequence[int], dim: int, rows: int) -> list[int]:
    """``shape`` with ``rows`` along ``dim``."""
    out = list(shape)
    out[dim] = rows
    return out


def pack(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``parts`` flattened and concatenated into one 1-D tensor: a bucket of exchanges."""
    return torch.cat([p.reshape(-1) for p in parts])


def unpack_gathered(
    flat: torch.Tensor, shapes: Sequence[tuple[int, ...]], dims: Sequence[int], world_size: int
) -> tuple[torch.Tensor, ...]:
    """Each member's all-gather result from a gathered bucket (every rank's :func:`pack`, in rank
    order): member i's blocks, of ``shapes[i]``, concatenated along ``dims[i]`` in rank order."""
    ranks = flat.view(world_size, -1)
    out, offset = [], 0
    for shape, dim in zip(shapes, dims):
        size = math.prod(shape)
        blocks = ranks.narrow(1, offset, size).reshape(world_size, *shape)
        # contiguous, like the unpacked exchange's result: a compiled segment reading it is specialized to its strides
        out.append(blocks.movedim(0, dim).reshape(_rows_shape(shape, dim, shape[dim] * world_size)).contiguous())
        offset += size
    return tuple(out)


def pack_rows(
    xs: Sequence[torch.Tensor], shapes: Sequence[tuple[int, ...]], dims: Sequence[int],
    befores: Sequence[int], afters: Sequence[int],
) -> torch.Tensor:
    """A bucket of halo exchanges, flat: ``[first afters[i] rows of each x (for the previous rank);
    last befores[i] rows of each x (for the next rank)]``."""
    to_previous = [x.narrow(d, 0, a) for x, d, a in zip(xs, dims, afters)]
    to_next = [x.narrow(d, shape[d] - b, b) for x, shape, d, b in zip(xs, shapes, dims, befores)]
    return pack(to_previous + to_next)


def unpack_rows(
    received: torch.Tensor, shapes: Sequence[tuple[int, ...]], dims: Sequence[int],
    befores: Sequence[int], afters: Sequence[int],
) -> tuple[torch.Tensor, ...]:
    """Each member's halo exchange result, ``cat([previous patch's last rows, next patch's first
    rows], dim)``, from a bucket's received ``[previous rank's rows for its next; next rank's rows
    for its previous]`` (the two halves of what each neighbour's :func:`pack_rows` sent)."""
    previous = [_rows_shape(s, d, b) for s, d, b in zip(shapes, dims, befores)]
    following = [_rows_shape(s, d, a) for s, d, a in zip(shapes, dims, afters)]
    parts, offset = [], 0
    for shape in previous + following:  # narrow, not split: ONNX's SplitToSequence takes no bfloat16
        size = math.prod(shape)
        parts.append(received.narrow(0, offset, size).view(shape))
        offset += size
    n = len(shapes)
    return tuple(torch.cat([parts[i], parts[n + i]], dims[i]) for i in range(n))
