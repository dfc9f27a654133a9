"""Builds a per-rank graph node by node: arguments, redistributions, exchanges, carried state."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Graph, Node
from torch.fx.proxy import GraphAppendingTracer, Proxy

from distrifx.config import GNVariant, dtype_name
from distrifx.errors import module_path
from distrifx.passes.manager import PassContext, Phase
from distrifx.passes.spec import Placement, Shard
from distrifx.runtime import ops

__all__ = ["Form", "ExchangeSite", "Payload", "Builder", "META_ORIGIN", "META_PAYLOAD", "form_for", "is_carried",
           "wire_dtype", "older", "trace_into"]

META_ORIGIN = "distrifx.origin"
META_PAYLOAD = "distrifx.payload"  # on a stale exchange's start: the Payload it sends
aten = torch.ops.aten


class Form(enum.Enum):
    """How one exchange appears in a graph."""

    SYNC = "sync"  # start, wait, use: exact
    STALE = "stale"  # use the previous step's value (a graph input), send this step's (a graph output)
    NONE = "none"  # no exchange: the patch uses only its own data


@dataclass(frozen=True)
class ExchangeSite:
    """One place where a rank's graph communicates, for the plan summary and the runtime."""

    name: str
    kind: str  # "halo" | "kv" | "gn" | "reshard" | "output"
    module: str
    form: Form
    bytes_sent: int  # by this rank, per call of the graph
    carried: bool  # whether its result is state for the next step


