"""The VAE decoder, patch-parallel in one exact pass, standalone and inside a pipeline."""

from __future__ import annotations

import pytest
import torch

import distrifx
from distrifx.models import _tiny_vae, tiny_pipeline
from tests.conftest import max_rank_error


@pytest.mark.parametrize("world_size,height,width", [(2, 16, 16), (4, 16, 24)])
def test_parallel_decode_equals_decode(world_size, height, width):
    vae = _tiny_vae(0)
    z = torch.randn(1, 4, height, width)
    with torch.no_grad():
        expected = vae.decode(z).sample
    outs = distrifx.simulate(
        lambda g: distrifx.parallelize_vae_decoder(vae, world_size, process_group=g)(z).sample, world_size
    )
    assert max_rank_error(outs, expected) < 1e-5


def test_decoder_options_it_cannot_honour_are_refused():
    with pytest.raises(distrifx.ConfigError, match=r"\{'mode': 'stale'\} does not apply: .* always exact sync mode"):
        distrifx.parallelize_vae_decoder(_tiny_vae(0), 2, mode="stale")
    decode = lambda g: distrifx.parallelize_vae_decoder(_tiny_vae(0), 2, mode="sync", cfg_parallel=False,  # noqa: E731
                                                        process_group=g)  # what it runs anyway
    assert all(d.parallel_config.mode == "sync" for d in distrifx.simulate(decode, 2))


def test_decoder_exchanges_halos_norms_and_attention():
    vae = _tiny_vae(0)
    plan = distrifx.explain(distrifx.vae.VaeDecode(vae), (torch.randn(1, 4, 16, 16),), world_size=2, mode="sync")
    kinds = {s.kind for s in plan.sites("sync")}
    assert {"halo", "gn", "kv"} <= kinds


@pytest.mark.parametrize("split", ["parallelize_pipeline", "load_pipeline"])
def test_pipeline_with_parallel_vae_gives_the_same_image(split, tmp_path):
    pipes = [tiny_pipeline("sd15") for _ in range(3)]
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    call = lambda p: p("a red circle", height=32, width=32, num_inference_steps=3, output_type="pt",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images
    expected = call(pipes[2])
    if split == "load_pipeline":
        distrifx.export_pipeline(pipes[2], tmp_path, 2, height=32, width=32, mode="sync", format="onnx")

    def rank(group):
        if split == "load_pipeline":
            pipe = distrifx.load_pipeline(pipes[group.rank], tmp_path, process_group=group, parallel_vae=True)
        else:
            pipe = distrifx.parallelize_pipeline(pipes[group.rank], 2, process_group=group, mode="sync",
                                                 parallel_vae=True)
        return call(pipe), isinstance(pipe.vae.decode, distrifx.ParallelModule)

    for image, parallel in distrifx.simulate(rank, 2):
        assert parallel
        assert float((image - expected).abs().max()) < 1e-4
