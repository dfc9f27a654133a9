"""TensorRT through torch-tensorrt (CUDA only): ``backend="tensorrt"`` and ``distrifx.export(format="tensorrt")``.

Both keep the collectives out of TensorRT, exactly like the inductor backend and the pt2/onnx
exports: only communication-free segments (:func:`~distrifx.backends.segments.split_segments`)
become TensorRT engines, and the collectives run eagerly between them in the scheduled order.

- ``backend="tensorrt"``: every segment goes through ``torch.compile(backend="torch_tensorrt")``;
  its engines are built on the segment's first call, for that input signature.
- ``format="tensorrt"``: every distinct segment's ``torch.export`` program is compiled ahead of
  time (``torch_tensorrt.compile(ir="dynamo")``) and saved as an exported program holding the
  engines (``torch_tensorrt.save``); :func:`distrifx.load` reads it back with ``torch_tensorrt.load``.

``torch_tensorrt`` is imported only here, and only when one of these is asked for. This code
follows torch-tensorrt's documented API but has not been run in this repository (no GPU in CI);
see docs/compile.md.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule

from distrifx.backends.torch_compile import compile_segments as torch_compile_segments
from distrifx.errors import ArtifactError, ConfigError, DistrifxError

__all__ = ["require_tensorrt", "compile_segments", "write_segment", "load_segment", "engine_runtime",
           "check_engine_runtime", "INSTALL"]

INSTALL = 'a CUDA build of torch, then pip install "distrifx[tensorrt]" (torch-tensorrt built for that torch)'


def require_tensorrt(what: str, error: type[DistrifxError] = ConfigError) -> ModuleType:
    """The ``torch_tensorrt`` module; ``error`` saying what is missing and how to install it if there is none.

    Example:
        >>> require_tensorrt("backend='tensorrt'")                           # doctest: +SKIP
        <module 'torch_tensorrt' ...>
    """
    missing = []
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        missing.append(f"a CUDA device (this torch {torch.__version__}, {build}, sees none)")
    if importlib.util.find_spec("torch_tensorrt") is None:
        missing.append("the torch_tensorrt package (not installed)")
    if missing:
        raise error(f"{what} runs TensorRT engines, which need {' and '.join(missing)}. Install {INSTALL}; "
                    "or use backend='inductor' / format='pt2', which run on any device.")
    import torch_tensorrt

    return torch_tensorrt


def compile_segments(gm: GraphModule) -> GraphModule:
    """``gm`` split into segments, each compiled by torch-tensorrt on its first call; ``gm.meta`` is kept."""
    require_tensorrt("backend='tensorrt'")  # importing torch_tensorrt registers its torch.compile backend
    return torch_compile_segments(gm, backend="torch_tensorrt")


def write_segment(program: ExportedProgram, example: tuple[torch.Tensor, ...], path: Path) -> None:
    """Compile one segment's exported program into TensorRT engines; save it as an exported program."""
    trt = require_tensorrt("distrifx.export(format='tensorrt')")
    inputs = list(example)
    compiled = trt.compile(program, ir="dynamo", inputs=inputs)
    trt.save(compiled, str(path), output_format="exported_program", inputs=inputs)


def load_segment(path: Path) -> Callable[..., tuple]:
    """The runnable segment saved by :func:`write_segment` in ``path``."""
    trt = require_tensorrt("distrifx.load of a format='tensorrt' export", ArtifactError)
    return trt.load(str(path)).module()


def engine_runtime() -> dict[str, str]:
    """What TensorRT engines built here are bound to: the torch-tensorrt and TensorRT versions and this
    GPU's compute capability (engines load only on the same TensorRT and GPU architecture)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    major, minor = torch.cuda.get_device_capability()
    return {"torch_tensorrt": installed("torch_tensorrt"), "tensorrt": installed("tensorrt"),
            "compute_capability": f"{major}.{minor}"}


def check_engine_runtime(built: dict[str, str], where: Path) -> None:
    """An ArtifactError naming each difference if the engines in ``where``, built under ``built``
    (:func:`engine_runtime` at export), cannot load here."""
    here = engine_runtime()
    differ = [f"{key} {built[key]} (here: {here[key]})" for key in here if key in built and built[key] != here[key]]
    if differ:
        raise ArtifactError(f"{where} holds TensorRT engines built for {'; '.join(differ)}: engines load only under "
                            "the TensorRT version and on the GPU architecture that built them. Export again on "
                            "this machine.")

