"""Multi-process tests over gloo: every rank's sync output equals the unmodified model."""

from __future__ import annotations

import os

import pytest
import torch

import distrifx
from tests import workers


# Both world sizes over real processes; every model at every world size runs simulated (test_sync.py).
@pytest.mark.parametrize("world_size,name,batch,height,width", [(2, "sd15", 1, 16, 16), (4, "sdxl", 2, 32, 16)])
def test_sync_equals_eager_on_every_gloo_rank(world_size, name, batch, height, width):
    errors = distrifx.launch(workers.sync_vs_eager, world_size, name, batch, height, width,
                             threads_per_rank=1, timeout_s=240, all_ranks=True)
    assert len(errors) == world_size
    assert max(errors) < 1e-5


def test_cfg_parallel_sync_equals_eager_on_every_gloo_rank():
    errors = distrifx.launch(workers.sync_vs_eager, 4, "sdxl", 2, 16, 16, True,
                             threads_per_rank=1, timeout_s=240, all_ranks=True)
    assert max(errors) < 1e-5


def test_communicator_gathers_exchanges_halos_and_broadcasts_between_three_gloo_ranks():
    """Three ranks, so a rank gathers from a peer that is not its neighbour; gathers overlap."""
    results = distrifx.launch(workers.gathers_and_halos, 3, threads_per_rank=1, timeout_s=120, all_ranks=True)
    for rank, (gathered, rows, sent, broadcast, broadcast_sent) in enumerate(results):
        expected = torch.stack([torch.cat([torch.full((2, 3), float(10 * i + r)) for r in range(3)], 1)
                                for i in reversed(range(3))])
        assert gathered == expected.tolist()
        prev = 3.0 + 100 * (rank - 1) if rank > 0 else 0.0  # the last row of the patch above, or zero padding
        nxt = 100.0 * (rank + 1) if rank < 2 else 0.0  # the first row of the patch below
        assert rows == [prev, nxt]
        halo_sent = 4 * ((rank > 0) + (rank < 2))
        assert sent == 3 * 2 * 3 * 4 * 2 + halo_sent  # 3 gathers of 6 floats to 2 peers, plus halo rows
        assert broadcast == [7.0, 7.0]  # rank 0's
        assert broadcast_sent == (2 * 2 * 4 if rank == 0 else 0)  # 2 floats to 2 peers, from rank 0 only


def test_silent_peer_makes_the_other_rank_fail_within_the_timeout():
    results = distrifx.launch(workers.silent_peer, 2, 3.0, threads_per_rank=1, timeout_s=120, all_ranks=True)
    assert results[1] == "slept"
    assert results[0].startswith("timed out after")
    assert float(results[0].split()[-1].rstrip("s")) < 9


def test_launch_reports_a_dead_rank_and_stops_the_others():
    with pytest.raises(distrifx.DistrifxError, match="distrifx-rank1 died with exit code 3"):
        distrifx.launch(workers.dies, 2, threads_per_rank=1, timeout_s=120)


def test_ranks_see_the_environment_of_each_launch(monkeypatch):
    """Ranks are forked by a server started at the first launch: each launch's environment still reaches them."""
    monkeypatch.setenv("DISTRIFX_TEST_VALUE", "first")
    assert distrifx.launch(workers.environment, 2, "DISTRIFX_TEST_VALUE", threads_per_rank=1,
                           all_ranks=True) == [("first", 1)] * 2
    monkeypatch.setenv("DISTRIFX_TEST_VALUE", "second")
    assert distrifx.launch(workers.environment, 2, "DISTRIFX_TEST_VALUE", all_ranks=True)[1][0] == "second"


def test_world_size_must_match_the_process_group():
    message = distrifx.launch(workers.world_size_mismatch, 2, threads_per_rank=1, timeout_s=120)
    assert "world_size=3 but the process group has 2 ranks" in message


def test_a_rank_that_fails_before_its_function_reports_its_traceback():
    """Here a rank without a GPU of its own: setting its device fails before the process group exists."""
    with pytest.raises(distrifx.DistrifxError, match=r"(?s)failed; the other ranks were stopped.*set_device"):
        distrifx.launch(workers.environment, torch.cuda.device_count() + 1, "HOME", backend="nccl", timeout_s=120)


def test_launch_kills_a_rank_that_ignores_sigterm(tmp_path):
    pid_file = tmp_path / "pid"
    with pytest.raises(distrifx.DistrifxError, match="rank 1 broke"):
        distrifx.launch(workers.ignores_sigterm, 2, str(pid_file), threads_per_rank=1, timeout_s=120)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
