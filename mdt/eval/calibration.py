"""Latent calibration of a 3-D encoder: rescale its output layer so that its latents are about zero-mean and
unit-variance per channel on a set of shapes, as a KL-regularised SS VAE's are (a random encoder's raw latents
have a spread of ~0.1, far from the unit-variance noise a flow model starts from)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mdt.models.ss_vae import DownsampleBlock3d, ResBlock3d


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


@torch.no_grad()
def set_occupancy_fraction_weights(encoder: nn.Module, blur_channels: int | None = None, seed: int = 0) -> None:
    """Give a TRELLIS `SparseStructureEncoder` weights that make its latent a fixed smooth function of the
    occupied fraction p of each latent cell (the 4³ voxels a 16³ cell covers at 64³), in place.

    What the layers do: the input conv copies the occupancy, every residual block is the identity (its second
    conv is zero), the strided convs average 2³ blocks (p at 32³, then at 16³; the last one spreads p over the
    channels as a_c·p + b_c with zero-mean, orthogonal a and b so that the channel layer norm keeps p:
    (a_c p + b_c) / sqrt(1 + p²)), and the output conv mixes the SiLU of those channels into the latent
    channels with fixed random weights — from the cell alone for the first half of the channels and from its
    3³ neighbourhood (a box blur) for the other half (`blur_channels`). The latent is then a deterministic,
    spatially smooth function of the shape, as a trained SS VAE's latent is (and a random encoder's is not),
    which a small flow model learns in a few hundred steps. Follow with `standardize_latents`."""
    g = torch.Generator().manual_seed(seed)
    for p in encoder.parameters():
        p.zero_()
    w = encoder.input_layer.weight                       # [C0, 1, 3, 3, 3]
    w[:, 0, 1, 1, 1] = 1.0
    downs = [b for b in encoder.blocks if isinstance(b, DownsampleBlock3d)]
    for b in list(encoder.blocks) + list(encoder.middle_block):
        if isinstance(b, ResBlock3d):
            b.norm1.weight.fill_(1.0)
            b.norm2.weight.fill_(1.0)                    # conv1/conv2 stay zero: the block is the identity
            if not isinstance(b.skip_connection, nn.Identity):
                b.skip_connection.weight[:, :, 0, 0, 0] = torch.eye(*b.skip_connection.weight.shape[:2])
    for i, d in enumerate(downs):
        cout = d.conv.weight.shape[0]
        if i < len(downs) - 1:
            d.conv.weight[:, 0] = 1.0 / 8                 # every output channel: the 2³ mean of channel 0
        else:
            a = torch.randn(cout, generator=g)
            b = torch.randn(cout, generator=g)
            a, b = a - a.mean(), b - b.mean()
            b = b - (b @ a) / (a @ a) * a                 # orthogonal to a
            a, b = a / a.std(), b / b.std()
            d.conv.weight[:, 0] = a.view(-1, 1, 1, 1) / 8
            d.conv.bias.copy_(b)
    ln, _, conv = encoder.out_layer
    ln.weight.fill_(1.0)
    n = encoder.latent_channels
    cin = conv.weight.shape[1]
    mix = torch.randn(n, cin, generator=g) / cin ** 0.5
    blur = n // 2 if blur_channels is None else blur_channels
    conv.weight[:n - blur, :, 1, 1, 1] = mix[:n - blur]
    conv.weight[n - blur:n] = mix[n - blur:, :, None, None, None] / 27.0
