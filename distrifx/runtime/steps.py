"""Knows where a generation is: which denoising step this call is, and when a new one starts."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

__all__ = ["StepTracker"]


def _as_float(timestep: object) -> float | None:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0]) if timestep.numel() else None
    if isinstance(timestep, (int, float)):
        return float(timestep)
    return None


@dataclass
class StepTracker:
    """Counts denoising steps; a new generation starts on :meth:`reset`, when the input signature
    changes, or when the timestep stops decreasing.

    A generation begun by :meth:`reset` has its start marked by the caller, so there a timestep
    equal to the last call's continues it (Heun-type schedulers evaluate each timestep twice) and
    only a rising one starts another; without that mark an equal timestep starts a new generation,
    as a repeated one-step generation would call the model.
    """

    step: int = 0
    _timestep: float | None = None
    _first: float | None = None  # the generation's first timestep
    _key: Hashable | None = None
    _started: bool = False
    _marked: bool = False  # this generation was begun by reset()

    def reset(self) -> None:
        self.step, self._timestep, self._first, self._key, self._started = 0, None, None, None, False
        self._marked = True

    @property
    def descended(self) -> float | None:
        """How far the timestep has come down from the generation's first, as a share of it (0 at
        the first call); None when the calls carry no timestep."""
        if self._timestep is None or self._first is None:
            return None
        return 1.0 - self._timestep / self._first if self._first > 0 else 1.0

    def advance(self, timestep: object, key: Hashable) -> bool:
        """Record a call; return True if it starts a new generation (``self.step`` is then 0)."""
        t = _as_float(timestep)
        detected = self._started and (key != self._key or self._stopped_decreasing(t))
        new = detected or not self._started
        self._marked = self._marked and not detected
        self.step = 0 if new else self.step + 1
        self._first = t if new else self._first
        self._timestep, self._key, self._started = t, key, True
        return new

    def _stopped_decreasing(self, t: float | None) -> bool:
        if t is None or self._timestep is None:
            return False
        return t > self._timestep or (t == self._timestep and not self._marked)
