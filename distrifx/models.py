"""Tiny configs of real diffusion architectures, built in-process with random weights.

Used by the tests, the examples and the embedded default of the command line: nothing is
downloaded. Each config keeps the layout that matters to the compiler (block types, attention
flavour, embeddings) at a few channels.
"""

from __future__ import annotations

import copy
import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "UNET_CONFIGS",
    "TRANSFORMER_CONFIGS",
    "random_unet",
    "random_controlnet",
    "random_transformer_controlnet",
    "unet_inputs",
    "random_transformer",
    "transformer_inputs",
    "tiny_pipeline",
]

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

# Real layouts at real (or half) width, random weights: for benchmarks, not for tests.
UNET_CONFIGS["sd15-half"] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    block_out_channels=(160, 320, 640, 640),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
UNET_CONFIGS["sd15-full"] = dict(UNET_CONFIGS["sd15-half"], block_out_channels=(320, 640, 1280, 1280))
UNET_CONFIGS["sdxl-full"] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# Full SDXL's blocks, transformer depths and op graph at a sliver of its width: on a CPU its steps are
# bound by per-op dispatch as full SDXL's eager steps are on a GPU, so dispatch overhead is measurable here.
UNET_CONFIGS["sdxl-narrow"] = dict(UNET_CONFIGS["sdxl-full"], block_out_channels=(64, 64, 128),
                                   attention_head_dim=(2, 2, 4), cross_attention_dim=64, addition_time_embed_dim=8,
                                   projection_class_embeddings_input_dim=64 + 6 * 8)


def random_unet(name: str = "sd15", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A ``UNet2DConditionModel`` of config ``name`` (see :data:`UNET_CONFIGS`), random weights, eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**UNET_CONFIGS[name], **overrides}).eval()


def random_controlnet(unet: torch.nn.Module, seed: int = 0, factor: int = 2) -> torch.nn.Module:
    """A ``ControlNetModel`` of ``unet``'s encoder (its weights copied, as ``from_unet`` does) for a
    conditioning image ``factor`` (a power of two) times the latent's size. Its zero convs get random
    weights (their initialisation makes every residual 0, which would test nothing)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    channels = tuple(8 * 2**i for i in range(factor.bit_length()))
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels).eval()
    for conv in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
        conv.reset_parameters()
    return net


def random_transformer_controlnet(transformer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """An ``SD3ControlNetModel`` or ``FluxControlNetModel`` of ``transformer``'s first layers (its
    weights copied, as ``from_transformer`` does), conditioned on a VAE latent as their pipelines give
    it. Its zero layers get random weights."""
    import diffusers

    torch.manual_seed(seed)
    # from_transformer writes its layer counts into the config it is given: a copy, so the pipeline saves its own
    copied = copy.deepcopy(transformer)
    if isinstance(transformer, diffusers.SD3Transformer2DModel):
        net = diffusers.SD3ControlNetModel.from_transformer(copied, num_layers=1, num_extra_conditioning_channels=0)
        zero = (*net.controlnet_blocks, net.pos_embed_input.proj)
    else:
        config = transformer.config
        net = diffusers.FluxControlNetModel.from_transformer(
            copied, num_layers=1, num_single_layers=1, attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads)
        zero = (*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder)
    for layer in zero:
        layer.reset_parameters()
    return net.eval()


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


def _tiny_tokenizer() -> Any:
    """A character-level CLIP tokenizer, read from vocab.json + merges.txt in a directory removed after."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,!?-'":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    with tempfile.TemporaryDirectory(prefix="distrifx-tokenizer-") as tmp:
        directory = Path(tmp)
        (directory / "vocab.json").write_text(json.dumps(vocab))
        (directory / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16)


