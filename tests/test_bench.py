"""The metric code and an end-to-end run of `distrifx bench` on a tiny configuration (not its timings)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
import subprocess
import sys

import pytest
import torch

from distrifx.bench import BenchCase, Link, bench_rank, projected_step
from distrifx.errors import ConfigError
from distrifx.fidelity import FidelityCase
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


def test_rank_cores_gives_each_rank_its_own_cores_when_they_fit(monkeypatch):
    from distrifx.launch import rank_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7})
    assert [rank_cores(r, 2, 2) for r in range(2)] == [[4, 5], [6, 7]]
    assert rank_cores(3, 4, 1) == [7]
    assert rank_cores(0, 4, 2) is None  # 8 threads on 4 cores: left to the OS


def _measured(case, walls, wait_s=0.0, phases=None):
    """What ``bench.measure_case`` returns for ``case`` if every rank's steps took ``walls`` seconds."""
    steps = [{"wall_s": w, "wait_s": wait_s, "background_cpu_s": 0.0, "bytes_sent": 8, "phase": phase}
             for w, phase in zip(walls, phases or ["x"] * len(walls))]
    return [{"steps": steps, "state_bytes": 1, "build_s": 0.0, "peak_bytes": 1, "cores": [0],
             "exchanges": {}}] * case.world_size


def test_rounds_interleave_the_cases_and_pool_their_steady_steps(monkeypatch):
    """`--rounds`: a round runs every case once; a case's median is over its steady steps of all rounds."""
    from distrifx import bench

    calls = []
    walls = {"eager": iter([[9.0, 4.0, 4.0], [9.0, 6.0, 6.0]]), "stale": iter([[9.0, 2.0, 2.0], [9.0, 3.0, 3.0]])}

    def measure(case):
        calls.append(case.mode)
        return _measured(case, next(walls[case.mode]), wait_s=0.1)

    monkeypatch.setattr(bench, "measure_case", measure)
    cases = [bench.BenchCase(world_size=1, mode="eager", steps=3),
             bench.BenchCase(world_size=2, mode="stale", steps=3, warmup_steps=1)]
    eager, stale = bench.run_cases(cases, rounds=2, progress=False)
    assert calls == ["eager", "stale", "eager", "stale"]
    assert eager["rounds"] == 2 and eager["step_s"] == 5.0 and eager["step_range_s"] == [4.0, 6.0]
    assert eager["step_quartiles_s"] == [4.0, 6.0] and eager["peak_after_build"]
    assert stale["step_s"] == 2.5 and stale["speedup"] == 2.0 and stale["compute_s"] == pytest.approx(2.4)


@pytest.mark.timeout(900)  # a whole benchmark suite in subprocesses: three minutes on a quiet 2-core machine
def test_report_runs_every_section_end_to_end(tmp_path):
    """`distrifx report --suite tiny`: bench, fidelity, VAE memory and profile run; the page is rendered from them."""
    cmd = [sys.executable, "-m", "distrifx", "report", "--suite", "tiny", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=900, capture_output=True)
    bench = json.loads((tmp_path / "bench" / "sd15-16" / "results.json").read_text())
    assert bench["command"].startswith("distrifx bench --model sd15") and "no GPU" in bench["machine"]
    labels = [r["label"] for r in bench["results"]]
    narrow = "sd15 16x16 b1 N=2 stale bfloat16 exchanges"
    assert labels == ["sd15 16x16 b1 N=1 eager", "sd15 16x16 b1 N=2 stale", narrow,
                      "sd15 16x16 b1 N=2 stale (one rank timed alone)", f"{narrow} (one rank timed alone)",
                      "sd15 16x16 b1 N=2 stale (no transport)", "sd15 16x16 b1 N=2 copies",
                      "sd15 16x16 b1 N=1 eager on a 8x16 patch", "sd15 16x16 b1 N=2 copies on a 8x16 patch",
                      "sd15 16x16 b1 N=2 stale (projected over 1 GB/s, 15 us)",
                      f"{narrow} (projected over 1 GB/s, 15 us)"]
    by_label = dict(zip(labels, bench["results"]))
    stale = by_label["sd15 16x16 b1 N=2 stale"]
    assert stale["bytes_sent_per_step"] > 0 and stale["state_bytes"] > 0
    assert len(stale["per_rank"]) == 2 and stale["speedup"] > 0 and stale["rounds"] == 1
    # bfloat16 halo rows and K/V: about half the bytes and stale buffers (GroupNorm statistics stay float32)
    for key in ("bytes_sent_per_step", "state_bytes"):
        assert 0.45 * stale[key] < by_label[narrow][key] < 0.55 * stale[key], key
    if len(os.sched_getaffinity(0)) >= 2:  # each rank bound to its own core
        assert [r["cores"] for r in stale["per_rank"]] == [[c] for c in sorted(os.sched_getaffinity(0))[:2]]
    alone = by_label["sd15 16x16 b1 N=2 stale (one rank timed alone)"]
    assert len(alone["per_rank"]) == 1
    projected = by_label["sd15 16x16 b1 N=2 stale (projected over 1 GB/s, 15 us)"]
    assert projected["compute_s"] == alone["step_s"] and projected["step_s"] > alone["step_s"]
    copies = by_label["sd15 16x16 b1 N=2 copies"]  # the unmodified model on both ranks at once
    assert len(copies["per_rank"]) == 2 and copies["bytes_sent_per_step"] == 0 and copies["state_bytes"] == 0
    assert copies["speedup"] == pytest.approx(2 * by_label["sd15 16x16 b1 N=1 eager"]["step_s"] / copies["step_s"])
    assert (tmp_path / "bench" / "sd15-16" / "speedup.png").stat().st_size > 0

    vae = json.loads((tmp_path / "bench" / "vae-memory" / "results.json").read_text())["results"]
    assert [r["world_size"] for r in vae] == [1, 2] and all(r["decode_bytes"] > 0 for r in vae)

    profile = json.loads((tmp_path / "bench" / "profile" / "results.json").read_text())["results"]
    levels = {r["op"].rsplit(" ", 1)[1] for r in profile["rows"]
              if " @ width " in r["op"] and r["eager_s"] > 0 and r["rank_s"] > 0}
    assert {"16", "8"} <= levels  # the same convolutions found in both graphs, by level
    assert profile["rank_s"] == pytest.approx(sum(r["rank_s"] for r in profile["rows"])) and profile["rank_s"] > 0
    assert profile["rank_ops"] > profile["eager_ops"] > 100  # the rank adds exchanges and GroupNorm arithmetic

    fidelity = json.loads((tmp_path / "bench" / "fidelity" / "results.json").read_text())["results"]
    psnr_db = {r["label"]: r["psnr_db"] for r in fidelity}
    assert psnr_db["N=2 sync"] > 60 > psnr_db["N=2 stale, warm-up 1, GN corrected"] > psnr_db["N=2 naive"]

    page = (tmp_path / "benchmarks.md").read_text()
    for expected in ("## Speed: sd15-16", "| sd15 16x16 b1 N=2 stale |", "One stale rank timed alone",
                     "two stale ranks run together with collectives that return at once", "of CPU per step with gloo",
                     "N=2 copies (the unmodified model on each of 2 ranks at once, no collectives): ",
                     "N=2 copies on a patch (the unmodified model on one rank's 8 rows, on each of 2 ranks at once)",
                     "Rows marked *projected* are projections", "## Bytes per step, by exchange", "| kv | 8 |",
                     "## Fidelity on the trained default model: 3 DDIM steps, 32x32 pixels",
                     "patches of 16 rows at N=2.",
                     "| N=2 naive |", "| N=2 sync |", "N=2 sync (every exchange fresh", "target +20 dB", "## VAE decoder memory", "No GPU was available",
                     "bfloat16 stale exchanges: ", "N=2, bfloat16 stale exchanges (N=2 stale, warm-up 1, GN corrected, "
                     "bfloat16 exchanges): ", "N=2, stale values extrapolated by 0.5 (N=2 stale, warm-up 1, GN "
                     "corrected, extrapolated 0.5): ",
                     "N=2, halo exchanges kept synchronous (N=2 stale, warm-up 1, GN corrected, fresh halo): ",
                     "N=2, stale values extrapolated by 0.5 (N=2 stale, warm-up 1, GN corrected, extrapolated 0.5, "
                     "fresh halo): ",
                     "## Where one rank's step goes: profile", "| **step** |", "Under the profiler one rank's step",
                     "aten ops per step against the unmodified model's",
                     f"distrifx fidelity --world-sizes 2 --warmups 1 --gn-variants corrected --stale-dtypes none "
                     f"bfloat16 --extrapolations 0 0.5 --fresh-sets none halo --seeds 0 --size 32 --steps 3 --out "
                     f"{tmp_path / 'bench' / 'fidelity'}"):
        assert expected in page, expected

    stamps = {p: p.stat().st_mtime for p in (tmp_path / "bench").glob("*/results.json")}
    subprocess.run([*cmd, "--reuse"], check=True, timeout=300, capture_output=True)
    assert {p: p.stat().st_mtime for p in (tmp_path / "bench").glob("*/results.json")} == stamps  # nothing reran
    assert (tmp_path / "benchmarks.md").read_text() == page


