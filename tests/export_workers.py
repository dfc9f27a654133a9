"""Rank functions for the backend and export tests (module level so spawned processes can import them)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import distrifx
from distrifx.models import random_unet, tiny_pipeline, unet_inputs

# One level of the SD 1.5 layout (cross-attention block, no mid block): every exchange kind, few
# segments. Inductor compiles each segment on first use, which dominates this test's time.
ONE_LEVEL_SD15 = dict(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                      up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None)


def inductor_vs_eager() -> tuple[float, float, int, int]:
    """This rank's inductor-backend sync output against the model and eager distrifx (max abs
    differences), the number of segments and the number of them compiled."""
    from distrifx.backends import segments

    unet = random_unet("sd15", **ONE_LEVEL_SD15)
    args, kwargs = unet_inputs(unet)
    world = dist.get_world_size()
    with torch.no_grad():
        expected = unet(*args, **kwargs).sample
        eager = distrifx.parallelize(unet, world, mode="sync", cfg_parallel=False)(*args, **kwargs).sample
        compiled = distrifx.parallelize(unet, world, mode="sync", cfg_parallel=False, backend="inductor")
        got = compiled(*args, **kwargs).sample
    compiled_segments = segments(compiled.program(*args, **kwargs).graphs["sync"])
    return (float((got - expected).abs().max()), float((got - eager).abs().max()), len(compiled_segments),
            sum(segment.compiled is not None for _, segment in compiled_segments))


def small_pipeline():
    """A tiny SD 1.5 pipeline with the one-level UNet: few segments to export and load."""
    pipe = tiny_pipeline("sd15")
    pipe.unet = random_unet("sd15", **ONE_LEVEL_SD15)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_latents(pipe, seed: int) -> torch.Tensor:
    return pipe(prompt="a red circle", height=32, width=32, num_inference_steps=3, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


def pipeline_with_exports(sync_dir: str, stale_dir: str) -> tuple[float, float]:
    """This rank's relative max differences of the final latents, in :func:`small_pipeline` with the
    exports loaded by :func:`distrifx.load_pipeline` (each rank seeded apart: rank 0's latents are
    shared): the sync export against the unmodified pipeline, the stale export against the eager
    runtime with the same options (parallelize_pipeline)."""

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    seed = dist.get_rank()
    expected = _pipeline_latents(small_pipeline(), 0)
    sync = _pipeline_latents(distrifx.load_pipeline(small_pipeline(), sync_dir), seed)
    stale = _pipeline_latents(distrifx.load_pipeline(small_pipeline(), stale_dir), seed)
    eager = distrifx.parallelize_pipeline(small_pipeline(), dist.get_world_size(), mode="stale", warmup_steps=1,
                                          cfg_parallel=False)
    return rel(sync, expected), rel(stale, _pipeline_latents(eager, seed))
