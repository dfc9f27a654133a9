"""Finder: self-attention keys and values that are two projections of one token tensor.

When they are, a rank can gather that tensor (one exchange, often half the bytes) and project the
full sequence itself, instead of gathering K and V. :func:`prefer_hidden` is the cost model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from distrifx.passes.spec import META_PLACEMENT, Shard

__all__ = ["KVSource", "find_kv_source", "prefer_hidden", "FLOPS_PER_BYTE"]

aten = torch.ops.aten
_SHAPE_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.contiguous.default, aten.clone.default,
})
# Compute a device does in the time it moves one byte to a peer (rough machine balance).
FLOPS_PER_BYTE = {"cpu": 10.0, "cuda": 300.0}


@dataclass(frozen=True)
class KVSource:
    """``key = chains[0](hidden)``, ``value = chains[1](hidden)``; each chain starts with a linear."""

    hidden: Node
    chains: tuple[tuple[Node, ...], tuple[Node, ...]]


def _chain(node: Node) -> tuple[Node, tuple[Node, ...]] | None:
    """Walk shape ops back to a linear; return (its input, [linear, ..., node])."""
    chain = []
    while node.op == "call_function" and node.target in _SHAPE_OPS:
        chain.append(node)
        node = node.args[0]
    if node.op != "call_function" or node.target is not aten.linear.default:
        return None
    chain.append(node)
    return node.args[0], tuple(reversed(chain))


def find_kv_source(sdpa: Node) -> KVSource | None:
    """The common token tensor behind an attention's keys and values, if there is one (a plain shard)."""
    k, v = (_chain(a) for a in sdpa.args[1:3])
    if k is None or v is None or k[0] is not v[0]:
        return None
    hidden = k[0]
    placement = hidden.meta.get(META_PLACEMENT)
    if not isinstance(placement, Shard) or not placement.plain:
        return None
    return KVSource(hidden, (k[1], v[1]))


def prefer_hidden(source: KVSource, world_size: int, flops_per_byte: float) -> bool:
    """Whether gathering the hidden states beats gathering K and V.

    Saved: the bytes of K plus V minus those of the hidden states. Paid: projecting the other
    ranks' (N-1)/N of the tokens, 2 * tokens * C_in * C_out FLOPs per projection.
    """
    hidden = source.hidden.meta["val"]
    outs = [chain[-1].meta["val"] for chain in source.chains]
    saved = sum(o.numel() * o.element_size() for o in outs) - hidden.numel() * hidden.element_size()
    extra_tokens = hidden.numel() // hidden.shape[-1] * (world_size - 1) / world_size
    extra_flops = sum(2 * extra_tokens * hidden.shape[-1] * chain[0].meta["val"].shape[-1]
                      for chain in source.chains)
    return saved * (world_size - 1) / world_size * flops_per_byte > extra_flops
