"""Communicators: the collectives the per-rank graphs call, over a process group or simulated.

Every collective is asynchronous: it starts when called and returns a :class:`Work` whose
``wait()`` gives the result. Waits are bounded by the communicator's timeout, so a dead or
diverged peer turns into a :class:`~distrifx.errors.CollectiveTimeoutError`, never a hang. Each
communicator counts bytes sent, collectives started and seconds blocked in ``wait``.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from distrifx.errors import CollectiveTimeoutError, DistrifxError

__all__ = [
    "CommStats",
    "Work",
    "Communicator",
    "ProcessGroupCommunicator",
    "SimulatedWorld",
    "SimulatedGroup",
    "TimingCommunicator",
    "check_same_inputs",
    "from_rank0",
]


@dataclass
class CommStats:
    """Counters since the last :meth:`reset`."""

    bytes_sent: int = 0
    collectives: int = 0
    wait_s: float = 0.0

    def reset(self) -> None:
        self.bytes_sent, self.collectives, self.wait_s = 0, 0, 0.0


class Work:
    """An in-flight collective; ``wait()`` blocks (bounded) and returns its result once."""

    def __init__(self, stats: CommStats, finish: Callable[[], Any]) -> None:
        self._stats = stats
        self._finish = finish

    def wait(self) -> Any:
        start = time.perf_counter()
        try:
            return self._finish()
        finally:
            self._stats.wait_s += time.perf_counter() - start


def _rows(x: torch.Tensor, dim: int, start: int, count: int) -> torch.Tensor:
    return x.narrow(dim, start if start >= 0 else x.shape[dim] + start, count).contiguous()


def _zeros_rows(x: torch.Tensor, dim: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = count
    return x.new_zeros(shape, dtype=dtype)


def _own_group(rank: int, groups: list[list[int]]) -> list[int]:
    """The group of ``groups`` (a partition of the ranks) that ``rank`` is in."""
    mine = [ranks for ranks in groups if rank in ranks]
    if len(mine) != 1:
        raise DistrifxError(
            f"rank {rank} is in {len(mine) or 'none'} of the groups {groups}: split() takes a partition of "
            "the ranks, each rank in exactly one group."
        )
    return mine[0]


class Communicator(ABC):
    """The collectives distrifx graphs use. Subclasses implement the transport."""

    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.stats = CommStats()

    def all_gather(self, x: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> Work:
        """Concatenate every rank's ``x`` along ``dim`` (rank order), sent as ``dtype`` if given."""
        x = x if dtype is None else x.to(dtype)
        self.stats.collectives += 1
        self.stats.bytes_sent += x.numel() * x.element_size() * (self.world_size - 1)
        return Work(self.stats, self._all_gather(x.contiguous(), dim))

    def neighbour_rows(self, x: torch.Tensor, dim: int, before: int, after: int,
                       dtype: torch.dtype | None = None) -> Work:
        """Rows around this rank's patch: ``cat([last `before` rows of rank-1, first `after` rows of rank+1])``,
        sent (and returned) as ``dtype`` if given.

        Missing neighbours (the image border) contribute zeros, which is a conv's zero padding.
        """
        dtype = dtype or x.dtype
        self.stats.collectives += 1
        sends = {}
        if before and self.rank + 1 < self.world_size:
            sends[self.rank + 1] = _rows(x, dim, -before, before).to(dtype)
        if after and self.rank > 0:
            sends[self.rank - 1] = _rows(x, dim, 0, after).to(dtype)
        self._count_sends(sends)
        recv_shapes = {}
        if before and self.rank > 0:
            recv_shapes[self.rank - 1] = _zeros_rows(x, dim, before, dtype)
        if after and self.rank + 1 < self.world_size:
            recv_shapes[self.rank + 1] = _zeros_rows(x, dim, after, dtype)
        finish = self._exchange(sends, recv_shapes)

        def assemble() -> torch.Tensor:
            received = finish()
            prev = received[self.rank - 1] if self.rank - 1 in received else _zeros_rows(x, dim, before, dtype)
            nxt = received[self.rank + 1] if self.rank + 1 in received else _zeros_rows(x, dim, after, dtype)
            return torch.cat([prev, nxt], dim)

        return Work(self.stats, assemble)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> Work:
        """Rank ``src``'s ``x`` on every rank: ``src`` sends it to each peer, which passes its own ``x`` of
        the same shape and dtype (received into a buffer like it)."""
        x = x.contiguous()
        self.stats.collectives += 1
        sends = {r: x for r in range(self.world_size) if r != src} if self.rank == src else {}
        self._count_sends(sends)
        recvs = {} if self.rank == src else {src: torch.zeros_like(x)}
        finish = self._exchange(sends, recvs, "broadcast")
        return Work(self.stats, lambda: finish().get(src, x))

    def _count_sends(self, sends: dict[int, torch.Tensor]) -> None:
        self.stats.bytes_sent += sum(t.numel() * t.element_size() for t in sends.values())

    @abstractmethod
    def split(self, groups: list[list[int]]) -> Communicator:
        """The communicator of the group (of ``groups``, a partition of the ranks) this rank is in.

        Every rank must call it with the same ``groups``.
        """

    @abstractmethod
    def _all_gather(self, x: torch.Tensor, dim: int) -> Callable[[], torch.Tensor]:
        """Start the gather; return the function that waits and returns the result."""

    @abstractmethod
    def _exchange(
        self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], what: str = "halo exchange"
    ) -> Callable[[], dict[int, torch.Tensor]]:
        """Start point-to-point sends and receives (``recvs`` are buffers) of ``what``; return the waiter."""