@dataclass(frozen=True)
class Payload:
    """The tensor a rank hands one exchange (its local shape and dtype), known when the graph is built."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, old: Node, dim: int, rows: int) -> Payload:
        """What a rank hands an exchange of ``old``'s value: its global shape with ``rows`` along ``dim``."""
        value = old.meta["val"]
        return cls(tuple(rows if d == dim else int(s) for d, s in enumerate(value.shape)), value.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def row_numel(self, dim: int) -> int:
        """Elements in one row along ``dim`` (what a halo exchange sends per row)."""
        return self.numel // self.shape[dim]


def form_for(kind: str, ctx: PassContext, phase: str | None = None) -> Form:
    """The form of an exchange of ``kind`` in a graph of ``phase`` (default: ``ctx.phase``)."""
    phase = phase or ctx.phase
    if kind in ("reshard", "output") or phase in (Phase.SYNC, Phase.WARMUP):
        return Form.SYNC
    if phase == Phase.NAIVE:
        return Form.NONE
    if kind in ctx.fresh:
        return Form.SYNC
    if kind == "gn":
        return {
            GNVariant.SYNC: Form.SYNC,
            GNVariant.SEPARATE: Form.NONE,
        }.get(ctx.gn_variant, Form.STALE)
    return Form.STALE


def is_carried(kind: str, ctx: PassContext) -> bool:
    """Whether graphs of this phase emit the exchange's result as state for the next step."""
    return ctx.phase in (Phase.WARMUP, Phase.STALE) and form_for(kind, ctx, Phase.STALE) is Form.STALE


# Exchanges whose stale values may travel and be kept in ``PassContext.stale_dtype``. GroupNorm
# statistics stay float32: they are a few bytes, and E[x^2] - E[x]^2 would lose its digits.
NARROWABLE = ("halo", "kv")
EXTRAPOLATED = ("halo", "kv")


def wire_dtype(kind: str, ctx: PassContext, dtype: torch.dtype | None) -> torch.dtype | None:
    """The narrower dtype a carried exchange of ``kind`` (values of ``dtype``) travels and is kept
    in, or None to keep ``dtype``."""
    wire = ctx.stale_dtype
    if wire is None or kind not in NARROWABLE or dtype is None or not dtype.is_floating_point:
        return None
    return wire if wire.itemsize < dtype.itemsize else None


def older(name: str) -> str:
    """The state name of carried exchange ``name``'s value one step before the last (extrapolation)."""
    return f"{name}@older"


def trace_into(graph: Graph, fn: Callable[..., Any], *args: Any) -> Any:
    """Insert the torch ops ``fn`` performs on ``args`` at ``graph``'s insert point; return the node(s)
    of its result. Nodes in ``args``, alone or in lists, become proxies; other values stay constants."""
    tracer = GraphAppendingTracer(graph)
    proxy = lambda a: Proxy(a, tracer) if isinstance(a, Node) else a  # noqa: E731
    out = fn(*[[proxy(x) for x in a] if isinstance(a, list) else proxy(a) for a in args])
    return tuple(o.node for o in out) if isinstance(out, tuple) else out.node


class Builder:
    """Appends nodes to a new per-rank graph; remembers the old-to-new node map and exchanges."""

    def __init__(self, ctx: PassContext) -> None:
        self.ctx = ctx
        self.graph = Graph()
        self.comm = self.graph.placeholder("comm")
        self.comm.meta[META_ORIGIN] = "comm"
        self._last_placeholder = self.comm
        self.env: dict[Node, Node] = {}
        self.state_in: dict[str, Node] = {}
        self.state_out: dict[str, Node] = {}
        self.sites: list[ExchangeSite] = []
        self.origin: Node | None = None
        self._resharded: dict[tuple[Node, Placement], Node] = {}

    # -- nodes -------------------------------------------------------------------------------
    def placeholder(self, name: str) -> Node:
        with self.graph.inserting_after(self._last_placeholder):
            node = self.graph.placeholder(name)
        node.meta[META_ORIGIN] = name
        self._last_placeholder = node
        return node

    def call(self, target: Callable[..., Any], args: tuple, kwargs: dict | None = None) -> Node:
        return self.graph.call_function(target, args, kwargs or {})

    def trace(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Append the torch ops ``fn`` performs on ``args`` (nodes become proxies) to the graph."""
        return trace_into(self.graph, fn, *args)

    def tag_new_nodes(self) -> None:
        """Mark nodes appended since the last call with the old node they implement."""
        origin = self.origin
        for node in reversed(self.graph.nodes):
            if META_ORIGIN in node.meta:
                break
            node.meta[META_ORIGIN] = origin.name if origin is not None else "output"
            if origin is not None and "nn_module_stack" in origin.meta:
                node.meta["nn_module_stack"] = origin.meta["nn_module_stack"]

    # -- placements --------------------------------------------------------------------------
    def split_segment(self, new: Node, old: Node, shard: Shard) -> tuple[Node | None, Node, Node | None]:
        """A rank's ``[head, block, tail]`` value of ``old`` split into its three parts."""
        if shard.plain:
            return None, new, None
        block = shard.block(int(old.meta["val"].shape[shard.dim]), self.ctx.world_size)
        cut = lambda lo, hi: self.call(aten.slice.Tensor, (new, shard.dim, lo, hi))  # noqa: E731
        end = shard.head + block
        return (cut(0, shard.head) if shard.head else None, cut(shard.head, end),
                cut(end, end + shard.tail) if shard.tail else None)

    def join_segment(self, head: Node | None, middle: Node, tail: Node | None, dim: int) -> Node:
        parts = [p for p in (head, middle, tail) if p is not None]
        return middle if len(parts) == 1 else self.call(aten.cat.default, (parts, dim))

    def local_block(self, x: Node, old: Node, shard: Shard) -> Node:
        """This rank's ``[head, block r, tail]`` rows of replicated ``x`` (slices: no communication)."""
        extent = int(old.meta["val"].shape[shard.dim])
        block = shard.block(extent, self.ctx.world_size)
        cut = lambda lo, hi: self.call(aten.slice.Tensor, (x, shard.dim, lo, hi))  # noqa: E731
        start = shard.head + self.ctx.rank * block
        return self.join_segment(
            cut(0, shard.head) if shard.head else None,
            cut(start, start + block),
            cut(extent - shard.tail, extent) if shard.tail else None,
            shard.dim,
        )

    def gather(self, name: str, kind: str, new: Node, old: Node, shard: Shard) -> Node:
        """The full value of ``old`` on every rank: the sharded blocks all-gathered (synchronously)."""
        head, block, tail = self.split_segment(new, old, shard)
        payload = self.block_payload(old, shard)
        gathered = self.exchange(name, kind, ops.all_gather_start, (block, shard.dim), payload)[0]
        return self.join_segment(head, gathered, tail, shard.dim)

    def own_rows(self, new: Node, old: Node, shard: Shard) -> Node:
        """``old`` at its full size with only this rank's block of ``shard`` in it, the other ranks'
        rows NaN (no communication): for a consumer that reads its own rows only. Values NaN cannot
        stand in for (integers) are gathered instead."""
        val = old.meta["val"]
        if not val.dtype.is_floating_point:
            return self.gather(f"output_{old.name}", "output", new, old, shard)
        head, block, tail = self.split_segment(new, old, shard)
        rows = shard.block(int(val.shape[shard.dim]), self.ctx.world_size)
        before, after = self.ctx.rank * rows, (self.ctx.world_size - 1 - self.ctx.rank) * rows
        pad = [0, 0] * (val.dim() - 1 - shard.dim) + [before, after]
        padded = self.call(aten.constant_pad_nd.default, (block, pad, math.nan))
        return self.join_segment(head, padded, tail, shard.dim)

    def block_payload(self, old: Node, shard: Shard) -> Payload:
        """What a rank hands a gather of ``old``: its block of ``shard`` (head and tail excluded)."""
        return Payload.of(old, shard.dim, shard.block(int(old.meta["val"].shape[shard.dim]), self.ctx.world_size))

    def redistribute(self, old: Node, new: Node, have: Placement, want: Placement) -> Node:
        """Convert ``new`` (the rank's value of ``old``) from placement ``have`` to ``want``."""
        key = (old, want)
        if key not in self._resharded:
            value = self.gather(f"reshard_{old.name}", "reshard", new, old, have) if isinstance(have, Shard) else new
            if isinstance(want, Shard):
                value = self.local_block(value, old, want)
            self._resharded[key] = value
        return self._resharded[key]

    # -- exchanges ---------------------------------------------------------------------------
    def exchange(
        self, name: str, kind: str, start: Callable[..., Any], args: tuple, payload: Payload,
    ) -> tuple[Node | None, Node | None]:
        """Emit one exchange in the form this graph needs; return ``(fresh now, stale)`` nodes.

        In SYNC form the first is the fresh result; in STALE form the second is the previous
        step's result (a new graph input) and the fresh one becomes a graph output; in NONE form
        both are None. ``payload`` describes the tensor in ``args`` (the plan's bytes follow from
        it); a stale start records it for the coalescing pass.
        A carried exchange of ``ctx.stale_dtype`` keeps its state in that dtype; its stale form
        also sends in it, while a synchronous (warm-up) exchange stays exact. With
        ``ctx.extrapolate`` the stale form also reads the value of the step before (state
        ``older(name)``, kept by the runtime) and returns ``last + extrapolate * (last - older)``.
        """
        form = form_for(kind, self.ctx)
        carried = form is not Form.NONE and is_carried(kind, self.ctx)
        wire = wire_dtype(kind, self.ctx, payload.dtype) if carried else None
        sent_as = wire if wire is not None and form is Form.STALE else payload.dtype
        self.sites.append(ExchangeSite(
            name=name,
            kind=kind,
            module=module_path(self.origin) if self.origin is not None else "<output>",
            form=form,
            bytes_sent=0 if form is Form.NONE else self._sent(start, args, payload) * sent_as.itemsize,
            carried=carried,
        ))
        if form is Form.NONE:
            return None, None
        if form is Form.SYNC:
            result = self.call(ops.wait, (self.call(start, (self.comm, *args)),))
            if carried:
                self.state_out[name] = result if wire is None else self._cast(result, wire)
            return result, None
        sent = {} if wire is None else {"dtype": dtype_name(wire)}
        started = self.call(start, (self.comm, *args), sent)
        started.meta[META_PAYLOAD] = payload
        self.state_out[name] = self.call(ops.wait, (started,))
        read_as = None if wire is None else payload.dtype  # kept narrower: cast back where it is read
        stale = self._stale_input(name, f"stale_{name}", read_as)
        if self.ctx.extrapolate and kind in EXTRAPOLATED:
            older_value = self._stale_input(older(name), f"older_{name}", read_as)
            stale = self.call(aten.lerp.Scalar, (older_value, stale, 1.0 + self.ctx.extrapolate))
        return None, stale

    def _sent(self, start: Callable[..., Any], args: tuple, payload: Payload) -> int:
        """Elements this rank sends in one call of collective ``start``: its payload to each of the
        N-1 others (all-gather), or its edge rows to the neighbours it has (halo)."""
        rank, world = self.ctx.rank, self.ctx.world_size
        if start is ops.neighbour_rows_start:
            _, dim, before, after = args
            return payload.row_numel(dim) * (before * (rank + 1 < world) + after * (rank > 0))
        return payload.numel * (world - 1)

    def _stale_input(self, key: str, label: str, dtype: torch.dtype | None) -> Node:
        """Carried state ``key`` as a graph input named ``label`` (cast to ``dtype`` if kept narrower)."""
        self.state_in[key] = self.placeholder(label)
        return self.state_in[key] if dtype is None else self._cast(self.state_in[key], dtype)

    def _cast(self, x: Node, dtype: torch.dtype) -> Node:
        return self.call(aten._to_copy.default, (x,), {"dtype": dtype})
