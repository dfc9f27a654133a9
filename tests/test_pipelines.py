"""Unmodified diffusers pipelines with a parallelized UNet, loaded back from disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import distrifx
from distrifx.models import tiny_pipeline

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny SD 1.5- and SDXL-layout pipelines written with save_pretrained, per scheduler."""
    root = tmp_path_factory.mktemp("pipes")
    paths = {}
    for kind, scheduler in (("sd15", "ddim"), ("sd15", "euler"), ("sd15", "dpm"), ("sd15", "heun"), ("sdxl", "ddim"),
                            ("sd3", "flow"), ("flux", "flow")):
        path = root / f"{kind}-{scheduler}"
        tiny_pipeline(kind, scheduler=scheduler).save_pretrained(path)
        paths[(kind, scheduler)] = path
    return paths


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux"])
def test_a_tiny_pipeline_leaves_no_files_behind_and_keeps_its_tokenizer(kind, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    pipe = tiny_pipeline(kind)
    assert [p.name for p in scratch.iterdir() if p.name.startswith("distrifx")] == []
    pipe.tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert pipe.tokenizer("a cat").input_ids == type(pipe.tokenizer).from_pretrained(tmp_path / "tokenizer")("a cat").input_ids


def _load(path, task="Text2Image"):
    """The pipeline at ``path`` for ``task`` ("Text2Image", "Image2Image" or "Inpainting")."""
    import diffusers

    auto = getattr(diffusers, f"AutoPipelineFor{task}")
    # components saved as None (SD3 without T5) must be passed as None again
    missing = {name: None for name in ("text_encoder_3", "tokenizer_3", "feature_extractor", "image_encoder")
               if "sd3" in path.name}
    pipe = auto.from_pretrained(path, **missing)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, seed=0, **kwargs):
    args = dict(prompt=PROMPT, height=32, width=32, num_inference_steps=5, output_type="latent",
                generator=torch.Generator().manual_seed(seed))
    return pipe(**{**args, **kwargs}).images


def _parallel(path, world_size, call, task="Text2Image", **options):
    pipes = [_load(path, task) for _ in range(world_size)]  # built before the threads: global RNG

    def rank(group):
        pipe = distrifx.parallelize_pipeline(pipes[group.rank], world_size, process_group=group, **options)
        return call(pipe)

    return distrifx.simulate(rank, world_size)


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# Every rank layout on SD 1.5 with DDIM; each other scheduler and SDXL on the layouts that differ most.
@pytest.mark.parametrize("kind,scheduler,world_size,cfg", [
    ("sd15", "ddim", 2, False), ("sd15", "ddim", 4, False), ("sd15", "ddim", 4, True),
    ("sd15", "euler", 2, False), ("sd15", "dpm", 4, True), ("sdxl", "ddim", 2, False), ("sdxl", "ddim", 4, True),
])
def test_sync_pipeline_equals_single_device(saved, kind, scheduler, world_size, cfg):
    path = saved[(kind, scheduler)]
    expected = _generate(_load(path))
    outs = _parallel(path, world_size, _generate, mode="sync", cfg_parallel=cfg)
    for out in outs:
        assert out.shape == expected.shape
        assert _rel_err(out, expected) < 1e-4


@pytest.mark.parametrize("world_size,cfg", [(2, False), (4, True)])
def test_sd3_dit_pipeline_equals_single_device(saved, world_size, cfg):
    path = saved[("sd3", "flow")]
    call = lambda p: _generate(p, max_sequence_length=8)  # noqa: E731
    expected = call(_load(path))
    for out in _parallel(path, world_size, call, mode="sync", cfg_parallel=cfg):
        assert _rel_err(out, expected) < 1e-4


@pytest.mark.parametrize("world_size", [2, 4])
def test_flux_pipeline_equals_single_device(saved, world_size):
    """Flux's latents are packed 2x2 patches: the pipeline's token sequence is what the ranks split."""
    path = saved[("flux", "flow")]
    call = lambda p: _generate(p, max_sequence_length=8)  # noqa: E731
    pipe = _load(path)
    assert type(pipe).__name__ == "FluxPipeline"
    expected = call(pipe)
    for out in _parallel(path, world_size, call, mode="sync"):
        assert _rel_err(out, expected) < 1e-4


