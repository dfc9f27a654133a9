"""The ``distrifx`` command line: generate images across N ranks, benchmark, export.

    distrifx generate --prompt "a red circle" --world-size 2 --out image.png
    torchrun --nproc-per-node 4 -m distrifx generate --model ./my-sd15 --height 1024 --width 1024
    distrifx compile --world-size 2 --format pt2 --out engines/ && distrifx generate --engines engines/
    distrifx bench --model sd15-half --latent 64
    distrifx fidelity --world-sizes 2 4
    distrifx profile --model sd15-half --latent 64 --world-size 2
    distrifx report --out docs

Without ``--model`` it runs on the embedded default model (small, shipped in the package).
Without torchrun, ``--world-size N`` spawns N local ranks itself (gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distrifx.bench import BACKENDS, DTYPES
from distrifx.config import FRESH_KINDS, STALE_DTYPES, GNVariant, Mode, fresh_kinds
from distrifx.errors import ConfigError, DistrifxError
from distrifx.models import UNET_CONFIGS

if TYPE_CHECKING:
    from distrifx.fidelity import FidelityCase

__all__ = ["main", "build_parser"]

MODES = [m.value for m in Mode]
GN_VARIANTS = [v.value for v in GNVariant]

_CFG_PARALLEL = {"auto": "auto", "on": True, "off": False}
# generate's parallel options; with --engines they come from the export instead.
_PARALLEL_DEFAULTS = {"world_size": 2, "mode": "stale", "warmup_steps": 4, "warmup_fraction": 0.0,
                      "gn_variant": "corrected", "cfg_parallel": "auto", "extrapolate": 0.0, "fresh": [],
                      "bucket_mb": 0.0}


def _add_parallel_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-size", type=int, default=None,
                   help="number of ranks (row patches); default 2 (with --engines: the export's)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="sync: exact; stale: DistriFusion's displaced patches (default); naive: no interaction")
    p.add_argument("--warmup-steps", type=int, default=None, help="synchronous steps before stale mode (default 4)")
    p.add_argument("--gn-variant", choices=GN_VARIANTS, default=None,
                   help="GroupNorm statistics after warm-up in stale mode (default corrected)")
    p.add_argument("--cfg-parallel", choices=["auto", "on", "off"], default=None,
                   help="put the two halves of a guidance batch on two rank groups (default auto)")
    _add_stale_options(p, unset=True)
    p.add_argument("--threads-per-rank", type=int, default=None,
                   help="torch threads per spawned rank on CPU (default: cores / world size)")


def _add_stale_options(p: argparse.ArgumentParser, unset: bool = False) -> None:
    """Stale mode's options; ``unset``: their defaults are None, to be filled in later."""
    p.add_argument("--warmup-fraction", type=float, default=None if unset else 0.0,
                   help="also run synchronously while the timestep is above (1 - this) x the generation's first: "
                        "the same share of any number of steps (default 0: off; 0.3 is measured in "
                        "docs/benchmarks.md)")
    p.add_argument("--stale-dtype", choices=list(STALE_DTYPES), default=None,
                   help="send and keep stale mode's halo rows and keys/values in this dtype (default: the "
                        "activations')")
    p.add_argument("--extrapolate", type=float, default=None if unset else 0.0,
                   help="stale halo rows and keys/values: the last step's plus this fraction of their change "
                        "since the step before (default 0: the last step's; 0.25 and 0.5 are measured in "
                        "docs/benchmarks.md)")
    p.add_argument("--fresh", choices=FRESH_KINDS, nargs="*", default=None if unset else [],
                   help="exchanges stale mode still does synchronously, of: halo, kv (default none; 'halo' with "
                        "GroupNorm's statistics synchronous too, gn_variant sync, leaves only keys/values stale, "
                        "measured in docs/benchmarks.md)")
    p.add_argument("--bucket-mb", type=float, default=None if unset else 0.0,
                   help="send stale mode's exchanges in collectives of up to this many MiB instead of one each "
                        "(default 0: one each; 2 and 8 are measured in docs/benchmarks.md)")


