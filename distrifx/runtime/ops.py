"""The functions per-rank graphs call for communication: explicit start and wait nodes.

``*_start`` nodes return a :class:`~distrifx.runtime.comm.Work`; ``wait`` nodes turn it into a
tensor. The scheduling pass moves starts up and waits down; everything between them overlaps with
the communication.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from distrifx.config import STALE_DTYPES
from distrifx.runtime.comm import Communicator, Work

__all__ = ["all_gather_start", "neighbour_rows_start", "wait", "COLLECTIVE_STARTS", "is_start", "is_wait"]


def all_gather_start(comm: Communicator, x: torch.Tensor, dim: int, dtype: str | None = None) -> Work:
    """Start gathering every rank's ``x`` along ``dim`` (sent and returned as ``dtype`` if given)."""
    return comm.all_gather(x, dim, _dtype(dtype))


def neighbour_rows_start(
    comm: Communicator, x: torch.Tensor, dim: int, before: int, after: int, dtype: str | None = None
) -> Work:
    """Start receiving ``before`` rows of the previous patch and ``after`` rows of the next one
    (sent and returned as ``dtype`` if given)."""
    return comm.neighbour_rows(x, dim, before, after, _dtype(dtype))


def _dtype(name: str | None) -> torch.dtype | None:
    # graphs name the dtype (a string) so that stored programs keep it as JSON
    return None if name is None else STALE_DTYPES[name]


def wait(work: Work) -> torch.Tensor:
    """Block (bounded by the communicator's timeout) until ``work`` is done; return its tensor."""
    return work.wait()


COLLECTIVE_STARTS = frozenset({all_gather_start, neighbour_rows_start})


def is_start(node: Node) -> bool:
    return node.op == "call_function" and node.target in COLLECTIVE_STARTS


def is_wait(node: Node) -> bool:
    return node.op == "call_function" and node.target is wait
