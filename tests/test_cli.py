"""The command line, end to end in subprocesses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from distrifx.cli import _fidelity_cases, build_parser, main
from distrifx.default_model import load_default_pipeline
from distrifx.models import tiny_pipeline


def _distrifx(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "distrifx", *args], check=True, capture_output=True,
                            text=True, timeout=600)
    return result.stdout


def test_help_explains_the_commands():
    text = _distrifx("generate", "--help")
    for flag in ("--model", "--prompt", "--world-size", "--mode", "--warmup-steps", "--seed", "--out"):
        assert flag in text


def test_fidelity_crosses_extrapolations_with_fresh_sets_and_gn_variants():
    args = build_parser().parse_args(["fidelity", "--world-sizes", "2", "--warmups", "4", "--gn-variants", "sync",
                                      "--extrapolations", "0", "0.5", "--fresh-sets", "none", "halo"])
    stale = "N=2 stale, warm-up 4, GN"
    assert [case.label for case in _fidelity_cases(args)] == [
        f"{stale} corrected", f"{stale} sync", f"{stale} sync, fresh halo", f"{stale} sync, extrapolated 0.5",
        f"{stale} sync, extrapolated 0.5, fresh halo", "N=2 sync", "N=2 naive"]


def test_fidelity_adds_warmup_fractions_at_the_longest_warmup():
    args = build_parser().parse_args(["fidelity", "--world-sizes", "4", "--warmups", "2", "4", "--gn-variants",
                                      "corrected", "--warmup-fractions", "0.3"])
    assert [case.label for case in _fidelity_cases(args)] == [
        "N=4 stale, warm-up 2, GN corrected", "N=4 stale, warm-up 4, GN corrected",
        "N=4 stale, warm-up max(4 steps, first 30% of t), GN corrected", "N=4 sync", "N=4 naive"]


def test_generate_on_the_embedded_default_writes_a_png(tmp_path):
    out = tmp_path / "image.png"
    stdout = _distrifx("generate", "--prompt", "red circle", "--world-size", "2", "--steps", "6",
                       "--warmup-steps", "2", "--warmup-fraction", "0.3", "--cfg-parallel", "off", "--height", "64",
                       "--width", "64",
                       "--extrapolate", "0.5", "--fresh", "halo", "--bucket-mb", "1", "--threads-per-rank", "1",
                       "--out", str(out))
    assert f"wrote {out} (64x64) with 2 rank(s), mode=stale" in stdout
    image = Image.open(out)
    assert image.size == (64, 64) and image.mode == "RGB"
    red, green, blue = np.asarray(image).reshape(-1, 3).mean(0)
    assert min(red, green, blue) < max(red, green, blue)  # not a blank image


def test_generate_loads_a_local_diffusers_directory(tmp_path):
    tiny_pipeline("sd15").save_pretrained(tmp_path / "model")
    out = tmp_path / "sd.png"
    _distrifx("generate", "--model", str(tmp_path / "model"), "--world-size", "2", "--steps", "2",
              "--mode", "sync", "--threads-per-rank", "1", "--out", str(out))
    assert Image.open(out).size == (32, 32)


@pytest.fixture(scope="module")
def controlnet_model(tmp_path_factory):
    """A tiny SD 1.5 ControlNet pipeline on disk and a conditioning image for it."""
    root = tmp_path_factory.mktemp("controlnet")
    tiny_pipeline("sd15-controlnet").save_pretrained(root / "model")
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "edges.png")
    return root / "model", root / "edges.png"


def test_generate_and_compile_a_controlnet_pipeline(controlnet_model, tmp_path):
    """--control-image on spawned ranks; then compile (UNet and ControlNet) and generate with --engines."""
    from diffusers import DiffusionPipeline

    model, control = controlnet_model
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("red circle", image=Image.open(control).convert("RGB"), height=32, width=32,
                    num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
    common = ["--model", str(model), "--control-image", str(control), "--prompt", "red circle", "--steps", "3",
              "--threads-per-rank", "1"]
    main(["generate", *common, "--world-size", "2", "--mode", "sync", "--cfg-parallel", "off", "--height", "32",
          "--width", "32", "--out", str(tmp_path / "split.png")])  # row patches; the export below splits the batch
    main(["compile", "--model", str(model), "--world-size", "2", "--mode", "sync", "--format", "onnx", "--height",
          "32", "--width", "32", "--out", str(tmp_path / "engines")])
    assert (tmp_path / "engines" / "controlnet" / "manifest.json").is_file()
    main(["generate", *common, "--engines", str(tmp_path / "engines"), "--out", str(tmp_path / "loaded.png")])
    for name in ("split.png", "loaded.png"):
        image = np.asarray(Image.open(tmp_path / name), dtype=np.int16)
        assert np.abs(image - np.asarray(expected, dtype=np.int16)).max() <= 1


def test_generate_refuses_a_control_image_the_pipeline_cannot_take(controlnet_model):
    model, control = controlnet_model
    with pytest.raises(SystemExit, match="is a ControlNet pipeline: pass its conditioning image with --control-image"):
        main(["generate", "--model", str(model)])
    with pytest.raises(SystemExit, match="the embedded default model has no controlnet"):
        main(["generate", "--control-image", str(control)])


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The default model's denoiser compiled for 2 ranks at 32x32 (the default guidance: a CFG split)."""
    out = tmp_path_factory.mktemp("engines")
    main(["compile", "--world-size", "2", "--format", "pt2", "--mode", "sync", "--gn-variant", "sync", "--height",
          "32", "--width", "32", "--out", str(out)])
    return out


