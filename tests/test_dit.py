"""DiT transformers (SD3, PixArt, Flux) and a custom module, through the same passes, no model code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distrifx
from distrifx.models import random_transformer, transformer_inputs
from tests import workers
from tests.conftest import sync_error


@pytest.mark.parametrize("name", ["sd3", "pixart", "flux"])
@pytest.mark.parametrize("world_size,height,width", [(2, 16, 16), (4, 16, 24), (4, 32, 16)])
def test_sync_equals_eager(name, world_size, height, width):
    model = random_transformer(name)
    _, kwargs = transformer_inputs(model, 1, height, width)
    assert sync_error(model, world_size, **kwargs) < 1e-5


@pytest.mark.parametrize("name", ["sd3", "pixart", "flux"])
def test_only_keys_and_values_cross_patches(name):
    """Patch embedding, positional/rotary embeddings, AdaLN and unpatchify need no communication."""
    model = random_transformer(name)
    _, kwargs = transformer_inputs(model)
    plan = distrifx.explain(model, (), kwargs, world_size=2, mode="sync")
    kinds = {s.kind for s in plan.sites("sync")}
    assert kinds == {"kv", "output"}


def test_flux_on_gloo_ranks():
    errors = distrifx.launch(workers.dit_sync_vs_eager, 2, "flux", threads_per_rank=1, timeout_s=240, all_ranks=True)
    assert max(errors) < 1e-5


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_stale_is_closer_than_naive(name):
    model = random_transformer(name)
    _, kwargs = transformer_inputs(model, 1, 16, 16)
    base = kwargs["hidden_states"]
    ts = [0.9, 0.8, 0.7, 0.6] if name == "flux" else [900.0, 800.0, 700.0, 600.0]

    def run(mode):
        def rank(group):
            pmodel = distrifx.parallelize(model, 2, mode=mode, warmup_steps=1, process_group=group)
            return [pmodel(**{**kwargs, "hidden_states": base * (1 - 0.05 * i), "timestep": torch.tensor([t])}).sample
                    for i, t in enumerate(ts)]

        return distrifx.simulate(rank, 2)[0][-1]

    with torch.no_grad():
        exact = model(**{**kwargs, "hidden_states": base * (1 - 0.05 * 3), "timestep": torch.tensor([ts[-1]])}).sample
    stale_err = float((run("stale") - exact).abs().max())
    naive_err = float((run("naive") - exact).abs().max())
    assert 0 < stale_err < naive_err


class _CustomBlock(nn.Module):
    """Nobody registered this model: convs, GroupNorm, a hand-written attention, upsampling."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.norm = nn.GroupNorm(4, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(self.conv_in(x)))
        h = self.down(h)
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        split = lambda t: t.view(b, -1, 2, c // 2).transpose(1, 2)  # noqa: E731
        attn = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, -1, c)
        h = h + attn.transpose(1, 2).reshape(b, c, height, width)
        return self.conv_out(F.interpolate(h, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("world_size", [2, 4])
def test_custom_module_sync_equals_eager(world_size):
    torch.manual_seed(0)
    assert sync_error(_CustomBlock().eval(), world_size, torch.randn(2, 3, 32, 16)) < 1e-5