class ProcessGroupCommunicator(Communicator):
    """Collectives over a ``torch.distributed`` process group (nccl or gloo)."""

    def __init__(self, group: dist.ProcessGroup, timeout_s: float) -> None:
        super().__init__(dist.get_rank(group), dist.get_world_size(group), timeout_s)
        self.group = group
        self._global_ranks = [dist.get_global_rank(group, r) for r in range(self.world_size)]
        self._tag = 0
        # gloo's all_gather takes two to three times the wall time and transport CPU of direct
        # sends of the same bytes, CPU that CPU ranks take from their compute (docs/architecture.md).
        self._gather_by_sends = dist.get_backend(group) == "gloo"

    def split(self, groups: list[list[int]]) -> Communicator:
        # new_group is collective: every rank creates every group, in order
        created = [self._new_group(ranks, groups) for ranks in groups]
        return ProcessGroupCommunicator(created[groups.index(_own_group(self.rank, groups))], self.timeout_s)

    def _new_group(self, ranks: list[int], groups: list[list[int]]) -> dist.ProcessGroup:
        try:
            return dist.new_group([self._global_ranks[r] for r in ranks], timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:
            raise self._failed(f"creating the group {ranks} of split({groups})", str(exc)) from exc

    def _failed(self, what: str, cause: str) -> CollectiveTimeoutError:
        return CollectiveTimeoutError(
            f"rank {self.rank}: {what} failed or timed out after {self.timeout_s:.0f}s: {cause}. "
            "A peer rank probably died or runs a different graph; check its log, or pass a larger timeout_s "
            "if it is only slow."
        )

    def _wait(self, works: list[dist.Work], what: str) -> None:
        for work in works:
            try:
                ok = work.wait(timedelta(seconds=self.timeout_s))
            except RuntimeError as exc:
                raise self._failed(what, str(exc)) from exc
            if ok is False:
                raise self._failed(what, "a peer rank did not join it in time")

    def _all_gather(self, x: torch.Tensor, dim: int) -> Callable[[], torch.Tensor]:
        if self._gather_by_sends:
            peers = [r for r in range(self.world_size) if r != self.rank]
            wait_peers = self._exchange({p: x for p in peers}, {p: torch.empty_like(x) for p in peers}, "all_gather")

            def gathered() -> torch.Tensor:
                parts = wait_peers()
                return torch.cat([x if r == self.rank else parts[r] for r in range(self.world_size)], dim)

            return gathered
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        work = dist.all_gather(parts, x, group=self.group, async_op=True)

        def finish() -> torch.Tensor:
            self._wait([work], "all_gather")
            return torch.cat(parts, dim)

        return finish

    def _exchange(
        self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], what: str = "halo exchange"
    ) -> Callable[[], dict[int, torch.Tensor]]:
        self._tag += 1
        ops = [dist.P2POp(dist.isend, t, self._global_ranks[p], self.group, self._tag) for p, t in sends.items()]
        ops += [dist.P2POp(dist.irecv, t, self._global_ranks[p], self.group, self._tag) for p, t in recvs.items()]
        works = dist.batch_isend_irecv(ops) if ops else []

        def finish() -> dict[int, torch.Tensor]:
            self._wait(works, what)
            return recvs

        return finish


class SimulatedWorld:
    """N ranks in one process (one thread each), exchanging tensors through a shared mailbox.

    Collectives are matched by each rank's call sequence number, exactly as a real backend
    matches them by call order. If any rank fails, :meth:`abort` makes every wait raise.
    ``timeout_s`` is its groups' default; each wait is bounded by its own group's ``timeout_s``.
    """

    def __init__(self, world_size: int, timeout_s: float = 120.0) -> None:
        self.world_size, self.timeout_s = world_size, timeout_s
        self._cond = threading.Condition()
        self._mail: dict[tuple, torch.Tensor] = {}
        self._reads: dict[tuple, int] = {}
        self._error: BaseException | None = None
        self._subworlds: dict[tuple[int, ...], SimulatedWorld] = {}

    def group(self, rank: int) -> SimulatedGroup:
        return SimulatedGroup(self, rank)

    def subworld(self, ranks: tuple[int, ...]) -> SimulatedWorld:
        """The world of the sub-group ``ranks`` (created once, shared by its members)."""
        with self._cond:
            if ranks not in self._subworlds:
                self._subworlds[ranks] = SimulatedWorld(len(ranks), self.timeout_s)
                self._subworlds[ranks]._error = self._error  # a peer that failed before the split
            return self._subworlds[ranks]

    def abort(self, error: BaseException) -> None:
        """Fail every pending and future wait, here and in sub-groups; keep the first error."""
        with self._cond:
            self._error = self._error or error
            self._cond.notify_all()
            subworlds = list(self._subworlds.values())
        for world in subworlds:
            world.abort(error)

    @property
    def first_error(self) -> BaseException | None:
        return self._error

    def post(self, key: tuple, value: torch.Tensor, readers: int) -> None:
        with self._cond:
            self._mail[key] = value
            self._reads[key] = readers
            self._cond.notify_all()

    def take(self, key: tuple, rank: int, timeout_s: float) -> torch.Tensor:
        """Wait up to ``timeout_s`` (the waiting rank's) for ``key``'s tensor and return it."""
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._mail or self._error is not None, timeout_s):
                raise CollectiveTimeoutError(
                    f"simulated rank {rank}: collective {key} timed out after {timeout_s:.0f}s "
                    "(a peer rank is missing or out of step)"
                )
            if self._error is not None and key not in self._mail:
                raise DistrifxError(f"simulated rank {rank}: a peer rank failed: {self._error!r}")
            value = self._mail[key]
            self._reads[key] -= 1
            if not self._reads[key]:
                del self._mail[key], self._reads[key]
            return value


