"""Stale (displaced patch) mode against an independent reference, warm-up, naive mode, quality."""

from __future__ import annotations

import pytest
import torch

import distrifx
from distrifx.config import Mode
from distrifx.default_model import DEFAULT_MODEL_DIR
from distrifx.models import random_unet, unet_inputs
from distrifx.passes.builder import older
from distrifx.runtime.program import Generation
from distrifx.runtime.steps import StepTracker
from tests.stale_reference import StaleReference

TIMESTEPS = [900, 800, 700, 600, 500, 400]


def _inputs(unet, steps, height=16, width=16):
    """A different latent per step, like a denoising loop, with fixed conditioning."""
    (sample, _), kwargs = unet_inputs(unet, 1, height, width)
    g = torch.Generator().manual_seed(1)
    samples = [sample + 0.05 * i * torch.randn(sample.shape, generator=g) for i in range(steps)]
    return samples, kwargs


def _state(unet, samples, kwargs, **options):
    """Rank 0's carried state after running ``samples`` on 2 simulated stale ranks (one warm-up step)."""

    def rank(group):
        pmodel = distrifx.parallelize(unet, 2, mode="stale", warmup_steps=1, process_group=group, **options)
        for sample, t in zip(samples, TIMESTEPS):
            pmodel(sample, torch.tensor(t), **kwargs)
        return dict(pmodel.generation.state)

    return distrifx.simulate(rank, 2)[0]


def _run(unet, world_size, samples, kwargs, **options):
    def rank(group):
        pmodel = distrifx.parallelize(unet, world_size, process_group=group, **options)
        outs = []
        for sample, t in zip(samples, TIMESTEPS):
            outs.append((pmodel(sample, torch.tensor(t), **kwargs).sample, pmodel.last_phase))
        return outs

    return distrifx.simulate(rank, world_size)


@pytest.mark.parametrize("name,world_size", [("sd15", 2), ("sd15", 4), ("sd2", 2)])
def test_stale_equals_independent_reference(name, world_size):
    unet = random_unet(name)
    samples, kwargs = _inputs(unet, len(TIMESTEPS))
    reference = StaleReference(unet, world_size, warmup_steps=2)
    expected = [reference(s, torch.tensor(t), **kwargs) for s, t in zip(samples, TIMESTEPS)]
    ranks = _run(unet, world_size, samples, kwargs, mode="stale", warmup_steps=2)
    phases = [phase for _, phase in ranks[0]]
    assert phases == ["warmup", "warmup", "stale", "stale", "stale", "stale"]
    for outs in ranks:
        for step, ((out, _), ref) in enumerate(zip(outs, expected)):
            assert float((out - ref).abs().max()) < 2e-5, f"step {step}"
    # stale really differs from exact after warm-up (the test would catch a silent sync fallback)
    with torch.no_grad():
        exact = unet(samples[-1], torch.tensor(TIMESTEPS[-1]), **kwargs).sample
    assert float((ranks[0][-1][0] - exact).abs().max()) > 1e-3


@pytest.mark.parametrize("world_size", [2, 4])
def test_extrapolated_stale_equals_a_reference_that_extrapolates_what_it_reads(world_size):
    """Halo rows and K/V read as last + 0.5 (last - older); GroupNorm statistics as they are."""
    unet = random_unet("sd15")
    samples, kwargs = _inputs(unet, len(TIMESTEPS))
    expected = {}
    for extrapolate in (0.5, 0.0):
        reference = StaleReference(unet, world_size, warmup_steps=2, extrapolate=extrapolate)
        expected[extrapolate] = [reference(s, torch.tensor(t), **kwargs) for s, t in zip(samples, TIMESTEPS)]
    ranks = _run(unet, world_size, samples, kwargs, mode="stale", warmup_steps=2, extrapolate=0.5)
    for outs in ranks:
        for step, (out, _) in enumerate(outs):
            assert float((out - expected[0.5][step]).abs().max()) < 2e-5, f"step {step}"
    # from the first stale step on, extrapolating changes what the ranks compute
    assert all(float((a - b).abs().max()) > 1e-3 for a, b in zip(expected[0.5][2:], expected[0.0][2:]))


