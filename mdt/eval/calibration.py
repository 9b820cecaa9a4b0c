"""Latent calibration of a 3-D encoder: rescale its output layer so that its latents are about zero-mean and
unit-variance per channel on a set of shapes, as a KL-regularised SS VAE's are (a random encoder's raw latents
have a spread of ~0.1, far from the unit-variance noise a flow model starts from)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def standardize_latents(encoder: nn.Module, occupancy: Tensor) -> tuple[Tensor, Tensor]:
    """Fold per-channel standardisation of `encoder(occupancy)` into its last conv (in place).

    `encoder`: a TRELLIS `SparseStructureEncoder` (its `out_layer[-1]` conv emits [mean; logvar]); `occupancy`
    [N, 1, R, R, R] float. Returns the (mean, std) per latent channel measured before the change."""
    z = encoder(occupancy)
    mu, sd = z.mean((0, 2, 3, 4)), z.std((0, 2, 3, 4)).clamp(min=1e-6)
    conv = encoder.out_layer[-1]
    n = encoder.latent_channels
    conv.weight[:n] /= sd.view(-1, *([1] * (conv.weight.dim() - 1)))
    conv.bias[:n] = (conv.bias[:n] - mu) / sd
    return mu, sd
