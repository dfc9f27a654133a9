from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def max_rank_error(outputs: list[torch.Tensor], expected: torch.Tensor) -> float:
    return max(float((o - expected).abs().max()) for o in outputs)
