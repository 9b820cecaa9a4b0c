"""Sparse ops against dense / naive references written independently of the implementation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mdt.sparse import (SparseConv3d, SparseTensor, downsample2, set_backends, sparse_cat, sparse_unbind,
                        subdivide2, to_dense, upsample2)
from mdt.sparse.attention import (sparse_cross_attention, sparse_full_self_attention,
                                  sparse_window_self_attention, varlen_attention)
from mdt.sparse.backends import flash_attn_available, spconv_available
from mdt.sparse.nn import SparseGroupNorm32


def random_sparse(counts, channels, resolution, seed=0, boundary=False):
    """Samples with the given voxel counts (0 allowed) at distinct random coordinates."""
    g = torch.Generator().manual_seed(seed)
    coords = []
    for b, n in enumerate(counts):
        flat = torch.randperm(resolution ** 3, generator=g)[:n]
        xyz = torch.stack([flat // resolution ** 2, (flat // resolution) % resolution, flat % resolution], 1)
        if boundary and n >= 2:
            xyz[0] = torch.tensor([0, 0, 0])
            xyz[1] = torch.tensor([resolution - 1] * 3)
        xyz = xyz[torch.argsort((xyz[:, 0] * resolution + xyz[:, 1]) * resolution + xyz[:, 2])]
        xyz = torch.unique(xyz, dim=0)
        coords.append(torch.cat([torch.full((len(xyz), 1), b), xyz], 1))
    coords = torch.cat(coords).int()
    return SparseTensor(torch.randn(len(coords), channels, generator=g), coords, batch_size=len(counts))


def dense_conv_reference(x: SparseTensor, conv: SparseConv3d, resolution: int) -> torch.Tensor:
    dense = to_dense(x, resolution)
    weight = conv.conv.weight.permute(0, 4, 1, 2, 3)  # [out, k, k, k, in] -> [out, in, k, k, k], no flip
    out = F.conv3d(dense, weight, conv.conv.bias, padding=conv.kernel_size // 2)
    c = x.coords.long()
    return out[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]


@pytest.mark.parametrize("counts,resolution", [([40, 0, 25], 8), ([1], 5), ([300, 120], 12), ([0, 0], 4)])
@pytest.mark.parametrize("kernel", [3, 1])
def test_submanifold_conv_equals_dense_conv_at_active_sites(counts, resolution, kernel):
    x = random_sparse(counts, 6, resolution, seed=sum(counts) + kernel, boundary=True)
    conv = SparseConv3d(6, 5, kernel)
    with torch.no_grad():
        conv.conv.bias.normal_()
        ours = conv(x).feats
        ref = dense_conv_reference(x, conv, resolution)
    assert ours.shape == (x.feats.shape[0], 5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_conv_gradients_match_dense_reference():
    x = random_sparse([30, 20], 4, 6, seed=3)
    conv = SparseConv3d(4, 3, 3)
    feats = x.feats.clone().requires_grad_(True)
    conv(x.replace(feats)).feats.square().sum().backward()
    g_ours, gw_ours = feats.grad.clone(), conv.conv.weight.grad.clone()
    conv.zero_grad()
    dense = to_dense(x, 6).requires_grad_(True)
    w = conv.conv.weight.permute(0, 4, 1, 2, 3)
    out = F.conv3d(dense, w, conv.conv.bias, padding=1)
    c = x.coords.long()
    out[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]].square().sum().backward()
    torch.testing.assert_close(g_ours, dense.grad[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw_ours, conv.conv.weight.grad, atol=1e-4, rtol=1e-5)


def test_downsample_uses_trellis_averaging_rule_and_upsample_restores_order():
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 1], [0, 2, 0, 0], [1, 3, 3, 3]], dtype=torch.int32)
    feats = torch.tensor([[1.0], [2.0], [3.0], [10.0], [7.0]])
    x = SparseTensor(feats, coords)
    d = downsample2(x)
    assert d.coords.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]]
    # sum of children / (children + 1): the zero the reduction starts from counts as one more element.
    torch.testing.assert_close(d.feats, torch.tensor([[6.0 / 4], [10.0 / 2], [7.0 / 2]]))
    u = upsample2(d.replace(d.feats * 2))
    assert torch.equal(u.coords, coords)
    torch.testing.assert_close(u.feats, torch.tensor([[3.0], [3.0], [3.0], [10.0], [7.0]]))
    with pytest.raises(RuntimeError, match="downsample2"):
        upsample2(x)


def test_subdivide_children():
    x = SparseTensor(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0]]).int())
    s = subdivide2(x)
    assert s.feats.shape == (16, 2) and s.batch_size == 2
    kids = {tuple(c) for c in s.coords[:8].tolist()}
    assert kids == {(0, 2 + a, 4 + b, 6 + d) for a in (0, 1) for b in (0, 1) for d in (0, 1)}
    assert torch.all(s.feats[:8] == torch.tensor([1.0, 2.0])) and torch.all(s.feats[8:] == torch.tensor([3.0, 4.0]))


def test_group_norm_statistics_are_per_sample():
    x = random_sparse([50, 0, 17], 8, 6, seed=5)
    x = x.replace(x.feats * torch.linspace(0.5, 3, 8) + 4)
    gn = SparseGroupNorm32(4, 8)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
        out = gn(x).feats
    for sl in x.layout:
        if sl.stop == sl.start:
            continue
        f = x.feats[sl].t().unsqueeze(0)  # [1, C, n]
        ref = F.group_norm(f, 4, gn.weight, gn.bias, gn.eps)[0].t()
        torch.testing.assert_close(out[sl], ref, atol=1e-5, rtol=1e-5)


def naive_attention(q, k, v):
    """softmax(q kᵀ / sqrt(D)) v for one sequence, q [L, H, D]."""
    scores = torch.einsum("lhd,shd->hls", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hls,shd->lhd", scores.softmax(-1), v)


def test_full_attention_is_block_diagonal_per_sample():
    x = random_sparse([37, 0, 5, 1, 64], 1, 8, seed=7)
    n, h, d = x.feats.shape[0], 3, 4
    q, k, v = (torch.randn(n, h, d) for _ in range(3))
    out = sparse_full_self_attention(x, q, k, v)
    for sl in x.layout:
        if sl.stop > sl.start:
            torch.testing.assert_close(out[sl], naive_attention(q[sl], k[sl], v[sl]), atol=1e-5, rtol=1e-5)


def test_varlen_chunking_and_padding_do_not_change_results(monkeypatch):
    import mdt.sparse.attention as attention

    lengths = [1, 7, 30, 2, 30, 11, 0, 5]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    q, k, v = (torch.randn(int(cu[-1]), 2, 8) for _ in range(3))
    full = varlen_attention(q, k, v, cu, cu)
    monkeypatch.setattr(attention, "MAX_SCORE_ELEMENTS", 50)  # forces one sequence per chunk
    tiny_chunks = varlen_attention(q, k, v, cu, cu)
    torch.testing.assert_close(full, tiny_chunks, atol=1e-5, rtol=1e-5)
    for i, length in enumerate(lengths):
        s = slice(int(cu[i]), int(cu[i + 1]))
        if length:
            torch.testing.assert_close(full[s], naive_attention(q[s], k[s], v[s]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,shift", [(4, 0), (4, 2), (8, 4)])
def test_window_attention_groups_by_shifted_cells(window, shift):
    x = random_sparse([80, 45], 1, 16, seed=11)
    n = x.feats.shape[0]
    q, k, v = (torch.randn(n, 2, 4) for _ in range(3))
    out = sparse_window_self_attention(x, q, k, v, window, shift)
    c = x.coords.long()
    cell = torch.cat([c[:, :1], (c[:, 1:] + shift) // window], 1)
    for key in torch.unique(cell, dim=0):
        rows = torch.nonzero((cell == key).all(1)).squeeze(1)
        torch.testing.assert_close(out[rows], naive_attention(q[rows], k[rows], v[rows]), atol=1e-5, rtol=1e-5)


def test_cross_attention_uses_each_samples_own_condition():
    x = random_sparse([12, 0, 9], 1, 6, seed=2)
    q = torch.randn(x.feats.shape[0], 2, 4)
    k, v = torch.randn(3, 5, 2, 4), torch.randn(3, 5, 2, 4)
    out = sparse_cross_attention(x, q, k, v)
    for b, sl in enumerate(x.layout):
        if sl.stop > sl.start:
            torch.testing.assert_close(out[sl], naive_attention(q[sl], k[b], v[b]), atol=1e-5, rtol=1e-5)


def test_sparse_tensor_arithmetic_cat_unbind():
    x = random_sparse([5, 3], 2, 4, seed=1)
    per_sample = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    y = x * per_sample + 1
    torch.testing.assert_close(y.feats[:5], x.feats[:5] * torch.tensor([1.0, 2.0]) + 1)
    torch.testing.assert_close(y.feats[5:], x.feats[5:] * torch.tensor([10.0, 20.0]) + 1)
    parts = sparse_unbind(x)
    assert [p.feats.shape[0] for p in parts] == [5, 3]
    back = sparse_cat(parts)
    assert torch.equal(back.coords, x.coords) and torch.equal(back.feats, x.feats)
    with pytest.raises(ValueError, match="different coordinates"):
        _ = x + random_sparse([5, 3], 2, 4, seed=9)
    with pytest.raises(ValueError, match="coords must be"):
        SparseTensor(torch.zeros(3, 1), torch.zeros(3, 3, dtype=torch.int32))


def test_backend_selection_rejects_unknown_names():
    with pytest.raises(ValueError):
        set_backends(conv="cudnn")
    with pytest.raises(ValueError):
        set_backends(attn="xformers")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: spconv / flash-attn run on CUDA only")


@cuda
@pytest.mark.skipif(not spconv_available(), reason="spconv is not installed (pip install '.[cuda]')")
def test_spconv_backend_matches_torch_backend():
    x = random_sparse([400, 150], 16, 16, seed=4).to("cuda")
    conv = SparseConv3d(16, 8, 3).cuda()
    try:
        set_backends(conv="torch")
        ref = conv(x).feats
        set_backends(conv="spconv")
        ours = conv(x.replace(x.feats.clone())).feats
    finally:
        set_backends(conv="torch")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@cuda
@pytest.mark.skipif(not flash_attn_available(), reason="flash-attn is not installed (pip install '.[cuda]')")
def test_flash_attn_backend_matches_sdpa_on_variable_lengths():
    lengths = [3, 100, 17, 64]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0))).cuda()
    q, k, v = (torch.randn(int(cu[-1]), 4, 32, device="cuda", dtype=torch.float16) for _ in range(3))
    try:
        set_backends(attn="sdpa")
        ref = varlen_attention(q, k, v, cu, cu)
        set_backends(attn="flash_attn")
        ours = varlen_attention(q, k, v, cu, cu)
    finally:
        set_backends(attn="sdpa")
    torch.testing.assert_close(ours.float(), ref.float(), atol=2e-3, rtol=2e-3)
