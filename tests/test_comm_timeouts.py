"""Every wait is bounded by its own communicator's timeout, and a peer that failed releases the others at once."""

from __future__ import annotations

import time

import pytest
import torch

import distrifx
from distrifx.runtime.comm import SimulatedWorld
from tests import workers


@pytest.mark.parametrize("split", [False, True], ids=["group", "its-split"])
def test_a_simulated_wait_is_bounded_by_its_communicators_timeout(split):
    group = SimulatedWorld(3, timeout_s=10).group(0)
    group.timeout_s = 1.0  # what distrifx.parallelize(..., timeout_s=1, process_group=group) does
    comm = group.split([[0, 1], [2]]) if split else group
    start = time.monotonic()
    with pytest.raises(distrifx.CollectiveTimeoutError, match="timed out after 1s"):
        comm.all_gather(torch.ones(2), 0).wait()
    assert time.monotonic() - start < 5


def test_a_split_after_a_peer_failed_fails_at_once():
    world = SimulatedWorld(2, timeout_s=10)
    world.abort(ValueError("rank 1 broke"))
    sub = world.group(0).split([[0, 1]])
    start = time.monotonic()
    with pytest.raises(distrifx.DistrifxError, match=r"a peer rank failed: ValueError\('rank 1 broke'\)"):
        sub.all_gather(torch.ones(2), 0).wait()
    assert time.monotonic() - start < 5


def test_a_gloo_split_that_a_peer_reaches_late_fails_within_the_timeout():
    results = distrifx.launch(workers.late_split, 2, 2.0, 4.0, threads_per_rank=1, timeout_s=60, all_ranks=True)
    assert "rank 0: creating the group [0, 1] of split([[0, 1]]) failed or timed out after 2s" in results[0]
    assert float(results[0].split("s: ")[0]) < 4.0  # before the peer arrives: bounded by the timeout, not the peer
