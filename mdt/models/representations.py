"""Per-sample outputs of the SLat decoders, as raw tensors plus the activations TRELLIS applies to them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Gaussians:
    """3-D Gaussians of one sample. Raw tensors are stored exactly as the decoder produces them:
    `xyz` [M, 3] in the [0, 1]³ voxel frame (world position = xyz − 0.5), `features_dc` [M, 1, 3] (SH degree 0),
    `scaling` [M, 3], `rotation` [M, 4], `opacity` [M, 1] (all before activation)."""

    xyz: Tensor
    features_dc: Tensor
    scaling: Tensor
    rotation: Tensor
    opacity: Tensor
    scaling_bias: float = 4e-3
    opacity_bias: float = 0.1
    filter_3d: float = 9e-4

    @property
    def world_xyz(self) -> Tensor:
        return self.xyz - 0.5

    @property
    def activated_scaling(self) -> Tensor:
        bias = torch.log(torch.expm1(torch.tensor(self.scaling_bias)))  # softplus⁻¹
        s = F.softplus(self.scaling + bias)
        return torch.sqrt(s ** 2 + self.filter_3d ** 2)

    @property
    def activated_opacity(self) -> Tensor:
        return torch.sigmoid(self.opacity + torch.logit(torch.tensor(self.opacity_bias)))

    @property
    def activated_rotation(self) -> Tensor:
        return F.normalize(self.rotation + self.rotation.new_tensor([1.0, 0.0, 0.0, 0.0]), dim=-1)


@dataclass
class Strivec:
    """Tensor-VM radiance field of one sample: per-voxel rank-R factors at voxel centres in [0, 1]³."""

    position: Tensor     # [N, 3]
    trivec: Tensor       # [N, R, 3, dim] (raw)
    density: Tensor      # [N, R]
    features_dc: Tensor  # [N, R, 1, 3]
