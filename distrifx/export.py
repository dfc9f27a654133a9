"""Offline export: every rank's program written to files, loaded later without the model's code.

:func:`export` captures the model once, builds every rank's per-phase graphs, splits them into
compute segments and collectives (:func:`~distrifx.backends.split_segments`), runs the ranks in
simulation to get example inputs for every segment, and writes

- ``segments/NNN.pt2`` (``torch.export``, weights inside), ``segments/NNN.aoti.pt2`` (an
  AOTInductor package: compiled kernels and weights), ``segments/NNN.onnx`` (ONNX, weights inside
  or in ``NNN.onnx.data`` beside it) or ``segments/NNN.ep`` (TensorRT engines in an exported
  program): one file per distinct compute segment (ranks and phases share identical ones);
- ``manifest.json``: versions, world size, options and CFG split, what pipelines read from the model
  (config, dtype, device), the input signature and pytree specs, each file's sha256, and per patch
  rank and phase the program: compute steps (file, value ids in and out), collective starts (op and
  static arguments) and waits, the graph's inputs, outputs and state.

:func:`load` checks the manifest against this process (world size, versions, file hashes) and
returns a module that runs this rank's stored program: segments from the files, collectives by
the communicator between them, the batch halves of a CFG split on two rank groups, steps and
phases tracked exactly like :class:`~distrifx.runtime.module.ParallelModule`. It can replace
``pipe.unet`` in a diffusers pipeline. Only JSON, ``torch.export`` archives, ONNX files and
TensorRT programs are read; nothing is unpickled. AOTInductor packages hold native code, which
opening them runs: :func:`load` opens them only with ``allow_native_code=True``.

:func:`export_pipeline` exports a pipeline's denoiser (and ControlNet) as the pipeline calls them;
:func:`load_pipeline` puts them back into a pipeline on every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import importlib.util
import inspect
import json
import operator
import os
import re
import shutil
import sys
import tempfile
import threading
import types
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.utils._pytree import (
    SERIALIZED_TYPE_TO_PYTHON_TYPE,
    TreeSpec,
    tree_flatten,
    tree_unflatten,
    treespec_dumps,
    treespec_loads,
)

from distrifx.api import (
    _communicator,
    _denoiser_name,
    control_image_argument,
    controlnet_options,
    parallelize_pipeline_vae,
    pipeline_controlnet,
    start_alike,
)
from distrifx.backends import aoti, is_segment, segments, split_segments, tensorrt
from distrifx.capture import CapturedProgram, capture
from distrifx.capture.export import _leaf_key
from distrifx.config import DEFAULT_TIMEOUT_S, GNVariant, KVExchange, Mode, ParallelConfig, dtype_name
from distrifx.errors import ArtifactError, ConfigError, DistrifxError, InputSignatureError, ProcessGroupError
from distrifx.passes import META_SIGNATURE, RankSignature
from distrifx.runtime import ops
from distrifx.runtime.cfg import CfgSplit, batch_half, batch_size, local_call, wants_split
from distrifx.runtime.comm import Communicator, SimulatedGroup, check_same_inputs
from distrifx.runtime.controlnet import ParallelControlNet, controlnet_call
from distrifx.runtime.module import SteppedModule, _leaf_paths
from distrifx.runtime.program import RankProgram, build_program, phases_for
from distrifx.runtime.simulate import simulate

__all__ = ["export", "export_pipeline", "denoiser_call", "load", "load_pipeline", "read_manifest", "ExportedModule",
           "RecordedAttributes", "ArtifactError", "InputSignatureError", "MANIFEST", "FORMATS", "RECORDED_ATTRIBUTES"]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 3
# ParallelConfig's fields that are not the manifest's ``options``: the export stores the world size and CFG split
# apart, and the loading process chooses the others.
_NOT_OPTIONS = ("world_size", "cfg_parallel", "backend", "timeout_s")
# The options every manifest of this version stores. The others were added since: an export that predates one
# reads as compiled with its ParallelConfig default, which is how its programs were built.
FIRST_OPTIONS = ("mode", "warmup_steps", "gn_variant", "kv_exchange", "stale_dtype")
# The manifest's top-level entries and their JSON types (read_manifest checks them; load, the entries inside).
_FIELDS: dict[str, tuple[type, ...]] = {
    "distrifx_version": (str,), "torch_version": (str,), "model": (dict,), "world_size": (int,), "cfg_split": (bool,),
    "options": (dict,), "pipeline": (dict, type(None)), "inputs": (dict,), "out_spec": (str,), "segments": (dict,),
    "ranks": (list,), "files": (dict,),
}
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
               bool: "a boolean", type(None): "null"}
FORMATS = ("pt2", "aoti", "onnx", "tensorrt")
_SUFFIXES = {"pt2": "pt2", "aoti": "aoti.pt2", "onnx": "onnx", "tensorrt": "ep"}
# Where a format's segments run, and what runs them; pt2 and aoti keep the device type they were exported on (a
# CUDA export runs on each rank's current GPU).
_FORMAT_DEVICES = {"onnx": ("cpu", "onnxruntime's CPU provider"), "tensorrt": ("cuda", "TensorRT")}
SEGMENT_DIR = "segments"
# Where export_pipeline writes a pipeline's ControlNet, in its denoiser's export directory.
CONTROLNET_DIR = "controlnet"
# The pipeline arguments every export_pipeline manifest records under ``pipeline``; any others there are the
# call's ``pipeline_kwargs``.
PIPELINE_ARGUMENTS = ("height", "width", "guidance_scale")
# Values diffusers pipelines read from submodules of their denoiser or ControlNet. A loaded export has no
# submodules, so these are recorded at export where they are plain values: SDXL pipelines check the added
# time embedding's size, Flux ControlNet pipelines whether the ControlNet has an input_hint_block (None).
RECORDED_ATTRIBUTES = ("add_embedding.linear_1.in_features", "input_hint_block")
# Protobuf cannot serialize 2 GiB; bigger ONNX segments keep their weights in a file beside them.
_ONNX_INLINE_LIMIT = 1 << 30
_COLLECTIVES: dict[str, Callable[..., Any]] = {f.__name__: f for f in (*ops.COLLECTIVE_STARTS, ops.wait)}
# Opened segments by (file, sha256, device), alive while a loaded module uses them. Guarded by the lock,
# which also serializes torch.export.load (it keeps state in globals) across simulated ranks.
_OPENED: weakref.WeakValueDictionary[tuple[str, str, str], Callable[..., tuple]] = weakref.WeakValueDictionary()
_LOAD_LOCK = threading.Lock()


def _require(what: str, *modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{what} needs the packages {missing}: pip install 'distrifx[onnx]' "
                          "(onnx, onnxruntime, onnxscript).")


# -- describing inputs ---------------------------------------------------------------------------
def _describe(leaf: object) -> dict[str, Any]:
    """A JSON description of an input leaf: what the exported graphs are specialized to."""
    kind, *rest = _leaf_key(leaf)
    if kind == "T":
        shape, dtype, device = rest
        return {"kind": "tensor", "shape": list(shape), "dtype": dtype_name(dtype), "device": device}
    if kind == "G":
        return {"kind": "generator", "device": rest[0]}
    return {"kind": "constant", "repr": rest[0]}


def _spell(description: Mapping[str, Any]) -> str:
    if description["kind"] == "tensor":
        return f"a {description['dtype']} tensor of shape {tuple(description['shape'])} on {description['device']}"
    if description["kind"] == "generator":
        return f"a torch.Generator on {description['device']}"
    return f"the value {description['repr']}"


def _positional_names(model: nn.Module, count: int) -> list[str] | None:
    """Names of the first ``count`` positional parameters of ``model.forward`` (None: ``*args``)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
    return names[:count] if count <= len(names) else None


