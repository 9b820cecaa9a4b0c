"""Small velocity networks of the benchmark problems, all called like the TRELLIS flows: model(x, 1000 t, cond).

* `MixtureVelocityNet`: a residual MLP with adaptive layer norm for low-dimensional data; cond is a class one-hot
  [B, K] (all zeros = the unconditional / CFG-negative condition).
* `ClassTokenFlow`: wraps a TRELLIS flow (`SparseStructureFlowModel` or `SLatFlowModel` from mdt.models) with a
  learned class-embedding table [K, T, Cc]: cond is a one-hot [B, K] and the flow receives tokens = onehot @ table
  [B, T, Cc]. The zero one-hot therefore gives exactly the zero token tensor, TRELLIS's negative condition.
  Optional `skip_channels` (dense flows): v = net(x, t, tokens) + a(t) x with a learned per-channel a(t)
  (zero at initialisation). A patch-p flow reads and writes each token's Cin p^3 values through model_channels
  features, so without a path from x_t to the output the velocity lies in a model_channels-dimensional subspace
  per token and the noise outside it is never removed by the sampler (with p = 4, 64 channels: 448 of 512
  dimensions per token keep their initial noise); a(t) x lets the flow shrink it to the data's scale.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from mdt.models import SLatFlowModel, SparseStructureFlowModel
from mdt.models.blocks import TimestepEmbedder


class _AdaBlock(nn.Module):
    def __init__(self, hidden: int, mlp_ratio: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mod = nn.Linear(hidden, 3 * hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_ratio * hidden), nn.SiLU(), nn.Linear(mlp_ratio * hidden, hidden))
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        shift, scale, gate = self.mod(emb).chunk(3, dim=-1)
        return h + (1 + gate) * self.mlp(self.norm(h) * (1 + scale) + shift)


class MixtureVelocityNet(nn.Module):
    """x [B, D], t [B] (x1000), cond one-hot [B, K] -> velocity [B, D]."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 256, depth: int = 4):
        super().__init__()
        self.t_embedder = TimestepEmbedder(hidden)
        self.c_embedder = nn.Linear(num_classes, hidden, bias=False)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList([_AdaBlock(hidden) for _ in range(depth)])
        self.out_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        emb = self.act(self.t_embedder(t) + self.c_embedder(cond.to(x.dtype)))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(self.out_norm(h))


class ClassTokenFlow(nn.Module):
    """A TRELLIS flow conditioned on class tokens: forward(x, t, onehot [B, K]) = net(x, t, onehot @ table)."""

    def __init__(self, net: nn.Module, num_classes: int, num_tokens: int, cond_channels: int, seed: int = 0,
                 skip_channels: int = 0):
        super().__init__()
        self.net = net
        g = torch.Generator().manual_seed(seed)
        self.class_tokens = nn.Parameter(torch.randn(num_classes, num_tokens, cond_channels, generator=g))
        self.skip = None
        if skip_channels:
            self.skip = nn.Sequential(TimestepEmbedder(32), nn.SiLU(), nn.Linear(32, skip_channels))
            nn.init.zeros_(self.skip[-1].weight)
            nn.init.zeros_(self.skip[-1].bias)

    def tokens(self, cond: Tensor) -> Tensor:
        return torch.einsum("bk,ktc->btc", cond.to(self.class_tokens.dtype), self.class_tokens)

    def forward(self, x, t: Tensor, cond: Tensor):
        v = self.net(x, t, self.tokens(cond))
        if self.skip is None:
            return v
        a = self.skip(t).to(v.dtype)
        return v + a.reshape(*a.shape, *([1] * (x.dim() - 2))) * x


def ss_flow(num_classes: int, model_channels: int = 64, num_blocks: int = 2, num_heads: int = 4,
            patch_size: int = 4, cond_channels: int = 32, num_tokens: int = 4, noise_skip: bool = False,
            seed: int = 0) -> ClassTokenFlow:
    """A tiny dense SS flow (16^3 x 8 latents) with class tokens (noise_skip: the a(t) x path, ClassTokenFlow)."""
    torch.manual_seed(seed)
    net = SparseStructureFlowModel(resolution=16, in_channels=8, out_channels=8, model_channels=model_channels,
                                   cond_channels=cond_channels, num_blocks=num_blocks, num_heads=num_heads,
                                   mlp_ratio=4, patch_size=patch_size, pe_mode="ape", qk_rms_norm=True,
                                   use_fp16=False)
    return ClassTokenFlow(net, num_classes, num_tokens, cond_channels, seed, skip_channels=8 if noise_skip else 0)


def slat_flow(num_classes: int, resolution: int = 32, in_channels: int = 8, model_channels: int = 64,
              num_blocks: int = 1, num_heads: int = 4, io_channels: int = 16, cond_channels: int = 32,
              num_tokens: int = 4, num_io_res_blocks: int = 1, seed: int = 0) -> ClassTokenFlow:
    """A tiny sparse SLat flow (per-voxel features on occupied coordinates) with class tokens.

    With num_io_res_blocks = 1 every voxel's input reaches the output only averaged over its 2^3 patch (the single
    io block downsamples before its skip is taken); 2 (TRELLIS's value) adds a full-resolution block whose skip
    carries each voxel's own noisy features to the output, which the per-voxel velocity needs."""
    torch.manual_seed(seed)
    net = SLatFlowModel(resolution=resolution, in_channels=in_channels, out_channels=in_channels,
                        model_channels=model_channels, cond_channels=cond_channels, num_blocks=num_blocks,
                        num_heads=num_heads, mlp_ratio=4, patch_size=2, num_io_res_blocks=num_io_res_blocks,
                        io_block_channels=[io_channels], pe_mode="ape", qk_rms_norm=True, use_fp16=False)
    return ClassTokenFlow(net, num_classes, num_tokens, cond_channels, seed)
