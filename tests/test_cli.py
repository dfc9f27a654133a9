"""The command line, end to end in subprocesses."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from distrifx.models import tiny_pipeline


def _distrifx(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "distrifx", *args], check=True, capture_output=True,
                            text=True, timeout=600)
    return result.stdout


def test_help_explains_the_commands():
    text = _distrifx("generate", "--help")
    for flag in ("--model", "--prompt", "--world-size", "--mode", "--warmup-steps", "--seed", "--out"):
        assert flag in text


def test_generate_on_the_embedded_default_writes_a_png(tmp_path):
    out = tmp_path / "image.png"
    stdout = _distrifx("generate", "--prompt", "red circle", "--world-size", "2", "--steps", "6",
                       "--warmup-steps", "2", "--cfg-parallel", "off", "--height", "64", "--width", "64",
                       "--threads-per-rank", "1", "--out", str(out))
    assert f"wrote {out} (64x64) with 2 rank(s), mode=stale" in stdout
    image = Image.open(out)
    assert image.size == (64, 64) and image.mode == "RGB"
    red, green, blue = (sum(c) / len(c) for c in zip(*image.getdata()))
    assert min(red, green, blue) < max(red, green, blue)  # not a blank image


def test_generate_loads_a_local_diffusers_directory(tmp_path):
    tiny_pipeline("sd15").save_pretrained(tmp_path / "model")
    out = tmp_path / "sd.png"
    _distrifx("generate", "--model", str(tmp_path / "model"), "--world-size", "2", "--steps", "2",
              "--mode", "sync", "--threads-per-rank", "1", "--out", str(out))
    assert Image.open(out).size == (32, 32)
