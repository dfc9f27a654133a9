"""The metric code and an end-to-end run of `distrifx bench` on a tiny configuration (not its timings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from distrifx.metrics import psnr, ssim


def test_psnr_of_a_known_error():
    a = torch.full((1, 3, 8, 8), 0.5)
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-3)  # MSE 0.01 -> 20 dB
    assert psnr(a, a + 0.01) == pytest.approx(40.0, abs=1e-2)


def test_ssim_is_one_for_identical_images_and_lower_otherwise():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 32, 32, generator=g)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    assert ssim(torch.rand(1, 3, 32, 32, generator=g), a) < 0.2


def test_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 4))


def test_bench_runs_end_to_end(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "distrifx", "bench", "--model", "sd15", "--latent", "16", "--steps", "3",
           "--warmup-steps", "1", "--world-sizes", "2", "--modes", "stale", "naive", "--project", "4",
           "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=600, capture_output=True)
    results = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in results]
    assert labels == ["sd15 16x16 b1 N=1 eager", "sd15 16x16 b1 N=2 stale", "sd15 16x16 b1 N=2 naive",
                      "sd15 16x16 b1 N=4 stale (one rank timed alone)", "sd15 16x16 b1 N=4 naive (one rank timed alone)"]
    by_label = dict(zip(labels, results))
    stale = by_label["sd15 16x16 b1 N=2 stale"]
    assert stale["bytes_sent_per_step"] > 0 and stale["state_bytes"] > 0
    assert len(stale["per_rank"]) == 2 and stale["speedup"] > 0
    assert by_label["sd15 16x16 b1 N=2 naive"]["state_bytes"] == 0
    assert (out / "speedup.png").stat().st_size > 0 and (out / "breakdown.png").stat().st_size > 0
    assert "| config |" in (out / "results.md").read_text()