def test_the_published_page_is_what_its_results_render(monkeypatch):
    """docs/benchmarks.md is exactly `distrifx report --out docs --reuse` of the committed results: no hand
    edits, and a change to the report's code that alters the page must come with the re-rendered page."""
    from pathlib import Path

    from distrifx.report import render

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    page = render(Path("docs"))
    assert page == (root / "docs" / "benchmarks.md").read_text()
    assert "- Where one rank alone loses against 2x, op by op: section profile-sd15-half-64." in page


def test_the_speed_target_is_judged_on_each_machine_by_its_section_with_the_most_rounds():
    from distrifx.report import _target_sections

    def record(model, height, rounds=None, batch=1, machine="amd"):
        result = {"case": {"model": model, "height": height, "batch": batch}, **({"rounds": rounds} if rounds else {})}
        return {"results": [result], "machine": machine}

    records = {"old": record("sd15-half", 64), "repeated": record("sd15-half", 64, 3),
               "other": record("sd15-half", 128, 5), "guidance": record("sd15-half", 64, 6, batch=2),
               "xeon": record("sd15-half", 64, 2, machine="xeon"), "xeon-more": record("sd15-half", 64, 4, machine="xeon")}
    assert _target_sections(records, list(records)) == {"amd": "repeated", "xeon": "xeon-more"}
    assert _target_sections(records, ["old", "other", "xeon"]) == {"amd": "old", "xeon": "xeon"}  # no rounds: one
    assert _target_sections(records, ["other", "guidance"]) == {}  # the target is batch 1


def test_report_refuses_an_unknown_section(tmp_path):
    from distrifx.errors import ConfigError
    from distrifx.report import run_suite

    with pytest.raises(ConfigError, match=r"no section \['speed'\] in suite 'tiny'; its sections are"):
        run_suite(tmp_path, "tiny", sections=["speed"])


def test_projected_step_hides_overlapped_exchanges_but_not_blocking_ones():
    link = Link(gbps=1.0, latency_us=0.0)  # 1e9 bytes per second
    light = {"blocking": [1, 500_000_000], "overlapped": [3, 1_000_000_000]}
    assert projected_step(2.0, light, link) == pytest.approx(2.5)  # 0.5 s blocked; the stale second hides
    heavy = {"blocking": [1, 500_000_000], "overlapped": [3, 4_000_000_000]}
    assert projected_step(2.0, heavy, link) == pytest.approx(4.5)  # the link cannot keep up: it sets the pace
    assert Link(1.0, latency_us=10.0).seconds(0, 100) == pytest.approx(1e-3)


