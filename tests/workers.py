"""Rank functions for the multi-process tests (module level so spawned processes can import them)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

import distrifx
from distrifx.models import random_unet, unet_inputs


def sync_vs_eager(name: str, batch: int, height: int, width: int, cfg_parallel: bool | str = False) -> float:
    """Max abs difference between this rank's sync-mode output and the unmodified model's."""
    world = dist.get_world_size()
    unet = random_unet(name)
    args, kwargs = unet_inputs(unet, batch, height, width)
    with torch.no_grad():
        expected = unet(*args, **kwargs).sample
        pmodel = distrifx.parallelize(unet, world, mode="sync", cfg_parallel=cfg_parallel)
        got = pmodel(*args, **kwargs).sample
    return float((got - expected).abs().max())


def gathers_and_halos() -> tuple[list, list, int, list, int]:
    """This rank's all-gathers (several at once, waited in reverse) and halo rows over gloo, and bytes sent;
    then rank 0's tensor broadcast, and the bytes the broadcast sent.

    Lists, not tensors: a tensor sent back through the launcher's queue lives in shared memory that
    goes away with this process.
    """
    from distrifx.runtime.comm import ProcessGroupCommunicator

    comm = ProcessGroupCommunicator(dist.group.WORLD, 60.0)
    rank = dist.get_rank()
    blocks = [torch.full((2, 3), float(10 * i + rank)) for i in range(3)]
    works = [comm.all_gather(b, 1) for b in blocks]
    gathered = torch.stack([w.wait() for w in reversed(works)])
    rows = comm.neighbour_rows(torch.arange(4.0).reshape(4, 1) + 100 * rank, 0, 1, 1).wait()
    sent = comm.stats.bytes_sent
    broadcast = comm.broadcast(torch.full((2,), float(rank + 7))).wait()
    return gathered.tolist(), rows.flatten().tolist(), sent, broadcast.tolist(), comm.stats.bytes_sent - sent


def silent_peer(timeout_s: float) -> str:
    """Rank 1 stops calling the model; rank 0 must fail within the timeout, not hang."""
    unet = random_unet("sd15")
    args, kwargs = unet_inputs(unet)
    pmodel = distrifx.parallelize(unet, dist.get_world_size(), mode="sync", timeout_s=timeout_s)
    pmodel.program(*args, **kwargs)
    if dist.get_rank() == 1:
        time.sleep(timeout_s * 3)
        return "slept"
    start = time.monotonic()
    try:
        pmodel(*args, **kwargs)
    except distrifx.CollectiveTimeoutError:
        return f"timed out after {time.monotonic() - start:.1f}s"
    return "no error"


def dies() -> None:
    if dist.get_rank() == 1:
        os._exit(3)
    time.sleep(60)


def environment(name: str) -> tuple[str | None, int]:
    """This rank's value of the environment variable ``name``, and its torch threads."""
    return os.environ.get(name), torch.get_num_threads()


def world_size_mismatch() -> str:
    try:
        distrifx.parallelize(random_unet("sd15"), dist.get_world_size() + 1)
    except distrifx.ProcessGroupError as exc:
        return str(exc)
    return "no error"


def dit_sync_vs_eager(name: str) -> float:
    from distrifx.models import random_transformer, transformer_inputs

    model = random_transformer(name)
    _, kwargs = transformer_inputs(model, 1, 16, 24)
    with torch.no_grad():
        expected = model(**kwargs).sample
        got = distrifx.parallelize(model, dist.get_world_size(), mode="sync")(**kwargs).sample
    return float((got - expected).abs().max())


def stale_outputs(name: str, bucket_mb: float) -> list:
    """This rank's outputs (as lists) over four stale-mode steps, one of them warm-up, with stale
    exchanges sent in buckets of ``bucket_mb`` MiB."""
    unet = random_unet(name)
    (sample, _), kwargs = unet_inputs(unet)
    pmodel = distrifx.parallelize(unet, dist.get_world_size(), mode="stale", warmup_steps=1, bucket_mb=bucket_mb)
    with torch.no_grad():
        return [pmodel(sample + 0.05 * i, torch.tensor(t), **kwargs).sample.tolist()
                for i, t in enumerate((900, 800, 700, 600))]


def late_split(timeout_s: float, delay_s: float) -> str:
    """Rank 1 reaches a split ``delay_s`` late: how long this rank's split took to fail, and why."""
    from distrifx.runtime.comm import ProcessGroupCommunicator

    comm = ProcessGroupCommunicator(dist.group.WORLD, timeout_s)
    if dist.get_rank() == 1:
        time.sleep(delay_s)
    start = time.monotonic()
    try:
        comm.split([[0, 1]])
    except distrifx.CollectiveTimeoutError as exc:
        return f"{time.monotonic() - start:.1f}s: {exc}"
    return "split"


def ignores_sigterm(pid_path: str) -> None:
    """Rank 0 ignores SIGTERM (as a rank stuck in native code may) and writes its pid; then rank 1 fails."""
    if dist.get_rank() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        Path(pid_path).write_text(str(os.getpid()))
    dist.barrier()
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 broke")
    time.sleep(30)
