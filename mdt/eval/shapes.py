"""Metrics between sets of voxel shapes (boolean occupancy grids [N, R, R, R]).

* `iou_matrix(a, b)` -> [n, m] intersection-over-union; the shape distance is 1 - IoU.
* `subsample_points(points, max_points, generator)`: a uniform random subset of at most `max_points` rows.
* `surface_points(occ)`: centres of the boundary voxels (occupied with an empty 6-neighbour), in [-1, 1]^3,
  subsampled to at most `max_points` with a fixed seed; `chamfer_matrix(pa, pb)` -> [n, m] symmetric Chamfer
  distance (mean nearest-neighbour Euclidean distance, averaged over both directions).
* `paired_iou(a, b)` -> [n] IoU of a[i] with b[i]; `chamfer_fscore(pa, pb, threshold)` -> (Chamfer distance,
  F-score) of two point sets (F-score: harmonic mean of the fractions of points of each set within `threshold`
  of the other, Tatarchenko et al.), with the same Chamfer convention as `chamfer_matrix`.
* `coverage_mmd(d)`: for a distance matrix d [n_ref, n_gen], COV = fraction of reference shapes that are the
  nearest reference of at least one generated shape, MMD = mean over references of the distance to the closest
  generated shape (Achlioptas et al.'s COV / MMD).
* `OccupancyFeatureNet`: a fixed, seeded random 3-D conv net (no training, no data), whose per-layer spatial
  mean and standard deviation are the features of the Frechet distance on shapes.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

EMPTY_CHAMFER = 1.0  # Chamfer distance assigned to a pair with an empty shape (grid coordinates in [-1, 1])


def iou_matrix(a: Tensor, b: Tensor) -> Tensor:
    """IoU between every shape of a [n, ...] and every shape of b [m, ...] (boolean); two empty shapes: 1."""
    fa = a.reshape(a.shape[0], -1).float()
    fb = b.reshape(b.shape[0], -1).float()
    inter = fa @ fb.T
    union = fa.sum(1, keepdim=True) + fb.sum(1)[None] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter)).double()


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of a[i] with b[i] for shapes [n, ...] (boolean): [n] float64; two empty shapes: 1."""
    fa = a.reshape(a.shape[0], -1).bool()
    fb = b.reshape(b.shape[0], -1).bool()
    inter = (fa & fb).sum(1).double()
    union = (fa | fb).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def boundary(occ: Tensor) -> Tensor:
    """Occupied voxels with at least one empty (or out-of-grid) 6-neighbour: [N, R, R, R] bool."""
    occ = occ.bool()
    n, r = occ.shape[0], occ.shape[-1]
    pad = torch.zeros(n, r + 2, r + 2, r + 2, dtype=torch.bool)             # outside the grid counts as empty
    pad[:, 1:-1, 1:-1, 1:-1] = occ
    c = slice(1, -1)
    interior = (pad[:, 2:, c, c] & pad[:, :-2, c, c] & pad[:, c, 2:, c] & pad[:, c, :-2, c]
                & pad[:, c, c, 2:] & pad[:, c, c, :-2])
    return occ & ~interior


def subsample_points(points: Tensor, max_points: int, generator: torch.Generator) -> Tensor:
    """At most `max_points` rows of points [P, D], a uniform random subset without replacement (order kept
    when nothing is dropped)."""
    if points.shape[0] <= max_points:
        return points
    return points[torch.randperm(points.shape[0], generator=generator)[:max_points]]


def surface_points(occ: Tensor, max_points: int = 256, seed: int = 0) -> list[Tensor]:
    """Boundary-voxel centres of each shape in [-1, 1]^3 (at most max_points each, fixed subsample)."""
    res = occ.shape[-1]
    surf = boundary(occ)
    g = torch.Generator().manual_seed(seed)
    return [(subsample_points(s.nonzero().double(), max_points, g) + 0.5) / res * 2 - 1 for s in surf]


def _pad(points: list[Tensor]) -> tuple[Tensor, Tensor]:
    p = max(1, max(x.shape[0] for x in points))
    pts = torch.zeros(len(points), p, 3, dtype=torch.float64)
    mask = torch.zeros(len(points), p, dtype=torch.bool)
    for i, x in enumerate(points):
        pts[i, :x.shape[0]] = x
        mask[i, :x.shape[0]] = True
    return pts, mask


def _integer_scale(points: Tensor) -> float | None:
    """A power of two s such that every coordinate times s is an integer of magnitude <= 1024 (voxel centres on
    a grid of up to 1024 cells per side), or None. On such coordinates the float32 squared distances of
    `chamfer_matrix` are integers below 2^24, i.e. exact."""
    bound = float(points.abs().max()) if points.numel() else 0.0
    if not math.isfinite(bound):
        return None
    # the largest admissible s: if x s is not an integer, x s' is not one for any smaller power of two s' either
    s = 2.0 ** min(11, math.floor(math.log2(1024 / bound))) if bound > 0 else 1.0
    scaled = points * s
    return s if torch.equal(scaled, torch.round(scaled)) else None


