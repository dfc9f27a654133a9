"""Benchmarks: step latency, speedup over one rank, exposed communication, bytes, memory.

Every configuration runs in fresh local processes (``distrifx.launch``), ``threads`` torch threads
per rank, random-weight models of real layouts. The single-rank baseline is the unmodified model
in one process. Per rank and step: wall time, time blocked in collective waits (exposed
communication), compute (the rest), bytes sent; per rank: stale-buffer bytes and peak memory.

World sizes a machine cannot host are timed one rank at a time (``projected``); a :class:`Link`
turns such a timing into a projected step by adding the communication the rank's plan says it
needs, estimated from bytes and collective counts (:func:`projected_step`). On a GPU
(``device="cuda"``) only those single-process cases run: the eager baseline and one rank alone.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from distrifx.errors import ConfigError
from distrifx.passes import Phase
from distrifx.plots import figure

__all__ = ["BenchCase", "Link", "projected_step", "build_case", "baseline_key", "measure_case", "run_cases",
           "markdown_table", "machine_description", "plot_results", "write_results", "read_results", "write_json",
           "run_vae_memory", "vae_memory_table", "rss_bytes"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BACKENDS = ("eager", "inductor")  # what bench can run: the baseline is compiled with the same torch.compile backend


@dataclass(frozen=True)
class BenchCase:
    """One configuration: model, latent size, batch, ranks, mode, steps."""

    model: str = "sd15-half"
    height: int = 64  # latent rows
    width: int = 64
    batch: int = 1
    world_size: int = 2
    mode: str = "stale"  # "eager": the unmodified model on one rank (the baseline); "copies": on every rank at once
    steps: int = 8
    warmup_steps: int = 4
    gn_variant: str = "corrected"  # stale mode's GroupNorm statistics
    stale_dtype: str | None = None  # stale mode's halo rows and K/V travel in this (None: the activations')
    extrapolate: float = 0.0  # stale mode's halo rows and K/V extrapolated from the last two steps
    fresh: tuple[str, ...] = ()  # exchange kinds stale mode still does synchronously
    bucket_mb: float = 0.0  # stale mode's exchanges sent in collectives of up to this many MiB (0: one each)
    cfg_parallel: bool = False  # the batch's two halves on two rank groups, each patch-parallel over N/2
    threads: int = 1
    projected: bool = False  # time one rank alone (collectives return at once): compute only
    transport: bool = True  # False: all ranks run together, collectives return at once (no bytes move)
    bind_cores: bool = True  # each rank on its own cores when they fit (distrifx.launch.rank_cores)
    device: str = "cpu"  # "cuda": eager and projected cases only, on one GPU
    dtype: str = "float32"  # a key of DTYPES
    backend: str = "eager"  # one of BACKENDS: runs the rank graphs, and compiles the baseline alike
    patch_of: int = 1  # eager and copies: the unmodified model on one of this many row patches of the latent

    def __post_init__(self) -> None:
        if self.device == "cuda" and not (self.mode == "eager" or self.projected):
            raise ConfigError(
                f"bench case {self.label!r}: on a GPU distrifx bench runs the eager baseline and one rank alone "
                "(--project) only; drop --world-sizes, or run real GPU ranks under torchrun "
                "(examples/generate_torchrun.py)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"bench case {self.label!r}: dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"bench case {self.label!r}: backend {self.backend!r} is not one of {BACKENDS}")
        if self.cfg_parallel and (self.mode in ("eager", "copies") or self.projected or self.world_size % 2
                                  or self.batch % 2):
            raise ConfigError(f"bench case {self.label!r}: a CFG split puts the two halves of an even batch on "
                              "two groups of real ranks: it needs an even --batch and world size, and runs "
                              "neither alone (--project) nor for the unmodified model")
        if self.steps <= self.first_steady_step:
            raise ConfigError(f"bench case {self.label!r}: {self.steps} steps leave none to time after the first "
                              f"{self.first_steady_step} (the first call, stale mode's warm-up, a compiled "
                              f"backend's compiling call); pass --steps {self.first_steady_step + 1} or more")
        if self.patch_of != 1 and (self.mode not in ("eager", "copies") or self.patch_of < 1
                                   or self.height % self.patch_of):
            raise ConfigError(f"bench case {self.label!r}: patch_of={self.patch_of} runs the unmodified model "
                              f"(eager or copies) on one of that many equal row patches; it must divide the "
                              f"latent's {self.height} rows")
        if self.mode == "copies" and (self.projected or self.world_size < 2):
            raise ConfigError(f"bench case {self.label!r}: copies run the unmodified model on every one of "
                              "world_size >= 2 real ranks at once; they cannot be timed alone or on one rank")

    @property
    def label(self) -> str:
        kind = " (one rank timed alone)" if self.projected else "" if self.transport else " (no transport)"
        gn = f" GN {self.gn_variant}" if self.mode == "stale" and self.gn_variant != "corrected" else ""
        narrow = f" {self.stale_dtype} exchanges" if self.mode == "stale" and self.stale_dtype else ""
        ahead = f" extrapolated {self.extrapolate:g}" if self.mode == "stale" and self.extrapolate else ""
        fresh = f" fresh {'+'.join(self.fresh)}" if self.mode == "stale" and self.fresh else ""
        packed = f" buckets {self.bucket_mb:g} MiB" if self.mode == "stale" and self.bucket_mb else ""
        cfg = " CFG split" if self.cfg_parallel else ""
        backend = f" [{self.backend}]" if self.backend != "eager" else ""
        patch = f" on a {self.rows}x{self.width} patch" if self.patch_of != 1 else ""
        return (f"{self.model} {self.height}x{self.width} b{self.batch} N={self.world_size} "
                f"{self.mode}{gn}{narrow}{ahead}{fresh}{packed}{cfg}{backend}{patch}{kind}")

    @property
    def rows(self) -> int:
        """Latent rows the model runs on: all of them, or one patch's (``patch_of``)."""
        return self.height // max(1, self.patch_of)

    @property
    def first_steady_step(self) -> int:
        """The first step timed: after the first call (stale: after warm-up); a compiled backend
        compiles each phase's graph on its first call, so that call is skipped too."""
        if self.mode != "stale":
            return 1
        return max(1, self.warmup_steps) + (self.backend != "eager")


