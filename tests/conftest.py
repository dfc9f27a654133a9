from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


class CustomBlock(nn.Module):
    """Nobody registered this model: convs, GroupNorm, a hand-written attention, upsampling."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.norm = nn.GroupNorm(4, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(self.conv_in(x)))
        h = self.down(h)
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        split = lambda t: t.view(b, -1, 2, c // 2).transpose(1, 2)  # noqa: E731
        attn = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, -1, c)
        h = h + attn.transpose(1, 2).reshape(b, c, height, width)
        return self.conv_out(F.interpolate(h, scale_factor=2.0, mode="nearest"))


class ChunkedAttentionBlock(nn.Module):
    """Conv, GroupNorm and one-head attention on the chunks of one projection: the scheduler starts the
    K/V exchange between ``chunk`` and the getitem of the query."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, channels, 3, padding=1)
        self.norm = nn.GroupNorm(2, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.conv_out = nn.Conv2d(channels, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(self.conv_in(x)))
        b, c, height, width = h.shape
        q, k, v = self.qkv(h.flatten(2).transpose(1, 2)).chunk(3, dim=-1)
        h = h + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, height, width)
        return self.conv_out(h)


def max_rank_error(outputs: list[torch.Tensor], expected: torch.Tensor) -> float:
    return max(float((o - expected).abs().max()) for o in outputs)


def sync_error(model: torch.nn.Module, world_size: int, *args: object, **kwargs: object) -> float:
    """Max abs difference, over every simulated rank, between sync mode and the unmodified model."""
    import distrifx

    with torch.no_grad():
        expected = model(*args, **kwargs)
    outs = distrifx.simulate(
        lambda g: distrifx.parallelize(model, world_size, mode="sync", process_group=g)(*args, **kwargs), world_size
    )
    pick = (lambda o: o.sample) if hasattr(expected, "sample") else (lambda o: o)
    return max_rank_error([pick(o) for o in outs], pick(expected))


def half_precision_errors(name: str, dtype: torch.dtype, device: str = "cpu") -> tuple[float, float]:
    """How far the ``dtype`` model is from the float32 one, and how far its 2-rank sync mode is
    (max over ranks), on random inputs: both differ by rounding, the rewrite must add no more."""
    import distrifx
    from distrifx.models import random_unet, unet_inputs

    unet = random_unet(name).to(device)
    args, kwargs = tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, unet_inputs(unet))
    with torch.no_grad():
        truth = unet(*args, **kwargs).sample
    unet = unet.to(dtype)
    args, kwargs = tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x,
                            (args, kwargs))
    with torch.no_grad():
        half = unet(*args, **kwargs).sample
    outs = distrifx.simulate(
        lambda g: distrifx.parallelize(unet, 2, mode="sync", process_group=g)(*args, **kwargs).sample, 2)
    assert all(o.dtype == dtype and o.device == truth.device for o in outs)
    return float((half.float() - truth).abs().max()), max_rank_error([o.float() for o in outs], truth)


def tensorrt_missing() -> str:
    """Why the TensorRT tests cannot run here; empty when they can (a CUDA device and torch_tensorrt)."""
    missing = [what for what, here in (("no CUDA device", torch.cuda.is_available()),
                                       ("torch_tensorrt is not installed", importlib.util.find_spec("torch_tensorrt")))
               if not here]
    return "; ".join(missing)