def test_extrapolation_keeps_an_older_copy_of_halo_rows_and_kv_only():
    unet = random_unet("sd15")
    samples, kwargs = _inputs(unet, 3)

    plain = _state(unet, samples, kwargs)
    ahead = _state(unet, samples, kwargs, extrapolate=0.5)
    added = ahead.keys() - plain.keys()
    assert plain.keys() <= ahead.keys()
    assert added == {older(name) for name in plain if not name.startswith("gn_")}
    assert all(ahead[older(name)].shape == plain[name].shape for name in plain if older(name) in added)


@pytest.mark.parametrize("world_size", [2, 4])
def test_stale_mode_with_every_exchange_fresh_equals_sync_mode(world_size):
    """fresh=("halo", "kv") with GroupNorm sync leaves nothing stale; fresh halo alone is neither."""
    unet = random_unet("sd15")
    samples, kwargs = _inputs(unet, 4)
    sync = _run(unet, world_size, samples, kwargs, mode="sync")
    fresh = _run(unet, world_size, samples, kwargs, mode="stale", warmup_steps=1, gn_variant="sync",
                 fresh=("kv", "halo"))
    halo = _run(unet, world_size, samples, kwargs, mode="stale", warmup_steps=1, gn_variant="sync", fresh="halo")
    gn_sync = _run(unet, world_size, samples, kwargs, mode="stale", warmup_steps=1, gn_variant="sync")
    for rank in range(world_size):
        assert [phase for _, phase in fresh[rank]] == ["warmup", "stale", "stale", "stale"]
        for step, ((a, _), (b, _)) in enumerate(zip(fresh[rank], sync[rank])):
            assert float((a - b).abs().max()) < 1e-5, f"rank {rank} step {step}"
    last = [run[0][-1][0] for run in (sync, halo, gn_sync)]
    assert float((last[1] - last[0]).abs().max()) > 1e-3  # stale K/V still differ from exact
    assert float((last[1] - last[2]).abs().max()) > 1e-4  # and fresh halo rows from stale ones


def test_fresh_exchanges_carry_no_state():
    unet = random_unet("sd15")
    samples, kwargs = _inputs(unet, 3)
    plain = _state(unet, samples, kwargs)
    fresh = _state(unet, samples, kwargs, fresh=("halo",))
    halo = {name for name in plain if name.startswith("halo_")}
    assert halo and any(name.startswith("gn_") for name in plain) and any(name.startswith("k_") for name in plain)
    assert fresh.keys() == plain.keys() - halo


def test_warmup_covering_every_step_equals_sync():
    unet = random_unet("sdxl")
    samples, kwargs = _inputs(unet, 3)
    stale = _run(unet, 2, samples, kwargs, mode="stale", warmup_steps=3)
    sync = _run(unet, 2, samples, kwargs, mode="sync")
    for (a, phase), (b, _) in zip(stale[0], sync[0]):
        assert phase == "warmup"
        assert torch.equal(a, b)


def test_warmup_fraction_runs_synchronous_steps_while_the_timestep_is_in_its_first_share():
    unet = random_unet("sd15")
    samples, kwargs = _inputs(unet, len(TIMESTEPS))
    stale = _run(unet, 2, samples, kwargs, mode="stale", warmup_steps=1, warmup_fraction=0.25)
    sync = _run(unet, 2, samples, kwargs, mode="sync")
    # 800 and 700 are 11% and 22% below the first timestep (900), 600 is 33% below
    assert [phase for _, phase in stale[0]] == ["warmup"] * 3 + ["stale"] * 3
    for (a, _), (b, _) in zip(stale[0][:3], sync[0][:3]):
        assert torch.equal(a, b)
    assert not torch.equal(stale[0][3][0], sync[0][3][0])


