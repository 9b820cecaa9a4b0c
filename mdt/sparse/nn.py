"""Feature-wise layers for sparse tensors (applied to `.feats`), and per-sample group norm."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tensor import SparseTensor


class SparseLinear(nn.Linear):
    """nn.Linear on the features; accepts dense tensors too, so shared blocks can use one class."""

    def forward(self, x):
        if isinstance(x, SparseTensor):
            return x.replace(super().forward(x.feats))
        return super().forward(x)


class SparseSiLU(nn.SiLU):
    def forward(self, x):
        return x.replace(F.silu(x.feats)) if isinstance(x, SparseTensor) else F.silu(x)


class SparseGELU(nn.GELU):
    def forward(self, x):
        return x.replace(super().forward(x.feats)) if isinstance(x, SparseTensor) else super().forward(x)


def group_norm_per_sample(x: SparseTensor, num_groups: int, weight, bias, eps: float) -> torch.Tensor:
    """GroupNorm whose statistics run over each sample's voxels and the group's channels (computed in fp32)."""
    feats = x.feats.float()
    n, c = feats.shape
    g = feats.view(n, num_groups, c // num_groups)
    counts = (x.counts.to(feats.dtype) * (c // num_groups)).clamp(min=1).unsqueeze(1)  # [B, 1]
    zeros = feats.new_zeros((x.batch_size, num_groups))
    mean = zeros.index_add(0, x.batch_idx, g.sum(-1)) / counts                        # [B, G]
    centred = g - mean[x.batch_idx].unsqueeze(-1)
    var = zeros.index_add(0, x.batch_idx, centred.pow(2).sum(-1)) / counts
    out = centred * torch.rsqrt(var[x.batch_idx] + eps).unsqueeze(-1)
    out = out.view(n, c)
    if weight is not None:
        out = out * weight.float() + bias.float()
    return out.to(x.feats.dtype)


class SparseGroupNorm32(nn.GroupNorm):
    """GroupNorm with per-sample statistics, computed in float32 and cast back."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(group_norm_per_sample(x, self.num_groups, self.weight, self.bias, self.eps))
