"""``backend="inductor"`` and ``backend="tensorrt"``: ``torch.compile`` every communication-free segment.

The rank graph is split with :func:`~distrifx.backends.segments.split_segments`; each compute
segment becomes ``torch.compile(segment, backend=..., fullgraph=True, dynamic=False)`` and the
collectives stay eager in the top-level graph, in the order the scheduling pass chose. The
compiler therefore never sees a collective and cannot reorder one; an exchange started before a
segment is in flight while the compiled segment runs. Segments compile on their first call; a
program is built per input signature, so shapes never change under a compiled segment.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from distrifx.backends.segments import segments, split_segments

__all__ = ["compile_segments"]


def compile_segments(gm: GraphModule, backend: str = "inductor") -> GraphModule:
    """``gm`` split into segments, each compiled lazily by the ``torch.compile`` ``backend``; ``gm.meta`` is kept.

    Example:
        >>> compiled = compile_segments(program.graphs["sync"])             # doctest: +SKIP
        >>> outputs = compiled(comm, *flat_inputs)
    """
    split = split_segments(gm)
    for name, segment in segments(split):
        setattr(split, name, torch.compile(segment, backend=backend, fullgraph=True, dynamic=False))
    return split
