"""Tiny configs of real diffusion architectures, built in-process with random weights.

Used by the tests, the examples and the embedded default of the command line: nothing is
downloaded. Each config keeps the layout that matters to the compiler (block types, attention
flavour, embeddings) at a few channels.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["UNET_CONFIGS", "tiny_unet", "unet_inputs"]

_COMMON: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
)

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    # SD 1.5: conv proj_in/out, one head dim for every level
    "sd15": dict(
        _COMMON,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    ),
    # SD 2: linear proj_in/out, a head dim per level, three levels
    "sd2": dict(
        _COMMON,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(4, 8, 8),
        use_linear_projection=True,
    ),
    # SDXL: text_time added conditioning, several transformer layers per block
    "sdxl": dict(
        _COMMON,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(4, 8),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    ),
}


def tiny_unet(name: str = "sd15", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A ``UNet2DConditionModel`` with the layout of ``name`` and random weights, in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**UNET_CONFIGS[name], **overrides}).eval()


def unet_inputs(
    unet: torch.nn.Module, batch: int = 1, height: int = 16, width: int = 16, seed: int = 0, tokens: int = 7
) -> tuple[tuple, dict]:
    """Random ``(args, kwargs)`` for ``unet(sample, timestep, encoder_hidden_states=..., ...)``."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, cfg.in_channels, height, width, generator=g)
    ctx = torch.randn(batch, tokens, cfg.cross_attention_dim, generator=g)
    kwargs: dict[str, Any] = {"encoder_hidden_states": ctx}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g).abs() * 64,
        }
    return (sample, torch.tensor(500)), kwargs
