"""Encode stage (SS and SLat latents), and the chain voxelize -> features -> encode on rendered rows run as Ray
Data actor pools (through the job's StageRunner), compared with direct (non-Ray) computations written
independently here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mdt.conditioning import load_dinov2
from mdt.models.zoo import save_tiny_dinov2
from mdt.models import from_pretrained
from mdt.sparse import SparseTensor
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.encode import Encode
from mdt.models.zoo import save_tiny_encoders
from pipelines.preprocess.render import Render
from pipelines.preprocess.rows import pack_array, unpack_array
from pipelines.preprocess.synthetic_meshes import synthetic_mesh_glb
from pipelines.preprocess.voxelize import mesh_from_ply, voxelize_mesh
from test_pipeline_features import direct_voxel_features


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    ss, slat = save_tiny_encoders(d, feature_channels=64)
    dino = save_tiny_dinov2(d / "dino")
    return {"ss": ss, "slat": slat, "dino": str(dino)}


def direct_latents(ckpts, coords: np.ndarray, feats: np.ndarray):
    """Occupancy by a plain loop, the SLat input built by hand; both models freshly loaded."""
    ss_model, slat_model = from_pretrained(ckpts["ss"]), from_pretrained(ckpts["slat"])
    occ = torch.zeros(1, 1, 64, 64, 64)
    for x, y, z in coords.tolist():
        occ[0, 0, x, y, z] = 1
    with torch.no_grad():
        ss = ss_model(occ)[0]
        c = torch.tensor([[0, x, y, z] for x, y, z in coords.tolist()], dtype=torch.int32)
        out = slat_model(SparseTensor(torch.tensor(feats, dtype=torch.float32), c))
    assert torch.equal(out.coords, c)
    return ss.numpy(), out.feats.numpy()


def test_encode_shapes_and_direct(ckpts):
    rng = np.random.default_rng(0)
    coords = np.unique(rng.integers(0, 64, size=(700, 3)), axis=0).astype(np.uint8)
    feats = rng.standard_normal((len(coords), 64)).astype(np.float16)
    cfg = PreprocessConfig()
    cfg.encode.ss_encoder, cfg.encode.slat_encoder = ckpts["ss"], ckpts["slat"]
    stage = Encode(cfg)
    row = stage({"sha256": "x", "error": None, "voxel_coords": pack_array(coords), "voxel_feats": pack_array(feats)})
    assert row["error"] is None
    ss, slat_c, slat_f = (unpack_array(row[k]) for k in ("ss_latent", "slat_coords", "slat_feats"))
    assert ss.shape == (8, 16, 16, 16) and ss.dtype == np.float32
    assert slat_f.shape == (len(coords), 8) and slat_f.dtype == np.float32
    assert slat_c.dtype == np.uint8 and np.array_equal(slat_c, coords)
    ref_ss, ref_slat = direct_latents(ckpts, coords.astype(int), feats.astype(np.float32))
    assert np.allclose(ss, ref_ss, atol=1e-5) and np.abs(ss).max() > 1e-3
    assert np.allclose(slat_f, ref_slat, atol=1e-4) and np.abs(slat_f).max() > 1e-3
    bad = stage({"sha256": "y", "error": None, "voxel_coords": pack_array(coords), "voxel_feats": None})
    assert bad["error"] == "encode: features missing or not one per voxel"


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        # address="local": always a private instance, never a cluster someone else started on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.blender
def test_compute_chain_on_ray_equals_direct(ckpts, ray_local):
    import ray.data

    from pipelines.preprocess.config import PreprocessConfig, StageResources
    from pipelines.preprocess.driver import StageRunner
    from pipelines.preprocess.rows import SOURCE_KEYS

    cfg = PreprocessConfig()
    cfg.render.num_views, cfg.render.resolution, cfg.render.samples = 4, 64, 4
    cfg.render.timeout_s = 120
    cfg.cond.num_views, cfg.cond.render_resolution, cfg.cond.samples, cfg.cond.image_size = 2, 64, 4, 64
    cfg.features.checkpoint, cfg.features.batch_size = ckpts["dino"], 4
    cfg.encode.ss_encoder, cfg.encode.slat_encoder = ckpts["ss"], ckpts["slat"]
    for name in ("voxelize", "features", "encode"):
        cfg.resources[name] = StageResources(concurrency=1, num_cpus=0.25)
    keys = tuple(SOURCE_KEYS) + ("mesh_format", "mesh_name", "mesh_bundle", "untrusted_blend", "views",
                                 "views_c2w", "views_fov", "mesh_ply", "cond_images", "cond_c2w", "cond_fov",
                                 "cond_crop", "render_info", "voxel_coords", "num_voxels", "voxel_feats",
                                 "ss_latent", "slat_coords", "slat_feats")
    # render outside Ray (the render stage has its own tests; a Blender actor here only adds minutes on 2 cores)
    render = Render(cfg)
    rows = []
    for seed in (11, 12):
        row = {k: None for k in keys}
        row.update(sha256=f"synthetic{seed}", source="synthetic", file_identifier=str(seed), timings="{}",
                   mesh_bytes=synthetic_mesh_glb(seed), mesh_format="glb", mesh_name="a.glb", mesh_bundle=False)
        row = render(row)
        assert row["error"] is None, row["error"]
        row["mesh_bytes"] = None
        rows.append(row)
    ds = ray.data.from_items(rows, override_num_blocks=2)
    for name in ("voxelize", "features", "encode"):
        ds = ds.map(StageRunner, fn_constructor_kwargs={"stage": name, "cfg": cfg, "keys": keys},
                    compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25)
    out = {r["sha256"]: r for r in ds.take_all()}
    assert set(out) == {"synthetic11", "synthetic12"}

    dino = load_dinov2(ckpts["dino"])
    for sha, row in out.items():
        assert row["error"] is None, row["error"]
        # voxelize: same as the direct function on the rendered mesh
        v, f = mesh_from_ply(row["mesh_ply"])
        coords = unpack_array(row["voxel_coords"])
        assert np.array_equal(coords.astype(np.int64), voxelize_mesh(v, f)) and row["num_voxels"] == len(coords)
        # features: the independent loop projection on a subset of voxels
        feats = unpack_array(row["voxel_feats"])
        assert feats.shape == (len(coords), 64) and feats.dtype == np.float16
        pick = np.random.default_rng(0).choice(len(coords), size=min(300, len(coords)), replace=False)
        c2w, fov = unpack_array(row["views_c2w"]), unpack_array(row["views_fov"])
        ref = direct_voxel_features(dino, row["views"], c2w, fov, coords[pick].astype(int))
        assert np.abs(feats[pick].astype(np.float64) - ref).max() < 2e-3 * np.abs(ref).max() + 1e-3
        # encode: the direct model calls
        ref_ss, ref_slat = direct_latents(ckpts, coords.astype(int), feats.astype(np.float32))
        assert np.allclose(unpack_array(row["ss_latent"]), ref_ss, atol=1e-5)
        assert np.array_equal(unpack_array(row["slat_coords"]), coords)
        assert np.allclose(unpack_array(row["slat_feats"]), ref_slat, atol=1e-4)
        assert set(json.loads(row["timings"])) == {"voxelize", "features", "encode"}