@dataclass(frozen=True)
class Link:
    """An interconnect for projections: what one rank sends per second, and each collective's latency."""

    gbps: float  # GB/s (1e9 bytes per second) one rank can send
    latency_us: float = 15.0

    def seconds(self, nbytes: int, collectives: int) -> float:
        """Time on the link for ``collectives`` exchanges sending ``nbytes`` in all."""
        return collectives * self.latency_us * 1e-6 + nbytes / (self.gbps * 1e9)

    @property
    def label(self) -> str:
        return f"{self.gbps:g} GB/s, {self.latency_us:g} us"


def projected_step(compute_s: float, exchanges: dict[str, list[int]], link: Link) -> float:
    """A rank's step over ``link``: ``max(compute + blocking comm, all comm)``.

    ``exchanges`` holds ``[count, bytes]`` of the step's ``blocking`` exchanges (waited for before
    compute can go on: sync mode, warm-up, synchronous GroupNorm, the output gather) and of its
    ``overlapped`` ones (stale: needed only at the next step). Blocking ones stall the rank; the
    overlapped ones hide behind compute as long as the link keeps up with all of them.
    """
    blocking = link.seconds(exchanges["blocking"][1], exchanges["blocking"][0])
    overlapped = link.seconds(exchanges["overlapped"][1], exchanges["overlapped"][0])
    return max(compute_s + blocking, blocking + overlapped)


def _exchanges(program: Any, phase: str) -> dict[str, list[int]]:
    """``[count, bytes]`` of a graph's blocking and overlapped exchanges, from its plan; counted in
    collectives, so a bucket of stale exchanges (``bucket_mb``) counts once."""
    from distrifx.inspect import graph_collectives
    from distrifx.passes.builder import Form

    out = {"blocking": [0, 0], "overlapped": [0, 0]}
    for site in program.sites(phase):
        if site.form is not Form.NONE:
            entry = out["blocking" if site.form is Form.SYNC else "overlapped"]
            entry[0] += 1
            entry[1] += site.bytes_sent
    out["overlapped"][0] = graph_collectives(program.graphs[phase]) - out["blocking"][0]
    return out


