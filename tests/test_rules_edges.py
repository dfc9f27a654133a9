"""Edge cases of the sharding rules: exact in sync mode, or refused at planning time naming the op and the fix."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distrifx
from distrifx.passes.rules.spatial import conv_args
from tests.conftest import sync_error


class _Fn(nn.Module):
    """A 3x3 conv (its output row-sharded), then ``fn(self, conv output)``; ``mods`` are its submodules."""

    def __init__(self, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], **mods: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fn = fn
        self.mods = nn.ModuleDict(mods)
        self.register_buffer("text", torch.randn(1, 2, 5, 4))  # replicated (batch, heads, tokens, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, self.conv(x))


def _tokens(h: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C): the row shard becomes a token shard."""
    return h.flatten(2).transpose(1, 2)


def _plan_error(model: nn.Module, error: type[Exception], x: torch.Tensor, world_size: int = 2) -> str:
    """The message of the ``error`` that planning ``model`` over ``world_size`` ranks raises."""
    with pytest.raises(error) as info:
        distrifx.explain(model, (x,), world_size=world_size, mode="sync")
    return str(info.value)


def _assert_mentions(text: str, *fragments: str) -> None:
    missing = [f for f in fragments if f not in text]
    assert not missing, f"{missing} not in: {text}"


def test_conv_args_fill_the_schema_defaults():
    assert conv_args(("x", "w")) == ("x", "w", None, [1, 1], [0, 0], [1, 1], 1)
    assert conv_args(("x", "w", "b", [2], (1, 0)), padding="valid")[3:5] == ([2, 2], [1, 0])
    assert conv_args(("x", "w", "b"), padding="valid")[4] == "valid"  # export drops the default "valid"


def test_nearest_upsampling_by_a_non_integer_scale_factor_is_refused():
    model = _Fn(lambda s, h: F.interpolate(h, scale_factor=(3.1, 1.0)))
    text = _plan_error(model, distrifx.ShardingError, torch.randn(1, 3, 4, 4))
    _assert_mentions(text, "aten.upsample_nearest2d.vec", "scale factor 3.1 maps 4 rows to 12",
                     "floor(i / 3.1)", "Use an integer scale factor", "size=(12, ...)")


def test_nearest_upsampling_by_an_integer_scale_factor_tuple_is_exact():
    model = _Fn(lambda s, h: F.interpolate(h, scale_factor=(3.0, 1.0)))
    assert sync_error(model.eval(), 2, torch.randn(1, 3, 4, 4)) < 1e-6


def test_a_halo_wider_than_a_patch_is_refused_naming_the_heights_and_world_sizes_that_fit():
    model = _Fn(lambda s, h: s.mods["wide"](h), wide=nn.Conv2d(4, 4, 3, padding=4, dilation=4)).eval()
    text = _plan_error(model, distrifx.ShapeError, torch.randn(1, 3, 8, 8), world_size=4)
    _assert_mentions(text, "node 'conv2d_1' (aten.conv2d.default) in module mods.wide (Conv2d)",
                     "4 rows before and 4 rows after", "only 2 of its 8 input rows", "at least 16 input rows",
                     "at least 2x taller", "at most 2 ranks", "must be multiples of 4")
    assert sync_error(model, 2, torch.randn(1, 3, 8, 8)) < 1e-5  # the fixes it names work
    assert sync_error(model, 4, torch.randn(1, 3, 16, 8)) < 1e-5


def test_causal_attention_on_replicated_inputs_runs_as_is():
    model = _Fn(lambda s, h: h + F.scaled_dot_product_attention(s.text, s.text, s.text, is_causal=True).mean())
    assert sync_error(model.eval(), 2, torch.randn(1, 3, 8, 8)) < 1e-5


def test_causal_attention_as_an_explicit_mask_over_sharded_tokens_is_exact():
    """What the refusal of is_causal on sharded queries suggests."""
    causal = lambda t: F.scaled_dot_product_attention(  # noqa: E731
        t, t, t, attn_mask=torch.ones(t.shape[1], t.shape[1], dtype=torch.bool).tril())
    assert sync_error(_Fn(lambda s, h: causal(_tokens(h))).eval(), 2, torch.randn(1, 3, 8, 8)) < 1e-5


