"""A sparse voxel tensor: features at integer coordinates, several samples per batch.

Rows of one sample are contiguous and samples come in ascending batch order (the TRELLIS convention), so a
sample's rows are a slice. Tensors derived from one another on the same coordinates share a cache
(neighbour maps, the fine level a downsample came from), which is why `replace` exists.

`SparseTensor` is declared a dataclass (fields feats, coords, _cache; its own `__init__`) because that is the
container torch's module hooks look inside: FSDP2 registers its pre-backward unshard on the grad-requiring tensors
of a sharded module's output, and its post-backward on those of the inputs, found by walking tuples, dicts and
dataclasses (`torch.distributed.fsdp._common_utils.collect_grad_tensors`), then rebuilds them with
`dataclasses.replace`; its mixed-precision cast of the inputs walks dataclasses too (moving inputs to a device
does not: the trainer moves its batches itself). Without it, a sharded sparse block's parameters stay resharded
in backward.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import Tensor


@dataclasses.dataclass(init=False, repr=False, eq=False)
class SparseTensor:
    """feats [N, C] at coords int32 [N, 4] = (batch, x, y, z)."""

    feats: Tensor
    coords: Tensor
    _cache: dict          # shared by tensors on the same coordinates (see `replace`); holds batch_size

    def __init__(self, feats: Tensor, coords: Tensor, batch_size: int | None = None,
                 _cache: dict | None = None):
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must be [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
        if feats.shape[0] != coords.shape[0]:
            raise ValueError(f"feats has {feats.shape[0]} rows but coords has {coords.shape[0]}")
        if coords.dtype != torch.int32:
            coords = coords.to(torch.int32)
        self.feats = feats
        self.coords = coords
        self._cache = {} if _cache is None else _cache
        if batch_size is None:
            batch_size = self._cache.get("batch_size")
        if batch_size is None:
            batch_size = int(coords[:, 0].max().item()) + 1 if coords.shape[0] else 0
        self._cache["batch_size"] = batch_size

    # ---- layout -------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self._cache["batch_size"]

    @property
    def batch_idx(self) -> Tensor:
        if "batch_idx" not in self._cache:
            self._cache["batch_idx"] = self.coords[:, 0].long()
        return self._cache["batch_idx"]

    @property
    def counts(self) -> Tensor:
        """Number of voxels of each sample, long [B]."""
        if "counts" not in self._cache:
            self._cache["counts"] = torch.bincount(self.batch_idx, minlength=self.batch_size)
        return self._cache["counts"]

    @property
    def layout(self) -> list[slice]:
        if "layout" not in self._cache:
            ends = torch.cumsum(self.counts, 0).tolist()
            starts = [0] + ends[:-1]
            self._cache["layout"] = [slice(s, e) for s, e in zip(starts, ends)]
        return self._cache["layout"]

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.batch_size, *self.feats.shape[1:]])

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    def check_layout(self) -> None:
        """Raise if rows are not grouped by ascending batch index."""
        b = self.coords[:, 0]
        if b.numel() and (bool((b[1:] < b[:-1]).any()) or int(b.min()) < 0):
            raise ValueError("SparseTensor rows must be grouped by batch index in ascending order")

    # ---- construction -------------------------------------------------------------------------
    def replace(self, feats: Tensor, coords: Tensor | None = None) -> "SparseTensor":
        """Same coordinates (and cache) with new features, or new coordinates with a fresh cache."""
        if coords is None:
            return SparseTensor(feats, self.coords, self.batch_size, _cache=self._cache)
        return SparseTensor(feats, coords, self.batch_size)

    def to(self, *args: Any, **kwargs: Any) -> "SparseTensor":
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.coords.device:
            return self.replace(feats)
        return SparseTensor(feats, self.coords.to(feats.device), self.batch_size)

    def type(self, dtype: torch.dtype) -> "SparseTensor":
        return self.replace(self.feats.type(dtype))

    def float(self) -> "SparseTensor":
        return self.type(torch.float32)

    def half(self) -> "SparseTensor":
        return self.type(torch.float16)

    def detach(self) -> "SparseTensor":
        return self.replace(self.feats.detach())

    def clone(self) -> "SparseTensor":
        return self.replace(self.feats.clone())

    def requires_grad_(self, flag: bool = True) -> "SparseTensor":
        self.feats.requires_grad_(flag)
        return self

    # ---- elementwise arithmetic -----------------------------------------------------------------
    def _operand(self, other: Any) -> Any:
        if isinstance(other, SparseTensor):
            if other.coords is not self.coords and (
                other.coords.shape != self.coords.shape or not torch.equal(other.coords, self.coords)
            ):
                raise ValueError("sparse tensors on different coordinates cannot be combined elementwise")
            return other.feats
        if isinstance(other, Tensor) and other.dim() >= 1 and other.shape[0] == self.batch_size \
                and other.dim() == self.feats.dim():
            # A dense per-sample row [B, C] (or [B, 1]) broadcast onto that sample's voxels.
            return other[self.batch_idx]
        return other

    def __add__(self, o): return self.replace(self.feats + self._operand(o))
    def __radd__(self, o): return self.replace(self._operand(o) + self.feats)
    def __sub__(self, o): return self.replace(self.feats - self._operand(o))
    def __rsub__(self, o): return self.replace(self._operand(o) - self.feats)
    def __mul__(self, o): return self.replace(self.feats * self._operand(o))
    def __rmul__(self, o): return self.replace(self._operand(o) * self.feats)
    def __truediv__(self, o): return self.replace(self.feats / self._operand(o))
    def __neg__(self): return self.replace(-self.feats)

    def __repr__(self) -> str:
        return (f"SparseTensor(batch_size={self.batch_size}, n={self.feats.shape[0]}, "
                f"feats={tuple(self.feats.shape)} {self.feats.dtype}, device={self.device})")


def per_sample_sum(x: SparseTensor) -> Tensor:
    """Sum of each sample's rows: [B, C]."""
    out = x.feats.new_zeros((x.batch_size, *x.feats.shape[1:]))
    return out.index_add(0, x.batch_idx, x.feats)


