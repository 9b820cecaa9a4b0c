"""Surface voxelisation of the normalised mesh (TRELLIS data toolkit step 2), without Open3D.

The mesh comes from the render stage, already normalised into [-0.5, 0.5]^3 (Blender world frame, Z up).
Vertices are clamped to [-0.5 + 1e-6, 0.5 - 1e-6]; the cube is split into R^3 voxels of size 1/R (R = 64)
and a voxel is occupied when its closed cube meets at least one triangle. The test is exact: every triangle
is first split (4-way, at edge midpoints) until no edge is longer than two voxels, which leaves a small
candidate box of at most 4^3 voxels around each piece; each candidate is then checked with the
separating-axis theorem (3 box axes, the triangle normal, the 9 edge x box-axis products) in float64.
Splitting does not change the set of points covered, so the result is the voxelisation of the original
triangles. Open, multi-part and degenerate meshes need no special handling.

Voxel centres are `(idx + 0.5) / R - 0.5`; indices come back sorted (x, then y, then z).
"""
from __future__ import annotations

import io

import numpy as np
from pipelines.preprocess.rows import fail, pack_array

RESOLUTION = 64
CLAMP_EPS = 1e-6
_MAX_EDGE = 2.0  # longest edge (in voxels) after splitting
_OFFSETS = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)  # [64, 3]


def _split_long_triangles(tris: np.ndarray, max_edge: float) -> np.ndarray:
    """4-way midpoint subdivision of triangles [T, 3, 3] until every edge is at most max_edge long."""
    done = []
    while len(tris):
        e = np.stack([tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 1], tris[:, 0] - tris[:, 2]], axis=1)
        long = (np.einsum("tij,tij->ti", e, e).max(axis=1) > max_edge * max_edge)
        done.append(tris[~long])
        t = tris[long]
        if not len(t):
            break
        a, b, c = t[:, 0], t[:, 1], t[:, 2]
        ab, bc, ca = (a + b) / 2, (b + c) / 2, (c + a) / 2
        tris = np.concatenate([np.stack(x, axis=1) for x in
                               ((a, ab, ca), (ab, b, bc), (ca, bc, c), (ab, bc, ca))])
    return np.concatenate(done) if done else np.zeros((0, 3, 3))


def _triangle_box_overlap(v: np.ndarray, half: float) -> np.ndarray:
    """Separating-axis test of triangles v [M, 3, 3] (already relative to the box centres) against cubes of
    half size `half` centred at the origin. Closed sets: touching counts as overlap. Returns bool [M]."""
    ok = np.ones(len(v), bool)
    # 1) box face normals (the candidate generation guarantees this up to rounding; cheap to re-check)
    ok &= (v.min(axis=1) <= half).all(axis=1) & (v.max(axis=1) >= -half).all(axis=1)
    edges = np.stack([v[:, 1] - v[:, 0], v[:, 2] - v[:, 1], v[:, 0] - v[:, 2]], axis=1)  # [M, 3, 3]
    # 2) the triangle's plane
    n = np.cross(edges[:, 0], edges[:, 1])
    d = np.einsum("mi,mi->m", n, v[:, 0])
    ok &= np.abs(d) <= half * np.abs(n).sum(axis=1) * (1 + 1e-12) + 1e-15
    # 3) edge x box-axis products; axis e_i x edge_j
    for i in range(3):
        unit = np.zeros(3)
        unit[i] = 1.0
        for j in range(3):
            axis = np.cross(unit, edges[:, j])  # [M, 3]
            p = np.einsum("mki,mi->mk", v, axis)  # [M, 3]
            r = half * np.abs(axis).sum(axis=1) * (1 + 1e-12) + 1e-15
            ok &= (p.min(axis=1) <= r) & (p.max(axis=1) >= -r)
    return ok


