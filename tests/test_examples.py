"""The examples run as their docstrings say, at small sizes: what a user copies first has to work."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.timeout(330)
@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3"])
def test_the_torchrun_example_writes_rank_0s_image(tmp_path, kind):
    out = tmp_path / f"{kind}.png"
    stdout = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   str(EXAMPLES / "generate_torchrun.py"), "--kind", kind, "--steps", "3", "--out", str(out)], tmp_path)
    assert f"rank 0: {out} in " in stdout and "on 2 ranks" in stdout
    assert Image.open(out).size == (32, 32)  # the tiny pipelines' default size


@pytest.mark.timeout(330)
def test_the_comparison_example_puts_stale_patches_closer_to_one_device_than_naive_ones(tmp_path):
    out = tmp_path / "compare.png"
    stdout = _run([sys.executable, str(EXAMPLES / "compare_modes.py"), "--size", "32", "--steps", "6", "--seeds", "0",
                   "--out", str(out)], tmp_path)
    rows = re.findall(r"\| N=(\d) (stale|naive)[^|]*\| ([\d.]+) ", stdout)
    psnr = {(int(n), mode): float(db) for n, mode, db in rows}
    assert set(psnr) == {(2, "stale"), (2, "naive"), (4, "stale"), (4, "naive")}
    assert psnr[2, "stale"] > psnr[2, "naive"] and psnr[4, "stale"] > psnr[4, "naive"]
    assert Image.open(out).size[0] > Image.open(out).size[1]  # the images side by side


@pytest.mark.timeout(330)
def test_the_controlnet_example_sends_less_when_the_residuals_stay_on_their_ranks(tmp_path):
    stdout = _run([sys.executable, str(EXAMPLES / "controlnet.py"), "--model", "sd15", "--latent", "16", "--steps", "4"],
                  tmp_path)
    rows = dict(re.findall(r"\| (1 process[^|]*|N=2 stale, [^|]*) \| [\d.]+ \| [\d.]+x \| ([\d.]+) \|", stdout))
    kept, gathered = float(rows["N=2 stale, residuals kept on their ranks"]), float(rows["N=2 stale, residuals gathered whole"])
    unsplit = float(rows["N=2 stale, ControlNet whole on every rank"])
    assert float(rows["1 process, unmodified"]) == 0
    assert unsplit < kept < gathered  # the split ControlNet's halo rows and K/V, then its residuals' gathers