class SimulatedGroup(Communicator):
    """One rank of a :class:`SimulatedWorld`; pass it as ``process_group`` to :func:`distrifx.parallelize`."""

    def __init__(self, world: SimulatedWorld, rank: int) -> None:
        super().__init__(rank, world.world_size, world.timeout_s)
        self.world = world
        self._seq = 0

    def split(self, groups: list[list[int]]) -> Communicator:
        ranks = _own_group(self.rank, groups)
        sub = SimulatedGroup(self.world.subworld(tuple(ranks)), ranks.index(self.rank))
        sub.timeout_s = self.timeout_s
        return sub

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _take(self, key: tuple) -> torch.Tensor:
        return self.world.take(key, self.rank, self.timeout_s)

    def _all_gather(self, x: torch.Tensor, dim: int) -> Callable[[], torch.Tensor]:
        seq = self._next()
        self.world.post((seq, "gather", self.rank), x, readers=self.world_size)
        return lambda: torch.cat([self._take((seq, "gather", r)) for r in range(self.world_size)], dim)

    def _exchange(
        self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], what: str = "halo exchange"
    ) -> Callable[[], dict[int, torch.Tensor]]:
        seq = self._next()
        for peer, t in sends.items():
            self.world.post((seq, "p2p", self.rank, peer), t, readers=1)
        return lambda: {peer: self._take((seq, "p2p", peer, self.rank)) for peer in recvs}


class TimingCommunicator(Communicator):
    """One rank alone, pretending to be rank ``rank`` of ``world_size``: collectives return at once.

    Gathers repeat this rank's block and halos are zeros, so the values are wrong but every shape
    and every op is the real rank's: for timing one rank's compute at a world size the machine
    cannot host. Bytes are counted as if sent.
    """

    def split(self, groups: list[list[int]]) -> Communicator:
        ranks = _own_group(self.rank, groups)
        return TimingCommunicator(ranks.index(self.rank), len(ranks), self.timeout_s)

    def _all_gather(self, x: torch.Tensor, dim: int) -> Callable[[], torch.Tensor]:
        return lambda: torch.cat([x] * self.world_size, dim)

    def _exchange(
        self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], what: str = "halo exchange"
    ) -> Callable[[], dict[int, torch.Tensor]]:
        return lambda: recvs


def check_same_inputs(comm: Communicator, flat: Sequence[Any], names: Callable[[], list[str]]) -> None:
    """Fail loudly if the ranks were called with different tensors (a different seed on one rank).

    Compares the sum and absolute sum of every tensor in ``flat`` across the ranks (one small
    all-gather); NaN equals NaN, so a generation that diverged on every rank runs on as the
    unmodified model would. ``names()`` names every leaf of ``flat`` and is called only to word the error.
    """
    tensors = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
    if comm.world_size == 1 or not tensors:
        return
    device = flat[tensors[0]].device  # a CPU timestep may come with GPU latents, as the unmodified model allows
    mine = torch.stack([torch.stack([flat[i].double().sum(), flat[i].double().abs().sum()]).to(device)
                        for i in tensors])
    everyone = comm.all_gather(mine.unsqueeze(0), 0).wait()
    same = (everyone == everyone[0]) | (everyone.isnan() & everyone[0].isnan())
    differs = (~same).flatten(2).any(-1).any(0)
    if differs.any():
        leaf_names = names()
        bad = [leaf_names[tensors[i]] for i in differs.nonzero().flatten().tolist()]
        raise DistrifxError(
            f"rank {comm.rank}: the ranks were called with different values of {bad}. Every rank must run the "
            "same generation: seed every rank's generator identically (distrifx.parallelize_pipeline shares "
            "rank 0's initial latents)."
        )


def from_rank0(comm: Communicator, tree: Any) -> Any:
    """``tree`` with every tensor replaced by rank 0's (one broadcast each; collective)."""
    return tree_map(lambda x: comm.broadcast(x).wait() if isinstance(x, torch.Tensor) else x, tree)
