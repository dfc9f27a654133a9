"""ParallelModule: the model's call signature and return type, running this rank's graphs."""

from __future__ import annotations

import inspect
from collections.abc import Hashable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from distrifx.capture import capture, signature_key
from distrifx.config import Mode, ParallelConfig
from distrifx.passes import Phase
from distrifx.runtime.comm import CommStats, Communicator
from distrifx.runtime.program import RankProgram, build_program
from distrifx.runtime.steps import StepTracker

__all__ = ["ParallelModule", "PIPELINE_ATTRIBUTES"]

# What diffusers pipelines read from their denoiser besides calling it. Forwarded explicitly to
# the wrapped model; anything else is at ``pmodel.module``.
PIPELINE_ATTRIBUTES = frozenset({
    "config", "dtype", "device", "add_embedding", "encoder_hid_proj", "cache_context",
    "time_embedding", "time_proj", "dtype", "_hf_hook",
})


class ParallelModule(nn.Module):
    """A model split into row patches over the ranks of a communicator.

    Call it exactly like the model: same arguments, same return type, the full output on every
    rank. Graphs are captured and built on the first call for each input signature. Inference
    only: forward runs without autograd (collectives have no backward here).
    """

    def __init__(self, model: nn.Module, config: ParallelConfig, comm: Communicator) -> None:
        super().__init__()
        self.module = model
        self.parallel_config = config
        self.comm = comm
        self.steps = StepTracker()
        self._programs: dict[Hashable, RankProgram] = {}
        self._state: dict[str, torch.Tensor] = {}
        self._timestep_param = "timestep" if "timestep" in inspect.signature(model.forward).parameters else None
        self.last_phase: str | None = None
        self.last_stats = CommStats()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in PIPELINE_ATTRIBUTES:
                return getattr(self._modules["module"], name)
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}; the wrapped model is at "
                f".module (only {sorted(PIPELINE_ATTRIBUTES)} are forwarded)"
            ) from None

    def reset(self) -> None:
        """Start a new generation: the next call runs the warm-up graph and rebuilds stale state."""
        self.steps.reset()
        self._state.clear()

    def program(self, *args: Any, **kwargs: Any) -> RankProgram:
        """This rank's program for these inputs (captured and built on first use)."""
        key = signature_key(args, kwargs)
        if key not in self._programs:
            captured = capture(self.module, args, kwargs)
            self._programs[key] = build_program(
                captured, self.parallel_config, self.comm.rank, type(self.module).__name__
            )
        return self._programs[key]

    def _timestep(self, args: tuple, kwargs: dict) -> object:
        if self._timestep_param is None:
            return None
        try:
            bound = inspect.signature(self.module.forward).bind_partial(*args, **kwargs)
        except TypeError:
            return None
        return bound.arguments.get(self._timestep_param)

    def _phase(self, new_generation: bool) -> str:
        mode = self.parallel_config.mode
        if mode is Mode.SYNC:
            return Phase.SYNC
        if mode is Mode.NAIVE:
            return Phase.NAIVE
        if new_generation or self.steps.step < self.parallel_config.warmup_steps or not self._state:
            return Phase.WARMUP
        return Phase.STALE

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        program = self.program(*args, **kwargs)
        new_generation = self.steps.advance(self._timestep(args, kwargs), signature_key(args, kwargs))
        if new_generation:
            self._state.clear()
        phase = self._phase(new_generation)
        self.comm.stats.reset()
        flat, _ = tree_flatten((args, kwargs))
        outputs, self._state = program.run(phase, self.comm, flat, self._state)
        self.last_phase = phase
        self.last_stats = CommStats(**vars(self.comm.stats))
        return tree_unflatten(outputs, program.out_spec)
