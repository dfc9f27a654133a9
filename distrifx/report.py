"""``distrifx report``: run the benchmark suite and write ``benchmarks.md`` from its results.

Each section is one ``distrifx`` command whose ``results.json`` (with the machine, date and
command) lands in ``<out>/bench/<section>/``; the page is rendered from those files only, so
``--reuse`` re-renders it without rerunning anything. The prose states what the numbers show
and whether each target is met; it is computed from the results, never written by hand.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from distrifx.bench import baseline_key, markdown_table, read_results, vae_memory_table
from distrifx.breakdown import breakdown_findings, breakdown_table
from distrifx.errors import ConfigError
from distrifx.fidelity import (FIDELITY_TARGET_DB, FidelityCase, fidelity_table, paired_gaps, psnr_summary,
                               standard_error, warmup_sweep)

__all__ = ["SUITES", "run_suite", "render", "report"]

SPEEDUP_TARGET = 1.9  # 2-rank stale, half-width SD 1.5, 64x64 latent, this CPU
# Generation lengths the fidelity sections measure -> the warm-ups they sweep (fidelity-warmup, fidelity-50).
WARMUP_CURVES = {20: (4, 5, 6, 8), 50: (4, 8, 12)}
PUBLISHED_GAP = "24.6 dB against naive 14.0 dB at N=2 (+10.6 dB) and 23.0 against 10.7 dB at N=4 (+12.3 dB)"

# DistriFusion's SDXL speedups on 2 / 4 / 8 A100s, by latent size (1024 and 3840 pixels).
PUBLISHED_SPEEDUPS = {128: {2: 1.5, 4: 2.2, 8: 2.8}, 480: {2: 1.8, 4: 3.4, 8: 6.1}}


def _gpu_argv(latent: int) -> tuple[str, ...]:
    """The GPU projection command at one latent size: CFG batch of 2, fp16, one rank alone at N = 2, 4, 8."""
    return ("bench", "--model", "sdxl-full", "--latent", str(latent), "--batch", "2", "--world-sizes", "--modes",
            "stale", "--steps", "8", "--warmup-steps", "2", "--project", "2", "4", "8", "--device", "cuda",
            "--dtype", "float16", "--link-gbps", "250", "25")


# The fidelity sections' seeds: one seed's gap over naive ranges over about 25 dB (standard deviation
# about 6 dB), so the mean of eight would be uncertain by about 2 dB (its standard error); thirty-two halve that.
SEEDS = tuple(str(seed) for seed in range(32))

# The speedup target's configuration: 2-rank stale beside one rank alone, without transport and N copies.
_TARGET = ("bench", "--model", "sd15-half", "--latent", "64", "--world-sizes", "2", "--modes", "stale",
           "--stale-dtypes", "none", "bfloat16", "--steps", "12", "--rounds", "6", "--threads", "1", "--project", "2",
           "--no-transport", "--ceiling")


def _fraction_argv(steps: int) -> tuple[str, ...]:
    """The fidelity command for warm-ups by share of the timesteps (0.25, 0.3) against 4 steps, in ``steps`` steps."""
    return ("fidelity", "--world-sizes", "2", "4", "--warmups", "4", "--warmup-fractions", "0.25", "0.3",
            "--gn-variants", "corrected", "--seeds", *SEEDS, "--size", "32", "--steps", str(steps), "--jobs", "2")


# section -> the distrifx command that produces it (``--out`` is appended).
SUITES: dict[str, dict[str, tuple[str, ...]]] = {
    "docs": {
        # The speedup target's configurations, in interleaved rounds: this machine's speed drifts.
        # With bfloat16 stale exchanges too: half the bytes gloo moves on the cores the ranks compute on.
        "sd15-half-64-target": _TARGET,
        # The same on a second machine: the 2-core machines CI draws differ, and the page judges the target
        # on each machine it was measured on.
        "sd15-half-64-target-2": _TARGET,
        # --ceiling's runs on a rank's patch beside the whole latent's: how much two busy ranks slow each
        # other at a rank's working-set size, and the bound that leaves one rank timed alone.
        "sd15-half-64-patch-ceiling": ("bench", "--model", "sd15-half", "--latent", "64", "--world-sizes", "2",
                                       "--modes", "stale", "--steps", "12", "--rounds", "2", "--threads", "1",
                                       "--project", "2", "--ceiling"),
        # Stale exchanges coalesced into buckets of a few MiB (bucket_mb) against one collective each: ten
        # interleaved rounds, since the difference is of the order of this machine's drift.
        "sd15-half-64-buckets": ("bench", "--model", "sd15-half", "--latent", "64", "--world-sizes", "2", "--modes",
                                 "stale", "--bucket-mbs", "0", "2", "8", "--steps", "12", "--rounds", "10",
                                 "--threads", "1"),
        # The same UNet as a guidance pipeline calls it, conditional and unconditional halves in one batch of 2:
        # the whole batch patch-parallel (each weight a rank reads serves twice the rows), and split over two
        # rank groups as cfg_parallel="auto" does (at N=2 each rank runs one half's whole latent).
        "sd15-half-64-guidance": ("bench", "--model", "sd15-half", "--latent", "64", "--batch", "2", "--world-sizes",
                                  "2", "--modes", "stale", "--steps", "12", "--rounds", "3", "--threads", "1",
                                  "--project", "2", "--cfg-parallel", "--ceiling"),
        # What a synchronous warm-up step costs against a stale one, same ranks and rounds: the price of
        # the fidelity that section fidelity-warmup measures for more warm-up steps.
        "sd15-half-64-warmup": ("bench", "--model", "sd15-half", "--latent", "64", "--world-sizes", "2", "--modes",
                                "stale", "--steps", "12", "--warmup-steps", "6", "--rounds", "3", "--threads", "1"),
        # What extrapolated stale values cost a rank: one elementwise op per exchange, twice the stale buffers.
        "sd15-half-64-extrapolate": ("bench", "--model", "sd15-half", "--latent", "64", "--world-sizes", "2",
                                     "--modes", "stale", "--extrapolations", "0", "0.5", "--steps", "12", "--rounds",
                                     "3", "--threads", "1"),
        # The same configuration compiled (model and ranks by inductor) beside eager, in the same rounds.
        "sd15-half-64-inductor": ("bench", "--model", "sd15-half", "--latent", "64", "--world-sizes", "2", "--modes",
                                  "stale", "--steps", "10", "--rounds", "3", "--threads", "1", "--project", "2",
                                  "--backend", "eager", "inductor"),
        # What waiting for halo rows (and GroupNorm statistics) costs a rank on this machine.
        "sd15-half-64-fresh": ("bench", "--model", "sd15-half", "--latent", "64", "--world-sizes", "2", "--modes",
                               "stale", "--gn-variants", "corrected", "sync", "--fresh-sets", "none", "halo",
                               "--steps", "12", "--rounds", "2", "--threads", "1"),
        # What the most faithful stale configurations cost: GN sync, with halo rows fresh and K/V extrapolated.
        "sd15-half-64-fresh-extrapolate": ("bench", "--model", "sd15-half", "--latent", "64", "--world-sizes", "2",
                                           "--modes", "stale", "--gn-variants", "sync", "--fresh-sets", "none", "halo",
                                           "--extrapolations", "0", "0.5", "--steps", "12", "--rounds", "2",
                                           "--threads", "1"),
        "sd15-half-64": ("bench", "--model", "sd15-half", "--latent", "64", "--world-sizes", "2", "4", "--modes", "sync",
                         "stale", "naive", "--gn-variants", "corrected", "sync", "--steps", "12", "--threads", "1",
                         "--project", "2", "4", "8", "--no-transport"),
        "sd15-half-128": ("bench", "--model", "sd15-half", "--latent", "128", "--world-sizes", "2", "--modes", "sync",
                          "stale", "naive", "--steps", "6", "--warmup-steps", "3", "--threads", "1"),
        # A rank whose step is bound by per-op dispatch (full SDXL's op graph, narrow), as full SDXL's eager
        # ranks are on a GPU at 1024 px: what the ops a rank adds cost where each op's fixed cost dominates,
        # eager and compiled (model and rank alike) in the same rounds.
        "sdxl-narrow-16": ("bench", "--model", "sdxl-narrow", "--latent", "16", "--batch", "2", "--world-sizes",
                           "--modes", "stale", "--steps", "40", "--rounds", "4", "--threads", "1", "--project", "2",
                           "--backend", "eager", "inductor"),
        # The same with the stale exchanges in buckets: fewer collectives, so fewer and longer compiled segments.
        "sdxl-narrow-16-buckets": ("bench", "--model", "sdxl-narrow", "--latent", "16", "--batch", "2",
                                   "--world-sizes", "--modes", "stale", "--bucket-mbs", "0", "8", "--steps", "40",
                                   "--rounds", "2", "--threads", "1", "--project", "2", "--backend", "eager",
                                   "inductor"),
        # Where the one-rank-alone bound of the target's configuration loses against 2x, op by op.
        "profile-sd15-half-64": ("profile", "--model", "sd15-half", "--latent", "64", "--world-size", "2", "--steps",
                                 "4"),
        "fidelity": ("fidelity", "--world-sizes", "2", "4", "--warmups", "1", "2", "4", "--stale-dtypes", "none",
                     "bfloat16", "--seeds", *SEEDS, "--size", "32", "--steps", "20"),
        # More synchronous warm-up steps: what each buys the fully asynchronous default in fidelity.
        "fidelity-warmup": ("fidelity", "--world-sizes", "2", "4", "--warmups", *map(str, WARMUP_CURVES[20]),
                            "--gn-variants", "corrected", "--seeds", *SEEDS, "--size", "32", "--steps", "20",
                            "--jobs", "2"),
        # DistriFusion's published fidelity is for 50 DDIM steps: closer steps, fresher stale activations.
        # Warm-ups 4, 8 and 12 of 50: whether a longer generation needs more synchronous steps, or a like share.
        "fidelity-50": ("fidelity", "--world-sizes", "2", "4", "--warmups", *map(str, WARMUP_CURVES[50]),
                        "--gn-variants", "corrected", "sync", "--seeds", *SEEDS, "--size", "32", "--steps", "50",
                        "--jobs", "2"),
        # Warm-ups by share of the timesteps' range (warmup_fraction): the same share of a 20- and a 50-step
        # generation, against the default's 4 steps of each.
        "fidelity-fraction-20": _fraction_argv(20),
        "fidelity-fraction-50": _fraction_argv(50),
        # Twice the trained size: patches of 32 and 16 rows, nearer DistriFusion's 1024-pixel SDXL patches
        # (a 128-row latent) than the 16 and 8 rows at 32x32; longer warm-ups, as at 32x32.
        "fidelity-64": ("fidelity", "--world-sizes", "2", "4", "--warmups", "4", "6", "8", "--gn-variants", "corrected",
                        "sync", "--seeds", *SEEDS, "--size", "64", "--steps", "20", "--jobs", "2"),
        # Stale halo rows and keys/values extrapolated from the last two steps, against the default's last step.
        "fidelity-extrapolate": ("fidelity", "--world-sizes", "2", "4", "--warmups", "4", "--gn-variants", "corrected",
                                 "--extrapolations", "0.25", "0.5", "--seeds", *SEEDS, "--size", "32",
                                 "--steps", "20"),
        # The same extrapolation with GroupNorm's statistics exchanged synchronously: the two together.
        "fidelity-extrapolate-gn-sync": ("fidelity", "--world-sizes", "2", "4", "--warmups", "4", "--gn-variants",
                                         "sync", "--extrapolations", "0.25", "0.5", "--seeds", *SEEDS, "--size",
                                         "32", "--steps", "20"),
        # Halo rows exchanged synchronously (small), with stale or synchronous GroupNorm statistics: what stays
        # stale is keys/values only, or also the statistics.
        "fidelity-fresh": ("fidelity", "--world-sizes", "2", "4", "--warmups", "4", "--gn-variants", "corrected",
                           "sync", "--fresh-sets", "halo", "--seeds", *SEEDS, "--size", "32", "--steps", "20"),
        # The two that gained most together: halo rows and GroupNorm statistics synchronous, the keys/values
        # that stay stale extrapolated.
        "fidelity-fresh-extrapolate": ("fidelity", "--world-sizes", "2", "4", "--warmups", "4", "--gn-variants",
                                       "sync", "--extrapolations", "0", "0.5", "--fresh-sets", "halo", "--seeds",
                                       *SEEDS, "--size", "32", "--steps", "20"),
        "vae-memory": ("bench", "--component", "vae", "--latent", "64", "--world-sizes", "2", "4"),
        # Full SDXL on one GPU at DistriFusion's resolutions, projected to 2, 4 and 8 GPUs over an
        # NVLink-class and a PCIe-class link; one section per resolution (each a few minutes).
        **{f"gpu-sdxl-{pixels}": _gpu_argv(latent) for pixels, latent in ((1024, 128), (2048, 256), (3840, 480))},
        # 1024 px again with the model and the ranks compiled alike: the eager rank graph is bound by Python
        # dispatch there. With stale exchanges in buckets too: fewer collectives, so fewer, longer segments.
        # Not run yet; compiling every segment of full SDXL may take several minutes.
        "gpu-sdxl-1024-inductor": (*_gpu_argv(128), "--backend", "inductor", "--bucket-mbs", "0", "8"),
    },
    # A minute on two cores: every section's code path, for the tests.
    "tiny": {
        "sd15-16": ("bench", "--model", "sd15", "--latent", "16", "--world-sizes", "2", "--modes", "stale",
                    "--stale-dtypes", "none", "bfloat16", "--steps", "3", "--warmup-steps", "1", "--project", "2",
                    "--link-gbps", "1", "--no-transport", "--ceiling"),
        "fidelity": ("fidelity", "--world-sizes", "2", "--warmups", "1", "--gn-variants", "corrected", "--stale-dtypes",
                     "none", "bfloat16", "--extrapolations", "0", "0.5", "--fresh-sets", "none", "halo", "--seeds", "0",
                     "--size", "32", "--steps", "3"),
        "vae-memory": ("bench", "--component", "vae", "--latent", "8", "--world-sizes", "2"),
        "profile": ("profile", "--model", "sd15", "--latent", "16", "--world-size", "2", "--warmup-steps", "1",
                    "--steps", "1"),
    },
}


def _command(argv: Sequence[str], out: Path) -> list[str]:
    return [*argv, "--out", str(out)]


def run_suite(out: Path, suite: str = "docs", sections: Sequence[str] | None = None, reuse: bool = False) -> None:
    """Run the suite's commands (or only ``sections``); with ``reuse``, skip those already measured."""
    from distrifx.cli import main

    unknown = sorted(set(sections or ()) - set(SUITES[suite]))
    if unknown:
        raise ConfigError(f"distrifx report: no section {unknown} in suite {suite!r}; its sections are "
                          f"{list(SUITES[suite])}")
    for key, argv in SUITES[suite].items():
        target = out / "bench" / key
        if (sections and key not in sections) or (reuse and (target / "results.json").exists()):
            continue
        if _needs_gpu(argv) and not torch.cuda.is_available():
            print(f"distrifx report: skipped section {key}: it needs a GPU and torch sees none")
            continue
        main(_command(argv, target))


