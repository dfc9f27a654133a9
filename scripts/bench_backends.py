"""Compile/export time and per-step time of eager vs inductor vs stored (pt2, AOTInductor, ONNX) programs.

Every backend runs on ``--world-size`` fresh local gloo processes (``distrifx.launch``), one torch
thread per rank, on a random-weight UNet of ``--model`` layout. Per backend: the time to get a
runnable program (eager/inductor: the first call, which captures, builds and, for inductor,
compiles every segment; pt2/aoti/onnx: ``distrifx.export`` in this process, then ``distrifx.load`` on
each rank) and the median of the following steps' wall time on rank 0. Inductor starts from an
empty compile cache, then runs again on the warm one.

    python scripts/bench_backends.py --model sd15 --world-size 2 --steps 10 --mode sync
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import distrifx
from distrifx.models import random_unet, unet_inputs

BACKENDS = ("eager", "inductor", "pt2", "aoti", "onnx")


def _timed_steps(module: Any, args: tuple, kwargs: dict, steps: int) -> dict[str, float]:
    """First call, then median and minimum of the next ``steps`` calls, in seconds.

    Timesteps decrease like a sampler's. The minimum is reported too because the CPU may be
    shared: it is the least disturbed step.
    """
    timesteps = torch.linspace(999, 1, steps + 1).round().long()
    times = []
    for t in timesteps:
        dist.barrier()
        start = time.perf_counter()
        module(args[0], t, **kwargs)
        times.append(time.perf_counter() - start)
    return {"first_s": times[0], "step_s": statistics.median(times[1:]), "min_s": min(times[1:])}


def _rank_parallelize(model: str, backend: str, mode: str, steps: int) -> dict[str, float]:
    unet = random_unet(model)
    args, kwargs = unet_inputs(unet)
    module = distrifx.parallelize(unet, dist.get_world_size(), mode=mode, warmup_steps=1, cfg_parallel=False,
                                  backend=backend)
    return _timed_steps(module, args, kwargs, steps)


def _rank_load(model: str, directory: str, steps: int) -> dict[str, float]:
    unet = random_unet(model)  # only for its inputs (and to register its output type with pytree)
    args, kwargs = unet_inputs(unet)
    start = time.perf_counter()
    module = distrifx.load(directory, allow_native_code=True)  # an aoti export this script just wrote
    return {"load_s": time.perf_counter() - start, **_timed_steps(module, args, kwargs, steps)}


def bench(model: str, world_size: int, mode: str, steps: int, backends: list[str]) -> list[tuple[str, str, dict]]:
    """Rows of (backend, preparation in words, step timings)."""
    rows = []
    launch = dict(threads_per_rank=1, timeout_s=1800)
    for backend in backends:
        if backend in ("eager", "inductor"):
            runs = ["cold cache", "warm cache"] if backend == "inductor" else [""]
            with tempfile.TemporaryDirectory() as cache:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # each launch hands its environment to its ranks
                for run in runs:
                    r = distrifx.launch(_rank_parallelize, world_size, model, backend, mode, steps, **launch)
                    rows.append((f"{backend} {run}".strip(), f"first call {r['first_s']:.1f} s", r))
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        else:
            with tempfile.TemporaryDirectory() as out:
                unet = random_unet(model)
                args, kwargs = unet_inputs(unet)
                start = time.perf_counter()
                distrifx.export(unet, out, world_size, args=args, kwargs=kwargs, mode=mode, warmup_steps=1,
                                format=backend)
                export_s = time.perf_counter() - start
                files = sum(p.stat().st_size for p in Path(out, "segments").iterdir())
                r = distrifx.launch(_rank_load, world_size, model, out, steps, **launch)
                rows.append((backend, f"export {export_s:.1f} s ({files / 2**20:.1f} MiB), load {r['load_s']:.1f} s, "
                                      f"first call {r['first_s']:.1f} s", r))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--mode", default="sync", choices=["sync", "stale", "naive"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    a = parser.parse_args()
    torch.set_num_threads(1)
    rows = bench(a.model, a.world_size, a.mode, a.steps, a.backends.split(","))
    print(f"| {a.model}, world size {a.world_size}, {a.mode} | preparation | step: median of {a.steps} | min |")
    print("|---|---|---|---|")
    for backend, prepare, r in rows:
        print(f"| {backend} | {prepare} | {r['step_s'] * 1e3:.1f} ms | {r['min_s'] * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
