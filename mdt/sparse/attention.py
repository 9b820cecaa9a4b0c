"""Variable-length attention for sparse tensors: full (per sample), windowed (swin) and cross-attention.

Sequences are contiguous row ranges described by cumulative lengths `cu` (length n_seq + 1). The SDPA backend
packs sequences of similar length into padded chunks with a key-padding mask, bounding memory by
`MAX_SCORE_ELEMENTS` attention scores per chunk; it never builds an [N, N] mask over the whole batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import attn_backend_for
from .tensor import SparseTensor

MAX_SCORE_ELEMENTS = 1 << 26


def _sdpa_varlen(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> Tensor:
    n_seq = cu_q.shape[0] - 1
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    if n_seq == 0 or q.shape[0] == 0:
        return out
    len_q, len_k = (cu_q[1:] - cu_q[:-1]), (cu_k[1:] - cu_k[:-1])
    heads = q.shape[1]
    # Longest first, so that a chunk's padding is set by its first member.
    order = torch.argsort(len_q * (len_k.max() + 1) + len_k, descending=True).tolist()
    lq_list, lk_list = len_q.tolist(), len_k.tolist()
    cq_list, ck_list = cu_q.tolist(), cu_k.tolist()
    q_pad = torch.cat([q, q.new_zeros((1, *q.shape[1:]))])
    k_pad = torch.cat([k, k.new_zeros((1, *k.shape[1:]))])
    v_pad = torch.cat([v, v.new_zeros((1, *v.shape[1:]))])
    i = 0
    while i < n_seq:
        lq_max, lk_max = lq_list[order[i]], max(1, max(lk_list[j] for j in order[i:i + 1]))
        if lq_max == 0:
            break
        per_seq = heads * lq_max * lk_max
        n_chunk = max(1, min(n_seq - i, MAX_SCORE_ELEMENTS // max(per_seq, 1)))
        seqs = order[i:i + n_chunk]
        lk_max = max(lk_list[j] for j in seqs)
        i += n_chunk
        sq = torch.tensor([cq_list[j] for j in seqs], device=q.device)
        sk = torch.tensor([ck_list[j] for j in seqs], device=q.device)
        lq = torch.tensor([lq_list[j] for j in seqs], device=q.device)
        lk = torch.tensor([lk_list[j] for j in seqs], device=q.device)
        ar_q = torch.arange(lq_max, device=q.device)
        ar_k = torch.arange(lk_max, device=q.device)
        valid_q = ar_q[None] < lq[:, None]
        valid_k = ar_k[None] < lk[:, None]
        idx_q = torch.where(valid_q, sq[:, None] + ar_q[None], q.shape[0])
        idx_k = torch.where(valid_k, sk[:, None] + ar_k[None], k.shape[0])
        qc = q_pad[idx_q].transpose(1, 2)  # [G, H, Lq, D]
        kc = k_pad[idx_k].transpose(1, 2)
        vc = v_pad[idx_k].transpose(1, 2)
        mask = None if bool(valid_k.all()) else valid_k[:, None, None, :]
        oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask).transpose(1, 2)  # [G, Lq, H, D]
        out[idx_q[valid_q]] = oc[valid_q]
    return out


def _flash_varlen(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> Tensor:
    from flash_attn import flash_attn_varlen_func  # optional: flash_attn

    len_q, len_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    return flash_attn_varlen_func(q, k, v, cu_q.to(q.device, torch.int32), cu_k.to(q.device, torch.int32),
                                  int(len_q.max()), int(len_k.max()))


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> Tensor:
    """Softmax attention within each sequence. q [Nq, H, D], k/v [Nk, H, D] -> [Nq, H, Dv]."""
    if attn_backend_for(q.is_cuda, q.dtype) == "flash_attn":
        return _flash_varlen(q, k, v, cu_q, cu_k)
    return _sdpa_varlen(q, k, v, cu_q, cu_k)


def _cumulative(counts: Tensor) -> Tensor:
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def sparse_full_self_attention(x: SparseTensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Each sample's voxels attend to all voxels of the same sample."""
    cu = _cumulative(x.counts)
    return varlen_attention(q, k, v, cu, cu)


def window_groups(x: SparseTensor, window_size: int, shift: int) -> tuple[Tensor, Tensor]:
    """Voxels of one sample inside the same shifted window cell: (permutation into groups, group sizes)."""
    key = ("swin", window_size, shift)
    if key not in x._cache:
        c = x.coords.long()
        cell = (c[:, 1:] + shift) // window_size
        span = 1 << 11
        code = ((c[:, 0] * span + cell[:, 0]) * span + cell[:, 1]) * span + cell[:, 2]
        uniq, inverse = torch.unique(code, return_inverse=True)
        perm = torch.argsort(inverse, stable=True)
        sizes = torch.bincount(inverse, minlength=uniq.shape[0])
        x._cache[key] = (perm, sizes)
    return x._cache[key]


def sparse_window_self_attention(x: SparseTensor, q: Tensor, k: Tensor, v: Tensor,
                                 window_size: int, shift: int) -> Tensor:
    perm, sizes = window_groups(x, window_size, shift)
    cu = _cumulative(sizes)
    out_sorted = varlen_attention(q[perm], k[perm], v[perm], cu, cu)
    out = torch.empty_like(out_sorted)
    out[perm] = out_sorted
    return out


def sparse_cross_attention(x: SparseTensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q [N, H, D] from voxels; k/v [B, T, H, D] dense condition tokens of each sample."""
    b, t = k.shape[:2]
    cu_q = _cumulative(x.counts)
    cu_k = torch.arange(0, (b + 1) * t, t, device=x.counts.device)
    return varlen_attention(q, k.reshape(b * t, *k.shape[2:]), v.reshape(b * t, *v.shape[2:]), cu_q, cu_k)


def dense_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q [B, L, H, D], k/v [B, S, H, D] -> [B, L, H, D]."""
    if attn_backend_for(q.is_cuda, q.dtype) == "flash_attn":
        from flash_attn import flash_attn_func  # optional: flash_attn

        return flash_attn_func(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
