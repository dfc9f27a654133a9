"""DiT transformers (SD3, PixArt, Flux) and a custom module, through the same passes, no model code."""

from __future__ import annotations

import pytest
import torch

import distrifx
from distrifx.models import random_transformer, transformer_inputs
from tests import workers
from tests.conftest import CustomBlock, sync_error


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


@pytest.mark.parametrize("world_size", [2, 4])
def test_custom_module_sync_equals_eager(world_size):
    torch.manual_seed(0)
    assert sync_error(CustomBlock().eval(), world_size, torch.randn(2, 3, 32, 16)) < 1e-5
