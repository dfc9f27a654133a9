"""Start local ranks without torchrun: free port, gloo on CPU, nccl with one GPU per rank.

Ranks are forked by a fork server (``multiprocessing``'s ``forkserver``) that imported torch, distrifx
and diffusers' models once: a rank starts in milliseconds, not the seconds each spawned process
spends importing them. Each rank still runs in a process of its own, with the launching process's
environment as it is at the launch.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distrifx.config import DEFAULT_TIMEOUT_S
from distrifx.errors import DistrifxError

__all__ = ["launch", "free_port", "rank_cores", "process_context", "adopt", "PRELOAD"]

# What the fork server imports before it forks any rank (a name that does not import is skipped).
PRELOAD = ("distrifx", "distrifx.models", "diffusers.models.unets.unet_2d_condition",
           "diffusers.models.autoencoders.autoencoder_kl")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_cores(rank: int, world_size: int, threads: int) -> list[int] | None:
    """The cores rank ``rank`` is bound to: its own ``threads`` of those this process may use, or
    None when the ranks do not fit side by side (then the OS schedules them)."""
    cores = sorted(os.sched_getaffinity(0))
    if world_size * threads > len(cores):
        return None
    return cores[rank * threads:(rank + 1) * threads]


def _worker(
    rank: int, world_size: int, port: int, backend: str, threads: int | None, bind_cores: bool, timeout_s: float,
    fn: Callable[..., Any], args: tuple, results: Any, environ: dict[str, str],
) -> None:
    try:
        adopt(environ, threads)
        if threads:
            cores = rank_cores(rank, world_size, threads) if bind_cores else None
            if cores:
                os.sched_setaffinity(0, cores)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the launch
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def process_context() -> Any:
    """Where new processes start: the fork server where the platform has one (preloading
    :data:`PRELOAD`), else spawn. Their first call should be :func:`adopt`."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def adopt(environ: Mapping[str, str], threads: int | None = None) -> None:
    """In a new process: take the launching process's environment (a forked process has the fork
    server's, from its first start) and, if given, its number of torch threads."""
    os.environ.clear()
    os.environ.update(environ)
    if threads:
        torch.set_num_threads(threads)


def _stop(proc: Any, grace_s: float) -> None:
    """Wait ``grace_s`` for ``proc`` to exit, then terminate it, then kill it if it ignores that."""
    proc.join(timeout=grace_s)
    for stop in (proc.terminate, proc.kill):
        if proc.is_alive():
            stop()
            proc.join(timeout=2)


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str | None = None,
    threads_per_rank: int | None = None,
    bind_cores: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    all_ranks: bool = False,
) -> Any:
    """Run ``fn(*args)`` on ``world_size`` new local processes in one process group.

    ``fn`` must be importable (a module-level function). Returns rank 0's result, or every
    rank's (a list) with ``all_ranks=True``. With ``bind_cores`` (and ``threads_per_rank``), each
    rank is bound to its own cores when they fit (:func:`rank_cores`), as benchmarks want. If a
    rank raises or dies, the others are stopped and a :class:`DistrifxError` carries the failing
    rank's traceback; the whole launch is bounded by ``timeout_s``.

    Example:
        >>> image = distrifx.launch(generate, 2, prompt)                     # doctest: +SKIP
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    ctx = process_context()
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, name=f"distrifx-rank{r}", daemon=False,
                    args=(r, world_size, port, backend, threads_per_rank, bind_cores, timeout_s, fn, args, results,
                          dict(os.environ)))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise DistrifxError(
                        f"{dead[0].name} died with exit code {dead[0].exitcode} before returning; "
                        "the other ranks were stopped."
                    ) from None
                if time.monotonic() > deadline:
                    raise DistrifxError(f"launch timed out after {timeout_s:.0f}s; ranks were stopped.") from None
                continue
            if not ok:
                raise DistrifxError(f"rank {rank} failed; the other ranks were stopped.\n{value}")
            outputs[rank] = value
    finally:
        for p in procs:
            _stop(p, grace_s=10 if len(outputs) == world_size else 0.5)
    return [outputs[r] for r in range(world_size)] if all_ranks else outputs[0]
