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
    """Counts denoising steps; a new generation starts when the timestep stops decreasing,
    when the input signature changes, or on :meth:`reset`."""

    step: int = 0
    _timestep: float | None = None
    _first: float | None = None  # the generation's first timestep
    _key: Hashable | None = None
    _started: bool = False

    def reset(self) -> None:
        self.step, self._timestep, self._first, self._key, self._started = 0, None, None, None, False

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
        new = (
            not self._started
            or key != self._key
            or (t is not None and self._timestep is not None and t >= self._timestep)
        )
        self.step = 0 if new else self.step + 1
        self._first = t if new else self._first
        self._timestep, self._key, self._started = t, key, True
        return new
