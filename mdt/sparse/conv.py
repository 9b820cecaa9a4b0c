"""Submanifold sparse 3-D convolution (output sites = input sites, missing neighbours count as zero).

Weights use spconv's layout [out, k, k, k, in] so that TRELLIS checkpoints load unchanged. The PyTorch backend
builds a neighbour map once per coordinate set (cached on the tensor) and runs one gather / GEMM / scatter-add
per kernel offset, so memory stays O(N·C) whatever the kernel size.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
from torch import Tensor

from .backends import conv_backend_for
from .tensor import SparseTensor

_COORD_SPAN = 1 << 11  # coordinates live in [0, 1023]; one margin on each side keeps x±r non-negative.


def _encode(b: Tensor, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    s = _COORD_SPAN
    return ((b * s + x) * s + y) * s + z


def neighbour_map(x: SparseTensor, kernel_size: int, dilation: int = 1) -> list[tuple[Tensor, Tensor] | None]:
    """For each kernel offset (kx slowest, kz fastest): (out_rows, in_rows) pairs, or None for the identity."""
    key = ("nbr", kernel_size, dilation)
    if key in x._cache:
        return x._cache[key]
    c = x.coords.long()
    b, cx, cy, cz = c[:, 0], c[:, 1] + 2 * dilation, c[:, 2] + 2 * dilation, c[:, 3] + 2 * dilation
    codes = _encode(b, cx, cy, cz)
    sorted_codes, order = torch.sort(codes)
    r = kernel_size // 2
    pairs: list[tuple[Tensor, Tensor] | None] = []
    n = codes.shape[0]
    for dx, dy, dz in itertools.product(range(-r, r + 1), repeat=3):
        if dx == dy == dz == 0:
            pairs.append(None)
            continue
        q = _encode(b, cx + dx * dilation, cy + dy * dilation, cz + dz * dilation)
        if n == 0:
            pairs.append((q.new_zeros(0), q.new_zeros(0)))
            continue
        pos = torch.searchsorted(sorted_codes, q).clamp_(max=n - 1)
        found = sorted_codes[pos] == q
        out_rows = torch.nonzero(found).squeeze(1)
        pairs.append((out_rows, order[pos[out_rows]]))
    x._cache[key] = pairs
    return pairs


def submanifold_conv3d_torch(x: SparseTensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """weight [out, k, k, k, in]; returns output feats [N, out]."""
    out_ch, k = weight.shape[0], weight.shape[1]
    w = weight.reshape(out_ch, k ** 3, weight.shape[-1])
    feats = x.feats
    if k == 1:
        out = feats @ w[:, 0].t()
    else:
        pairs = neighbour_map(x, k)
        center = (k ** 3) // 2
        out = feats @ w[:, center].t()
        for kidx, pair in enumerate(pairs):
            if pair is None or pair[0].numel() == 0:
                continue
            out_rows, in_rows = pair
            out = out.index_add(0, out_rows, feats[in_rows] @ w[:, kidx].t())
    if bias is not None:
        out = out + bias
    return out


def submanifold_conv3d_spconv(x: SparseTensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    import spconv.pytorch as spconv  # noqa: WPS433 (optional dependency)

    k = weight.shape[1]
    key = ("spconv_tensor_shape",)
    spatial = x._cache.get(key)
    if spatial is None:
        spatial = [int(v) + 1 for v in x.coords[:, 1:].max(0).values.tolist()] if x.coords.shape[0] else [1, 1, 1]
        x._cache[key] = spatial
    st = spconv.SparseConvTensor(x.feats, x.coords, spatial, x.batch_size)
    # spconv keeps its index pairs in the tensor's indice dict; share them across convs on these coords.
    indice_dict = x._cache.setdefault("spconv_indice_dict", {})
    st.indice_dict = indice_dict
    layer = _spconv_layer(weight.shape[-1], weight.shape[0], k, bias is not None, weight.device, weight.dtype)
    out = torch.func.functional_call(
        layer, {"weight": weight, **({"bias": bias} if bias is not None else {})}, (st,))
    return out.features


_SPCONV_LAYERS: dict = {}


def _spconv_layer(cin: int, cout: int, k: int, has_bias: bool, device, dtype):
    import spconv.pytorch as spconv  # optional: spconv

    key = (cin, cout, k, has_bias, str(device), dtype)
    if key not in _SPCONV_LAYERS:
        _SPCONV_LAYERS[key] = spconv.SubMConv3d(cin, cout, k, bias=has_bias, indice_key=f"subm{k}").to(device, dtype)
    return _SPCONV_LAYERS[key]


class _ConvParams(nn.Module):
    """Holds weight [out, k, k, k, in] and bias [out] under the names TRELLIS checkpoints use (`.conv.`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, kernel_size, kernel_size, kernel_size, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        fan_in = in_channels * kernel_size ** 3
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)


class SparseConv3d(nn.Module):
    """Submanifold convolution, stride 1 (the only kind the TRELLIS networks use)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("submanifold convolution needs an odd kernel size")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.conv = _ConvParams(in_channels, out_channels, kernel_size, bias)

    def forward(self, x: SparseTensor) -> SparseTensor:
        w, b = self.conv.weight, self.conv.bias
        feats = x.feats.to(w.dtype)
        xin = x.replace(feats) if feats is not x.feats else x
        if conv_backend_for(x.feats.is_cuda) == "spconv" and self.kernel_size > 1:
            out = submanifold_conv3d_spconv(xin, w, b)
        else:
            out = submanifold_conv3d_torch(xin, w, b)
        return x.replace(out)
