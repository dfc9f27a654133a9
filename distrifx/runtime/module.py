"""ParallelModule: the model's call signature and return type, running this rank's graphs."""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Hashable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, keystr, tree_flatten, tree_flatten_with_path, tree_unflatten

from distrifx.capture import capture, signature_key
from distrifx.config import ParallelConfig
from distrifx.runtime.cfg import CfgSplit, LocalCall, local_call
from distrifx.runtime.comm import CommStats, Communicator, check_same_inputs
from distrifx.runtime.program import Generation, RankProgram, build_program

__all__ = ["ParallelModule", "SteppedModule", "PIPELINE_ATTRIBUTES", "number_as_tensor"]

# What diffusers pipelines read from their denoiser besides calling it. Forwarded explicitly to
# the wrapped model; anything else is at ``pmodel.module``.
PIPELINE_ATTRIBUTES = frozenset({
    "config", "dtype", "device", "add_embedding", "encoder_hid_proj", "cache_context",
    "time_embedding", "time_proj", "_hf_hook",
})


def number_as_tensor(value: object) -> object:
    """A Python number as a 0-d tensor (as a number it would be a constant of the captured graph, and
    each new value a new capture); anything else as it is."""
    return torch.tensor(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _leaf_paths(params: list[str], args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """``("encoder_hidden_states", leaf)``-style names for every input leaf."""
    named = {**dict(zip(params, args)), **kwargs}
    leaves, _ = tree_flatten_with_path(named)
    return [(keystr(path)[2:].replace("']", "", 1), leaf) for path, leaf in leaves]


class SteppedModule(nn.Module):
    """What a parallelized model and a loaded export share: the generation's steps and phases, the
    phase and communication of the last call, and attribute lookups the module itself cannot answer
    (``_missing``)."""

    def __init__(self, config: ParallelConfig, comm: Communicator) -> None:
        super().__init__()
        self.parallel_config = config
        self.comm = comm
        self.generation = Generation(config.mode, config.warmup_steps, config.warmup_fraction)
        self.last_phase: str | None = None
        self.last_stats = CommStats()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        return self._missing(name)  # outside the handler: its error is not chained to nn.Module's

    def _missing(self, name: str) -> Any:
        """The value of an attribute ``nn.Module`` does not hold, or an AttributeError saying why not."""
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def reset(self) -> None:
        """Start a new generation: the next call runs the warm-up graph and rebuilds stale state."""
        self.generation.reset()

    def _step(self, call: LocalCall, program: RankProgram, timestep: object, key: Hashable) -> Any:
        """Run this step's phase of ``program``; return its outputs in the model's structure."""
        phase = self.generation.next_phase(timestep, key)
        outputs, self.last_stats = call.run(self.generation, program, phase)
        self.last_phase = phase
        return tree_unflatten(outputs, program.out_spec)


class ParallelModule(SteppedModule):
    """A model split into row patches over the ranks of a communicator.

    Call it exactly like the model: same arguments, same return type, the full output on every
    rank (with ``gather_outputs=False``, only this rank's rows of a sharded one). Graphs are
    captured and built on the first call for each input signature. Inference only: forward runs
    without autograd (collectives have no backward here).
    """

    def __init__(self, model: nn.Module, config: ParallelConfig, comm: Communicator) -> None:
        super().__init__(config, comm)
        self.module = model
        self._programs: dict[Hashable, RankProgram] = {}
        self._cfg: CfgSplit | None = None
        self.build_seconds = 0.0  # capture + passes, summed over input signatures
        self._signature = inspect.signature(model.forward)
        self._timestep_param = "timestep" if "timestep" in self._signature.parameters else None

    @property
    def model_class(self) -> type:
        """The class of the model this module runs."""
        return type(self._modules["module"])

    @property
    def call_signature(self) -> inspect.Signature:
        """How calls bind: the model's ``forward``."""
        return self._signature

    def _missing(self, name: str) -> Any:
        if name in PIPELINE_ATTRIBUTES:
            return getattr(self._modules["module"], name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}; the wrapped model is at "
                             f".module (only {sorted(PIPELINE_ATTRIBUTES)} are forwarded)")

    def _cfg_split(self) -> CfgSplit:
        if self._cfg is None:
            self._cfg = CfgSplit.create(self.comm)
        return self._cfg

    def _localize(self, flat: list[Any]) -> LocalCall:
        config = self.parallel_config
        return local_call(self.comm, config.cfg_parallel, flat, self._cfg_split, config.gather_outputs)

    def _program(self, call: LocalCall, spec: TreeSpec) -> tuple[Hashable, RankProgram]:
        args, kwargs = tree_unflatten(call.flat, spec)
        key = signature_key(args, kwargs)
        if key not in self._programs:
            start = time.perf_counter()
            captured = capture(self.module, args, kwargs)
            config = dataclasses.replace(self.parallel_config, world_size=call.comm.world_size, cfg_parallel=False)
            self._programs[key] = build_program(captured, config, call.comm.rank, type(self.module).__name__)
            self.build_seconds += time.perf_counter() - start
        return key, self._programs[key]

    def program(self, *args: Any, **kwargs: Any) -> RankProgram:
        """This rank's program for these inputs (captured and built on first use)."""
        args, kwargs, _ = self._with_tensor_timestep(args, kwargs)
        flat, spec = tree_flatten((args, kwargs))
        return self._program(self._localize(flat), spec)[1]

    def _with_tensor_timestep(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, object]:
        """The call, with a Python-number timestep made a 0-d tensor as the model would make it (a number
        is a constant of the captured graph: each new one would capture again and begin a generation),
        and its timestep (None where the model takes none)."""
        try:
            bound = self._signature.bind_partial(*args, **kwargs) if self._timestep_param else None
        except TypeError:
            bound = None
        t = bound.arguments.get(self._timestep_param) if bound else None
        if (as_tensor := number_as_tensor(t)) is t:
            return args, kwargs, t
        bound.arguments[self._timestep_param] = as_tensor
        return bound.args, bound.kwargs, as_tensor

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs, timestep = self._with_tensor_timestep(args, kwargs)
        flat, spec = tree_flatten((args, kwargs))
        check_same_inputs(self.comm, flat, lambda: [
            path for path, _ in _leaf_paths(list(self._signature.parameters), args, kwargs)])
        call = self._localize(flat)
        key, program = self._program(call, spec)
        return self._step(call, program, timestep, key)