def _needs_gpu(argv: Sequence[str]) -> bool:
    return "--device" in argv and argv[argv.index("--device") + 1] == "cuda"


def _verdict(met: bool) -> str:
    return "**met**" if met else "**not met**"


def _plain(result: dict[str, Any], mode: str, world: int, projected: bool = False, transport: bool = True,
           but: tuple[str, ...] = ()) -> bool:
    """Whether ``result`` is ``mode`` at ``world`` ranks with stale mode's defaults (corrected GroupNorm,
    exchanges in the activations' dtype, not extrapolated, none kept synchronous, one collective each,
    the whole batch patch-parallel), the options named in ``but`` aside."""
    c = result["case"]
    return (c["mode"] == mode and c["world_size"] == world and c["projected"] == projected
            and c["transport"] == transport and c["gn_variant"] == "corrected" and c.get("patch_of", 1) == 1
            and not any(c.get(option) for option in (*_BENCH_OPTIONS, "cfg_parallel") if option not in but))


def _find(results: list[dict[str, Any]], mode: str, world: int, projected: bool = False,
          transport: bool = True) -> dict[str, Any] | None:
    """The result of ``mode`` at ``world`` ranks with stale mode's defaults (:func:`_plain`)."""
    return next((r for r in results if _plain(r, mode, world, projected, transport)), None)