def _tiny_text_encoder(hidden: int, seed: int, projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=hidden,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,  # _tiny_tokenizer's: the pooled output is at its end token
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _tiny_t5(hidden: int, seed: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=128, d_model=hidden, d_kv=hidden // 2, d_ff=2 * hidden, num_layers=1, num_heads=2)
    return T5EncoderModel(config).eval()


def _tiny_vae(seed: int, **overrides: Any) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{**dict(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32,
    ), **overrides}).eval()


# Per base layout: its ControlNet pipeline and how to build a ControlNet of its denoiser.
_CONTROLNET_PIPELINES = {
    "sd15": ("StableDiffusionControlNetPipeline", random_controlnet),
    "sdxl": ("StableDiffusionXLControlNetPipeline", random_controlnet),
    "sd3": ("StableDiffusion3ControlNetPipeline", random_transformer_controlnet),
    "flux": ("FluxControlNetPipeline", random_transformer_controlnet),
}


def tiny_pipeline(kind: str = "sd15", seed: int = 0, scheduler: str = "ddim") -> Any:
    """A whole text-to-image pipeline of the ``sd15``, ``sdxl``, ``sd3`` or ``flux`` layout, tiny, random
    weights (the tiny VAE's latent is half the image's size); ``sd15-controlnet``, ``sdxl-controlnet``,
    ``sd3-controlnet`` and ``flux-controlnet`` add a ControlNet; ``sd15-inpaint`` is SD 1.5's inpainting
    pipeline (its UNet takes latent, mask and masked image: 9 channels).

    ``scheduler`` is "ddim", "euler", "dpm" or "heun" (SD3 and Flux always use their flow-matching scheduler).
    """
    import diffusers

    schedulers = {
        "ddim": diffusers.DDIMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "dpm": diffusers.DPMSolverMultistepScheduler,
        "heun": diffusers.HeunDiscreteScheduler,
    }
    if kind not in ("sd3", "flux"):
        own = {"clip_sample": False} if scheduler == "ddim" else {}  # as in SD 1.5's scheduler config
        sched = schedulers[scheduler](num_train_timesteps=1000, beta_schedule="scaled_linear",
                                      beta_start=0.00085, beta_end=0.012, steps_offset=1, **own)
    if kind == "sd15":
        return diffusers.StableDiffusionPipeline(
            vae=_tiny_vae(seed), text_encoder=_tiny_text_encoder(32, seed), tokenizer=_tiny_tokenizer(),
            unet=random_unet("sd15", seed), scheduler=sched, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    if kind == "sd15-inpaint":
        base = tiny_pipeline("sd15", seed, scheduler)
        return diffusers.StableDiffusionInpaintPipeline(**{**base.components,
                                                          "unet": random_unet("sd15", seed, in_channels=9)})
    if (base_kind := kind.removesuffix("-controlnet")) != kind and base_kind in _CONTROLNET_PIPELINES:
        base = tiny_pipeline(base_kind, seed, scheduler)  # its parts, and a ControlNet of its denoiser
        pipeline, controlnet = _CONTROLNET_PIPELINES[base_kind]
        denoiser = base.transformer if base_kind in ("sd3", "flux") else base.unet
        return getattr(diffusers, pipeline)(**base.components, controlnet=controlnet(denoiser, seed))
    if kind == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            vae=_tiny_vae(seed), text_encoder=_tiny_text_encoder(16, seed), tokenizer=_tiny_tokenizer(),
            text_encoder_2=_tiny_text_encoder(16, seed + 1, projection=True), tokenizer_2=_tiny_tokenizer(),
            unet=random_unet("sdxl", seed, projection_class_embeddings_input_dim=16 + 6 * 8), scheduler=sched,
        )
    if kind == "sd3":  # no T5: the pipeline pads the CLIP embeddings with zeros
        return diffusers.StableDiffusion3Pipeline(
            transformer=random_transformer("sd3", seed), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=_tiny_vae(seed, shift_factor=0.0), text_encoder=_tiny_text_encoder(16, seed, projection=True),
            tokenizer=_tiny_tokenizer(), text_encoder_2=_tiny_text_encoder(16, seed + 1, projection=True),
            tokenizer_2=_tiny_tokenizer(), text_encoder_3=None, tokenizer_3=None,
        )
    if kind == "flux":  # Flux's T5 is a one-layer T5EncoderModel; both tokenizers are the character-level one
        return diffusers.FluxPipeline(
            transformer=random_transformer("flux", seed), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=_tiny_vae(seed, shift_factor=0.0), text_encoder=_tiny_text_encoder(16, seed),
            tokenizer=_tiny_tokenizer(), text_encoder_2=_tiny_t5(TRANSFORMER_CONFIGS["flux"]["joint_attention_dim"],
                                                                  seed + 1),
            tokenizer_2=_tiny_tokenizer(),
        )
    raise ValueError(f"unknown pipeline kind {kind!r}; choose 'sd15', 'sdxl', 'sd3', 'flux', 'sd15-inpaint', "
                     "'sd15-controlnet', 'sdxl-controlnet', 'sd3-controlnet' or 'flux-controlnet'")


TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "sd3": dict(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=32,
    ),
    "pixart": dict(
        sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, cross_attention_dim=32, caption_channels=24, norm_num_groups=8,
        use_additional_conditions=False,
    ),
    "flux": dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    ),
}
_TRANSFORMER_CLASSES = {"sd3": "SD3Transformer2DModel", "pixart": "PixArtTransformer2DModel",
                        "flux": "FluxTransformer2DModel"}


def random_transformer(name: str, seed: int = 0) -> torch.nn.Module:
    """A diffusers DiT (``sd3``, ``pixart`` or ``flux`` layout), tiny, random weights, eval mode."""
    import diffusers

    torch.manual_seed(seed)
    return getattr(diffusers, _TRANSFORMER_CLASSES[name])(**TRANSFORMER_CONFIGS[name]).eval()


def transformer_inputs(
    model: torch.nn.Module, batch: int = 1, height: int = 16, width: int = 16, seed: int = 0, tokens: int = 7
) -> tuple[tuple, dict]:
    """Random ``(args, kwargs)`` for a DiT of :data:`TRANSFORMER_CONFIGS`; ``height``/``width`` in latent rows.

    Flux takes packed 2x2 patches: a (height/2 x width/2) token grid in row order, with its ids.
    """
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    kind = {v: k for k, v in _TRANSFORMER_CLASSES.items()}[type(model).__name__]
    t = torch.full((batch,), 500.0 if kind != "flux" else 0.5)
    if kind == "flux":
        rows, cols = height // 2, width // 2
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        return (), dict(
            hidden_states=torch.randn(batch, rows * cols, cfg.in_channels, generator=g),
            encoder_hidden_states=torch.randn(batch, tokens, cfg.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
            timestep=t, img_ids=torch.cat([torch.zeros(rows * cols, 1), grid.float()], 1),
            txt_ids=torch.zeros(tokens, 3),
        )
    kwargs: dict[str, Any] = dict(
        hidden_states=torch.randn(batch, cfg.in_channels, height, width, generator=g), timestep=t,
    )
    if kind == "sd3":
        kwargs["encoder_hidden_states"] = torch.randn(batch, tokens, cfg.joint_attention_dim, generator=g)
        kwargs["pooled_projections"] = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    else:
        kwargs["encoder_hidden_states"] = torch.randn(batch, tokens, cfg.caption_channels, generator=g)
        kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return (), kwargs
