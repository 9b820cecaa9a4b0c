"""Stage-2 denoiser: a sparse DiT on the structured latent, with U-Net-style sparse-conv input/output blocks."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mdt.sparse import SparseConv3d, SparseTensor, downsample2, upsample2
from mdt.sparse.nn import SparseLinear

from .base import TrellisModule
from .blocks import (LayerNorm32, ModulatedTransformerCrossBlock, TimestepEmbedder, absolute_position_embedding,
                     init_transformer_weights, zero_module)


class SparseResBlock3d(nn.Module):
    """Residual block with timestep modulation (scale first, then shift) and optional ×2 down/upsampling,
    applied to the input before anything else."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None,
                 downsample: bool = False, upsample: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        if downsample and upsample:
            raise ValueError("a block either downsamples or upsamples")
        self.downsample, self.upsample = downsample, upsample
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = SparseConv3d(channels, out_channels, 3)
        self.conv2 = zero_module(SparseConv3d(out_channels, out_channels, 3))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels, bias=True))
        self.skip_connection = SparseLinear(channels, out_channels) if channels != out_channels else nn.Identity()

    def forward(self, x: SparseTensor, emb: torch.Tensor) -> SparseTensor:
        emb_out = self.emb_layers(emb).to(x.dtype)
        scale, shift = emb_out.chunk(2, dim=1)
        if self.downsample:
            x = downsample2(x)
        elif self.upsample:
            x = upsample2(x)
        h = self.norm1(x)
        h = self.conv1(h.replace(F.silu(h.feats)))
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(h.replace(F.silu(h.feats)))
        return h + self.skip_connection(x)


class SLatFlowModel(TrellisModule):
    """SparseTensor x (feats [N, Cin] at 64³ coords), t [B] (×1000), cond [B, T, Cc] -> velocity on x's coords."""

    TORSO = ("input_blocks", "blocks", "out_blocks")

    def __init__(self, resolution: int, in_channels: int, model_channels: int, cond_channels: int,
                 out_channels: int, num_blocks: int, num_heads: int | None = None, num_head_channels: int = 64,
                 mlp_ratio: float = 4, patch_size: int = 2, num_io_res_blocks: int = 2,
                 io_block_channels: list[int] | None = None, pe_mode: str = "ape", use_fp16: bool = False,
                 use_checkpoint: bool = False, use_skip_connection: bool = True, share_mod: bool = False,
                 qk_rms_norm: bool = False, qk_rms_norm_cross: bool = False):
        super().__init__()
        if pe_mode != "ape":
            raise ValueError(f"pe_mode {pe_mode!r} is not supported (the released models use 'ape')")
        io_block_channels = list(io_block_channels or [])
        if int(math.log2(patch_size)) != len(io_block_channels):
            raise ValueError("log2(patch_size) must equal len(io_block_channels)")
        self.resolution, self.in_channels, self.out_channels = resolution, in_channels, out_channels
        self.model_channels, self.patch_size, self.use_fp16 = model_channels, patch_size, use_fp16
        self.use_checkpoint, self.use_skip_connection, self.share_mod = use_checkpoint, use_skip_connection, share_mod
        num_heads = num_heads or model_channels // num_head_channels
        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        self.input_layer = SparseLinear(in_channels, io_block_channels[0] if io_block_channels else model_channels)

        self.input_blocks = nn.ModuleList()
        for s, chs in enumerate(io_block_channels):
            nxt = io_block_channels[s + 1] if s + 1 < len(io_block_channels) else model_channels
            self.input_blocks.extend(SparseResBlock3d(chs, model_channels) for _ in range(num_io_res_blocks - 1))
            self.input_blocks.append(SparseResBlock3d(chs, model_channels, nxt, downsample=True))

        self.blocks = nn.ModuleList([
            ModulatedTransformerCrossBlock(model_channels, cond_channels, num_heads, mlp_ratio, share_mod,
                                           qk_rms_norm, qk_rms_norm_cross)
            for _ in range(num_blocks)])

        mult = 2 if use_skip_connection else 1
        self.out_blocks = nn.ModuleList()
        for s in reversed(range(len(io_block_channels))):
            chs = io_block_channels[s]
            prev = io_block_channels[s + 1] if s + 1 < len(io_block_channels) else model_channels
            self.out_blocks.append(SparseResBlock3d(prev * mult, model_channels, chs, upsample=True))
            self.out_blocks.extend(SparseResBlock3d(chs * mult, model_channels, chs)
                                   for _ in range(num_io_res_blocks - 1))
        self.out_layer = SparseLinear(io_block_channels[0] if io_block_channels else model_channels, out_channels)
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
        for block in [*self.input_blocks, *self.out_blocks]:
            nn.init.zeros_(block.conv2.conv.weight)
            nn.init.zeros_(block.conv2.conv.bias)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def _checkpointed_blocks(self) -> int:
        """How many transformer blocks to run under gradient checkpointing (all when use_checkpoint)."""
        return len(self.blocks) if self.use_checkpoint else 0

    def forward(self, x: SparseTensor, t: torch.Tensor, cond: torch.Tensor) -> SparseTensor:
        dtype = self.dtype
        h = self.input_layer(x).type(dtype)
        t_emb = self.t_embedder(t)
        if self.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        t_emb, cond = t_emb.to(dtype), cond.to(dtype)

        skips = []
        for block in self.input_blocks:
            h = block(h, t_emb)
            skips.append(h.feats)
        h = h + absolute_position_embedding(h.coords[:, 1:], self.model_channels).to(dtype)
        n_ckpt = self._checkpointed_blocks() if (self.training and torch.is_grad_enabled()) else 0
        for i, block in enumerate(self.blocks):
            if i < n_ckpt:
                feats = torch.utils.checkpoint.checkpoint(
                    lambda f, blk=block, base=h: blk(base.replace(f), t_emb, cond).feats, h.feats,
                    use_reentrant=False)
                h = h.replace(feats)
            else:
                h = block(h, t_emb, cond)
        for block, skip in zip(self.out_blocks, reversed(skips)):
            if self.use_skip_connection:
                h = h.replace(torch.cat([h.feats, skip], dim=1))
            h = block(h, t_emb)
        h = h.replace(F.layer_norm(h.feats, h.feats.shape[-1:]))
        return self.out_layer(h.type(x.dtype))


class ElasticSLatFlowModel(SLatFlowModel):
    """The same network (identical weights); trades compute for memory by checkpointing the first blocks.

    `memory_ratio` r in [0, 1] keeps activations of about r of the blocks: the first
    min(ceil((1 - r)·num_blocks) + 1, num_blocks) blocks are checkpointed during training (r = 1 disables it).
    """

    def __init__(self, *args, memory_ratio: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory_ratio = memory_ratio

    def _checkpointed_blocks(self) -> int:
        if self.use_checkpoint:
            return len(self.blocks)
        if self.memory_ratio >= 1.0:
            return 0
        n = len(self.blocks)
        return min(math.ceil((1 - self.memory_ratio) * n) + 1, n)
