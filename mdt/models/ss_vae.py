"""Sparse-structure VAE: dense 3-D convolutions between 64³ occupancy and the 16³×8 latent."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import TrellisModule
from .blocks import zero_module


class ChannelLayerNorm32(nn.LayerNorm):
    """LayerNorm over the channel axis of [B, C, X, Y, Z], in float32."""

    def forward(self, x: Tensor) -> Tensor:
        h = x.permute(0, 2, 3, 4, 1).float()
        h = F.layer_norm(h, self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return h.permute(0, 4, 1, 2, 3).to(x.dtype)


class ResBlock3d(nn.Module):
    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = ChannelLayerNorm32(channels, elementwise_affine=True, eps=1e-5)
        self.norm2 = ChannelLayerNorm32(out_channels, elementwise_affine=True, eps=1e-5)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.conv2 = zero_module(nn.Conv3d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Conv3d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class DownsampleBlock3d(nn.Module):
    """Strided 2×2×2 convolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def pixel_shuffle_3d(x: Tensor, factor: int) -> Tensor:
    """[B, C·f³, X, Y, Z] -> [B, C, fX, fY, fZ]; channel c·f³ + a·f² + b·f + d goes to offset (a, b, d)."""
    b, c, X, Y, Z = x.shape
    oc = c // factor ** 3
    x = x.reshape(b, oc, factor, factor, factor, X, Y, Z).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, oc, X * factor, Y * factor, Z * factor)


class UpsampleBlock3d(nn.Module):
    """3×3×3 convolution to 8× the channels, then a 3-D pixel shuffle."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


def _check_norm_type(norm_type: str) -> None:
    if norm_type != "layer":
        raise ValueError(f"norm_type {norm_type!r} is not supported (the released models use 'layer')")


class SparseStructureEncoder(TrellisModule):
    """Occupancy [B, Cin, 64, 64, 64] -> latent [B, L, 16, 16, 16] (posterior mean unless sample_posterior)."""

    TORSO = ("blocks", "middle_block")

    def __init__(self, in_channels: int, latent_channels: int, num_res_blocks: int, channels: list[int],
                 num_res_blocks_middle: int = 2, norm_type: str = "layer", use_fp16: bool = False):
        super().__init__()
        _check_norm_type(norm_type)
        self.in_channels, self.latent_channels, self.use_fp16 = in_channels, latent_channels, use_fp16
        self.input_layer = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.blocks.extend(ResBlock3d(ch, ch) for _ in range(num_res_blocks))
            if i < len(channels) - 1:
                self.blocks.append(DownsampleBlock3d(ch, channels[i + 1]))
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[-1]) for _ in range(num_res_blocks_middle)])
        self.out_layer = nn.Sequential(ChannelLayerNorm32(channels[-1], eps=1e-5), nn.SiLU(),
                                       nn.Conv3d(channels[-1], latent_channels * 2, 3, padding=1))
        if use_fp16:
            self.convert_to_fp16()

    def forward(self, x: Tensor, sample_posterior: bool = False, return_raw: bool = False,
                generator: torch.Generator | None = None):
        h = self.input_layer(x).to(self.dtype)
        for block in self.blocks:
            h = block(h)
        h = self.middle_block(h).to(x.dtype)
        mean, logvar = self.out_layer(h).chunk(2, dim=1)
        z = mean
        if sample_posterior:
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=mean.device,
                                                             dtype=mean.dtype)
        return (z, mean, logvar) if return_raw else z


class SparseStructureDecoder(TrellisModule):
    """Latent [B, L, 16, 16, 16] -> occupancy logits [B, Cout, 64, 64, 64]."""

    TORSO = ("blocks", "middle_block")

    def __init__(self, out_channels: int, latent_channels: int, num_res_blocks: int, channels: list[int],
                 num_res_blocks_middle: int = 2, norm_type: str = "layer", use_fp16: bool = False):
        super().__init__()
        _check_norm_type(norm_type)
        self.out_channels, self.latent_channels, self.use_fp16 = out_channels, latent_channels, use_fp16
        self.input_layer = nn.Conv3d(latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[0]) for _ in range(num_res_blocks_middle)])
        self.blocks = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.blocks.extend(ResBlock3d(ch, ch) for _ in range(num_res_blocks))
            if i < len(channels) - 1:
                self.blocks.append(UpsampleBlock3d(ch, channels[i + 1]))
        self.out_layer = nn.Sequential(ChannelLayerNorm32(channels[-1], eps=1e-5), nn.SiLU(),
                                       nn.Conv3d(channels[-1], out_channels, 3, padding=1))
        if use_fp16:
            self.convert_to_fp16()

    def forward(self, x: Tensor) -> Tensor:
        h = self.input_layer(x).to(self.dtype)
        h = self.middle_block(h)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h.to(x.dtype))
