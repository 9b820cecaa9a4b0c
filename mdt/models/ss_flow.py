"""Stage-1 denoiser: a DiT over the dense 16³×8 sparse-structure latent."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import TrellisModule
from .blocks import (ModulatedTransformerCrossBlock, TimestepEmbedder, absolute_position_embedding,
                     init_transformer_weights)


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, C, X, Y, Z] -> [B, C·p³, X/p, Y/p, Z/p]; channel index c·p³ + a·p² + b·p + d."""
    if p == 1:
        return x
    b, c, X, Y, Z = x.shape
    x = x.reshape(b, c, X // p, p, Y // p, p, Z // p, p).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * p ** 3, X // p, Y // p, Z // p)


def unpatchify(x: Tensor, p: int) -> Tensor:
    if p == 1:
        return x
    b, cp, X, Y, Z = x.shape
    c = cp // p ** 3
    x = x.reshape(b, c, p, p, p, X, Y, Z).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, X * p, Y * p, Z * p)


class SparseStructureFlowModel(TrellisModule):
    """x [B, Cin, R, R, R], t [B] (×1000), cond [B, T, Cc] -> velocity [B, Cout, R, R, R]."""

    TORSO = ("blocks",)

    def __init__(self, resolution: int, in_channels: int, model_channels: int, cond_channels: int,
                 out_channels: int, num_blocks: int, num_heads: int | None = None, num_head_channels: int = 64,
                 mlp_ratio: float = 4, patch_size: int = 2, pe_mode: str = "ape", use_fp16: bool = False,
                 use_checkpoint: bool = False, share_mod: bool = False, qk_rms_norm: bool = False,
                 qk_rms_norm_cross: bool = False):
        super().__init__()
        if pe_mode != "ape":
            raise ValueError(f"pe_mode {pe_mode!r} is not supported (the released models use 'ape')")
        self.resolution, self.in_channels, self.out_channels = resolution, in_channels, out_channels
        self.model_channels, self.patch_size, self.use_fp16 = model_channels, patch_size, use_fp16
        self.use_checkpoint, self.share_mod = use_checkpoint, share_mod
        num_heads = num_heads or model_channels // num_head_channels
        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        n = resolution // patch_size
        grid = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
        self.register_buffer("pos_emb", absolute_position_embedding(grid, model_channels))
        self.input_layer = nn.Linear(in_channels * patch_size ** 3, model_channels)
        self.blocks = nn.ModuleList([
            ModulatedTransformerCrossBlock(model_channels, cond_channels, num_heads, mlp_ratio, share_mod,
                                           qk_rms_norm, qk_rms_norm_cross)
            for _ in range(num_blocks)])
        self.out_layer = nn.Linear(model_channels, out_channels * patch_size ** 3)
        self.initialize_weights()
        if use_fp16:
            self.convert_to_fp16()

    def initialize_weights(self) -> None:
        init_transformer_weights(self)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            if not self.share_mod:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if self.share_mod:
            nn.init.zeros_(self.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        b, p = x.shape[0], self.patch_size
        h = patchify(x, p)
        grid = h.shape[2:]
        h = h.reshape(b, h.shape[1], -1).transpose(1, 2)                 # [B, L, Cin·p³]
        h = self.input_layer(h) + self.pos_emb[None].to(h.dtype)         # [B, L, C], fp32
        t_emb = self.t_embedder(t)
        if self.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        dtype = self.dtype
        h, t_emb, cond = h.to(dtype), t_emb.to(dtype), cond.to(dtype)
        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, t_emb, cond, use_reentrant=False)
            else:
                h = block(h, t_emb, cond)
        h = h.to(x.dtype)
        h = F.layer_norm(h, h.shape[-1:])
        h = self.out_layer(h)                                            # [B, L, Cout·p³]
        h = h.transpose(1, 2).reshape(b, -1, *grid)
        return unpatchify(h, p)
