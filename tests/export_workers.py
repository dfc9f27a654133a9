"""Rank functions for the backend and export tests (module level so spawned processes can import them)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import distrifx
from distrifx.models import random_unet, unet_inputs

# One level of the SD 1.5 layout (cross-attention block, no mid block): every exchange kind, few
# segments. Inductor compiles each segment on first use, which dominates this test's time.
ONE_LEVEL_SD15 = dict(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                      up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None)


def inductor_vs_eager() -> tuple[float, float, int, int]:
    """This rank's inductor-backend sync output against the model and eager distrifx (max abs
    differences), the number of segments and the number of graphs dynamo compiled."""
    from torch._dynamo.utils import counters

    from distrifx.backends import is_segment

    unet = random_unet("sd15", **ONE_LEVEL_SD15)
    args, kwargs = unet_inputs(unet)
    world = dist.get_world_size()
    with torch.no_grad():
        expected = unet(*args, **kwargs).sample
        eager = distrifx.parallelize(unet, world, mode="sync", cfg_parallel=False)(*args, **kwargs).sample
        compiled = distrifx.parallelize(unet, world, mode="sync", cfg_parallel=False, backend="inductor")
        got = compiled(*args, **kwargs).sample
    split = compiled.program(*args, **kwargs).graphs["sync"]
    num_segments = sum(is_segment(n) for n in split.graph.nodes)
    return (float((got - expected).abs().max()), float((got - eager).abs().max()), num_segments,
            counters["stats"]["unique_graphs"])
