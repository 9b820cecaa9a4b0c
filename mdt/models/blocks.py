"""Building blocks shared by the TRELLIS networks. Every block accepts a dense token tensor [B, L, C] or a
SparseTensor (features [N, C]); parameter names follow the TRELLIS checkpoints exactly."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mdt.sparse import (SparseTensor, dense_attention, sparse_cross_attention, sparse_full_self_attention,
                        sparse_window_self_attention)
from mdt.sparse.nn import SparseLinear


def feats_of(x):
    return x.feats if isinstance(x, SparseTensor) else x


def with_feats(x, feats: Tensor):
    return x.replace(feats) if isinstance(x, SparseTensor) else feats


def per_sample(x, v: Tensor) -> Tensor:
    """Broadcast a per-sample row v [B, C] to x's rows: [B, 1, C] for dense tokens, [N, C] for sparse."""
    return v[x.batch_idx] if isinstance(x, SparseTensor) else v.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (already ×1000), cosine half first, then a 2-layer MLP.  t [B] -> [B, C]."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    @staticmethod
    def sinusoidal(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.sinusoidal(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


def absolute_position_embedding(coords: Tensor, channels: int) -> Tensor:
    """Parameter-free 3-D sin/cos embedding of integer grid positions [N, 3] -> [N, channels].

    Per axis (x, y, z in order): [sin(a·ω), cos(a·ω)], ω_j = 10000^(-j/f), f = channels // 3 // 2; zero-padded.
    """
    in_dim = coords.shape[-1]
    freq_dim = channels // in_dim // 2
    omega = 1.0 / (10000 ** (torch.arange(freq_dim, dtype=torch.float32, device=coords.device) / freq_dim))
    args = coords.reshape(-1).float()[:, None] * omega[None]         # [N·3, f]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)      # [N·3, 2f]
    emb = emb.reshape(coords.shape[0], -1)                            # [N, 3·2f]
    if emb.shape[1] < channels:
        emb = torch.cat([emb, emb.new_zeros(coords.shape[0], channels - emb.shape[1])], dim=-1)
    return emb


def rotate_pairs(x: Tensor, phases: Tensor) -> Tensor:
    """Rotary position embedding: x [..., L, H, D] read as D/2 complex numbers (x[2i], x[2i+1]), each multiplied
    by its unit phase; phases [L, D/2] complex (one row per token or voxel, shared by the heads). float32 inside."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * phases.unsqueeze(-2)).reshape(x.shape).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype. Works on dense and sparse inputs."""

    def forward(self, x):
        f = feats_of(x)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        out = F.layer_norm(f.float(), self.normalized_shape, w, b, self.eps).to(f.dtype)
        return with_feats(x, out)


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm of q or k: normalize(x)·sqrt(D)·gamma, gamma [H, D], computed in float32."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: Tensor) -> Tensor:  # [..., H, D]
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)


class FeedForwardNet(nn.Module):
    """Linear(C → rC), tanh-GELU, Linear(rC → C). Keys `mlp.mlp.{0,2}` inside a block."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, channels))

    def forward(self, x):
        return with_feats(x, self.mlp(feats_of(x)))


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention over dense tokens or sparse voxels.

    Self: to_qkv [3C, C] split as [q | k | v], heads contiguous. Cross: to_q [C, C], to_kv [2C, Cc].
    Sparse self-attention is per sample ("full") or inside shifted windows ("swin").
    """

    def __init__(self, channels: int, num_heads: int, ctx_channels: int | None = None, type: str = "self",
                 attn_mode: str = "full", window_size: int | None = None, shift_window: int = 0,
                 qkv_bias: bool = True, qk_rms_norm: bool = False):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        if attn_mode not in ("full", "swin"):
            raise ValueError(f"attn_mode must be 'full' or 'swin', got {attn_mode!r}")
        if attn_mode == "swin" and not window_size:
            raise ValueError("attn_mode 'swin' needs window_size")
        self.channels, self.num_heads, self.head_dim = channels, num_heads, channels // num_heads
        self.type, self.attn_mode = type, attn_mode
        self.window_size, self.shift_window = window_size, shift_window
        self.qk_rms_norm = qk_rms_norm
        if type == "self":
            self.to_qkv = nn.Linear(channels, channels * 3, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(ctx_channels or channels, channels * 2, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def _heads(self, t: Tensor, parts: int) -> tuple[Tensor, ...]:
        return t.reshape(*t.shape[:-1], parts, self.num_heads, self.head_dim).unbind(-3)

    def forward(self, x, context: Tensor | None = None, phases: Tensor | None = None):
        f = feats_of(x)
        if self.type == "self":
            q, k, v = self._heads(self.to_qkv(f), 3)
        else:
            (q,) = self._heads(self.to_q(f), 1)
            k, v = self._heads(self.to_kv(context), 2)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        if phases is not None:  # RoPE (TRELLIS.2) after the qk norm, on self-attention only
            q, k = rotate_pairs(q, phases), rotate_pairs(k, phases)
        if not isinstance(x, SparseTensor):
            out = dense_attention(q, k, v)
        elif self.type == "cross":
            out = sparse_cross_attention(x, q, k, v)
        elif self.attn_mode == "full":
            out = sparse_full_self_attention(x, q, k, v)
        else:
            out = sparse_window_self_attention(x, q, k, v, self.window_size, self.shift_window)
        out = out.reshape(*out.shape[:-2], self.channels)
        return with_feats(x, self.to_out(out))


class ModulatedTransformerCrossBlock(nn.Module):
    """adaLN-modulated self-attention, affine-norm cross-attention to the condition, modulated MLP.

    The 6C modulation is chunked as shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
    With share_mod the model computes it once for all blocks; `mod_bias` (TRELLIS.2) adds a learned per-block
    6C `modulation` to it. `phases` (TRELLIS.2's RoPE) rotate q and k of the self-attention.
    """

    def __init__(self, channels: int, ctx_channels: int, num_heads: int, mlp_ratio: float = 4.0,
                 share_mod: bool = False, qk_rms_norm: bool = False, qk_rms_norm_cross: bool = False,
                 mod_bias: bool = False):
        super().__init__()
        self.share_mod = share_mod
        self.mod_bias = share_mod and mod_bias
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = MultiHeadAttention(channels, num_heads, type="self", qk_rms_norm=qk_rms_norm)
        self.cross_attn = MultiHeadAttention(channels, num_heads, ctx_channels=ctx_channels, type="cross",
                                             qk_rms_norm=qk_rms_norm_cross)
        self.mlp = FeedForwardNet(channels, mlp_ratio)
        if not share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels, bias=True))
        if self.mod_bias:
            self.modulation = nn.Parameter(torch.randn(6 * channels) / channels ** 0.5)

    def forward(self, x, mod: Tensor, context: Tensor, phases: Tensor | None = None):
        if not self.share_mod:
            mod = self.adaLN_modulation(mod)
        elif self.mod_bias:
            mod = (self.modulation + mod).to(mod.dtype)  # the float32 bias, then the torso dtype
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        f = feats_of(x)
        h = feats_of(self.norm1(x)) * (1 + per_sample(x, scale_msa)) + per_sample(x, shift_msa)
        h = feats_of(self.self_attn(with_feats(x, h), phases=phases))
        f = f + h * per_sample(x, gate_msa)
        h = feats_of(self.cross_attn(self.norm2(with_feats(x, f)), context))
        f = f + h
        h = feats_of(self.norm3(with_feats(x, f))) * (1 + per_sample(x, scale_mlp)) + per_sample(x, shift_mlp)
        h = feats_of(self.mlp(with_feats(x, h)))
        f = f + h * per_sample(x, gate_mlp)
        return with_feats(x, f)


class SparseTransformerBlock(nn.Module):
    """Plain pre-norm block of the SLat VAEs: x + Attn(norm1(x)), then x + MLP(norm2(x)). Attribute `attn`."""

    def __init__(self, channels: int, num_heads: int, mlp_ratio: float = 4.0, attn_mode: str = "full",
                 window_size: int | None = None, shift_window: int = 0, qk_rms_norm: bool = False):
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.attn = MultiHeadAttention(channels, num_heads, type="self", attn_mode=attn_mode,
                                       window_size=window_size, shift_window=shift_window, qk_rms_norm=qk_rms_norm)
        self.mlp = FeedForwardNet(channels, mlp_ratio)

    def forward(self, x: SparseTensor) -> SparseTensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def init_transformer_weights(model: nn.Module) -> None:
    """TRELLIS's initialisation for training from scratch: Xavier linears with zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """dtype of the torso weights: float16 for a published fp16 layout on CUDA, float32 once cast for CPU."""
    return getattr(module, "_torso_dtype", torch.float32)


SparseLinear = SparseLinear  # re-exported for the model files
