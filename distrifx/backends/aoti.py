"""AOTInductor packages for ``distrifx.export(format="aoti")``.

Every distinct communication-free segment's ``torch.export`` program is compiled ahead of time by
AOTInductor into a ``.pt2`` package: inductor's generated C++ (or CUDA) kernels built into a
shared library, the weights beside it in the archive. The collectives stay outside, run by the
loaded program between segments, as for every other format.

A package is native code for the machine, device and torch build that compiled it, and opening it
runs that code; :func:`distrifx.load` opens one only when the caller says it trusts the export
(``allow_native_code=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.export import ExportedProgram

from distrifx.errors import ConfigError

__all__ = ["require_compiler", "write_segment", "load_segment"]


def require_compiler(what: str) -> str:
    """The C++ compiler AOTInductor will use; :class:`ConfigError` naming the fix if there is none."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        return get_cpp_compiler()
    except Exception as exc:
        raise ConfigError(f"{what} builds each segment with a C++ compiler, and none was found "
                          f"({type(exc).__name__}: {exc}). Install one (apt install g++, or set CXX), or use "
                          "format='pt2', which stores the programs without compiling them.") from exc


def write_segment(program: ExportedProgram, example: tuple[torch.Tensor, ...], path: Path) -> None:
    """Compile one segment's exported program with AOTInductor into the package ``path`` (``*.pt2``).

    ``example`` is unused: the program already holds the shapes it is compiled for.
    """
    from torch._inductor import aoti_compile_and_package

    aoti_compile_and_package(program, package_path=str(path))


def load_segment(path: Path, device: torch.device) -> Callable[..., tuple]:
    """The runnable segment in the package ``path``, on ``device`` (a GPU's index, or the CPU)."""
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(path), device_index=device.index if device.type == "cuda" else -1)
