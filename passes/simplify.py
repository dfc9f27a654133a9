"""Simplify pass: drop what an inference graph specialized to one input signature does not need.

Contract: runs first, on the captured global graph, in place (idempotent: every later run finds
nothing). Replaces each node an identity rule matches by its input (dropout in eval, a cast to the
dtype a tensor already has) and erases the dtype/device checks torch.export inserts, which hold by
construction: a program is built per input signature (shapes, dtypes, devices). Every other node
and its ``meta`` are kept.

Each removed node is one dispatch less per step on every rank; on a GPU an eager rank graph is
bound by dispatch (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._ops import OpOverload
from torch.fx import GraphModule, Node
from torch.fx.operator_schemas import normalize_function

from distrifx.passes.manager import PassContext, PassResult
from distrifx.passes.rules.registry import add_unique

__all__ = ["simplify", "IDENTITIES", "CHECKS", "identity"]

aten = torch.ops.aten

IdentityFn = Callable[[Node], bool]
IDENTITIES: dict[OpOverload, IdentityFn] = {}

# Ops that only check a tensor's metadata and return nothing.
CHECKS = frozenset({aten._assert_tensor_metadata.default})


def identity(*ops: OpOverload) -> Callable[[IdentityFn], IdentityFn]:
    """Register ``fn(node) -> bool``: whether ``node`` (of one of ``ops``) returns its first argument unchanged."""

    def deco(fn: IdentityFn) -> IdentityFn:
        for op in ops:
            add_unique(IDENTITIES, op, fn, "an identity rule")
        return fn

    return deco


def _bound(node: Node) -> dict[str, object]:
    """``node``'s arguments by schema name, defaults filled in."""
    return normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs


@identity(aten.dropout.default)
def _dropout(node: Node) -> bool:
    args = _bound(node)
    return not args["train"] or args["p"] == 0


@identity(aten.to.dtype, aten.to.device, aten.to.dtype_layout)
def _to(node: Node) -> bool:
    """``to`` without ``copy`` returns its input when the dtype, device and layout asked for are its own."""
    args = _bound(node)
    val = args["input"].meta.get("val")
    if not isinstance(val, torch.Tensor) or args["copy"] or args["memory_format"] not in (None, torch.preserve_format):
        return False
    device = args.get("device")
    return (args.get("dtype") in (None, val.dtype) and args.get("layout") in (None, val.layout)
            and (device is None or torch.device(device) == val.device))


def simplify(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Drop identity nodes (:data:`IDENTITIES`) and metadata checks (:data:`CHECKS`) from ``gm``."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in CHECKS and not node.users:
            gm.graph.erase_node(node)
            removed += 1
        elif node.target in IDENTITIES and isinstance(node.args[0], Node) and IDENTITIES[node.target](node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=bool(removed))
