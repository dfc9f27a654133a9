"""The math the rewrites put into per-rank graphs, written as plain torch functions.

The shard pass traces them into the graph with FX proxies, so each one is readable here and
becomes ordinary graph nodes there. Shapes they need are passed as Python ints (static per rank).
"""

from __future__ import annotations

import torch

__all__ = [
    "group_stats",
    "combine_group_stats",
    "corrected_group_stats",
    "group_norm_apply",
    "splice_own",
    "halo_split",
]


def group_stats(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """Per-(batch, group) ``[mean, biased var]`` of this rank's patch, shaped (1, B, G, 2), in fp32.

    Taken from ``native_group_norm`` (its normalized output is unused): on CPU its vectorized
    statistics are an order of magnitude faster than ``var_mean``. The variance comes back from
    its ``rstd = (var + eps) ** -0.5``.
    """
    batch, channels = x.shape[:2]
    _, mean, rstd = torch.ops.aten.native_group_norm(x.float().contiguous(), None, None, batch, channels,
                                                      x[0, 0].numel(), groups, eps)
    return torch.stack([mean, rstd.square().reciprocal() - eps], -1).unsqueeze(0)


def combine_group_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global mean and biased variance from N equal-sized patches' (N, B, G, 2) stats.

    Chan's parallel formula: var = mean_k(var_k) + mean_k((mean_k - mean)^2). It equals
    E[x^2] - E[x]^2 exactly in real arithmetic, but never goes negative and loses no precision
    when the mean is large.
    """
    means = stats[..., 0]
    mean = means.mean(0)
    return mean, stats[..., 1].mean(0) + (means - mean).square().mean(0)


def _moments(stats: torch.Tensor) -> torch.Tensor:
    """[mean, var] -> [E[x], E[x^2]] along the last dim."""
    return torch.stack([stats[..., 0], stats[..., 1] + stats[..., 0].square()], -1)


def corrected_group_stats(
    stale: torch.Tensor, fresh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DistriFusion's corrected asynchronous GroupNorm statistics.

    With B_k the previous step's [E[x], E[x^2]] of rank k (from ``stale``, (N, B, G, 2) as
    [mean, var]) and s this step's local ones (``fresh``, (1, B, G, 2)):
    full = sum_k B_k / N + (s - B_rank); var = full_2 - full_1^2, falling back to the local
    variance where that is negative. No Bessel factor: GroupNorm's variance is biased.
    """
    full = _moments(stale).mean(0) + _moments(fresh)[0] - _moments(stale.narrow(0, rank, 1))[0]
    mean = full[..., 0]
    var = full[..., 1] - mean.square()
    return mean, torch.where(var < 0, fresh[0, ..., 1], var)


def group_norm_apply(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    ndim: int,
    channels: int,
) -> torch.Tensor:
    """GroupNorm of ``x`` (ndim dims: B, C, spatial...) with given (B, G) statistics and affine.

    Folds statistics and affine into one per-channel scale and shift, so the activation is read
    once (``x * scale + shift``) instead of once per elementwise step.
    """
    per_group = channels // groups
    rstd = torch.rsqrt(var + eps)
    scale = rstd.unsqueeze(-1).expand(-1, -1, per_group).flatten(1)  # (B, C)
    shift = -(mean.unsqueeze(-1).expand(-1, -1, per_group).flatten(1)) * scale
    if weight is not None:
        scale = scale * weight
        shift = shift * weight
    if bias is not None:
        shift = shift + bias
    spatial = (...,) + (None,) * (ndim - 2)
    return torch.addcmul(shift[spatial].to(x.dtype), x, scale[spatial].to(x.dtype))


def splice_own(
    stale: torch.Tensor, fresh: torch.Tensor, dim: int, rank: int, size: int, world_size: int
) -> torch.Tensor:
    """``stale`` (all ranks' blocks along ``dim``) with block ``rank`` (of ``size``) replaced by ``fresh``."""
    before = stale.narrow(dim, 0, rank * size)
    after = stale.narrow(dim, (rank + 1) * size, (world_size - rank - 1) * size)
    return torch.cat([before, fresh, after], dim)


def halo_split(rows: torch.Tensor, dim: int, before: int, after: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the ``[previous patch rows; next patch rows]`` tensor of a halo exchange."""
    return rows.narrow(dim, 0, before), rows.narrow(dim, before, after)
