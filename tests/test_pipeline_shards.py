"""Shard schema, writer (commit order), manifest statistics, reader + collate, and the S3 path (moto)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _pipeline_helpers import MotoS3, glb_bytes
from mdt.config import load_config
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.ledger import Ledger
from pipelines.preprocess.rows import fail, pack_array
from pipelines.preprocess.shards import (SHARD_SCHEMA, ShardRowError, ShardWriter, collate, collate_cond, collate_slat,
                              collate_ss, decode_array, load_table, read_manifest, shard_files, to_shard_row,
                              write_manifest)
from pipelines.preprocess.sources.base import make_row
from pipelines.preprocess.stand_in import StandInCompute


def compute_row(i: int, n_extra: int = 0) -> dict:
    r = make_row(source="t", file_identifier=f"a{i}", uri=f"synthetic://{i}", sha256=f"{i:064x}")
    r["mesh_bytes"] = glb_bytes(i) + b"\0" * n_extra
    return StandInCompute(load_config(PreprocessConfig, None, ["cond.num_views=2"]))(r)


def cfg_for(out: str, **over) -> PreprocessConfig:
    return load_config(PreprocessConfig, None, [f"output={out}", *[f"{k}={v}" for k, v in over.items()]])


def test_shard_row_roundtrip_and_schema_metadata():
    r = compute_row(1)
    srow, stats = to_shard_row(r, "h", ["ss_latent", "cond_images"])
    t = __import__("pyarrow").Table.from_pylist([srow], schema=SHARD_SCHEMA)
    back = t.to_pylist()[0]
    ss = decode_array(back, "ss_latent")
    assert ss.shape == (8, 16, 16, 16) and ss.dtype == np.float32
    coords = decode_array(back, "slat_coords")
    feats = decode_array(back, "slat_feats")
    assert coords.shape == (back["num_voxels"], 3) and coords.dtype == np.uint8 and feats.shape[1] == 8
    assert decode_array(back, "cond_c2w").shape == (2, 4, 4) and len(back["cond_images"]) == 2
    assert np.allclose(stats["slat_mean"], feats.astype(np.float64).mean(0))
    assert SHARD_SCHEMA.field("ss_latent").metadata[b"shape"] == b"8,16,16,16"
    r2 = dict(r, cond_images=None)
    with pytest.raises(ShardRowError, match="missing cond_images"):
        to_shard_row(r2, "h", ["cond_images"])
    r3 = dict(r, ss_latent=pack_array(np.zeros((4, 4), np.float32)))
    with pytest.raises(ShardRowError, match="ss_latent has shape"):
        to_shard_row(r3, "h")


def test_writer_commit_order_manifest_and_orphans(tmp_path):
    cfg = cfg_for(str(tmp_path / "out"))
    w = ShardWriter(cfg, "run1", "h1")
    rows = [compute_row(i) for i in range(3)]
    rows.append(fail(make_row(source="t", file_identifier="bad", uri="x"), "render", "blender timed out after 600 s"))
    rows.append(dict(compute_row(9), slat_feats=None))  # incomplete: becomes a write failure
    summary = w.write_rows(rows)
    assert summary["status"] == ["done", "done", "done", "failed", "failed"]
    assert summary["reason"][3] == "blender timed out after 600 s" and summary["stage"][3] == "render"
    assert summary["reason"][4] == "missing slat_feats" and summary["stage"][4] == "write"
    st = Ledger(cfg.output, "h1").state()
    assert len(st.shards) == 1 and len(st.done_sha) == 3
    # an orphan shard (written, never committed by a ledger file) is invisible to readers
    orphan = tmp_path / "out" / "shards" / "h1" / "part-killed-000.parquet"
    orphan.write_bytes((tmp_path / "out" / "shards" / "h1" / next(iter(st.shards))).read_bytes())
    assert len(shard_files(cfg.output)) == 1 and load_table(cfg.output).num_rows == 3
    man = write_manifest(cfg, "h1", "run1")
    assert man["counts"] == {"done": 3, "failed": 2, "duplicates": 0} and man["shards"] == sorted(st.shards)
    feats = [decode_array(r, "slat_feats").astype(np.float64) for r in load_table(cfg.output).to_pylist()]
    mean = np.mean([f.mean(0) for f in feats], 0)
    std = np.sqrt(np.mean([(f ** 2).mean(0) for f in feats], 0) - mean ** 2)
    assert np.allclose(man["slat_normalization"]["mean"], mean) and np.allclose(man["slat_normalization"]["std"], std)
    assert read_manifest(cfg.output)["schema_version"] == 1
    assert man["bytes"]["per_asset_in_shards"] > 0


def test_collate_dense_sparse_cond_and_max_voxels(tmp_path):
    rows = [to_shard_row(compute_row(i), "h")[0] for i in range(4)]
    nv = [r["num_voxels"] for r in rows]
    x = collate_ss(rows)
    assert x.shape == (4, 8, 16, 16, 16) and x.dtype == torch.float32
    stats = {"mean": [1.0] * 8, "std": [2.0] * 8}
    sp = collate_slat(rows, stats)
    assert sp.batch_size == 4 and sp.coords.dtype == torch.int32 and sp.feats.shape == (sum(nv), 8)
    raw = np.frombuffer(rows[0]["slat_feats"], "<f4").reshape(-1, 8)
    assert torch.allclose(sp.feats[: nv[0]], (torch.from_numpy(raw.copy()) - 1.0) / 2.0)
    assert torch.equal(sp.coords[: nv[0], 0], torch.zeros(nv[0], dtype=torch.int32))
    limit = sorted(nv)[1]
    sp2, keep = collate_slat(rows, None, max_voxels=limit, return_index=True)
    assert keep == [i for i, n in enumerate(nv) if n <= limit] and sp2.batch_size == len(keep)
    c = collate_cond(rows, view=1)
    assert c.shape == (4, 3, 64, 64) and float(c.max()) <= 1.0
    b = collate(rows, "slat", stats, max_voxels=limit, generator=torch.Generator().manual_seed(0), image_size=32)
    assert b["x0"].batch_size == len(b["sha256"]) == b["cond"].shape[0] == len(keep)
    assert b["cond"].shape[-1] == 32
    # Ray Data numpy batches (dict of columns) are accepted as well
    cols = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    assert collate_ss(cols).shape == (4, 8, 16, 16, 16)


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_s3_write_and_read_back_with_ray(tmp_path, ray_connected):
    """Full job to s3:// (moto on loopback): sources, cache, shards, ledger and manifest on S3, read back
    through Ray Data with pyarrow's S3FileSystem."""
    from pipelines.preprocess import driver as graph
    from pipelines.preprocess.shards import read_shards

    s3 = MotoS3()
    try:
        c = s3.client()
        c.create_bucket(Bucket="data")
        for i in range(3):
            c.put_object(Bucket="data", Key=f"raw/m{i}.glb", Body=glb_bytes(20 + i))
        cfg = cfg_for("s3://data/pre", **{"storage.s3_endpoint_url": s3.endpoint,
                                          "download.cache_uri": "s3://data/cache",
                                          "sources.specs": "[local:s3://data/raw, synthetic:1]",
                                          "stages": "[download, stand_in]", "write.rows_per_shard": 2,
                                          "ray.rows_per_block": 1, "cond.num_views": 2})
        result = graph.run(cfg, progress_every_s=1e9)
        assert result.report["done"] == 4
        keys = {o["Key"] for o in c.list_objects_v2(Bucket="data", Prefix="pre/")["Contents"]}
        assert "pre/manifest.json" in keys and any(k.startswith(f"pre/shards/{result.config_hash}/part-") for k in keys)
        assert any(k.startswith(f"pre/ledger/{result.config_hash}/") for k in keys)
        assert not any("/.tmp-" in k for k in keys)
        ds = read_shards("s3://data/pre", storage_cfg=cfg.storage)
        rows = ds.take_all()
        assert sorted(r["file_identifier"] for r in rows) == ["m0.glb", "m1.glb", "m2.glb", "synthetic-0"]
        assert collate_ss(rows).shape == (4, 8, 16, 16, 16)
        small = read_shards("s3://data/pre", storage_cfg=cfg.storage, max_voxels=min(r["num_voxels"] for r in rows))
        assert small.count() == 1
        man = json.loads(c.get_object(Bucket="data", Key="pre/manifest.json")["Body"].read())
        assert man["counts"]["done"] == 4 and man["slat_normalization"]["count"] == 4
        # a second run finds everything done in the S3 ledger
        again = graph.run(cfg, progress_every_s=1e9)
        assert again.skipped_done == 4 and again.report["processed"] == 0
    finally:
        s3.stop()
