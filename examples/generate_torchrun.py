"""Generate one image with a patch-parallel diffusers pipeline, one process per device.

    torchrun --nproc-per-node 2 examples/generate_torchrun.py --kind sd15
    torchrun --nproc-per-node 4 examples/generate_torchrun.py --kind sdxl --model /models/sdxl --height 1024 --width 1024

Without --model it builds a tiny pipeline of the chosen layout with random weights (the image is
noise-like, but every rank runs the real pipeline code path). nccl on GPUs, gloo on CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import distrifx
from distrifx.models import tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["sd15", "sdxl", "sd3"], default="sd15")
    parser.add_argument("--model", default=None, help="local diffusers pipeline directory")
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mode", choices=["sync", "stale", "naive"], default="stale")
    parser.add_argument("--out", default="torchrun.png")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    if args.model:
        import diffusers

        pipe = diffusers.DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float16 if cuda else None)
    else:
        pipe = tiny_pipeline(args.kind)
    pipe = pipe.to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=rank != 0)
    pipe = distrifx.parallelize_pipeline(pipe, dist.get_world_size(), mode=args.mode, parallel_vae=True)

    options = {"height": args.height, "width": args.width}
    start = time.perf_counter()
    image = pipe(args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
                 **{k: v for k, v in options.items() if v is not None}).images[0]
    if rank == 0:
        image.save(args.out)
        print(f"rank 0: {args.out} in {time.perf_counter() - start:.2f} s on {dist.get_world_size()} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
