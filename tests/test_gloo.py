"""Multi-process tests over gloo: every rank's sync output equals the unmodified model."""

from __future__ import annotations

import pytest

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


def test_silent_peer_makes_the_other_rank_fail_within_the_timeout():
    results = distrifx.launch(workers.silent_peer, 2, 3.0, threads_per_rank=1, timeout_s=120, all_ranks=True)
    assert results[1] == "slept"
    assert results[0].startswith("timed out after")
    assert float(results[0].split()[-1].rstrip("s")) < 9


def test_launch_reports_a_dead_rank_and_stops_the_others():
    with pytest.raises(distrifx.DistrifxError, match="distrifx-rank1 died with exit code 3"):
        distrifx.launch(workers.dies, 2, threads_per_rank=1, timeout_s=120)


def test_world_size_must_match_the_process_group():
    message = distrifx.launch(workers.world_size_mismatch, 2, threads_per_rank=1, timeout_s=120)
    assert "world_size=3 but the process group has 2 ranks" in message
