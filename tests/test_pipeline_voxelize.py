"""Surface voxelisation: exact against analytic primitives, brute-force checks on triangle soups, the stage."""
from __future__ import annotations

import numpy as np
import pytest
import trimesh

from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.rows import unpack_array
from pipelines.preprocess.synthetic_meshes import box_mesh, box_surface_voxels, sphere_surface_voxels, synthetic_mesh
from pipelines.preprocess.voxelize import (Voxelize, mesh_from_ply, mesh_to_ply, occupancy_grid, voxel_centres,
                                voxelize_mesh)


def _grid(idx, r=64):
    return occupancy_grid(idx, r).astype(bool)


@pytest.mark.parametrize("lo,hi", [
    ([-0.3013, -0.2171, -0.4457], [0.2219, 0.3347, 0.3711]),
    ([-0.1, -0.1, -0.1], [0.1, 0.1, 0.1]),          # box faces exactly on grid planes: both sides count
    ([0.0031, -0.49, -0.0077], [0.0092, 0.49, 0.4]),  # thin slab inside one voxel layer
])
def test_axis_aligned_box_matches_analytic(lo, hi):
    v, f = box_mesh(lo, hi)
    got = _grid(voxelize_mesh(v, f))
    ref = box_surface_voxels(lo, hi)
    assert (got == ref).all(), f"{(got != ref).sum()} voxels differ"


def test_sphere_between_sure_and_maybe_sets():
    c, r = np.array([0.031, -0.017, 0.0123]), 0.37
    s = trimesh.creation.icosphere(subdivisions=5, radius=r)
    s.apply_translation(c)
    got = _grid(voxelize_mesh(s.vertices, s.faces))
    # the inscribed polygonal sphere lies between radius r - m and r
    m = r - np.linalg.norm(s.triangles_center - c, axis=1).min() + 1e-9
    sure = sphere_surface_voxels(c, r, margin=m, mode="sure")
    maybe = sphere_surface_voxels(c, r, margin=m, mode="maybe")
    assert (sure <= got).all() and (got <= maybe).all()
    assert got.sum() > 8000


def _point_triangle_distance(p, a, b, c):
    """Distance from points p [M, 3] to the triangle abc: the minimum over the interior projection (when it
    falls inside) and the three edge segments."""
    n = np.cross(b - a, c - a)
    n = n / np.linalg.norm(n)
    d_plane = (p - a) @ n
    q = p - d_plane[:, None] * n  # projection onto the plane
    inside = np.ones(len(p), bool)
    for u, w in ((a, b), (b, c), (c, a)):
        inside &= np.cross(w - u, q - u) @ n >= 0
    best = np.where(inside, np.abs(d_plane), np.inf)
    for u, w in ((a, b), (b, c), (c, a)):
        t = np.clip((p - u) @ (w - u) / ((w - u) @ (w - u)), 0, 1)
        best = np.minimum(best, np.linalg.norm(p - (u + t[:, None] * (w - u)), axis=1))
    return best


def test_triangle_soup_against_brute_force():
    rng = np.random.default_rng(0)
    r = 16
    tris = rng.uniform(-0.5, 0.5, size=(25, 3, 3))
    tris[:5] *= 0.05  # a few tiny ones
    v, f = tris.reshape(-1, 3), np.arange(75).reshape(-1, 3)
    got = _grid(voxelize_mesh(v, f, resolution=r), r)
    # lower bound: voxels of dense surface samples
    pts = []
    for a, b, c in tris:
        u, w = rng.random((2, 4000))
        flip = u + w > 1
        u[flip], w[flip] = 1 - u[flip], 1 - w[flip]
        pts.append(a + u[:, None] * (b - a) + w[:, None] * (c - a))
    idx = np.clip(np.floor((np.concatenate(pts) + 0.5) * r).astype(int), 0, r - 1)
    assert got[idx[:, 0], idx[:, 1], idx[:, 2]].all()
    # upper bound: every occupied voxel has a triangle within its circumscribed sphere
    centres = voxel_centres(np.argwhere(got), r)
    best = np.full(len(centres), np.inf)
    for a, b, c in tris:
        best = np.minimum(best, _point_triangle_distance(centres, a, b, c))
    assert (best <= np.sqrt(3) / 2 / r + 1e-9).all()
    # and the voxels that contain the triangle fully inside their inscribed sphere are all found
    inside = np.argwhere(~got)
    if len(inside):
        c_out = voxel_centres(inside, r)
        best_out = np.full(len(c_out), np.inf)
        for a, b, c in tris:
            best_out = np.minimum(best_out, _point_triangle_distance(c_out, a, b, c))
        assert (best_out > 0.5 / r - 1e-9).all()


def test_clamp_open_and_out_of_range_meshes():
    # an open quad sticking out of the cube is clamped onto the boundary voxels
    v = np.array([[-0.7, -0.7, 0.2], [0.7, -0.7, 0.2], [0.7, 0.7, 0.2], [-0.7, 0.7, 0.2]])
    f = np.array([[0, 1, 2], [0, 2, 3]])
    idx = voxelize_mesh(v, f)
    assert idx.min() == 0 and idx.max() == 63
    assert set(np.unique(idx[:, 2])) == {44}  # z = 0.2 -> (0.7 * 64) = 44.8
    assert len(idx) == 64 * 64
    assert len(voxelize_mesh(np.zeros((0, 3)), np.zeros((0, 3), int))) == 0


def test_ply_roundtrip():
    mesh = synthetic_mesh(2)
    v, f = mesh_from_ply(mesh_to_ply(mesh.vertices, mesh.faces))
    assert np.allclose(v, mesh.vertices, atol=1e-5) and (f == mesh.faces).all()
    # a PLY from another writer goes through trimesh
    other = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).export(file_type="ply", encoding="ascii")
    v2, f2 = mesh_from_ply(other)
    assert np.allclose(v2, mesh.vertices, atol=1e-5) and len(f2) == len(mesh.faces)


def test_voxelize_stage_rows():
    mesh = synthetic_mesh(5)
    v = (mesh.vertices - mesh.bounds.mean(0)) / np.ptp(mesh.bounds, axis=0).max()
    stage = Voxelize(PreprocessConfig())
    row = stage({"sha256": "x", "error": None, "mesh_ply": mesh_to_ply(v, mesh.faces)})
    assert row.get("error") is None
    coords = unpack_array(row["voxel_coords"])
    assert coords.dtype == np.uint8 and coords.shape == (row["num_voxels"], 3)
    assert (_grid(coords) == _grid(voxelize_mesh(v, mesh.faces))).all()
    bad = stage({"sha256": "y", "error": None, "mesh_ply": mesh_to_ply(np.zeros((3, 3)), np.zeros((0, 3), int))})
    assert bad["error"] == "voxelize: mesh has no faces"
