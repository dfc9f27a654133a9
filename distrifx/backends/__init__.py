"""Backends: what runs a rank's graph (eager FX, or compiled segments between collectives).

:func:`apply_backend` is called on every per-phase graph of a :class:`~distrifx.runtime.program.RankProgram`.
Offline export to files (``torch.export``, ONNX or TensorRT) is :func:`distrifx.export`.
"""

from __future__ import annotations

from torch.fx import GraphModule

from distrifx.backends.segments import is_collective, is_segment, segments, split_segments
from distrifx.config import Backend
from distrifx.errors import ConfigError

__all__ = ["apply_backend", "split_segments", "segments", "is_segment", "is_collective"]


def apply_backend(gm: GraphModule, backend: Backend, freeze: bool = True) -> GraphModule:
    """The module that runs rank graph ``gm`` under ``backend``; it keeps ``gm.meta``. ``freeze=False``
    keeps inductor on a CPU from freezing the weights (see :mod:`distrifx.backends.torch_compile`).

    Example:
        >>> runnable = apply_backend(gm, Backend.INDUCTOR)                  # doctest: +SKIP
        >>> runnable.meta["distrifx.signature"] == gm.meta["distrifx.signature"]
        True
    """
    if backend is Backend.EAGER:
        return gm
    if backend is Backend.INDUCTOR:
        from distrifx.backends.torch_compile import compile_segments  # imports inductor only when asked for

        return compile_segments(gm, backend="inductor", freeze=freeze)
    if backend is Backend.TENSORRT:
        from distrifx.backends import tensorrt

        return tensorrt.compile_segments(gm)
    raise ConfigError(f"backend={backend.value!r} has no implementation in distrifx.backends.apply_backend; "
                      "use 'eager', 'inductor' or 'tensorrt'.")
