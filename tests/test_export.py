"""distrifx.export -> distrifx.load round trips (torch.export and ONNX) and every refusal of load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

import distrifx
from distrifx.errors import ArtifactError, InputSignatureError
from distrifx.export import MANIFEST
from distrifx.models import random_unet, unet_inputs
from distrifx.runtime import SimulatedWorld
from tests.export_workers import ONE_LEVEL_SD15

TIMESTEPS = [900, 600, 300]


@pytest.fixture(scope="module")
def model():
    unet = random_unet("sd15", **ONE_LEVEL_SD15)
    args, kwargs = unet_inputs(unet)
    return unet, args, kwargs


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """``exported(format, mode)``: the directory of that export (written once per module)."""
    unet, args, kwargs = model
    done: dict[tuple[str, str], Path] = {}

    def get(format: str, mode: str) -> Path:
        if (format, mode) not in done:
            out = tmp_path_factory.mktemp(f"{format}-{mode}")
            distrifx.export(unet, out, 2, args=args, kwargs=kwargs, mode=mode, warmup_steps=1, format=format)
            done[(format, mode)] = out
        return done[(format, mode)]

    return get


def _steps(make, samples, kwargs):
    """Every simulated rank's (output, phase) per denoising step of the module ``make(group)``."""

    def rank(group):
        module = make(group)
        return [(module(sample, torch.tensor(t), **kwargs), module.last_phase) for sample, t in zip(samples, TIMESTEPS)]

    return distrifx.simulate(rank, 2)


def _samples(sample):
    g = torch.Generator().manual_seed(1)
    return [sample + 0.05 * i * torch.randn(sample.shape, generator=g) for i in range(len(TIMESTEPS))]


@pytest.mark.parametrize("format", ["pt2", "onnx"])
def test_sync_export_equals_the_unmodified_model(model, exported, format):
    unet, (sample, _), kwargs = model
    out = exported(format, "sync")
    samples = _samples(sample)
    with torch.no_grad():
        expected = [unet(s, torch.tensor(t), **kwargs).sample for s, t in zip(samples, TIMESTEPS)]
    for steps in _steps(lambda g: distrifx.load(out, process_group=g), samples, kwargs):
        for (got, phase), want in zip(steps, expected):
            assert isinstance(got, UNet2DConditionOutput) and phase == "sync"
            assert float((got.sample - want).abs().max()) < 1e-5


@pytest.mark.parametrize("format", ["pt2", "onnx"])
def test_stale_export_equals_the_eager_runtime_step_by_step(model, exported, format):
    unet, (sample, _), kwargs = model
    out = exported(format, "stale")
    samples = _samples(sample)
    loaded = _steps(lambda g: distrifx.load(out, process_group=g), samples, kwargs)
    eager = _steps(lambda g: distrifx.parallelize(unet, 2, mode="stale", warmup_steps=1, cfg_parallel=False,
                                                  process_group=g), samples, kwargs)
    for rank_loaded, rank_eager in zip(loaded, eager):
        assert [p for _, p in rank_loaded] == [p for _, p in rank_eager] == ["warmup", "stale", "stale"]
        for (got, _), (want, _) in zip(rank_loaded, rank_eager):
            assert float((got.sample - want.sample).abs().max()) < 1e-5


def test_manifest_describes_versions_inputs_files_and_every_ranks_program(exported):
    out = exported("pt2", "stale")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == "pt2" and manifest["world_size"] == 2
    assert manifest["distrifx_version"] == distrifx.__version__ and manifest["torch_version"] == torch.__version__
    assert manifest["options"] == {"mode": "stale", "warmup_steps": 1, "gn_variant": "corrected", "kv_exchange": "auto"}
    assert manifest["inputs"]["names"] == ["sample", "timestep", "encoder_hidden_states"]
    assert manifest["inputs"]["leaves"][0] == {"kind": "tensor", "shape": [1, 4, 16, 16], "dtype": "float32",
                                               "device": "cpu"}
    assert sorted(manifest["files"]) == sorted(f"segments/{p.name}" for p in (out / "segments").iterdir())
    used = set()
    for rank in manifest["ranks"]:
        assert list(rank) == ["warmup", "stale"]
        stale = rank["stale"]
        ops = [step["op"] for step in stale["steps"]]
        assert {"compute", "all_gather_start", "neighbour_rows_start", "wait"} == set(ops)
        assert ops.count("wait") == ops.count("all_gather_start") + ops.count("neighbour_rows_start")
        assert stale["signature"]["state_in"] and stale["inputs"][0] == "comm"
        used |= {step["file"] for step in stale["steps"] + rank["warmup"]["steps"] if step["op"] == "compute"}
    computes = sum(s["op"] == "compute" for r in manifest["ranks"] for p in r.values() for s in p["steps"])
    assert used == set(manifest["files"]) and len(used) < computes  # ranks and phases share identical segments


