"""Scheduling pass: start communication as early and wait for it as late as the graph allows.

Contract: only reorders nodes. Each collective start moves right after the last producer of its
inputs; each wait moves right before its first consumer, so a wait whose only consumer is the
graph output (a stale exchange for the next step) ends up at the very end. The order is a pure
function of the graph's structure, so every rank, whose graphs differ only in constants, makes
the same decisions and issues its collectives in the same order. Checks that no node was lost
and that the graph lints.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from distrifx.errors import DistrifxError
from distrifx.passes.manager import PassContext, PassResult
from distrifx.runtime.ops import is_start, is_wait

__all__ = ["schedule", "collective_order"]


def _positions(gm: GraphModule) -> dict[Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def schedule(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Hoist collective starts to their producers and sink waits to their consumers."""
    before = list(gm.graph.nodes)
    placeholders = [n for n in before if n.op == "placeholder"]
    starts = [n for n in before if is_start(n)]
    pos = _positions(gm)
    for start in reversed(starts):
        producers = [a for a in start.all_input_nodes if a.op != "placeholder" or a.name != "comm"]
        anchor = max(producers, key=pos.__getitem__, default=placeholders[-1])
        if anchor.op == "placeholder":
            anchor = placeholders[-1]
        if anchor.next is not start:
            anchor.append(start)
    for wait in [n for n in gm.graph.nodes if is_wait(n)]:
        pos = _positions(gm)
        first_user = min(wait.users, key=pos.__getitem__)
        if wait.next is not first_user:
            first_user.prepend(wait)
    after = list(gm.graph.nodes)
    if len(after) != len(before) or set(after) != set(before):
        raise DistrifxError("schedule pass changed the set of nodes; it may only reorder them")
    gm.graph.lint()
    return PassResult(gm, modified=after != before)


def collective_order(gm: GraphModule) -> tuple[str, ...]:
    """The sequence of collectives the graph starts: must be identical on every rank."""
    return tuple(f"{n.target.__name__}:{n.meta.get('distrifx.origin', n.name)}" for n in gm.graph.nodes if is_start(n))