def test_warm_up_steps_get_their_own_median_and_price_a_generation():
    """Stale mode's warm-up steps after the first call: their median (slowest rank) beside the stale steps';
    the report combines both into 20- and 50-step generations per warm-up."""
    from distrifx.bench import _summarize
    from distrifx.report import _warmup_findings

    case = BenchCase(world_size=2, mode="stale", steps=6, warmup_steps=3)
    phases = ["warmup"] * 3 + ["stale"] * 3
    fast, slow = (_measured(case, walls, phases=phases)[0] for walls in ([9, 3, 3, 2, 2, 2], [9, 3, 5, 2, 2, 2]))
    stale = _summarize(case, [[fast, slow]])
    assert stale["warmup_step_s"] == 4.0 and stale["step_s"] == 2.0  # the slow rank's warm-up: median of 3 and 5
    eager_case = BenchCase(world_size=1, mode="eager", steps=6)
    eager = _summarize(eager_case, [_measured(eager_case, [9, 4, 4, 4, 4, 4])])
    assert eager["warmup_step_s"] is None
    step_times, twenty, fifty = _warmup_findings([eager, stale])
    assert "took 4.000 s against its stale steps' 2.000 s (+100%" in step_times
    # W warm-up steps of 4 s and 20 - W stale ones of 2 s, against 20 unmodified steps of 4 s
    assert "A 20-step generation" in twenty and "the unmodified model's takes 80.0 s" in twenty
    assert "W = 4: 48.0 s (1.67x, +0%), 5: 50.0 s (1.60x, +4%), 6: 52.0 s (1.54x, +8%), 8: 56.0 s (1.43x, +17%)" in twenty
    assert "A 50-step generation" in fifty and "W = 4: 108.0 s (1.85x, +0%), 8: 116.0 s (1.72x, +7%), 12: 124.0 s" in fifty
    assert _warmup_findings([eager, {**stale, "warmup_step_s": None}]) == []


def test_one_rank_alone_in_half_precision_sends_what_its_plan_says():
    """A projected case runs in this process; the plan's exchanges add up to the bytes the rank counted."""
    from distrifx.bench import _projection, _summarize

    case = BenchCase(model="sd15", height=16, width=16, world_size=4, mode="stale", projected=True, steps=3,
                     warmup_steps=1, dtype="bfloat16")
    rank = bench_rank(case)
    stale = rank["exchanges"]["stale"]
    assert stale["blocking"][0] == 1 and stale["overlapped"][0] > 0  # only the output gather blocks
    assert stale["blocking"][1] + stale["overlapped"][1] == rank["steps"][-1]["bytes_sent"]
    assert rank["exchanges"]["warmup"]["overlapped"] == [0, 0]
    result = _projection(_summarize(case, [[rank]]), Link(1.0))
    assert result["label"] == "sd15 16x16 b1 N=4 stale (projected over 1 GB/s, 15 us)"
    assert result["step_s"] == pytest.approx(projected_step(result["compute_s"], stale, Link(1.0)))


def test_fresh_halo_exchanges_block_and_keep_no_stale_buffers():
    common = dict(model="sd15", height=16, width=16, world_size=2, mode="stale", projected=True, steps=3,
                  warmup_steps=1)
    default, fresh = (bench_rank(BenchCase(**common, fresh=kinds)) for kinds in ((), ("halo",)))
    before, after = default["exchanges"]["stale"], fresh["exchanges"]["stale"]
    assert before["blocking"][0] == 1 < after["blocking"][0]  # the output gather, then each halo exchange too
    sent = [exchanges["blocking"][1] + exchanges["overlapped"][1] for exchanges in (before, after)]
    assert sent[0] == sent[1] > 0  # the same bytes, some of them now waited for
    assert 0 < fresh["state_bytes"] < default["state_bytes"]
    assert BenchCase(**common, fresh=("halo",)).label == "sd15 16x16 b1 N=2 stale fresh halo (one rank timed alone)"


