"""distrifx.export -> distrifx.load round trips (torch.export, AOTInductor, ONNX; TensorRT on a GPU), CFG splits,
loaded exports in diffusers pipelines, and every refusal of export and load."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from diffusers.configuration_utils import FrozenDict
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

import distrifx
from distrifx.cli import build_parser
from distrifx.config import ParallelConfig
from distrifx.errors import ArtifactError, DistrifxError, InputSignatureError
from distrifx.export import (_WRITERS, FIRST_OPTIONS, MANIFEST, _option_fields, _read_options, _stored_options,
                             read_manifest)
from distrifx.models import random_unet, unet_inputs
from distrifx.runtime import SimulatedWorld
from tests import export_workers
from tests.conftest import tensorrt_missing
from tests.export_workers import ONE_LEVEL_SD15

TIMESTEPS = [900, 600, 300]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "compile.md"


@pytest.fixture(scope="module")
def model():
    unet = random_unet("sd15", **ONE_LEVEL_SD15)
    args, kwargs = unet_inputs(unet)
    return unet, args, kwargs


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """``exported(format, mode)``: the directory of that export (written once per module).

    Tests call it from simulated ranks, i.e. threads; torch.export cannot run in two threads at
    once, so the first caller exports while the others wait.
    """
    unet, args, kwargs = model
    done: dict[tuple[str, str], Path] = {}
    lock = threading.Lock()

    def get(format: str, mode: str) -> Path:
        with lock:
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


def test_aoti_export_equals_the_unmodified_model(tmp_path):
    """AOTInductor builds a shared library per segment (over ten seconds each here), so a conv and
    GroupNorm model with a handful of segments stands in for the UNet; both exchange kinds occur."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(),
                          nn.Conv2d(8, 4, 3, padding=1)).eval()
    x = torch.randn(1, 4, 16, 16)
    distrifx.export(model, tmp_path, 2, args=(x,), mode="sync", format="aoti")
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["format"] == "aoti" and all(name.endswith(".aoti.pt2") for name in manifest["files"])
    ops = {step["op"] for rank in manifest["ranks"] for step in rank["sync"]["steps"]}
    assert {"compute", "all_gather_start", "neighbour_rows_start", "wait"} == ops
    with torch.no_grad():
        expected = model(x)
    outs = distrifx.simulate(lambda g: distrifx.load(tmp_path, process_group=g, allow_native_code=True)(x), 2)
    assert all(float((out - expected).abs().max()) < 1e-5 for out in outs)


@pytest.mark.parametrize("format", ["pt2", "onnx"])
def test_narrow_stale_export_equals_the_eager_runtime_and_stores_the_dtype(model, tmp_path, format):
    """bfloat16 crosses the ONNX segments' boundaries too (numpy has no such dtype)."""
    unet, (sample, _), kwargs = model
    options = dict(mode="stale", warmup_steps=1, stale_dtype="bfloat16")
    distrifx.export(unet, tmp_path, 2, args=(sample, torch.tensor(TIMESTEPS[0])), kwargs=kwargs, format=format,
                    **options)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["options"]["stale_dtype"] == "bfloat16"
    starts = [step for step in manifest["ranks"][0]["stale"]["steps"] if step["op"].endswith("_start")]
    assert {step["args"].get("dtype") for step in starts} == {"bfloat16", None}  # GroupNorm stats stay float32
    samples = _samples(sample)
    loaded = _steps(lambda g: distrifx.load(tmp_path, process_group=g), samples, kwargs)

    def parallel(stale_dtype):
        return _steps(lambda g: distrifx.parallelize(unet, 2, cfg_parallel=False, process_group=g,
                                                     **{**options, "stale_dtype": stale_dtype}), samples, kwargs)

    eager, wide = parallel("bfloat16"), parallel(None)
    for step, ((got, _), (want, _), (unrounded, _)) in enumerate(zip(loaded[0], eager[0], wide[0], strict=True)):
        error = float((got.sample - want.sample).abs().max())
        if format == "pt2" or step == 0:  # every step, or the synchronous warm-up step
            assert error < 1e-5
        else:  # ONNX's float32 differs in the last bits (which bits depends on the CPU's kernels), so from the
            # first stale step on, a value on a bfloat16 rounding boundary can round the other way; it stays
            # well inside what the rounding changes (measured 1.0e-4 against 1.2e-3 at the first stale step)
            assert error < 0.5 * float((unrounded.sample - want.sample).abs().max())


