"""The parallelization options, validated once, as a frozen dataclass of enums."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Literal

import torch

from distrifx.errors import ConfigError

__all__ = ["DEFAULT_TIMEOUT_S", "Mode", "GNVariant", "KVExchange", "Backend", "ParallelConfig", "STALE_DTYPES",
           "FRESH_KINDS", "dtype_name", "fresh_kinds"]

# What stale exchanges may travel and be kept in: narrower floats than the activations.
STALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Exchanges stale mode can keep synchronous (``fresh=``); GroupNorm's is ``gn_variant="sync"``.
FRESH_KINDS = ("halo", "kv")


class Mode(str, enum.Enum):
    """How patches see their neighbours."""

    SYNC = "sync"  # exact: every exchange is fresh, every step
    STALE = "stale"  # DistriFusion: neighbours' values from the previous step, sent asynchronously
    NAIVE = "naive"  # no interaction between patches: the quality floor


class GNVariant(str, enum.Enum):
    """Which statistics GroupNorm uses after warm-up in stale mode."""

    CORRECTED = "corrected"  # stale global stats shifted by this rank's change since the previous step
    SYNC = "sync"  # fresh global stats (a synchronous exchange every step)
    STALE = "stale"  # the previous step's global stats, this rank's part included
    SEPARATE = "separate"  # local stats only


class KVExchange(str, enum.Enum):
    """What self-attention exchanges when its keys and values are projections of one tensor."""

    AUTO = "auto"  # whichever the cost model says is cheaper on this device
    KV = "kv"  # the keys and values
    HIDDEN = "hidden"  # the hidden states before the projections (each rank projects them)


class Backend(str, enum.Enum):
    """What runs the per-rank graph."""

    EAGER = "eager"
    INDUCTOR = "inductor"  # torch.compile per segment
    TENSORRT = "tensorrt"  # torch-tensorrt per segment (CUDA)


def _enum(cls: type[enum.Enum], value: object, option: str) -> enum.Enum:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)  # type: ignore[attr-defined]
        raise ConfigError(f"{option}={value!r} is not valid; choose one of {choices}.") from None


def _is_number(value: object) -> bool:
    """A finite int or float option value (a bool is neither here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    """An int option value (a bool is not one here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.bfloat16`` -> ``"bfloat16"`` (for manifests and labels); None stays None."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _stale_dtype(value: object) -> torch.dtype | None:
    if value is None:
        return None
    name = dtype_name(value) if isinstance(value, torch.dtype) else value
    if isinstance(name, str) and name in STALE_DTYPES:
        return STALE_DTYPES[name]
    raise ConfigError(f"stale_dtype={value!r} is not valid; choose None (the activations' dtype) or one of "
                      f"{', '.join(repr(n) for n in STALE_DTYPES)} (torch dtypes or their names).")


def fresh_kinds(value: object) -> tuple[str, ...]:
    """``fresh`` as a sorted tuple of exchange kinds; one kind may be given as a string."""
    kinds = (value,) if isinstance(value, str) else value
    if isinstance(kinds, (tuple, list, set, frozenset)) and all(k in FRESH_KINDS for k in kinds):
        return tuple(sorted(set(kinds)))
    gn = (" (GroupNorm statistics are kept synchronous with gn_variant='sync')"
          if isinstance(kinds, (tuple, list, set, frozenset)) and "gn" in kinds else "")
    raise ConfigError(f"fresh={value!r} is not valid: give the exchanges stale mode keeps synchronous as a "
                      f"sequence of {', '.join(repr(k) for k in FRESH_KINDS)}, e.g. fresh=('halo',){gn}.")


DEFAULT_TIMEOUT_S = 300.0  # how long any wait on a peer rank may take before it raises


@dataclass(frozen=True)
class ParallelConfig:
    """Validated options of :func:`distrifx.parallelize`.

    Example:
        >>> ParallelConfig(world_size=4, mode="sync").mode
        <Mode.SYNC: 'sync'>
    """

    world_size: int
    mode: Mode = Mode.STALE
    warmup_steps: int = 4
    warmup_fraction: float = 0.0  # also warm up over this first share of the timestep's range
    gn_variant: GNVariant = GNVariant.CORRECTED
    kv_exchange: KVExchange = KVExchange.AUTO
    cfg_parallel: bool | Literal["auto"] = "auto"
    backend: Backend = Backend.EAGER
    timeout_s: float = DEFAULT_TIMEOUT_S
    stale_dtype: torch.dtype | None = None  # halo rows and K/V of stale exchanges: sent and kept in this
    extrapolate: float = 0.0  # stale values: last step's + this x (last step's - the one before's)
    fresh: tuple[str, ...] = ()  # exchange kinds (FRESH_KINDS) stale mode still does synchronously
    bucket_mb: float = 0.0  # stale exchanges sent in collectives of up to this many MiB (0: one each)
    gather_outputs: bool = True  # False: sharded outputs full size, only this rank's rows (and batch half) computed

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _enum(Mode, self.mode, "mode"))
        object.__setattr__(self, "gn_variant", _enum(GNVariant, self.gn_variant, "gn_variant"))
        object.__setattr__(self, "backend", _enum(Backend, self.backend, "backend"))
        object.__setattr__(self, "kv_exchange", _enum(KVExchange, self.kv_exchange, "kv_exchange"))
        object.__setattr__(self, "stale_dtype", _stale_dtype(self.stale_dtype))
        object.__setattr__(self, "fresh", fresh_kinds(self.fresh))
        problems = []
        if not _is_int(self.world_size) or self.world_size < 1:
            problems.append(f"world_size={self.world_size!r} must be a positive int")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps!r} must be an int >= 0")
        if not _is_number(self.warmup_fraction) or not 0.0 <= self.warmup_fraction < 1.0:
            problems.append(f"warmup_fraction={self.warmup_fraction!r} must be a number in [0, 1) (the share of the "
                            "timestep's range, from the generation's first, to run synchronously; 0: off)")
        if not (isinstance(self.cfg_parallel, bool) or self.cfg_parallel == "auto"):
            problems.append(f"cfg_parallel={self.cfg_parallel!r} must be 'auto', True or False")
        if self.cfg_parallel is True and _is_int(self.world_size) and self.world_size % 2:
            problems.append(f"cfg_parallel=True needs an even world_size, got {self.world_size}")
        if not _is_number(self.extrapolate) or not 0.0 <= self.extrapolate <= 1.0:
            problems.append(f"extrapolate={self.extrapolate!r} must be a number in [0, 1] (0: the previous "
                            "step's values as they are)")
        if not _is_number(self.bucket_mb) or self.bucket_mb < 0:
            problems.append(f"bucket_mb={self.bucket_mb!r} must be a number >= 0 (MiB of stale exchanges sent "
                            "in one collective; 0: one collective per exchange)")
        if not isinstance(self.gather_outputs, bool):
            problems.append(f"gather_outputs={self.gather_outputs!r} must be True or False")
        if not _is_number(self.timeout_s) or self.timeout_s <= 0:
            problems.append(f"timeout_s={self.timeout_s!r} must be a number of seconds > 0")
        if problems:
            raise ConfigError("invalid parallel config: " + "; ".join(problems) + ".")
