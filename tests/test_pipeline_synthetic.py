"""Procedural test assets: deterministic GLB bytes, variety, analytic reference voxelisations."""
from __future__ import annotations

import io

import numpy as np
import trimesh

from pipelines.preprocess.synthetic_meshes import (FAMILIES, box_mesh, box_surface_voxels, sphere_surface_voxels,
                                        synthetic_mesh, synthetic_mesh_glb, synthetic_scene)


def test_glb_bytes_are_deterministic_and_differ_between_seeds():
    a, b = synthetic_mesh_glb(7), synthetic_mesh_glb(7)
    assert a == b
    assert a[:4] == b"glTF"
    assert synthetic_mesh_glb(8) != a


def test_variety_of_families_colours_and_scales():
    families, textured, vertex_coloured, multi, sizes = set(), 0, 0, 0, []
    for seed in range(24):
        scene = trimesh.load(io.BytesIO(synthetic_mesh_glb(seed)), file_type="glb", force="scene")
        geoms = list(scene.geometry.values())
        assert geoms and all(len(g.faces) for g in geoms)
        families.update(name.split("_", 1)[1] for name in synthetic_scene(seed).geometry)
        multi += len(geoms) > 1
        for g in geoms:
            if isinstance(g.visual, trimesh.visual.TextureVisuals):
                assert g.visual.material.baseColorTexture is not None and g.visual.uv is not None
                textured += 1
            else:
                assert g.visual.kind == "vertex"
                vertex_coloured += 1
        sizes.append(float(np.ptp(scene.bounds, axis=0).max()))
    assert families == set(FAMILIES)
    assert textured and vertex_coloured and multi
    assert max(sizes) / min(sizes) > 20  # normalisation has something to do


def test_synthetic_mesh_matches_glb_geometry():
    mesh = synthetic_mesh(3)
    scene = trimesh.load(io.BytesIO(synthetic_mesh_glb(3)), file_type="glb", force="scene")
    assert np.allclose(mesh.bounds, scene.bounds)


def test_box_helpers_agree_with_point_sampling():
    lo, hi = np.array([-0.31, -0.07, -0.45]), np.array([0.12, 0.38, 0.21])
    v, f = box_mesh(lo, hi)
    mesh = trimesh.Trimesh(v, f, process=False)
    assert mesh.is_watertight and np.isclose(mesh.volume, np.prod(hi - lo))
    ref = box_surface_voxels(lo, hi, 64)
    pts = trimesh.sample.sample_surface(mesh, 60000, seed=0)[0]
    idx = np.floor((pts + 0.5) * 64).astype(int)
    assert ref[idx[:, 0], idx[:, 1], idx[:, 2]].all()  # every surface point lies in a reference voxel
    hit = np.zeros_like(ref)
    hit[idx[:, 0], idx[:, 1], idx[:, 2]] = True
    assert hit.sum() > 0.97 * ref.sum()  # and dense sampling finds (almost) all of them


def test_sphere_helper_sure_within_maybe():
    sure = sphere_surface_voxels([0.01, 0.0, -0.02], 0.3, margin=0.004, mode="sure")
    maybe = sphere_surface_voxels([0.01, 0.0, -0.02], 0.3, margin=0.004, mode="maybe")
    exact = sphere_surface_voxels([0.01, 0.0, -0.02], 0.3)
    assert (sure <= exact).all() and (exact <= maybe).all() and sure.sum() > 0.5 * maybe.sum()
