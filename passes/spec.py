"""Placements, rule decisions and rewrite descriptions: the vocabulary of the sharding passes.

A *placement* says how a value of the global (single-device) graph is laid out over the ranks:

* :class:`Replicate` - every rank holds the whole tensor.
* :class:`Shard` - the tensor is cut into ``world_size`` equal contiguous blocks along ``dim``;
  rank ``r`` holds block ``r``. Row patches of a (B, C, H, W) latent are ``Shard(2)``; after a view
  to (B, H*W, C) the same data is the contiguous sequence shard ``Shard(1)``. A shard may carry
  replicated rows around its blocks: ``Shard(1, head=77)`` is 77 text tokens (on every rank)
  followed by the sharded image tokens, as in joint text-image attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from torch.fx import Node

__all__ = [
    "Replicate",
    "Shard",
    "Placement",
    "PlacementTree",
    "Decision",
    "Rewrite",
    "HaloConv",
    "GlobalGroupNorm",
    "GatherKV",
    "META_PLACEMENT",
    "META_DECISION",
]

META_PLACEMENT = "distrifx.placement"
META_DECISION = "distrifx.decision"


@dataclass(frozen=True)
class Replicate:
    """Every rank holds the full value."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard:
    """Contiguous equal blocks along tensor ``dim``, block ``r`` on rank ``r``.

    ``head``/``tail`` rows before/after the blocks are replicated: rank r holds
    ``[head rows, block r, tail rows]``.
    """

    dim: int
    head: int = 0
    tail: int = 0

    @property
    def plain(self) -> bool:
        return not (self.head or self.tail)

    def block(self, extent: int, world_size: int) -> int:
        """Rows per rank of the sharded segment of a dim of global ``extent`` (caller checks divisibility)."""
        return (extent - self.head - self.tail) // world_size

    def moved(self, dim: int) -> Shard:
        """The same layout on another dim (after a permute, unsqueeze, ...)."""
        return Shard(dim, self.head, self.tail)

    def __str__(self) -> str:
        extra = f",head={self.head}" if self.head else ""
        extra += f",tail={self.tail}" if self.tail else ""
        return f"S({self.dim}{extra})"


Placement = Union[Replicate, Shard]
# None for non-tensor values, a tuple for ops returning several tensors.
PlacementTree = Union[Placement, None, tuple[Union[Placement, None], ...]]


class Rewrite:
    """Base of the frozen descriptions of rewrites that need data from other ranks."""


@dataclass(frozen=True)
class HaloConv(Rewrite):
    """A conv whose output rows need ``before``/``after`` input rows of the neighbouring patches.

    A negative ``after`` means the local patch has rows the conv never reads (stride > kernel):
    they are trimmed instead of exchanged. ``from_replicated`` convs slice their window from a
    replicated input, with no communication.
    """

    dim: int
    before: int
    after: int
    from_replicated: bool
    out_rows_local: int
    stride: int


@dataclass(frozen=True)
class GlobalGroupNorm(Rewrite):
    """GroupNorm over a sharded input: statistics combined over all ranks."""

    num_groups: int


@dataclass(frozen=True)
class GatherKV(Rewrite):
    """Self-attention over sharded tokens: queries stay local, keys/values are gathered."""

    seq_dim: int


@dataclass(frozen=True)
class Decision:
    """What a rule decided for one node of the global graph.

    ``inputs`` maps argument nodes to the placement the op needs them in (the shard pass inserts
    the redistribution); ``args``/``kwargs`` replace the node's arguments in the per-rank graph
    (localized shapes); ``rewrite`` is set when the op needs data from other ranks.
    """

    output: PlacementTree
    inputs: dict[Node, Placement] = field(default_factory=dict)
    args: tuple[Any, ...] | None = None
    kwargs: dict[str, Any] | None = None
    rewrite: Rewrite | None = None
