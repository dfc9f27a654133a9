"""A ControlNet beside a parallelized UNet: patch-parallel, its residuals left where they are added."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn
from torch.utils._pytree import tree_map

from distrifx.runtime.module import ParallelModule, number_as_tensor

__all__ = ["ParallelControlNet"]


class ParallelControlNet(nn.Module):
    """Runs a ControlNet patch-parallel and hands its residuals to a UNet parallelized alike.

    A UNet rank reads only its own rows of the residuals it adds, so by default each rank keeps
    only those (``gather_outputs=False``: the other rows are NaN) and nothing is gathered. In guess
    mode a pipeline with guidance runs the ControlNet on the conditional half of the UNet's batch
    only, so the two may split the batch differently: those calls gather the residuals whole.

    ``isinstance`` takes it for the wrapped model's class, since diffusers' ControlNet pipelines
    branch on it (``isinstance(self.controlnet, ControlNetModel)``); ``type()`` tells them apart.
    Attributes it does not hold are the wrapped model's (``config``, ``dtype``, ``nets``, ...). A
    numeric ``conditioning_scale`` is passed on as a tensor, so a scale that changes during a
    generation neither captures the model again nor starts a new generation.
    """

    def __init__(self, own_rows: ParallelModule, whole: ParallelModule) -> None:
        super().__init__()
        self.own_rows = own_rows
        self.whole = whole
        self._signature = inspect.signature(own_rows.module.forward)

    def _wrapped(self) -> nn.Module | None:
        """The ControlNet itself (None while this module is not yet initialised)."""
        own_rows = self.__dict__.get("_modules", {}).get("own_rows")
        return None if own_rows is None else own_rows.module

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        wrapped = self._wrapped()
        return type(self) if wrapped is None else type(wrapped)

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
        self.whole.reset()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = self._signature.bind_partial(*args, **kwargs)
        except TypeError:  # the model's own error, from its own call
            return self.own_rows(*args, **kwargs)
        if "conditioning_scale" in bound.arguments:  # a scale changing within a generation (control_guidance_end)
            bound.arguments["conditioning_scale"] = tree_map(number_as_tensor, bound.arguments["conditioning_scale"])
        module = self.whole if bound.arguments.get("guess_mode", False) else self.own_rows
        return module(*bound.args, **bound.kwargs)

