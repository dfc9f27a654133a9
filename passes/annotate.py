"""Annotate pass: propagate placements through the global graph with the op rules.

Contract: reads ``node.meta["val"]`` (global fake values from torch.export); writes
``node.meta["distrifx.placement"]`` and ``node.meta["distrifx.decision"]`` on every node; changes
no node. User inputs and parameters start replicated.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from distrifx.errors import ShapeError, UnsupportedOpError, where
from distrifx.passes.manager import PassContext, PassResult
from distrifx.passes.rules import RuleContext, lookup
from distrifx.passes.rules.registry import global_shape, sharded_inputs
from distrifx.passes.spec import META_DECISION, META_PLACEMENT, Decision, PlacementTree, Replicate, Shard

__all__ = ["annotate", "valid_heights"]

aten = torch.ops.aten
CONVS = (aten.conv2d.default, aten.conv2d.padding)  # the convs whose output heights bound the valid input heights


def _replicated_like(val: object) -> PlacementTree:
    if isinstance(val, torch.Tensor):
        return Replicate()
    if isinstance(val, (list, tuple)):
        return tuple(Replicate() if isinstance(v, torch.Tensor) else None for v in val)
    return None


def _decide(node: Node, ctx: RuleContext) -> Decision:
    if node.op in ("placeholder", "get_attr") or ctx.world_size == 1:  # one rank: nothing to shard
        return Decision(output=_replicated_like(node.meta.get("val")))
    rule = lookup(node.target)
    if rule is not None:
        return rule(node, ctx)
    if not sharded_inputs(node):  # any op on replicated data runs as is, on every rank
        return Decision(output=_replicated_like(node.meta.get("val")))
    raise UnsupportedOpError(
        f"{where(node)} reads a sharded tensor, and no sharding rule is registered for "
        f"{node.target}. Register one with @distrifx.passes.rules.register({node.target}) "
        "(see docs/rules.md), or keep this op out of the spatial path of the model."
    )


def valid_heights(gm: GraphModule, world_size: int, count: int = 6) -> tuple[int, list[int]]:
    """The row multiple every input height must have to split at every conv level, and examples.

    It is world_size x the largest downsampling factor of any conv output relative to the height
    of the first conv's input.
    """
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONVS]
    if not convs:
        return world_size, [world_size * i for i in range(1, count + 1)]
    base = global_shape(convs[0].args[0])[2]
    factor = max(math.ceil(base / global_shape(c)[2]) for c in convs)
    multiple = world_size * factor
    return multiple, [multiple * i for i in range(1, count + 1)]


def _entry_shard(gm: GraphModule, world_size: int) -> tuple[Node | None, Shard | None]:
    """The latent is the first tensor input. A (B, C, H, W) latent stays replicated (the first conv
    slices its window for free); a (B, tokens, C) sequence is split along its tokens on entry."""
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return (node, Shard(1)) if val.dim() == 3 and world_size > 1 else (None, None)
    return None, None


def annotate(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Write a placement and a decision on every node of ``gm``."""
    rule_ctx = RuleContext(world_size=ctx.world_size)
    entry, entry_shard = _entry_shard(gm, ctx.world_size)
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        try:
            if node is entry:
                rule_ctx.local_extent(node, entry_shard)
                decision = Decision(output=entry_shard)
            else:
                decision = _decide(node, rule_ctx)
        except ShapeError as exc:
            multiple, examples = valid_heights(gm, ctx.world_size)
            raise ShapeError(
                f"{exc}\nFor this model and world_size={ctx.world_size}, input heights (in rows "
                f"of the model input) must be multiples of {multiple}, e.g. {examples}."
            ) from None
        node.meta[META_DECISION] = decision
        node.meta[META_PLACEMENT] = decision.output
    return PassResult(gm, modified=False)
