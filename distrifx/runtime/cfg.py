"""Classifier-free-guidance parallelism: the two halves of a CFG batch on two rank groups."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from distrifx.errors import ConfigError
from distrifx.runtime.comm import CommStats, Communicator

if TYPE_CHECKING:
    from distrifx.runtime.program import Generation, RankProgram

__all__ = ["CfgSplit", "LocalCall", "batch_half", "batch_size", "wants_split", "local_call"]


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
        return batch_half(flat, batch, self.half)

    def full_outputs(self, flat: list[Any], batch: int, gather: bool = True) -> list[Any]:
        """Both halves of every output whose leading dim is the half batch, on every rank.

        With ``gather`` False (``gather_outputs=False``) a floating-point output holds only this rank's
        half, the other NaN, and nothing is sent: for a consumer split alike, which reads only its half.
        """
        return [self._full(x, batch, gather) for x in flat]

    def _full(self, x: Any, batch: int, gather: bool) -> Any:
        if not (isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch // 2):
            return x
        if gather or not x.is_floating_point():
            return self.pair.all_gather(x, 0).wait()
        halves = [x, torch.full_like(x, float("nan"))]
        return torch.cat(halves if self.half == 0 else halves[::-1])


def batch_half(flat: list[Any], batch: int, half: int) -> list[Any]:
    """Half ``half`` (0 or 1) of every input whose leading dim is ``batch``; other inputs as they are."""
    size = batch // 2
    return [
        x.narrow(0, half * size, size) if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch else x
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


@dataclass(frozen=True)
class LocalCall:
    """One call as this rank runs it: the ranks it shares inputs with, and its share of them."""

    comm: Communicator  # the ranks sharing this rank's inputs, one row patch each
    cfg: CfgSplit | None  # None: the whole batch is patch-parallel over every rank
    flat: list[Any]  # this rank's flat inputs (its batch half under a CFG split)
    batch: int | None  # the batch of the whole call
    gather_outputs: bool = True  # False: under a CFG split, outputs hold this rank's batch half only

    def run(self, generation: Generation, program: RankProgram, phase: str) -> tuple[list[Any], CommStats]:
        """Run ``phase`` of this rank's program; return the full flat outputs and what was exchanged."""
        comms = [self.comm] + ([self.cfg.pair] if self.cfg is not None else [])
        for comm in comms:
            comm.stats.reset()
        outputs = generation.run(program, phase, self.comm, self.flat)
        if self.cfg is not None:
            outputs = self.cfg.full_outputs(outputs, self.batch, self.gather_outputs)
        return outputs, CommStats(
            bytes_sent=sum(c.stats.bytes_sent for c in comms),
            collectives=sum(c.stats.collectives for c in comms),
            wait_s=sum(c.stats.wait_s for c in comms),
        )


def local_call(comm: Communicator, cfg_parallel: bool | str, flat: list[Any],
               split: Callable[[], CfgSplit], gather_outputs: bool = True) -> LocalCall:
    """This rank's share of a call: its batch half if the call runs CFG-parallel, else everything.

    ``split`` gives the :class:`CfgSplit` of ``comm`` (created once, collectively, by the caller);
    ``gather_outputs`` is :class:`~distrifx.ParallelConfig`'s.

    Example:
        >>> call = local_call(comm, "auto", flat, lambda: cfg)                 # doctest: +SKIP
        >>> outputs, stats = call.run(generation, program, "sync")
    """
    batch = batch_size(flat)
    if not wants_split(cfg_parallel, comm.world_size, batch):
        return LocalCall(comm, None, flat, batch, gather_outputs)
    cfg = split()
    return LocalCall(cfg.patch, cfg, cfg.local_inputs(flat, batch), batch, gather_outputs)