def _stale_dtypes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stale-dtypes", nargs="+", default=["none"], choices=["none", *STALE_DTYPES],
                   help="stale exchange dtypes to sweep in stale mode; none: the activations' (default none)")


def _fresh_set(text: str) -> list[str]:
    """``halo``, ``halo,kv`` or ``none``: a set of exchange kinds, sorted."""
    try:
        return list(fresh_kinds([] if text == "none" else text.split(",")))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} (none, or kinds separated by commas): {exc}") from exc


def _fresh_sets(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fresh-sets", type=_fresh_set, nargs="+", default=[[]],
                   help="sets of exchanges stale mode keeps synchronous to sweep, crossed with each GN variant and "
                        "extrapolation: none, halo, kv or halo,kv (default none)")


def _extrapolations(p: argparse.ArgumentParser) -> None:
    p.add_argument("--extrapolations", type=float, nargs="+", default=[0.0],
                   help="stale extrapolation fractions to sweep in stale mode, crossed with each GN variant and fresh "
                        "set (default 0: none)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distrifx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one image across N ranks",
                         description="Generate an image with a patch-parallel denoiser and save it as PNG.")
    gen.add_argument("--model", type=Path, default=None,
                     help="local diffusers pipeline directory (from_pretrained; nothing is downloaded). "
                          "Default: the embedded default model")
    gen.add_argument("--prompt", default="a red circle", help="text prompt (default: %(default)r)")
    gen.add_argument("--negative-prompt", default=None, help="negative prompt (diffusers pipelines)")
    gen.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    gen.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    gen.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    gen.add_argument("--seed", type=int, default=0, help="random seed (rank 0's initial latents are shared)")
    gen.add_argument("--out", type=Path, default=Path("distrifx.png"), help="output PNG (default distrifx.png)")
    gen.add_argument("--control-image", type=Path, default=None,
                     help="a ControlNet pipeline's conditioning image (an edge map, a pose, ...; the pipeline "
                          "resizes it to height x width); needed by ControlNet pipelines, refused by others")
    gen.add_argument("--engines", type=Path, default=None,
                     help="a distrifx compile output: every rank runs its denoiser from these files "
                          "(distrifx.load_pipeline); height, width, guidance and the parallel options are the export's")
    gen.add_argument("--allow-native-code", action="store_true",
                     help="with --engines: open an aoti export's compiled libraries (native code; only exports "
                          "you trust)")
    _add_parallel_options(gen)

    bench = sub.add_parser("bench", help="measure speedup, exposed communication, bytes and memory",
                           description="Run the model unmodified on one rank and patch-parallel on N ranks, "
                                       "each configuration in fresh processes; write JSON and a markdown table.")
    bench.add_argument("--model", nargs="+", default=["sd15-half"], choices=list(UNET_CONFIGS),
                       help="UNet config names from distrifx.models.UNET_CONFIGS to sweep (default sd15-half)")
    bench.add_argument("--latent", type=int, nargs="+", default=[64], help="square latent sizes (default 64)")
    bench.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    bench.add_argument("--world-sizes", type=int, nargs="*", default=[2],
                       help="rank counts run as real local ranks (default 2; none: only --project)")
    bench.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    bench.add_argument("--steps", type=int, default=8, help="denoising steps per run (default 8)")
    bench.add_argument("--warmup-steps", type=int, default=4, help="stale-mode warm-up steps (default 4)")
    bench.add_argument("--gn-variants", nargs="+", default=["corrected"],
                       choices=GN_VARIANTS,
                       help="stale mode's GroupNorm statistics to sweep (default corrected)")
    _stale_dtypes(bench)
    _extrapolations(bench)
    _fresh_sets(bench)
    bench.add_argument("--bucket-mbs", type=float, nargs="+", default=[0.0],
                       help="stale mode's bucket sizes to sweep: exchanges sent in collectives of up to this many "
                            "MiB (bucket_mb; 0: one collective per exchange; default 0)")
    bench.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    bench.add_argument("--rounds", type=_positive_int, default=1,
                       help="run every configuration this many times, a round through all of them at a time; "
                            "the median is over the steady steps of all rounds (default 1)")
    bench.add_argument("--no-bind-cores", action="store_true",
                       help="let the OS schedule the ranks (default: each rank bound to its own cores when they fit)")
    bench.add_argument("--no-transport", action="store_true",
                       help="also run stale mode's ranks together with collectives that return at once: "
                            "what the ranks cost each other on this machine, without the transport")
    bench.add_argument("--ceiling", action="store_true",
                       help="also run the unmodified model on every rank at once (N independent copies, no "
                            "collectives): N times its step rate over one rank's is the speedup a perfect split of "
                            "the work would reach on this machine, whose ranks share cores, caches and memory; and the "
                            "same on one rank's patch of the latent, alone and as N copies, for how much ranks "
                            "slow each other at a rank's working-set size")
    bench.add_argument("--cfg-parallel", action="store_true",
                       help="also run stale mode with the batch's two halves on two rank groups, each "
                            "patch-parallel over N/2 (cfg_parallel=True, what a guidance pipeline gets by default "
                            "with an even world size); needs an even --batch and world size")
    bench.add_argument("--component", choices=["unet", "vae"], default="unet",
                       help="unet: step latency, speedup and communication (default); vae: peak memory of SD's "
                            "VAE decoder per rank at each world size (--latent's first size, world size 1 included)")
    bench.add_argument("--project", type=int, nargs="*", default=[],
                       help="world sizes too large for this machine: time one rank alone (compute only)")
    bench.add_argument("--link-gbps", type=float, nargs="+", default=[],
                       help="with --project: also project each one-rank timing over a link sending this many GB/s "
                            "per rank (one row per value): compute plus the communication its plan needs")
    bench.add_argument("--link-latency-us", type=float, default=15.0,
                       help="the projection link's latency per collective in microseconds (default 15)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                       help="cpu (default) or cuda: on a GPU only the eager baseline and --project run")
    bench.add_argument("--dtype", choices=list(DTYPES), default="float32",
                       help="model and input dtype (default float32)")
    bench.add_argument("--backend", choices=list(BACKENDS), nargs="+", default=["eager"],
                       help="what runs each rank's graphs (default eager; several: every configuration with each, "
                            "in the same rounds); each backend's configurations are compared with the model compiled "
                            "by the same torch.compile backend, and each phase's first (compiling) call is not timed")
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")

    comp = sub.add_parser("compile", help="export every rank's program offline (pt2, aoti, onnx or tensorrt)",
                          description="Capture a pipeline's denoiser as the pipeline calls it at one resolution "
                                      "(or its VAE decoder), build every rank's program and write them with a "
                                      "manifest; run with distrifx generate --engines, or load with "
                                      "distrifx.load_pipeline.")
    comp.add_argument("--model", type=Path, default=None,
                      help="local diffusers pipeline directory (default: the embedded default model)")
    comp.add_argument("--component", choices=["unet", "transformer", "vae"], default=None,
                      help="what to export (default: the pipeline's denoiser, unet or transformer)")
    comp.add_argument("--height", type=int, default=64, help="image height in pixels (default 64)")
    comp.add_argument("--width", type=int, default=64, help="image width in pixels (default 64)")
    comp.add_argument("--guidance-scale", type=float, default=None,
                      help="guidance scale the pipeline runs with (default: the pipeline's); above 1 the "
                           "denoiser gets a batch of 2")
    comp.add_argument("--format", choices=["pt2", "aoti", "onnx", "tensorrt"], default="pt2",
                      help="pt2: torch.export (default); aoti: AOTInductor-compiled packages (native code, needs a "
                           "C++ compiler); onnx: onnxruntime, CPU; tensorrt: TensorRT engines, CUDA")
    comp.add_argument("--world-size", type=int, default=2)
    comp.add_argument("--mode", choices=MODES, default="stale")
    comp.add_argument("--warmup-steps", type=int, default=4)
    comp.add_argument("--gn-variant", choices=GN_VARIANTS, default="corrected",
                      help="stale mode's GroupNorm statistics after warm-up (default corrected)")
    comp.add_argument("--cfg-parallel", choices=["auto", "on", "off"], default="auto",
                      help="put the two halves of a guidance batch on two rank groups (default auto)")
    _add_stale_options(comp)
    comp.add_argument("--out", type=Path, required=True, help="output directory")

    fid = sub.add_parser("fidelity", help="PSNR/SSIM of stale and naive patches against one device",
                         description="On the trained default model: every configuration's image against the "
                                     "single-device image, per seed, with sync mode (exact but for the order of "
                                     "floating-point sums) and naive patches as the two bounds; writes a table, "
                                     "JSON and a figure.")
    fid.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    fid.add_argument("--warmups", type=int, nargs="+", default=[1, 2, 4], help="stale warm-up steps to sweep")
    fid.add_argument("--warmup-fractions", type=float, nargs="*", default=[],
                     help="at the longest warm-up, also warm up over these first shares of the timesteps' range "
                          "(warmup_fraction; default none)")
    fid.add_argument("--gn-variants", nargs="+", default=GN_VARIANTS, choices=GN_VARIANTS)
    _stale_dtypes(fid)
    _extrapolations(fid)
    _fresh_sets(fid)
    fid.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    fid.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    fid.add_argument("--steps", type=int, default=20)
    fid.add_argument("--jobs", type=_positive_int, default=1,
                     help="seeds run in this many processes at once, sharing this process's threads (default 1)")
    fid.add_argument("--out", type=Path, default=Path("fidelity-results"))

    prof = sub.add_parser("profile", help="where one rank loses against 1/N of the model, op by op",
                          description="Profile steady steps of the unmodified model and of one rank alone "
                                      "(collectives return at once) in this process; write each op's time on the "
                                      "rank against its ideal share, the model's time / N.")
    prof.add_argument("--model", default="sd15-half", choices=list(UNET_CONFIGS),
                      help="UNet config name from distrifx.models.UNET_CONFIGS (default sd15-half)")
    prof.add_argument("--latent", type=int, default=64, help="square latent size (default 64)")
    prof.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    prof.add_argument("--world-size", type=int, default=2, help="the rank's world size (default 2)")
    prof.add_argument("--mode", choices=MODES, default="stale")
    prof.add_argument("--warmup-steps", type=int, default=4, help="stale-mode warm-up steps run first (default 4)")
    prof.add_argument("--gn-variant", choices=GN_VARIANTS, default="corrected")
    prof.add_argument("--steps", type=_positive_int, default=2, help="steady steps to profile (default 2)")
    prof.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    prof.add_argument("--out", type=Path, default=Path("profile-results"), help="output directory")

    rep = sub.add_parser("report", help="run the benchmark suite and write benchmarks.md from its results",
                         description="Run every benchmark section (speed at 64x64 and 128x128, an op-by-op "
                                     "profile, fidelity, VAE memory; over an hour on 2 cores) into "
                                     "OUT/bench/<section>/ and render OUT/benchmarks.md from the results.")
    rep.add_argument("--out", type=Path, default=Path("docs"), help="docs directory (default docs)")
    rep.add_argument("--suite", choices=["docs", "tiny"], default="docs",
                     help="docs: the published numbers; tiny: every section in about a minute (default docs)")
    rep.add_argument("--sections", nargs="+", default=None, help="run only these sections (others are reused)")
    rep.add_argument("--reuse", action="store_true", help="do not rerun sections that already have results")
    return parser


def _load_pipeline(model: Path | None) -> Any:
    if model is None:
        from distrifx.default_model import load_default_pipeline

        return load_default_pipeline()
    from diffusers import DiffusionPipeline

    if not model.is_dir():
        raise SystemExit(f"distrifx: --model {model} is not a directory (a local diffusers pipeline is needed)")
    return DiffusionPipeline.from_pretrained(model)


def _pipeline_kwargs(options: dict[str, Any], pipe: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "prompt": options["prompt"],
        "num_inference_steps": options["steps"],
        "generator": torch.Generator().manual_seed(options["seed"]),
    }
    for key in ("height", "width", "guidance_scale", "negative_prompt"):
        if options[key] is not None:
            kwargs[key] = options[key]
    if options.get("control_image") is not None:
        from PIL import Image

        from distrifx.api import control_image_argument

        kwargs[control_image_argument(pipe)] = Image.open(options["control_image"]).convert("RGB")
    return {**kwargs, **options.get("pipeline_kwargs", {})}


def _check_control_image(model: Path | None, control_image: Path | None) -> None:
    """Stop, before any rank starts, where ``--control-image`` and the pipeline's ControlNet disagree."""
    index = model / "model_index.json" if model is not None else None
    entry = json.loads(index.read_text()).get("controlnet") if index is not None and index.is_file() else None
    controlnet = bool(entry and entry[-1])  # ["diffusers", "ControlNetModel"]; [null, null] when saved without
    if controlnet and control_image is None:
        raise SystemExit(f"distrifx: {model} is a ControlNet pipeline: pass its conditioning image with "
                         "--control-image PATH")
    if not controlnet and control_image is not None:
        raise SystemExit(f"distrifx: --control-image {control_image} is for ControlNet pipelines, and "
                         f"{model or 'the embedded default model'} has no controlnet: drop it, or pass a ControlNet "
                         "pipeline's directory with --model")
    if control_image is not None and not control_image.is_file():
        raise SystemExit(f"distrifx: --control-image {control_image} is not a file (an image file is needed)")


def _engine_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` completed from the export in ``--engines``; a clear exit if they contradict it."""
    from distrifx.export import PIPELINE_ARGUMENTS, read_manifest

    engines = options["engines"]
    manifest = read_manifest(engines)
    pipeline = manifest.get("pipeline")
    if pipeline is None:
        raise SystemExit(f"distrifx: {engines} holds no pipeline arguments (written by distrifx.export); "
                         "generate needs an export of a pipeline's denoiser: distrifx compile or "
                         "distrifx.export_pipeline.")
    fixed = {"height": pipeline["height"], "width": pipeline["width"], "world_size": manifest["world_size"],
             **manifest["options"], "cfg_parallel": "on" if manifest["cfg_split"] else "off"}
    wrong = []
    for key, value in fixed.items():
        given = options.get(key)
        if given not in (None, value) and not (key == "cfg_parallel" and given == "auto"):  # auto takes either
            wrong.append(f"--{key.replace('_', '-')} {given} (compiled: {value})")
    compiled, given = pipeline["guidance_scale"], options["guidance_scale"]
    if compiled is not None and given is not None and (given > 1) != (compiled > 1):
        wrong.append(f"--guidance-scale {given} (compiled: {compiled}; classifier-free guidance "
                     f"{'on' if compiled > 1 else 'off'}, which sets the denoiser's batch)")
    if wrong:
        raise SystemExit(f"distrifx: {engines} was compiled for height={fixed['height']}, width={fixed['width']}, "
                         f"guidance_scale={compiled}, world size {fixed['world_size']}, mode={fixed['mode']}; these "
                         f"options differ: {'; '.join(wrong)}. Drop them (the export's are used) or compile again "
                         "with them.")
    # what else the export's pipeline call was given (SD 3's max_sequence_length): every call must pass the same
    extra = {k: v for k, v in pipeline.items() if k not in PIPELINE_ARGUMENTS}
    return {**options, **fixed, "guidance_scale": given if given is not None else compiled, "pipeline_kwargs": extra}


def generate_rank(options: dict[str, Any]) -> dict[str, Any]:
    """One rank of ``distrifx generate`` (a process group is initialised). Rank 0 saves the PNG."""
    import torch.distributed as dist

    import distrifx

    rank = dist.get_rank() if dist.is_initialized() else 0
    pipe = _load_pipeline(options["model"])
    load_s = 0.0
    if options["engines"] is not None:
        start = time.perf_counter()
        pipe = distrifx.load_pipeline(pipe, options["engines"], allow_native_code=options["allow_native_code"])
        load_s = time.perf_counter() - start
    elif options["world_size"] > 1:
        pipe = distrifx.parallelize_pipeline(
            pipe, options["world_size"], mode=options["mode"], warmup_steps=options["warmup_steps"],
            warmup_fraction=options["warmup_fraction"], gn_variant=options["gn_variant"],
            cfg_parallel=_CFG_PARALLEL[options["cfg_parallel"]], stale_dtype=options["stale_dtype"],
            extrapolate=options["extrapolate"], fresh=options["fresh"], bucket_mb=options["bucket_mb"],
        )
    pipe.set_progress_bar_config(disable=rank != 0)
    start = time.perf_counter()
    image = pipe(**_pipeline_kwargs(options, pipe)).images[0]
    latency = time.perf_counter() - start
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    build = getattr(denoiser, "build_seconds", load_s)
    if rank == 0:
        options["out"].parent.mkdir(parents=True, exist_ok=True)
        image.save(options["out"])
    return {"latency_s": latency, "build_s": build, "size": image.size}


def _run_generate(args: argparse.Namespace) -> int:
    import distrifx

    options = vars(args)
    _check_control_image(args.model, args.control_image)
    if options["fresh"] is not None:  # as an export's manifest lists them
        options["fresh"] = list(fresh_kinds(options["fresh"]))
    if args.engines is not None:
        options = _engine_options(options)
    else:
        options.update({k: v for k, v in _PARALLEL_DEFAULTS.items() if options[k] is None})
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: we are one rank
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        options["world_size"] = dist.get_world_size()
        result = generate_rank(options)
        dist.destroy_process_group()
        if int(os.environ["RANK"]):
            return 0
    elif options["world_size"] > 1:
        threads = args.threads_per_rank or max(1, (os.cpu_count() or 1) // options["world_size"])
        result = distrifx.launch(generate_rank, options["world_size"], options, threads_per_rank=threads,
                                 timeout_s=3600)
    else:
        result = generate_rank(options)
    width, height = result["size"]
    if args.engines is not None:
        detail = f"after {result['build_s']:.2f} s loading {args.engines}"
    else:
        detail = f"of which {result['build_s']:.2f} s one-time graph capture and build"
    print(f"distrifx: wrote {args.out} ({width}x{height}) with {options['world_size']} rank(s), "
          f"mode={options['mode']}: {result['latency_s']:.2f} s, {detail}")
    return 0


def _write_outputs(out: Path, command: str, results: Any, table: str, extra: str = "") -> None:
    """Write ``results.json`` (with the machine and command) and ``results.md`` (the command, ``table``,
    ``extra``); print the table."""
    from distrifx.bench import write_json

    write_json(out, command, results)
    (out / "results.md").write_text(f"Command: `{command}`\n\n{table}\n{extra}")
    print(table)


def _run_vae_bench(args: argparse.Namespace, command: str) -> int:
    from distrifx.bench import run_vae_memory, vae_memory_table

    rows = run_vae_memory(args.latent[0], sorted({1, *args.world_sizes}))
    _write_outputs(args.out, command, rows, vae_memory_table(rows))
    return 0


def _run_bench(args: argparse.Namespace, argv: list[str]) -> int:
    from distrifx.bench import BenchCase, Link, markdown_table, run_cases, write_results

    if args.component == "vae":
        return _run_vae_bench(args, "distrifx " + " ".join(argv))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("distrifx bench: --device cuda, but torch sees no CUDA device (torch "
                         f"{torch.__version__}); run on a GPU machine with a CUDA build of torch, or drop --device")
    if args.link_gbps and not args.project:
        raise SystemExit("distrifx bench: --link-gbps projects one-rank-alone timings: add --project N ...")
    cases = []
    for model, latent, backend in itertools.product(args.model, args.latent, args.backend):
        common = dict(model=model, height=latent, width=latent, batch=args.batch, steps=args.steps,
                      warmup_steps=args.warmup_steps, threads=args.threads, bind_cores=not args.no_bind_cores,
                      device=args.device, dtype=args.dtype, backend=backend)
        cases.append(BenchCase(world_size=1, mode="eager", **common))
        variants = [dict(mode=m, gn_variant=g, stale_dtype=d, extrapolate=e, fresh=tuple(f), bucket_mb=k)
                    for m in args.modes
                    for g in (args.gn_variants if m == "stale" else ["corrected"])
                    for d in (_dtype_options(args.stale_dtypes) if m == "stale" else [None])
                    for e in (args.extrapolations if m == "stale" else [0.0])
                    for f in (args.fresh_sets if m == "stale" else [[]])
                    for k in (args.bucket_mbs if m == "stale" else [0.0])]
        cases += [BenchCase(world_size=n, **v, **common) for n in args.world_sizes for v in variants]
        cases += [BenchCase(world_size=n, projected=True, **v, **common) for n in args.project for v in variants]
        if args.no_transport:
            cases += [BenchCase(world_size=n, mode="stale", transport=False, **common) for n in args.world_sizes]
        if args.cfg_parallel:
            cases += [BenchCase(world_size=n, mode="stale", cfg_parallel=True, **common) for n in args.world_sizes]
        if args.ceiling:
            parts = [n for n in args.world_sizes if n > 1]
            cases += [BenchCase(world_size=n, mode="copies", **common) for n in parts]
            cases += [BenchCase(world_size=w, mode=m, patch_of=n, **common) for n in parts if latent % n == 0
                      for w, m in ((1, "eager"), (n, "copies"))]
    links = tuple(Link(gbps, args.link_latency_us) for gbps in args.link_gbps)
    results = run_cases(cases, rounds=args.rounds, links=links)
    write_results(results, args.out, "distrifx " + " ".join(argv))
    print(markdown_table(results))
    print(f"distrifx: wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


def _dtype_options(names: list[str]) -> list[str | None]:
    """``--stale-dtypes`` values as ``stale_dtype`` options: "none" is None."""
    return [None if name == "none" else name for name in names]


def _run_compile(args: argparse.Namespace) -> int:
    import distrifx
    from distrifx.api import _denoiser_name
    from distrifx.vae import VaeDecode

    pipe = _load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)  # the pipeline only runs up to its first denoiser call
    options = dict(mode=args.mode, warmup_steps=args.warmup_steps, warmup_fraction=args.warmup_fraction,
                   gn_variant=args.gn_variant, cfg_parallel=_CFG_PARALLEL[args.cfg_parallel],
                   stale_dtype=args.stale_dtype, extrapolate=args.extrapolate, fresh=args.fresh,
                   bucket_mb=args.bucket_mb, format=args.format)
    start = time.perf_counter()
    if args.component == "vae":
        if getattr(pipe, "vae", None) is None:
            raise SystemExit("distrifx: the pipeline has no 'vae' to export")
        scale = pipe.vae_scale_factor
        z = torch.randn(1, pipe.vae.config.latent_channels, args.height // scale, args.width // scale)
        manifest = distrifx.export(VaeDecode(pipe.vae), args.out, args.world_size, args=(z,), **options)
    else:
        name = _denoiser_name(pipe)
        if args.component not in (None, name):
            raise SystemExit(f"distrifx: the pipeline's denoiser is {name!r}, not {args.component!r}: "
                             f"pass --component {name} or leave it out")
        manifest = distrifx.export_pipeline(pipe, args.out, args.world_size, height=args.height, width=args.width,
                                            guidance_scale=args.guidance_scale, **options)
    print(f"distrifx: wrote {manifest} ({args.format}, {args.world_size} ranks, mode={args.mode}) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _fidelity_cases(args: argparse.Namespace) -> list[FidelityCase]:
    """The configurations ``distrifx fidelity`` measures: warm-ups with corrected GN; at the longest warm-up
    each warm-up fraction, each other GN variant, each narrower stale dtype, and each GN variant with every
    extrapolation and set of fresh exchanges (crossed: one case per combination but the plain one); sync and
    naive."""
    from distrifx.fidelity import FidelityCase

    cases = []
    for n in args.world_sizes:
        warm = max(args.warmups)
        cases += [FidelityCase(n, "stale", w, "corrected") for w in args.warmups]
        cases += [FidelityCase(n, "stale", warm, warmup_fraction=f) for f in args.warmup_fractions]
        cases += [FidelityCase(n, "stale", warm, v) for v in args.gn_variants if v != "corrected"]
        cases += [FidelityCase(n, "stale", warm, stale_dtype=d) for d in _dtype_options(args.stale_dtypes) if d]
        cases += [FidelityCase(n, "stale", warm, v, extrapolate=e, fresh=tuple(f))
                  for v in args.gn_variants for e in args.extrapolations for f in args.fresh_sets if e or f]
        cases += [FidelityCase(n, "sync"), FidelityCase(n, "naive")]  # sync: the floor of arithmetic differences
    return cases


def _run_fidelity(args: argparse.Namespace, argv: list[str]) -> int:
    from distrifx.default_model import load_default_pipeline
    from distrifx.fidelity import fidelity_figure, fidelity_table, run_fidelity, warmup_figure, warmup_sweep

    cases = _fidelity_cases(args)
    rows, images = run_fidelity(load_default_pipeline, cases, seeds=args.seeds, size=args.size, steps=args.steps,
                                jobs=args.jobs, progress=True)
    _write_outputs(args.out, "distrifx " + " ".join(argv), rows, fidelity_table(rows), "\n![images](images.png)\n")
    exact = {case.label for case in cases if case.mode == "sync"}  # the reference's image but for rounding
    fidelity_figure({k: v for k, v in images.items() if k not in exact}, rows, args.out / "images.png")
    if warmup_sweep(rows):
        warmup_figure(rows, args.out / "warmups.png")
    return 0


def _run_profile(args: argparse.Namespace, argv: list[str]) -> int:
    from distrifx.bench import BenchCase
    from distrifx.breakdown import breakdown_table, profile_case

    case = BenchCase(model=args.model, height=args.latent, width=args.latent, batch=args.batch,
                     world_size=args.world_size, mode=args.mode, warmup_steps=args.warmup_steps,
                     gn_variant=args.gn_variant, threads=args.threads)
    result = profile_case(case, args.steps)
    _write_outputs(args.out, "distrifx " + " ".join(argv), result, breakdown_table(result))
    print(f"distrifx: wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args, argv)
    except DistrifxError as error:  # its message names what, where, why and the fix: no traceback
        raise SystemExit(f"distrifx {args.command}: {error}") from error


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "generate":
        return _run_generate(args)
    if args.command == "bench":
        return _run_bench(args, argv)
    if args.command == "report":
        from distrifx.report import report

        print(f"distrifx: wrote {report(args.out, args.suite, args.sections, args.reuse)}")
        return 0
    if args.command == "fidelity":
        return _run_fidelity(args, argv)
    if args.command == "compile":
        return _run_compile(args)
    if args.command == "profile":
        return _run_profile(args, argv)
    raise SystemExit(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
