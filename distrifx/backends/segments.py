"""Split a per-rank graph into communication-free compute segments and the collectives between them.

A backend compiles or exports each compute segment on its own while the collectives stay in the
top-level graph, run eagerly in the scheduled order: the communicator and the in-flight ``Work``
objects never enter a segment, and an exchange started before a segment overlaps with it.

The result of :func:`split_segments` is a GraphModule whose top-level graph holds the same
placeholders and output as the original, ``call_module`` nodes ``segment_0``, ``segment_1``, ... (each
returning a tuple, unpacked by ``getitem`` nodes named after the values they carry) and the
collective start/wait nodes, in the original order.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator

import torch
from torch.fx import Graph, GraphModule, Node, map_arg

from distrifx.runtime.ops import is_start, is_wait

__all__ = ["SEGMENT_PREFIX", "split_segments", "segments", "is_segment", "is_collective"]

SEGMENT_PREFIX = "segment_"


def is_collective(node: Node) -> bool:
    """Whether ``node`` starts or waits for a collective."""
    return is_start(node) or is_wait(node)


def is_segment(node: Node) -> bool:
    """Whether ``node`` (of a split graph) calls a compute segment."""
    return node.op == "call_module" and str(node.target).startswith(SEGMENT_PREFIX)


def _is_metadata(node: Node) -> bool:
    # ``getattr(x, "dtype")``-style reads, traced from the rewrite kernels, give Python values
    # (dtypes, shapes). They are recomputed in every segment that uses them so that only tensors
    # cross segment boundaries: compilers and exporters take tensors.
    return node.op == "call_function" and node.target is getattr


def _copied(node: Node) -> bool:
    """Nodes copied into each consumer instead of passed in: weights and metadata reads."""
    return node.op == "get_attr" or _is_metadata(node)


def _runs(gm: GraphModule) -> list[list[Node]]:
    """Maximal runs of compute nodes between collectives, in graph order.

    A ``getitem`` of a multi-output op (``split``, ``chunk``) joins the run of that op even where the
    scheduler put a collective between them, so that only tensors cross segment boundaries.
    """
    runs: list[list[Node]] = []
    run_of: dict[Node, list[Node]] = {}
    current: list[Node] | None = None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or _copied(node):
            continue
        if is_collective(node):
            current = None
            continue
        if node.target is operator.getitem and node.args[0] in run_of:
            run = run_of[node.args[0]]
        else:
            if current is None:
                current = []
                runs.append(current)
            run = current
        run.append(node)
        run_of[node] = run
    return runs


def _sources(node: Node, local: set[Node]) -> Iterator[Node]:
    """The values ``node`` reads that must be passed into the segment holding ``local``."""
    for arg in node.all_input_nodes:
        if arg in local or arg.op == "get_attr":
            continue
        if _is_metadata(arg):
            yield from _sources(arg, local)
        else:
            yield arg


def _copier(graph: Graph, env: dict[Node, Node]) -> Callable[[Node], Node]:
    """Map an old node to its copy in ``graph``, copying weights and metadata reads on first use."""

    def lookup(old: Node) -> Node:
        if old not in env:
            if not _copied(old):
                raise KeyError(f"node {old.name!r} is used before it is defined in the split graph")
            env[old] = graph.node_copy(old, lookup)
        return env[old]

    return lookup


def _attributes(gm: GraphModule, graph: Graph) -> dict[str, torch.Tensor]:
    return {n.target: operator.attrgetter(n.target)(gm) for n in graph.nodes if n.op == "get_attr"}


def _boundaries(gm: GraphModule, runs: list[list[Node]]) -> tuple[list[list[Node]], list[list[Node]]]:
    """Per run: the values it reads from outside, and the values it computes that are read outside."""
    inputs = []
    for run in runs:
        local = set(run)
        inputs.append(list(dict.fromkeys(s for node in run for s in _sources(node, local))))
    read_outside = {s for ins in inputs for s in ins}
    for node in gm.graph.nodes:
        if is_collective(node) or node.op == "output":
            read_outside.update(_sources(node, set()))
    outputs = [[node for node in run if node in read_outside] for run in runs]
    return inputs, outputs


def _segment(gm: GraphModule, run: list[Node], inputs: list[Node], outputs: list[Node], index: int) -> GraphModule:
    """One run as a GraphModule: ``inputs`` become placeholders, ``outputs`` a tuple."""
    graph = Graph()
    env = {src: graph.placeholder(src.name) for src in inputs}
    for src, new in env.items():
        new.meta = dict(src.meta)
    lookup = _copier(graph, env)
    for node in run:
        env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(env[node] for node in outputs))
    return GraphModule(_attributes(gm, graph), graph, class_name=f"Segment{index}")


def _top_graph(gm: GraphModule, runs: list[list[Node]], inputs: list[list[Node]], outputs: list[list[Node]]) -> Graph:
    """``gm``'s graph with each run replaced by a call of its segment, unpacked by named getitems."""
    top = Graph()
    env: dict[Node, Node] = {}
    lookup = _copier(top, env)
    first = {run[0]: index for index, run in enumerate(runs)}
    for node in gm.graph.nodes:
        if node.op == "placeholder" or is_collective(node):
            env[node] = top.node_copy(node, lookup)
        elif node.op == "output":
            top.output(map_arg(node.args[0], lookup))
        elif node in first:
            index = first[node]
            call = top.call_module(f"{SEGMENT_PREFIX}{index}", tuple(lookup(s) for s in inputs[index]))
            for position, out in enumerate(outputs[index]):
                env[out] = top.create_node("call_function", operator.getitem, (call, position), name=out.name)
                env[out].meta = dict(out.meta)
    return top


def split_segments(gm: GraphModule) -> GraphModule:
    """``gm`` as alternating compute segments (submodules) and collective nodes, same order.

    Pure: ``gm`` is not modified; segments share its weight tensors (no copy). ``gm.meta`` (the
    rank signature and exchange sites) is copied onto the result.

    Example:
        >>> split = split_segments(program.graphs["sync"])                  # doctest: +SKIP
        >>> [name for name, _ in segments(split)]
        ['segment_0', 'segment_1', ...]
    """
    runs = _runs(gm)
    inputs, outputs = _boundaries(gm, runs)
    root: dict[str, torch.nn.Module | torch.Tensor] = {
        f"{SEGMENT_PREFIX}{i}": _segment(gm, run, ins, outs, i)
        for i, (run, ins, outs) in enumerate(zip(runs, inputs, outputs))
    }
    top = _top_graph(gm, runs, inputs, outputs)
    split = GraphModule({**root, **_attributes(gm, top)}, top)
    split.meta.update(gm.meta)
    return split


def segments(split: GraphModule) -> list[tuple[str, GraphModule]]:
    """The compute segments of a :func:`split_segments` result, in execution order."""
    return [(str(n.target), split.get_submodule(str(n.target))) for n in split.graph.nodes if is_segment(n)]
