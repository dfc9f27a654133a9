"""An independent, slow reference of DistriFusion's stale semantics, for the tests only.

It does not use the compiler: it patches the modules of a copy of a diffusers UNet (convs,
GroupNorms, self-attention processors) and runs N virtual ranks one after another in one
process, each on its row patch. At a stale step, rank r's layer sees its own fresh input and the
*previous step's* values of the other ranks (conv halo rows, keys/values, GroupNorm statistics,
combined with the E[x], E[x^2] correction of the design). Warm-up steps run the full model and
record every rank's slice of each layer. With ``stale_dtype``, the halo rows and keys/values a
rank reads from the previous step are rounded to it (GroupNorm statistics are not). With
``extrapolate``, a rank reads halo rows and keys/values as ``last + extrapolate * (last - older)``
from the last two steps' values (GroupNorm statistics as they are).
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F
from torch import nn


class StaleReference:
    def __init__(self, model: nn.Module, world_size: int, warmup_steps: int,
                 stale_dtype: torch.dtype | None = None, extrapolate: float = 0.0) -> None:
        self.model = copy.deepcopy(model).eval()
        self.n, self.warmup, self.stale_dtype, self.extrapolate = world_size, warmup_steps, stale_dtype, extrapolate
        self.norms: set[str] = set()  # GroupNorm layers: their statistics are never rounded
        self.step = 0
        self.rank: int | None = None  # None: full (synchronous) run
        self.prev: dict[tuple[str, int], object] = {}  # (layer, rank) -> what a stale step reads of it
        self.last: dict[tuple[str, int], object] = {}  # (layer, rank) -> last step's value
        self.fresh: dict[tuple[str, int], object] = {}
        self.latent: torch.Tensor | None = None
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
                module.forward = types.MethodType(self._conv(name), module)
            elif isinstance(module, nn.GroupNorm):
                self.norms.add(name)
                module.forward = types.MethodType(self._group_norm(name), module)
            elif name.endswith("attn1"):
                module.set_processor(_SelfAttention(self, name))

    # -- per-layer behaviour -------------------------------------------------------------
    def _record_full(self, layer: str, full: torch.Tensor, dim: int) -> None:
        for r, part in enumerate(full.chunk(self.n, dim)):
            self.fresh[(layer, r)] = part

    def _conv(self, name: str):
        ref = self

        def forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
            if ref.rank is None:
                ref._record_full(name, x, 2)
                return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
            before, after = p, (k - 1) * d + 1 - p - s
            r, rows = ref.rank, x.shape[2]
            if name == "conv_in":  # reads the replicated latent: fresh rows of the full input
                padded = F.pad(ref.latent, (0, 0, p, p))
                window = padded[:, :, r * rows : (r + 1) * rows + before + after]
            else:
                ref.fresh[(name, r)] = x
                top = ref.prev[(name, r - 1)][:, :, rows - before :] if r > 0 else x.new_zeros(x[:, :, :before].shape)
                bottom = (ref.prev[(name, r + 1)][:, :, : max(after, 0)] if r + 1 < ref.n
                          else x.new_zeros(x[:, :, : max(after, 0)].shape))
                own = x if after >= 0 else x[:, :, : rows + after]
                window = torch.cat([top, own, bottom], 2)
            return F.conv2d(window, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation,
                            conv.groups)

        return forward

    def _group_norm(self, name: str):
        ref = self

        def moments(x: torch.Tensor, groups: int) -> torch.Tensor:
            xg = x.float().reshape(x.shape[0], groups, -1)
            return torch.stack([xg.mean(-1), (xg * xg).mean(-1)], -1)  # E[x], E[x^2]

        def forward(gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
            if ref.rank is None:
                for r, part in enumerate(x.chunk(ref.n, 2)):
                    ref.fresh[(name, r)] = moments(part, gn.num_groups)
                return F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
            own = moments(x, gn.num_groups)
            ref.fresh[(name, ref.rank)] = own
            stale = [ref.prev[(name, r)] for r in range(ref.n)]
            full = sum(stale) / ref.n + (own - stale[ref.rank])  # the design's corrected statistics
            mean, var = full[..., 0], full[..., 1] - full[..., 0] ** 2
            xg = x.float().reshape(x.shape[0], gn.num_groups, -1)
            y = ((xg - mean[..., None]) / torch.sqrt(var[..., None] + gn.eps)).reshape(x.shape).to(x.dtype)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return y * gn.weight.reshape(shape) + gn.bias.reshape(shape)

        return forward

    # -- one call of the model -------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.fresh = {}
        if self.step < self.warmup:
            self.rank = None
            out = self.model(sample, *args, **kwargs).sample
        else:
            self.latent = sample
            outs = []
            for r, patch in enumerate(sample.chunk(self.n, 2)):
                self.rank = r
                outs.append(self.model(patch, *args, **kwargs).sample)
            out = torch.cat(outs, 2)
        last = {key: self._narrow(key[0], value) for key, value in self.fresh.items()}
        self.prev = {key: self._ahead(key[0], value, self.last.get(key, value)) for key, value in last.items()}
        self.last = last
        self.step += 1
        return out

    def _ahead(self, layer: str, value, older):
        if not self.extrapolate or layer in self.norms:
            return value
        if isinstance(value, tuple):
            return tuple(self._ahead(layer, v, o) for v, o in zip(value, older))
        return value + self.extrapolate * (value - older)

    def _narrow(self, layer: str, value):
        if self.stale_dtype is None or layer in self.norms:
            return value
        if isinstance(value, tuple):
            return tuple(self._narrow(layer, v) for v in value)
        return value.to(self.stale_dtype).to(value.dtype)


class _SelfAttention:
    """Keys/values: this rank's fresh tokens, the other ranks' tokens from the previous step."""

    def __init__(self, ref: StaleReference, name: str) -> None:
        self.ref, self.name = ref, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        ref = self.ref
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if ref.rank is None:
            for r, (kp, vp) in enumerate(zip(k.chunk(ref.n, 1), v.chunk(ref.n, 1))):
                ref.fresh[(self.name, r)] = (kp, vp)
        else:
            ref.fresh[(self.name, ref.rank)] = (k, v)
            parts = [(k, v) if r == ref.rank else ref.prev[(self.name, r)] for r in range(ref.n)]
            k = torch.cat([p[0] for p in parts], 1)
            v = torch.cat([p[1] for p in parts], 1)
        b, heads = q.shape[0], attn.heads
        split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        out = out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))