@pytest.fixture
def copy(exported, tmp_path):
    """A private copy of the pt2 sync export, to damage."""
    return Path(shutil.copytree(exported("pt2", "sync"), tmp_path / "copy"))


def test_load_reads_no_pickles(copy, monkeypatch):
    real_load, calls = torch.load, []

    def weights_only_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", weights_only_load)
    modules = distrifx.simulate(lambda g: distrifx.load(copy, process_group=g), 2)
    assert [m.comm.rank for m in modules] == [0, 1]
    assert calls and all(weights_only is True for weights_only in calls)


def _edit_manifest(out: Path, **changes) -> None:
    manifest = json.loads((out / MANIFEST).read_text())
    manifest.update(changes)
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_load_refuses_another_world_size(exported):
    with pytest.raises(distrifx.ProcessGroupError, match="exported for world_size=2 but the process group has 3"):
        distrifx.simulate(lambda g: distrifx.load(exported("pt2", "sync"), process_group=g), 3)


def test_load_refuses_a_missing_file(copy):
    victim = sorted((copy / "segments").iterdir())[3]
    victim.unlink()
    with pytest.raises(ArtifactError, match=f"{victim.name} is missing"):
        distrifx.load(copy)


def test_load_refuses_a_changed_file(copy):
    victim = sorted((copy / "segments").iterdir())[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match=f"{victim.name} changed since it was exported"):
        distrifx.load(copy)


@pytest.mark.parametrize("key,package", [("distrifx_version", "distrifx"), ("torch_version", "torch")])
def test_load_refuses_another_minor_version(copy, key, package):
    _edit_manifest(copy, **{key: "0.0.1"})
    with pytest.raises(ArtifactError, match=f"exported with {package} 0.0.1 .* install {package}==0.0"):
        distrifx.load(copy)


def test_load_refuses_a_directory_without_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="is not a distrifx export directory"):
        distrifx.load(tmp_path)


@pytest.fixture(scope="module")
def rank0(exported):
    """Rank 0 of the pt2 sync export; loading and the input checks need no peer."""
    return distrifx.load(exported("pt2", "sync"), process_group=SimulatedWorld(2).group(0))


@pytest.mark.parametrize("change,message", [
    (lambda a, k: ((torch.zeros(1, 4, 32, 16), a[1]), k),
     r"input 'sample': .* exported for a float32 tensor of shape \(1, 4, 16, 16\) on cpu, got a float32 tensor "
     r"of shape \(1, 4, 32, 16\)"),
    (lambda a, k: (a, {"encoder_hidden_states": k["encoder_hidden_states"].double()}),
     r"input 'encoder_hidden_states': .* float32 tensor of shape \(1, 7, 32\) on cpu, got a float64 tensor"),
    (lambda a, k: (a, {}), r"missing \['encoder_hidden_states'\]"),
    (lambda a, k: (a, {**k, "return_dict": False}), r"unexpected \['return_dict'\]"),
])
def test_loaded_module_refuses_inputs_it_was_not_exported_for(model, rank0, change, message):
    _, args, kwargs = model
    bad_args, bad_kwargs = change(args, kwargs)
    with pytest.raises(InputSignatureError, match=message):
        rank0(*bad_args, **bad_kwargs)
    assert rank0.generation.steps.step == 0 and rank0.last_phase is None  # refused before anything ran


def test_loaded_module_takes_keyword_arguments_for_positional_ones(model, exported):
    unet, (sample, t), kwargs = model
    with torch.no_grad():
        expected = unet(sample, t, **kwargs).sample
    outs = distrifx.simulate(lambda g: distrifx.load(exported("pt2", "sync"), process_group=g)(
        sample=sample, timestep=t, **kwargs).sample, 2)
    assert all(float((o - expected).abs().max()) < 1e-5 for o in outs)


def test_export_refuses_an_unknown_format_and_a_foreign_directory(model, tmp_path):
    unet, args, kwargs = model
    with pytest.raises(distrifx.ConfigError, match="format='tensorrt' is not valid.*TensorRT is not implemented"):
        distrifx.export(unet, tmp_path / "x", 2, args=args, kwargs=kwargs, format="tensorrt")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(distrifx.ConfigError, match="is not empty and holds no manifest.json"):
        distrifx.export(unet, tmp_path, 2, args=args, kwargs=kwargs)
    assert (tmp_path / "notes.txt").read_text() == "mine"
