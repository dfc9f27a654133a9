"""Fidelity of stale and naive patches against the single-device image, on the trained default model.

For every seed the single-device pipeline makes the reference image; the same generation then
runs patch-parallel (simulated ranks: timing is irrelevant here, the arithmetic is the same as
on real ranks) per world size, mode, warm-up and GroupNorm variant, and PSNR/SSIM are taken
against the reference.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import statistics
import textwrap
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from distrifx.launch import adopt, process_context
from distrifx.metrics import psnr, ssim
from distrifx.plots import figure

__all__ = ["FidelityCase", "run_fidelity", "psnr_by_seed", "psnr_summary", "paired_gaps", "standard_error",
           "fidelity_table", "fidelity_figure", "warmup_sweep", "warmup_figure", "FIDELITY_TARGET_DB"]

FIDELITY_TARGET_DB = 20.0  # stale above naive, PSNR against one device
PROMPTS = ("red circle", "blue square", "green triangle", "yellow ring", "purple circle", "white square")


@dataclass(frozen=True)
class FidelityCase:
    world_size: int
    mode: str
    warmup_steps: int = 4
    gn_variant: str = "corrected"
    warmup_fraction: float = 0.0  # also warm up over this first share of the timesteps' range
    stale_dtype: str | None = None
    extrapolate: float = 0.0
    fresh: tuple[str, ...] = ()  # exchange kinds kept synchronous in stale mode

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> FidelityCase:
        """The case a result row of :func:`run_fidelity` was measured for (rows store lists as JSON does)."""
        values = {f.name: row[f.name] for f in fields(cls) if f.name in row}
        return cls(**{**values, "fresh": tuple(values.get("fresh", ()))})

    @property
    def label(self) -> str:
        if self.mode != "stale":
            return f"N={self.world_size} {self.mode}"
        narrow = f", {self.stale_dtype} exchanges" if self.stale_dtype else ""
        ahead = f", extrapolated {self.extrapolate:g}" if self.extrapolate else ""
        fresh = f", fresh {'+'.join(self.fresh)}" if self.fresh else ""
        warm = (f"max({self.warmup_steps} steps, first {self.warmup_fraction:.0%} of t)" if self.warmup_fraction
                else f"{self.warmup_steps}")
        return f"N={self.world_size} stale, warm-up {warm}, GN {self.gn_variant}{narrow}{ahead}{fresh}"


def _generate(pipe: Any, prompt: str, seed: int, size: int, steps: int) -> torch.Tensor:
    return pipe(prompt, height=size, width=size, num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(seed), disable_progress=True).images


def _parallel_image(pipes: Sequence[Any], unet: torch.nn.Module, case: FidelityCase, prompt: str, seed: int,
                    size: int, steps: int) -> tuple[torch.Tensor, int]:
    """Rank 0's image of ``case`` on simulated ranks, and how many of its steps were warm-up steps.

    Rank r runs ``pipes[r]`` (its own scheduler state) with ``unet`` parallelized: the one model, so
    it is captured once for every rank and every case of a seed (``distrifx.capture`` caches by model).
    """
    import distrifx

    def rank(group: Any) -> tuple[torch.Tensor, int]:
        pipe = pipes[group.rank]
        pipe.unet = distrifx.parallelize(unet, case.world_size, mode=case.mode, cfg_parallel=False,
                                         warmup_steps=case.warmup_steps, warmup_fraction=case.warmup_fraction,
                                         gn_variant=case.gn_variant, stale_dtype=case.stale_dtype,
                                         extrapolate=case.extrapolate, fresh=case.fresh, process_group=group)
        return _generate(pipe, prompt, seed, size, steps), pipe.unet.generation.warmup_calls

    return distrifx.simulate(rank, case.world_size)[0]


def _seed_results(load: Callable[[], Any], cases: Sequence[FidelityCase], seed: int, prompt: str, size: int,
                  steps: int) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """One seed's rows and images: the single-device reference, then every case against it.

    The reference's pipeline and its UNet serve every case: a pipeline call starts a new generation.
    """
    pipe = load()
    unet = pipe.unet
    reference = _generate(pipe, prompt, seed, size, steps)
    pipes = [pipe] + [load() for _ in range(max((case.world_size for case in cases), default=1) - 1)]
    rows, images = [], {"reference": reference}
    for case in cases:
        image, warmup_calls = _parallel_image(pipes[:case.world_size], unet, case, prompt, seed, size, steps)
        images[case.label] = image
        rows.append({**asdict(case), "label": case.label, "seed": seed, "prompt": prompt, "steps": steps,
                     "size": size, "psnr_db": psnr(image, reference), "ssim": ssim(image, reference),
                     "warmup_calls": warmup_calls})
    return rows, images


def run_fidelity(
    load: Callable[[], Any],
    cases: Sequence[FidelityCase],
    seeds: Sequence[int] = (0, 1, 2),
    size: int = 64,
    steps: int = 20,
    jobs: int = 1,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """PSNR/SSIM of every case against the single-device image, per seed; and the images.

    ``jobs`` > 1 spreads the seeds over that many new processes (:func:`distrifx.launch.process_context`;
    ``load`` must pickle: a module-level function), each with its share of this process's torch threads.
    """
    from tqdm import tqdm

    tasks = [(load, tuple(cases), seed, prompt, size, steps) for seed, prompt in zip(seeds, itertools.cycle(PROMPTS))]
    bar = functools.partial(tqdm, total=len(tasks), desc="distrifx fidelity (seeds)", disable=not progress)
    if jobs > 1:
        threads = max(1, torch.get_num_threads() // jobs)
        with ProcessPoolExecutor(jobs, mp_context=process_context(), initializer=adopt,
                                 initargs=(dict(os.environ), threads)) as pool:
            per_seed = list(bar(pool.map(_seed_results, *zip(*tasks))))
    else:
        per_seed = [_seed_results(*task) for task in bar(tasks)]
    rows, images = [], {}
    for seed_rows, seed_images in per_seed:
        rows += seed_rows
        for label, image in seed_images.items():
            images.setdefault(label, []).append(image)
    return rows, images


def psnr_by_seed(rows: list[dict[str, Any]], label: str) -> dict[int, float]:
    """Per seed, the PSNR of configuration ``label`` (identical images count as 99 dB)."""
    return {r["seed"]: min(r["psnr_db"], 99.0) for r in rows if r["label"] == label}


def psnr_summary(rows: list[dict[str, Any]], label: str) -> tuple[float, float, float]:
    """Configuration ``label``'s PSNR over seeds: (mean, lowest, highest); identical images count as 99 dB."""
    values = list(psnr_by_seed(rows, label).values())
    return statistics.fmean(values), min(values), max(values)


