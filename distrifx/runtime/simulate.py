"""Run N ranks in one process, one thread each, over a simulated communicator."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from distrifx.runtime.comm import SimulatedGroup, SimulatedWorld

__all__ = ["simulate"]

T = TypeVar("T")


def simulate(fn: Callable[[SimulatedGroup], T], world_size: int, timeout_s: float = 120.0) -> list[T]:
    """Call ``fn(group)`` on ``world_size`` threads, one per rank; return every rank's result.

    Pass ``group`` as ``process_group`` to :func:`distrifx.parallelize`. If a rank raises, the
    others are released and the first error is re-raised here.

    Example:
        >>> outs = distrifx.simulate(                                            # doctest: +SKIP
        ...     lambda g: distrifx.parallelize(unet, 8, mode="sync", process_group=g)(x, t, ctx),
        ...     world_size=8)
    """
    world = SimulatedWorld(world_size, timeout_s)
    results: list = [None] * world_size

    def body(rank: int) -> None:
        try:
            results[rank] = fn(world.group(rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            world.abort(exc)

    threads = [threading.Thread(target=body, args=(r,), name=f"distrifx-rank{r}") for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if world.first_error is not None:  # the root cause, not the peers' "a peer failed"
        raise world.first_error
    return results