def _inputs(unet: torch.nn.Module, case: BenchCase) -> tuple[tuple, dict]:
    from distrifx.models import unet_inputs

    args, kwargs = unet_inputs(unet, case.batch, case.rows, case.width, tokens=77)
    dtype = DTYPES[case.dtype]
    return tree_map(lambda x: x.to(case.device, dtype if x.is_floating_point() else x.dtype)
                    if isinstance(x, torch.Tensor) else x, (args, kwargs))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: str) -> None:
    """Start :func:`peak_memory` from now (on a CPU where Linux lets a process reset its ``VmHWM``)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak stays the process's lifetime one


def peak_memory(device: str) -> int:
    """Peak GPU memory allocated on ``cuda``, else this process's peak resident memory, in bytes;
    since the last :func:`reset_peak_memory` where it could reset."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_case(case: BenchCase) -> tuple[torch.nn.Module, Any, torch.Tensor, dict, torch.Tensor]:
    """``case``'s model on its device and its inputs: ``(model, parallel model or None, sample, kwargs,
    timesteps)``. One rank alone (``projected``) or without transport times a :class:`TimingCommunicator`."""
    import torch.distributed as dist

    import distrifx
    from distrifx.backends.torch_compile import compile_module
    from distrifx.models import random_unet
    from distrifx.runtime.comm import TimingCommunicator

    with torch.device(case.device):  # build on the device: a full-size model initializes there in seconds
        unet = random_unet(case.model)
    if DTYPES[case.dtype] is not torch.float32:
        unet = unet.to(DTYPES[case.dtype])
    (sample, _), kwargs = _inputs(unet, case)
    timesteps = torch.linspace(999, 1, case.steps).round().long()
    group = None
    if case.projected:
        group = TimingCommunicator(min(1, case.world_size - 1), case.world_size, 60.0)
    elif not case.transport:
        group = TimingCommunicator(dist.get_rank(), case.world_size, 60.0)
    if case.mode in ("eager", "copies"):
        model = unet if case.backend == "eager" else compile_module(unet, case.backend)
        return model, None, sample, kwargs, timesteps
    pmodel = distrifx.parallelize(unet, case.world_size, mode=case.mode, warmup_steps=case.warmup_steps,
                                  gn_variant=case.gn_variant, stale_dtype=case.stale_dtype,
                                  extrapolate=case.extrapolate, fresh=case.fresh, bucket_mb=case.bucket_mb,
                                  cfg_parallel=case.cfg_parallel,
                                  backend=case.backend, process_group=group)
    return pmodel, pmodel, sample, kwargs, timesteps


def bench_rank(case: BenchCase) -> dict[str, Any]:
    """Run ``case`` on this rank (inside ``distrifx.launch``, or alone if projected); return its measurements."""
    import torch.distributed as dist

    model, pmodel, sample, kwargs, timesteps = build_case(case)
    reset_peak_memory(case.device)  # not the build's: a model cast to another dtype was built in float32
    steps = []
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            if not case.projected:
                dist.barrier()  # align ranks so a slow start on one rank is not counted as waiting
            _sync(case.device)
            start, cpu, own_cpu = time.perf_counter(), time.process_time(), time.thread_time()
            model(sample * (1 - 0.01 * i), t, **kwargs)
            _sync(case.device)
            wall = time.perf_counter() - start
            stats = pmodel.last_stats if pmodel is not None else None
            steps.append({
                "wall_s": wall,
                # CPU time of this process's other threads (gloo's transport, for one)
                "background_cpu_s": (time.process_time() - cpu) - (time.thread_time() - own_cpu),
                "wait_s": stats.wait_s if stats else 0.0,
                "bytes_sent": stats.bytes_sent if stats else 0,
                "phase": pmodel.last_phase if pmodel is not None else "eager",
            })
    state_bytes = pmodel.generation.state_bytes if pmodel is not None else 0
    program = pmodel.program(sample, timesteps[0], **kwargs) if pmodel is not None else None
    return {
        "rank": 0 if case.projected else dist.get_rank(),
        "steps": steps,
        "state_bytes": state_bytes,
        "exchanges": {phase: _exchanges(program, phase) for phase in program.graphs} if program else {},
        "build_s": pmodel.build_seconds if pmodel is not None else 0.0,
        "peak_bytes": peak_memory(case.device),
        "cores": sorted(os.sched_getaffinity(0)),
    }


