"""Runs passes by name; a failure names the pass; graphs can be dumped before and after each.

Passes edit ``gm.graph``; :func:`run_passes` regenerates the module's code once, after the last
(a pass that edits a module others run, in place, recompiles it itself: ``simplify``).

Set ``DISTRIFX_DUMP_DIR=/some/dir`` to write ``<graph>.<index>.<pass>.{before,after}.txt`` for every
pass run (``rank`` and graph kind are part of ``<graph>``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch.fx import GraphModule

import torch

from distrifx.config import GNVariant, KVExchange, ParallelConfig
from distrifx.errors import DistrifxError

__all__ = ["PassContext", "PassResult", "PassFn", "Phase", "run_passes", "DUMP_ENV"]

DUMP_ENV = "DISTRIFX_DUMP_DIR"


class Phase:
    """Which per-rank graph is being built (stale mode needs two: warm-up and steady)."""

    SYNC = "sync"  # every exchange fresh; the only graph of mode=sync
    WARMUP = "warmup"  # sync exchanges that also emit the state the next step reads
    STALE = "stale"  # reads the previous step's exchanges, emits this step's
    NAIVE = "naive"  # no exchanges at all


@dataclass(frozen=True)
class PassContext:
    """What every pass may read: the rank the graph is built for and the parallel options."""

    rank: int
    world_size: int
    phase: str = Phase.SYNC
    gn_variant: GNVariant = GNVariant.CORRECTED
    kv_exchange: KVExchange = KVExchange.AUTO
    name: str = "graph"
    stale_dtype: torch.dtype | None = None  # halo rows and K/V of stale exchanges travel in this
    extrapolate: float = 0.0  # stale values extrapolated from the last two steps by this fraction
    fresh: tuple[str, ...] = ()  # exchange kinds a stale graph still does synchronously
    bucket_bytes: int = 0  # stale exchanges coalesced into collectives of up to this many bytes (0: off)
    gather_outputs: bool = True  # False: sharded outputs keep only this rank's rows (the rest NaN), no gather

    @classmethod
    def for_config(cls, config: ParallelConfig, rank: int, phase: str, name: str) -> PassContext:
        """The context of rank ``rank``'s ``phase`` graph under ``config``'s options."""
        return cls(rank=rank, world_size=config.world_size, phase=phase, gn_variant=config.gn_variant,
                   kv_exchange=config.kv_exchange, name=name, stale_dtype=config.stale_dtype,
                   extrapolate=float(config.extrapolate), fresh=config.fresh,
                   bucket_bytes=int(config.bucket_mb * 2**20), gather_outputs=config.gather_outputs)


@dataclass(frozen=True)
class PassResult:
    graph_module: GraphModule
    modified: bool


PassFn = Callable[[GraphModule, PassContext], PassResult]


def _dump(gm: GraphModule, ctx: PassContext, index: int, name: str, when: str) -> None:
    directory = os.environ.get(DUMP_ENV)
    if not directory:
        return
    path = Path(directory) / f"{ctx.name}.rank{ctx.rank}.{ctx.phase}.{index:02d}.{name}.{when}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(gm.graph))


def run_passes(
    gm: GraphModule,
    ctx: PassContext,
    passes: Sequence[tuple[str, PassFn]],
    skip: Sequence[str] = (),
) -> GraphModule:
    """Run ``passes`` in order (except those named in ``skip``) and return the final graph module."""
    unknown = set(skip) - {name for name, _ in passes}
    if unknown:
        raise DistrifxError(f"cannot skip unknown passes {sorted(unknown)}; passes are {[n for n, _ in passes]}")
    for index, (name, fn) in enumerate(passes):
        if name in skip:
            continue
        _dump(gm, ctx, index, name, "before")
        try:
            gm = fn(gm, ctx).graph_module
        except DistrifxError:
            raise
        except Exception as exc:
            raise DistrifxError(f"pass {name!r} failed on {ctx.name} (rank {ctx.rank}, {ctx.phase}): {exc}") from exc
        _dump(gm, ctx, index, name, "after")
    gm.recompile()
    return gm