# -- example inputs from a simulated run ---------------------------------------------------------
def _static_key(segment: GraphModule) -> tuple:
    """Identical code on identical weight tensors: the same program (ranks share most segments)."""
    weights = tuple((n.target, id(operator.attrgetter(n.target)(segment))) for n in segment.graph.nodes
                    if n.op == "get_attr")
    return segment.code, weights


@dataclass
class _Examples:
    """Per (rank, phase, segment): its distinct-segment key; per key: the first example inputs."""

    keys: dict[tuple[int, str, str], tuple] = dataclasses.field(default_factory=dict)
    inputs: dict[tuple, tuple[tuple[int, int, int], tuple]] = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def hook(self, rank: int, phase_index: int, phase: str, index: int, name: str, segment: GraphModule) -> Callable:
        static = _static_key(segment)
        order = (rank, phase_index, index)  # the lowest occurrence wins: files do not depend on thread timing

        def record(_module: nn.Module, args: tuple) -> None:
            if not all(isinstance(a, torch.Tensor) for a in args):
                kinds = [type(a).__name__ for a in args]
                raise DistrifxError(f"rank {rank} {phase} {name}: segment inputs must be tensors, got {kinds}")
            key = (static, tuple((tuple(a.shape), a.dtype) for a in args))
            with self.lock:
                self.keys[(rank, phase, name)] = key
                if key not in self.inputs or order < self.inputs[key][0]:
                    # Clones: one activation feeds several segments, and exporters merge inputs
                    # that alias one tensor, which would join segments in the ONNX union.
                    self.inputs[key] = (order, tuple(a.detach().clone() for a in args))

        return record


def _record_examples(splits: list[dict[str, GraphModule]], out_spec: TreeSpec, flat: list[Any],
                     phases: tuple[str, ...]) -> _Examples:
    """Run every rank's phases in order (state carried, so the stale graph sees real state)."""
    examples = _Examples()
    handles = [
        segment.register_forward_pre_hook(examples.hook(rank, p, phase, i, name, segment))
        for rank, graphs in enumerate(splits)
        for p, phase in enumerate(phases)
        for i, (name, segment) in enumerate(segments(graphs[phase]))
    ]

    def run(group: SimulatedGroup) -> None:
        program = RankProgram(graphs=splits[group.rank], out_spec=out_spec)
        state: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for phase in phases:
                _, state = program.run(phase, group, flat, state)

    try:
        simulate(run, len(splits))
    finally:
        for handle in handles:
            handle.remove()
    return examples


# -- writing segments ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Distinct:
    """One segment file to write: the module and the example inputs it is exported with."""

    file: str
    origin: str  # where it first occurs, for errors: "rank 0, phase sync, segment_3"
    module: GraphModule
    example: tuple[torch.Tensor, ...]


def _torch_export(d: _Distinct) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(d.module, d.example, strict=False)
    except Exception as exc:
        raise DistrifxError(f"torch.export failed on {d.origin} (to be written to {d.file}): "
                            f"{type(exc).__name__}: {exc}") from exc


def _save_pt2(program: torch.export.ExportedProgram, example: tuple, path: Path) -> None:
    """The segment's ``torch.export`` archive as it is; the program's steps name its inputs and outputs."""
    torch.export.save(program, path)


def _per_segment(tool: str, write_segment: Callable[[torch.export.ExportedProgram, tuple, Path], None],
                 instead: str = "\nformat='pt2' stores the same program without compiling it."
                 ) -> Callable[[list[_Distinct], Path], dict[str, dict[str, Any]]]:
    """A writer of one file per segment: its ``torch.export`` program written by ``tool`` (compiled ahead
    of time, or saved as it is); ``instead`` ends the error if ``tool`` fails."""

    def write(distinct: list[_Distinct], out: Path) -> dict[str, dict[str, Any]]:
        for d in distinct:
            program = _torch_export(d)
            try:
                write_segment(program, d.example, out / d.file)
            except Exception as exc:
                raise DistrifxError(f"{tool} failed on {d.origin} (to be written to {d.file}): "
                                    f"{type(exc).__name__}: {exc}{instead}") from exc
        return {}

    return write


def _union(distinct: list[_Distinct]) -> tuple[GraphModule, list[str], list[str], list[torch.Tensor]]:
    """All segments side by side in one graph (disjoint), inputs and outputs named per segment."""
    graph = Graph()
    in_names, out_names, outs, example = [], [], [], []
    attrs: dict[str, torch.Tensor] = {}
    for k, d in enumerate(distinct):
        env: dict[Node, Node] = {}
        for node in d.module.graph.nodes:
            if node.op == "placeholder":
                in_names.append(f"s{k}_{node.name}")
                env[node] = graph.placeholder(in_names[-1])
            elif node.op == "output":
                outs += [env[o] for o in node.args[0]]
                out_names += [f"s{k}_out{i}" for i in range(len(node.args[0]))]
            else:
                if node.op == "get_attr":
                    attrs[node.target] = operator.attrgetter(node.target)(d.module)
                env[node] = graph.node_copy(node, env.__getitem__)
        example += d.example
    graph.output(tuple(outs))
    return GraphModule(attrs, graph), in_names, out_names, example


def _write_onnx(distinct: list[_Distinct], out: Path) -> dict[str, dict[str, Any]]:
    """One exporter run over the union of the segments, then one file per segment.

    The exporter's fixed cost per call (about a second: it rebuilds its op registry) dominates
    small segments, so the segments are exported together and cut apart with ``onnx.utils``.
    """
    import onnx
    import onnx.utils

    union, in_names, out_names, example = _union(distinct)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "union.onnx"
        try:
            # optimize=False: onnxscript's rewriter is quadratic in graph size here (minutes for a
            # tiny UNet); onnxruntime optimizes each segment when it opens it.
            torch.onnx.export(torch.export.export(union, tuple(example), strict=False), (), str(path),
                              dynamo=True, input_names=in_names, output_names=out_names, external_data=True,
                              verbose=False, optimize=False)
        except Exception as exc:
            raise DistrifxError(f"torch.onnx.export failed on the compute segments: {type(exc).__name__}: {exc}\n"
                                "format='pt2' stores the same program with torch.export.") from exc
        model = onnx.load(str(path))
    extractor = onnx.utils.Extractor(model)
    layout: dict[str, dict[str, Any]] = {}
    for k, d in enumerate(distinct):
        ins = [name for name in in_names if name.startswith(f"s{k}_")]
        outs = [name for name in out_names if name.startswith(f"s{k}_out")]
        piece = extractor.extract_model(ins, outs)
        external = sum(len(t.raw_data) for t in piece.graph.initializer) > _ONNX_INLINE_LIMIT
        onnx.save_model(piece, str(out / d.file), save_as_external_data=external,
                        location=Path(d.file).name + ".data" if external else None)
        layout[d.file] = {"inputs": ins, "outputs": outs}
    return layout


_WRITERS: dict[str, Callable[[list[_Distinct], Path], dict[str, dict[str, Any]]]] = {
    "pt2": _per_segment("torch.export.save", _save_pt2, instead=""),
    "aoti": _per_segment("AOTInductor", aoti.write_segment),
    "onnx": _write_onnx,
    "tensorrt": _per_segment("torch-tensorrt", tensorrt.write_segment),
}


# -- the program as JSON ------------------------------------------------------------------------
def _literal(value: object, where: str) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise DistrifxError(f"{where}: cannot store {value!r} ({type(value).__name__}) in the manifest")


