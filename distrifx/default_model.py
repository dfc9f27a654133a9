"""The small trained text-to-image model shipped with distrifx, and the data it was trained on.

The model draws one coloured shape ("red circle", "blue square", ...) on a plain background, in
pixel space. It is a real ``UNet2DConditionModel`` (GroupNorms, 3x3 convolutions, self- and
cross-attention) driven by a ``DDIMScheduler``, so the demo and the fidelity benchmarks run the
compiler on a genuine denoising trajectory without downloading anything: the training images are
drawn procedurally by :func:`make_shapes` and the weights live in :data:`DEFAULT_MODEL_DIR`.

    >>> pipe = load_default_pipeline()                                     # doctest: +SKIP
    >>> pipe.unet = distrifx.parallelize(pipe.unet, world_size=2)          # doctest: +SKIP
    >>> image = pipe("red circle").images[0]                               # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "DEFAULT_MODEL_DIR",
    "COLOURS",
    "SHAPES",
    "UNET_CONFIG",
    "SCHEDULER_CONFIG",
    "EMBEDDINGS_FILE",
    "make_shapes",
    "PromptEncoder",
    "DefaultPipeline",
    "DefaultPipelineOutput",
    "load_default_pipeline",
]

DEFAULT_MODEL_DIR: Path = Path(__file__).parent / "assets" / "default_model"
EMBEDDINGS_FILE = "prompt_embeddings.safetensors"

# Far apart in RGB so that colour, the easiest thing for the model to get right, is unambiguous.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.80),
    "white": (0.97, 0.97, 0.97),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring")

# Attention only at 16x16 and 8x8: self-attention over the 32x32 level would cost more than the
# rest of the network together, on CPU as on the patch-parallel ranks. ``attention_head_dim`` is
# the number of heads in this config's convention: 4 heads of 16 channels run faster on CPU than
# 8 heads of 8.
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=4,
)

# Cosine betas suit small pixel-space images; "trailing" makes the first DDIM step start from
# pure noise (t=999), and clipping x0 to the data range keeps few-step sampling stable.
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
    clip_sample_range=1.0,
    set_alpha_to_one=True,
    timestep_spacing="trailing",
)

_BACKGROUND = (0.15, 0.45)  # range of the neutral grey background level, in [0, 1]
_GRADIENT = 0.08  # amplitude of the background's linear shading
_RADIUS = (0.2, 0.36)  # range of the shape's radius, as a fraction of the image size


def _signed_distances(
    x: torch.Tensor, y: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """Signed distance in pixels to each shape of :data:`SHAPES`, shape ``(len(SHAPES), n, H, W)``."""
    dx, dy = torch.broadcast_tensors(x - cx, y - cy)
    dist = torch.sqrt(dx * dx + dy * dy)
    circle = dist - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.8 * r
    # Apex-up equilateral triangle of circumradius 1.1r, its bounding box centred on (cx, cy) so
    # that it stays within r of the centre like the other shapes. Its inradius is half the
    # circumradius, and the edge normals point away from the vertices (image y grows downwards).
    big = 1.1 * r
    ty = dy - 0.25 * big
    half = math.sqrt(3) / 2
    edges = torch.stack([ty, -half * dx - 0.5 * ty, half * dx - 0.5 * ty])
    triangle = edges.amax(0) - 0.5 * big
    ring = (dist - 0.75 * r).abs() - 0.25 * r
    return torch.stack([circle, square, triangle, ring])


def make_shapes(
    n: int, size: int = 32, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of one coloured shape each, and their labels.

    Returns ``(images, labels)``: images ``(n, 3, size, size)`` in ``[-1, 1]``, labels ``(n, 2)``
    long, ``(index in COLOURS, index in SHAPES)``. Every random draw comes from ``generator``.
    """
    g = generator
    labels = torch.stack(
        [torch.randint(len(COLOURS), (n,), generator=g), torch.randint(len(SHAPES), (n,), generator=g)], 1
    )
    r = size * (_RADIUS[0] + (_RADIUS[1] - _RADIUS[0]) * torch.rand(n, 1, 1, generator=g))
    # Every shape lies within its circumradius, so a centre at least r from the border fits.
    cx = r + (size - 2 * r) * torch.rand(n, 1, 1, generator=g)
    cy = r + (size - 2 * r) * torch.rand(n, 1, 1, generator=g)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)
    sdf = _signed_distances(x, y, cx, cy, r)
    sdf = sdf.gather(0, labels[:, 1].view(1, n, 1, 1).expand(1, n, size, size))[0]
    # One pixel of linear ramp across the edge: anti-aliased, yet exactly the colour inside.
    mask = (0.5 - sdf).clamp(0, 1).unsqueeze(1)

    level = _BACKGROUND[0] + (_BACKGROUND[1] - _BACKGROUND[0]) * torch.rand(n, 1, 1, 1, generator=g)
    angle = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
    ramp = (torch.cos(angle) * (x - size / 2) + torch.sin(angle) * (y - size / 2)) / size
    background = (level + _GRADIENT * ramp.unsqueeze(1)).expand(n, 3, size, size)
    palette = torch.tensor(list(COLOURS.values()))
    foreground = palette[labels[:, 0]].view(n, 3, 1, 1)
    images = mask * foreground + (1 - mask) * background
    return images * 2 - 1, labels