def _summarize(case: BenchCase, rounds: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Median over the steady steps of every round (after the first call and, in stale mode, after
    warm-up), and over the warm-up steps after the first call; ``rounds`` holds each round's per-rank
    measurements."""
    first_steady = case.first_steady_step
    per_rank = []
    for rank_rounds in zip(*rounds):
        steady = [s for r in rank_rounds for s in r["steps"][first_steady:]]
        warmup = [s["wall_s"] for r in rank_rounds for s in r["steps"][1:first_steady]
                  if s["phase"] == Phase.WARMUP]
        walls = [s["wall_s"] for s in steady]
        wall, wait = statistics.median(walls), statistics.median(s["wait_s"] for s in steady)
        quartiles = statistics.quantiles(walls, n=4)[::2] if len(walls) > 1 else [wall, wall]
        per_rank.append({"wall_s": wall, "wall_range_s": [min(walls), max(walls)], "wall_quartiles_s": quartiles,
                         "wait_s": wait,
                         "background_cpu_s": statistics.median(s["background_cpu_s"] for s in steady),
                         "compute_s": wall - wait, "bytes_sent": steady[-1]["bytes_sent"],
                         "warmup_wall_s": statistics.median(warmup) if warmup else None,
                         "cores": rank_rounds[0]["cores"],
                         "exchanges": rank_rounds[0]["exchanges"].get(steady[-1]["phase"])})
    slowest = max(per_rank, key=lambda r: r["wall_s"])
    every = [r for ranks in rounds for r in ranks]
    return {
        "case": asdict(case),
        "label": case.label,
        "rounds": len(rounds),
        "step_s": slowest["wall_s"],
        "step_range_s": slowest["wall_range_s"],  # fastest and slowest steady step
        "step_quartiles_s": slowest["wall_quartiles_s"],  # the middle half of the steady steps: the run's noise
        # stale mode's synchronous warm-up steps (after the first call), slowest rank; None without any
        "warmup_step_s": max((r["warmup_wall_s"] for r in per_rank if r["warmup_wall_s"] is not None), default=None),
        "compute_s": slowest["compute_s"],
        "exposed_comm_s": slowest["wait_s"],
        "exposed_comm_frac": slowest["wait_s"] / slowest["wall_s"],
        "background_cpu_s": slowest["background_cpu_s"],
        "bytes_sent_per_step": max(r["bytes_sent"] for r in per_rank),
        "exchanges": slowest["exchanges"],  # [count, bytes] blocking and overlapped, from the plan
        "state_bytes": max(r["state_bytes"] for r in every),
        "peak_bytes": max(r["peak_bytes"] for r in every),
        "peak_after_build": True,  # the peak is the steps' (older results' included building the model)
        "build_s": max(r["build_s"] for r in every),
        "per_rank": per_rank,
    }


def measure_case(case: BenchCase) -> list[dict[str, Any]]:
    """Run one configuration once in ``case.world_size`` fresh processes: every rank's measurements."""
    from distrifx.launch import launch

    processes = 1 if case.projected else case.world_size
    return launch(bench_rank, processes, case, backend="gloo", threads_per_rank=case.threads,
                  bind_cores=case.bind_cores, timeout_s=3600, all_ranks=True)


def _projection(result: dict[str, Any], link: Link) -> dict[str, Any]:
    """A one-rank-alone result as a projected N-rank result over ``link`` (its step timed alone is the compute)."""
    exchanges = result["exchanges"]
    step = projected_step(result["step_s"], exchanges, link)
    return {
        **result,
        "label": result["label"].replace("(one rank timed alone)", f"(projected over {link.label})"),
        "link": asdict(link),
        "step_s": step,
        "step_range_s": [projected_step(s, exchanges, link) for s in result["step_range_s"]],
        "compute_s": result["step_s"],
        "exposed_comm_s": step - result["step_s"],
        "exposed_comm_frac": 1 - result["step_s"] / step,
    }


def run_cases(cases: list[BenchCase], rounds: int = 1, progress: bool = True,
              links: tuple[Link, ...] = ()) -> list[dict[str, Any]]:
    """Run every case (eager baselines included) ``rounds`` times, a round through all cases at a time
    so that a slow spell of the machine falls on every configuration alike; summarize each over its
    rounds, project every one-rank-alone case over each of ``links``, and add the speedup over the
    matching baseline."""
    from tqdm import tqdm

    measured: list[list[list[dict[str, Any]]]] = [[] for _ in cases]
    with tqdm(total=rounds * len(cases), desc="distrifx bench", disable=not progress) as bar:
        for _ in range(rounds):
            for runs, case in zip(measured, cases):
                runs.append(measure_case(case))
                bar.update()
    results = [_summarize(case, runs) for case, runs in zip(cases, measured)]
    results += [_projection(r, link) for link in links for r in results if r["case"]["projected"]]
    baselines = {baseline_key(r["case"]): r["step_s"] for r in results if r["case"]["mode"] == "eager"}
    for r in results:
        key = baseline_key(r["case"])
        r["speedup"] = _speedup(r["case"], baselines[key], r["step_s"]) if key in baselines else None
    return results


def _speedup(case: dict[str, Any], baseline_s: float, step_s: float) -> float:
    """Over one rank: the baseline's step time over this one's. N copies do N steps in one step time, so
    theirs is N times that: the speedup a perfect split of the work with free communication would reach
    on this machine, whose ranks slow each other down as the copies do."""
    copies = case["world_size"] if case["mode"] == "copies" else 1
    return copies * baseline_s / step_s


def baseline_key(case: dict[str, Any]) -> tuple:
    """What a configuration is compared with: the unmodified model on the same input (the whole latent or
    the same patch of it), run by the same backend."""
    return (case["model"], case["height"], case["width"], case["batch"], case.get("backend", "eager"),
            case.get("patch_of", 1))


def machine_description() -> str:
    """CPU model and cores, GPU if any, torch and python versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}, nccl" if torch.cuda.is_available()
           else "no GPU, gloo over loopback")
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, python {platform.python_version()}"


def write_json(out_dir: Path, command: str, results: Any) -> None:
    """``results.json``: the results with the machine, date and command that produced them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine_description(), "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
              "command": command, "results": results}
    (out_dir / "results.json").write_text(json.dumps(record, indent=2))