def _packed(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """2-rank stale runs of the defaults but for buckets (``bucket_mb``): the default's values, sent packed."""
    return [r for r in results if r["case"].get("bucket_mb") and _plain(r, "stale", 2, but=("bucket_mb",))]


def _rounds(results: list[dict[str, Any]]) -> int:
    return results[0].get("rounds", 1)  # results written before rounds existed had one


def _model_line(results: list[dict[str, Any]]) -> str:
    from distrifx.models import UNET_CONFIGS

    case = results[0]["case"]
    config = UNET_CONFIGS[case["model"]]
    return (f"UNet `{case['model']}` (`distrifx.models.UNET_CONFIGS`: block_out_channels="
            f"{tuple(config['block_out_channels'])}, cross-attention dim {config['cross_attention_dim']}, "
            f"random weights), batch {case['batch']}, {case['height']}x{case['width']} latent, 77 text tokens, "
            f"{case['steps']} denoising steps; median step after the first call (stale: after its "
            f"{case['warmup_steps']} warm-up steps) over {_rounds(results)} round(s) through all "
            f"configurations, slowest rank; " + _where(case) + _compiled(results))


def _compiled(results: list[dict[str, Any]]) -> str:
    """What the rows of each compiled backend ran, marked ``[backend]`` in their labels."""
    backends = [backend for backend in _by_backend(results) if backend != "eager"]
    on_cpu = all(r["case"].get("device", "cpu") == "cpu" for r in results)
    return "".join(
        f" Rows marked [{backend}] are compiled: their baseline is {_compile_call(backend)}, each "
        f"rank's graphs run with `backend={backend!r}` (compiled segments between collectives); the first call of "
        "each phase compiles and is not timed." for backend in backends) + (
        " Their peak memory includes compiling in the process: the compiler's working memory grows with the "
        "largest graph it compiles at once, and the allocators keep it resident afterwards (a program compiled "
        "offline, `distrifx compile --format aoti`, does not compile where it runs)." if backends and on_cpu else "")


def _compile_call(backend: str) -> str:
    """How ``distrifx.backends.torch_compile.compile_module`` compiles the baseline for ``backend``."""
    from distrifx.backends.torch_compile import cpu_options

    options = cpu_options(backend)
    frozen = f" with inductor config `{options!r}` on the CPU" if options else ""
    return f"`torch.compile(unet, backend={backend!r})`{frozen}"


def _where(case: dict[str, Any]) -> str:
    if case.get("device", "cpu") == "cuda":
        return f"{case['dtype']} on one GPU (peak memory: allocated on the GPU)."
    return (f"{case['threads']} torch thread(s) per rank, "
            + ("each rank bound to its own cores where they fit." if case.get("bind_cores") else
               "ranks scheduled by the OS (not bound to cores)."))


def _pct(value: float, base: float) -> str:
    return f"{round(100 * (value / base - 1)):+d}%"


def _speed_findings(results: list[dict[str, Any]], cpu_count: int) -> list[str]:
    """What a speed table shows, from its numbers."""
    eager = _find(results, "eager", 1)
    out = []
    crowded = sorted({r["case"]["world_size"] * r["case"]["threads"] for r in results if not r["case"]["projected"]
                      and r["case"]["world_size"] * r["case"]["threads"] > cpu_count})
    if crowded:
        out.append(f"Runs with {', '.join(map(str, crowded))} threads in all share this machine's {cpu_count} cores "
                   f"(oversubscribed): their speedups measure the machine, not the method.")
    for mode in ("stale", "sync", "naive"):
        for r in results:
            c = r["case"]
            if c["mode"] == mode and not c["projected"] and c["transport"] and r["speedup"] is not None:
                config = r["label"].split(f" b{c['batch']} ")[-1]
                out.append(f"{config}: {r['speedup']:.2f}x over one rank, "
                           f"{100 * r['exposed_comm_frac']:.1f}% of the step blocked in waits, "
                           f"{r['bytes_sent_per_step'] / 2**20:.1f} MiB sent per rank per step.")
    stale, alone = _find(results, "stale", 2), _find(results, "stale", 2, projected=True)
    together = _find(results, "stale", 2, transport=False)
    if alone and eager:
        out.append(
            f"One stale rank timed alone (collectives return at once) computes its step in {alone['step_s']:.3f} s, "
            f"a {eager['step_s'] / alone['step_s']:.2f}x speedup over the unmodified model: "
            f"{_alone_bound(alone, stale)}.")
    if stale and alone and together:
        sharing = ("the two processes share two cores and their caches and memory bandwidth"
                   if together["step_s"] > alone["step_s"] else "no cost of sharing the cores beyond the noise")
        gloo = ("gloo's send/receive threads run on the same two cores" if stale["compute_s"] > together["step_s"]
                else "no cost of the transport beyond the noise")
        out.append(
            f"Where the rest goes: two stale ranks run together with collectives that return at once take "
            f"{together['step_s']:.3f} s per step ({_pct(together['step_s'], alone['step_s'])} over one rank alone: "
            f"{sharing}); with gloo moving the bytes a rank computes for {stale['compute_s']:.3f} s "
            f"({_pct(stale['compute_s'], together['step_s'])}: {gloo}) and waits {stale['exposed_comm_s']:.3f} s."
            + (f" Measured: the rank's other threads used {stale['background_cpu_s']:.3f} s of CPU per step with gloo, "
               f"{together['background_cpu_s']:.3f} s without transport."
               if "background_cpu_s" in stale and "background_cpu_s" in together else ""))
    out += _stale_option_findings(results, stale, alone)
    out += _cfg_findings(results)
    out += _ceiling_findings(results)
    out += _warmup_findings(results)
    if eager:
        out.append(_noise_finding(results, eager))
    if any(r["case"].get("device") == "cuda" and r["case"]["dtype"] != "float32" and not r.get("peak_after_build")
           for r in results):
        out.append("Peak memory here includes building the model in float32 before casting it (measured before "
                   "distrifx bench reset the peak after the build): each run's own peak is lower, by up to the "
                   "size of the float32 weights.")
    if any(r["speedup"] and r["speedup"] > r["case"]["world_size"] for r in results):
        out.append("Speedups above N x are possible here: self-attention costs grow with the square of the tokens, "
                   "and a naive patch attends only to its own; a patch's activations also fit the caches better "
                   "than the whole latent's.")
    if any(r["case"]["projected"] and r["case"]["world_size"] > 2 for r in results):
        out.append("Rows marked *one rank timed alone* at larger N are compute-only bounds for world sizes this "
                   "machine cannot run: they include no communication and are not measured speedups.")
    if any("link" in r for r in results):
        out.append("Rows marked *projected* are projections, not measurements: one rank's measured step plus the "
                   "communication its compiled plan needs over the stated link, max(compute + blocking exchanges, "
                   "all exchanges) (`distrifx.bench.projected_step`); stale exchanges are assumed to overlap "
                   "compute fully, sync ones not at all, and communication not to slow compute down.")
    return out + _published_comparison(results)


def _noise_finding(results: list[dict[str, Any]], eager: dict[str, Any]) -> str:
    """How much a configuration's steady steps vary within the run: the middle half of them where the
    results hold it, else fastest to slowest (where one preempted step sets the slowest)."""
    if all("step_quartiles_s" in r for r in results):
        spread = max((r["step_quartiles_s"][1] - r["step_quartiles_s"][0]) / r["step_s"] for r in results)
        low, high = eager["step_quartiles_s"]
        return (f"Noise: within one run the middle half of a configuration's steady steps spans up to "
                f"{100 * spread:.0f}% of their median (the single-rank baseline: {low:.3f} to {high:.3f} s); read "
                "speedups to about that precision.")
    spread = max((r["step_range_s"][1] - r["step_range_s"][0]) / r["step_s"] for r in results)
    low, high = eager["step_range_s"]
    return (f"Noise: within one run the steady steps of a configuration spread by up to {100 * spread:.0f}% of "
            f"their median (the single-rank baseline: {low:.3f} to {high:.3f} s), fastest to slowest step, so one "
            "step slowed by the machine sets it: an upper bound on the noise of the medians.")


def _alone_bound(alone: dict[str, Any], stale: dict[str, Any] | None) -> str:
    """What one stale rank timed alone bounds, given the two ranks run together (if they were)."""
    if not stale:
        return "a bound that leaves communication out (no ranks ran together in this section)"
    if alone["step_s"] <= stale["step_s"]:
        return "the bound on this machine without transport and without two ranks sharing the cores"
    return (f"slower than the two ranks together ({stale['step_s']:.3f} s), so in this run the noise exceeds "
            "what the transport and sharing the cores cost")


def _warmup_findings(results: list[dict[str, Any]]) -> list[str]:
    """What synchronous warm-up steps cost a generation: the 2-rank stale run's warm-up and stale step
    medians (same ranks and rounds) combined over each generation the fidelity sections measure, per
    warm-up they sweep."""
    eager, stale = _find(results, "eager", 1), _find(results, "stale", 2)
    if not (eager and stale and stale.get("warmup_step_s")):
        return []
    warm, step = stale["warmup_step_s"], stale["step_s"]
    out = [f"N=2 stale's warm-up steps (synchronous exchanges, also keeping the stale state) took {warm:.3f} s "
           f"against its stale steps' {step:.3f} s ({_pct(warm, step)}; medians of the same ranks and rounds)."]
    for steps, warmups in WARMUP_CURVES.items():
        generation = {w: w * warm + (steps - w) * step for w in warmups}
        costs = ", ".join(f"{w}: {t:.1f} s ({steps * eager['step_s'] / t:.2f}x, {_pct(t, generation[warmups[0]])})"
                          for w, t in generation.items())
        out.append(f"A {steps}-step generation with W warm-up steps, computed from these medians (not timed as a "
                   f"whole): W = {costs}; the unmodified model's takes {steps * eager['step_s']:.1f} s.")
    return out


def _cfg_findings(results: list[dict[str, Any]]) -> list[str]:
    """Each CFG-split run against the whole batch patch-parallel over the same ranks."""
    out = []
    for split in (r for r in results if r["case"].get("cfg_parallel") and r["speedup"]):
        n = split["case"]["world_size"]
        whole = _find(results, "stale", n)
        alone = ("; one rank per half: nothing is stale, the output is the unmodified model's up to rounding"
                 if n == 2 else "")
        line = (f"N={n} CFG split (each half of the batch of {split['case']['batch']} on {n // 2} rank(s), "
                f"patch-parallel over them{alone}): {split['speedup']:.2f}x, "
                f"{split['bytes_sent_per_step'] / 2**20:.1f} MiB sent per rank per step")
        if whole:
            line += (f", against {whole['speedup']:.2f}x and {whole['bytes_sent_per_step'] / 2**20:.1f} MiB with "
                     f"the whole batch patch-parallel over all {n}")
        out.append(line + ".")
    return out


def _ceiling_findings(results: list[dict[str, Any]]) -> list[str]:
    """Per world size run with ``--ceiling``: how much N busy ranks slow each other on this machine, the
    speedup that leaves a perfect split, and how much of it stale mode on the same model reaches; then the
    same slowdown at a rank's patch size, and what one rank timed alone slowed as much would reach."""
    out = []
    for copies in (r for r in results if _plain(r, "copies", r["case"]["world_size"]) and r["speedup"]):
        n = copies["case"]["world_size"]
        same = [r for r in results if baseline_key(r["case"]) == baseline_key(copies["case"])]
        eager, stale = _find(same, "eager", 1), _find(same, "stale", n)
        out.append(
            f"N={n} copies (the unmodified model on each of {n} ranks at once, no collectives): "
            f"{copies['step_s']:.3f} s per step against {eager['step_s']:.3f} s on one rank alone "
            f"({_pct(copies['step_s'], eager['step_s'])}): a perfect split of the work with free communication "
            f"would reach {copies['speedup']:.2f}x here, this machine's ceiling for {n} ranks (not a strict bound: "
            f"a rank's smaller patch may fit the caches better)."
            + (f" N={n} stale reaches {stale['speedup']:.2f}x, {100 * stale['speedup'] / copies['speedup']:.0f}% "
               f"of it." if stale else ""))
        patch = _patch_bound(results, copies)
        if patch:
            patch_copies, patch_eager, bound = patch
            out.append(
                f"N={n} copies on a patch (the unmodified model on one rank's {patch_copies['case']['height'] // n} "
                f"rows, on each of {n} ranks at once): {patch_copies['step_s']:.3f} s per step against "
                f"{patch_eager['step_s']:.3f} s alone ({_pct(patch_copies['step_s'], patch_eager['step_s'])}, "
                f"against {_pct(copies['step_s'], eager['step_s'])} for the whole latent): one stale rank timed "
                f"alone, slowed as much, would reach {bound:.2f}x"
                + (f"; N={n} stale reaches {stale['speedup']:.2f}x." if stale else "."))
    return out


def _patch_bound(results: list[dict[str, Any]], copies: dict[str, Any] | None
                 ) -> tuple[dict[str, Any], dict[str, Any], float] | None:
    """``(copies, eager, bound)`` for ``--ceiling``'s runs of ``copies``' model on one of its N patches:
    N copies at once and one alone, and one stale rank timed alone slowed by as much as those copies are."""
    if not copies:
        return None
    n = copies["case"]["world_size"]
    whole = [r for r in results if baseline_key(r["case"]) == baseline_key(copies["case"])]
    patch = [r for r in results if baseline_key(r["case"]) == baseline_key({**copies["case"], "patch_of": n})]
    patch_copies = next((r for r in patch if r["case"]["mode"] == "copies" and r["case"]["world_size"] == n), None)
    patch_eager = next((r for r in patch if r["case"]["mode"] == "eager"), None)
    eager, alone = _find(whole, "eager", 1), _find(whole, "stale", n, projected=True)
    if not (patch_copies and patch_eager and eager and alone):
        return None
    return patch_copies, patch_eager, eager["step_s"] / alone["step_s"] * patch_eager["step_s"] / patch_copies["step_s"]


# A stale option of BenchCase and FidelityCase (falsy when unset): its default, what a value of it does, and what the default reads.
_STALE_OPTIONS: dict[str, tuple[Any, Callable[[Any], str], str]] = {
    "stale_dtype": (None, lambda v: f"{v} stale exchanges", "exchanges in the activations' dtype"),
    "extrapolate": (0.0, lambda v: f"stale values extrapolated by {v:g}", "the last step's values"),
    "fresh": ((), lambda v: f"{'+'.join(v)} exchanges kept synchronous", "the last step's values"),
}
# BenchCase's stale options: also how the same values travel.
_BENCH_OPTIONS = {**_STALE_OPTIONS, "bucket_mb": (
    0.0, lambda v: f"stale exchanges sent in buckets of {v:g} MiB", "one collective per exchange")}


def _collectives(result: dict[str, Any]) -> int:
    """Collectives a step of ``result`` starts, blocking and overlapped (from its plan)."""
    return sum(count for count, _ in result["exchanges"].values())


def _stale_option_findings(results: list[dict[str, Any]], wide: dict[str, Any] | None,
                           alone: dict[str, Any] | None = None) -> list[str]:
    """Each 2-rank stale run with narrowed, extrapolated, synchronous or packed exchanges against the
    default one; and each such rank timed alone against the default rank alone."""
    out = []
    for r in results:
        c = r["case"]
        options = [what(c[option]) for option, (_, what, _) in _BENCH_OPTIONS.items() if c.get(option)]
        gn = [f"GN {c['gn_variant']}"] if c["gn_variant"] != "corrected" else []
        packed = (f"; {_collectives(r)} collectives per step (against {_collectives(wide or alone)})"
                  if c.get("bucket_mb") and (wide or alone) else "")
        if alone and options and c["world_size"] == 2 and c["projected"]:
            out.append(f"{' and '.join(gn + options)}, one rank timed alone: {r['step_s']:.3f} s per step against "
                       f"{alone['step_s']:.3f} s, {r['speedup']:.2f}x over the unmodified model against "
                       f"{alone['speedup']:.2f}x{packed}; peak memory {r['peak_bytes'] / 2**30:.2f} GiB (against "
                       f"{alone['peak_bytes'] / 2**30:.2f}).")
        if wide and options and c["world_size"] == 2 and c["transport"] and not c["projected"]:
            out.append(
                f"{' and '.join(gn + options)}: {r['speedup']:.2f}x against {wide['speedup']:.2f}x{packed}; "
                f"{r['bytes_sent_per_step'] / 2**20:.1f} MiB sent per rank per step (against "
                f"{wide['bytes_sent_per_step'] / 2**20:.1f}), stale buffers {r['state_bytes'] / 2**20:.1f} MiB "
                f"(against {wide['state_bytes'] / 2**20:.1f}); the rank's other threads used "
                f"{r['background_cpu_s']:.3f} s of CPU per step (against {wide['background_cpu_s']:.3f}).")
    return out


def _published_comparison(results: list[dict[str, Any]]) -> list[str]:
    """Projected speedups next to DistriFusion's measured ones at the same resolution and N."""
    out = []
    for r in results:
        c = r["case"]
        published = PUBLISHED_SPEEDUPS.get(c["height"], {}).get(c["world_size"])
        if "link" in r and c["model"] == "sdxl-full" and c["mode"] == "stale" and published and r["speedup"]:
            out.append(f"{c['world_size']} GPUs at {8 * c['height']}x{8 * c['width']} px over "
                       f"{r['link']['gbps']:g} GB/s: projected {r['speedup']:.2f}x; DistriFusion measured "
                       f"{published}x on A100s.")
    return out


def _target_config(results: list[dict[str, Any]]) -> bool:
    """Whether these results measure the speedup target's configuration: half-width SD 1.5, 64x64 latent,
    batch 1."""
    case = results[0]["case"]
    return (case["model"], case["height"], case["batch"]) == ("sd15-half", 64, 1)


def _target_sections(records: dict[str, dict[str, Any]], speed: list[str]) -> dict[str, str]:
    """Per machine, the speed section that judges the speedup target there: of those with its
    configuration measured on that machine, the one with the most rounds."""
    best: dict[str, str] = {}
    for key in speed:
        machine, results = records[key]["machine"], records[key]["results"]
        if _target_config(results) and (machine not in best
                                        or _rounds(results) > _rounds(records[best[machine]]["results"])):
            best[machine] = key
    return best


def _backend(result: dict[str, Any]) -> str:
    return result["case"].get("backend", "eager")


def _by_backend(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The results of each backend, in the order they first appear."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(_backend(r), []).append(r)
    return groups


def _backend_findings(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each compiled backend against the eager model of the same run: what compiling alone buys, its
    2-rank stale ranks over the eager model (its own table compares them with the compiled model),
    and its stale rank timed alone against the eager one."""
    eager = _find(groups.get("eager", []), "eager", 1)
    eager_alone = _find(groups.get("eager", []), "stale", 2, projected=True)
    out = []
    for backend, results in groups.items():
        model, stale = _find(results, "eager", 1), _find(results, "stale", 2)
        alone = _find(results, "stale", 2, projected=True)
        if backend == "eager" or not (eager and model):
            continue
        line = (f"{backend} against eager in the same rounds: the compiled model takes {model['step_s']:.3f} s per "
                f"step, the eager model {eager['step_s']:.3f} s ({eager['step_s'] / model['step_s']:.2f}x from "
                "compiling alone)")
        if stale:
            line += (f"; {backend}'s 2-rank stale step of {stale['step_s']:.3f} s is "
                     f"{eager['step_s'] / stale['step_s']:.2f}x the eager model's speed")
        if alone and eager_alone:
            line += (f"; one stale rank timed alone takes {alone['step_s']:.3f} s compiled against "
                     f"{eager_alone['step_s']:.3f} s eager ({eager_alone['step_s'] / alone['step_s']:.2f}x)")
        out.append(line + ".")
    return out


def _target_lines(key: str, results: list[dict[str, Any]], target: str | None, profile: str | None) -> list[str]:
    """The speedup target's verdict (in the section that judges it) or a pointer to that section."""
    stale = _find(results, "stale", 2)
    if not stale or not _target_config(results):
        return []
    if key == target:
        copies = _find(results, "copies", 2)
        ceiling = (f"; this machine's ceiling for 2 ranks, measured in the same rounds (N=2 copies), is "
                   f"{copies['speedup']:.2f}x" if copies else "")
        if copies and copies["speedup"] < SPEEDUP_TARGET:
            ceiling += (f", below the target: here two copies of the model running at once, splitting nothing, "
                        f"do not reach {SPEEDUP_TARGET}x")
        patch = _patch_bound(results, copies)
        if patch:
            ceiling += (f"; one rank timed alone, slowed as much as two copies on a rank's patch slow each "
                        f"other, would reach {patch[2]:.2f}x")
        packed = max(_packed(results), key=lambda r: r["speedup"], default=None)
        best = max(stale["speedup"], packed["speedup"] if packed else 0.0)
        if packed:
            ceiling = (f"; the same values sent in buckets of {packed['case']['bucket_mb']:g} MiB: "
                       f"{packed['speedup']:.2f}x{ceiling}")
        return [f"Target: 2-rank stale at least {SPEEDUP_TARGET}x here: {_verdict(best >= SPEEDUP_TARGET)} "
                f"({stale['speedup']:.2f}x{ceiling})."] + (
            [f"Where one rank alone loses against 2x, op by op: section {profile}."] if profile else [])
    return [f"The speedup target is judged in section {target}, which has more rounds on this machine. This run "
            f"measured {stale['speedup']:.2f}x for the same 2-rank stale configuration: single runs here differ by "
            f"about the spread of their steps."]


def _speed_section(key: str, record: dict[str, Any], target: str | None, profile: str | None = None) -> str:
    results = record["results"]
    groups = _by_backend(results)
    lines = [f"## Speed: {key}", "", _model_line(results), "", f"```bash\n{record['command']}\n```", "",
             markdown_table(results), "", f"![speedup](bench/{key}/speedup.png) "
             f"![breakdown](bench/{key}/breakdown.png)", ""]
    for backend, subset in groups.items():
        prefix = f"{backend}: " if len(groups) > 1 else ""
        findings = _speed_findings(subset, record["cpu_count"]) + _target_lines(key, subset, target, profile)
        lines += [f"- {prefix}{finding}" for finding in findings]
    lines += [f"- {finding}" for finding in _backend_findings(groups)]
    return "\n".join(lines)


def _bytes_section(key: str, record: dict[str, Any]) -> str:
    """Bytes per exchange kind from the compiler's plan for speed section ``key``'s configuration."""
    import distrifx
    from distrifx.models import random_unet, unet_inputs

    case = record["results"][0]["case"]
    unet = random_unet(case["model"])
    args, kwargs = unet_inputs(unet, case["batch"], case["height"], case["width"], tokens=77)
    plan = distrifx.explain(unet, args, kwargs, world_size=2, mode="stale")
    stale = _find(record["results"], "stale", 2)
    lines = ["## Bytes per step, by exchange", "",
             f"Rank 0 of 2 in stale mode, UNet `{case['model']}` at a {case['height']}x{case['width']} latent, batch "
             f"{case['batch']} (the configuration of section {key}), from the compiler's plan at render time "
             "(`distrifx.explain(unet, args, kwargs, world_size=2, mode='stale').bytes_by_kind('stale')`):", "",
             "| exchange | count | sent by rank 0 per step (MiB) |", "|---|---|---|"]
    for kind, (count, sent) in sorted(plan.bytes_by_kind("stale").items()):
        lines.append(f"| {kind} | {count} | {sent / 2**20:.2f} |")
    if stale:
        lines += ["", f"Stale buffers (what the next step reads: gathered K/V, neighbours' halo rows, per-rank "
                      f"GroupNorm statistics): {stale['state_bytes'] / 2**20:.1f} MiB per rank."]
    return "\n".join(lines)


def _profile_section(key: str, record: dict[str, Any]) -> str:
    result = record["results"]
    case = result["case"]
    lines = [f"## Where one rank's step goes: {key}", "",
             f"UNet `{case['model']}`, batch {case['batch']}, {case['height']}x{case['width']} latent, "
             f"{case['mode']} mode at N={case['world_size']}: self CPU time per op (torch.profiler, "
             f"{case['threads']} thread(s)) of the unmodified model and of one rank alone (collectives return at "
             f"once), {result['profiled_steps']} steady step(s) of each in turns, per step. The ideal is the "
             "unmodified model's time / N.", "",
             f"```bash\n{record['command']}\n```", "", breakdown_table(result), ""]
    lines += [f"- {finding}" for finding in breakdown_findings(result)]
    return "\n".join(lines)


def _fidelity_findings(rows: list[dict[str, Any]]) -> list[str]:
    """Per world size: sync mode's floor of arithmetic differences; the default stale configuration,
    the best one and the best fully asynchronous one (corrected GroupNorm) against naive, paired by
    seed (the same prompt and initial noise), with the standard error of the mean gap; the target."""

    def mean(label: str) -> float:
        return psnr_summary(rows, label)[0]

    out = []
    for world in sorted({r["world_size"] for r in rows}):
        labels = {r["label"] for r in rows if r["world_size"] == world}
        naive, default, exact = (FidelityCase(world, mode).label for mode in ("naive", "stale", "sync"))
        if exact in labels:
            floor, low, high = psnr_summary(rows, exact)
            out.append(f"N={world} sync (every exchange fresh: exact but for the order of floating-point sums): "
                       f"{floor:.1f} dB [{low:.1f}, {high:.1f}] (identical images count as 99): "
                       "the part of a stale configuration's difference that is not staleness.")
        stale = sorted((label for label in labels if label not in (naive, exact)), key=mean)
        if naive not in labels or not stale:
            continue
        blocking = {r["label"] for r in rows if r["gn_variant"] == "sync" or r.get("fresh")}
        asynchronous = [label for label in stale if label not in blocking]
        picks = {default: "default", stale[-1]: "best"}
        if asynchronous:  # without GN sync's or fresh= blocking exchanges: every exchange overlaps compute
            picks.setdefault(asynchronous[-1], "best fully asynchronous")
        for label, what in picks.items():
            if label in labels:
                gaps = paired_gaps(rows, label, naive)
                gap = statistics.fmean(gaps)
                reached = sum(g >= FIDELITY_TARGET_DB for g in gaps)
                out.append(f"N={world}, {what} stale configuration ({label}): {mean(label):.1f} dB against naive "
                           f"{mean(naive):.1f} dB, {gap:+.1f} dB, standard error {standard_error(gaps):.1f} dB over "
                           f"seeds (per seed {min(gaps):+.1f} to {max(gaps):+.1f}; "
                           f"+{FIDELITY_TARGET_DB:.0f} or more on {reached} of {len(gaps)} seeds); target "
                           f"+{FIDELITY_TARGET_DB:.0f} dB on average {_verdict(gap >= FIDELITY_TARGET_DB)}.")
        out += _variant_findings(rows, world, labels)
    return out


# Fidelity sections also sweep warm-ups: each against the default's, paired by seed.
_FIDELITY_OPTIONS = {**_STALE_OPTIONS, "warmup_steps": (
    FidelityCase.warmup_steps, lambda v: f"{v} warm-up step{'s' * (v != 1)}",
    f"{FidelityCase.warmup_steps} warm-up steps"), "warmup_fraction": (
    0.0, lambda v: f"warm-up over the first {v:.0%} of the timesteps' range", "the warm-up steps alone")}


def _variant_findings(rows: list[dict[str, Any]], world: int, labels: set[str]) -> list[str]:
    """Each stale configuration with a stale option (or warm-up) set against the same one without it,
    paired by seed; and its gap over naive patches."""
    naive = FidelityCase(world, "naive").label
    out = []
    for row in {r["label"]: r for r in rows if r["world_size"] == world and r["mode"] == "stale"}.values():
        case = FidelityCase.from_row(row)
        over = (f"; {statistics.fmean(paired_gaps(rows, row['label'], naive)):+.1f} dB over naive patches"
                if naive in labels else "")
        for option, (default, what, against) in _FIDELITY_OPTIONS.items():
            base = dataclasses.replace(case, **{option: default}).label
            if getattr(case, option) == default or base not in labels:
                continue
            gaps = paired_gaps(rows, row["label"], base)
            made = f", {row['warmup_calls']} of {row['steps']} steps" if option == "warmup_fraction" else ""
            out.append(f"N={world}, {what(getattr(case, option))}{made} ({row['label']}): "
                       f"{psnr_summary(rows, row['label'])[0]:.1f} dB, "
                       f"{statistics.fmean(gaps):+.2f} dB against {against} (standard error "
                       f"{standard_error(gaps):.2f} dB over seeds; better on {sum(g > 0 for g in gaps)} of "
                       f"{len(gaps)}){over}.")
    return out


def _fidelity_section(key: str, record: dict[str, Any]) -> str:
    from distrifx.default_model import UNET_CONFIG

    rows = record["results"]
    size, trained = rows[0]["size"], UNET_CONFIG["sample_size"]
    patches = " and ".join(f"{size // n} rows at N={n}" for n in sorted({r["world_size"] for r in rows}))
    beyond = (f" It was trained at {trained}x{trained}: at {size}x{size} its images leave the training "
              "distribution (see the figure) but remain a real denoising trajectory of the same network."
              if size != trained else "")
    extrapolated, fresh = any(r.get("extrapolate") for r in rows), any(r.get("fresh") for r in rows)
    longer = any(r["mode"] == "stale" and r["warmup_steps"] > FidelityCase.warmup_steps for r in rows)
    shares = any(r.get("warmup_fraction") for r in rows)
    parts = [name for name, swept in (("longer warm-ups", longer), ("warm-ups by share of the timesteps", shares),
                                      ("exchanges kept synchronous", fresh),
                                      ("extrapolated stale values", extrapolated)) if swept]
    title = f", {' and '.join(parts)}" if parts else ""
    variants = sorted({r["gn_variant"] for r in rows if r.get("extrapolate") or r.get("fresh")})
    title += f" (GN {', '.join(variants)})" if variants and variants != ["corrected"] else ""
    ahead = (" Configurations marked *extrapolated λ* read their neighbours' halo rows and keys/values as the last "
             "step's plus λ times their change since the step before (`extrapolate=λ`, docs/architecture.md); the "
             "others read the last step's." if extrapolated else "")
    ahead += (" Configurations with a warm-up of *max(W steps, first f of t)* also run synchronously while the "
              "timestep is above (1 - f) x the generation's first (`warmup_fraction=f`, README)." if shares else "")
    ahead += (" Configurations marked *fresh halo* (*fresh kv*) wait for this step's conv halo rows (keys/values) "
              "instead of reading the last step's (`fresh=`, docs/architecture.md)." if fresh else "")
    lines = [f"## Fidelity on the trained default model: {rows[0]['steps']} DDIM steps, {size}x{size} pixels{title}",
             "",
             f"The default model (`distrifx/assets/default_model`, trained here on procedural shapes) at "
             f"{size}x{size} pixels, patches of {patches}.{beyond} PSNR/SSIM (torchmetrics) of each configuration's "
             "image against the single-device image of the same seed and prompt. Ranks are simulated in one process "
             f"(the arithmetic is the one real ranks do).{ahead}", "",
             f"```bash\n{record['command']}\n```", "", fidelity_table(rows), "", f"![fidelity](bench/{key}/images.png)",
             ""]
    if warmup_sweep(rows):
        lines += [f"![PSNR over naive patches by warm-up](bench/{key}/warmups.png)", ""]
    lines += [f"- {finding}" for finding in _fidelity_findings(rows)]
    lines.append(f"- For scale: DistriFusion reports {PUBLISHED_GAP} for SDXL at 50 DDIM steps (its stale "
                 "configuration against the single-device image, and naive patches).")
    return "\n".join(lines)


def _vae_section(record: dict[str, Any]) -> str:
    rows = record["results"]
    lines = ["## VAE decoder memory", "",
             "SD's VAE architecture (random weights) decoding one latent: peak resident memory per rank, and the "
             "part added by decoding (what patch parallelism divides).", "",
             f"```bash\n{record['command']}\n```", "", vae_memory_table(rows)]
    one = next((r for r in rows if r["world_size"] == 1), None)
    if one:
        lines += [""] + [f"- {r['world_size']} ranks: {100 * r['decode_bytes'] / one['decode_bytes']:.0f}% of one "
                         f"rank's decoding memory per rank (ideal {100 / r['world_size']:.0f}%)."
                         for r in rows if r["world_size"] > 1]
    return "\n".join(lines)


def _gpu_section(records: dict[str, dict[str, Any]], suite: str) -> str:
    gpu = [f"{key} ({r['machine']}, {r['date']})" for key, r in records.items() if _needs_gpu(SUITES[suite][key])]
    if gpu:
        return "## GPU\n\nThe sections measured on a GPU:\n\n" + "\n".join(f"- {g}" for g in gpu)
    text = ("## GPU\n\nNo GPU was available to any command on this page: there are no GPU numbers, measured or "
            "projected.")
    missing = [key for key, argv in SUITES[suite].items() if _needs_gpu(argv)]
    if missing:
        text += (f" On a machine with one, `distrifx report --out docs --sections {' '.join(missing)}` times full "
                 "SDXL there (`distrifx bench --device cuda`: the eager baseline and one rank alone at 2, 4 and 8 "
                 "GPUs) and projects the N-GPU speedups over an NVLink-class and a PCIe-class link, next to "
                 "DistriFusion's published numbers; `scripts/gpu_check.sh` runs the CUDA tests and then these.")
    return text


def _stamped(section: str, record: dict[str, Any]) -> str:
    """``section`` with the date and machine its command ran on under its heading: the page mixes machines."""
    heading, body = section.split("\n", 1)
    return f"{heading}\n\nMeasured {record['date']} on {record['machine']}.\n{body}"


def render(out: Path, suite: str = "docs") -> str:
    """The page, from the suite's ``results.json`` files under ``out/bench``."""
    records = {key: read_results(out / "bench" / key) for key in SUITES[suite]
               if (out / "bench" / key / "results.json").exists()}
    if not records:
        raise FileNotFoundError(f"no results under {out / 'bench'}: run `distrifx report --out {out}` first")
    machines = sorted({r["machine"] for r in records.values()})
    dates = sorted({r["date"] for r in records.values()})
    command = f"distrifx report --out {out}" + ("" if suite == "docs" else f" --suite {suite}")
    head = ["# Benchmarks", "",
            f"Generated by `{command}` from the results of the commands shown with each table "
            f"(measured {dates[0]}{' to ' + dates[-1] if len(dates) > 1 else ''}); "
            f"`{command} --reuse` re-renders it without rerunning. Raw JSON and plots are in "
            "`bench/<section>/`.", "",
            *(f"**Machine:** {m}." for m in machines), "",
            "Ranks are local processes with one torch thread each; the single-rank baseline is the unmodified model "
            "in one process with one thread."]
    sections = ["\n".join(head)]
    suite_argv = SUITES[suite]
    speed = [k for k in records if suite_argv[k][0] == "bench" and "--component" not in suite_argv[k]]
    targets = _target_sections(records, speed)
    profiles = [k for k in records if suite_argv[k][0] == "profile"]
    target_profile = next((k for k in profiles if _target_config([records[k]["results"]])), None)
    sections += [_stamped(_speed_section(key, records[key], targets.get(records[key]["machine"]), target_profile),
                          records[key]) for key in speed]
    if speed:
        sections.append(_bytes_section(speed[0], records[speed[0]]))
    sections += [_stamped(_profile_section(key, records[key]), records[key]) for key in profiles]
    for key, record in records.items():
        if suite_argv[key][0] == "fidelity":
            sections.append(_stamped(_fidelity_section(key, record), record))
        elif "--component" in suite_argv[key]:
            sections.append(_stamped(_vae_section(record), record))
    sections.append(_gpu_section(records, suite))
    sections.append("## Compile and export\n\nEager vs inductor vs pt2 vs aoti vs onnx step and compile times: "
                    "[compile.md](compile.md).")
    return "\n\n".join(sections) + "\n"


def report(out: Path, suite: str = "docs", sections: Sequence[str] | None = None, reuse: bool = False) -> Path:
    """Run the suite (see :func:`run_suite`) and write ``out/benchmarks.md``; return its path."""
    run_suite(out, suite, sections, reuse)
    page = out / "benchmarks.md"
    page.write_text(render(out, suite))
    return page
