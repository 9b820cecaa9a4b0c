"""Resolution changes of sparse tensors: ×2 down/upsampling (paired) and subdivision."""
from __future__ import annotations

import torch
import torch.nn as nn

from .tensor import SparseTensor


def downsample2(x: SparseTensor) -> SparseTensor:
    """Parents at coords // 2, ordered by (batch, x, y, z).

    TRELLIS reduces the children with a scatter-"mean" into a zero buffer that counts its own initial zero, so a
    parent is sum(children) / (n_children + 1). We reproduce that rule exactly, for numerical parity.
    """
    c = x.coords.long()
    parent = torch.cat([c[:, :1], c[:, 1:] // 2], dim=1)
    span = 1 << 11
    code = ((parent[:, 0] * span + parent[:, 1]) * span + parent[:, 2]) * span + parent[:, 3]
    uniq, inverse = torch.unique(code, sorted=True, return_inverse=True)
    n_parent = uniq.shape[0]
    counts = torch.bincount(inverse, minlength=n_parent).to(x.feats.dtype)
    sums = x.feats.new_zeros((n_parent, x.feats.shape[1])).index_add(0, inverse, x.feats)
    feats = sums / (counts + 1).unsqueeze(1)
    new_coords = torch.empty((n_parent, 4), dtype=torch.int32, device=c.device)
    new_coords[inverse] = parent.to(torch.int32)
    out = SparseTensor(feats, new_coords, batch_size=x.batch_size)
    # Remembered for the matching upsample: where each fine voxel's parent row is, and the fine tensor's cache.
    out._cache["upsample_from"] = (x.coords, inverse, x._cache)
    return out


def upsample2(x: SparseTensor) -> SparseTensor:
    """Undo the paired downsample2: every fine voxel copies its parent's feature."""
    if "upsample_from" not in x._cache:
        raise RuntimeError("upsample2 needs a tensor produced by downsample2 (the fine coordinates are cached there)")
    fine_coords, inverse, fine_cache = x._cache["upsample_from"]
    return SparseTensor(x.feats[inverse], fine_coords, batch_size=x.batch_size, _cache=fine_cache)


def subdivide2(x: SparseTensor) -> SparseTensor:
    """Each voxel becomes 8 children at 2c + {0,1}³ carrying the parent's feature (voxel-major order)."""
    offsets = torch.tensor([[a, b, d] for a in (0, 1) for b in (0, 1) for d in (0, 1)],
                           dtype=torch.int32, device=x.coords.device)
    coords = x.coords.clone()
    coords[:, 1:] *= 2
    child = coords.unsqueeze(1).repeat(1, 8, 1)
    child[:, :, 1:] += offsets.unsqueeze(0)
    feats = x.feats.unsqueeze(1).expand(-1, 8, *x.feats.shape[1:]).reshape(-1, *x.feats.shape[1:])
    return SparseTensor(feats, child.reshape(-1, 4), batch_size=x.batch_size)


class SparseDownsample(nn.Module):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return downsample2(x)


class SparseUpsample(nn.Module):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return upsample2(x)


class SparseSubdivide(nn.Module):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return subdivide2(x)
