"""The sharding rules and passes in isolation: single-process graph tests."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import distrifx
from distrifx.models import random_unet, unet_inputs
from distrifx.passes import Phase, collective_order
from distrifx.passes.kernels import GroupNormInput
from distrifx.passes.manager import DUMP_ENV
from distrifx.passes.rules import register
from distrifx.passes.rules.spatial import conv_halo
from distrifx.passes.rules.views import view_shard_dim
from distrifx.runtime.ops import is_start, is_wait
from tests.conftest import sync_error


def test_conv_halo_rows():
    assert conv_halo(3, 1, 1, 1) == (1, 1)
    assert conv_halo(3, 2, 1, 1) == (1, 0)  # diffusers Downsample2D
    assert conv_halo(2, 2, 0, 1) == (0, 0)  # DiT patch embedding
    assert conv_halo(1, 2, 0, 1) == (0, -1)  # trailing row never read: trimmed
    assert conv_halo(3, 1, 2, 2) == (2, 2)  # dilated


@settings(max_examples=200, deadline=None)
@given(
    outer=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    rows=st.integers(1, 4),
    inner=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    n=st.sampled_from([1, 2, 4]),
    split=st.booleans(),
)
def test_view_shard_dim_keeps_each_ranks_rows(outer, rows, inner, n, split):
    """Whenever a shard survives a reshape, per-rank local reshapes reassemble the global one."""
    in_shape = (*outer, rows * n, *inner)
    dim = len(outer)
    flat_inner = rows * n * torch.Size(inner).numel()
    out_shape = (*outer, flat_inner) if not split else (*outer, rows * n, *inner[::-1])
    if torch.Size(out_shape).numel() != torch.Size(in_shape).numel():
        return
    out_dim = view_shard_dim(in_shape, out_shape, dim, n)
    x = torch.arange(torch.Size(in_shape).numel()).reshape(in_shape)
    if out_dim is None:
        return
    local_out = list(out_shape)
    local_out[out_dim] //= n
    blocks = [b.reshape(local_out) for b in x.chunk(n, dim)]
    assert torch.equal(torch.cat(blocks, out_dim), x.reshape(out_shape))


def test_view_merging_with_batch_is_not_a_contiguous_shard():
    assert view_shard_dim((2, 16, 8), (32, 8), 1, 2) is None


def test_registering_an_op_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register(torch.ops.aten.conv2d.default)(lambda node, ctx: None)


@pytest.fixture(scope="module")
def sd15_plan():
    unet = random_unet("sd15")
    args, kwargs = unet_inputs(unet)
    return unet, distrifx.explain(unet, args, kwargs, world_size=2, mode="stale")


def _modules(unet, kind):
    return [m for m in unet.modules() if isinstance(m, kind)]


def test_which_nodes_become_exchanges(sd15_plan):
    unet, plan = sd15_plan
    sites = plan.sites(Phase.WARMUP)
    by_kind = {k: [s for s in sites if s.kind == k] for k in ("halo", "gn", "kv", "output", "reshard")}
    spatial_convs = [c for c in _modules(unet, nn.Conv2d) if c.kernel_size[0] > 1]
    # every 3x3 conv needs a halo, except conv_in, which slices the replicated latent
    assert len(by_kind["halo"]) == len(spatial_convs) - 1
    assert not any("conv_in" in s.module for s in by_kind["halo"])
    assert len(by_kind["gn"]) == len(_modules(unet, nn.GroupNorm))
    self_attn = [n for n, _ in unet.named_modules() if n.endswith("attn1")]
    assert len(by_kind["kv"]) == 2 * len(self_attn)  # keys and values; attn2 (text) stays local
    assert not any("attn2" in s.module for s in by_kind["kv"])
    assert len(by_kind["output"]) == 1 and not by_kind["reshard"]


def test_collective_counts_per_phase(sd15_plan):
    _, plan = sd15_plan
    starts = {p: sum(map(is_start, plan.graphs[p].graph.nodes)) for p in plan.graphs}
    assert starts[Phase.WARMUP] == starts[Phase.STALE] == len(plan.sites(Phase.WARMUP))
    sig = plan.graphs[Phase.STALE].meta["distrifx.signature"]
    assert len(sig.state_in) == len(sig.state_out) == starts[Phase.STALE] - 1  # all but the output gather
    naive = distrifx.explain(sd15_plan[0], *unet_inputs(sd15_plan[0]), world_size=2, mode="naive")
    assert sum(map(is_start, naive.graphs[Phase.NAIVE].graph.nodes)) == 1  # only the output gather


def test_schedule_only_reorders_and_sinks_stale_waits(sd15_plan):
    _, plan = sd15_plan
    for phase in plan.graphs:
        before, after = plan.unscheduled[phase].graph.nodes, plan.graphs[phase].graph.nodes
        assert sorted(n.name for n in before) == sorted(n.name for n in after)
    nodes = list(plan.graphs[Phase.STALE].graph.nodes)
    output = nodes[-1]
    # carried exchanges and the output gather: their only consumer is the graph output
    late_waits = [n for n in nodes if is_wait(n) and set(n.users) == {output}]
    assert len(late_waits) == len(plan.sites(Phase.STALE))
    first_late = min(nodes.index(w) for w in late_waits)
    compute_after = [n for n in nodes[first_late:] if n.op == "call_function" and not (is_wait(n) or is_start(n))]
    assert not compute_after  # every stale exchange overlaps the whole step
    for gm in plan.graphs.values():  # the module runs the scheduled graph: its code was regenerated after the last pass
        assert gm.code == gm.graph.python_code("self").src


def test_sync_waits_sit_right_before_their_first_consumer(sd15_plan):
    _, plan = sd15_plan
    nodes = list(plan.graphs[Phase.WARMUP].graph.nodes)
    for wait in filter(is_wait, nodes):
        consumers = [u for u in wait.users if u.op != "output"]
        if consumers:
            first = min(nodes.index(u) for u in consumers)
            between = nodes[nodes.index(wait) + 1 : first]
            assert all(is_wait(n) for n in between)


def test_every_rank_issues_collectives_in_the_same_order():
    unet = random_unet("sdxl")
    args, kwargs = unet_inputs(unet)
    orders = {
        collective_order(distrifx.explain(unet, args, kwargs, world_size=4, rank=r, mode="stale").graphs[p])
        for r in range(4)
        for p in (Phase.STALE,)
    }
    assert len(orders) == 1


def test_dump_dir_gets_every_pass_before_and_after(tmp_path, monkeypatch):
    monkeypatch.setenv(DUMP_ENV, str(tmp_path))
    unet = random_unet("sd15")
    distrifx.explain(unet, *unet_inputs(unet), world_size=2, mode="sync")
    names = sorted(p.name for p in tmp_path.iterdir())
    for pass_name in ("simplify", "annotate", "shard", "schedule", "cleanup"):
        assert any(f".{pass_name}.before." in n for n in names)
        assert any(f".{pass_name}.after." in n for n in names)


class _Convs(nn.Module):
    """Conv shapes that exercise every halo case: replicated input, 3x3, stride 2, patchify, 1x1/2."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.patch = nn.Conv2d(8, 8, 2, stride=2)
        self.pick = nn.Conv2d(8, 8, 1, stride=2)
        self.norm = nn.GroupNorm(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.first(x))
        x = self.norm(self.dilated(x))
        x = nn.functional.interpolate(self.pick(self.patch(x)), scale_factor=4.0)
        return x.mean(dim=1, keepdim=True) + x


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_conv_case_is_exact(world_size):
    torch.manual_seed(0)
    assert sync_error(_Convs().eval(), world_size, torch.randn(2, 3, 32, 24)) < 1e-5


