"""CFG parallelism: the two halves of the batch on two rank groups, exact in sync mode."""

from __future__ import annotations

import pytest
import torch

import distrifx
from distrifx.models import random_unet, unet_inputs
from distrifx.runtime.cfg import wants_split


@pytest.mark.parametrize("world_size,batch", [(2, 2), (4, 2), (8, 2), (4, 4)])  # batch 4: two samples per half
def test_cfg_parallel_sync_equals_eager(world_size, batch):
    unet = random_unet("sdxl")
    args, kwargs = unet_inputs(unet, batch, 32, 16)
    with torch.no_grad():
        expected = unet(*args, **kwargs).sample

    def rank(group):
        pmodel = distrifx.parallelize(unet, world_size, mode="sync", cfg_parallel=True, process_group=group)
        out = pmodel(*args, **kwargs).sample
        return out, pmodel.comm.world_size, pmodel._cfg.patch.world_size

    results = distrifx.simulate(rank, world_size)
    for out, world, patch_world in results:
        assert world == world_size and patch_world == world_size // 2
        assert float((out - expected).abs().max()) < 1e-5


def test_cfg_split_sends_less_than_pure_patch_parallelism():
    unet = random_unet("sd15")
    args, kwargs = unet_inputs(unet, 2, 32, 16)

    def sent(cfg_parallel):
        def rank(group):
            pmodel = distrifx.parallelize(unet, 4, mode="sync", cfg_parallel=cfg_parallel, process_group=group)
            pmodel(*args, **kwargs)
            return pmodel.last_stats.bytes_sent

        return distrifx.simulate(rank, 4)[1]

    assert sent("auto") < sent(False)


def test_split_decision():
    assert wants_split("auto", 4, 2) and wants_split(True, 8, 4)
    assert not wants_split("auto", 4, 1) and not wants_split("auto", 3, 2) and not wants_split(False, 4, 2)
    with pytest.raises(distrifx.ConfigError, match="even batch"):
        wants_split(True, 4, 1)


def test_stale_mode_with_cfg_split_matches_on_every_rank():
    unet = random_unet("sd15")
    (sample, _), kwargs = unet_inputs(unet, 2, 16, 16)

    def rank(group):
        pmodel = distrifx.parallelize(unet, 4, mode="stale", warmup_steps=1, process_group=group)
        return [pmodel(sample * (1 - 0.1 * i), torch.tensor(t), **kwargs).sample for i, t in enumerate((900, 800, 700))]

    results = distrifx.simulate(rank, 4)
    for outs in results[1:]:
        for a, b in zip(outs, results[0]):
            assert torch.equal(a, b)


def test_at_two_ranks_a_split_guidance_batch_has_nothing_stale():
    """World 2, batch 2: each half runs on a patch group of one rank, so stale mode's steps after warm-up
    exchange nothing, keep no stale state and equal the unmodified model."""
    unet = random_unet("sd15")
    (sample, _), kwargs = unet_inputs(unet, 2, 16, 16)
    steps = [(sample * (1 - 0.1 * i), torch.tensor(t)) for i, t in enumerate((900, 800, 700, 600))]
    with torch.no_grad():
        expected = [unet(x, t, **kwargs).sample for x, t in steps]

    def rank(group):
        pmodel = distrifx.parallelize(unet, 2, mode="stale", warmup_steps=1, process_group=group)
        outs = [pmodel(x, t, **kwargs).sample for x, t in steps]
        return outs, pmodel.last_phase, pmodel.generation.state_bytes

    for outs, phase, state_bytes in distrifx.simulate(rank, 2):
        assert phase == "stale" and state_bytes == 0
        for out, want in zip(outs, expected):
            assert float((out - want).abs().max()) < 1e-5


def test_explain_plans_what_the_runtime_runs_under_a_cfg_split():
    unet = random_unet("sd15").train()
    args, kwargs = unet_inputs(unet, 2, 16, 16)
    split = distrifx.explain(unet, args, kwargs, world_size=4, rank=3, mode="stale")
    assert split.cfg_split and split.config.world_size == 2 and split.rank == 1  # the second half's second patch
    assert "rank=1, one batch half of a CFG split" in split.summary()
    assert unet.training  # explain captures in eval mode and leaves the model's own as it was
    whole = distrifx.explain(unet, args, kwargs, world_size=4, rank=3, mode="stale", cfg_parallel=False)
    assert not whole.cfg_split and whole.config.world_size == 4
    assert split.bytes_per_step("stale") < whole.bytes_per_step("stale")  # half the batch: half the bytes
    with pytest.raises(distrifx.ConfigError, match=r"rank=4 is not a rank of world_size=4 \(0 to 3\)"):
        distrifx.explain(unet, args, kwargs, world_size=4, rank=4)
