from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.utils._pytree import tree_map


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def max_rank_error(outputs: list[torch.Tensor], expected: torch.Tensor) -> float:
    return max(float((o - expected).abs().max()) for o in outputs)


def sync_error(model: torch.nn.Module, world_size: int, *args: object, **kwargs: object) -> float:
    """Max abs difference, over every simulated rank, between sync mode and the unmodified model."""
    import distrifx

    with torch.no_grad():
        expected = model(*args, **kwargs)
    outs = distrifx.simulate(
        lambda g: distrifx.parallelize(model, world_size, mode="sync", process_group=g)(*args, **kwargs), world_size
    )
    pick = (lambda o: o.sample) if hasattr(expected, "sample") else (lambda o: o)
    return max_rank_error([pick(o) for o in outs], pick(expected))


def half_precision_errors(name: str, dtype: torch.dtype, device: str = "cpu") -> tuple[float, float]:
    """How far the ``dtype`` model is from the float32 one, and how far its 2-rank sync mode is
    (max over ranks), on random inputs: both differ by rounding, the rewrite must add no more."""
    import distrifx
    from distrifx.models import random_unet, unet_inputs

    unet = random_unet(name).to(device)
    args, kwargs = tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, unet_inputs(unet))
    with torch.no_grad():
        truth = unet(*args, **kwargs).sample
    unet = unet.to(dtype)
    args, kwargs = tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x,
                            (args, kwargs))
    with torch.no_grad():
        half = unet(*args, **kwargs).sample
    outs = distrifx.simulate(
        lambda g: distrifx.parallelize(unet, 2, mode="sync", process_group=g)(*args, **kwargs).sample, 2)
    assert all(o.dtype == dtype and o.device == truth.device for o in outs)
    return float((half.float() - truth).abs().max()), max_rank_error([o.float() for o in outs], truth)


def tensorrt_missing() -> str:
    """Why the TensorRT tests cannot run here; empty when they can (a CUDA device and torch_tensorrt)."""
    missing = [what for what, here in (("no CUDA device", torch.cuda.is_available()),
                                       ("torch_tensorrt is not installed", importlib.util.find_spec("torch_tensorrt")))
               if not here]
    return "; ".join(missing)
