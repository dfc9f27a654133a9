"""A UNet and its ControlNet on N ranks: what keeping the residuals on the ranks that add them saves.

    python examples/controlnet.py --model sd15-half --latent 64 --world-size 2 --steps 10
    python examples/controlnet.py --model sd15-half --latent 64 --world-size 2 --steps 10 --batch 2

Each step calls the ControlNet and then the UNet with its residuals, as diffusers' ControlNet
pipelines do. It runs on one process (the unmodified models) and on N local gloo ranks in stale
mode, one thread each: with the ControlNet patch-parallel too and its residuals left on each rank
for its own rows (what ``distrifx.parallelize_pipeline`` does), the same with the residuals
gathered whole before the UNet reads them, and with only the UNet parallelized (the ControlNet
run whole by every rank). ``--batch 2`` is a guidance batch: with an even world size both models
split it over two rank groups (``cfg_parallel="auto"``), and kept residuals hold each rank's batch
half only.
Prints the median stale step time, the speedup over one process and the MiB each rank sends
per step. Random weights: the numbers are about speed and bytes, not images.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import distrifx
from distrifx.models import UNET_CONFIGS, random_controlnet, random_unet, unet_inputs

WARMUP_STEPS = 1


def _pair(model: str, latent: int, batch: int) -> tuple[torch.nn.Module, torch.nn.Module, tuple, dict]:
    """The UNet, its ControlNet (a conditioning image 8x the latent, as in SD) and one step's inputs."""
    unet = random_unet(model)
    controlnet = random_controlnet(unet, seed=1, factor=8)
    args, kwargs = unet_inputs(unet, batch=batch, height=latent, width=latent)
    cond = torch.rand(batch, 3, 8 * latent, 8 * latent, generator=torch.Generator().manual_seed(2))
    return unet, controlnet, args, {**kwargs, "controlnet_cond": cond}


def _steps(unet: torch.nn.Module, controlnet: torch.nn.Module, args: tuple, kwargs: dict, steps: int):
    """Run ``steps`` denoising steps of the pair; yield each step's seconds once it is done."""
    sample, _ = args
    unet_kwargs = {k: v for k, v in kwargs.items() if k != "controlnet_cond"}
    for t in torch.linspace(999, 1, steps).round().int().tolist():
        start = time.perf_counter()
        with torch.no_grad():
            down, mid = controlnet(sample, torch.tensor(t), **kwargs, return_dict=False)
            unet(sample, torch.tensor(t), **unet_kwargs, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid)
        yield time.perf_counter() - start


def _one_process(model: str, latent: int, batch: int, steps: int) -> float:
    unet, controlnet, args, kwargs = _pair(model, latent, batch)
    return statistics.median(list(_steps(unet, controlnet, args, kwargs, steps))[1:])


# How the ControlNet runs beside the parallelized UNet.
RESIDUALS = {
    "kept": "residuals kept on their ranks",
    "gathered": "residuals gathered whole",
    "unsplit": "ControlNet whole on every rank",
}


def _rank(model: str, latent: int, batch: int, steps: int, world_size: int, residuals: str) -> tuple[float, float]:
    """This rank's median stale step time and MiB sent per stale step."""
    unet, controlnet, args, kwargs = _pair(model, latent, batch)
    options = dict(mode="stale", warmup_steps=WARMUP_STEPS)
    punet = distrifx.parallelize(unet, world_size, **options)
    if residuals != "unsplit":
        controlnet = distrifx.parallelize(controlnet, world_size, gather_outputs=residuals == "gathered", **options)
    times = list(_steps(punet, controlnet, args, kwargs, steps))[WARMUP_STEPS + 1:]
    sent = punet.last_stats.bytes_sent + (controlnet.last_stats.bytes_sent if residuals != "unsplit" else 0)
    return statistics.median(times), sent / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-half", choices=list(UNET_CONFIGS))
    parser.add_argument("--latent", type=int, default=64, help="latent height and width (default 64)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="batch (2: a guidance batch, split CFG-parallel)")
    parser.add_argument("--steps", type=int, default=10, help=f"steps per run; the first {WARMUP_STEPS + 1} are not timed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = _one_process(args.model, args.latent, args.batch, args.steps)
    print(f"{args.model}, {args.latent}x{args.latent} latent, batch {args.batch}, ControlNet + UNet per step")
    print("| configuration | step (s) | speedup | MiB sent per rank per step |")
    print("|---|---|---|---|")
    print(f"| 1 process, unmodified | {base:.3f} | 1.00x | 0 |")
    for residuals, label in RESIDUALS.items():
        step, mib = distrifx.launch(_rank, args.world_size, args.model, args.latent, args.batch, args.steps,
                                    args.world_size, residuals, threads_per_rank=1, bind_cores=True)
        print(f"| N={args.world_size} stale, {label} | {step:.3f} | {base / step:.2f}x | {mib:.2f} |")


if __name__ == "__main__":
    main()