class PromptEncoder(nn.Module):
    """Maps a prompt to ``(2, dim)`` conditioning tokens: ``[colour embedding, shape embedding]``.

    Each vocabulary word has a learned vector; the extra last row of each table is the learned
    "null" vector, used for a missing word and as the unconditional input of guidance.
    """

    def __init__(self, colours: Sequence[str], shapes: Sequence[str], dim: int) -> None:
        super().__init__()
        self.colours, self.shapes = list(colours), list(shapes)
        self.colour = nn.Embedding(len(self.colours) + 1, dim)
        self.shape = nn.Embedding(len(self.shapes) + 1, dim)

    @property
    def null_ids(self) -> tuple[int, int]:
        """The ``(colour, shape)`` ids of the null embeddings."""
        return len(self.colours), len(self.shapes)

    def ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(B, 2)`` ids of the first colour and first shape word of each prompt; others are ignored."""
        rows = []
        for prompt in prompts:
            words = re.findall(r"[a-z]+", prompt.lower())
            colour = next((self.colours.index(w) for w in words if w in self.colours), self.null_ids[0])
            shape = next((self.shapes.index(w) for w in words if w in self.shapes), self.null_ids[1])
            rows.append((colour, shape))
        return torch.tensor(rows, dtype=torch.long, device=self.colour.weight.device).view(-1, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, 2)`` ids to ``(B, 2, dim)`` conditioning tokens."""
        return torch.stack([self.colour(ids[:, 0]), self.shape(ids[:, 1])], 1)

    def save(self, path: Path) -> None:
        """Writes the tables to a safetensors file, the vocabulary in its metadata."""
        from safetensors.torch import save_file

        # One metadata key: safetensors writes several in no fixed order, and the file should be
        # byte-identical across identical training runs.
        vocab = {"vocabulary": json.dumps({"colours": self.colours, "shapes": self.shapes})}
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path), vocab)

    @classmethod
    def load(cls, path: Path) -> PromptEncoder:
        """Reads a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            vocab = json.loads(f.metadata()["vocabulary"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        encoder = cls(vocab["colours"], vocab["shapes"], tensors["colour.weight"].shape[1])
        encoder.load_state_dict(tensors)
        return encoder


@dataclass
class DefaultPipelineOutput:
    """``images``: a list of PIL images (``output_type="pil"``) or a ``(B, 3, H, W)`` tensor."""

    images: Any


OutputType = Literal["pil", "pt", "latent"]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class DefaultPipeline:
    """Pixel-space text-to-image: prompt words -> embeddings -> DDIM loop with guidance.

    ``pipe.unet`` is looked up on every step, so it can be replaced, e.g. by
    ``distrifx.parallelize(pipe.unet, world_size=2)``.
    """

    def __init__(self, unet: nn.Module, scheduler: Any, prompt_encoder: PromptEncoder) -> None:
        self.unet = unet
        self.scheduler = scheduler
        self.prompt_encoder = prompt_encoder
        self._progress_disabled = False

    @classmethod
    def untrained(cls, seed: int = 0) -> DefaultPipeline:
        """The default architecture with freshly initialised weights (the start of training)."""
        from diffusers import DDIMScheduler, UNet2DConditionModel

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        encoder = PromptEncoder(list(COLOURS), SHAPES, UNET_CONFIG["cross_attention_dim"])
        return cls(unet.eval(), DDIMScheduler(**SCHEDULER_CONFIG), encoder.eval())

    @classmethod
    def from_pretrained(cls, path: str | Path = DEFAULT_MODEL_DIR) -> DefaultPipeline:
        """Loads ``path/unet``, ``path/scheduler`` and the prompt embeddings, as written by :meth:`save_pretrained`."""
        from diffusers import DDIMScheduler, UNet2DConditionModel

        path = Path(path).expanduser()
        parts = {"unet/": (path / "unet").is_dir(), "scheduler/": (path / "scheduler").is_dir(),
                 EMBEDDINGS_FILE: (path / EMBEDDINGS_FILE).is_file()}
        missing = [name for name, present in parts.items() if not present]
        if missing:
            raise FileNotFoundError(
                f"no default model in {path}: expected unet/, scheduler/ and {EMBEDDINGS_FILE}, missing "
                f"{', '.join(missing)}. Create it with `python scripts/train_default_model.py --out PATH`."
            )
        # The weights are small: the low-memory loading path would only warn about a missing extra.
        unet = UNet2DConditionModel.from_pretrained(path / "unet", low_cpu_mem_usage=False)
        scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
        return cls(unet.eval(), scheduler, PromptEncoder.load(path / EMBEDDINGS_FILE).eval())

    def save_pretrained(self, path: str | Path) -> None:
        """Writes the unet, the scheduler config and the prompt embeddings under ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet")
        self.scheduler.save_pretrained(path / "scheduler")
        self.prompt_encoder.save(path / EMBEDDINGS_FILE)

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.colour.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prompt_encoder.colour.weight.dtype

    def to(self, *args: Any, **kwargs: Any) -> DefaultPipeline:
        """Moves the unet and the embeddings, like ``nn.Module.to``."""
        self.unet.to(*args, **kwargs)
        self.prompt_encoder.to(*args, **kwargs)
        return self

    def set_progress_bar_config(self, disable: bool = False) -> None:
        """Show or hide the denoising progress bar (the diffusers pipeline method of that name)."""
        self._progress_disabled = disable

    def prepare_latents(self, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
        """The initial noise (a method of its own so distrifx can share rank 0's across ranks)."""
        from diffusers.utils.torch_utils import randn_tensor

        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        return latents * self.scheduler.init_noise_sigma

    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(B, 2, D)`` conditioning tokens for ``prompts``."""
        return self.prompt_encoder(self.prompt_encoder.ids(prompts))

    def unconditional(self, batch: int) -> torch.Tensor:
        """``(batch, 2, D)`` null tokens, the unconditional input of guidance."""
        ids = torch.tensor([self.prompt_encoder.null_ids], device=self.device).expand(batch, 2)
        return self.prompt_encoder(ids)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int = 32,
        width: int = 32,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        generator: torch.Generator | None = None,
        output_type: OutputType = "pil",
        callback: StepCallback | None = None,
        disable_progress: bool = False,
    ) -> DefaultPipelineOutput:
        """Generates one image per prompt.

        Guidance runs the unconditional and conditional halves as one batch ``[uncond, cond]``
        when ``guidance_scale > 1``. ``callback(step_index, t, latents)`` is called after every
        step. ``output_type``: "pil" (PIL images), "pt" (tensor in ``[0, 1]``) or "latent" (the
        raw final sample, in ``[-1, 1]`` up to model error).
        """
        from tqdm.auto import tqdm

        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        cond = self.encode_prompt(prompts)
        guided = guidance_scale > 1.0
        ctx = torch.cat([self.unconditional(len(prompts)), cond]) if guided else cond

        latents = self.prepare_latents((len(prompts), 3, height, width), generator)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        disable = disable_progress or self._progress_disabled
        for i, t in enumerate(tqdm(self.scheduler.timesteps, disable=disable, desc="denoising")):
            latents_in = torch.cat([latents, latents]) if guided else latents
            latents_in = self.scheduler.scale_model_input(latents_in, t)
            noise = self.unet(latents_in, t, encoder_hidden_states=ctx).sample
            if guided:
                uncond_noise, cond_noise = noise.chunk(2)
                noise = uncond_noise + guidance_scale * (cond_noise - uncond_noise)
            latents = self.scheduler.step(noise, t, latents).prev_sample
            if callback is not None:
                callback(i, t, latents)
        return DefaultPipelineOutput(images=_postprocess(latents, output_type))


def _postprocess(latents: torch.Tensor, output_type: OutputType) -> Any:
    if output_type == "latent":
        return latents
    images = (latents / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    from PIL import Image

    pixels = (images.permute(0, 2, 3, 1).float().cpu() * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(p) for p in pixels]


def load_default_pipeline() -> DefaultPipeline:
    """The trained model shipped in :data:`DEFAULT_MODEL_DIR`."""
    return DefaultPipeline.from_pretrained(DEFAULT_MODEL_DIR)