def voxelize_mesh(vertices: np.ndarray, faces: np.ndarray, resolution: int = RESOLUTION,
                  clamp_eps: float = CLAMP_EPS, chunk: int = 1 << 19) -> np.ndarray:
    """Indices (int64 [N, 3], sorted) of the voxels of the [-0.5, 0.5]^3 grid that the triangles intersect."""
    vertices = np.asarray(vertices, np.float64).reshape(-1, 3)
    faces = np.asarray(faces, np.int64).reshape(-1, 3)
    if not len(faces):
        return np.zeros((0, 3), np.int64)
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise ValueError("face index out of range")
    v = np.clip(vertices, -0.5 + clamp_eps, 0.5 - clamp_eps)
    g = (v + 0.5) * resolution  # grid units: voxel i spans [i, i + 1]
    tris = g[faces]
    tris = tris[np.isfinite(tris).all(axis=(1, 2))]
    occ = np.zeros((resolution,) * 3, bool)
    per = max(1, chunk // len(_OFFSETS))
    for s in range(0, len(tris), per):
        piece = _split_long_triangles(tris[s:s + per], _MAX_EDGE)
        for t in range(0, len(piece), per):
            tri = piece[t:t + per]
            lo = np.clip(np.ceil(tri.min(axis=1)).astype(np.int64) - 1, 0, resolution - 1)  # closed: touching
            hi = np.clip(np.floor(tri.max(axis=1)).astype(np.int64), 0, resolution - 1)
            cand = lo[:, None, :] + _OFFSETS[None]  # [T, 64, 3]
            valid = (cand <= hi[:, None, :]).all(axis=2)
            ti, oi = np.nonzero(valid)
            idx = cand[ti, oi]  # [M, 3]
            # skip voxels already known to be occupied
            fresh = ~occ[idx[:, 0], idx[:, 1], idx[:, 2]]
            ti, idx = ti[fresh], idx[fresh]
            if not len(idx):
                continue
            rel = tri[ti] - (idx + 0.5)[:, None, :]
            hit = _triangle_box_overlap(rel, 0.5)
            h = idx[hit]
            occ[h[:, 0], h[:, 1], h[:, 2]] = True
    return np.argwhere(occ)


def voxel_centres(indices: np.ndarray, resolution: int = RESOLUTION) -> np.ndarray:
    """Centres (float32 [N, 3]) of voxels given by integer indices."""
    return ((np.asarray(indices, np.float64) + 0.5) / resolution - 0.5).astype(np.float32)


def occupancy_grid(indices: np.ndarray, resolution: int = RESOLUTION) -> np.ndarray:
    """Dense float32 [R, R, R] occupancy (1 at the given indices)."""
    grid = np.zeros((resolution,) * 3, np.float32)
    idx = np.asarray(indices, np.int64).reshape(-1, 3)
    grid[idx[:, 0], idx[:, 1], idx[:, 2]] = 1.0
    return grid


# ---------------------------------------------------------------------------------------------------------
# Binary PLY of a triangle mesh (the render stage's `mesh_ply`)
# ---------------------------------------------------------------------------------------------------------

def mesh_to_ply(vertices: np.ndarray, faces: np.ndarray) -> bytes:
    """Binary little-endian PLY: float32 x y z vertices, faces as uchar count + int32 indices."""
    v = np.ascontiguousarray(vertices, dtype="<f4").reshape(-1, 3)
    f = np.asarray(faces, np.int64).reshape(-1, 3)
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {len(v)}\nproperty float x\nproperty float y\nproperty float z\n"
              f"element face {len(f)}\nproperty list uchar int vertex_indices\nend_header\n").encode("ascii")
    rec = np.empty(len(f), dtype=[("n", "u1"), ("i", "<i4", (3,))])
    rec["n"] = 3
    rec["i"] = f
    return header + v.tobytes() + rec.tobytes()


def mesh_from_ply(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle PLY written by `mesh_to_ply` (fast path); other PLY files go through trimesh."""
    end = data.find(b"end_header\n")
    header = data[:end].decode("ascii", "replace").split("\n") if end >= 0 else []
    simple = ["ply", "format binary_little_endian 1.0", "property float x", "property float y",
              "property float z", "property list uchar int vertex_indices"]
    if end >= 0 and all(s in header for s in simple) and len(header) == 9:
        nv = int(header[2].split()[-1])
        nf = int(header[6].split()[-1])
        body = memoryview(data)[end + len(b"end_header\n"):]
        v = np.frombuffer(body[:nv * 12], dtype="<f4").reshape(nv, 3)
        rec = np.frombuffer(body[nv * 12:nv * 12 + nf * 13], dtype=[("n", "u1"), ("i", "<i4", (3,))])
        if len(rec) == nf and (rec["n"] == 3).all():
            return v.astype(np.float32), rec["i"].astype(np.int64)
    import trimesh  # heavy: trimesh, PIL

    mesh = trimesh.load(io.BytesIO(data), file_type="ply", force="mesh", process=False)
    return np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.int64)


# ---------------------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------------------

class Voxelize:
    """Row stage: `mesh_ply` -> `voxel_coords` (packed uint8 [N, 3]) and `num_voxels`."""

    name = "voxelize"
    outputs = ("voxel_coords", "num_voxels")
    drops = ("mesh_ply",)
    resources = {"num_cpus": 1}

    def __init__(self, cfg: "PreprocessConfig"):
        self.cfg = cfg.voxelize

    def __call__(self, row: dict) -> dict:
        data = row.get("mesh_ply")
        if not data:
            return fail(row, self.name, "no mesh from the render stage")
        vertices, faces = mesh_from_ply(data)
        if not len(faces):
            return fail(row, self.name, "mesh has no faces")
        idx = voxelize_mesh(vertices, faces, self.cfg.resolution, self.cfg.clamp_eps)
        if not len(idx):
            return fail(row, self.name, "no occupied voxels")
        dtype = np.uint8 if self.cfg.resolution <= 256 else np.int32
        row["voxel_coords"] = pack_array(idx.astype(dtype))
        row["num_voxels"] = int(len(idx))
        return row