def paired_gaps(rows: list[dict[str, Any]], label: str, base: str) -> list[float]:
    """Per seed (the same prompt and initial noise), configuration ``label``'s PSNR minus ``base``'s."""
    floor = psnr_by_seed(rows, base)
    return [value - floor[seed] for seed, value in psnr_by_seed(rows, label).items()]


def standard_error(values: list[float]) -> float:
    """Standard error of the mean of ``values`` (NaN for fewer than two)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def fidelity_table(rows: list[dict[str, Any]]) -> str:
    """Per case over seeds: mean PSNR with the lowest and highest seed's, mean SSIM; a markdown table."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    lines = ["| configuration | PSNR vs 1 device (dB): mean [min, max] | SSIM | seeds |", "|---|---|---|---|"]
    for label in labels:
        ssims = [r["ssim"] for r in rows if r["label"] == label]
        mean, low, high = psnr_summary(rows, label)
        lines.append(f"| {label} | {mean:.1f} [{low:.1f}, {high:.1f}] | {statistics.fmean(ssims):.3f} | {len(ssims)} |")
    return "\n".join(lines)


def fidelity_figure(images: dict[str, list[torch.Tensor]], rows: list[dict[str, Any]], path: Any,
                    max_seeds: int = 8) -> None:
    """A grid: one row per seed (the first ``max_seeds``), the reference then each configuration, PSNR in the titles."""
    labels = list(images)
    seeds = min(len(images["reference"]), max_seeds)
    with figure(path, dpi=120, nrows=seeds, ncols=len(labels), figsize=(2.2 * len(labels), 2.8 * seeds),
                squeeze=False) as axes:
        for s in range(seeds):
            for c, label in enumerate(labels):
                ax = axes[s][c]
                ax.imshow(images[label][s][0].permute(1, 2, 0).clamp(0, 1).numpy())
                ax.set_xticks([])
                ax.set_yticks([])
                if label == "reference":
                    ax.set_title("1 device", fontsize=8)
                else:
                    value = [r for r in rows if r["label"] == label][s]["psnr_db"]
                    ax.set_title(f"{textwrap.fill(label, 30)}\n{value:.1f} dB", fontsize=7)


def warmup_sweep(rows: list[dict[str, Any]]) -> list[int]:
    """The warm-ups measured for the plain stale configuration (corrected GroupNorm, no other option),
    sorted; empty unless there are at least two."""
    plain = {r["warmup_steps"] for r in rows
             if r["mode"] == "stale" and r["label"] == FidelityCase(r["world_size"], "stale", r["warmup_steps"]).label}
    return sorted(plain) if len(plain) > 1 else []


def warmup_figure(rows: list[dict[str, Any]], path: Any) -> None:
    """PSNR gained over naive patches against synchronous warm-up steps, per world size: the mean over
    seeds (paired) with its standard error, and the +20 dB target."""
    sweep = warmup_sweep(rows)
    with figure(path, dpi=120, figsize=(5, 3.5)) as ax:
        for world in sorted({r["world_size"] for r in rows}):
            naive = FidelityCase(world, "naive").label
            points = [(w, paired_gaps(rows, FidelityCase(world, "stale", w).label, naive)) for w in sweep]
            points = [(w, gaps) for w, gaps in points if gaps]
            ax.errorbar([w for w, _ in points], [statistics.fmean(g) for _, g in points],
                        yerr=[standard_error(g) for _, g in points], marker="o", capsize=3, label=f"N={world}")
        ax.axhline(FIDELITY_TARGET_DB, color="k", linestyle=":", label=f"+{FIDELITY_TARGET_DB:.0f} dB")
        ax.set_xticks(sweep)
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, FIDELITY_TARGET_DB - 1), max(high, FIDELITY_TARGET_DB + 1))
        ax.set_xlabel(f"synchronous warm-up steps (of {rows[0]['steps']})")
        ax.set_ylabel("PSNR over naive patches (dB):\nmean, standard error")
        ax.legend()
