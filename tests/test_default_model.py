"""The shipped default model: its training data, its pipeline, and the trained weights."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distrifx.default_model import (
    COLOURS,
    DEFAULT_MODEL_DIR,
    EMBEDDINGS_FILE,
    SHAPES,
    DefaultPipeline,
    load_default_pipeline,
    make_shapes,
)

PALETTE = torch.tensor(list(COLOURS.values())) * 2 - 1


def _shape_pixels(image: torch.Tensor, colour: int) -> torch.Tensor:
    """``(H, W)`` mask of the pixels of exactly palette colour ``colour``: the inside of the shape."""
    return (image - PALETTE[colour].view(3, 1, 1)).abs().amax(0) < 1e-5


def _classify(mask: torch.Tensor) -> str:
    """The shape a mask looks like, from how much of its bounding box it fills and its centre."""
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    fill = box.float().mean().item()
    if not box[box.shape[0] // 2, box.shape[1] // 2]:
        return "ring"
    if fill > 0.9:
        return "square"
    return "circle" if fill > 0.68 else "triangle"


def test_make_shapes_is_deterministic_and_in_range():
    images, labels = make_shapes(8, 32, torch.Generator().manual_seed(1))
    again, again_labels = make_shapes(8, 32, torch.Generator().manual_seed(1))
    other, _ = make_shapes(8, 32, torch.Generator().manual_seed(2))
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8, 2)
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    assert not torch.equal(images, other)
    assert images.min() >= -1 and images.max() <= 1


def test_make_shapes_draws_the_labelled_colour_and_shape():
    images, labels = make_shapes(64, 64, torch.Generator().manual_seed(0))
    assert set(labels[:, 0].tolist()) == set(range(len(COLOURS)))
    assert set(labels[:, 1].tolist()) == set(range(len(SHAPES)))
    for image, (colour, shape) in zip(images, labels.tolist()):
        mask = _shape_pixels(image, colour)
        assert mask.sum() > 100
        others = [_shape_pixels(image, c).sum().item() for c in range(len(COLOURS)) if c != colour]
        assert others == [0] * (len(COLOURS) - 1)
        assert _classify(mask) == SHAPES[shape]


def test_prompt_words_map_to_embeddings_and_unknown_words_are_ignored():
    encoder = DefaultPipeline.untrained().prompt_encoder
    null_colour, null_shape = encoder.null_ids
    ids = encoder.ids(["A RED, circle!", "a lovely square", "blue", "nothing known"])
    red, circle, square = list(COLOURS).index("red"), SHAPES.index("circle"), SHAPES.index("square")
    expected = [[red, circle], [null_colour, square], [list(COLOURS).index("blue"), null_shape]]
    assert ids.tolist() == expected + [[null_colour, null_shape]]
    assert encoder(ids).shape == (4, 2, encoder.colour.embedding_dim)


def test_save_and_load_round_trip(tmp_path: Path):
    pipe = DefaultPipeline.untrained(seed=3)
    pipe.save_pretrained(tmp_path)
    loaded = DefaultPipeline.from_pretrained(tmp_path)
    for name in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (tmp_path / name).is_file()
    assert loaded.prompt_encoder.colours == list(COLOURS) and loaded.prompt_encoder.shapes == list(SHAPES)

    def sample(p: DefaultPipeline) -> torch.Tensor:
        g = torch.Generator().manual_seed(7)
        prompts = ["red circle", "square"]
        return p(prompts, num_inference_steps=2, generator=g, output_type="latent", disable_progress=True).images

    assert torch.equal(sample(pipe), sample(loaded))


def test_missing_model_says_what_is_missing_and_how_to_make_one(tmp_path: Path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="train_default_model.py"):
        DefaultPipeline.from_pretrained(tmp_path)
    DefaultPipeline.untrained().save_pretrained(tmp_path / "model")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert isinstance(DefaultPipeline.from_pretrained("~/model"), DefaultPipeline)
    shutil.rmtree(tmp_path / "model" / "scheduler")
    with pytest.raises(FileNotFoundError, match=r"missing scheduler/\. Create it with"):
        DefaultPipeline.from_pretrained(tmp_path / "model")


class CountingUNet(nn.Module):
    """Stands in for a replaced ``pipe.unet``: records the batch of every call."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.inner = unet
        self.batches: list[int] = []

    def forward(self, sample: torch.Tensor, t: torch.Tensor, **kwargs):
        self.batches.append(sample.shape[0])
        return self.inner(sample, t, **kwargs)


