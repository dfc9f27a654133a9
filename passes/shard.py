"""Shard pass: turn the annotated global graph into one rank's graph.

Contract: needs ``annotate`` (reads ``distrifx.decision`` on every node). Produces a new graph
whose placeholders are ``comm``, the user inputs (full size, as the caller passes them), then one
``stale_<site>`` input per carried exchange read in this phase; whose output is
``(*user outputs, *state outputs)``, every user output full size on every rank (with
``gather_outputs=False`` a sharded one holds only this rank's rows, the rest NaN). Writes the
signature and exchange sites to ``gm.meta``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule, Node, map_arg

from distrifx.errors import ShardingError, where
from distrifx.passes.builder import Builder
from distrifx.passes.manager import PassContext, PassResult
from distrifx.passes.rewriters import REWRITERS
from distrifx.passes.rules.registry import placement_of
from distrifx.passes.spec import META_DECISION, Decision, Shard

__all__ = ["shard", "RankSignature", "META_SIGNATURE", "META_SITES"]

META_SIGNATURE = "distrifx.signature"
META_SITES = "distrifx.sites"


@dataclass(frozen=True)
class RankSignature:
    """How the runtime calls a per-rank graph and reads its outputs."""

    num_user_inputs: int
    num_user_outputs: int
    state_in: tuple[str, ...]
    state_out: tuple[str, ...]


def _map_args(b: Builder, node: Node, decision: Decision) -> tuple[tuple, dict]:
    def convert(old: Node) -> Node:
        new = b.env[old]
        want = decision.inputs.get(old)
        have = placement_of(old)
        if want is None or want == have:
            return new
        return b.redistribute(old, new, have, want)

    args = decision.args if decision.args is not None else node.args
    kwargs = decision.kwargs if decision.kwargs is not None else node.kwargs
    return map_arg(args, convert), map_arg(kwargs, convert)


def _gather_output(b: Builder, old: Node) -> Node:
    placement = placement_of(old)
    if not isinstance(placement, Shard):
        return b.env[old]
    if not b.ctx.gather_outputs:
        return b.own_rows(b.env[old], old, placement)
    return b.gather(f"output_{old.name}", "output", b.env[old], old, placement)


def shard(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Build rank ``ctx.rank``'s graph for ``ctx.phase`` from the annotated global graph."""
    b = Builder(ctx)
    num_inputs = 0
    for node in gm.graph.nodes:
        b.origin = node
        if node.op == "placeholder":
            b.env[node] = b.placeholder(node.name)
            b.env[node].meta["val"] = node.meta.get("val")
            num_inputs += 1
            if isinstance(shard := placement_of(node), Shard):  # a token input: this rank's rows
                b.env[node] = b.local_block(b.env[node], node, shard)
        elif node.op == "get_attr":
            b.env[node] = b.graph.get_attr(node.target)
        elif node.op == "call_function":
            decision: Decision = node.meta[META_DECISION]
            args, kwargs = _map_args(b, node, decision)
            if decision.rewrite is not None:
                b.env[node] = REWRITERS[type(decision.rewrite)](b, node, decision.rewrite, args, kwargs)
            else:
                b.env[node] = b.call(node.target, args, kwargs)
        elif node.op == "output":
            b.origin = None
            outputs = [map_arg(o, lambda n: _gather_output(b, n)) for o in node.args[0]]
            state = [b.state_out[name] for name in b.state_out]
            b.graph.output(tuple(outputs) + tuple(state))
            signature = RankSignature(num_inputs, len(outputs), tuple(b.state_in), tuple(b.state_out))
        else:
            raise ShardingError(f"{where(node)}: unexpected {node.op} node in an exported graph")
        b.tag_new_nodes()
    new_gm = GraphModule(gm, b.graph)
    new_gm.meta[META_SIGNATURE] = signature
    new_gm.meta[META_SITES] = tuple(b.sites)
    return PassResult(new_gm, modified=True)