# Stale options an export stores, their values, and how its manifest writes them: extrapolated stale values,
# halo rows exchanged synchronously, a warm-up by timestep (the second step, 600 of 900, also warms up).
STALE_OPTIONS = {"extrapolate": (0.5, 0.5), "fresh": (("halo",), ["halo"]), "warmup_fraction": (0.5, 0.5)}


@pytest.mark.parametrize("format", ["pt2", "onnx"])
def test_stale_option_export_equals_the_eager_runtime_and_stores_the_options(model, tmp_path, format):
    """One export with every stale option: each survives export and load (without any one of them, the
    eager runtime's last step differs from the loaded program's)."""
    unet, (sample, _), kwargs = model
    options = {name: value for name, (value, _) in STALE_OPTIONS.items()}
    distrifx.export(unet, tmp_path, 2, args=(sample, torch.tensor(TIMESTEPS[0])), kwargs=kwargs, format=format,
                    mode="stale", warmup_steps=1, **options)
    stored = json.loads((tmp_path / MANIFEST).read_text())["options"]
    assert {name: stored[name] for name in STALE_OPTIONS} == {name: s for name, (_, s) in STALE_OPTIONS.items()}
    samples = _samples(sample)
    loaded = _steps(lambda g: distrifx.load(tmp_path, process_group=g), samples, kwargs)

    def parallel(**chosen):
        return _steps(lambda g: distrifx.parallelize(unet, 2, mode="stale", warmup_steps=1, cfg_parallel=False,
                                                     process_group=g, **chosen), samples, kwargs)

    eager = parallel(**options)
    assert [p for _, p in loaded[0]] == [p for _, p in eager[0]] == ["warmup", "warmup", "stale"]
    for (got, _), (want, _) in zip(loaded[0], eager[0], strict=True):
        assert float((got.sample - want.sample).abs().max()) < 1e-5
    for name in STALE_OPTIONS:
        without = parallel(**{other: value for other, value in options.items() if other != name})
        assert float((loaded[0][-1][0].sample - without[0][-1][0].sample).abs().max()) > 1e-4, name


