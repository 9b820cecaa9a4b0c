"""Meshes as GLB (vertex colours, Y-up) and the coarse voxel mesh of a sparse-structure occupancy."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .flexicubes import MeshData
from .ply import Z_UP_TO_Y_UP

# Unit-cube face quads per direction (+x, −x, +y, −y, +z, −z): corner offsets, counter-clockwise from outside.
_FACE_QUADS = {
    (1, 0, 0): ((1, 0, 0), (1, 1, 0), (1, 1, 1), (1, 0, 1)),
    (-1, 0, 0): ((0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0)),
    (0, 1, 0): ((0, 1, 0), (0, 1, 1), (1, 1, 1), (1, 1, 0)),
    (0, -1, 0): ((0, 0, 0), (1, 0, 0), (1, 0, 1), (0, 0, 1)),
    (0, 0, 1): ((0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1)),
    (0, 0, -1): ((0, 0, 0), (0, 1, 0), (1, 1, 0), (1, 0, 0)),
}
_FACE_SHADE = {(1, 0, 0): 0.8, (-1, 0, 0): 0.6, (0, 1, 0): 0.75, (0, -1, 0): 0.55, (0, 0, 1): 1.0, (0, 0, -1): 0.4}


def vertex_colors(mesh: MeshData) -> np.ndarray:
    """uint8 [V, 4] RGBA: the first three attribute channels clamped to [0, 1] (TRELLIS's colour channels),
    light grey when the mesh has none."""
    v = mesh.vertices.shape[0]
    if mesh.attributes is None or mesh.attributes.shape[1] < 3:
        rgb = np.full((v, 3), 0.7, np.float32)
    else:
        rgb = mesh.attributes[:, :3].detach().float().clamp(0, 1).cpu().numpy()
    rgba = np.concatenate([rgb, np.ones((v, 1), np.float32)], 1)
    return np.round(rgba * 255).astype(np.uint8)


def write_glb(path: str | os.PathLike, mesh: MeshData, colors: np.ndarray | None = None) -> Path:
    """Mesh in TRELLIS's Z-up frame -> GLB (Y-up, as glTF specifies) with per-vertex colours."""
    import trimesh  # heavy: trimesh, scipy

    verts = (mesh.vertices.detach().float().cpu() @ Z_UP_TO_Y_UP.T).numpy()
    faces = mesh.faces.detach().cpu().numpy().astype(np.int64)
    tm = trimesh.Trimesh(vertices=verts, faces=faces, vertex_colors=vertex_colors(mesh) if colors is None
                         else colors, process=False)
    path = Path(path)
    path.write_bytes(tm.export(file_type="glb"))
    return path


def occupancy_mesh(coords: Tensor, resolution: int) -> MeshData:
    """Boxes of occupied voxels (coords [N, 3] on a `resolution`³ grid) -> the faces between occupied and empty
    voxels, in [−0.5, 0.5]³, with a grey shade per face direction as attribute (so the shape reads without
    lighting). Each face has its own 4 vertices (flat shading)."""
    coords = coords.long().cpu()
    occ = torch.zeros((resolution + 2,) * 3, dtype=torch.bool)
    occ[coords[:, 0] + 1, coords[:, 1] + 1, coords[:, 2] + 1] = True
    verts, faces, shades, base = [], [], [], 0
    for d, quad in _FACE_QUADS.items():
        nb = occ.roll(shifts=(-d[0], -d[1], -d[2]), dims=(0, 1, 2))
        exposed = torch.nonzero(occ & ~nb) - 1                          # [K, 3] voxel coords
        if not len(exposed):
            continue
        corners = exposed.unsqueeze(1) + torch.tensor(quad).unsqueeze(0)   # [K, 4, 3]
        k = exposed.shape[0]
        verts.append(corners.reshape(-1, 3))
        idx = base + torch.arange(k).unsqueeze(1) * 4
        faces.append(torch.cat([idx + torch.tensor([0, 1, 2]), idx + torch.tensor([0, 2, 3])], 0))
        shades.append(torch.full((k * 4, 1), _FACE_SHADE[d]))
        base += k * 4
    if not verts:
        return MeshData(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3))
    v = torch.cat(verts).float() / resolution - 0.5
    shade = torch.cat(shades)
    colour = shade * torch.tensor([0.55, 0.7, 0.9])
    return MeshData(v, torch.cat(faces), colour)


def sample_surface(mesh: MeshData, n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """n area-weighted random points on the mesh: (points [n, 3], normals [n, 3], colours [n, 3] in [0, 1])."""
    v, f = mesh.vertices.detach().float().cpu(), mesh.faces.cpu()
    if f.shape[0] == 0:
        z = torch.zeros(0, 3)
        return z, z, z
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    cross = torch.linalg.cross(b - a, c - a)
    area = cross.norm(dim=1)
    g = torch.Generator().manual_seed(seed)
    probs = area / area.sum() if float(area.sum()) > 0 else torch.full_like(area, 1.0 / len(area))
    tri = torch.multinomial(probs, n, replacement=True, generator=g)
    r1, r2 = torch.rand(n, generator=g), torch.rand(n, generator=g)
    s1 = r1.sqrt()
    w = torch.stack([1 - s1, s1 * (1 - r2), s1 * r2], 1)                   # uniform barycentrics
    pts = w[:, :1] * a[tri] + w[:, 1:2] * b[tri] + w[:, 2:] * c[tri]
    normals = cross[tri] / area[tri].clamp(min=1e-12).unsqueeze(1)
    if mesh.attributes is not None and mesh.attributes.shape[1] >= 3:
        attr = mesh.attributes.detach().float().cpu()[:, :3]
        col = (w[:, :1] * attr[f[tri, 0]] + w[:, 1:2] * attr[f[tri, 1]] + w[:, 2:] * attr[f[tri, 2]]).clamp(0, 1)
    else:
        col = torch.full((n, 3), 0.7)
    return pts, normals, col