def _json_safe(value: object, where: str) -> object:
    """``value`` as JSON: mappings, lists (tuples become lists), paths and enums as strings/values."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, enum.Enum):
        return _json_safe(value.value, where)
    return _literal(value, where)


def _option_value(value: object) -> object:
    """An option's value as the manifest stores it: enums by value, dtypes by name, tuples as lists."""
    return dtype_name(value) if isinstance(value, torch.dtype) else _json_safe(value, "options")


def _option_fields() -> list[dataclasses.Field]:
    """The fields of :class:`ParallelConfig` that the manifest's ``options`` store."""
    return [f for f in dataclasses.fields(ParallelConfig) if f.name not in _NOT_OPTIONS]


def _stored_options(config: ParallelConfig) -> dict[str, Any]:
    """The manifest's ``options``: those of ``config``, as JSON."""
    return {f.name: _option_value(getattr(config, f.name)) for f in _option_fields()}


def _read_options(options: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """:class:`ParallelConfig`'s keyword arguments from a manifest's ``options`` (those it predates: defaults)."""
    if missing := [name for name in FIRST_OPTIONS if name not in options]:
        raise ArtifactError(f"{path}: the entry 'options' lacks {missing}; the file was damaged or edited. "
                            "Export again.")
    return {f.name: options.get(f.name, _option_value(f.default)) for f in _option_fields()}


def _describe_model(model: nn.Module) -> dict[str, Any]:
    """What pipelines read from the model besides calling it, where the model has it."""
    described: dict[str, Any] = {"class": type(model).__name__, "module": type(model).__module__, "recorded": {}}
    config = getattr(model, "config", None)
    if isinstance(config, Mapping):  # diffusers' FrozenDict
        described["config"] = _json_safe(config, "config")
    for name in ("dtype", "device"):
        value = getattr(model, name, None)
        if isinstance(value, (torch.dtype, torch.device)):
            described[name] = str(value).removeprefix("torch.")
    for path in RECORDED_ATTRIBUTES:
        with contextlib.suppress(AttributeError):
            value = operator.attrgetter(path)(model)
            if value is None or isinstance(value, (bool, int, float, str)):  # a submodule cannot be stored
                described["recorded"][path] = value
    if isinstance(nets := getattr(model, "nets", None), nn.ModuleList):  # MultiControlNetModel's, read by pipelines
        described["nets"] = [_describe_model(net) for net in nets]
    return described


def _program(split: GraphModule, files: Mapping[str, str]) -> dict[str, Any]:
    """The steps of a split rank graph: compute (file), collective start (op, args), wait."""
    steps: list[dict[str, Any]] = []
    inputs: list[str] = []
    outputs: list[str] = []
    for node in split.graph.nodes:
        if node.op == "placeholder":
            inputs.append(node.name)
        elif is_segment(node):
            results = {user.args[1]: user.name for user in node.users}
            steps.append({"op": "compute", "file": files[str(node.target)],
                          "inputs": [a.name for a in node.args], "outputs": [results[i] for i in range(len(results))]})
        elif ops.is_start(node) or ops.is_wait(node):
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments
            tensors = {k: v.name for k, v in bound.items() if isinstance(v, Node) and v.name != inputs[0]}
            statics = {k: _literal(v, node.name) for k, v in bound.items() if not isinstance(v, Node)}
            steps.append({"op": node.target.__name__, "inputs": tensors, "args": statics, "outputs": [node.name]})
        elif node.op == "output":
            outputs = [o.name for o in node.args[0]]
        elif not (node.op == "call_function" and node.target is operator.getitem and is_segment(node.args[0])):
            raise DistrifxError(f"cannot export node {node.format_node()}: only segments and collectives are stored")
    sig: RankSignature = split.meta[META_SIGNATURE]
    return {"inputs": inputs, "outputs": outputs, "steps": steps, "signature": dataclasses.asdict(sig)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _distinct_segments(splits: list[dict[str, GraphModule]], phases: tuple[str, ...], examples: _Examples,
                       format: str) -> tuple[list[_Distinct], dict[tuple[int, str], dict[str, str]]]:
    """The files to write (one per distinct segment) and, per (rank, phase), each segment's file."""
    files: dict[tuple, str] = {}  # distinct-segment key -> file
    segment_files: dict[tuple[int, str], dict[str, str]] = {}
    distinct: list[_Distinct] = []
    for rank, graphs in enumerate(splits):
        for phase in phases:
            for name, segment in segments(graphs[phase]):
                key = examples.keys[(rank, phase, name)]
                if key not in files:
                    files[key] = f"{SEGMENT_DIR}/{len(distinct):03d}.{_SUFFIXES[format]}"
                    origin = f"rank {rank}, phase {phase}, {name}"
                    distinct.append(_Distinct(files[key], origin, segment, examples.inputs[key][1]))
                segment_files.setdefault((rank, phase), {})[name] = files[key]
    return distinct, segment_files


def _input_signature(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """What the loaded module checks calls against, and how it binds arguments by name."""
    flat, in_spec = tree_flatten((args, kwargs))
    names = [path for path, _ in _leaf_paths(list(inspect.signature(model.forward).parameters), args, kwargs)]
    return {
        "positional": _positional_names(model, len(args)),
        "keywords": list(kwargs),
        "names": names,
        "leaves": [_describe(leaf) for leaf in flat],
        "timestep": names.index("timestep") if "timestep" in names else None,  # as ParallelModule finds it
        "in_spec": treespec_dumps(in_spec),
    }


def _check_target(out: Path) -> None:
    """Refuse, before any work, an ``out`` that is not a new or empty directory or a distrifx export."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file: export into a directory (a new one, or a previous export's).")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        raise ConfigError(f"{out} is not empty and holds no {MANIFEST}: choose a new directory for the export.")
    try:
        read_manifest(out)
    except ArtifactError as exc:
        raise ConfigError(f"{out} holds a {MANIFEST} that is not a distrifx export this distrifx reads, so the "
                          f"export does not replace it ({exc}). Choose a new directory, or delete {out} if it is "
                          "an old or damaged export.") from exc


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A new hidden directory in ``out`` to write an export in, moved into place when the block succeeds.

    On a failure it is deleted, and ``out`` is as it was: a previous export there still loads. Being in
    ``out``, it is on the same file system (the moves are renames) and writable wherever ``out`` is.
    """
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".distrifx-export-", dir=out) as tmp:
        built = Path(tmp)
        (built / SEGMENT_DIR).mkdir()
        yield built
        _swap_in(built, out)


def _swap_in(built: Path, out: Path) -> None:
    """Replace the segments and manifest in ``out`` (a previous export's, or none) by those in ``built``.

    The previous segments go into ``built``, to be deleted with it; other files in ``out`` stay.
    """
    if (out / SEGMENT_DIR).exists():
        os.replace(out / SEGMENT_DIR, built / "replaced")
    os.replace(built / SEGMENT_DIR, out / SEGMENT_DIR)
    os.replace(built / MANIFEST, out / MANIFEST)


def _check_format(format: str, flat: list[Any]) -> None:
    """Refuse, before any work, a format this machine or these inputs cannot produce."""
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not valid; choose one of {FORMATS}.")
    if format == "onnx":
        _require("distrifx.export(format='onnx')", "onnx", "onnxscript")
    if format == "aoti":
        aoti.require_compiler("distrifx.export(format='aoti')")
    if format == "tensorrt":
        tensorrt.require_tensorrt("distrifx.export(format='tensorrt')")
    if format in _FORMAT_DEVICES:
        device, runtime = _FORMAT_DEVICES[format]
        if others := sorted({x.device.type for x in flat if isinstance(x, torch.Tensor)} - {device}):
            raise ConfigError(f"format={format!r} runs on {runtime}: export with the model and inputs on {device} "
                              f"(got inputs on {others}), or use format='pt2', which keeps the device.")


def _patch_programs(model: nn.Module, config: ParallelConfig, args: tuple, kwargs: dict
                    ) -> tuple[CapturedProgram, list[dict[str, GraphModule]], list[Any], bool]:
    """Every patch rank's split phase graphs, built as :class:`ParallelModule` builds them.

    Returns the capture, the graphs, the flat inputs of one patch group and whether the call is
    CFG-split: then each batch half runs on ``world_size / 2`` patch ranks, and as both halves
    have the same shapes, patch rank r of either half runs the same program.
    """
    flat, spec = tree_flatten((args, kwargs))
    batch = batch_size(flat)
    cfg_split = wants_split(config.cfg_parallel, config.world_size, batch)
    if cfg_split:
        flat = batch_half(flat, batch, 0)
        args, kwargs = tree_unflatten(flat, spec)
    captured = capture(model, args, kwargs)
    patch = dataclasses.replace(config, world_size=config.world_size // 2 if cfg_split else config.world_size,
                                cfg_parallel=False)
    name = type(model).__name__
    splits = [
        {phase: split_segments(gm) for phase, gm in build_program(captured, patch, rank, name).graphs.items()}
        for rank in range(patch.world_size)
    ]
    return captured, splits, flat, cfg_split


def export(
    model: nn.Module,
    out_dir: str | os.PathLike,
    world_size: int,
    *,
    args: tuple = (),
    kwargs: dict | None = None,
    mode: Mode | Literal["sync", "stale", "naive"] = "stale",
    warmup_steps: int = 4,
    warmup_fraction: float = 0.0,
    gn_variant: GNVariant | Literal["corrected", "sync", "stale", "separate"] = "corrected",
    kv_exchange: KVExchange | Literal["auto", "kv", "hidden"] = "auto",
    cfg_parallel: bool | Literal["auto"] = "auto",
    stale_dtype: torch.dtype | Literal["bfloat16", "float16"] | None = None,
    extrapolate: float = 0.0,
    fresh: Sequence[Literal["halo", "kv"]] = (),
    bucket_mb: float = 0.0,
    gather_outputs: bool = True,
    format: Literal["pt2", "aoti", "onnx", "tensorrt"] = "pt2",
    pipeline: Mapping[str, Any] | None = None,
) -> Path:
    """Write every rank's program for ``model(*args, **kwargs)`` to ``out_dir``; return the manifest path.

    Runs in one process, without a process group. ``mode``, ``warmup_steps``, ``warmup_fraction``,
    ``gn_variant``, ``kv_exchange``, ``cfg_parallel``, ``stale_dtype``, ``extrapolate``, ``fresh``, ``bucket_mb`` and
    ``gather_outputs`` are those of
    :func:`distrifx.parallelize`: with an even batch and world size (and ``cfg_parallel`` not False)
    each rank's program handles half the batch, patch-parallel over ``world_size / 2`` ranks. The
    files are specialized to the shapes, dtypes and device of ``args``/``kwargs`` and to ``world_size``. ``pipeline`` (JSON values) is
    stored in the manifest as the pipeline arguments the call came from (see
    :func:`export_pipeline`). Load the files on each rank with :func:`load`. ``out_dir`` is a new or empty
    directory or a previous export, whose segments and manifest are replaced once the new export is complete
    (it is written in a hidden directory in ``out_dir`` first; a failed export leaves the previous one as it was).

    Example:
        >>> distrifx.export(unet, "unet-2r", 2, args=(x, t), kwargs={"encoder_hidden_states": ctx},
        ...                 mode="stale", format="onnx")                          # doctest: +SKIP
        PosixPath('unet-2r/manifest.json')
    """
    import distrifx

    kwargs = dict(kwargs or {})
    _check_format(format, tree_flatten((tuple(args), kwargs))[0])
    config = ParallelConfig(world_size=world_size, mode=mode, warmup_steps=warmup_steps,
                            warmup_fraction=warmup_fraction, gn_variant=gn_variant, kv_exchange=kv_exchange,
                            cfg_parallel=cfg_parallel, stale_dtype=stale_dtype, extrapolate=extrapolate, fresh=fresh,
                            bucket_mb=bucket_mb, gather_outputs=gather_outputs)
    out = Path(out_dir)
    _check_target(out)
    model = model.eval()
    captured, splits, flat, cfg_split = _patch_programs(model, config, tuple(args), kwargs)
    phases = phases_for(config.mode)
    examples = _record_examples(splits, captured.out_spec, flat, phases)

    distinct, segment_files = _distinct_segments(splits, phases, examples, format)
    with _staged(out) as built:
        layout = _WRITERS[format](distinct, built)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "format": format,
            "distrifx_version": distrifx.__version__,
            "torch_version": torch.__version__,
            "model": _describe_model(model),
            "world_size": world_size,
            "cfg_split": cfg_split,
            "options": _stored_options(config),
            "pipeline": None if pipeline is None else _json_safe(pipeline, "pipeline"),
            "inputs": _input_signature(model, tuple(args), kwargs),
            "out_spec": treespec_dumps(captured.out_spec),
            "segments": layout,
            "ranks": [
                {phase: _program(graphs[phase], segment_files[(rank, phase)]) for phase in phases}
                for rank, graphs in enumerate(splits)
            ],
            "files": {str(p.relative_to(built)): _sha256(p) for p in sorted((built / SEGMENT_DIR).iterdir())},
        }
        if format == "tensorrt":
            manifest["engine_runtime"] = tensorrt.engine_runtime()
        (built / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out / MANIFEST


# -- exporting a pipeline's denoiser -------------------------------------------------------------
class _FirstCall(Exception):
    """Raised by the recording hook to stop a pipeline at its first denoiser call."""


def denoiser_call(pipe: Any, **call: Any) -> tuple[str, nn.Module, tuple, dict]:
    """``pipe``'s denoiser (attribute name, module) and the arguments of its first call in ``pipe(**call)``.

    The pipeline runs up to that call and stops there: nothing after it is computed.

    Example:
        >>> name, unet, args, kwargs = denoiser_call(pipe, prompt="", height=512, width=512)  # doctest: +SKIP
        >>> name, sorted(kwargs)
        ('unet', ['added_cond_kwargs', 'cross_attention_kwargs', 'encoder_hidden_states', 'return_dict', ...])
    """
    name = _denoiser_name(pipe)
    return name, getattr(pipe, name), *_first_calls(pipe, [name], call)[name]


def _first_calls(pipe: Any, names: Sequence[str], call: Mapping[str, Any]) -> dict[str, tuple[tuple, dict]]:
    """The arguments of the first call of each of ``pipe``'s modules ``names`` in ``pipe(**call)``.

    The pipeline stops at the first call of the last one: name them in the order the pipeline calls them.
    """
    seen: dict[str, tuple[tuple, dict]] = {}

    def recorder(name: str) -> Callable[[nn.Module, tuple, dict], None]:
        def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen.setdefault(name, (args, kwargs))
            if name == names[-1]:
                raise _FirstCall
        return record

    handles = [getattr(pipe, name).register_forward_pre_hook(recorder(name), with_kwargs=True) for name in names]
    try:
        pipe(**call)
    except _FirstCall:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if missing := [name for name in names if name not in seen]:
        raise DistrifxError(f"{type(pipe).__name__} returned without calling its {missing} (called with "
                            f"{sorted(call)}); export them with distrifx.export and example inputs instead.")
    return seen


def _call_default(pipe: Any, argument: str) -> Any:
    """The default of ``argument`` in ``pipe.__call__`` (None if it has none)."""
    parameter = inspect.signature(pipe.__call__).parameters.get(argument)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def export_pipeline(pipe: Any, out_dir: str | os.PathLike, world_size: int, *, height: int, width: int,
                    guidance_scale: float | None = None, pipeline_kwargs: Mapping[str, Any] | None = None,
                    **options: Any) -> Path:
    """Export ``pipe``'s denoiser, and its ControlNet, exactly as the pipeline calls them at ``height`` x ``width``.

    The pipeline runs up to its first denoiser call (:func:`denoiser_call`) and :func:`export`
    stores that call: its arguments (``return_dict``, ``added_cond_kwargs``, ...), shapes, dtypes
    and batch (doubled by classifier-free guidance when ``guidance_scale`` > 1; None: the
    pipeline's default). ``pipeline_kwargs`` are further pipeline arguments that shape the
    denoiser's inputs (SD 3's ``max_sequence_length``); later calls must pass the same. The manifest
    records them with height, width and the guidance scale. A ``pipe.controlnet`` is exported too,
    into ``out_dir/controlnet``, called on a blank conditioning image (the pipeline resizes every image
    to height x width), with its residuals kept on the ranks that add them, as
    :func:`distrifx.parallelize_pipeline` splits it; with ``pipeline_kwargs={"guess_mode": True}``
    gathered whole (in guess mode it sees half the denoiser's guidance batch), for guess-mode calls
    only. ``options`` are those of :func:`export`. Load with :func:`load_pipeline` on every rank.

    Example:
        >>> distrifx.export_pipeline(pipe, "sd-2r", 2, height=512, width=512, mode="stale")  # doctest: +SKIP
        >>> pipe = distrifx.load_pipeline(pipe, "sd-2r")      # on every rank
        >>> image = pipe("a lighthouse", height=512, width=512).images[0]
    """
    if reserved := sorted(set(pipeline_kwargs or {}) & {*PIPELINE_ARGUMENTS, "prompt", "num_inference_steps"}):
        raise ConfigError(f"export_pipeline: pipeline_kwargs {reserved} are export_pipeline's own arguments (height, "
                          "width, guidance_scale) or each generation's (prompt, num_inference_steps); pass the first "
                          "as arguments and drop the others.")
    if "gather_outputs" in options:
        raise ConfigError("export_pipeline takes no gather_outputs: the pipeline's scheduler needs the denoiser's "
                          "whole output, and a ControlNet's residuals are kept on their ranks already.")
    out = Path(out_dir)
    controlnet = pipeline_controlnet(pipe)
    _check_target(out)
    _check_target(out / CONTROLNET_DIR)
    if guidance_scale is None:
        guidance_scale = _call_default(pipe, "guidance_scale")
    call = {"height": height, "width": width, "guidance_scale": guidance_scale, **(pipeline_kwargs or {})}
    name = _denoiser_name(pipe)
    run = {"prompt": "", "num_inference_steps": 2, **{k: v for k, v in call.items() if v is not None}}
    names = [name]
    if controlnet is not None:
        names.insert(0, "controlnet")  # the order the pipeline calls them
        run.setdefault(control_image_argument(pipe), _blank_control_image(controlnet, height, width))
    calls = _first_calls(pipe, names, run)
    args, kwargs = calls[name]
    path = export(getattr(pipe, name), out, world_size, args=args, kwargs=kwargs, pipeline=call, **options)
    if controlnet is not None:
        args, kwargs, guess_mode = controlnet_call(inspect.signature(controlnet.forward), *calls["controlnet"])
        # guess mode: the ControlNet sees half the denoiser's guidance batch, so its residuals are gathered
        export(controlnet, out / CONTROLNET_DIR, world_size, args=args, kwargs=kwargs,
               **{**controlnet_options(options), "gather_outputs": guess_mode})
    elif (out / CONTROLNET_DIR).exists():  # a previous export's, of a pipeline with a ControlNet
        shutil.rmtree(out / CONTROLNET_DIR)
    return path


def _blank_control_image(controlnet: nn.Module, height: int, width: int) -> torch.Tensor | list[torch.Tensor]:
    """A conditioning image of the size the pipeline resizes every image to (one per net of a MultiControlNetModel)."""
    blank = torch.zeros(1, 3, height, width)
    return [blank] * len(controlnet.nets) if isinstance(getattr(controlnet, "nets", None), nn.ModuleList) else blank


# -- loading -------------------------------------------------------------------------------------
def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the export in ``out_dir``, checked to be one this distrifx reads.

    Checked: its version and format, every entry and its JSON type, one program per patch rank. Its ``options``
    are :class:`ParallelConfig`'s keyword arguments, every option included (those the export predates at their
    defaults).
    """
    out = Path(out_dir)
    path = out / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist: {out} is not a distrifx export directory "
                            "(write one with distrifx.export(...)).")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ArtifactError(f"{path} is not valid JSON ({exc}); export again.") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} holds {_json_type(manifest)}, not an object: it is not a distrifx manifest. "
                            "Export again.")
    if manifest.get("manifest_version") != MANIFEST_VERSION or manifest.get("format") not in FORMATS:
        raise ArtifactError(
            f"{path} is manifest version {manifest.get('manifest_version')!r}, format {manifest.get('format')!r}; "
            f"this distrifx reads version {MANIFEST_VERSION}, formats {FORMATS}. Export again with this distrifx."
        )
    _check_fields(manifest, path)
    _check_ranks(manifest, path)
    return {**manifest, "options": _read_options(manifest["options"], path)}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _check_fields(manifest: Mapping[str, Any], path: Path) -> None:
    """Refuse a manifest that lacks one of its entries or holds one of another JSON type."""
    for field, types in _FIELDS.items():
        if field not in manifest:
            raise ArtifactError(f"{path} lacks the entry {field!r}; the file was damaged or edited. Export again.")
        if not isinstance(manifest[field], types):
            wanted = " or ".join(_JSON_TYPES[t] for t in types)
            raise ArtifactError(f"{path}: the entry {field!r} is {_json_type(manifest[field])}, not {wanted}; the "
                                "file was damaged or edited. Export again.")


def _check_ranks(manifest: Mapping[str, Any], path: Path) -> None:
    """Refuse a manifest without one program per patch rank: world_size, or half of it with a CFG split."""
    world, split, count = manifest["world_size"], manifest["cfg_split"], len(manifest["ranks"])
    if world < 1 or (split and world % 2):
        raise ArtifactError(f"{path}: the entry 'world_size' is {world}{' with a CFG split' if split else ''}, "
                            "which no export has (a positive integer, even with a CFG split); the file was damaged "
                            "or edited. Export again.")
    patch = world // 2 if split else world
    if count != patch:
        needs = f"{patch} (one per patch rank of a CFG split)" if split else f"{patch} (one per rank)"
        raise ArtifactError(f"{path}: the entry 'ranks' holds {count} rank programs, but world_size {world} needs "
                            f"{needs}; the file was damaged or edited. Export again.")


def _major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ArtifactError(f"cannot read the version {version!r} in the manifest; export again.")
    return int(match[1]), int(match[2])


def _check_versions(manifest: Mapping[str, Any], out: Path) -> None:
    import distrifx

    if manifest["format"] == "aoti" and manifest["torch_version"] != torch.__version__:
        raise ArtifactError(
            f"{out} holds AOTInductor packages built against torch {manifest['torch_version']}, but this process "
            f"runs torch {torch.__version__}: compiled packages load only under the torch build that compiled "
            f"them. Export again here, or install torch=={manifest['torch_version']}."
        )
    for package, exported, here in (("distrifx", manifest["distrifx_version"], distrifx.__version__),
                                    ("torch", manifest["torch_version"], torch.__version__)):
        if _major_minor(exported) != _major_minor(here):
            wanted = "%d.%d" % _major_minor(exported)
            raise ArtifactError(
                f"{out} was exported with {package} {exported} but this process runs {package} {here}: "
                f"stored programs load only under the {package} major.minor version that wrote them. "
                f"Export again here (distrifx.export) or install {package}=={wanted}.*."
            )


def _check_files(manifest: Mapping[str, Any], out: Path) -> None:
    for name, digest in manifest["files"].items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{out / MANIFEST} lists {name!r}, which is outside the export directory; "
                                "export again.")
        path = out / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing (listed in {out / MANIFEST}): copy the whole export "
                                "directory, or export again.")
        actual = _sha256(path)
        if actual != digest:
            raise ArtifactError(f"{path} changed since it was exported (sha256 {actual[:16]}..., the manifest "
                                f"says {digest[:16]}...): restore the file or export again.")


def _load_communicator(process_group: Any, config: ParallelConfig, out: Path) -> Communicator:
    if isinstance(process_group, Communicator):
        size = process_group.world_size
    elif dist.is_available() and dist.is_initialized():
        size = dist.get_world_size(process_group)
    else:
        raise ProcessGroupError(
            "distrifx.load needs an initialised torch.distributed process group: run under torchrun and "
            "call torch.distributed.init_process_group first, or pass process_group=... (a group from "
            "distrifx.simulate for one process)."
        )
    if size != config.world_size:
        raise ProcessGroupError(
            f"{out} was exported for world_size={config.world_size} but the process group has {size} ranks: "
            f"launch {config.world_size} processes (torchrun --nproc-per-node {config.world_size}) or export "
            f"again with world_size={size}."
        )
    return _communicator(process_group, config)


def _spec_types(node: Any) -> set[str]:
    """Every pytree node type named in a serialized spec (``treespec_dumps`` JSON)."""
    if not isinstance(node, dict):
        return set()
    names = {node["type"]} if node.get("type") else set()
    return names.union(*(_spec_types(child) for child in node.get("children_spec", [])))


def _load_spec(text: str, what: str) -> TreeSpec:
    missing = sorted(t for t in _spec_types(json.loads(text)[1]) if t not in SERIALIZED_TYPE_TO_PYTHON_TYPE)
    if missing:
        modules = sorted({t.rsplit(".", 1)[0] for t in missing})
        raise ArtifactError(
            f"the model's {what} types {missing} are not registered with torch's pytree in this process: "
            f"import {', '.join(modules)} (the modules that define them) before distrifx.load."
        )
    return treespec_loads(text)


class _OnnxSegment:
    """One ONNX segment in an onnxruntime session on the CPU: tensors in, tensors out.

    Tensors pass as numpy arrays, the cheapest call (about 40 us a call here, against about 90 us
    through an IO binding); a segment with a tensor numpy has no dtype for (bfloat16 stale state)
    binds them through DLPack instead.
    """

    NUMPY_LESS = frozenset({"tensor(bfloat16)"})

    def __init__(self, path: Path, inputs: list[str], outputs: list[str]) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # As many threads as torch uses in this rank: ranks on one machine share its cores.
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs, self.outputs = inputs, outputs
        args = (*self.session.get_inputs(), *self.session.get_outputs())
        self.bound = any(arg.type in self.NUMPY_LESS for arg in args)

    def __call__(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = [v.detach().contiguous() for v in values]  # alive until the run ends
        if self.bound:
            return self._run_bound(feeds)
        arrays = {name: v.numpy() for name, v in zip(self.inputs, feeds, strict=True)}
        return tuple(torch.from_numpy(a) for a in self.session.run(self.outputs, arrays))

    def _run_bound(self, feeds: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from onnxruntime import OrtValue

        binding = self.session.io_binding()
        for name, value in zip(self.inputs, feeds, strict=True):
            binding.bind_ortvalue_input(name, OrtValue.from_dlpack(value))
        for name in self.outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return tuple(torch.from_dlpack(value) for value in binding.get_outputs())


def _rank_device(recorded: str) -> torch.device:
    """Where this rank runs what was exported on ``recorded``: for a CUDA export its current GPU (each rank
    of a multi-GPU job its own, whichever GPU the export ran on), else the recorded device."""
    device = torch.device(recorded)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _input_device(manifest: Mapping[str, Any]) -> torch.device:
    """This rank's device for the export's inputs (the first tensor input's, as exported)."""
    return _rank_device(next((leaf["device"] for leaf in manifest["inputs"]["leaves"] if leaf["kind"] == "tensor"),
                             "cpu"))


def _load_pt2(path: Path, device: torch.device) -> Callable[..., tuple]:
    """A torch.export program with its weights and constants on ``device`` (a CUDA export keeps the GPU
    index it was exported on: moved, rank r's copy runs on rank r's GPU)."""
    from torch.export.passes import move_to_device_pass

    program = torch.export.load(str(path))
    if device.type != "cpu":
        program = move_to_device_pass(program, device)
    return program.module()


def _open_segment(out: Path, file: str, manifest: Mapping[str, Any]) -> Callable[..., tuple]:
    """The runnable segment ``file`` on this rank's device; simulated ranks of one process share it (it is
    stateless)."""
    path, format, layout = out / file, manifest["format"], manifest["segments"].get(file)
    device = _input_device(manifest)
    key = (str(path.resolve()), manifest["files"][file], str(device))
    with _LOAD_LOCK:
        if (segment := _OPENED.get(key)) is None:
            if format == "onnx":
                if layout is None:
                    raise ArtifactError(f"the manifest has no input/output names for {path}; export again.")
                segment = _OnnxSegment(path, layout["inputs"], layout["outputs"])
            elif format == "tensorrt":
                segment = tensorrt.load_segment(path)
            elif format == "aoti":
                segment = aoti.load_segment(path, device)
            else:
                segment = _load_pt2(path, device)
            _OPENED[key] = segment
        return segment


@dataclass(frozen=True)
class _Step:
    """One stored step: a segment (positional inputs) or a collective (keyword inputs and args)."""

    fn: Callable[..., Any]
    inputs: tuple[str, ...]
    keywords: tuple[str, ...] | None  # None: a compute segment
    args: Mapping[str, Any]
    outputs: tuple[str, ...]
    takes_comm: bool


class _StoredGraph(nn.Module):
    """A rank's phase program read from the manifest; called like the per-rank GraphModule."""

    def __init__(self, inputs: list[str], steps: list[_Step], outputs: list[str], signature: RankSignature) -> None:
        super().__init__()
        self.inputs, self.steps, self.outputs = tuple(inputs), steps, tuple(outputs)
        self.meta = {META_SIGNATURE: signature}
        defined = set(self.inputs)
        last_use: dict[str, int] = {}
        for index, step in enumerate(steps):
            unknown = [v for v in step.inputs if v not in defined]
            if unknown:
                raise ArtifactError(f"malformed program: step {index} reads {unknown} before they are computed; "
                                    "export again.")
            defined.update(step.outputs)
            last_use.update((v, index) for v in step.inputs)
        if missing := [v for v in self.outputs if v not in defined]:
            raise ArtifactError(f"malformed program: outputs {missing} are never computed; export again.")
        # Drop each intermediate after its last reader, as the generated FX code does.
        self.release: list[list[str]] = [[] for _ in steps]
        for value, index in last_use.items():
            if value not in self.outputs:
                self.release[index].append(value)

    def forward(self, comm: Communicator, *values: Any) -> tuple:
        env = dict(zip(self.inputs, (comm, *values)))
        for step, dead in zip(self.steps, self.release):
            args = [env[v] for v in step.inputs]
            if step.keywords is None:
                results = step.fn(*args)
            else:
                extra = {"comm": comm} if step.takes_comm else {}
                results = (step.fn(**extra, **dict(zip(step.keywords, args)), **step.args),)
            env.update(zip(step.outputs, results))
            for value in dead:
                del env[value]
        return tuple(env[v] for v in self.outputs)


def _stored_graph(program: Mapping[str, Any], manifest: Mapping[str, Any], out: Path,
                  opened: dict[str, Callable[..., tuple]]) -> _StoredGraph:
    steps = []
    for step in program["steps"]:
        op = step["op"]
        if op == "compute":
            file = step["file"]
            if file not in manifest["files"]:
                raise ArtifactError(f"the program uses {file}, which the manifest does not list; export again.")
            if file not in opened:
                opened[file] = _open_segment(out, file, manifest)
            steps.append(_Step(opened[file], tuple(step["inputs"]), None, {}, tuple(step["outputs"]), False))
        elif op in _COLLECTIVES:
            fn = _COLLECTIVES[op]
            steps.append(_Step(fn, tuple(step["inputs"].values()), tuple(step["inputs"]), step["args"],
                               tuple(step["outputs"]), "comm" in inspect.signature(fn).parameters))
        else:
            raise ArtifactError(f"unknown step {op!r} in the manifest; this distrifx runs {sorted(_COLLECTIVES)} "
                                "and compute steps. Export again with this distrifx.")
    sig = program["signature"]
    signature = RankSignature(sig["num_user_inputs"], sig["num_user_outputs"], tuple(sig["state_in"]),
                              tuple(sig["state_out"]))
    return _StoredGraph(program["inputs"], steps, program["outputs"], signature)


class RecordedAttributes:
    """Read-only values of a model's submodule recorded at export: ``unet.add_embedding.linear_1.in_features``.

    ``values`` maps dotted paths from the model (``"add_embedding.linear_1.in_features"``) to
    values; this object stands for the submodule at ``path`` (``"add_embedding"``).
    """

    def __init__(self, path: str, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        path = f"{self._path}.{name}"
        if path in self._values:
            return self._values[path]
        if any(key.startswith(path + ".") for key in self._values):
            return RecordedAttributes(path, self._values)
        raise AttributeError(f"{path} was not recorded at export; a loaded export keeps only "
                             f"{sorted(self._values)} of the model's submodules (distrifx.export.RECORDED_ATTRIBUTES).")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self._path} is a read-only record of the exported model")


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"the manifest names the dtype {name!r}, which this torch does not have; export again.")
    return dtype


def _model_attributes(model: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes a loaded module answers for the model: its config, dtype, device, recorded values."""
    attributes: dict[str, Any] = {}
    if "config" in model:
        from diffusers.configuration_utils import FrozenDict

        attributes["config"] = FrozenDict(model["config"])
    if "dtype" in model:
        attributes["dtype"] = _torch_dtype(model["dtype"])
    if "device" in model:
        attributes["device"] = _rank_device(model["device"])
    for path, value in model["recorded"].items():
        top = path.split(".")[0]
        attributes[top] = value if top == path else RecordedAttributes(top, model["recorded"])
    if "nets" in model:  # what pipelines read from each of a MultiControlNetModel's nets
        attributes["nets"] = [types.SimpleNamespace(**_model_attributes(net)) for net in model["nets"]]
    return attributes


def _model_class(model: Mapping[str, Any]) -> type | None:
    """The exported model's class, where this process has imported its module (None elsewhere).

    Only a module already imported is looked in: reading a manifest imports nothing.
    """
    cls = getattr(sys.modules.get(model.get("module", "")), model["class"], None)
    return cls if isinstance(cls, type) else None


class ExportedModule(SteppedModule):
    """A stored program on this rank: called like the exported model, returns what it returned.

    Steps and phases are tracked like :class:`~distrifx.runtime.module.ParallelModule`: a new
    generation starts when the timestep stops decreasing or on :meth:`reset`; stale mode runs the
    warm-up graph for ``warmup_steps`` calls (and over ``warmup_fraction`` of the timesteps), then the
    stale graph with the state it carries. With a CFG split, the batch halves run on two rank groups,
    as in ``ParallelModule``.

    It answers what diffusers pipelines read from their denoiser, as recorded from the model at
    export: ``config`` (a diffusers ``FrozenDict``), ``dtype``, ``device`` and the values in
    :data:`RECORDED_ATTRIBUTES`; ``cache_context`` is a no-op. So ``pipe.unet = distrifx.load(dir)``
    works in an unmodified pipeline. Features that need the model's modules (IP adapters, attention
    processors, FreeU) need the model: use :func:`distrifx.parallelize` for those.

    Example:
        >>> unet = distrifx.load("unet-2r")                                       # doctest: +SKIP
        >>> for t in timesteps:
        ...     noise = unet(latents, t, encoder_hidden_states=ctx).sample
        >>> unet.last_phase, unet.config.in_channels
        ('stale', 4)
    """

    def __init__(self, directory: Path, inputs: Mapping[str, Any], in_spec: TreeSpec, config: ParallelConfig,
                 comm: Communicator, cfg: CfgSplit | None, program: RankProgram, attributes: Mapping[str, Any],
                 model_class: type | None = None) -> None:
        super().__init__(config, comm)  # comm: every rank; with a CFG split, cfg.patch is this rank's patch group
        self.directory = directory
        self.cfg = cfg
        self.program = program
        self._inputs = inputs
        self._in_spec = in_spec
        self._attributes = dict(attributes)
        self._model_class = model_class

    @property
    def model_class(self) -> type:
        """The exported model's class where its module is imported here (else this class): what a
        :class:`~distrifx.ParallelControlNet` around this module answers to ``isinstance``."""
        return self._model_class or type(self)

    @property
    def call_signature(self) -> inspect.Signature | None:
        """How calls bind: the exported call's arguments by name (None for a ``forward(*args)`` model)."""
        positional, keywords = self._inputs["positional"], self._inputs["keywords"]
        if positional is None:
            return None
        kinds = [(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in positional]
        kinds += [(n, inspect.Parameter.KEYWORD_ONLY) for n in keywords]
        return inspect.Signature([inspect.Parameter(name, kind) for name, kind in kinds])

    def _missing(self, name: str) -> Any:
        attributes = self.__dict__.get("_attributes", {})
        if name in attributes:
            return attributes[name]
        raise AttributeError(
            f"{type(self).__name__} has no attribute {name!r}: a loaded export answers only what was recorded "
            f"from the model at export ({sorted(attributes)}). Features that need the model's modules (IP "
            "adapters, attention processors, FreeU) need the model itself: use distrifx.parallelize.")

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """What diffusers pipelines enter around each call for their cache hooks; a stored program has none."""
        yield

    def _arrange(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The call in the exported structure: positional and keyword arguments bound by name."""
        positional, keywords = self._inputs["positional"], self._inputs["keywords"]
        if positional is None:  # a forward(*args) model: only the exported structure is known
            return args, kwargs
        if len(args) > len(positional):
            raise InputSignatureError(f"{len(args)} positional arguments given; {self.directory} was exported "
                                      f"with {len(positional)} ({positional}).")
        named = dict(zip(positional, args))
        if twice := sorted(named.keys() & kwargs.keys()):
            raise InputSignatureError(f"arguments {twice} were given both by position and by keyword.")
        named.update(kwargs)
        expected = positional + keywords
        missing = [n for n in expected if n not in named]
        extra = [n for n in named if n not in expected]
        if missing or extra:
            raise InputSignatureError(
                f"{self.directory} was exported for a call with the arguments {expected}; missing {missing}, "
                f"unexpected {extra}. Call it with exactly those, or export again with the new arguments."
            )
        return tuple(named[n] for n in positional), {n: named[n] for n in keywords}

    def _flat_inputs(self, args: tuple, kwargs: dict) -> list[Any]:
        flat, spec = tree_flatten(self._arrange(args, kwargs))
        if spec != self._in_spec:
            raise InputSignatureError(f"the inputs are structured differently from the exported call: expected "
                                      f"{self._in_spec}, got {spec}.")
        for name, leaf, want in zip(self._inputs["names"], flat, self._inputs["leaves"]):
            got = _describe(leaf)
            if got != want:
                raise InputSignatureError(
                    f"input {name!r}: {self.directory} was exported for {_spell(want)}, got {_spell(got)}. "
                    "A stored program is specialized to its input shapes and dtypes: export again with "
                    "inputs like these (distrifx.export(..., args=..., kwargs=...))."
                )
        return flat

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self._flat_inputs(args, kwargs)
        check_same_inputs(self.comm, flat, lambda: self._inputs["names"])
        index = self._inputs["timestep"]
        call = local_call(self.comm, self.cfg is not None, flat, lambda: self.cfg, self.parallel_config.gather_outputs)
        return self._step(call, self.program, flat[index] if index is not None else None, self._in_spec)


def load(out_dir: str | os.PathLike, process_group: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S,
         allow_native_code: bool = False) -> ExportedModule:
    """This rank's stored program from :func:`export`'s ``out_dir``, ready to call like the model.

    Call on every rank (``process_group`` as in :func:`distrifx.parallelize`; a group from
    :func:`distrifx.simulate` works). Refuses, before running anything, a world size other than the
    exported one, a missing or changed file, another distrifx or torch major.minor version, a
    TensorRT export without CUDA or torch-tensorrt, an AOTInductor export without
    ``allow_native_code=True`` (its packages are shared libraries: opening one runs its code, so
    load only exports you trust) or from another torch build; calls with other input shapes or
    dtypes, or with different inputs on different ranks, are refused by the module. An export with
    a CFG split splits the process group into two patch groups here (collectively: every rank loads).

    Example:
        >>> unet = distrifx.load("unet-2r")                                       # doctest: +SKIP
        >>> out = unet(x, t, encoder_hidden_states=ctx).sample
        >>> pipe.unet = distrifx.load("sd-2r")      # an export_pipeline export, in the pipeline
    """
    out = Path(out_dir)
    try:
        manifest = read_manifest(out)
        _check_versions(manifest, out)
        if manifest["format"] == "onnx":
            _require("distrifx.load of an ONNX export", "onnxruntime")
        if manifest["format"] == "tensorrt":
            tensorrt.require_tensorrt("distrifx.load of a format='tensorrt' export", ArtifactError)
            tensorrt.check_engine_runtime(manifest.get("engine_runtime", {}), out)
        if manifest["format"] == "aoti" and not allow_native_code:
            raise ArtifactError(
                f"{out} is an AOTInductor export: its segments are shared libraries, and opening them runs their "
                "code. Pass allow_native_code=True (distrifx generate --allow-native-code) if you trust this "
                "directory (its files match the manifest's sha256 sums, which guards against damage, not against "
                "whoever wrote the manifest); format='pt2' or 'onnx' exports hold no code."
            )
        _check_files(manifest, out)  # hashes every file: after the checks that need no reading
        config = ParallelConfig(world_size=manifest["world_size"], cfg_parallel=manifest["cfg_split"],
                                timeout_s=timeout_s, **manifest["options"])
        in_spec = _load_spec(manifest["inputs"]["in_spec"], "input")
        out_spec = _load_spec(manifest["out_spec"], "output")
        attributes = _model_attributes(manifest["model"])
        comm = _load_communicator(process_group, config, out)
        cfg = CfgSplit.create(comm) if manifest["cfg_split"] else None
        opened: dict[str, Callable[..., tuple]] = {}
        graphs = {phase: _stored_graph(program, manifest, out, opened)
                  for phase, program in manifest["ranks"][cfg.patch.rank if cfg else comm.rank].items()}
        return ExportedModule(out, manifest["inputs"], in_spec, config, comm, cfg, RankProgram(graphs, out_spec),
                              attributes, _model_class(manifest["model"]))
    except KeyError as exc:
        raise ArtifactError(f"{out / MANIFEST} lacks the entry {exc}; it was not written by this distrifx. "
                            "Export again.") from exc


def load_pipeline(pipe: Any, out_dir: str | os.PathLike, process_group: Any = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S, allow_native_code: bool = False,
                  parallel_vae: bool = False) -> Any:
    """Put :func:`export_pipeline`'s export in ``out_dir`` into ``pipe`` on this rank; return ``pipe``.

    Call on every rank. ``pipe.unet`` (``pipe.transformer``) becomes the loaded denoiser and a
    ``pipe.controlnet`` a :class:`~distrifx.ParallelControlNet` of the ControlNet exported beside it,
    whose residuals stay on their ranks (or, exported in guess mode, are gathered whole). As in
    :func:`distrifx.parallelize_pipeline`, every rank starts from rank 0's initial latents and each
    pipeline call begins a generation. With ``parallel_vae=True`` the VAE decoder (the pipeline's own
    model) is patch-parallel too, as :func:`distrifx.parallelize_pipeline` makes it. The other
    arguments after ``out_dir`` are those of :func:`load`.

    Example:
        >>> pipe = distrifx.load_pipeline(pipe, "sd-2r")                       # doctest: +SKIP
        >>> image = pipe("a lighthouse", image=edges, height=512, width=512).images[0]
    """
    out = Path(out_dir)
    name = _denoiser_name(pipe)
    has_controlnet = pipeline_controlnet(pipe) is not None
    if has_controlnet != (out / CONTROLNET_DIR / MANIFEST).is_file():
        raise ArtifactError(
            f"{type(pipe).__name__} {'has' if has_controlnet else 'has no'} controlnet, and {out} holds "
            f"{'none' if has_controlnet else 'one'} ({out / CONTROLNET_DIR}): it was exported from another pipeline. "
            "Export this pipeline with distrifx.export_pipeline.")
    options = dict(process_group=process_group, timeout_s=timeout_s, allow_native_code=allow_native_code)
    denoiser = load(out, **options)
    parallel: list[nn.Module] = [denoiser]
    if has_controlnet:
        controlnet = load(out / CONTROLNET_DIR, **options)
        gathers = controlnet.parallel_config.gather_outputs  # exported in guess mode: whole residuals
        if not gathers and (controlnet.cfg is None) != (denoiser.cfg is None):
            raise ArtifactError(f"{out} and {out / CONTROLNET_DIR} split the guidance batch differently (one over "
                                "two rank groups, one not); they come from different exports. Export the pipeline "
                                "again with distrifx.export_pipeline.")
        pipe.controlnet = ParallelControlNet(controlnet, controlnet if gathers else None)
        parallel.append(pipe.controlnet)
    setattr(pipe, name, denoiser)
    start_alike(pipe, parallel, denoiser.comm)
    if parallel_vae:
        parallelize_pipeline_vae(pipe, denoiser.comm.world_size, process_group, timeout_s)
    return pipe