@pytest.mark.parametrize("steps,fraction,warmups", [(20, 0.25, 5), (50, 0.25, 13), (20, 0.3, 6), (50, 0.3, 15)])
def test_warmup_fraction_covers_a_like_share_of_a_20_or_50_step_generation(steps, fraction, warmups):
    """The default model's DDIM timesteps (trailing: 999, 949, ... at 20 steps; 999, 979, ... at 50): a
    fraction f warms up every step above (1 - f) x 999."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_pretrained(DEFAULT_MODEL_DIR, subfolder="scheduler")
    scheduler.set_timesteps(steps)
    generation = Generation(Mode.STALE, warmup_steps=1, warmup_fraction=fraction)
    phases = []
    for t in scheduler.timesteps:
        phases.append(generation.next_phase(t, "inputs"))
        generation.has_state = True  # what running the warm-up graph leaves
    assert phases == ["warmup"] * warmups + ["stale"] * (steps - warmups)
    assert generation.warmup_calls == warmups


def test_warmup_fraction_names_a_model_whose_calls_carry_no_timestep():
    generation = Generation(Mode.STALE, warmup_steps=4, warmup_fraction=0.3)
    with pytest.raises(distrifx.ConfigError, match=r"warmup_fraction=0.3 warms up by the timestep, but this model's "
                                                   r"calls carry none .* give warmup_steps instead"):
        generation.next_phase(None, "inputs")
    assert Generation(Mode.SYNC, warmup_steps=4, warmup_fraction=0.3).next_phase(None, "inputs") == "sync"


def test_new_generation_restarts_warmup_and_reset_is_explicit():
    unet = random_unet("sd15")
    samples, kwargs = _inputs(unet, 1)

    def rank(group):
        pmodel = distrifx.parallelize(unet, 2, mode="stale", warmup_steps=1, process_group=group)
        phases = []
        for t in (900, 800, 700, 900, 800):  # the timestep goes back up: a new image
            pmodel(samples[0], torch.tensor(t), **kwargs)
            phases.append(pmodel.last_phase)
        pmodel.reset()
        pmodel(samples[0], torch.tensor(700), **kwargs)
        return phases + [pmodel.last_phase]

    phases, _ = distrifx.simulate(rank, 2)
    assert phases == ["warmup", "stale", "stale", "warmup", "stale", "warmup"]


def test_a_python_number_timestep_is_one_graph_and_steps_like_a_tensor():
    unet = random_unet("sd15")
    samples, kwargs = _inputs(unet, 1)

    def rank(group):
        pmodel = distrifx.parallelize(unet, 2, mode="stale", warmup_steps=1, process_group=group)
        outs, phases = [], []
        for t in (900.0, 800.0, 700.0):  # each becomes a tensor, as the model would make it
            outs.append(pmodel(samples[0], t, **kwargs).sample)
            phases.append(pmodel.last_phase)
        return outs, phases, len(pmodel._programs)

    (outs, phases, programs), _ = distrifx.simulate(rank, 2)
    assert phases == ["warmup", "stale", "stale"]
    assert programs == 1  # not one graph per value
    with torch.no_grad():
        assert (outs[0] - unet(samples[0], 900.0, **kwargs).sample).abs().max() < 1e-5  # warm-up: exact


def test_a_repeated_timestep_continues_only_a_generation_begun_by_reset():
    heun = (999, 888, 888, 777, 777)  # Heun-type schedulers evaluate each timestep after the first twice
    tracker = StepTracker()
    assert [tracker.advance(t, "inputs") for t in heun] == [True, False, True, False, True]
    tracker.reset()
    assert [tracker.advance(t, "inputs") for t in heun] == [True, False, False, False, False]
    assert tracker.step == 4
    # A generation the tracker detects itself (the timestep rose) is not marked: a repeat starts another.
    assert [tracker.advance(t, "inputs") for t in (999, 999)] == [True, True]


@pytest.mark.parametrize("variant", ["sync", "stale", "separate"])
def test_group_norm_variants_run_and_differ_from_corrected(variant):
    unet = random_unet("sd15")
    samples, kwargs = _inputs(unet, 3)
    corrected = _run(unet, 2, samples, kwargs, mode="stale", warmup_steps=1)[0][-1][0]
    other = _run(unet, 2, samples, kwargs, mode="stale", warmup_steps=1, gn_variant=variant)[0][-1][0]
    assert torch.isfinite(other).all()
    assert not torch.equal(corrected, other)


def test_hidden_state_exchange_matches_kv_exchange():
    """Projecting gathered hidden states is the same math as gathering K and V, in both modes."""
    unet = random_unet("sd15")
    samples, kwargs = _inputs(unet, 3)
    for mode in ("sync", "stale"):
        kv = _run(unet, 2, samples, kwargs, mode=mode, warmup_steps=1, kv_exchange="kv")[0]
        hidden = _run(unet, 2, samples, kwargs, mode=mode, warmup_steps=1, kv_exchange="hidden")[0]
        for (a, _), (b, _) in zip(kv, hidden):
            assert float((a - b).abs().max()) < 1e-5


def test_narrow_stale_exchanges_equal_a_reference_that_rounds_what_it_reads():
    """stale_dtype rounds exactly the stale halo rows and K/V a rank reads, nothing else."""
    unet = random_unet("sd15")
    samples, kwargs = _inputs(unet, len(TIMESTEPS))
    references = {}
    for dtype in (torch.bfloat16, None):
        reference = StaleReference(unet, 2, warmup_steps=2, stale_dtype=dtype)
        references[dtype] = [reference(s, torch.tensor(t), **kwargs) for s, t in zip(samples, TIMESTEPS)]
    # kv: rounding gathered hidden states and projecting them is not rounding K and V
    ranks = _run(unet, 2, samples, kwargs, mode="stale", warmup_steps=2, stale_dtype="bfloat16", kv_exchange="kv")
    for outs in ranks:
        errors = [{dtype: float((out - ref[step]).abs().mean()) for dtype, ref in references.items()}
                  for step, (out, _) in enumerate(outs)]
        assert errors[0][torch.bfloat16] < 1e-6 and errors[1][torch.bfloat16] < 1e-6  # warm-up: exact
        assert errors[2][torch.bfloat16] < 1e-5 < 1e-4 < errors[2][None]  # the first stale step
        # later steps: a value that lands on a bf16 rounding boundary may round either way, and
        # such differences grow step by step; they stay well below what not rounding changes
        for step in errors[3:]:
            assert step[torch.bfloat16] < 0.5 * step[None]


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_rank_sends_the_bytes_its_plan_says(world_size):
    """The plan counts what this rank sends: the first and last patch have one halo neighbour."""
    unet = random_unet("sd15")
    samples, kwargs = _inputs(unet, 2)

    def rank(group):
        pmodel = distrifx.parallelize(unet, world_size, mode="stale", warmup_steps=1, process_group=group)
        counted = {}
        for sample, t in zip(samples, TIMESTEPS):
            pmodel(sample, torch.tensor(t), **kwargs)
            counted[pmodel.last_phase] = pmodel.last_stats.bytes_sent
        program = pmodel.program(samples[0], torch.tensor(TIMESTEPS[0]), **kwargs)
        return counted, {phase: sum(s.bytes_sent for s in program.sites(phase)) for phase in counted}

    ranks = distrifx.simulate(rank, world_size)
    for counted, planned in ranks:
        assert set(counted) == {"warmup", "stale"} and planned == counted
    stale = [planned["stale"] for _, planned in ranks]
    assert max(stale[0], stale[-1]) < min(stale[1:-1], default=float("inf"))


def test_narrow_stale_exchanges_halve_bytes_and_state_and_leave_sync_exact():
    unet = random_unet("sd15")
    samples, kwargs = _inputs(unet, 3)
    args = (samples[0], torch.tensor(TIMESTEPS[0]))
    wide = distrifx.explain(unet, args, kwargs, world_size=2, mode="stale")
    narrow = distrifx.explain(unet, args, kwargs, world_size=2, mode="stale", stale_dtype=torch.bfloat16)
    for a, b in zip(wide.sites("stale"), narrow.sites("stale"), strict=True):
        assert b.bytes_sent == (a.bytes_sent // 2 if a.kind in ("halo", "kv") else a.bytes_sent), a.name
    assert wide.sites("warmup") == narrow.sites("warmup")  # warm-up exchanges are exact

    wide_state = _state(unet, samples, kwargs)
    narrow_state = _state(unet, samples, kwargs, stale_dtype="bfloat16")
    assert wide_state.keys() == narrow_state.keys()
    for name, value in narrow_state.items():
        want = torch.float32 if name.startswith("gn_") else torch.bfloat16
        assert value.dtype == want and value.shape == wide_state[name].shape, name
    sync = [_run(unet, 2, samples, kwargs, mode="sync", **options)[0] for options in ({}, {"stale_dtype": "bfloat16"})]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(*sync))
