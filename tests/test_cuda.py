"""On a CUDA device: sync mode equals the unmodified model (eager and inductor), half precision, bench's GPU cases.

Skipped (not run) without CUDA; `scripts/gpu_check.sh` runs them on a GPU machine. One GPU
cannot host two nccl ranks, so ranks are simulated in one process here.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_map

import distrifx
from distrifx.bench import BenchCase, bench_rank
from distrifx.models import random_unet, unet_inputs
from tests.conftest import half_precision_errors, max_rank_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 convolutions differ from float32 by ~1e-3, more than a patch split does."""
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = True


@pytest.mark.parametrize("mode,backend", [("sync", "eager"), ("stale", "eager"), ("sync", "inductor")])
def test_cuda_ranks_match_the_model(mode, backend):
    """Sync equals the model; stale's first (warm-up) step is sync and equals it too; compiled
    segments (Triton kernels) as well."""
    unet = random_unet("sdxl").cuda()
    args, kwargs = unet_inputs(unet, 1, 32, 16)
    args, kwargs = tree_map(lambda x: x.cuda() if isinstance(x, torch.Tensor) else x, (args, kwargs))
    with torch.no_grad():
        expected = unet(*args, **kwargs).sample
    outs = distrifx.simulate(lambda g: distrifx.parallelize(unet, 2, mode=mode, backend=backend,
                                                            process_group=g)(*args, **kwargs).sample, 2)
    assert all(o.is_cuda for o in outs)
    assert max_rank_error(outs, expected) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_is_as_close_to_float32_as_the_half_model(dtype):
    rounding, parallel = half_precision_errors("sdxl", dtype, device="cuda")
    assert parallel < 2 * rounding


def test_bench_times_one_rank_alone_on_the_gpu():
    case = BenchCase(model="sdxl", height=16, width=16, world_size=8, mode="stale", projected=True, steps=3,
                     warmup_steps=1, device="cuda", dtype="float16")
    rank = bench_rank(case)
    stale = rank["exchanges"]["stale"]
    assert stale["blocking"][1] + stale["overlapped"][1] == rank["steps"][-1]["bytes_sent"]
    assert 0 < rank["peak_bytes"] < torch.cuda.get_device_properties(0).total_memory


def test_bench_times_compiled_ranks_on_the_gpu():
    """The path of report section gpu-sdxl-1024-inductor, on a tiny model: segments compile for CUDA and run."""
    case = BenchCase(model="sdxl", height=16, width=16, world_size=2, mode="stale", projected=True, steps=4,
                     warmup_steps=1, device="cuda", dtype="float16", backend="inductor")
    rank = bench_rank(case)
    assert [s["phase"] for s in rank["steps"]] == ["warmup", "stale", "stale", "stale"]
    stale = rank["exchanges"]["stale"]
    assert stale["blocking"][1] + stale["overlapped"][1] == rank["steps"][-1]["bytes_sent"]
