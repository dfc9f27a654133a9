"""Benchmarks: step latency, speedup over one rank, exposed communication, bytes, memory.

Every configuration runs in fresh local processes (``distrifx.launch``), ``threads`` torch threads
per rank, random-weight models of real layouts. The single-rank baseline is the unmodified model
in one process. Per rank and step: wall time, time blocked in collective waits (exposed
communication), compute (the rest), bytes sent; per rank: stale-buffer bytes and peak RSS.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["BenchCase", "run_case", "run_cases", "markdown_table", "machine_description", "plot_results",
           "write_results"]


@dataclass(frozen=True)
class BenchCase:
    """One configuration: model, latent size, batch, ranks, mode, steps."""

    model: str = "sd15-half"
    height: int = 64  # latent rows
    width: int = 64
    batch: int = 1
    world_size: int = 2
    mode: str = "stale"  # "eager" is the unmodified model on one rank (the baseline)
    steps: int = 8
    warmup_steps: int = 4
    threads: int = 1
    projected: bool = False  # time one rank alone (collectives return at once): compute only

    @property
    def label(self) -> str:
        kind = " (one rank timed alone)" if self.projected else ""
        return f"{self.model} {self.height}x{self.width} b{self.batch} N={self.world_size} {self.mode}{kind}"


def _inputs(unet: torch.nn.Module, case: BenchCase) -> tuple[tuple, dict]:
    from distrifx.models import unet_inputs

    return unet_inputs(unet, case.batch, case.height, case.width, tokens=77)


def bench_rank(case: BenchCase) -> dict[str, Any]:
    """Run ``case`` on this rank (inside ``distrifx.launch``, or alone if projected); return its measurements."""
    import torch.distributed as dist

    import distrifx
    from distrifx.models import random_unet
    from distrifx.runtime.comm import TimingCommunicator

    unet = random_unet(case.model)
    (sample, _), kwargs = _inputs(unet, case)
    timesteps = torch.linspace(999, 1, case.steps).round().long()
    group = TimingCommunicator(min(1, case.world_size - 1), case.world_size, 60.0) if case.projected else None
    if case.mode == "eager":
        model, pmodel = unet, None
    else:
        pmodel = distrifx.parallelize(unet, case.world_size, mode=case.mode, warmup_steps=case.warmup_steps,
                                      cfg_parallel=False, process_group=group)
        model = pmodel
    steps = []
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            if not case.projected:
                dist.barrier()  # align ranks so a slow start on one rank is not counted as waiting
            start = time.perf_counter()
            model(sample * (1 - 0.01 * i), t, **kwargs)
            wall = time.perf_counter() - start
            stats = pmodel.last_stats if pmodel is not None else None
            steps.append({
                "wall_s": wall,
                "wait_s": stats.wait_s if stats else 0.0,
                "bytes_sent": stats.bytes_sent if stats else 0,
                "phase": pmodel.last_phase if pmodel is not None else "eager",
            })
    state_bytes = pmodel.generation.state_bytes if pmodel is not None else 0
    return {
        "rank": 0 if case.projected else dist.get_rank(),
        "steps": steps,
        "state_bytes": state_bytes,
        "build_s": pmodel.build_seconds if pmodel is not None else 0.0,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _summarize(case: BenchCase, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over the steady steps (after the first call and, in stale mode, after warm-up)."""
    first_steady = max(1, case.warmup_steps if case.mode == "stale" else 1)
    per_rank = []
    for r in ranks:
        steady = r["steps"][first_steady:] or r["steps"][-1:]
        wall = statistics.median(s["wall_s"] for s in steady)
        wait = statistics.median(s["wait_s"] for s in steady)
        per_rank.append({"wall_s": wall, "wait_s": wait, "compute_s": wall - wait,
                         "bytes_sent": steady[-1]["bytes_sent"]})
    slowest = max(per_rank, key=lambda r: r["wall_s"])
    return {
        "case": asdict(case),
        "label": case.label,
        "step_s": slowest["wall_s"],
        "compute_s": slowest["compute_s"],
        "exposed_comm_s": slowest["wait_s"],
        "exposed_comm_frac": slowest["wait_s"] / slowest["wall_s"],
        "bytes_sent_per_step": max(r["bytes_sent"] for r in per_rank),
        "state_bytes": max(r["state_bytes"] for r in ranks),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
        "build_s": max(r["build_s"] for r in ranks),
        "per_rank": per_rank,
    }


