"""The preprocessing job end to end with the real stages (Blender render, voxelizer, DINOv2 features, encoders):
real licensed GLBs served by a loopback HTTP server through a manifest with sha256, plus a synthetic asset.
Shards decode to tensors of the right shapes, condition renders show the object centred, and every latent
equals the same stages run directly on the same asset, in this process, without Ray."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from _pipeline_helpers import LoopbackHTTP, sha256
from conftest import shared_path
from mdt.config import load_config
from mdt.models import from_pretrained
from pipelines.preprocess import driver as graph
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.rows import unpack_array
from pipelines.preprocess.shards import collate_slat, collate_ss, decode_array, decode_slat, decode_ss, load_table

GLBS = ("kenney_ladder.glb", "quaternius_fence.glb")  # small real models: a few seconds each to render

pytestmark = [pytest.mark.ray, pytest.mark.blender]


def demo_config(tmp_path, sources: list[str]) -> PreprocessConfig:
    overrides = [
        "sources.specs=[" + ", ".join(f"'{s}'" for s in sources) + "]",
        f"output='{tmp_path / 'out'}'", f"download.cache_uri='{tmp_path / 'cache'}'",
        f"tiny_models='{tmp_path / 'tiny'}'",
        "render.num_views=6", "render.resolution=96", "render.samples=4",
        "cond.num_views=2", "cond.render_resolution=96", "cond.samples=4", "cond.image_size=64",
        "write.rows_per_shard=2",
    ]
    return load_config(PreprocessConfig, "demo", overrides, prefix="preprocess_")


def direct_rows(cfg: PreprocessConfig, plan_rows: list[dict]) -> dict[str, dict]:
    """The job's stages, applied one after the other to each listed row in this process."""
    stages = [(name, graph.StageRunner(name, cfg, keys)) for name, keys in graph.stage_keys(cfg.stages)]
    out = {}
    for row in plan_rows:
        r = dict(row)
        for _, stage in stages:
            r = stage(r)
        assert not r.get("error"), r.get("error")
        out[r["sha256"]] = r
    return out


def alpha_stats(png: bytes) -> tuple[np.ndarray, float, float, float]:
    """Centre of the alpha bbox and its larger side (both in image units), covered fraction, colour spread."""
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA")).astype(np.float64)
    alpha = a[..., 3] / 255
    ys, xs = np.nonzero(alpha > 0.5)
    h, w = alpha.shape
    centre = np.array([(xs.min() + xs.max()) / 2 / (w - 1), (ys.min() + ys.max()) / 2 / (h - 1)])
    side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / max(h, w)
    return centre, side, float((alpha > 0.5).mean()), float(a[..., :3][alpha > 0.5].std())


def test_job_on_real_glbs_over_http_and_synthetic(tmp_path):
    glb_dir = shared_path("assets/glb")
    http = LoopbackHTTP()
    try:
        lines = ["uri,sha256"]
        for name in GLBS:
            body = (glb_dir / name).read_bytes()
            lines.append(f"{http.add('/models/' + name, body=body)},{sha256(body)}")
        (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
        cfg = demo_config(tmp_path, [f"manifest:{tmp_path / 'manifest.csv'}", "synthetic:1"])
        result = graph.run(cfg, progress_every_s=1e9)
        import ray

        ray.shutdown()
        assert result.report["done"] == 3 and result.report["failed"] == 0, result.report
        table = load_table(cfg.output)
        rows = {r["sha256"]: r for r in table.to_pylist()}
        assert len(rows) == 3 and {r["source"] for r in rows.values()} == {"manifest", "synthetic"}

        # shapes: dense SS batch, sparse SLat batch, condition images and cameras
        assert collate_ss(list(rows.values())).shape == (3, 8, 16, 16, 16)
        slat = collate_slat(list(rows.values()))
        assert slat.feats.shape == (sum(r["num_voxels"] for r in rows.values()), 8)
        assert sorted(torch.unique(slat.coords[:, 0]).tolist()) == [0, 1, 2]
        for r in rows.values():
            coords, feats = decode_slat(r)
            assert coords.shape == (r["num_voxels"], 3) and r["num_voxels"] > 50 and coords.max() < 64
            assert feats.shape == (r["num_voxels"], 8) and np.isfinite(feats).all()
            assert decode_array(r, "cond_c2w").shape == (2, 4, 4) and len(r["cond_images"]) == 2
            for png in r["cond_images"]:
                # not blank, not a flat colour, and centred: the crop is the object's alpha bbox, 1.2x square
                centre, side, coverage, colour_std = alpha_stats(png)
                assert 0.02 < coverage < 0.98, coverage
                assert abs(side - 1 / 1.2) < 0.1, side
                assert colour_std > 1.0, "condition image is a flat colour"
                assert np.abs(centre - 0.5).max() < 0.08, centre

        # the same stages, directly, on the same listed inputs
        direct = direct_rows(cfg, graph.plan(cfg).rows)
        assert set(direct) == set(rows)
        ss_enc = from_pretrained(cfg.encode.ss_encoder)
        for sha, r in rows.items():
            d = direct[sha]
            coords, feats = decode_slat(r)
            assert np.array_equal(coords, unpack_array(d["slat_coords"]))
            assert np.allclose(decode_ss(r), unpack_array(d["ss_latent"]), atol=1e-5)
            assert np.allclose(feats, unpack_array(d["slat_feats"]), atol=1e-4)
            # and the SS latent is the SS encoder applied to the shard's own voxels
            occ = torch.zeros(1, 1, 64, 64, 64)
            c = torch.from_numpy(coords.astype(np.int64))
            occ[0, 0, c[:, 0], c[:, 1], c[:, 2]] = 1
            with torch.no_grad():
                ref = ss_enc(occ)[0].numpy()
            assert np.allclose(decode_ss(r), ref, atol=1e-5)
        man = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert man["counts"]["done"] == 3 and man["slat_normalization"]["count"] == 3
    finally:
        http.close()