def test_bench_sweeps_models_and_latents_each_against_its_own_baseline(tmp_path, monkeypatch):
    """`--model a b --latent x y`: every pair gets its eager baseline, and speedups divide by that one."""
    from distrifx import bench
    from distrifx.cli import main

    def measure(case):
        wall = case.height * (2.0 if case.model == "sd15" else 3.0) / (1 if case.mode == "eager" else 2)
        return _measured(case, [wall] * 3)

    monkeypatch.setattr(bench, "measure_case", measure)
    main(["bench", "--model", "sd15", "sdxl", "--latent", "8", "16", "--modes", "naive", "--steps", "3",
          "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [(r["case"]["model"], r["case"]["height"], r["case"]["mode"]) for r in results] == [
        (m, h, mode) for m in ("sd15", "sdxl") for h in (8, 16) for mode in ("eager", "naive")]
    assert [r["speedup"] for r in results] == [1.0, 2.0] * 4
    with pytest.raises(SystemExit):
        main(["bench", "--model", "sd15", "nosuch"])


def test_each_backend_is_timed_against_its_own_model_and_the_report_sets_compiled_against_eager(tmp_path, monkeypatch):
    """`--backend eager inductor`: both in the same rounds, each speedup over the model its backend ran;
    the report adds what compiling alone buys and the compiled ranks' speed over the eager model."""
    from distrifx import bench
    from distrifx.cli import main
    from distrifx.report import _speed_section

    walls = {("eager", "eager", False): 4.0, ("stale", "eager", False): 2.0, ("stale", "eager", True): 1.6,
             ("eager", "inductor", False): 5.0, ("stale", "inductor", False): 2.5, ("stale", "inductor", True): 2.0}
    monkeypatch.setattr(bench, "measure_case", lambda case: _measured(
        case, [walls[case.mode, case.backend, case.projected]] * 6))
    main(["bench", "--model", "sd15-half", "--latent", "64", "--modes", "stale", "--steps", "6", "--project", "2",
          "--backend", "eager", "inductor", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [(r["label"], r["speedup"]) for r in results] == [
        ("sd15-half 64x64 b1 N=1 eager", 1.0), ("sd15-half 64x64 b1 N=2 stale", 2.0),
        ("sd15-half 64x64 b1 N=2 stale (one rank timed alone)", 2.5),
        ("sd15-half 64x64 b1 N=1 eager [inductor]", 1.0), ("sd15-half 64x64 b1 N=2 stale [inductor]", 2.0),
        ("sd15-half 64x64 b1 N=2 stale [inductor] (one rank timed alone)", 2.5)]
    section = _speed_section("both", {"results": results, "command": "distrifx bench", "cpu_count": 2}, None)
    assert ("Rows marked [inductor] are compiled: their baseline is "
            "`torch.compile(unet, backend='inductor')` with inductor config `{'freezing': True}` on the CPU") in section
    assert section.count("Their peak memory includes compiling in the process") == 1
    assert "- eager: N=2 stale: 2.00x over one rank" in section
    assert "- inductor: N=2 stale [inductor]: 2.00x over one rank" in section
    assert ("- inductor against eager in the same rounds: the compiled model takes 5.000 s per step, the eager model "
            "4.000 s (0.80x from compiling alone); inductor's 2-rank stale step of 2.500 s is 1.60x the eager "
            "model's speed; one stale rank timed alone takes 2.000 s compiled against 1.600 s eager (0.80x).") in section


def test_a_guidance_batch_is_timed_patch_parallel_and_cfg_split_and_does_not_judge_the_target(tmp_path, monkeypatch):
    """`--batch 2 --cfg-parallel`: the whole batch patch-parallel and its halves on two rank groups, each against
    the same batch-2 model; the report sets the split against the patch-parallel run and leaves the (batch 1)
    speedup target alone."""
    from distrifx import bench
    from distrifx.cli import main
    from distrifx.report import _speed_section

    seen = []

    def measure(case):
        seen.append(case)
        return _measured(case, [{"eager": 4.0, "stale": 2.5 if case.cfg_parallel else 2.0}[case.mode]] * 6)

    monkeypatch.setattr(bench, "measure_case", measure)
    main(["bench", "--model", "sd15-half", "--latent", "64", "--batch", "2", "--modes", "stale", "--steps", "6",
          "--cfg-parallel", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [(r["label"], r["speedup"]) for r in results] == [
        ("sd15-half 64x64 b2 N=1 eager", 1.0), ("sd15-half 64x64 b2 N=2 stale", 2.0),
        ("sd15-half 64x64 b2 N=2 stale CFG split", 1.6)]
    assert [c.cfg_parallel for c in seen] == [False, False, True]
    section = _speed_section("guidance", {"results": results, "command": "distrifx bench", "cpu_count": 2},
                             target=None)
    assert "- N=2 stale: 2.00x over one rank" in section
    assert ("- N=2 CFG split (each half of the batch of 2 on 1 rank(s), patch-parallel over them; one rank per half: "
            "nothing is stale, the output is the unmodified model's up to rounding): 1.60x, "
            "0.0 MiB sent per rank per step, against 2.00x and 0.0 MiB with the whole batch patch-parallel over "
            "all 2.") in section
    assert "Target" not in section and "judged" not in section
    for bad in (dict(batch=1), dict(batch=2, world_size=3), dict(batch=2, projected=True), dict(batch=2, mode="eager")):
        with pytest.raises(ConfigError, match="CFG split puts the two halves of an even batch"):
            BenchCase(**{"world_size": 2, "mode": "stale", **bad}, cfg_parallel=True)
    # on the command line: the message, without a traceback
    with pytest.raises(SystemExit, match=r"^distrifx bench: bench case 'sd15-half 64x64 b1 N=2 stale CFG split'"):
        main(["bench", "--modes", "stale", "--cfg-parallel", "--out", str(tmp_path)])


def test_gpu_cases_run_in_one_process_and_dtypes_are_checked():
    BenchCase(device="cuda", world_size=8, projected=True)
    with pytest.raises(ConfigError, match="one rank alone"):
        BenchCase(device="cuda", world_size=2, mode="stale")
    with pytest.raises(ConfigError, match="dtype 'half' is not one of"):
        BenchCase(dtype="half")


def test_a_compiled_bench_compiles_the_baseline_and_the_ranks_alike_and_skips_compiling_calls():
    from dataclasses import asdict, replace

    from torch._dynamo.eval_frame import OptimizedModule

    from distrifx.backends import is_segment
    from distrifx.backends.torch_compile import CPU_INDUCTOR_OPTIONS, InductorSegment
    from distrifx.bench import baseline_key, build_case

    case = BenchCase(model="sd15", height=16, width=16, steps=3, warmup_steps=1, projected=True, backend="inductor")
    _, pmodel, sample, kwargs, timesteps = build_case(case)
    graph = pmodel.program(sample, timesteps[0], **kwargs).graphs["stale"]  # lazy: nothing compiles until called
    segments = [graph.get_submodule(str(n.target)) for n in graph.graph.nodes if is_segment(n)]
    baseline = replace(case, mode="eager", world_size=1, projected=False)
    model = build_case(baseline)[0]
    assert isinstance(model.compiled, OptimizedModule) and model.options == CPU_INDUCTOR_OPTIONS
    assert segments and all(isinstance(s, InductorSegment) and s.freeze for s in segments)  # frozen alike
    key = asdict(baseline)
    assert baseline_key(key) != baseline_key({**key, "backend": "eager"})  # compared with the compiled model
    assert case.label == "sd15 16x16 b1 N=2 stale [inductor] (one rank timed alone)"
    assert (case.first_steady_step, replace(case, backend="eager").first_steady_step) == (2, 1)
    assert (baseline.first_steady_step, replace(case, mode="sync").first_steady_step) == (1, 1)
    with pytest.raises(ConfigError, match="backend 'tensorrt' is not one of"):
        BenchCase(backend="tensorrt")


def test_bench_refuses_cuda_without_a_gpu_and_links_without_projections(monkeypatch):
    from distrifx.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="torch sees no CUDA device"):
        main(["bench", "--device", "cuda", "--world-sizes", "--project", "2"])
    with pytest.raises(SystemExit, match="--link-gbps projects one-rank-alone timings"):
        main(["bench", "--link-gbps", "100"])


def test_gpu_sections_are_skipped_without_a_gpu_and_the_page_says_how_to_run_them(tmp_path, monkeypatch, capsys):
    from distrifx.report import _gpu_section, run_suite

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run_suite(tmp_path, "docs", sections=["gpu-sdxl-1024"])
    assert "skipped section gpu-sdxl-1024: it needs a GPU" in capsys.readouterr().out
    assert not (tmp_path / "bench").exists()
    sections = "gpu-sdxl-1024 gpu-sdxl-2048 gpu-sdxl-3840 gpu-sdxl-1024-inductor"
    assert f"--sections {sections}` times full SDXL" in _gpu_section({}, "docs")


def test_projected_gpu_speedups_stand_beside_the_published_ones():
    from distrifx.report import _published_comparison

    row = {"case": {"model": "sdxl-full", "height": 480, "width": 480, "world_size": 8, "mode": "stale"},
           "link": {"gbps": 250.0, "latency_us": 15.0}, "speedup": 5.5}
    assert _published_comparison([row]) == [
        "8 GPUs at 3840x3840 px over 250 GB/s: projected 5.50x; DistriFusion measured 6.1x on A100s."]
    measured = {k: v for k, v in row.items() if k != "link"}
    assert _published_comparison([measured, {**row, "case": {**row["case"], "height": 256}}]) == []


def _case_rows(case: FidelityCase, *psnr_db: float) -> list[dict]:
    """Rows of ``case`` as run_fidelity writes them, one per seed 0, 1, ... with these PSNRs."""
    return [{**asdict(case), "label": case.label, "seed": seed, "psnr_db": value, "ssim": 0.5 + 0.25 * seed}
            for seed, value in enumerate(psnr_db)]


def _fidelity_rows() -> list[dict]:
    """Two seeds of N=2: naive, default stale and GN sync; one identical image (infinite PSNR)."""
    return (_case_rows(FidelityCase(2, "naive"), 10.0, 14.0) + _case_rows(FidelityCase(2, "stale"), 32.0, 30.0)
            + _case_rows(FidelityCase(2, "stale", gn_variant="sync"), float("inf"), 36.0))


def test_fidelity_seeds_spread_over_processes_give_the_rows_and_images_of_one_process():
    """``jobs=2``: the same rows in the same order and the same images, to within what the thread count
    changes: the workers run their ranks at half this process's threads, which rounds differently, and a
    simulated rank with more than one thread is not bit-reproducible (both up to 2e-3 in a pixel here)."""
    from distrifx.default_model import load_default_pipeline
    from distrifx.fidelity import run_fidelity

    cases = [FidelityCase(2, "stale", warmup_steps=1)]
    runs = [run_fidelity(load_default_pipeline, cases, seeds=(0, 1), size=32, steps=2, jobs=jobs) for jobs in (1, 2)]
    (rows, images), (spread_rows, spread_images) = runs
    key = lambda r: (r["label"], r["seed"], r["prompt"])  # noqa: E731
    assert [key(r) for r in spread_rows] == [key(r) for r in rows] and len(rows) == 2
    assert [r["psnr_db"] for r in spread_rows] == pytest.approx([r["psnr_db"] for r in rows], abs=0.05)
    assert list(spread_images) == list(images) == ["reference", cases[0].label]
    for label, per_seed in images.items():
        assert len(spread_images[label]) == 2
        for image, spread in zip(per_seed, spread_images[label]):
            torch.testing.assert_close(spread, image, atol=1e-2, rtol=0)


def test_fidelity_captures_the_model_once_for_every_case_and_rank_of_a_seed(monkeypatch):
    """One export per seed: the reference's UNet runs on every rank of every case (and the naive case
    against the stale one still differs: each case builds its own rank graphs)."""
    import distrifx.capture.export as capture_export
    from distrifx.default_model import load_default_pipeline
    from distrifx.fidelity import run_fidelity

    exported, unets = [], []
    real_export = capture_export._export
    monkeypatch.setattr(capture_export, "_export", lambda *a: exported.append(a[0]) or real_export(*a))

    def load():
        pipe = load_default_pipeline()
        unets.append(pipe.unet)
        return pipe

    cases = [FidelityCase(2, "stale", warmup_steps=1), FidelityCase(2, "naive")]
    rows, _ = run_fidelity(load, cases, seeds=(0,), size=32, steps=2)
    # counted among this test's models: the reference's UNet, once
    assert [unets.index(m) for m in exported if any(m is u for u in unets)] == [0]
    assert rows[0]["psnr_db"] != rows[1]["psnr_db"]


def test_fidelity_table_gives_mean_and_spread_over_seeds():
    from distrifx.fidelity import fidelity_table

    lines = fidelity_table(_fidelity_rows()).splitlines()
    assert lines[2] == "| N=2 naive | 12.0 [10.0, 14.0] | 0.625 | 2 |"
    assert lines[4] == "| N=2 stale, warm-up 4, GN sync | 67.5 [36.0, 99.0] | 0.625 | 2 |"  # identical: 99 dB


def test_fidelity_findings_pair_each_seed_with_its_naive_image():
    from distrifx.report import _fidelity_findings

    default, best = _fidelity_findings(_fidelity_rows())
    assert default.startswith("N=2, default stale configuration (N=2 stale, warm-up 4, GN corrected): 31.0 dB "
                              "against naive 12.0 dB, +19.0 dB, standard error 3.0 dB over seeds (per seed +16.0 to "
                              "+22.0; +20 or more on 1 of 2 seeds)")
    assert default.endswith("**not met**.")
    assert "(N=2 stale, warm-up 4, GN sync)" in best and "per seed +22.0 to +89.0" in best
    assert best.endswith("**met**.")


def test_fidelity_findings_set_sync_mode_apart_as_the_floor_of_arithmetic_differences():
    from distrifx.report import _fidelity_findings

    exact = _case_rows(FidelityCase(2, "sync"), 80.0, float("inf"))
    floor, default, best = _fidelity_findings(_fidelity_rows() + exact)
    assert floor.startswith("N=2 sync (every exchange fresh: exact but for the order of floating-point sums): "
                            "89.5 dB [80.0, 99.0]")
    assert "(N=2 stale, warm-up 4, GN sync)" in best  # sync mode is not a stale configuration


def test_fidelity_findings_name_the_best_fully_asynchronous_configuration():
    from distrifx.report import _fidelity_findings

    longer = _case_rows(FidelityCase(2, "stale", 8), 34.0, 34.0)
    halo = _case_rows(FidelityCase(2, "stale", fresh=("halo",)), 36.0, 36.0)  # waits for halo rows: not asynchronous
    findings = _fidelity_findings(_fidelity_rows() + longer + halo)
    assert [f.split(" (N=2")[0] for f in findings] == [
        "N=2, default stale configuration", "N=2, best stale configuration",
        "N=2, best fully asynchronous stale configuration", "N=2, 8 warm-up steps",
        "N=2, halo exchanges kept synchronous"]
    assert "(N=2 stale, warm-up 8, GN corrected): 34.0 dB against naive 12.0 dB, +22.0 dB" in findings[2]
    assert findings[3] == ("N=2, 8 warm-up steps (N=2 stale, warm-up 8, GN corrected): 34.0 dB, +3.00 dB against "
                           "4 warm-up steps (standard error 1.00 dB over seeds; better on 2 of 2); +22.0 dB over "
                           "naive patches.")
    assert findings[4] == ("N=2, halo exchanges kept synchronous (N=2 stale, warm-up 4, GN corrected, fresh halo): "
                           "36.0 dB, +5.00 dB against the last step's values (standard error 1.00 dB over seeds; "
                           "better on 2 of 2); +24.0 dB over naive patches.")


def test_fidelity_findings_compare_an_extrapolated_configuration_with_the_same_one_without():
    from distrifx.report import _fidelity_findings, _fidelity_section

    ahead = _case_rows(FidelityCase(2, "stale", extrapolate=0.5), 35.0, 29.0)
    findings = _fidelity_findings(_fidelity_rows() + ahead)
    assert findings[-1] == ("N=2, stale values extrapolated by 0.5 (N=2 stale, warm-up 4, GN corrected, extrapolated "
                            "0.5): 32.0 dB, +1.00 dB against the last step's values (standard error 2.00 dB over "
                            "seeds; better on 1 of 2); +20.0 dB over naive patches.")
    section = _fidelity_section("f", {"command": "distrifx fidelity",
                                      "results": [{**r, "size": 32, "steps": 20} for r in _fidelity_rows() + ahead]})
    assert section.startswith("## Fidelity on the trained default model: 20 DDIM steps, 32x32 pixels, extrapolated "
                              "stale values\n")


def test_fidelity_findings_pair_a_combined_configuration_with_each_option_left_out():
    from distrifx.report import _fidelity_findings, _fidelity_section

    halo = _case_rows(FidelityCase(2, "stale", gn_variant="sync", fresh=("halo",)), 40.0, 40.0)
    both = _case_rows(FidelityCase(2, "stale", gn_variant="sync", extrapolate=0.5, fresh=("halo",)), 44.0, 42.0)
    rows = _fidelity_rows() + halo + both
    paired = [f for f in _fidelity_findings(rows) if "extrapolated by" in f or "kept synchronous" in f]
    assert paired == [
        "N=2, halo exchanges kept synchronous (N=2 stale, warm-up 4, GN sync, fresh halo): 40.0 dB, -27.50 dB against "
        "the last step's values (standard error 31.50 dB over seeds; better on 1 of 2); +28.0 dB over naive patches.",
        # GN sync's seed 0 counts 99
        "N=2, stale values extrapolated by 0.5 (N=2 stale, warm-up 4, GN sync, extrapolated 0.5, fresh halo): 43.0 dB, "
        "+3.00 dB against the last step's values (standard error 1.00 dB over seeds; better on 2 of 2); +31.0 dB over "
        "naive patches."]
    section = _fidelity_section("f", {"command": "distrifx fidelity",
                                      "results": [{**r, "size": 32, "steps": 20} for r in rows]})
    assert section.startswith("## Fidelity on the trained default model: 20 DDIM steps, 32x32 pixels, exchanges "
                              "kept synchronous and extrapolated stale values (GN sync)\n")


def test_a_warm_up_sweep_of_the_plain_stale_configuration_gets_a_curve(tmp_path):
    from distrifx.fidelity import warmup_figure, warmup_sweep
    from distrifx.report import _fidelity_section

    other = _case_rows(FidelityCase(2, "stale", 6, gn_variant="sync"), 40.0, 40.0)  # not the plain configuration
    assert warmup_sweep(_fidelity_rows() + other) == []
    longer = _case_rows(FidelityCase(2, "stale", 8), 34.0, 34.0) + _case_rows(FidelityCase(2, "stale", 1), 20.0, 22.0)
    rows = [{**r, "size": 32, "steps": 20} for r in _fidelity_rows() + other + longer]
    assert warmup_sweep(rows) == [1, 4, 8]
    warmup_figure(rows, tmp_path / "warmups.png")
    assert (tmp_path / "warmups.png").stat().st_size > 0
    section = _fidelity_section("f", {"command": "distrifx fidelity", "results": rows})
    assert "![PSNR over naive patches by warm-up](bench/f/warmups.png)" in section
    assert "![PSNR over naive patches" not in _fidelity_section(
        "f", {"command": "distrifx fidelity", "results": [{**r, "size": 32, "steps": 20} for r in _fidelity_rows()]})


def test_fidelity_sections_name_the_size_and_the_patch_rows():
    from distrifx.report import _fidelity_section

    def section(size: int) -> str:
        rows = [{**row, "size": size, "steps": 20} for row in _fidelity_rows()]
        return _fidelity_section("f", {"command": "distrifx fidelity", "results": rows})

    trained, larger = section(32), section(64)
    assert trained.startswith("## Fidelity on the trained default model: 20 DDIM steps, 32x32 pixels\n")
    longer = _fidelity_section("f", {"command": "distrifx fidelity", "results": [
        {**row, "size": 32, "steps": 20} for row in _fidelity_rows() + _case_rows(FidelityCase(2, "stale", 6), 33., 31.)]})
    assert longer.startswith("## Fidelity on the trained default model: 20 DDIM steps, 32x32 pixels, longer warm-ups\n")
    assert "patches of 16 rows at N=2." in trained and "It was trained at" not in trained
    assert "64x64 pixels, patches of 32 rows at N=2. It was trained at 32x32: at 64x64 its images leave" in larger


def _speed_result(mode, world, step_s, projected=False, transport=True):
    """A summarized bench result of the fields the speed findings read."""
    case = {"mode": mode, "world_size": world, "projected": projected, "transport": transport,
            "gn_variant": "corrected", "threads": 1, "height": 64, "batch": 1}
    return {"case": case, "label": f"m 64x64 b1 N={world} {mode}", "step_s": step_s, "compute_s": step_s,
            "step_range_s": [step_s, step_s], "exposed_comm_s": 0.0, "exposed_comm_frac": 0.0,
            "bytes_sent_per_step": 0, "speedup": 5.0 / step_s}


@pytest.mark.parametrize("together_s,expected", [(2.6, "+4% over one rank alone: the two processes share two cores"),
                                                 (2.4, "-4% over one rank alone: no cost of sharing the cores")])
def test_where_the_rest_goes_explains_a_slowdown_only_when_there_is_one(together_s, expected):
    from distrifx.report import _speed_findings

    results = [_speed_result("eager", 1, 5.0), _speed_result("stale", 2, 2.7),
               _speed_result("stale", 2, 2.5, projected=True), _speed_result("stale", 2, together_s, transport=False)]
    (finding,) = [f for f in _speed_findings(results, 2) if f.startswith("Where the rest goes")]
    assert expected in finding


@pytest.mark.parametrize("alone_s,expected", [
    (2.5, "2.00x speedup over the unmodified model: the bound on this machine without transport"),
    (2.8, "1.79x speedup over the unmodified model: slower than the two ranks together (2.700 s), so in this run "
          "the noise exceeds")])
def test_one_rank_alone_is_called_a_bound_only_when_it_is_one(alone_s, expected):
    from distrifx.report import _speed_findings

    results = [_speed_result("eager", 1, 5.0), _speed_result("stale", 2, 2.7),
               _speed_result("stale", 2, alone_s, projected=True)]
    (finding,) = [f for f in _speed_findings(results, 2) if f.startswith("One stale rank timed alone")]
    assert expected in finding


def test_noise_is_the_middle_half_of_the_steps_where_the_results_hold_it():
    from distrifx.report import _speed_findings

    results = [_speed_result("eager", 1, 5.0), _speed_result("stale", 2, 2.5)]
    for r in results:
        r["step_range_s"] = [r["step_s"], 3 * r["step_s"]]  # one step slowed by the machine
    (old,) = [f for f in _speed_findings(results, 2) if f.startswith("Noise")]
    assert "spread by up to 200% of their median (the single-rank baseline: 5.000 to 15.000 s), fastest to slowest" in old
    for r in results:
        r["step_quartiles_s"] = [0.95 * r["step_s"], 1.05 * r["step_s"]]
    (new,) = [f for f in _speed_findings(results, 2) if f.startswith("Noise")]
    assert "middle half of a configuration's steady steps spans up to 10% of their median" in new
    assert "(the single-rank baseline: 4.750 to 5.250 s)" in new


def test_gpu_peak_memory_measured_with_the_build_is_flagged():
    from distrifx.report import _speed_findings

    results = [_speed_result("eager", 1, 5.0)]
    results[0]["case"].update(device="cuda", dtype="float16")
    flagged = "Peak memory here includes building the model in float32"
    assert any(f.startswith(flagged) for f in _speed_findings(results, 2))
    results[0]["peak_after_build"] = True
    assert not any(f.startswith(flagged) for f in _speed_findings(results, 2))


def test_peak_memory_restarts_after_a_reset():
    from distrifx.bench import peak_memory, reset_peak_memory, rss_bytes

    scratch = torch.ones(64 * 2**20 // 4)  # 64 MiB, then freed: a peak before the reset
    del scratch
    before = peak_memory("cpu")
    reset_peak_memory("cpu")
    after = peak_memory("cpu")
    assert after < before - 32 * 2**20
    assert after >= rss_bytes() - 2**20


def test_a_bench_case_needs_a_step_to_time():
    with pytest.raises(ConfigError, match=r"4 steps leave none to time after the first 4 .* pass --steps 5 or more"):
        BenchCase(mode="stale", steps=4, warmup_steps=4)
    BenchCase(mode="stale", steps=5, warmup_steps=4)


def test_one_rank_alone_without_ranks_run_together_is_a_bound_without_communication():
    """A section of one-rank-alone rows only (a GPU's, a dispatch-bound model's) still reports the rank against
    the model, and does not blame transport or shared cores it never measured."""
    from distrifx.report import _speed_findings

    results = [_speed_result("eager", 1, 0.11), _speed_result("stale", 2, 0.124, projected=True)]
    (finding,) = [f for f in _speed_findings(results, 2) if f.startswith("One stale rank timed alone")]
    assert "0.124 s, a 0.89x speedup over the unmodified model: a bound that leaves communication out" in finding
    assert "sharing the cores" not in finding


def test_copies_measure_the_machine_ceiling_and_the_target_is_set_against_it(monkeypatch):
    """N copies of the unmodified model at once do N steps per step time: N x the baseline's rate is what a
    perfect split could reach; the findings and the target's verdict say how much of it stale mode reaches."""
    from distrifx import bench
    from distrifx.report import _speed_findings, _target_lines

    walls = {(64, "eager"): [9.0, 4.0, 4.0], (64, "copies"): [9.0, 4.4, 4.4], (64, "stale"): [9.0, 2.5, 2.5],
             (32, "eager"): [9.0, 2.0, 2.0], (32, "copies"): [9.0, 2.2, 2.2], (32, "stale"): [9.0, 1.0, 1.0]}
    monkeypatch.setattr(bench, "measure_case", lambda case: _measured(case, walls[case.height, case.mode]))
    cases = [bench.BenchCase(model="sd15-half", height=h, width=h, world_size=n, mode=mode, steps=3, warmup_steps=1)
             for h in (64, 32) for n, mode in ((1, "eager"), (2, "copies"), (2, "stale"))]
    results = bench.run_cases(cases, progress=False)
    assert [r["speedup"] for r in results] == pytest.approx([1.0, 2 * 4.0 / 4.4, 1.6, 1.0, 2 * 2.0 / 2.2, 2.0])
    findings = [f for f in _speed_findings(results, 2) if f.startswith("N=2 copies")]
    assert ("4.400 s per step against 4.000 s on one rank alone (+10%): a perfect split of the work with free "
            "communication would reach 1.82x here") in findings[0]
    assert findings[0].endswith("N=2 stale reaches 1.60x, 88% of it.")
    # each model's copies against its own baseline and its own stale run
    assert "2.200 s per step against 2.000 s on one rank alone" in findings[1]
    assert findings[1].endswith("N=2 stale reaches 2.00x, 110% of it.") and len(findings) == 2
    (verdict,) = _target_lines("t", results[:3], "t", None)
    assert verdict == ("Target: 2-rank stale at least 1.9x here: **not met** (1.60x; this machine's ceiling for 2 ranks, "
                       "measured in the same rounds (N=2 copies), is 1.82x, below the target: here two copies of the "
                       "model running at once, splitting nothing, do not reach 1.9x).")
    with pytest.raises(ConfigError, match="copies run the unmodified model on every one of world_size >= 2 real"):
        bench.BenchCase(world_size=2, mode="copies", projected=True)


def test_copies_on_a_patch_measure_how_ranks_slow_each_other_at_a_ranks_size(monkeypatch):
    """`--ceiling`'s patch runs: the unmodified model on one of N row patches, alone and as N copies; one stale
    rank timed alone, slowed as much as those copies are, is what N ranks could reach here."""
    from distrifx import bench
    from distrifx.report import _speed_findings, _target_lines

    walls = {("eager", 1): [9.0, 4.0, 4.0], ("copies", 1): [9.0, 4.0, 4.0], ("stale", 1): [9.0, 2.5, 2.5],
             ("eager", 2): [9.0, 1.6, 1.6], ("copies", 2): [9.0, 2.0, 2.0]}
    calls = []

    def measure(case):
        calls.append(case.rows)
        return _measured(case, walls[case.mode, case.patch_of])

    monkeypatch.setattr(bench, "measure_case", measure)
    cases = [bench.BenchCase(model="sd15-half", world_size=1, mode="eager", steps=3),
             bench.BenchCase(model="sd15-half", world_size=2, mode="stale", steps=3, warmup_steps=1),
             bench.BenchCase(model="sd15-half", world_size=2, mode="stale", steps=3, warmup_steps=1, projected=True),
             bench.BenchCase(model="sd15-half", world_size=2, mode="copies", steps=3),
             bench.BenchCase(model="sd15-half", world_size=1, mode="eager", steps=3, patch_of=2),
             bench.BenchCase(model="sd15-half", world_size=2, mode="copies", steps=3, patch_of=2)]
    results = bench.run_cases(cases, progress=False)
    assert calls == [64, 64, 64, 64, 32, 32]
    assert results[5]["label"] == "sd15-half 64x64 b1 N=2 copies on a 32x64 patch"
    assert results[4]["speedup"] == 1.0  # the patch is its own baseline
    findings = [f for f in _speed_findings(results, 2) if f.startswith("N=2 copies")]
    assert len(findings) == 2 and "ceiling for 2 ranks" in findings[0]
    assert findings[1] == ("N=2 copies on a patch (the unmodified model on one rank's 32 rows, on each of 2 ranks at "
                           "once): 2.000 s per step against 1.600 s alone (+25%, against +0% for the whole latent): "
                           "one stale rank timed alone, slowed as much, would reach 1.28x; N=2 stale reaches 1.60x.")
    (verdict,) = _target_lines("t", results, "t", None)
    assert "; one rank timed alone, slowed as much as two copies on a rank's patch slow each other, would reach " \
           "1.28x" in verdict
    with pytest.raises(ConfigError, match="patch_of=3 runs the unmodified model .* must divide the latent's 64 rows"):
        bench.BenchCase(mode="eager", world_size=1, patch_of=3)
    with pytest.raises(ConfigError, match="patch_of=2 runs the unmodified model"):
        bench.BenchCase(mode="stale", patch_of=2)


def test_stale_option_findings_compare_each_option_with_the_default_stale_run():
    from distrifx.report import _stale_option_findings

    def run(step_s, state_mib, **options):
        result = _speed_result("stale", 2, step_s)
        result["case"].update(options)
        return {**result, "bytes_sent_per_step": 2**20, "state_bytes": state_mib * 2**20, "background_cpu_s": 0.01}

    default = run(2.5, 48)
    findings = _stale_option_findings([default, run(2.6, 96, extrapolate=0.5), run(2.5, 24, stale_dtype="bfloat16"),
                                       run(2.6, 96, extrapolate=0.5, projected=True),
                                       run(2.6, 44, gn_variant="sync", fresh=["halo"]),
                                       run(2.7, 88, gn_variant="sync", extrapolate=0.5, fresh=["halo"])], default)
    assert findings == [
        "stale values extrapolated by 0.5: 1.92x against 2.00x; 1.0 MiB sent per rank per step (against 1.0), stale "
        "buffers 96.0 MiB (against 48.0); the rank's other threads used 0.010 s of CPU per step (against 0.010).",
        "bfloat16 stale exchanges: 2.00x against 2.00x; 1.0 MiB sent per rank per step (against 1.0), stale buffers "
        "24.0 MiB (against 48.0); the rank's other threads used 0.010 s of CPU per step (against 0.010).",
        "GN sync and halo exchanges kept synchronous: 1.92x against 2.00x; 1.0 MiB sent per rank per step (against "
        "1.0), stale buffers 44.0 MiB (against 48.0); the rank's other threads used 0.010 s of CPU per step (against "
        "0.010).",
        "GN sync and stale values extrapolated by 0.5 and halo exchanges kept synchronous: 1.85x against 2.00x; 1.0 MiB "
        "sent per rank per step (against 1.0), stale buffers 88.0 MiB (against 48.0); the rank's other threads used "
        "0.010 s of CPU per step (against 0.010)."]


def test_a_bucketed_run_is_labelled_and_compared_with_one_collective_per_exchange():
    from distrifx.report import _find, _stale_option_findings, _target_lines

    assert BenchCase(bucket_mb=8).label == "sd15-half 64x64 b1 N=2 stale buckets 8 MiB"
    assert BenchCase(mode="sync", bucket_mb=8).label == "sd15-half 64x64 b1 N=2 sync"  # only stale graphs pack

    def run(step_s, collectives, background_s, **options):
        result = _speed_result("stale", 2, step_s)
        result["case"].update(model="sd15-half", **options)
        return {**result, "bytes_sent_per_step": 24 * 2**20, "state_bytes": 48 * 2**20,
                "background_cpu_s": background_s, "exchanges": {"blocking": [1, 0], "overlapped": [collectives, 0]}}

    default, packed = run(2.5, 144, 0.033), run(2.4, 4, 0.015, bucket_mb=8)
    assert _find([packed, default], "stale", 2) is default  # the default run is the one without buckets
    assert _stale_option_findings([default, packed], default) == [
        "stale exchanges sent in buckets of 8 MiB: 2.08x against 2.00x; 5 collectives per step (against 145); "
        "24.0 MiB sent per rank per step (against 24.0), stale buffers 48.0 MiB (against 48.0); the rank's other "
        "threads used 0.015 s of CPU per step (against 0.033)."]
    # the same values, so the target counts the faster: here only the packed run reaches it
    slow = run(3.0, 144, 0.033)
    (verdict,) = _target_lines("t", [slow, packed], "t", None)
    assert verdict == ("Target: 2-rank stale at least 1.9x here: **met** (1.67x; the same values sent in buckets of "
                       "8 MiB: 2.08x).")
    # a rank timed alone against the default rank alone
    alone, packed_alone = ({**run(step, n, 0.0, projected=True, **extra), "peak_bytes": 2**30}
                           for step, n, extra in ((2.5, 144, {}), (2.0, 2, {"bucket_mb": 8})))
    assert _stale_option_findings([alone, packed_alone], None, alone) == [
        "stale exchanges sent in buckets of 8 MiB, one rank timed alone: 2.000 s per step against 2.500 s, 2.50x over "
        "the unmodified model against 2.00x; 3 collectives per step (against 145); peak memory 1.00 GiB (against 1.00)."]
