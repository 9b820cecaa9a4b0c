"""The training side of the shards: which columns a stage reads, the Ray Dataset the workers split, the first
rows (fixed snapshot conditions) and the collate function bound to the stage's settings.

Reading goes through `pipelines.preprocess.shards`' reader API only; the collate function is handed to the Ray Train loop
(`pipelines.distill.worker`) as a plain callable.
"""
from __future__ import annotations

import functools
import io

from pipelines.preprocess import shards
from pipelines.common import storage
from pipelines.common.config import StorageConfig
import pyarrow.parquet as pq

STAGE_COLUMNS = {"ss": ["sha256", "num_voxels", "ss_latent", "cond_images"],
                 "slat": ["sha256", "num_voxels", "slat_coords", "slat_feats", "cond_images"]}


def storage_config(cfg) -> StorageConfig:
    """Object-store settings of a distillation config (data, outputs and the MLflow run record)."""
    return StorageConfig(s3_endpoint_url=cfg.data.storage_s3_endpoint_url)


def check_data(cfg) -> None:
    """FileNotFoundError / ValueError when `data.uri` has no committed shards (or, for SLat, no statistics)."""
    st = storage_config(cfg)
    if not shards.shard_files(cfg.data.uri, st):
        raise FileNotFoundError(f"--data {cfg.data.uri}: no committed shards there (a preprocessing output dir, "
                                "its manifest.json or an s3:// prefix)")
    if cfg.stage == "slat" and not shards.read_manifest(cfg.data.uri, st).get("slat_normalization"):
        raise ValueError(f"--data {cfg.data.uri}: the manifest has no slat_normalization statistics")


def load_dataset(cfg):
    """(Ray Dataset of the committed shards with the max-voxels / aesthetic filters, SLat statistics or None)."""
    st = storage_config(cfg)
    ds = shards.read_shards(cfg.data.uri, storage_cfg=st, max_voxels=cfg.data.max_voxels,
                            min_aesthetic=cfg.data.min_aesthetic, columns=STAGE_COLUMNS[cfg.stage])
    stats = shards.read_manifest(cfg.data.uri, st).get("slat_normalization") if cfg.stage == "slat" else None
    return ds, stats


def first_rows(cfg, n: int) -> list[dict]:
    """The first `n` assets of the dataset (fixed snapshot conditions), read directly from the first shards."""

    st = storage_config(cfg)
    rows: list[dict] = []
    for f in shards.shard_files(cfg.data.uri, st):
        t = pq.read_table(io.BytesIO(storage.read_bytes(f, st)), columns=STAGE_COLUMNS[cfg.stage])
        for r in t.to_pylist():
            if cfg.data.max_voxels is None or r["num_voxels"] <= cfg.data.max_voxels:
                rows.append(r)
            if len(rows) >= n:
                return rows
    return rows


def make_collate(cfg, stats):
    """rows -> {"x0": dense latents | SparseTensor, "cond": condition images} for the stage of `cfg`."""
    return functools.partial(shards.collate, kind=cfg.stage, stats=stats, max_voxels=cfg.data.max_voxels,
                             cond_view=cfg.data.cond_view, image_size=cfg.condition.image_size)
