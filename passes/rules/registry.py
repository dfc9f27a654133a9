"""The op-rule registry: one small function per ATen op overload.

A rule receives a node of the global graph (``node.meta["val"]`` holds its global fake value) and a
:class:`RuleContext`, and returns a :class:`~distrifx.passes.spec.Decision`. Rules only decide;
the shard pass rewrites.

Example:
    >>> @register(torch.ops.aten.my_op.default)          # doctest: +SKIP
    ... def _my_op(node, ctx):
    ...     return pointwise(node, ctx)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._ops import OpOverload, OpOverloadPacket
from torch.fx import Node

from distrifx.errors import ShapeError, ShardingError, where
from distrifx.passes.spec import META_PLACEMENT, Decision, PlacementTree, Shard

__all__ = [
    "RuleContext",
    "RuleFn",
    "register",
    "add_unique",
    "lookup",
    "registered_ops",
    "tensor_args",
    "global_shape",
    "placement_of",
    "weighted_input",
]


@dataclass(frozen=True)
class RuleContext:
    """What a rule may know besides its node: the number of ranks."""

    world_size: int

    def local_extent(self, node: Node, shard: Shard) -> int:
        """The per-rank extent of ``node`` along ``shard.dim``; a :class:`ShapeError` if it does not split."""
        extent = global_shape(node)[shard.dim]
        segment = extent - shard.head - shard.tail
        if segment % self.world_size or segment <= 0:
            raise ShapeError(
                f"{where(node)}: dim {shard.dim} has {segment} sharded rows (global extent {extent}), "
                f"which do not split evenly over {self.world_size} ranks. Choose an input size that "
                f"keeps every sharded dim divisible by {self.world_size}."
            )
        return shard.head + segment // self.world_size + shard.tail

    def localized(self, node: Node, shard: Shard) -> list[int]:
        """``node``'s global shape with the sharded dim replaced by its per-rank extent."""
        shape = list(global_shape(node))
        shape[shard.dim] = self.local_extent(node, shard)
        return shape


RuleFn = Callable[[Node, RuleContext], Decision]

_RULES: dict[OpOverload, RuleFn] = {}


def add_unique(table: dict[Any, Callable[..., Any]], key: Any, fn: Callable[..., Any], what: str) -> None:
    """``table[key] = fn``, or a ValueError if ``key`` already has one: a second entry must never silently win.

    The one check behind the op rule, rewriter and identity registries.
    """
    if key in table:
        old, name = table[key], key.__name__ if isinstance(key, type) else key
        raise ValueError(f"{what} for {name} is already registered ({old.__module__}.{old.__qualname__}); "
                         f"refusing to replace it with {fn.__module__}.{fn.__qualname__}")
    table[key] = fn


def register(*ops: OpOverload | OpOverloadPacket) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` as the rule of each op overload (a packet registers all its overloads).

    Registering an op twice raises: a second rule must never silently win.
    """

    def deco(fn: RuleFn) -> RuleFn:
        for op in ops:
            overloads = (
                [getattr(op, name) for name in op.overloads()]
                if isinstance(op, OpOverloadPacket)
                else [op]
            )
            for overload in overloads:
                add_unique(_RULES, overload, fn, "a sharding rule")
        return fn

    return deco


def lookup(op: Any) -> RuleFn | None:
    """The rule registered for ``op``, or None."""
    return _RULES.get(op)


def registered_ops() -> list[OpOverload]:
    """Every op overload that has a rule."""
    return list(_RULES)


def placement_of(arg: Any) -> PlacementTree:
    """The placement the annotate pass wrote on ``arg`` (None for non-nodes and non-tensors)."""
    if not isinstance(arg, Node):
        return None
    try:
        return arg.meta[META_PLACEMENT]
    except KeyError:
        raise KeyError(f"node {arg.name!r} has no placement: run the 'annotate' pass first") from None


def weighted_input(node: Node, what: str) -> PlacementTree:
    """The placement of the activation (first argument) of a ``what`` op (linear, conv) whose second
    argument is its weight, which must not be sharded."""
    if isinstance(placement_of(node.args[1]), Shard):
        raise ShardingError(f"{where(node)}: the {what} weight is computed from the sharded latent, but only "
                            "activations may be sharded (each rank would hold a different weight). Compute it "
                            "from parameters or replicated inputs (timestep, text embeddings).")
    return placement_of(node.args[0])


def tensor_args(node: Node) -> Iterator[Node]:
    """The argument nodes of ``node`` that carry tensors, in argument order."""
    for arg in _flatten((node.args, node.kwargs)):
        if isinstance(arg, Node) and isinstance(arg.meta.get("val"), torch.Tensor):
            yield arg


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value


def global_shape(node: Node) -> Sequence[int]:
    """The global (single-device) shape of a tensor node, from ``node.meta["val"]``."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise ShardingError(f"{where(node)} has no tensor value in node.meta['val']")
    return tuple(int(s) for s in val.shape)


def sharded_inputs(node: Node) -> list[tuple[Node, Shard]]:
    """The tensor arguments of ``node`` that are sharded, with their placement."""
    return [(a, p) for a in tensor_args(node) if isinstance(p := placement_of(a), Shard)]