def test_kv_source_finder_and_cost_model(sd15_plan):
    from distrifx.capture import capture
    from distrifx.passes.kv_source import find_kv_source, prefer_hidden

    unet, _ = sd15_plan
    graph = capture(unet, *unet_inputs(unet)).graph_module.graph  # annotated by the plan above
    attentions = [n for n in graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    found = {distrifx.errors.module_path(n).split(" ")[0]: find_kv_source(n) for n in attentions}
    assert all(s is not None for path, s in found.items() if path.endswith("attn1"))
    assert all(s is None for path, s in found.items() if path.endswith("attn2"))  # K/V of the text
    source = next(s for s in found.values() if s is not None)
    assert [c[0].target for c in source.chains] == [torch.ops.aten.linear.default] * 2
    assert prefer_hidden(source, 2, flops_per_byte=1e6) and not prefer_hidden(source, 2, flops_per_byte=1.0)


def test_exchanging_hidden_states_halves_attention_traffic():
    unet = random_unet("sd15")
    args, kwargs = unet_inputs(unet)
    sent = {kvx: distrifx.explain(unet, args, kwargs, world_size=2, mode="sync", kv_exchange=kvx).sites("sync")
            for kvx in ("kv", "hidden")}
    kv_bytes = {kvx: sum(s.bytes_sent for s in sites if s.kind == "kv") for kvx, sites in sent.items()}
    assert kv_bytes["hidden"] * 2 == kv_bytes["kv"]


def _spec(x: torch.Tensor, n: int, groups: int) -> GroupNormInput:
    """The kernels' static view of one of ``n`` row patches of ``x``."""
    return GroupNormInput(batch=x.shape[0], channels=x.shape[1], spatial=x[0, 0].numel() // n, ndim=x.dim(),
                          groups=groups, eps=1e-5, dtype=x.dtype)


def _patch_stats(x: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    from distrifx.passes.kernels import group_stats

    return torch.cat([group_stats(part, _spec(x, n, groups)) for part in x.chunk(n, dim=2)])


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("offset", [0.0, 100.0])  # a large mean must not cancel the variance away
def test_group_norm_kernels_equal_group_norm_from_the_patches_stats(affine, offset):
    from distrifx.passes.kernels import combine_group_stats, group_norm_apply

    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 5) + offset
    norm = nn.GroupNorm(4, 8, affine=affine)
    if affine:
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    mean, var = combine_group_stats(_patch_stats(x, 4, 4))
    out = group_norm_apply(x, mean, var, norm.weight, norm.bias, _spec(x, 1, 4))
    # x * scale + shift rounds like |x|; E[x^2] - E[x]^2 at this offset would be off by ~1e-3
    torch.testing.assert_close(out, norm(x), atol=2e-6 * (1 + offset), rtol=1e-5)


def test_corrected_group_stats_is_the_stale_global_plus_this_ranks_change_in_moment_space():
    from distrifx.passes.kernels import corrected_group_stats

    torch.manual_seed(0)
    before, now = torch.randn(1, 8, 8, 5), 1.5 * torch.randn(1, 8, 8, 5) + 0.3
    rank = 1
    stale, fresh = _patch_stats(before, 2, 4), _patch_stats(now, 2, 4)[rank:rank + 1]

    def moments(x: torch.Tensor) -> torch.Tensor:
        groups = x.reshape(1, 4, -1)
        return torch.stack([groups.mean(-1), groups.square().mean(-1)], -1)

    halves = before.chunk(2, dim=2)
    full = (moments(halves[0]) + moments(halves[1])) / 2 + moments(now.chunk(2, dim=2)[rank]) - moments(halves[rank])
    full_var = full[..., 1] - full[..., 0] ** 2
    mean, var = corrected_group_stats(stale, fresh, rank)
    torch.testing.assert_close(mean, full[..., 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var, torch.where(full_var < 0, fresh[0, ..., 1], full_var), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("offset,std", [(30.0, 0.1), (100.0, 0.01)])
def test_corrected_group_stats_keep_the_variance_of_activations_with_a_large_mean(offset, std):
    """Nothing stale (the last step's stats are this step's): the correction is the exact global statistics,
    however large the mean is against the spread (moments about zero lost the variance: 28x off at 100 / 0.01)."""
    from distrifx.passes.kernels import combine_group_stats, corrected_group_stats

    torch.manual_seed(0)
    x = std * torch.randn(1, 8, 8, 5) + offset
    stats = _patch_stats(x, 2, 4)
    mean, var = corrected_group_stats(stats, stats[1:], 1)
    exact_mean, exact_var = combine_group_stats(stats)
    torch.testing.assert_close(mean, exact_mean)
    torch.testing.assert_close(var, exact_var, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_group_norm_is_as_close_to_float32_as_torchs(dtype):
    from distrifx.passes.kernels import combine_group_stats, group_norm_apply

    torch.manual_seed(0)
    x = (torch.randn(1, 8, 8, 5) + 16).to(dtype)  # offset: x * scale and the shift nearly cancel
    norm = nn.GroupNorm(4, 8)
    expected = norm(x.float())
    mean, var = combine_group_stats(_patch_stats(x, 2, 4))
    ours = group_norm_apply(x, mean, var, norm.weight.to(dtype), norm.bias.to(dtype), _spec(x, 1, 4))
    torchs = norm.to(dtype)(x)
    assert ours.dtype == dtype
    assert (ours.float() - expected).abs().max() <= 1.5 * (torchs.float() - expected).abs().max()
