from __future__ import annotations

import importlib.util

import pytest
import torch


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


def tensorrt_missing() -> str:
    """Why the TensorRT tests cannot run here; empty when they can (a CUDA device and torch_tensorrt)."""
    missing = [what for what, here in (("no CUDA device", torch.cuda.is_available()),
                                       ("torch_tensorrt is not installed", importlib.util.find_spec("torch_tensorrt")))
               if not here]
    return "; ".join(missing)
