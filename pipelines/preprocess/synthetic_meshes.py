"""Offline procedural test assets, deterministic by seed.

`synthetic_mesh_glb(seed)` returns the bytes of a small GLB (glTF binary, Y-up like every glTF file): one to
four primitives (box, sphere, cylinder, cone, torus, capsule) with a random pose, anisotropic scale and a
random overall size and placement, coloured either with smooth per-vertex colours (glTF COLOR_0) or with a
small embedded base-colour texture. The same seed always gives the same bytes. These stand in for downloaded
assets in tests and in the CPU demo (no network).

The analytic helpers at the end (`box_mesh`, `box_surface_voxels`, `sphere_surface_voxels`) give exact
reference voxelisations for the voxelisation tests. Grid convention (same as `pipelines.preprocess.voxelize`): the
cube [-0.5, 0.5]^3 split into R^3 voxels, voxel i spanning the closed interval [i/R - 0.5, (i+1)/R - 0.5].
"""
from __future__ import annotations

import io

import numpy as np
import trimesh
from PIL import Image

FAMILIES = ("box", "sphere", "cylinder", "cone", "torus", "capsule")


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random rotation (3x3) from a unit quaternion."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _primitive(family: str, rng: np.random.Generator) -> trimesh.Trimesh:
    if family == "box":
        return trimesh.creation.box(extents=rng.uniform(0.4, 1.0, size=3))
    if family == "sphere":
        return trimesh.creation.icosphere(subdivisions=3, radius=rng.uniform(0.3, 0.5))
    if family == "cylinder":
        return trimesh.creation.cylinder(radius=rng.uniform(0.15, 0.4), height=rng.uniform(0.4, 1.0), sections=32)
    if family == "cone":
        return trimesh.creation.cone(radius=rng.uniform(0.2, 0.45), height=rng.uniform(0.4, 1.0), sections=32)
    if family == "torus":
        major = rng.uniform(0.25, 0.4)
        return trimesh.creation.torus(major_radius=major, minor_radius=rng.uniform(0.05, 0.45) * major,
                                      major_sections=32, minor_sections=16)
    if family == "capsule":
        return trimesh.creation.capsule(height=rng.uniform(0.2, 0.6), radius=rng.uniform(0.1, 0.3), count=[16, 16])
    raise ValueError(f"unknown primitive family {family!r}")


def _vertex_colours(mesh: trimesh.Trimesh, rng: np.random.Generator) -> np.ndarray:
    """Smooth colours: a random base colour modulated by a random low-frequency wave over the vertices."""
    base = rng.uniform(0.15, 0.95, size=3)
    freq = rng.normal(size=(3, 3)) * 4.0
    phase = rng.uniform(0, 2 * np.pi, size=3)
    wave = np.sin(mesh.vertices @ freq + phase)  # [V, 3]
    rgb = np.clip(base + 0.3 * wave, 0.0, 1.0)
    rgba = np.concatenate([rgb, np.ones((len(rgb), 1))], axis=1)
    return np.round(rgba * 255).astype(np.uint8)


def _texture_image(rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A small checker of two random colours with per-texel noise."""
    cells = int(rng.integers(2, 9))
    c0, c1 = rng.uniform(0.1, 1.0, size=(2, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    checker = ((xx * cells // size + yy * cells // size) % 2)[..., None]
    img = np.where(checker == 1, c1, c0) + rng.normal(scale=0.04, size=(size, size, 3))
    return Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), mode="RGB")


def _textured(mesh: trimesh.Trimesh, rng: np.random.Generator) -> trimesh.Trimesh:
    """Give the mesh per-corner UVs from a tri-planar projection (the face normal's dominant axis picks the
    plane) and an embedded checker texture."""
    faces = mesh.faces
    verts = mesh.vertices[faces].reshape(-1, 3)  # unmerged: one vertex per face corner
    axis = np.abs(mesh.face_normals).argmax(axis=1).repeat(3)
    keep = np.array([[1, 2], [0, 2], [0, 1]])[axis]  # drop the dominant axis
    uv = np.take_along_axis(verts, keep, axis=1)
    uv = (uv - uv.min(axis=0)) / max(float(np.ptp(uv, axis=0).max()), 1e-9)
    out = trimesh.Trimesh(vertices=verts, faces=np.arange(len(verts)).reshape(-1, 3), process=False)
    material = trimesh.visual.material.PBRMaterial(
        baseColorTexture=_texture_image(rng), metallicFactor=0.0, roughnessFactor=float(rng.uniform(0.4, 1.0)))
    out.visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return out


def synthetic_scene(seed: int) -> trimesh.Scene:
    """The trimesh scene behind `synthetic_mesh_glb(seed)` (glTF frame: Y up)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    n_parts = int(rng.choice([1, 1, 2, 3, 4]))
    textured = bool(rng.random() < 0.4)
    size = float(np.exp(rng.uniform(np.log(0.05), np.log(20.0))))  # overall scale, tests normalisation
    centre = rng.normal(scale=size, size=3)
    scene = trimesh.Scene()
    for k in range(n_parts):
        family = FAMILIES[int(rng.integers(len(FAMILIES)))]
        mesh = _primitive(family, rng)
        mesh.apply_scale(rng.uniform(0.5, 1.5, size=3))  # anisotropic
        mesh = _textured(mesh, rng) if textured else mesh
        if not textured:
            mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=_vertex_colours(mesh, rng))
        pose = np.eye(4)
        pose[:3, :3] = _random_rotation(rng) * size
        pose[:3, 3] = centre + (rng.normal(scale=0.35 * size, size=3) if k else 0.0)
        scene.add_geometry(mesh, geom_name=f"part{k}_{family}", node_name=f"part{k}", transform=pose)
    return scene


