"""The coalescing pass: stale exchanges packed into buckets send the same values in fewer collectives."""

from __future__ import annotations

import json

import pytest
import torch

import distrifx
from distrifx.backends import segments, split_segments
from distrifx.export import MANIFEST
from distrifx.models import random_unet, unet_inputs
from distrifx.passes import Phase, collective_order
from distrifx.passes.builder import META_PAYLOAD, Form
from distrifx.passes.coalesce import buckets
from distrifx.runtime.ops import is_start
from tests import workers
from tests.conftest import ChunkedAttentionBlock
from tests.export_workers import ONE_LEVEL_SD15

TIMESTEPS = [900, 800, 700, 600]
SMALL_MB = 4 / 1024  # 4 KiB: several buckets per step in the small test UNet


@pytest.fixture(scope="module")
def sd15():
    unet = random_unet("sd15")
    (sample, _), kwargs = unet_inputs(unet)
    g = torch.Generator().manual_seed(1)
    samples = [sample + 0.05 * i * torch.randn(sample.shape, generator=g) for i in range(len(TIMESTEPS))]
    return unet, samples, kwargs


def _run(unet, world_size, samples, kwargs, **options):
    """Every simulated rank's (output, collectives started) per step; one warm-up step."""

    def rank(group):
        pmodel = distrifx.parallelize(unet, world_size, mode="stale", warmup_steps=1, process_group=group, **options)
        return [(pmodel(s, torch.tensor(t), **kwargs).sample, pmodel.last_stats.collectives)
                for s, t in zip(samples, TIMESTEPS)]

    return distrifx.simulate(rank, world_size)


@pytest.mark.parametrize("world_size,stale_dtype", [(2, None), (4, None), (2, torch.bfloat16)])
def test_buckets_send_the_same_values_in_fewer_collectives(sd15, world_size, stale_dtype):
    unet, samples, kwargs = sd15
    runs = {mb: _run(unet, world_size, samples, kwargs, stale_dtype=stale_dtype, bucket_mb=mb)
            for mb in (0.0, SMALL_MB, 64.0)}
    for mb, ranks in runs.items():
        for got, want in zip(ranks, runs[0.0], strict=True):
            for step, ((out, _), (ref, _)) in enumerate(zip(got, want, strict=True)):
                assert torch.equal(out, ref), f"bucket_mb={mb}, step {step}: the values a step reads changed"
    counts = {mb: [n for _, n in ranks[0]] for mb, ranks in runs.items()}
    assert counts[SMALL_MB][0] == counts[0.0][0]  # the warm-up step's exchanges are synchronous: never packed
    assert all(big < small < one for big, small, one in zip(counts[64.0][1:], counts[SMALL_MB][1:], counts[0.0][1:]))
    # one bucket per collective and wire dtype (GroupNorm statistics stay float32), and the output gather
    assert counts[64.0][1] == (3 if stale_dtype else 2) + 1


def test_a_half_precision_model_packs_its_float32_statistics_apart_and_reads_the_same_values():
    unet = random_unet("sd15", **ONE_LEVEL_SD15).to(torch.bfloat16)
    (sample, _), kwargs = unet_inputs(unet)
    kwargs = {k: v.to(torch.bfloat16) for k, v in kwargs.items()}
    samples = [(sample * (1 - 0.1 * i)).to(torch.bfloat16) for i in range(len(TIMESTEPS))]
    packed, plain = (_run(unet, 2, samples, kwargs, bucket_mb=mb) for mb in (64.0, 0.0))
    for got, want in zip(packed, plain, strict=True):
        for (out, _), (ref, _) in zip(got, want, strict=True):
            assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    assert packed[0][-1][1] == 3 + 1  # statistics (float32), K/V and halo rows (bfloat16), the output gather


def test_bucket_boundaries_depend_on_shapes_alone_and_keep_each_bucket_under_its_cap(sd15):
    unet, samples, kwargs = sd15
    cap = int(SMALL_MB * 2**20)
    per_rank = []
    for rank in range(4):
        plan = distrifx.explain(unet, (samples[0], torch.tensor(900)), kwargs, world_size=4, rank=rank,
                                mode="stale", stale_dtype="bfloat16")
        made = buckets(plan.graphs[Phase.STALE], cap)
        per_rank.append([(b.target.__name__, b.wire, [s.name for s in b.starts], b.nbytes) for b in made])
        assert sum(len(b.starts) for b in made) == sum(s.form is Form.STALE for s in plan.sites(Phase.STALE))
        for b in made:
            assert {(s.target, s.kwargs.get("dtype"), s.meta[META_PAYLOAD].dtype) for s in b.starts} == {
                (b.target, b.wire, b.dtype)}
            assert b.nbytes - b.sent_bytes(b.starts[-1]) < cap  # closed by its last member, not before
        assert {b.wire for b in made} == {None, "bfloat16"}  # GroupNorm statistics travel apart from K/V
    assert all(r == per_rank[0] for r in per_rank)