@pytest.mark.parametrize("guidance_scale, batch", [(3.0, 4), (1.0, 2)])
def test_every_step_calls_pipe_unet(guidance_scale: float, batch: int):
    pipe = DefaultPipeline.untrained()
    pipe.unet = CountingUNet(pipe.unet)
    steps: list[int] = []
    out = pipe(
        ["red circle", "blue square"],
        num_inference_steps=3,
        guidance_scale=guidance_scale,
        callback=lambda i, t, latents: steps.append(i),
        disable_progress=True,
    )
    assert pipe.unet.batches == [batch] * 3
    assert steps == [0, 1, 2]
    assert [im.size for im in out.images] == [(32, 32), (32, 32)]


def test_unknown_output_type_is_refused():
    with pytest.raises(ValueError, match="output_type"):
        DefaultPipeline.untrained()("red circle", num_inference_steps=1, output_type="np", disable_progress=True)


def test_packaged_default_model_runs():
    for name in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (DEFAULT_MODEL_DIR / name).is_file()
    assert (DEFAULT_MODEL_DIR / EMBEDDINGS_FILE).is_file()
    pipe = load_default_pipeline()
    g = torch.Generator().manual_seed(0)
    prompts = ["red circle", "blue square"]
    images = pipe(prompts, num_inference_steps=2, generator=g, output_type="pt", disable_progress=True).images
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_packaged_default_model_draws_the_prompted_colour():
    pipe = load_default_pipeline()
    names = list(COLOURS)
    g = torch.Generator().manual_seed(0)
    prompts = [f"{c} circle" for c in names]
    images = pipe(prompts, num_inference_steps=10, generator=g, output_type="latent", disable_progress=True).images
    for name, image in zip(names, images):
        # The shape is what stands out from the (near uniform) background.
        distance = (image - image.flatten(1).median(1).values.view(3, 1, 1)).norm(dim=0)
        shape = image[:, distance > distance.max() / 2].mean(1)
        assert names[(PALETTE - shape).norm(dim=1).argmin()] == name


def _train(out: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_default_model.py"
    subprocess.run([sys.executable, str(script), "--minutes", "2", "--steps", "3", "--batch-size", "4", "--warmup", "1",
                    "--seed", "0", "--out", str(out)], check=True, capture_output=True, timeout=120)


@pytest.mark.timeout(300)
def test_the_training_script_writes_a_model_that_loads_and_reproduces_with_its_seed(tmp_path: Path):
    """`scripts/train_default_model.py` (three steps): the shipped architecture, loadable by the pipeline, and
    the same weights from the same seed and step count."""
    from safetensors.torch import load_file

    _train(tmp_path / "a")
    _train(tmp_path / "b")
    pipe = DefaultPipeline.from_pretrained(tmp_path / "a")
    architecture = lambda unet: {k: v for k, v in unet.config.items() if k != "_name_or_path"}  # noqa: E731
    assert architecture(pipe.unet) == architecture(load_default_pipeline().unet)
    images = pipe("red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                  disable_progress=True).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    weights = [load_file(tmp_path / run / "unet" / "diffusion_pytorch_model.safetensors") for run in ("a", "b")]
    shipped = load_file(DEFAULT_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors")
    assert weights[0].keys() == weights[1].keys() == shipped.keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], shipped[k]) for k in shipped)  # trained here, from scratch
