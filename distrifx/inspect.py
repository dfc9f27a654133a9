"""See what the compiler does with a model, without a process group.

``distrifx.explain`` builds one rank's graphs and returns a :class:`Plan`: the exchange sites
(halo convs, gathered attentions, group norms, resharding, output gathers), the bytes this rank
sends per step, and the per-rank graph with collective nodes before and after scheduling.
For every pass's before/after graph, set ``DISTRIFX_DUMP_DIR`` (see ``distrifx.passes.manager``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.fx import GraphModule
from torch.utils._pytree import tree_flatten, tree_unflatten

from distrifx.capture import capture
from distrifx.config import ParallelConfig
from distrifx.errors import ConfigError
from distrifx.passes import META_SITES, PassContext, build_rank_graph
from distrifx.passes.builder import ExchangeSite
from distrifx.runtime.cfg import batch_half, batch_size, wants_split
from distrifx.runtime.ops import is_start, is_wait
from distrifx.runtime.program import phases_for

__all__ = ["Plan", "explain", "collective_timeline", "graph_calls", "graph_collectives"]


def collective_timeline(gm: GraphModule) -> str:
    """The graph's node order, compute runs collapsed, starts and waits spelled out."""
    lines: list[str] = []
    compute = 0
    for node in gm.graph.nodes:
        if is_start(node) or is_wait(node):
            if compute:
                lines.append(f"    ... {compute} compute nodes")
                compute = 0
            what = "start" if is_start(node) else "wait "
            lines.append(f"  {what} {node.meta.get('distrifx.origin', node.name)} ({node.name})")
        elif node.op == "call_function":
            compute += 1
    if compute:
        lines.append(f"    ... {compute} compute nodes")
    return "\n".join(lines)


def graph_calls(gm: GraphModule) -> int:
    """Function and method calls ``gm`` makes per run: in an eager rank, each a Python call and a dispatch."""
    return sum(node.op in ("call_function", "call_method") for node in gm.graph.nodes)


def graph_collectives(gm: GraphModule) -> int:
    """Collectives ``gm`` starts per run: fewer than its exchanges when buckets (``bucket_mb``) pack them."""
    return sum(map(is_start, gm.graph.nodes))


@dataclass(frozen=True)
class Plan:
    """One rank's compiled graphs for one input signature, by phase."""

    config: ParallelConfig  # of the patch group: world_size is half the ranks under a CFG split
    rank: int  # in the patch group
    graphs: dict[str, GraphModule]
    unscheduled: dict[str, GraphModule]
    cfg_split: bool = False  # the call runs CFG-parallel: this is one batch half's program

    def sites(self, phase: str) -> tuple[ExchangeSite, ...]:
        return self.graphs[phase].meta[META_SITES]

    def bytes_per_step(self, phase: str) -> int:
        return sum(s.bytes_sent for s in self.sites(phase))

    def calls(self, phase: str) -> int:
        """Function and method calls ``phase``'s graph makes per step (:func:`graph_calls`)."""
        return graph_calls(self.graphs[phase])

    def collectives(self, phase: str) -> int:
        """Collectives ``phase``'s graph starts per step (:func:`graph_collectives`)."""
        return graph_collectives(self.graphs[phase])

    def bytes_by_kind(self, phase: str) -> dict[str, tuple[int, int]]:
        """``{kind: (exchanges, bytes this rank sends per step)}`` for ``phase``."""
        out: dict[str, tuple[int, int]] = {}
        for s in self.sites(phase):
            count, sent = out.get(s.kind, (0, 0))
            out[s.kind] = (count + 1, sent + s.bytes_sent)
        return out

    def summary(self) -> str:
        """A human-readable table of exchanges per phase."""
        split = ", one batch half of a CFG split" if self.cfg_split else ""
        out = [f"distrifx plan: world_size={self.config.world_size}, rank={self.rank}{split}, "
               f"mode={self.config.mode.value}, gn_variant={self.config.gn_variant.value}"]
        for phase in self.graphs:
            sites = self.sites(phase)
            kinds = Counter(s.kind for s in sites)
            forms = Counter(s.form.value for s in sites)
            out.append(
                f"\n[{phase}] {len(sites)} exchanges: "
                + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))
                + " | forms: " + ", ".join(f"{k} x{v}" for k, v in sorted(forms.items()))
                + f" | sent by this rank per step: {self.bytes_per_step(phase) / 2**20:.3f} MiB"
                + f" | {self.collectives(phase)} collectives, {self.calls(phase)} calls"
            )
            for s in sites:
                out.append(f"  {s.kind:8s} {s.form.value:6s} {s.bytes_sent:>10d} B  {s.name:40s} {s.module}")
        return "\n".join(out)

    def timeline(self, phase: str, scheduled: bool = True) -> str:
        """Collective order of ``phase``'s graph after (or before) the scheduling pass."""
        return collective_timeline((self.graphs if scheduled else self.unscheduled)[phase])


def explain(
    model: nn.Module,
    args: tuple,
    kwargs: dict | None = None,
    *,
    world_size: int,
    rank: int = 0,
    **options: Any,
) -> Plan:
    """Build rank ``rank``'s graphs for ``model(*args, **kwargs)`` and describe them.

    ``options`` are those of :func:`distrifx.parallelize` (mode, gn_variant, ...). Where the call runs
    CFG-parallel (``cfg_parallel``, decided as the runtime does), the plan is of the rank's batch half,
    patch-parallel over ``world_size / 2`` ranks; gathering the halves' outputs is not in its graphs.
    ``model`` keeps its training mode (it is captured in eval mode, as :func:`parallelize` runs it).

    Example:
        >>> print(distrifx.explain(unet, (x, t), {"encoder_hidden_states": ctx},   # doctest: +SKIP
        ...                        world_size=4, mode="stale").summary())
    """
    config = ParallelConfig(world_size=world_size, **options)
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ConfigError(f"explain: rank={rank!r} is not a rank of world_size={world_size} (0 to {world_size - 1})")
    flat, spec = tree_flatten((tuple(args), kwargs or {}))
    batch = batch_size(flat)
    split = wants_split(config.cfg_parallel, world_size, batch)
    if split:
        half, rank = divmod(rank, world_size // 2)
        args, kwargs = tree_unflatten(batch_half(flat, batch, half), spec)
        config = dataclasses.replace(config, world_size=world_size // 2, cfg_parallel=False)
    training = model.training
    try:
        captured = capture(model.eval(), tuple(args), kwargs or {})
    finally:
        model.train(training)
    graphs, unscheduled = {}, {}
    with captured.lock:
        for phase in phases_for(config.mode):
            ctx = PassContext.for_config(config, rank, phase, type(model).__name__)
            graphs[phase] = build_rank_graph(captured.graph_module, ctx)
            unscheduled[phase] = build_rank_graph(captured.graph_module, ctx, skip=("schedule",))
    return Plan(config=config, rank=rank, graphs=graphs, unscheduled=unscheduled, cfg_split=split)