def test_only_stale_graphs_are_packed_and_every_rank_starts_the_same_collectives(sd15):
    unet, samples, kwargs = sd15
    plans = [distrifx.explain(unet, (samples[0], torch.tensor(900)), kwargs, world_size=4, rank=rank, mode="stale",
                              bucket_mb=SMALL_MB) for rank in range(4)]
    plan = plans[0]
    assert plan.collectives(Phase.WARMUP) == len(plan.sites(Phase.WARMUP))
    assert 1 < plan.collectives(Phase.STALE) < len(plan.sites(Phase.STALE))
    assert f"{plan.collectives(Phase.STALE)} collectives" in plan.summary()
    orders = {collective_order(p.graphs[Phase.STALE]) for p in plans}
    assert len(orders) == 1
    assert sum(map(is_start, plan.graphs[Phase.STALE].graph.nodes)) == plan.collectives(Phase.STALE)


def test_buckets_over_gloo_ranks_equal_one_collective_per_exchange():
    """Real processes: the packed halo rows travel point to point, the rest all-gathered."""
    outputs = distrifx.launch(workers.stale_outputs, 2, "sd15", SMALL_MB, threads_per_rank=1, timeout_s=240,
                              all_ranks=True)
    unpacked = distrifx.launch(workers.stale_outputs, 2, "sd15", 0.0, threads_per_rank=1, timeout_s=240,
                               all_ranks=True)
    for got, want in zip(outputs, unpacked, strict=True):
        assert got == want


def test_an_export_stores_its_buckets_and_runs_them(sd15, tmp_path):
    unet, samples, kwargs = sd15
    distrifx.export(unet, tmp_path, 2, args=(samples[0], torch.tensor(TIMESTEPS[0])), kwargs=kwargs, mode="stale",
                    warmup_steps=1, bucket_mb=SMALL_MB)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["options"]["bucket_mb"] == SMALL_MB
    starts = [s for s in manifest["ranks"][0][Phase.STALE]["steps"] if s["op"].endswith("_start")]
    plan = distrifx.explain(unet, (samples[0], torch.tensor(900)), kwargs, world_size=2, mode="stale",
                            bucket_mb=SMALL_MB)
    assert len(starts) == plan.collectives(Phase.STALE)
    loaded = distrifx.simulate(lambda g: [m.sample for m in _loaded_steps(tmp_path, g, samples, kwargs)], 2)
    eager = _run(unet, 2, samples, kwargs)
    for got, want in zip(loaded, eager, strict=True):
        for out, (ref, _) in zip(got, want, strict=True):
            assert float((out - ref).abs().max()) < 1e-5


def _loaded_steps(path, group, samples, kwargs):
    module = distrifx.load(path, process_group=group)
    return [module(s, torch.tensor(t), **kwargs) for s, t in zip(samples, TIMESTEPS)]


def test_buckets_make_fewer_segments_for_a_backend_to_compile():
    unet = random_unet("sd15", **ONE_LEVEL_SD15)
    (sample, _), kwargs = unet_inputs(unet)
    plain, packed = (distrifx.explain(unet, (sample, torch.tensor(900)), kwargs, world_size=2, mode="stale",
                                      bucket_mb=mb) for mb in (0, 64))
    assert len(segments(split_segments(packed.graphs[Phase.STALE]))) < len(
        segments(split_segments(plain.graphs[Phase.STALE])))


def test_inductor_compiles_a_bucketed_stale_graph_that_equals_eager():
    """Each stale step reads state the previous stale step unpacked: compiled segments see the strides the
    warm-up's state had (contiguous), or inductor's input guards fail at the second stale step. A small
    attention block has every exchange kind in a few segments (inductor compiles each for seconds)."""
    model = ChunkedAttentionBlock().eval()
    x = torch.randn(1, 4, 16, 16)

    def run(**options):
        def rank(group):
            pmodel = distrifx.parallelize(model, 2, mode="stale", warmup_steps=1, bucket_mb=64, process_group=group,
                                          **options)
            return [pmodel(x * (1 - 0.1 * i)) for i in range(len(TIMESTEPS))]

        return distrifx.simulate(rank, 2)

    for got, want in zip(run(backend="inductor"), run(), strict=True):
        for out, ref in zip(got, want, strict=True):
            assert float((out - ref).abs().max()) < 1e-4
