"""CPU cost of an all-gather over gloo: the collective against direct sends (distrifx's communicator).

On ``--world-size`` local gloo processes, one core each, every rank gathers ``--count`` tensors of
``--mib`` MiB in all per round (the defaults: the K/V gathers of one stale step of the half-width
SD 1.5 UNet at a 64x64 latent, docs/benchmarks.md), all started before any is waited for, as a
stale step does. Per round and rank: wall time, and CPU time of the process's other threads
(the transport's), which on a machine with one core per rank is taken from the ranks' compute.

    python scripts/bench_gather.py --world-size 2 --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import distrifx
from distrifx.runtime.comm import ProcessGroupCommunicator


def _collective(tensors: list[torch.Tensor]) -> None:
    works = []
    for x in tensors:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        works.append((dist.all_gather(parts, x, async_op=True), parts))
    for work, parts in works:
        work.wait(timedelta(seconds=60))
        torch.cat(parts)


def _communicator(comm: ProcessGroupCommunicator, tensors: list[torch.Tensor]) -> None:
    for work in [comm.all_gather(x, 0) for x in tensors]:
        work.wait()


def measure(count: int, mib: float, rounds: int) -> dict[str, list[float]]:
    """Median wall and transport-CPU seconds per round, collective then communicator, alternating."""
    comm = ProcessGroupCommunicator(dist.group.WORLD, 60.0)
    tensors = [torch.randn(int(mib * 2**20 / 4 / count)) for _ in range(count)]
    runs = {"gloo all_gather": lambda: _collective(tensors), "distrifx communicator": lambda: _communicator(comm, tensors)}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            dist.barrier()
            cpu, own, wall = time.process_time(), time.thread_time(), time.perf_counter()
            run()
            wall = time.perf_counter() - wall
            samples[name].append((wall, (time.process_time() - cpu) - (time.thread_time() - own)))
    return {name: [statistics.median(s[0] for s in runs), statistics.median(s[1] for s in runs)]
            for name, runs in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--count", type=int, default=32, help="tensors gathered per round (default 32)")
    parser.add_argument("--mib", type=float, default=22.0, help="MiB each rank contributes per round (default 22)")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    results = distrifx.launch(measure, args.world_size, args.count, args.mib, args.rounds, backend="gloo",
                              threads_per_rank=1, bind_cores=True, all_ranks=True)
    print(f"{args.world_size} gloo ranks, {args.count} gathers of {args.mib:g} MiB in all per round, "
          f"median of {args.rounds} rounds, slowest rank:")
    print("| gather | wall (ms) | transport CPU (ms) |\n|---|---|---|")
    for name in results[0]:
        wall = max(r[name][0] for r in results)
        cpu = max(r[name][1] for r in results)
        print(f"| {name} | {1e3 * wall:.1f} | {1e3 * cpu:.1f} |")


if __name__ == "__main__":
    main()
