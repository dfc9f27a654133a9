"""Patch-parallel VAE decoding: one exact (synchronous) pass, ~1/N of the activations per rank."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distrifx.errors import ConfigError

__all__ = ["VaeDecode", "parallelize_vae_decoder"]


class VaeDecode(nn.Module):
    """``vae.decode`` as a module's forward, so it can be captured and parallelized.

    Calls the class's ``decode``, not the instance attribute, so a pipeline's ``vae.decode`` can be
    replaced by the parallel version without recursion.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None) -> Any:
        # ``generator`` is accepted because pipelines pass it; AutoencoderKL's decode draws nothing.
        return type(self.vae).decode(self.vae, z, return_dict=return_dict)


def parallelize_vae_decoder(vae: nn.Module, world_size: int, **options: Any) -> nn.Module:
    """A patch-parallel ``vae.decode`` (sync mode: decoding is one pass, so always exact).

    Example:
        >>> decode = distrifx.parallelize_vae_decoder(pipe.vae, world_size=4)   # doctest: +SKIP
        >>> image = decode(latents / pipe.vae.config.scaling_factor).sample
    """
    from distrifx.api import parallelize

    fixed = {"mode": "sync", "cfg_parallel": False}
    conflicting = {k: v for k, v in options.items() if k in fixed and v != fixed[k]}
    if conflicting:
        raise ConfigError(f"parallelize_vae_decoder: {conflicting} does not apply: a decoder runs once per image, "
                          "so it is always exact sync mode over one group of ranks; drop these options.")
    return parallelize(VaeDecode(vae), world_size, **{**options, **fixed})