def test_an_exported_flux_pipeline_equals_single_device(saved, tmp_path):
    path = saved[("flux", "flow")]
    call = lambda p: _generate(p, max_sequence_length=8)  # noqa: E731
    expected = call(_load(path))
    distrifx.export_pipeline(_load(path), tmp_path, 2, height=32, width=32, mode="sync",
                             pipeline_kwargs={"max_sequence_length": 8})
    pipes = [_load(path) for _ in range(2)]
    for out in distrifx.simulate(lambda g: call(distrifx.load_pipeline(pipes[g.rank], tmp_path, process_group=g)), 2):
        assert _rel_err(out, expected) < 1e-4


def test_guidance_off_and_pil_output(saved):
    path = saved[("sd15", "ddim")]
    expected = np.asarray(_generate(_load(path), guidance_scale=1.0, output_type="pil")[0], dtype=np.int16)
    outs = _parallel(path, 2, lambda p: _generate(p, guidance_scale=1.0, output_type="pil"), mode="sync")
    for images in outs:
        assert images[0].size == (32, 32)
        assert np.abs(np.asarray(images[0], dtype=np.int16) - expected).max() <= 1


def test_img2img(saved):
    path = saved[("sd15", "ddim")]
    image = torch.rand(1, 3, 32, 32)
    call = lambda p: _generate(p, image=image, strength=0.8, num_inference_steps=6)  # noqa: E731
    expected = call(_load(path, "Image2Image"))
    for out in _parallel(path, 2, call, "Image2Image", mode="sync"):
        assert _rel_err(out, expected) < 1e-4


@pytest.mark.parametrize("world_size,cfg", [(2, False), (4, True)])
def test_inpainting_equals_single_device(tmp_path_factory, world_size, cfg):
    """SD 1.5 inpainting: the UNet's input is latent, mask and masked image's latent (9 channels)."""
    path = tmp_path_factory.mktemp("pipes") / "sd15-inpaint"
    tiny_pipeline("sd15-inpaint").save_pretrained(path)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 4:20] = 1
    call = lambda p: _generate(p, image=image, mask_image=mask, strength=0.9, num_inference_steps=6)  # noqa: E731
    pipe = _load(path, "Inpainting")
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline" and pipe.unet.config.in_channels == 9
    expected = call(pipe)
    for out in _parallel(path, world_size, call, "Inpainting", mode="sync", cfg_parallel=cfg):
        assert _rel_err(out, expected) < 1e-4


def test_stale_pipeline_is_close_and_naive_is_not_closer(saved):
    path = saved[("sd15", "ddim")]
    call = lambda p: _generate(p, num_inference_steps=10)  # noqa: E731
    expected = call(_load(path))
    stale = _parallel(path, 2, call, mode="stale", warmup_steps=2, cfg_parallel=False)[0]
    naive = _parallel(path, 2, call, mode="naive", cfg_parallel=False)[0]
    assert _rel_err(stale, expected) < _rel_err(naive, expected)
    assert _rel_err(stale, expected) < 0.2


def test_a_scheduler_that_repeats_timesteps_stays_in_one_generation(saved):
    path = saved[("sd15", "heun")]
    call = lambda p: _generate(p, num_inference_steps=5)  # noqa: E731: Heun calls the UNet 9 times
    expected = call(_load(path))

    def twice(pipe):
        outs, warmups = [], []
        for _ in range(2):  # the second image warms up again: each pipeline call begins a generation
            outs.append(call(pipe))
            warmups.append(pipe.unet.generation.warmup_calls)
        return outs, warmups

    (outs, warmups), _ = _parallel(path, 2, twice, mode="stale", warmup_steps=2, cfg_parallel=False)
    assert warmups == [2, 2]
    for out in outs:
        assert _rel_err(out, expected) < 0.2


def test_ranks_with_different_seeds_still_agree(saved):
    path = saved[("sd15", "ddim")]
    outs = _parallel(path, 2, lambda p: _generate(p, seed=torch.initial_seed() + id(p) % 1000), mode="sync")
    assert torch.equal(outs[0], outs[1])


def test_plain_parallelize_refuses_ranks_with_different_inputs(saved):
    path = saved[("sd15", "ddim")]
    pipes = [_load(path) for _ in range(2)]

    def rank(group):
        pipe = pipes[group.rank]
        pipe.unet = distrifx.parallelize(pipe.unet, 2, process_group=group)
        return _generate(pipe, seed=group.rank)

    with pytest.raises(distrifx.DistrifxError, match="different values of \\['sample'\\]"):
        distrifx.simulate(rank, 2)
