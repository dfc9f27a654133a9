"""A ControlNet beside a parallelized UNet: patch-parallel, its residuals left where they are added."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils._pytree import tree_map

from distrifx.errors import ConfigError
from distrifx.runtime.comm import from_rank0
from distrifx.runtime.module import SteppedModule, number_as_tensor

__all__ = ["ParallelControlNet", "controlnet_call"]


class ParallelControlNet(nn.Module):
    """Runs a ControlNet patch-parallel and hands its residuals to a UNet parallelized alike.

    A UNet rank reads only its own rows of the residuals it adds, so by default each rank keeps
    only those (``gather_outputs=False``: the other rows are NaN) and nothing is gathered. In guess
    mode a pipeline with guidance runs the ControlNet on the conditional half of the UNet's batch
    only, so the two may split the batch differently: those calls go to ``whole``, which gathers the
    residuals. A pipeline loaded by :func:`distrifx.load_pipeline` has one module: exported for calls
    out of guess mode it keeps own rows and refuses guess mode (``whole`` None); exported in guess mode
    it gathers and is both.

    ``isinstance`` takes it for the wrapped model's class, since diffusers' ControlNet pipelines
    branch on it (``isinstance(self.controlnet, ControlNetModel)``); ``type()`` tells them apart.
    Attributes it does not hold are the wrapped model's (``config``, ``dtype``, ``nets``, ...), or
    what a loaded export recorded of it (``config``, ``dtype``, ``device``). A
    numeric ``conditioning_scale`` is passed on as a tensor, so a scale that changes during a
    generation neither captures the model again nor starts a new generation.
    """

    def __init__(self, own_rows: SteppedModule, whole: SteppedModule | None = None) -> None:
        super().__init__()
        self.own_rows = own_rows
        self.whole = whole  # None: guess-mode calls are refused (a loaded export that keeps own rows)
        self._cond: tuple[Any, Any] | None = None  # (the pipeline's conditioning, rank 0's)

    def _own_rows(self) -> SteppedModule | None:
        """``own_rows``, looked up without ``__getattr__`` (None while this module is initialised)."""
        return self.__dict__.get("_modules", {}).get("own_rows")

    def _wrapped(self) -> nn.Module | None:
        """What answers for the ControlNet: the model itself, or a loaded export."""
        own_rows = self._own_rows()
        return None if own_rows is None else getattr(own_rows, "module", own_rows)

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        own_rows = self._own_rows()
        return type(self) if own_rows is None else own_rows.model_class

    def _get_name(self) -> str:
        return type(self).__name__

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if (wrapped := self._wrapped()) is None:
                raise
        return getattr(wrapped, name)

    def reset(self) -> None:
        """Start a new generation (see :meth:`ParallelModule.reset`)."""
        self.own_rows.reset()
        if self.whole is not None:
            self.whole.reset()
        self._cond = None

    def _rank0_cond(self, cond: Any) -> Any:
        """Rank 0's conditioning, as rank 0's initial latents are shared. SD 3's pipelines sample it from the
        VAE with the global random generator, which ranks need not share; the pipeline passes the same object
        every step, so it is shared once a generation."""
        if self._cond is None or self._cond[0] is not cond:
            self._cond = (cond, from_rank0(self.own_rows.comm, cond))
        return self._cond[1]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs, guess_mode = controlnet_call(self.own_rows.call_signature, args, kwargs, self._rank0_cond)
        if not guess_mode:
            return self.own_rows(*args, **kwargs)
        if self.whole is None:
            raise ConfigError(
                "ParallelControlNet: a guess-mode call needs the residuals whole on every rank, and this one (a loaded "
                "export) keeps each rank's rows only. Generate without guess_mode, export the pipeline for guess mode "
                "(distrifx.export_pipeline(..., pipeline_kwargs={'guess_mode': True})), or split it with "
                "distrifx.parallelize_pipeline, which gathers guess-mode residuals.")
        return self.whole(*args, **kwargs)


def controlnet_call(signature: inspect.Signature | None, args: tuple, kwargs: dict,
                    cond: Callable[[Any], Any] | None = None) -> tuple[tuple, dict, bool]:
    """A ControlNet call with a numeric ``conditioning_scale`` as a tensor (and ``controlnet_cond`` as
    ``cond`` makes it), and whether it is in guess mode.

    A call that does not bind to ``signature`` (or with none known) is returned as it is: the model
    gives its own error.
    """
    try:
        bound = signature.bind_partial(*args, **kwargs) if signature is not None else None
    except TypeError:
        bound = None
    if bound is None:
        return args, kwargs, False
    if "conditioning_scale" in bound.arguments:  # a scale changing within a generation (control_guidance_end)
        bound.arguments["conditioning_scale"] = tree_map(number_as_tensor, bound.arguments["conditioning_scale"])
    if cond is not None and "controlnet_cond" in bound.arguments:
        bound.arguments["controlnet_cond"] = cond(bound.arguments["controlnet_cond"])
    return bound.args, bound.kwargs, bool(bound.arguments.get("guess_mode", False))
