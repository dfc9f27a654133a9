"""``backend="inductor"`` and ``backend="tensorrt"``: compile every communication-free segment.

The rank graph is split with :func:`~distrifx.backends.segments.split_segments` and the
collectives stay eager in the top-level graph, in the order the scheduling pass chose. The
compiler therefore never sees a collective and cannot reorder one; an exchange started before a
segment is in flight while the compiled segment runs. Segments compile on their first call; a
program is built per input signature, so shapes never change under a compiled segment.

Inductor compiles each segment's graph directly (``torch._inductor.compile``, on the first call's
inputs) and the rank then calls the compiled code itself: a rank graph of full SDXL has over two
hundred segments per step, and going through ``torch.compile`` would cost each of them dynamo's
frame evaluation and guards on every call. TensorRT goes through
``torch.compile(segment, backend="torch_tensorrt", fullgraph=True, dynamic=False)``.
``torch.compile`` (:func:`compile_module`) also compiles the whole model ``distrifx bench`` times
the ranks against: one call per step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule

from distrifx.backends.segments import segments, split_segments

__all__ = ["compile_segments", "compile_module", "InductorSegment", "cpu_options", "CPU_INDUCTOR_OPTIONS"]

# Inference only, so on a CPU inductor may freeze the weights: it folds them as constants and
# repacks convolution weights into oneDNN's blocked layout once, instead of on every call (on this
# CPU a 640-channel 3x3 convolution at 8x8 takes 1.9 ms prepacked against 3.9 ms in eager). Each
# frozen graph keeps its own copy of the weights, so callers freeze only the graph that runs most
# steps (``freeze=False`` for the others). Not used on GPUs, where it has not been measured.
CPU_INDUCTOR_OPTIONS = {"freezing": True}

# Inductor's config is global to the process: ranks simulated as threads would undo each other's patch.
_PATCH_LOCK = threading.Lock()


class _FrozenOnCPU(torch.nn.Module):
    """Calls a compiled module with :data:`CPU_INDUCTOR_OPTIONS` patched into inductor's config when
    its inputs are on the CPU. Dynamo decides whether parameters are frozen constants when it
    traces, on the first call, from the global config: ``freezing`` given as
    ``torch.compile(options=...)`` reaches inductor but not dynamo, and freezes nothing."""

    def __init__(self, compiled: torch.nn.Module, options: dict[str, Any]) -> None:
        super().__init__()
        self.compiled = compiled
        self.options = options

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        if not _on_cpu((*args, *kwargs.values())):
            return self.compiled(*args, **kwargs)
        with _PATCH_LOCK, inductor_config.patch(self.options):
            return self.compiled(*args, **kwargs)


def _on_cpu(values: tuple[Any, ...]) -> bool:
    """Whether a call's tensors are on the CPU (judged by the first; a call without tensors counts as CPU)."""
    first = next((v for v in values if isinstance(v, torch.Tensor)), None)
    return first is None or first.device.type == "cpu"


def cpu_options(backend: str, freeze: bool = True) -> dict[str, Any]:
    """The inductor config :func:`compile_module` runs ``backend`` under on a CPU (empty: none)."""
    return CPU_INDUCTOR_OPTIONS if backend == "inductor" and freeze else {}


def compile_module(module: torch.nn.Module, backend: str, fullgraph: bool = False,
                   freeze: bool = True) -> torch.nn.Module:
    """``torch.compile(module, backend=backend)`` for fixed shapes; inductor on a CPU freezes the
    weights unless ``freeze`` is False (the weights stay live inputs: no second copy).

    How distrifx compiles a whole model (the baseline ``distrifx bench`` times compiled ranks
    against) and TensorRT segments.
    """
    compiled = torch.compile(module, backend=backend, fullgraph=fullgraph, dynamic=False)
    options = cpu_options(backend, freeze)
    return _FrozenOnCPU(compiled, options) if options else compiled


class InductorSegment(torch.nn.Module):
    """A segment compiled by inductor for the inputs of its first call, then called directly.

    On a CPU with ``freeze``, inductor folds the weights in as constants (:data:`CPU_INDUCTOR_OPTIONS`);
    otherwise they stay inputs of the compiled code, read live on every call.
    """

    def __init__(self, segment: GraphModule, freeze: bool) -> None:
        super().__init__()
        self.segment = segment
        self.freeze = freeze
        self.compiled: Callable[..., Any] | None = None

    def forward(self, *args: torch.Tensor) -> Any:
        if self.compiled is None:
            from torch._inductor import compile as inductor_compile

            options = cpu_options("inductor", self.freeze and _on_cpu(args))
            with _PATCH_LOCK:  # inductor applies the options as a patch of its process-wide config
                self.compiled = inductor_compile(self.segment, list(args), options=dict(options))
        return self.compiled(*args)


def compile_segments(gm: GraphModule, backend: str = "inductor", freeze: bool = True) -> GraphModule:
    """``gm`` split into segments, each compiled on its first call: by inductor directly, or by the
    ``torch.compile`` ``backend`` (see :func:`compile_module` for ``freeze``); ``gm.meta`` is kept.

    Example:
        >>> compiled = compile_segments(program.graphs["sync"])             # doctest: +SKIP
        >>> outputs = compiled(comm, *flat_inputs)
    """
    split = split_segments(gm)
    for name, segment in segments(split):
        compiled = (InductorSegment(segment, freeze) if backend == "inductor"
                    else compile_module(segment, backend, fullgraph=True, freeze=freeze))
        setattr(split, name, compiled)
    return split
