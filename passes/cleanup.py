"""Cleanup pass: drop dead nodes and leftover analysis metadata, lint.

Contract: runs last. Keeps every collective start whose wait is live; removes ``distrifx.*``
analysis keys (the placement and decision of the global graph) from node metadata.
"""

from __future__ import annotations

from torch.fx import GraphModule

from distrifx.passes.manager import PassContext, PassResult
from distrifx.passes.spec import META_DECISION, META_PLACEMENT

__all__ = ["cleanup"]


def cleanup(gm: GraphModule, ctx: PassContext) -> PassResult:
    modified = gm.graph.eliminate_dead_code()
    for node in gm.graph.nodes:
        node.meta.pop(META_DECISION, None)
        node.meta.pop(META_PLACEMENT, None)
    gm.graph.lint()
    return PassResult(gm, modified=modified)