def read_results(out_dir: Path) -> dict[str, Any]:
    """What :func:`write_json` wrote to ``out_dir``."""
    return json.loads((out_dir / "results.json").read_text())


def markdown_table(results: list[dict[str, Any]]) -> str:
    head = ("| config | step (s): median [min, max] | speedup | compute (s) | exposed comm (s) | exposed % "
            "| sent/step (MiB) | stale buffers (MiB) | peak memory/rank (GiB) |\n|---|---|---|---|---|---|---|---|---|")
    rows = [
        f"| {r['label']} | {r['step_s']:.3f} [{r['step_range_s'][0]:.3f}, {r['step_range_s'][1]:.3f}] | "
        f"{r['speedup']:.2f}x | {r['compute_s']:.3f} | "
        f"{r['exposed_comm_s']:.4f} | {100 * r['exposed_comm_frac']:.1f}% | {r['bytes_sent_per_step'] / 2**20:.2f} | "
        f"{r['state_bytes'] / 2**20:.2f} | {r['peak_bytes'] / 2**30:.2f} |"
        if r["speedup"] is not None else f"| {r['label']} | {r['step_s']:.3f} | - | | | | | | |"
        for r in results
    ]
    return "\n".join([head, *rows])


def write_results(results: list[dict[str, Any]], out_dir: Path, command: str) -> None:
    """JSON, a markdown table and the plots of a bench run."""
    write_json(out_dir, command, results)
    plots = plot_results(results, out_dir)
    images = "\n".join(f"![{p.stem}]({p.name})" for p in plots)
    (out_dir / "results.md").write_text(
        f"Machine: {machine_description()}\n\nCommand: `{command}`\n\n{markdown_table(results)}\n\n{images}\n"
    )