def run_case(case: BenchCase) -> dict[str, Any]:
    """Run one configuration in ``case.world_size`` fresh processes and summarize it."""
    from distrifx.launch import launch

    processes = 1 if case.projected else case.world_size
    ranks = launch(bench_rank, processes, case, threads_per_rank=case.threads, timeout_s=3600, all_ranks=True)
    return _summarize(case, ranks)


def run_cases(cases: list[BenchCase], progress: bool = True) -> list[dict[str, Any]]:
    """Run every case (eager baselines included); add the speedup over the matching baseline."""
    from tqdm import tqdm

    results = [run_case(c) for c in tqdm(cases, desc="distrifx bench", disable=not progress)]
    baselines = {(r["case"]["model"], r["case"]["height"], r["case"]["width"], r["case"]["batch"]): r["step_s"]
                 for r in results if r["case"]["mode"] == "eager"}
    for r in results:
        key = (r["case"]["model"], r["case"]["height"], r["case"]["width"], r["case"]["batch"])
        r["speedup"] = baselines[key] / r["step_s"] if key in baselines else None
    return results


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}, "
            f"gloo over loopback")


def markdown_table(results: list[dict[str, Any]]) -> str:
    head = ("| config | step (s) | speedup | compute (s) | exposed comm (s) | exposed % | sent/step (MiB) "
            "| stale buffers (MiB) | peak RSS/rank (GiB) |\n|---|---|---|---|---|---|---|---|---|")
    rows = [
        f"| {r['label']} | {r['step_s']:.3f} | {r['speedup']:.2f}x | {r['compute_s']:.3f} | "
        f"{r['exposed_comm_s']:.4f} | {100 * r['exposed_comm_frac']:.1f}% | {r['bytes_sent_per_step'] / 2**20:.2f} | "
        f"{r['state_bytes'] / 2**20:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} |"
        if r["speedup"] is not None else f"| {r['label']} | {r['step_s']:.3f} | - | | | | | | |"
        for r in results
    ]
    return "\n".join([head, *rows])


def write_results(results: list[dict[str, Any]], out_dir: Path, command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    plots = plot_results(results, out_dir)
    images = "\n".join(f"![{p.stem}]({p.name})" for p in plots)
    (out_dir / "results.md").write_text(
        f"Machine: {machine_description()}\n\nCommand: `{command}`\n\n{markdown_table(results)}\n\n{images}\n"
    )


def plot_results(results: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Speedup against world size (with the ideal N x) and a stacked step-time breakdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.6))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        c = r["case"]
        if c["mode"] != "eager" and r["speedup"] is not None:
            key = f"{c['model']} {c['height']}x{c['width']} {c['mode']}" + (" (one rank alone)" if c["projected"] else "")
            series.setdefault(key, []).append((c["world_size"], r["speedup"]))
    sizes = sorted({n for points in series.values() for n, _ in points} | {1})
    ax.plot(sizes, sizes, "k--", label="ideal N x")
    for key, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=key)
    ax.set_xlabel("ranks (N)")
    ax.set_ylabel("speedup over one rank")
    ax.set_xticks(sizes)
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(out_dir / "speedup.png")
    fig.savefig(paths[-1], dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(results)), 3.6))
    labels = [r["label"].replace(" b1 ", "\n") for r in results]
    compute = [r["compute_s"] for r in results]
    exposed = [r["exposed_comm_s"] for r in results]
    ax.bar(labels, compute, label="compute")
    ax.bar(labels, exposed, bottom=compute, label="exposed communication (blocked in waits)")
    ax.set_ylabel("seconds per step (slowest rank)")
    ax.tick_params(axis="x", labelsize=6)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "breakdown.png")
    fig.savefig(paths[-1], dpi=130)
    plt.close(fig)
    return paths
