"""Snapshot grids for training runs: teacher (many Euler steps) vs student (1/2/4 steps) from the same noise and
condition, decoded and rendered to one PNG.

* SS stage: latent [B, 8, 16, 16, 16] -> SS decoder (TRELLIS `SparseStructureDecoder`, logits [B, 1, 64³]) or
  an `OccupancyProbe` (see below) -> occupancy (logits > 0, reference 3.5) -> `render_voxels` (numpy
  orthographic z-buffer with depth-gradient shading; no OpenGL). Without any decoder the latent's channel-RMS
  map above its median is shown as a coarse "latent occupancy" (a view of the latent, not a shape).
* SLat stage: the voxels of the sample's coordinates coloured by a fixed projection of their 8 latent channels.

The SS decoders (TRELLIS's, or the demo's `OccupancyProbe`) and `load_decoder` are in `mdt.models.occupancy_probe`.
"""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mdt.distill import student_sample
from mdt.flow import FlowEulerSampler
from mdt.models.occupancy_probe import OccupancyProbe, fit_occupancy_probe, load_decoder  # noqa: F401 (re-exported)

# ------------------------------------------------------------------------------------------------- decoders


def occupancy_grid(coords: np.ndarray | Tensor, resolution: int = 16, source_resolution: int = 64) -> Tensor:
    """64³ voxel indices [N, 3] -> bool occupancy [R, R, R] (a cell is occupied if any of its voxels is)."""
    c = torch.as_tensor(np.array(coords), dtype=torch.long).reshape(-1, 3) * resolution // source_resolution
    occ = torch.zeros((resolution,) * 3, dtype=torch.bool)
    occ[c[:, 0], c[:, 1], c[:, 2]] = True
    return occ


@torch.no_grad()
def decode_occupancy(decoder: nn.Module | None, z: Tensor) -> Tensor:
    """SS latents [B, C, R, R, R] -> bool occupancy [B, R', R', R'] (decoder logits > 0; reference 3.5).
    Without a decoder: cells whose channel-RMS exceeds the sample's 75th percentile (a latent view)."""
    if decoder is None:
        e = z.float().pow(2).mean(1).sqrt()
        thr = torch.quantile(e.flatten(1), 0.75, dim=1).view(-1, 1, 1, 1)
        return e > thr
    p = next(decoder.parameters())
    logits = decoder(z.to(p.device, p.dtype))
    return (logits[:, 0] > 0).cpu()


# ------------------------------------------------------------------------------------------------- rendering


def _rotation(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    a, e = math.radians(azimuth_deg), math.radians(elevation_deg)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(e), -math.sin(e)], [0, math.sin(e), math.cos(e)]])
    return rx @ rz


def render_points(centres: np.ndarray, colours: np.ndarray, resolution: int, size: int = 96,
                  azimuth: float = 45.0, elevation: float = -60.0) -> np.ndarray:
    """Orthographic z-buffer splatting of voxel centres (grid units, [N, 3]) with per-voxel RGB in [0, 1] and
    depth-gradient shading -> uint8 [size, size, 3] on white."""
    img = np.ones((size, size, 3), np.float32)
    if len(centres) == 0:
        return (img * 255).astype(np.uint8)
    p = (np.asarray(centres, np.float64) + 0.5) / resolution - 0.5          # [-0.5, 0.5]^3, z up
    q = p @ _rotation(azimuth, elevation).T
    scale = size / 1.8
    u = q[:, 0] * scale + size / 2
    v = -q[:, 1] * scale + size / 2
    depth = q[:, 2]
    k = max(1, int(math.ceil(scale / resolution * 1.2)))
    order = np.argsort(-depth)                                               # far first; near ones overwrite
    zbuf = np.full((size, size), np.inf)
    cbuf = np.ones((size, size, 3), np.float32)
    for dx in range(k):
        for dy in range(k):
            x = np.clip((u[order] - k / 2 + dx).astype(int), 0, size - 1)
            y = np.clip((v[order] - k / 2 + dy).astype(int), 0, size - 1)
            d = depth[order]
            closer = d <= zbuf[y, x]
            # last-write-wins on duplicates in far->near order leaves the nearest voxel
            zbuf[y[closer], x[closer]] = d[closer]
            cbuf[y[closer], x[closer]] = np.asarray(colours, np.float32)[order][closer]
    mask = np.isfinite(zbuf)
    if mask.any():
        zf = np.where(mask, zbuf, np.nanmax(np.where(mask, zbuf, np.nan)))
        gy, gx = np.gradient(zf * scale)
        n = np.stack([-gx, -gy, np.ones_like(zf)], -1)
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        light = np.array([0.4, -0.5, 0.77])
        light /= np.linalg.norm(light)
        shade = np.clip(n @ light, 0, 1) * 0.6 + 0.4
        dmin, dmax = zbuf[mask].min(), zbuf[mask].max()
        fog = 1 - 0.25 * (zf - dmin) / max(dmax - dmin, 1e-6)
        img[mask] = cbuf[mask] * (shade * fog)[mask, None]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def render_voxels(occ: np.ndarray | Tensor, size: int = 96, colour: Sequence[float] = (0.35, 0.55, 0.85),
                  **view) -> np.ndarray:
    """bool occupancy [R, R, R] -> uint8 image [size, size, 3]."""
    occ = np.asarray(occ.cpu() if isinstance(occ, Tensor) else occ, bool)
    idx = np.argwhere(occ)
    cols = np.tile(np.asarray(colour, np.float32), (len(idx), 1))
    return render_points(idx, cols, occ.shape[0], size, **view)


