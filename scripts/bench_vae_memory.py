"""Peak memory per rank of the patch-parallel VAE decoder against one process.

    python scripts/bench_vae_memory.py --latent 64 --world-sizes 1 2 4

SD's VAE architecture (random weights) decodes a (1, 4, latent, latent) latent. Per rank it
reports the peak resident memory and the part of it added by decoding (peak minus the resident
memory just before decoding), which is what patch parallelism divides.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

import distrifx

SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
)


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def decode_rank(latent: int) -> dict[str, float]:
    import torch.distributed as dist
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE).eval()
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    world = dist.get_world_size()
    decode = distrifx.parallelize_vae_decoder(vae, world) if world > 1 else vae.decode
    if world > 1:
        decode.program(z)  # capture and build first: their memory is not the decoder's activations
    before = _rss_bytes()
    start = time.perf_counter()
    with torch.no_grad():
        image = decode(z).sample
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_gib": peak / 2**30, "decode_gib": (peak - before) / 2**30, "seconds": seconds,
            "pixels": image.shape[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    print("| ranks | image | peak RSS / rank (GiB) | added by decoding / rank (GiB) | decode time (s) |")
    print("|---|---|---|---|---|")
    for n in args.world_sizes:
        ranks = distrifx.launch(decode_rank, n, args.latent, threads_per_rank=1, timeout_s=3600, all_ranks=True)
        worst = max(ranks, key=lambda r: r["decode_gib"])
        print(f"| {n} | {worst['pixels']}x{worst['pixels']} | {worst['peak_gib']:.2f} | {worst['decode_gib']:.2f} "
              f"| {max(r['seconds'] for r in ranks):.1f} |", flush=True)


if __name__ == "__main__":
    main()