CEILING = "this machine's ceiling (N copies of the model at once)"  # the speedup plot's series of copies


def plot_results(results: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Speedup against world size (with the ideal N x) and a stacked step-time breakdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        c = r["case"]
        if c["mode"] != "eager" and r["speedup"] is not None and c.get("patch_of", 1) == 1:
            key = CEILING if c["mode"] == "copies" else r["label"].replace(f" N={c['world_size']}", "")
            series.setdefault(key, []).append((c["world_size"], r["speedup"]))
    sizes = sorted({n for points in series.values() for n, _ in points} | {1})
    paths = [out_dir / "speedup.png", out_dir / "breakdown.png"]
    with figure(paths[0], dpi=130, figsize=(5, 3.6)) as ax:
        ax.plot(sizes, sizes, "k--", label="ideal N x")
        for key, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], "k^:" if key == CEILING else "o-", label=key)
        ax.set_xlabel("ranks (N)")
        ax.set_ylabel("speedup over one rank")
        ax.set_xticks(sizes)
        ax.legend(fontsize=6)

    with figure(paths[1], dpi=130, figsize=(max(5, 1.1 * len(results)), 4.2)) as ax:
        labels = [textwrap.fill(r["label"], 18) for r in results]
        compute = [r["compute_s"] for r in results]
        exposed = [r["exposed_comm_s"] for r in results]
        ax.bar(labels, compute, label="compute")
        ax.bar(labels, exposed, bottom=compute, label="exposed communication (blocked in waits)")
        ax.set_ylabel("seconds per step (slowest rank)")
        ax.tick_params(axis="x", labelsize=6)
        ax.legend(fontsize=7)
    return paths


# SD's VAE architecture: what the decoder-memory benchmark decodes with (random weights).
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
)


def _status_bytes(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` (Linux) in bytes, or None where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(f"{field}:")), None)


def rss_bytes() -> int:
    """This process's resident memory now (``VmRSS``), in bytes."""
    rss = _status_bytes("VmRSS")
    if rss is None:
        raise RuntimeError("no VmRSS in /proc/self/status: resident memory is measured on Linux only")
    return rss


def vae_memory_rank(latent: int) -> dict[str, float]:
    """Decode one (1, 4, latent, latent) latent on this rank; peak memory and the part decoding added."""
    import torch.distributed as dist
    from diffusers import AutoencoderKL

    import distrifx

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE).eval()
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    world = dist.get_world_size()
    decode = distrifx.parallelize_vae_decoder(vae, world) if world > 1 else vae.decode
    if world > 1:
        decode.program(z)  # capture and build first: their memory is not the decoder's activations
    before = rss_bytes()
    reset_peak_memory("cpu")
    start = time.perf_counter()
    with torch.no_grad():
        image = decode(z).sample
    seconds = time.perf_counter() - start
    peak = peak_memory("cpu")
    return {"seconds": seconds, "pixels": image.shape[-1], "peak_bytes": peak, "decode_bytes": peak - before}


def run_vae_memory(latent: int, world_sizes: list[int]) -> list[dict[str, Any]]:
    """Peak and decoding memory of the worst rank, per world size (each in fresh processes)."""
    from distrifx.launch import launch

    rows = []
    for n in world_sizes:
        ranks = launch(vae_memory_rank, n, latent, threads_per_rank=1, timeout_s=3600, all_ranks=True)
        worst = max(ranks, key=lambda r: r["decode_bytes"])
        rows.append({"world_size": n, "latent": latent, **worst, "seconds": max(r["seconds"] for r in ranks)})
    return rows


def vae_memory_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| ranks | image | peak RSS / rank (GiB) | added by decoding / rank (GiB) |", "|---|---|---|---|"]
    lines += [f"| {r['world_size']} | {r['pixels']}x{r['pixels']} | {r['peak_bytes'] / 2**30:.2f} | "
              f"{r['decode_bytes'] / 2**30:.2f} |" for r in rows]
    return "\n".join(lines)