def test_an_export_written_before_an_option_existed_reads_as_compiled_with_its_default(exported, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(exported("pt2", "stale"), old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["options"] = {k: v for k, v in manifest["options"].items() if k in FIRST_OPTIONS}
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert read_manifest(old)["options"] == {**manifest["options"], "extrapolate": 0.0, "fresh": [],
                                             "warmup_fraction": 0.0, "bucket_mb": 0.0, "gather_outputs": True}


def test_every_option_survives_the_manifest():
    """Each stored option set away from its default, through JSON and back, gives the same config."""
    config = ParallelConfig(world_size=2, mode="naive", warmup_steps=2, warmup_fraction=0.3, gn_variant="sync",
                            kv_exchange="hidden", cfg_parallel=False, stale_dtype="float16", extrapolate=0.5,
                            fresh=("kv",), bucket_mb=8.0, gather_outputs=False)
    assert all(getattr(config, f.name) != f.default for f in _option_fields())
    stored = json.loads(json.dumps(_stored_options(config)))
    assert stored["stale_dtype"] == "float16" and stored["fresh"] == ["kv"] and stored["bucket_mb"] == 8.0
    assert stored["gather_outputs"] is False
    assert ParallelConfig(world_size=2, cfg_parallel=False, **_read_options(stored, Path(MANIFEST))) == config


def test_manifest_describes_versions_inputs_files_and_every_ranks_program(exported):
    out = exported("pt2", "stale")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == "pt2" and manifest["world_size"] == 2
    assert manifest["distrifx_version"] == distrifx.__version__ and manifest["torch_version"] == torch.__version__
    assert manifest["options"] == {"mode": "stale", "warmup_steps": 1, "warmup_fraction": 0.0, "gn_variant": "corrected",
                                   "kv_exchange": "auto", "stale_dtype": None, "extrapolate": 0.0, "fresh": [],
                                   "bucket_mb": 0.0, "gather_outputs": True}
    assert manifest["cfg_split"] is False and manifest["pipeline"] is None  # batch 1: nothing to split
    assert manifest["model"]["class"] == "UNet2DConditionModel" and manifest["model"]["config"]["in_channels"] == 4
    assert manifest["model"]["dtype"] == "float32" and manifest["model"]["device"] == "cpu"
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


@pytest.mark.parametrize("damage,message", [
    (lambda m: [m], r" holds an array, not an object"),
    (lambda m: {k: v for k, v in m.items() if k != "options"}, r" lacks the entry 'options'"),
    (lambda m: {**m, "options": {k: v for k, v in m["options"].items() if k != "mode"}},
     r": the entry 'options' lacks \['mode'\]"),
    (lambda m: {**m, "world_size": "2"}, r": the entry 'world_size' is a string, not an integer"),
    (lambda m: {**m, "ranks": m["ranks"][:1]}, r": the entry 'ranks' holds 1 rank programs, but world_size 2 needs 2 "
                                               r"\(one per rank\)"),
    (lambda m: {**m, "world_size": 4}, r": the entry 'ranks' holds 2 rank programs, but world_size 4 needs 4"),
    (lambda m: {**m, "cfg_split": True}, r": the entry 'ranks' holds 2 rank programs, but world_size 2 needs 1 "
                                         r"\(one per patch rank of a CFG split\)"),
    (lambda m: {**m, "world_size": 3, "cfg_split": True}, r": the entry 'world_size' is 3 with a CFG split, which no "
                                                          r"export has"),
], ids=["a list", "no options", "options without mode", "world size a string", "a rank cut", "world size changed",
        "cfg split changed", "odd cfg split"])
def test_load_refuses_a_damaged_manifest_naming_the_entry(copy, damage, message):
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps(damage(manifest)))
    with pytest.raises(ArtifactError, match=re.escape(str(copy / MANIFEST)) + f"{message}.*Export again"):
        distrifx.load(copy)


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


def test_load_opens_aoti_packages_only_when_allowed_and_under_the_torch_that_built_them(copy):
    _edit_manifest(copy, format="aoti")
    with pytest.raises(ArtifactError, match="is an AOTInductor export: its segments are shared libraries, and "
                                            "opening them runs their code. Pass allow_native_code=True"):
        distrifx.load(copy)
    _edit_manifest(copy, torch_version=torch.__version__ + "1")  # same major.minor: enough for pt2, not aoti
    with pytest.raises(ArtifactError, match=rf"built against torch {re.escape(torch.__version__)}1, but this process "
                                            rf"runs torch {re.escape(torch.__version__)}"):
        distrifx.load(copy, allow_native_code=True)


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


def test_loaded_module_refuses_ranks_called_with_different_inputs(model, exported):
    _, (sample, t), kwargs = model

    def rank(group):
        loaded = distrifx.load(exported("pt2", "sync"), process_group=group)
        return loaded(sample + group.rank, t, **kwargs)  # as if rank 1 drew other latents

    with pytest.raises(distrifx.DistrifxError, match=r"called with different values of \['sample'\]"):
        distrifx.simulate(rank, 2)


def test_export_refuses_an_unknown_format_and_a_foreign_directory(model, tmp_path):
    unet, args, kwargs = model
    with pytest.raises(distrifx.ConfigError, match=r"format='engine' is not valid; choose one of \('pt2', 'aoti', "
                                                   r"'onnx', 'tensorrt'\)"):
        distrifx.export(unet, tmp_path / "x", 2, args=args, kwargs=kwargs, format="engine")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(distrifx.ConfigError, match="is not empty and holds no manifest.json"):
        distrifx.export(unet, tmp_path, 2, args=args, kwargs=kwargs)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_export_refuses_a_foreign_manifest_and_a_file(model, tmp_path):
    unet, args, kwargs = model
    (tmp_path / MANIFEST).write_text('{"name": "my web app"}')
    (tmp_path / "segments").mkdir()
    (tmp_path / "segments" / "logo.png").write_text("mine")
    with pytest.raises(distrifx.ConfigError, match=r"holds a manifest.json that is not a distrifx export this distrifx "
                                                   r"reads, so the export does not replace it .*manifest version None"):
        distrifx.export(unet, tmp_path, 2, args=args, kwargs=kwargs)
    assert (tmp_path / "segments" / "logo.png").read_text() == "mine"
    assert (tmp_path / MANIFEST).read_text() == '{"name": "my web app"}'
    (tmp_path / "file").write_text("mine")
    with pytest.raises(distrifx.ConfigError, match="file is a file: export into a directory"):
        distrifx.export(unet, tmp_path / "file", 2, args=args, kwargs=kwargs)


def test_compile_help_and_docs_name_exactly_the_flags_compile_has():
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = subcommands.choices["compile"]._actions
    flags = {flag for action in actions for flag in action.option_strings if flag.startswith("--")} - {"--help"}
    in_help = set(re.findall(r"--[a-z][a-z-]*", " ".join(action.help or "" for action in actions)))
    paragraph = re.search(r"`distrifx compile` loads the pipeline.*?\n\n", DOCS.read_text(), re.S)[0]
    assert in_help <= flags and set(re.findall(r"--[a-z][a-z-]*", paragraph)) == flags


def _failing_writer(distinct, out):
    """A segment writer that fails after writing a file, as on a full disk."""
    (out / distinct[0].file).write_bytes(b"half a segment")
    raise DistrifxError("no space left on the device")


@pytest.mark.parametrize("failure", ["capture", "writing"])
def test_a_failed_export_leaves_the_previous_export_in_place(model, copy, monkeypatch, failure):
    """Too many ranks for the latents' rows fails before any file is written; a failing writer, after one."""
    unet, args, kwargs = model
    world_size, message = (64, "does not split over 64 ranks") if failure == "capture" else (2, "no space left")
    if failure == "writing":
        monkeypatch.setitem(_WRITERS, "pt2", _failing_writer)
    manifest = (copy / MANIFEST).read_text()
    with pytest.raises(DistrifxError, match=message):
        distrifx.export(unet, copy, world_size, args=args, kwargs=kwargs, mode="stale")
    assert (copy / MANIFEST).read_text() == manifest
    assert sorted(p.name for p in copy.iterdir()) == [MANIFEST, "segments"]  # the staging directory is gone
    distrifx.load(copy, process_group=SimulatedWorld(2).group(0))  # every file as exported


def test_an_export_replaces_a_previous_export_and_keeps_other_files(model, copy):
    unet, args, kwargs = model
    (copy / "notes.txt").write_text("mine")
    distrifx.export(unet, copy, 2, args=args, kwargs=kwargs, mode="stale", warmup_steps=1)
    manifest = read_manifest(copy)
    assert manifest["options"]["mode"] == "stale" and (copy / "notes.txt").read_text() == "mine"
    assert sorted(manifest["files"]) == sorted(f"segments/{p.name}" for p in (copy / "segments").iterdir())
    assert sorted(p.name for p in copy.iterdir()) == [MANIFEST, "notes.txt", "segments"]
    distrifx.load(copy, process_group=SimulatedWorld(2).group(0))


def test_loaded_module_answers_what_pipelines_read(model, rank0):
    unet, _, _ = model
    assert isinstance(rank0.config, FrozenDict)
    assert rank0.config.in_channels == unet.config.in_channels and rank0.config.sample_size == unet.config.sample_size
    assert rank0.config.time_cond_proj_dim is None and rank0.config["addition_time_embed_dim"] is None
    assert rank0.config.block_out_channels == list(unet.config.block_out_channels)  # JSON: tuples become lists
    assert rank0.dtype == torch.float32 and rank0.device == torch.device("cpu")
    with rank0.cache_context("cond"):  # entered by newer diffusers pipelines; nothing to cache here
        pass
    assert not hasattr(rank0, "_hf_hook")
    with pytest.raises(AttributeError, match="'encoder_hid_proj': a loaded export answers only what was recorded"):
        rank0.encoder_hid_proj  # noqa: B018


def test_sdxl_added_embedding_size_is_recorded_for_its_pipeline():
    """SDXL pipelines read unet.add_embedding.linear_1.in_features; a loaded export has no submodules."""
    from distrifx.export import RecordedAttributes, _describe_model, _model_attributes

    unet = random_unet("sdxl")
    attributes = _model_attributes(json.loads(json.dumps(_describe_model(unet))))
    embedding = attributes["add_embedding"]
    assert isinstance(embedding, RecordedAttributes)
    assert embedding.linear_1.in_features == unet.add_embedding.linear_1.in_features
    assert attributes["config"].addition_time_embed_dim == unet.config.addition_time_embed_dim
    with pytest.raises(AttributeError, match="add_embedding.linear_2 was not recorded at export"):
        embedding.linear_2  # noqa: B018
    with pytest.raises(AttributeError, match="read-only"):
        embedding.linear_1 = None


@pytest.mark.parametrize("world_size", [2, 4])
def test_cfg_split_export_puts_the_batch_halves_on_two_rank_groups(tmp_path, world_size):
    unet = random_unet("sd15", **ONE_LEVEL_SD15)
    args, kwargs = unet_inputs(unet, batch=2)
    with torch.no_grad():
        expected = unet(*args, **kwargs).sample
    distrifx.export(unet, tmp_path, world_size, args=args, kwargs=kwargs, mode="sync")
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["cfg_split"] is True and manifest["world_size"] == world_size
    assert len(manifest["ranks"]) == world_size // 2  # one program per patch rank, shared by both halves

    def rank(group):
        loaded = distrifx.load(tmp_path, process_group=group)
        return loaded(*args, **kwargs).sample, loaded.cfg.half, loaded.cfg.patch.world_size

    results = distrifx.simulate(rank, world_size)
    assert [half for _, half, _ in results] == [0] * (world_size // 2) + [1] * (world_size // 2)
    for out, _, patch_world in results:
        assert patch_world == world_size // 2
        assert float((out - expected).abs().max()) < 1e-5


def test_loaded_exports_replace_the_unet_of_an_unmodified_pipeline_on_gloo_ranks(tmp_path):
    pipe = export_workers.small_pipeline()
    options = dict(height=32, width=32, cfg_parallel=False)
    # ONNX loads much faster than pt2; a pt2 export runs in a pipeline on gloo ranks in test_cli.py.
    distrifx.export_pipeline(pipe, tmp_path / "sync", 2, mode="sync", format="onnx", **options)
    distrifx.export_pipeline(pipe, tmp_path / "stale", 2, mode="stale", warmup_steps=1, format="onnx", **options)
    manifest = json.loads((tmp_path / "sync" / MANIFEST).read_text())
    assert manifest["pipeline"] == {"height": 32, "width": 32, "guidance_scale": 7.5}
    assert manifest["inputs"]["keywords"] == ["encoder_hidden_states", "timestep_cond", "cross_attention_kwargs",
                                              "added_cond_kwargs", "return_dict"]  # exactly the pipeline's call
    assert manifest["inputs"]["leaves"][0]["shape"] == [2, 4, 16, 16]  # guidance: a batch of 2
    ranks = distrifx.launch(export_workers.pipeline_with_exports, 2, str(tmp_path / "sync"), str(tmp_path / "stale"),
                            threads_per_rank=1, timeout_s=600, all_ranks=True)
    for sync_to_pipeline, stale_to_eager in ranks:
        assert sync_to_pipeline < 1e-4 and stale_to_eager < 1e-4


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_tensorrt_export_refuses_clearly_without_cuda(model, tmp_path, no_cuda):
    unet, args, kwargs = model
    with pytest.raises(distrifx.ConfigError, match=r"distrifx.export\(format='tensorrt'\) runs TensorRT engines, "
                                                   r"which need a CUDA device .* pip install \"distrifx\[tensorrt\]\""):
        distrifx.export(unet, tmp_path / "trt", 2, args=args, kwargs=kwargs, format="tensorrt")
    assert not (tmp_path / "trt").exists()  # refused before writing anything


def test_aoti_export_refuses_clearly_without_a_compiler(model, tmp_path, monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("no C++ compiler on PATH")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    unet, args, kwargs = model
    with pytest.raises(distrifx.ConfigError, match=r"distrifx.export\(format='aoti'\) builds each segment with a "
                                                   r"C\+\+ compiler, and none was found .* or use format='pt2'"):
        distrifx.export(unet, tmp_path / "aoti", 2, args=args, kwargs=kwargs, format="aoti")
    assert not (tmp_path / "aoti").exists()  # refused before writing anything


def test_loading_a_tensorrt_export_refuses_clearly_without_cuda(copy, no_cuda):
    _edit_manifest(copy, format="tensorrt")
    with pytest.raises(ArtifactError, match=r"format='tensorrt' export runs TensorRT engines, which need a CUDA "
                                            r"device .* pip install \"distrifx\[tensorrt\]\""):
        distrifx.load(copy)


@pytest.mark.gpu
@pytest.mark.skipif(bool(tensorrt_missing()), reason=f"TensorRT export needs CUDA and torch_tensorrt: {tensorrt_missing()}")
def test_tensorrt_export_equals_the_model_in_sync_mode(tmp_path):
    unet = random_unet("sd15", **ONE_LEVEL_SD15).cuda()
    args, kwargs = unet_inputs(unet)
    args, kwargs = torch.utils._pytree.tree_map(lambda x: x.cuda() if isinstance(x, torch.Tensor) else x, (args, kwargs))
    with torch.no_grad():
        expected = unet(*args, **kwargs).sample
    distrifx.export(unet, tmp_path, 2, args=args, kwargs=kwargs, mode="sync", format="tensorrt")
    outs = distrifx.simulate(lambda g: distrifx.load(tmp_path, process_group=g)(*args, **kwargs).sample, 2)
    for out in outs:  # TensorRT may use TF32 for float32 convolutions, as cuDNN does in eager mode
        assert float((out - expected).abs().max() / expected.abs().max()) < 1e-2


def test_a_cuda_export_runs_on_each_ranks_current_gpu(monkeypatch):
    from distrifx.export import _rank_device

    assert _rank_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # rank 3 of a job, whatever GPU exported
    assert _rank_device("cuda") == _rank_device("cuda:0") == torch.device("cuda", 3)


def test_a_pt2_segment_opens_with_its_weights_on_the_ranks_device(copy, monkeypatch):
    """The meta device stands in for a rank's GPU other than the one the export ran on."""
    export_module = sys.modules["distrifx.export"]  # the module: distrifx.export is also its function
    monkeypatch.setattr(export_module, "_rank_device", lambda recorded: torch.device("meta"))
    manifest = read_manifest(copy)
    file = next(iter(manifest["files"]))
    segment = export_module._open_segment(copy, file, manifest)
    tensors = [*segment.parameters(), *segment.buffers()]
    assert tensors and {t.device.type for t in tensors} == {"meta"}


def test_tensorrt_engines_built_for_another_gpu_or_tensorrt_are_refused_by_name(monkeypatch, tmp_path):
    from distrifx.backends import tensorrt

    here = {"torch_tensorrt": "2.13.0", "tensorrt": "10.9.0", "compute_capability": "9.0"}
    monkeypatch.setattr(tensorrt, "engine_runtime", lambda: here)
    tensorrt.check_engine_runtime(dict(here), tmp_path)  # the same: loads
    tensorrt.check_engine_runtime({}, tmp_path)  # an export that recorded nothing: torch-tensorrt decides
    with pytest.raises(distrifx.ArtifactError, match=r"built for tensorrt 10.3.0 \(here: 10.9.0\); compute_capability "
                                                     r"8.0 \(here: 9.0\): .* Export again on this machine"):
        tensorrt.check_engine_runtime({**here, "tensorrt": "10.3.0", "compute_capability": "8.0"}, tmp_path)


def test_a_pt2_segment_that_cannot_be_saved_is_named(model, tmp_path, monkeypatch):
    unet, args, kwargs = model

    def full_disk(*_args, **_kwargs):
        raise OSError("no space left on the device")

    monkeypatch.setattr(torch.export, "save", full_disk)
    with pytest.raises(DistrifxError, match=r"torch.export.save failed on rank 0, phase sync, .* \(to be written to "
                                            r"segments/.*\): OSError: no space left on the device$"):
        distrifx.export(unet, tmp_path / "out", 2, args=args, kwargs=kwargs, mode="sync")
