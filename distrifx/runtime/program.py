"""A rank's compiled program: one graph per phase, all specialized to one input signature."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import TreeSpec

from distrifx.backends import apply_backend
from distrifx.capture import CapturedProgram
from distrifx.config import Mode, ParallelConfig
from distrifx.errors import ConfigError
from distrifx.passes import META_SIGNATURE, META_SITES, PassContext, Phase, RankSignature, build_rank_graph
from distrifx.passes.builder import older
from distrifx.runtime.comm import Communicator
from distrifx.runtime.steps import StepTracker

__all__ = ["RankProgram", "Generation", "phases_for", "select_phase", "build_program"]


def phases_for(mode: Mode) -> tuple[str, ...]:
    """The graphs a mode needs, in the order a generation uses them."""
    return {Mode.SYNC: (Phase.SYNC,), Mode.NAIVE: (Phase.NAIVE,), Mode.STALE: (Phase.WARMUP, Phase.STALE)}[mode]


def select_phase(mode: Mode, warming_up: bool, has_state: bool) -> str:
    """The graph a call runs: stale mode runs the warm-up graph while ``warming_up`` and until a
    warm-up call has built the state the stale graph reads (``has_state``; it may be empty).

    Example:
        >>> select_phase(Mode.STALE, warming_up=False, has_state=True)
        'stale'
    """
    if mode is Mode.SYNC:
        return Phase.SYNC
    if mode is Mode.NAIVE:
        return Phase.NAIVE
    return Phase.WARMUP if warming_up or not has_state else Phase.STALE


@dataclass
class Generation:
    """Where a rank is in a generation: its step count and the stale state carried between calls.

    A generation warms up for its first ``warmup_steps`` calls and, with ``warmup_fraction`` f,
    also while its timestep is above (1 - f) x its first one: the first f of its noise range,
    whatever the number of steps.
    """

    mode: Mode
    warmup_steps: int
    warmup_fraction: float = 0.0
    steps: StepTracker = field(default_factory=StepTracker)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    has_state: bool = False  # a call of this generation has emitted ``state`` (none if nothing is stale)
    warmup_calls: int = 0  # of this generation so far

    def reset(self) -> None:
        """Start a new generation: the next call runs the warm-up graph and rebuilds stale state."""
        self.steps.reset()
        self._clear()

    def _clear(self) -> None:
        self.state.clear()
        self.has_state = False
        self.warmup_calls = 0

    def next_phase(self, timestep: object, key: Hashable) -> str:
        """Record a call (``timestep``, input signature ``key``) and pick the graph it runs."""
        new_generation = self.steps.advance(timestep, key)
        if new_generation:
            self._clear()
        warming_up = self._warming_up()
        phase = select_phase(self.mode, new_generation or warming_up, self.has_state)
        self.warmup_calls += phase == Phase.WARMUP
        return phase

    def _warming_up(self) -> bool:
        """Whether this call is within the generation's first ``warmup_steps`` or ``warmup_fraction``."""
        if self.warmup_fraction and self.mode is Mode.STALE:
            descended = self.steps.descended
            if descended is None:
                raise ConfigError(f"warmup_fraction={self.warmup_fraction} warms up by the timestep, but this model's "
                                  "calls carry none (no `timestep` argument, or not a number); give warmup_steps "
                                  "instead.")
            if descended < self.warmup_fraction:
                return True
        return self.steps.step < self.warmup_steps

    def run(self, program: RankProgram, phase: str, comm: Communicator, flat_inputs: list[Any]) -> list[Any]:
        """Run ``phase`` with the carried state; keep the state it emits; return the user outputs."""
        outputs, self.state = program.run(phase, comm, flat_inputs, self.state)
        self.has_state = True
        return outputs

    @property
    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


@dataclass(frozen=True)
class RankProgram:
    """Per-phase graphs of one rank plus how to unflatten their outputs.

    A graph is the rank's GraphModule (eager), its split form with compiled segments (inductor)
    or a stored program (:func:`distrifx.load`); each keeps the signature in ``.meta``.
    """

    graphs: dict[str, nn.Module]
    out_spec: TreeSpec

    def signature(self, phase: str) -> RankSignature:
        return self.graphs[phase].meta[META_SIGNATURE]

    @cached_property
    def extrapolated(self) -> tuple[str, ...]:
        """Carried values some graph also reads one step older (stale extrapolation)."""
        names = {name for phase in self.graphs for name in self.signature(phase).state_in}
        return tuple(sorted(name for name in names if older(name) in names))

    def sites(self, phase: str) -> tuple:
        return self.graphs[phase].meta[META_SITES]

    def run(
        self, phase: str, comm: Communicator, flat_inputs: list[Any], state: dict[str, torch.Tensor]
    ) -> tuple[list[Any], dict[str, torch.Tensor]]:
        """Run ``phase``'s graph; return flat user outputs and the state for the next step.

        That is what the graph emits and, for the values some graph extrapolates, the ones they
        replace (a generation's first call replaces none: its values count as their own predecessors).
        """
        sig = self.signature(phase)
        outputs = self.graphs[phase](comm, *flat_inputs, *(state[name] for name in sig.state_in))
        user, carried = outputs[: sig.num_user_outputs], outputs[sig.num_user_outputs:]
        emitted = dict(zip(sig.state_out, carried))
        emitted.update({older(name): state.get(name, emitted[name]) for name in self.extrapolated if name in emitted})
        return list(user), emitted


def build_program(captured: CapturedProgram, config: ParallelConfig, rank: int, name: str) -> RankProgram:
    """Run the pass pipeline for every phase ``config.mode`` needs, for one rank, under ``config.backend``.

    Only the last phase, the one a generation spends its steps in, may freeze its weights (inductor
    on a CPU): a frozen graph holds its own copy of them, and warm-up runs a few steps only.
    """
    steady = phases_for(config.mode)[-1]
    with captured.lock:
        graphs = {
            phase: build_rank_graph(
                captured.graph_module,
                PassContext.for_config(config, rank, phase, name),
            )
            for phase in phases_for(config.mode)
        }
    return RankProgram(
        graphs={phase: apply_backend(gm, config.backend, freeze=phase == steady) for phase, gm in graphs.items()},
        out_spec=captured.out_spec,
    )