def feature_colours(feats: np.ndarray | Tensor, seed: int = 0) -> np.ndarray:
    """[N, C] latent features -> RGB in [0, 1] through a fixed random projection + sigmoid."""
    f = np.asarray(feats.detach().float().cpu() if isinstance(feats, Tensor) else feats, np.float64)
    w = np.random.default_rng(seed).standard_normal((f.shape[1], 3)) / math.sqrt(f.shape[1])
    return 1 / (1 + np.exp(-(f @ w) * 1.5))


def render_sparse_sample(coords: np.ndarray | Tensor, feats: np.ndarray | Tensor, resolution: int = 64,
                         size: int = 96, **view) -> np.ndarray:
    c = np.asarray(coords.cpu() if isinstance(coords, Tensor) else coords)
    return render_points(c[:, -3:], feature_colours(feats), resolution, size, **view)


def image_grid(cells: list[list[np.ndarray]], row_titles: Sequence[str], col_titles: Sequence[str],
               title: str | None = None) -> bytes:
    """rows x cols of uint8 images -> PNG bytes (matplotlib, Agg)."""
    import matplotlib  # heavy: matplotlib, PIL

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # heavy: matplotlib, PIL

    rows, cols = len(cells), max(len(r) for r in cells)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 0.6, 1.6 * rows + 0.5), squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < len(cells[i]):
                ax.imshow(cells[i][j])
            if i == 0 and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=8)
            if j == 0 and i < len(row_titles):
                ax.set_ylabel(row_titles[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def snapshot_samples(teacher: nn.Module | None, student: nn.Module, noise: Any, cond: Tensor,
                     teacher_steps: int = 25, student_steps: Sequence[int] = (1, 2, 4), cfg_strength: float = 0.0,
                     teacher_samples: Any = None) -> dict[str, Any]:
    """{"teacher 25": ..., "student 1": ..., ...} from the same noise and condition (dense or SparseTensor).

    Teacher: TRELLIS Euler sampler with CFG (rescale_t 1, no interval, as MDT-dist snapshots); student: uniform
    Euler grid (`mdt.distill.student_sample`) with the same CFG. `teacher_samples` reuses a cached teacher run."""
    out: dict[str, Any] = {}
    neg = torch.zeros_like(cond)
    if teacher is not None:
        out[f"teacher {teacher_steps}"] = teacher_samples if teacher_samples is not None else FlowEulerSampler().sample(
            teacher, noise, cond, neg, steps=teacher_steps, cfg_strength=cfg_strength)
    was_training = student.training
    student.eval()
    try:
        for s in student_steps:
            out[f"student {s}"] = student_sample(student, noise, cond, steps=int(s), neg_cond=neg,
                                                 cfg_strength=cfg_strength)
    finally:
        student.train(was_training)
    return out


def render_column(samples: Any, decoder: nn.Module | None, size: int) -> list[np.ndarray]:
    """One rendered image per sample of a batch (dense SS latents or a SparseTensor)."""
    if hasattr(samples, "feats") and hasattr(samples, "coords"):
        imgs = []
        for sl in samples.layout:
            imgs.append(render_sparse_sample(samples.coords[sl], samples.feats[sl], size=size))
        return imgs
    occ = decode_occupancy(decoder, samples)
    return [render_voxels(o, size=size) for o in occ]


def snapshot_png(columns: dict[str, Any], decoder: nn.Module | None = None, size: int = 96,
                 title: str | None = None, reference: Any = None) -> bytes:
    """Rows = conditions, columns = ("data",) + samplers -> PNG bytes."""
    cols = dict(columns)
    if reference is not None:
        cols = {"data": reference, **cols}
    rendered = {k: render_column(v, decoder, size) for k, v in cols.items()}
    n = max(len(v) for v in rendered.values())
    cells = [[rendered[k][i] for k in rendered] for i in range(n)]
    return image_grid(cells, [f"cond {i}" for i in range(n)], list(rendered), title)