def chamfer_matrix(pa: list[Tensor], pb: list[Tensor]) -> Tensor:
    """Symmetric Chamfer distance between every point set of pa and of pb: [n, m] (float64).

    Squared distances come from one matrix product per row (|a|^2 + |b|^2 - 2 a.b); the square root is taken of
    the nearest-neighbour minima only (it is monotonic). When all coordinates lie on a dyadic grid (voxel centres)
    the products run in float32 on integer coordinates, where they are exact; otherwise in float64."""
    a, ma = _pad(pa)
    b, mb = _pad(pb)
    n, m, pb_max = len(pa), len(pb), b.shape[1]
    real = torch.cat([a[ma], b[mb]])
    scale = _integer_scale(real)
    dtype = torch.float32 if scale is not None else torch.float64
    scale = scale or 1.0
    # padded slots sit far from every real point, so they are never a real point's nearest neighbour
    far = 3 * float(real.abs().max() if real.numel() else 0.0) * scale + 1
    a = torch.where(ma[..., None], a * scale, far).to(dtype)
    b = torch.where(mb[..., None], b * scale, far).to(dtype)
    b_flat = b.reshape(m * pb_max, 3)
    b_sq, a_sq = b_flat.pow(2).sum(1), a.pow(2).sum(2)
    na, nb = ma.sum(1).clamp(min=1), mb.sum(1).clamp(min=1)
    mbf = mb.double()
    out = torch.empty(n, m, dtype=torch.float64)
    for i in range(n):
        sq = torch.addmm(b_sq[None], a[i], b_flat.T, alpha=-2).add_(a_sq[i][:, None]).view(-1, m, pb_max)
        ab = sq.amin(2).double().clamp_(min=0).sqrt_().T / scale        # [m, Pa]: a's points -> nearest in b_j
        ba = sq.amin(0).double().clamp_(min=0).sqrt_() / scale          # [m, Pb]: b_j's points -> nearest in a
        out[i] = ((ab * ma[i]).sum(1) / na[i] + (ba * mbf).sum(1) / nb) / 2
    empty_a, empty_b = ~ma.any(1), ~mb.any(1)
    out = torch.where(empty_a[:, None] | empty_b[None], torch.full_like(out, EMPTY_CHAMFER), out)
    return torch.where(empty_a[:, None] & empty_b[None], torch.zeros_like(out), out)


def chamfer_fscore(pa: Tensor, pb: Tensor, threshold: float) -> tuple[float, float]:
    """(Chamfer distance, F-score at `threshold`) between point sets pa [P, 3] and pb [Q, 3].

    Chamfer: (mean_a min_b |a - b| + mean_b min_a |a - b|) / 2 (Euclidean, as `chamfer_matrix`); F-score:
    2 P R / (P + R) with precision P = fraction of pa within `threshold` of pb and recall R the converse.
    One empty set: (EMPTY_CHAMFER, 0); both empty: (0, 1)."""
    from scipy.spatial import cKDTree  # heavy: scipy

    pa = torch.as_tensor(pa, dtype=torch.float64).reshape(-1, 3).cpu().numpy()
    pb = torch.as_tensor(pb, dtype=torch.float64).reshape(-1, 3).cpu().numpy()
    if len(pa) == 0 or len(pb) == 0:
        return (0.0, 1.0) if len(pa) == len(pb) else (EMPTY_CHAMFER, 0.0)
    # exact nearest neighbours (k-d trees: O(P log Q) instead of the P x Q distance matrix); 0 for equal points
    ab, ba = cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]
    precision = float((ab <= threshold).mean())
    recall = float((ba <= threshold).mean())
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float((ab.mean() + ba.mean()) / 2), float(f)


def coverage_mmd(d: Tensor) -> tuple[float, float]:
    """(COV, MMD) from a distance matrix d [n_ref, n_gen] (lower distance = more similar)."""
    d = torch.as_tensor(d, dtype=torch.float64)
    nearest_ref = d.argmin(0)                                             # for each generated shape
    cov = torch.unique(nearest_ref).numel() / d.shape[0]
    mmd = d.min(1).values.mean().item()
    return float(cov), float(mmd)


def grouped_coverage_mmd(d_blocks: list[Tensor]) -> tuple[float, float]:
    """COV / MMD of class-conditional generation: per-class blocks d_c [n_ref_c, n_gen_c], pooled over refs."""
    covered = total = 0
    mmd_sum = 0.0
    for d in d_blocks:
        cov, mmd = coverage_mmd(d)
        covered += cov * d.shape[0]
        mmd_sum += mmd * d.shape[0]
        total += d.shape[0]
    return covered / total, mmd_sum / total


class OccupancyFeatureNet(nn.Module):
    """Fixed random 3-D conv net: occupancy [N, R, R, R] -> features [N, 2 * sum(channels)] (no training).

    Three stride-2 3x3x3 convolutions with leaky ReLU (Kaiming-normal weights from `seed`); after each layer the
    spatial mean and standard deviation of every channel are features. The input is occupancy mapped to {-1, 1}.
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32), seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers, cin = [], 1
        for c in channels:
            conv = nn.Conv3d(cin, c, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * np.sqrt(2.0 / (cin * 27)))
                conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=g))
            layers.append(conv)
            cin = c
        self.layers = nn.ModuleList(layers)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, occ: Tensor, batch: int = 64) -> Tensor:
        feats = []
        for i in range(0, occ.shape[0], batch):
            h = occ[i:i + batch].float().unsqueeze(1) * 2 - 1
            f = []
            for conv in self.layers:
                h = F.leaky_relu(conv(h), 0.2)
                flat = h.flatten(2)
                f += [flat.mean(2), flat.std(2)]
            feats.append(torch.cat(f, 1))
        return torch.cat(feats).double()