def test_generate_runs_compiled_engines_and_equals_one_device(engines, tmp_path, capsys):
    """In this process (its imports are done): compile, then generate spawning two gloo ranks."""
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["pipeline"] == {"height": 32, "width": 32, "guidance_scale": 3.0} and manifest["cfg_split"]
    assert manifest["options"]["gn_variant"] == "sync"
    out = tmp_path / "engines.png"
    main(["generate", "--engines", str(engines), "--prompt", "red circle", "--steps", "3", "--threads-per-rank", "1",
          "--out", str(out)])
    stdout = capsys.readouterr().out
    assert f"wrote {out} (32x32) with 2 rank(s), mode=sync" in stdout and f"loading {engines}" in stdout
    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("red circle", height=32, width=32, num_inference_steps=3,
                    generator=torch.Generator().manual_seed(0)).images[0]
    difference = np.abs(np.asarray(Image.open(out), dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 1


@pytest.mark.parametrize("options,message", [
    (["--height", "64"], r"--height 64 \(compiled: 32\)"),
    (["--guidance-scale", "1.0"], r"--guidance-scale 1.0 \(compiled: 3.0; classifier-free guidance on"),
    (["--mode", "stale", "--world-size", "4"], r"--world-size 4 \(compiled: 2\); --mode stale \(compiled: sync\)"),
    (["--stale-dtype", "bfloat16"], r"--stale-dtype bfloat16 \(compiled: None\)"),
    (["--extrapolate", "0.5"], r"--extrapolate 0.5 \(compiled: 0.0\)"),
    (["--fresh", "kv", "halo"], r"--fresh \['halo', 'kv'\] \(compiled: \[\]\)"),
    (["--gn-variant", "corrected"], r"--gn-variant corrected \(compiled: sync\)"),
])
def test_generate_refuses_options_the_engines_were_not_compiled_for(engines, options, message):
    with pytest.raises(SystemExit, match=f"was compiled for height=32, width=32, guidance_scale=3.0, world size 2, "
                                         f"mode=sync; these options differ: {message}"):
        main(["generate", "--engines", str(engines), *options])


def test_generate_passes_the_pipeline_arguments_the_export_recorded(engines, tmp_path):
    from distrifx.cli import _engine_options, _pipeline_kwargs

    sd3 = tmp_path / "sd3"
    shutil.copytree(engines, sd3)
    manifest = json.loads((sd3 / "manifest.json").read_text())
    manifest["pipeline"]["max_sequence_length"] = 8  # as export_pipeline(..., pipeline_kwargs=...) records it
    (sd3 / "manifest.json").write_text(json.dumps(manifest))
    args = build_parser().parse_args(["generate", "--engines", str(sd3)])
    options = _engine_options(vars(args))
    assert _pipeline_kwargs(options, pipe=None)["max_sequence_length"] == 8


def test_export_pipeline_refuses_pipeline_arguments_it_sets_itself(tmp_path):
    import distrifx

    with pytest.raises(distrifx.ConfigError, match=r"pipeline_kwargs \['num_inference_steps', 'prompt'\] are "):
        distrifx.export_pipeline(object(), tmp_path, 2, height=32, width=32,
                                 pipeline_kwargs={"prompt": "a cat", "num_inference_steps": 4})


def test_an_export_from_before_an_option_existed_counts_as_compiled_without_it(engines, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(engines, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for added in ("extrapolate", "fresh"):
        del manifest["options"][added]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match=r"these options differ: --extrapolate 0.5 \(compiled: 0.0\); --fresh "
                                         r"\['halo'\] \(compiled: \[\]\)"):
        main(["generate", "--engines", str(old), "--extrapolate", "0.5", "--fresh", "halo"])