def per_sample_mean(x: SparseTensor) -> Tensor:
    """Mean over each sample's voxels: [B, C] (0 for an empty sample)."""
    counts = x.counts.clamp(min=1).to(x.feats.dtype).view(-1, *([1] * (x.feats.dim() - 1)))
    return per_sample_sum(x) / counts


def sparse_cat(tensors: Sequence[SparseTensor], dim: int = 0) -> SparseTensor:
    """dim=0: stack samples (batch indices renumbered); dim=1: concatenate channels (same coords)."""
    if dim == 1:
        first = tensors[0]
        return first.replace(torch.cat([first.feats] + [first._operand(t) for t in tensors[1:]], dim=1))
    if dim != 0:
        raise ValueError("sparse_cat supports dim 0 (batch) and 1 (channels)")
    coords, feats, offset = [], [], 0
    for t in tensors:
        c = t.coords.clone()
        c[:, 0] += offset
        coords.append(c)
        feats.append(t.feats)
        offset += t.batch_size
    return SparseTensor(torch.cat(feats), torch.cat(coords), batch_size=offset)


def sparse_unbind(x: SparseTensor) -> list[SparseTensor]:
    """One single-sample tensor per sample (batch index 0)."""
    out = []
    for sl in x.layout:
        c = x.coords[sl].clone()
        c[:, 0] = 0
        out.append(SparseTensor(x.feats[sl], c, batch_size=1))
    return out


def to_dense(x: SparseTensor, resolution: int) -> Tensor:
    """Scatter into a dense [B, C, R, R, R] grid (zeros elsewhere)."""
    b, c = x.batch_idx, x.coords[:, 1:].long()
    out = x.feats.new_zeros((x.batch_size, resolution, resolution, resolution, x.feats.shape[1]))
    out[b, c[:, 0], c[:, 1], c[:, 2]] = x.feats
    return out.permute(0, 4, 1, 2, 3).contiguous()


def from_dense(dense: Tensor, mask: Tensor | None = None) -> SparseTensor:
    """Active sites of a dense [B, C, X, Y, Z] tensor (mask [B, X, Y, Z], default: any channel non-zero)."""
    if mask is None:
        mask = (dense != 0).any(dim=1)
    idx = torch.nonzero(mask)  # row-major: batch, x, y, z ascending
    feats = dense.permute(0, 2, 3, 4, 1)[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]]
    return SparseTensor(feats, idx.to(torch.int32), batch_size=dense.shape[0])
