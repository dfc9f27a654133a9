"""Sync mode equals the unmodified model, on every rank (simulated ranks in one process)."""

from __future__ import annotations

import pytest
import torch

import distrifx
from distrifx.models import random_unet, unet_inputs
from tests.conftest import half_precision_errors, sync_error

ATOL = 1e-5


@pytest.mark.parametrize("name", ["sd15", "sd2", "sdxl"])
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("batch,height,width", [(1, 16, 16), (2, 32, 16)])
def test_sync_equals_eager(name, world_size, batch, height, width):
    unet = random_unet(name)
    args, kwargs = unet_inputs(unet, batch, height, width)
    assert sync_error(unet, world_size, *args, **kwargs) < ATOL


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_sync_equals_eager_eight_simulated_ranks(name):
    unet = random_unet(name)
    args, kwargs = unet_inputs(unet, 1, 32, 24)
    assert sync_error(unet, 8, *args, **kwargs) < ATOL


@pytest.mark.parametrize("name,dtype", [("sd15", torch.bfloat16), ("sdxl", torch.float16)])
def test_half_precision_sync_is_as_close_to_float32_as_the_half_model(name, dtype):
    rounding, parallel = half_precision_errors(name, dtype)
    assert parallel < 2 * rounding


def test_return_types_follow_the_model():
    unet = random_unet("sd15")
    args, kwargs = unet_inputs(unet)

    def rank(group):
        pmodel = distrifx.parallelize(unet, 2, mode="sync", process_group=group)
        return pmodel(*args, **kwargs), pmodel(*args, **kwargs, return_dict=False)

    with torch.no_grad():
        expected = unet(*args, **kwargs)
        (as_dict, as_tuple), _ = distrifx.simulate(rank, 2)
    assert type(as_dict) is type(expected)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert torch.allclose(as_tuple[0], expected.sample, atol=ATOL)


def test_pipeline_attributes_are_forwarded_and_others_refused():
    unet = random_unet("sdxl")
    [pmodel] = distrifx.simulate(lambda g: distrifx.parallelize(unet, 1, process_group=g), 1)
    assert pmodel.config is unet.config
    assert pmodel.dtype == unet.dtype and pmodel.device == unet.device
    assert pmodel.add_embedding is unet.add_embedding
    with pytest.raises(AttributeError, match=r"\.module"):
        pmodel.down_blocks  # noqa: B018


def test_new_input_shape_recaptures():
    unet = random_unet("sd15")
    small, kw_small = unet_inputs(unet, 1, 16, 16)
    large, kw_large = unet_inputs(unet, 1, 32, 16)

    def rank(group):
        pmodel = distrifx.parallelize(unet, 2, mode="sync", process_group=group)
        outs = pmodel(*small, **kw_small).sample, pmodel(*large, **kw_large).sample
        return outs, len(pmodel._programs)

    with torch.no_grad():
        (outs, programs), _ = distrifx.simulate(rank, 2)
        assert programs == 2
        assert torch.allclose(outs[1], unet(*large, **kw_large).sample, atol=ATOL)


def test_a_replaced_non_persistent_buffer_is_captured_again():
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.register_buffer("scale", torch.tensor(2.0), persistent=False)  # as RoPE tables are

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * self.scale

    model, x = Scaled().eval(), torch.randn(1, 3, 8, 8)
    assert sync_error(model, 2, x) < ATOL
    model.scale = torch.tensor(3.0)
    assert sync_error(model, 2, x) < ATOL



class _InPlaceResidual(torch.nn.Module):
    """``h += residual`` on activations, as MultiControlNetModel sums its nets' residuals."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        h += residual  # a replicated input added in place into sharded activations
        return self.conv_out(h)


@pytest.mark.parametrize("world_size", [2, 4])
def test_in_place_ops_are_captured_as_their_functional_forms(world_size):
    x, residual = torch.randn(1, 4, 16, 8), torch.randn(1, 8, 16, 8)
    assert sync_error(_InPlaceResidual().eval(), world_size, x, residual) < ATOL
