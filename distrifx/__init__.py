"""distrifx: one diffusion image across N devices, by compiling the model's graph.

    >>> import distrifx                                                    # doctest: +SKIP
    >>> pipe.unet = distrifx.parallelize(pipe.unet, world_size=8)
"""

from distrifx.api import parallelize, parallelize_pipeline
from distrifx.config import Backend, GNVariant, Mode, ParallelConfig
from distrifx.launch import launch
from distrifx.vae import parallelize_vae_decoder
from distrifx.errors import (
    ArtifactError,
    CaptureError,
    CollectiveTimeoutError,
    ConfigError,
    DistrifxError,
    InputSignatureError,
    ProcessGroupError,
    ShapeError,
    ShardingError,
    UnsupportedOpError,
)
from distrifx.runtime import ParallelControlNet, ParallelModule, simulate
from distrifx.inspect import Plan, explain
from distrifx.export import export, export_pipeline, load, load_pipeline

__version__ = "0.1.0"

__all__ = [
    "parallelize",
    "parallelize_pipeline",
    "parallelize_vae_decoder",
    "simulate",
    "launch",
    "explain",
    "export",
    "export_pipeline",
    "load",
    "load_pipeline",
    "Plan",
    "ParallelModule",
    "ParallelControlNet",
    "ParallelConfig",
    "Mode",
    "GNVariant",
    "Backend",
    "DistrifxError",
    "ConfigError",
    "ProcessGroupError",
    "CaptureError",
    "UnsupportedOpError",
    "ShardingError",
    "ShapeError",
    "CollectiveTimeoutError",
    "ArtifactError",
    "InputSignatureError",
]
