"""The distrifx compiler passes: simplify -> annotate -> shard -> schedule -> coalesce -> cleanup.

Each pass is a function ``(GraphModule, PassContext) -> PassResult``; :data:`PIPELINE` lists them
by name and :func:`build_rank_graph` runs them for one rank and phase.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.fx import GraphModule

from distrifx.passes.annotate import annotate, valid_heights
from distrifx.passes.cleanup import cleanup
from distrifx.passes.coalesce import coalesce
from distrifx.passes.manager import PassContext, PassResult, Phase, run_passes
from distrifx.passes.schedule import collective_order, schedule
from distrifx.passes.shard import META_SIGNATURE, META_SITES, RankSignature, shard
from distrifx.passes.simplify import simplify

__all__ = [
    "PIPELINE",
    "PassContext",
    "PassResult",
    "Phase",
    "RankSignature",
    "META_SIGNATURE",
    "META_SITES",
    "build_rank_graph",
    "collective_order",
    "valid_heights",
]

PIPELINE = (
    ("simplify", simplify),
    ("annotate", annotate),
    ("shard", shard),
    ("schedule", schedule),
    ("coalesce", coalesce),
    ("cleanup", cleanup),
)


def build_rank_graph(gm: GraphModule, ctx: PassContext, skip: Sequence[str] = ()) -> GraphModule:
    """Run the pipeline on the captured global graph ``gm`` for one rank and phase."""
    return run_passes(gm, ctx, PIPELINE, skip=skip)