@pytest.mark.parametrize("fn", [
    lambda s, h: h + h.sum(dim=[]),
    lambda s, h: h.sum(dim=[]),
    lambda s, h: h - h.mean(dim=[]),
    lambda s, h: h - h.mean() + h.sum(),
], ids=["sum", "sum-output", "mean", "no-dim"])
def test_reducing_over_every_dim_is_exact(fn):
    assert sync_error(_Fn(fn).eval(), 2, torch.randn(1, 3, 8, 8)) < 1e-5


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(4, 4, 3, padding="same"),
    lambda: nn.Conv2d(4, 4, 3, padding="same", dilation=2),
    lambda: nn.Conv2d(4, 4, (5, 3), padding="same"),
    lambda: nn.Conv2d(4, 4, 1, padding="valid"),
    lambda: nn.Conv2d(4, 4, 2, stride=2, padding="valid"),
], ids=["same", "same-dilated", "same-5x3", "valid-1x1", "valid-patchify"])
@pytest.mark.parametrize("first_padding", [1, "same"])  # "same": the replicated latent's window too
@pytest.mark.parametrize("world_size", [2, 4])
def test_string_padding_convs_are_sharded_and_exact(conv, first_padding, world_size):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=first_padding), conv()).eval()
    x = torch.randn(1, 3, 16, 8)
    sites = distrifx.explain(model, (x,), world_size=world_size, mode="sync").sites("sync")
    assert [s.kind for s in sites if s.kind == "output"] == ["output"]  # row patches to the end, not replicated
    assert sync_error(model, world_size, x) < 1e-5


def test_the_heights_hint_counts_a_string_padding_conv_that_downsamples():
    model = _Fn(lambda s, h: s.mods["down"](h), down=nn.Conv2d(4, 4, 2, stride=2, padding="valid")).eval()
    text = _plan_error(model, distrifx.ShapeError, torch.randn(1, 3, 6, 8))  # 3 rows after the downsampling
    _assert_mentions(text, "must be multiples of 4")


def test_same_padding_of_an_even_kernel_is_refused():
    model = _Fn(lambda s, h: s.mods["even"](h), even=nn.Conv2d(4, 4, 2, padding="same")).eval()
    text = _plan_error(model, distrifx.ShardingError, torch.randn(1, 3, 8, 8))
    _assert_mentions(text, "(aten.conv2d.padding) in module mods.even (Conv2d)", "padding='same' with kernel [2, 2]",
                     "symmetric padding only", "Use an odd kernel", "F.pad")


def _with_rows(h: torch.Tensor) -> torch.Tensor:
    """``h`` with two replicated rows appended: the shard then has a tail, and is not plain row blocks."""
    return torch.cat([h, torch.zeros(1, 4, 2, 8)], dim=2)


@pytest.mark.parametrize("fn,fragments", [
    (lambda s, h: s.mods["conv"](_with_rows(h)),
     ["aten.conv2d.default", "sharded as S(2,tail=2)", "Feed the conv the (B, C, H, W) activation itself"]),
    (lambda s, h: F.group_norm(_with_rows(h), 2),
     ["aten.group_norm.default", "sharded as S(2,tail=2)", "Normalize the (B, C, H, W)"]),
    (lambda s, h: F.interpolate(_with_rows(h), scale_factor=2.0),
     ["aten.upsample_nearest2d.vec", "expected S(2)", "Upsample the (B, C, H, W) activation itself"]),
    (lambda s, h: F.scaled_dot_product_attention(*[h.transpose(2, 3)] * 3),
     ["aten.scaled_dot_product_attention", "query is sharded on dim 3", "transpose heads and tokens"]),
    (lambda s, h: F.scaled_dot_product_attention(_tokens(h), _tokens(h), torch.ones(1, 64, 4)),
     ["aten.scaled_dot_product_attention", "both sharded or both replicated", "Compute both from the same tokens"]),
    (lambda s, h: F.scaled_dot_product_attention(*[_tokens(h)] * 3, is_causal=True),
     ["aten.scaled_dot_product_attention", "causal attention", "Pass the causal mask as attn_mask"]),
    (lambda s, h: F.scaled_dot_product_attention(*[_tokens(h)] * 3, attn_mask=_tokens(h).sum(-1, keepdim=True)),
     ["aten.scaled_dot_product_attention", "sharded attention mask", "Build the mask from replicated values"]),
], ids=["conv", "group_norm", "upsample", "sdpa-dim", "sdpa-kv", "sdpa-causal", "sdpa-mask"])
def test_a_placement_a_rule_refuses_names_the_op_and_the_fix(fn, fragments):
    model = _Fn(fn, conv=nn.Conv2d(4, 4, 3, padding=1)).eval()
    _assert_mentions(_plan_error(model, distrifx.ShardingError, torch.randn(1, 3, 8, 8)), *fragments)
