"""Errors raised by distrifx.

Every error says what failed, where (module path and graph node when there is one), why, and how
to fix it. They all derive from :class:`DistrifxError` so callers can catch one type.
"""

from __future__ import annotations

from typing import Any

from torch.fx import Node

__all__ = [
    "DistrifxError",
    "ConfigError",
    "ProcessGroupError",
    "CaptureError",
    "UnsupportedOpError",
    "ShardingError",
    "ShapeError",
    "CollectiveTimeoutError",
    "ArtifactError",
    "InputSignatureError",
    "module_path",
    "where",
]


class DistrifxError(RuntimeError):
    """Base class of every error distrifx raises on purpose."""


class ConfigError(DistrifxError, ValueError):
    """An option passed to :func:`distrifx.parallelize` is invalid."""


class ProcessGroupError(DistrifxError):
    """The process group is missing or does not match the requested world size."""


class CaptureError(DistrifxError):
    """``torch.export`` could not capture the model."""


class UnsupportedOpError(DistrifxError):
    """A node touches a sharded tensor and no sharding rule is registered for its op."""


class ShardingError(DistrifxError):
    """A rule exists for the op, but not for this combination of placements or arguments."""


class ShapeError(DistrifxError, ValueError):
    """An input shape cannot be split evenly over the ranks."""


class ArtifactError(DistrifxError):
    """Exported artifacts cannot be used here: a file is missing or changed, or versions differ."""


class InputSignatureError(DistrifxError, ValueError):
    """A loaded program was called with inputs it was not exported for."""


class CollectiveTimeoutError(DistrifxError, TimeoutError):
    """A collective did not complete in time: a peer rank is dead, hung or out of step."""


def module_path(node: Node) -> str:
    """The dotted path of the innermost ``nn.Module`` that produced ``node`` ("<root>" if none)."""
    stack: dict[str, Any] | None = node.meta.get("nn_module_stack")
    if not stack:
        return "<root>"
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    return f"{path or '<root>'} ({cls_name.rsplit('.', 1)[-1]})"


def where(node: Node) -> str:
    """``"node 'conv2d_3' (aten.conv2d.default) in module down_blocks.0.resnets.0.conv1 (Conv2d)"``."""
    return f"node {node.name!r} ({node.target}) in module {module_path(node)}"
