"""`distrifx profile`'s arithmetic: op keys, the comparison against the 1/N share, the table and findings."""

from __future__ import annotations

import pytest

from distrifx.bench import BenchCase
from distrifx.breakdown import breakdown_findings, breakdown_table, compare, excess_by_width, op_key, profile_case
from distrifx.errors import ConfigError


def test_op_key_names_a_convolutions_level_by_its_input_width_only():
    conv = op_key("aten::mkldnn_convolution", [[1, 4, 9, 16], [4, 4, 3, 3], [4]])
    assert conv == "aten::mkldnn_convolution @ width 16"
    # 4-D but not an image: attention's (B, heads, tokens, head_dim)
    assert op_key("aten::_scaled_dot_product_flash_attention_for_cpu", [[1, 2, 64, 20]] * 3) == \
        "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert op_key("aten::addmm", [[4], [8, 4], [4, 4]]) == "aten::addmm"
    assert op_key("aten::convolution", []) == "aten::convolution"


def _result(world_size: int = 2) -> dict:
    eager = {"conv @ width 16": 4.0, "conv @ width 8": 2.0, "addmm": 2.0}
    rank = {"conv @ width 16": 2.25, "conv @ width 8": 1.5, "addmm": 0.75, "cat": 0.5}
    return {"case": {"world_size": world_size}, "eager_s": sum(eager.values()), "rank_s": sum(rank.values()),
            "eager_ops": 400, "rank_ops": 1000, "rows": compare(eager, rank, world_size)}


def test_compare_sets_each_op_against_its_share_largest_excess_first():
    rows = _result()["rows"]
    assert [r["op"] for r in rows] == ["cat", "conv @ width 8", "conv @ width 16", "addmm"]  # ties by name
    by_op = {r["op"]: r for r in rows}
    assert by_op["conv @ width 8"]["ideal_s"] == 1.0 and by_op["conv @ width 8"]["excess_s"] == 0.5
    assert by_op["cat"] == {"op": "cat", "eager_s": 0.0, "ideal_s": 0.0, "rank_s": 0.5, "excess_s": 0.5}
    assert by_op["addmm"]["excess_s"] == -0.25


def test_excess_by_width_sums_the_convolutions_of_each_level():
    assert excess_by_width(_result()) == {16: (2.25, 2.0), 8: (1.5, 1.0)}


def test_table_shows_the_ops_furthest_from_their_share_and_sums_the_rest():
    table = breakdown_table(_result(), top=2).splitlines()
    assert "unmodified / 2" in table[0]
    assert table[2] == "| cat | 0.0 | 0.0 | 500.0 | +500.0 |"
    assert table[3] == "| conv @ width 8 | 2000.0 | 1000.0 | 1500.0 | +500.0 |"
    assert table[4] == "| 2 other ops | 6000.0 | 3000.0 | 3000.0 | +0.0 |"
    assert table[5] == "| **step** | 8000.0 | 4000.0 | 5000.0 | +1000.0 |"


def test_findings_give_the_bound_the_levels_the_op_counts_and_the_rank_only_ops():
    findings = breakdown_findings(_result())
    assert findings[0].startswith("Under the profiler one rank's step takes 5.000 s against an ideal 4.000 s")
    assert "+25%, a 1.60x bound" in findings[0]
    assert "width 16: 2250 ms against 2000 ms (+12%); width 8: 1500 ms against 1000 ms (+50%)" in findings[1]
    assert findings[2].startswith("One rank dispatches 1000 aten ops per step against the unmodified model's 400 (2.5x;")
    assert "500 ms in 1 op kinds" in findings[3]


@pytest.mark.parametrize("case", [BenchCase(mode="eager", world_size=1), BenchCase(device="cuda", projected=True)])
def test_profile_refuses_what_it_cannot_compare(case):
    with pytest.raises(ConfigError, match="profile a parallel mode"):
        profile_case(case)