def synthetic_mesh_glb(seed: int) -> bytes:
    """GLB bytes of a procedural coloured or textured asset; deterministic in `seed`."""
    data = synthetic_scene(seed).export(file_type="glb")
    return bytes(data)


def synthetic_mesh(seed: int) -> trimesh.Trimesh:
    """The asset of `synthetic_mesh_glb(seed)` as one mesh in world coordinates (glTF frame)."""
    return trimesh.load(io.BytesIO(synthetic_mesh_glb(seed)), file_type="glb", force="mesh")


# ---------------------------------------------------------------------------------------------------------
# Analytic primitives for voxelisation tests
# ---------------------------------------------------------------------------------------------------------

def box_mesh(lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """Closed triangle mesh (12 triangles) of the axis-aligned box [lo, hi]: (vertices [8, 3], faces [12, 3])."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    corners = np.array([[(hi if (i >> a) & 1 else lo)[a] for a in range(3)] for i in range(8)])
    quads = [(0, 2, 6, 4), (1, 5, 7, 3), (0, 4, 5, 1), (2, 3, 7, 6), (0, 1, 3, 2), (4, 6, 7, 5)]
    faces = np.array([[a, c, b] for a, b, c, d in quads] + [[a, d, c] for a, b, c, d in quads])  # outward
    return corners, faces


def _voxel_bounds(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(resolution)
    return i / resolution - 0.5, (i + 1) / resolution - 0.5


def box_surface_voxels(lo, hi, resolution: int = 64) -> np.ndarray:
    """Exact set of voxels whose closed cube meets the surface of the box [lo, hi]: bool [R, R, R]."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    v0, v1 = _voxel_bounds(resolution)
    overlap = [(v1 >= lo[a]) & (v0 <= hi[a]) for a in range(3)]  # voxel interval meets [lo, hi] on axis a
    out = np.zeros((resolution,) * 3, bool)
    for a in range(3):
        others = [b for b in range(3) if b != a]
        for plane in (lo[a], hi[a]):
            hit = [None, None, None]
            hit[a] = (v0 <= plane) & (plane <= v1)
            hit[others[0]], hit[others[1]] = overlap[others[0]], overlap[others[1]]
            out |= hit[0][:, None, None] & hit[1][None, :, None] & hit[2][None, None, :]
    return out


def sphere_surface_voxels(centre, radius: float, resolution: int = 64, margin: float = 0.0,
                          mode: str = "maybe") -> np.ndarray:
    """Voxels meeting the sphere |p - centre| = r, bool [R, R, R].

    With margin m the surface is only known to lie between radii r - m and r (an inscribed polygonal sphere):
    `mode="maybe"` gives the voxels that could meet such a surface (distance range overlaps [r - m, r]);
    `mode="sure"` those that must (the voxel reaches inside r - m and outside r, so a closed surface between the
    two radii crosses it). With m = 0 both give the exact voxelisation of the sphere.
    """
    c = np.asarray(centre, float)
    v0, v1 = _voxel_bounds(resolution)
    near2 = np.zeros((resolution,) * 3)
    far2 = np.zeros((resolution,) * 3)
    for a in range(3):
        shape = [1, 1, 1]
        shape[a] = resolution
        near = np.clip(c[a], v0, v1) - c[a]
        far = np.maximum(np.abs(v0 - c[a]), np.abs(v1 - c[a]))
        near2 = near2 + (near ** 2).reshape(shape)
        far2 = far2 + (far ** 2).reshape(shape)
    dmin, dmax = np.sqrt(near2), np.sqrt(far2)
    if mode == "maybe":
        return (dmin <= radius) & (dmax >= radius - margin)
    if mode == "sure":
        return (dmin < radius - margin) & (dmax > radius)
    raise ValueError(mode)
