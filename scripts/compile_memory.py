"""Memory one compiled rank spends compiling its stale graph, with and without buckets.

One rank alone (``distrifx bench``'s one-rank-alone case: collectives return at once) of
``--model`` at ``--latent``, ``backend="inductor"``: resident memory before and after the
call that compiles the stale graph, and how much of it the process holds as live tensors.
``--trace`` also records the Python objects' peak during that call with ``tracemalloc`` (slow:
minutes). ``--no-freeze`` compiles without inductor's freezing.

    python scripts/compile_memory.py --bucket-mb 0 && python scripts/compile_memory.py --bucket-mb 8
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc

import torch

from distrifx.backends import torch_compile
from distrifx.bench import BenchCase, build_case, rss_bytes


def _tensor_mib() -> int:
    """MiB of strided CPU tensor storage that Python objects still reference (the compiler's fake
    tensors hold none; oneDNN tensors, weights packed by freezing, expose no storage to count)."""
    storages = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu" and not obj.is_mkldnn:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) // 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sdxl-narrow")
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=0.0)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--no-freeze", action="store_true")
    args = parser.parse_args()
    if args.no_freeze:
        torch_compile.CPU_INDUCTOR_OPTIONS = {}
    torch.set_num_threads(1)
    warmup_steps = 2
    case = BenchCase(model=args.model, height=args.latent, width=args.latent, batch=args.batch, world_size=2,
                     mode="stale", projected=True, steps=warmup_steps + 1, warmup_steps=warmup_steps,
                     backend="inductor", bucket_mb=args.bucket_mb)
    model, pmodel, sample, kwargs, timesteps = build_case(case)
    with torch.no_grad():
        for t in timesteps[:warmup_steps]:
            model(sample, t, **kwargs)
        gc.collect()
        before = {"resident": rss_bytes() // 2**20, "tensors": _tensor_mib()}
        if args.trace:
            tracemalloc.start(1)
        model(sample, timesteps[warmup_steps], **kwargs)
        assert pmodel.last_phase == "stale", pmodel.last_phase
        gc.collect()
        after = {"resident": rss_bytes() // 2**20, "tensors": _tensor_mib()}
    print(f"{args.model} {args.latent}x{args.latent} b{args.batch}, one rank of 2, inductor"
          f"{' (no freezing)' if args.no_freeze else ''}, bucket_mb={args.bucket_mb:g}: the stale graph's first call")
    for key in before:
        print(f"  {key:9s} {before[key]:6d} -> {after[key]:6d} MiB ({after[key] - before[key]:+d})")
    if args.trace:
        now, peak = tracemalloc.get_traced_memory()
        print(f"  python objects allocated during the call: peak {peak / 2**20:.0f} MiB, alive after {now / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
