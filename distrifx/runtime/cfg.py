"""Classifier-free-guidance parallelism: the two halves of a CFG batch on two rank groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distrifx.errors import ConfigError
from distrifx.runtime.comm import Communicator

__all__ = ["CfgSplit", "batch_size", "wants_split"]


@dataclass(frozen=True)
class CfgSplit:
    """This rank's place in a 2 x (N/2) layout: which batch half, its patch group, its pair."""

    half: int  # 0: first half of the batch (unconditional in diffusers pipelines), 1: second
    patch: Communicator  # the N/2 ranks sharing this batch half, one row patch each
    pair: Communicator  # this rank and the rank with the same patch in the other half

    @classmethod
    def create(cls, comm: Communicator) -> CfgSplit:
        """Split ``comm`` (collective: every rank calls it in the same order)."""
        n = comm.world_size // 2
        patch = comm.split([list(range(n)), list(range(n, 2 * n))])
        pair = comm.split([[r, r + n] for r in range(n)])
        return cls(half=comm.rank // n, patch=patch, pair=pair)

    def local_inputs(self, flat: list[Any], batch: int) -> list[Any]:
        """This half of every input whose leading dim is the batch."""
        half = batch // 2
        return [
            x.narrow(0, self.half * half, half) if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch else x
            for x in flat
        ]

    def full_outputs(self, flat: list[Any], batch: int) -> list[Any]:
        """Both halves of every output whose leading dim is the half batch, on every rank."""
        return [
            self.pair.all_gather(x, 0).wait() if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch // 2 else x
            for x in flat
        ]


def batch_size(flat: list[Any]) -> int | None:
    """The batch size: the leading dim of the first tensor input with dims (the latent)."""
    return next((int(x.shape[0]) for x in flat if isinstance(x, torch.Tensor) and x.dim()), None)


def wants_split(cfg_parallel: bool | str, world_size: int, batch: int | None) -> bool:
    """Whether this call runs CFG-parallel; ``True`` with an unsplittable batch is an error."""
    splittable = world_size >= 2 and world_size % 2 == 0 and batch is not None and batch % 2 == 0
    if cfg_parallel is True and not splittable:
        raise ConfigError(
            f"cfg_parallel=True needs an even world size and an even batch (the unconditional and "
            f"conditional halves); got world_size={world_size}, batch={batch}. Use cfg_parallel='auto' "
            "to fall back to pure patch parallelism for such calls."
        )
    return bool(cfg_parallel) and splittable
