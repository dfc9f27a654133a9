"""Every user-facing error says what, where, why and how to fix it."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import distrifx
from distrifx.models import random_unet, unet_inputs
from distrifx.runtime.comm import Communicator, ProcessGroupCommunicator, SimulatedWorld, TimingCommunicator


def _call_simulated(model, world_size, *args, **options):
    def rank(group):
        return distrifx.parallelize(model, world_size, process_group=group, **options)(*args)

    return distrifx.simulate(rank, world_size)


def test_no_process_group():
    with pytest.raises(distrifx.ProcessGroupError, match="init_process_group"):
        distrifx.parallelize(random_unet("sd15"), 2)


def test_world_size_differs_from_simulated_group():
    with pytest.raises(distrifx.ProcessGroupError, match="world_size=4 but the process group has 2 ranks"):
        distrifx.simulate(lambda g: distrifx.parallelize(random_unet("sd15"), 4, process_group=g), 2)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"mode": "fast"}, "mode='fast' is not valid; choose one of 'sync', 'stale', 'naive'"),
        ({"gn_variant": "x"}, "gn_variant='x' is not valid"),
        ({"warmup_steps": -1}, "warmup_steps=-1 must be an int >= 0"),
        ({"cfg_parallel": "yes"}, "cfg_parallel='yes'"),
        ({"backend": "tvm"}, "backend='tvm' is not valid; choose one of 'eager', 'inductor', 'tensorrt'"),
        ({"stale_dtype": "int8"}, "stale_dtype='int8' is not valid; choose None (the activations' dtype) or one of "
                                  "'bfloat16', 'float16'"),
        ({"extrapolate": 1.5}, "extrapolate=1.5 must be a number in [0, 1]"),
        ({"extrapolate": True}, "extrapolate=True must be a number in [0, 1]"),
        ({"warmup_fraction": 1.0}, "warmup_fraction=1.0 must be a number in [0, 1)"),
        ({"warmup_fraction": "30%"}, "warmup_fraction='30%' must be a number in [0, 1)"),
        ({"bucket_mb": -1}, "bucket_mb=-1 must be a number >= 0"),
        ({"bucket_mb": True}, "bucket_mb=True must be a number >= 0"),
        ({"fresh": ["conv"]}, "fresh=['conv'] is not valid: give the exchanges stale mode keeps synchronous as a "
                              "sequence of 'halo', 'kv', e.g. fresh=('halo',)."),
        ({"fresh": ("gn",)}, "(GroupNorm statistics are kept synchronous with gn_variant='sync')"),
    ],
)
def test_invalid_options(options, message):
    with pytest.raises(distrifx.ConfigError, match=re.escape(message)):
        distrifx.parallelize(random_unet("sd15"), 2, **options)


@pytest.mark.parametrize("options,message", [
    ({"cfg_parallel": 1}, "cfg_parallel=1 must be 'auto', True or False"),
    ({"bucket_mb": float("nan")}, "bucket_mb=nan must be a number >= 0"),
    ({"bucket_mb": float("inf")}, "bucket_mb=inf must be a number >= 0"),
    ({"timeout_s": "300"}, "timeout_s='300' must be a number of seconds > 0"),
    ({"timeout_s": None}, "timeout_s=None must be a number of seconds > 0"),
    ({"warmup_steps": True}, "warmup_steps=True must be an int >= 0"),
    ({"world_size": True}, "world_size=True must be a positive int"),
])
def test_options_of_the_wrong_type_are_refused_by_name(options, message):
    with pytest.raises(distrifx.ConfigError, match=re.escape(message)):
        distrifx.ParallelConfig(**{"world_size": 2, **options})


def test_invalid_options_name_every_problem():
    with pytest.raises(distrifx.ConfigError) as info:
        distrifx.ParallelConfig(world_size=0, warmup_steps=-2)
    assert "world_size=0" in str(info.value) and "warmup_steps=-2" in str(info.value)


def test_height_that_does_not_split_names_the_heights_that_do():
    unet = random_unet("sd15")  # one downsampling: latent rows must be multiples of 2 x 4 ranks
    args, kwargs = unet_inputs(unet, 1, 20, 16)
    with pytest.raises(distrifx.ShapeError) as info:
        distrifx.explain(unet, args, kwargs, world_size=4)
    text = str(info.value)
    assert "down_blocks" in text or "conv" in text
    assert "must be multiples of 8, e.g. [8, 16, 24, 32" in text


class _RowCumsum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.cumsum(2)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = _RowCumsum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


class _WeightFromLatent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return nn.functional.linear(h, h[0, 0])


@pytest.mark.parametrize("model,error,expected", [
    (_Model, distrifx.UnsupportedOpError, ["aten.cumsum.default", "in module head (_RowCumsum)",
                                           "no sharding rule is registered", "distrifx.passes.rules.register"]),
    (_WeightFromLatent, distrifx.ShardingError, [
        "node 'linear' (aten.linear.default) in module <root> (_WeightFromLatent)",
        "the linear weight is computed from the sharded latent", "from parameters or replicated inputs"]),
])
def test_an_op_the_passes_cannot_shard_names_op_module_and_fix(model, error, expected):
    with pytest.raises(error) as info:
        distrifx.explain(model(), (torch.randn(1, 3, 8, 8),), world_size=2)
    for fragment in expected:
        assert fragment in str(info.value)


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


def test_model_that_cannot_be_captured():
    with pytest.raises(distrifx.CaptureError, match="torch.export could not capture _DataDependent"):
        distrifx.explain(_DataDependent(), (torch.randn(1, 3, 8, 8),), world_size=2)


def test_a_failing_simulated_rank_releases_the_others():
    def rank(group):
        if group.rank == 1:
            raise ValueError("rank 1 broke")
        unet = random_unet("sd15")
        args, kwargs = unet_inputs(unet)
        return distrifx.parallelize(unet, 2, mode="sync", process_group=group)(*args, **kwargs)

    with pytest.raises(ValueError, match="rank 1 broke"):
        distrifx.simulate(rank, 2, timeout_s=60)


def test_ranks_called_with_the_same_nan_inputs_are_not_called_with_different_ones():
    """A generation that diverged (NaN) on every rank is no seed mismatch; a real difference still is."""
    from distrifx.runtime.comm import check_same_inputs

    def rank(group):
        check_same_inputs(group, [torch.tensor([1.0, float("nan")])], lambda: ["sample"])
        check_same_inputs(group, [torch.tensor([1.0, float("nan")]), torch.tensor([float(group.rank)])],
                          lambda: ["sample", "timestep"])

    with pytest.raises(distrifx.DistrifxError, match=r"different values of \['timestep'\]"):
        distrifx.simulate(rank, 2)


@pytest.mark.parametrize("make", [lambda: SimulatedWorld(3).group(2), lambda: TimingCommunicator(2, 3, 1.0)],
                         ids=["simulated", "timing"])
def test_a_rank_in_none_of_the_split_groups_is_told_so(make):
    with pytest.raises(distrifx.DistrifxError, match=re.escape(
            "rank 2 is in none of the groups [[0, 1]]: split() takes a partition of the ranks")):
        make().split([[0, 1]])


class _LateWork:
    """A ``dist.Work`` whose bounded wait ran out without an error (``wait`` returns False)."""

    def wait(self, timeout: object) -> bool:
        return False


def test_a_collective_that_runs_out_of_time_names_the_cause_and_the_fix():
    comm = ProcessGroupCommunicator.__new__(ProcessGroupCommunicator)  # no process group needed to word it
    Communicator.__init__(comm, 0, 2, 3.0)
    with pytest.raises(distrifx.CollectiveTimeoutError) as info:
        comm._wait([_LateWork()], "all_gather")
    assert "all_gather failed or timed out after 3s: a peer rank did not join it in time" in str(info.value)
    assert "check its log, or pass a larger timeout_s" in str(info.value)
