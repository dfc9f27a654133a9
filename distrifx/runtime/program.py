"""A rank's compiled program: one graph per phase, all specialized to one input signature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils._pytree import TreeSpec

from distrifx.capture import CapturedProgram
from distrifx.config import Mode, ParallelConfig
from distrifx.passes import META_SIGNATURE, META_SITES, PassContext, Phase, RankSignature, build_rank_graph
from distrifx.runtime.comm import Communicator

__all__ = ["RankProgram", "phases_for", "build_program"]


def phases_for(mode: Mode) -> tuple[str, ...]:
    """The graphs a mode needs, in the order a generation uses them."""
    return {Mode.SYNC: (Phase.SYNC,), Mode.NAIVE: (Phase.NAIVE,), Mode.STALE: (Phase.WARMUP, Phase.STALE)}[mode]


@dataclass(frozen=True)
class RankProgram:
    """Per-phase graphs of one rank plus how to unflatten their outputs."""

    graphs: dict[str, GraphModule]
    out_spec: TreeSpec

    def signature(self, phase: str) -> RankSignature:
        return self.graphs[phase].meta[META_SIGNATURE]

    def sites(self, phase: str) -> tuple:
        return self.graphs[phase].meta[META_SITES]

    def run(
        self, phase: str, comm: Communicator, flat_inputs: list[Any], state: dict[str, torch.Tensor]
    ) -> tuple[list[Any], dict[str, torch.Tensor]]:
        """Run ``phase``'s graph; return flat user outputs and the state it emits for the next step."""
        sig = self.signature(phase)
        outputs = self.graphs[phase](comm, *flat_inputs, *(state[name] for name in sig.state_in))
        user, carried = outputs[: sig.num_user_outputs], outputs[sig.num_user_outputs:]
        return list(user), dict(zip(sig.state_out, carried))


def build_program(captured: CapturedProgram, config: ParallelConfig, rank: int, name: str) -> RankProgram:
    """Run the pass pipeline for every phase ``config.mode`` needs, for one rank."""
    with captured.lock:
        graphs = {
            phase: build_rank_graph(
                captured.graph_module,
                PassContext(rank=rank, world_size=config.world_size, phase=phase,
                            gn_variant=config.gn_variant, name=name),
            )
            for phase in phases_for(config.mode)
        }
    return RankProgram(graphs=graphs, out_spec=captured.out_spec)
