"""The shard schema (defined once, here), the shard writer, and the reader + collate used by training.

Shards are Parquet files ``<output>/shards/<config_hash>/part-<run>-<uuid>.parquet``, one row per asset.
Numeric arrays are raw little-endian C-order bytes; their dtype and shape are in the field metadata of
``SHARD_SCHEMA`` (and in pipelines/README.md). Shards are written by :class:`ShardWriter` (a Ray Data
``map_batches`` actor): shard file first (temp name → rename, or one S3 object), then the batch's ledger
file, which is the commit. Readers take the shard list from ``manifest.json`` (or the ledger while a run is
in progress), so an orphan shard of a killed run is never read.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from dataclasses import asdict
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.common import storage
from pipelines.preprocess.config import SCHEMA_VERSION, PreprocessConfig, join_uri
from pipelines.preprocess.ledger import WRITE_STAGE, Ledger, sandbox_mode, slat_normalisation
from pipelines.preprocess.rows import error_stage, timings, unpack_array

log = logging.getLogger(__name__)

SS_SHAPE = (8, 16, 16, 16)
SLAT_CHANNELS = 8


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = True, **meta: str) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc, **meta})


SHARD_SCHEMA = pa.schema(
    [
        _f("sha256", pa.string(), "lowercase hex sha256 of the asset file (3D-FUTURE: of image.jpg)", False),
        _f("source", pa.string(), "dataset name", False),
        _f("file_identifier", pa.string(), "the dataset's own id of the asset", False),
        _f("license", pa.string(), "per-object licence when known"),
        _f("aesthetic_score", pa.float32(), "TRELLIS-500K aesthetic score when known"),
        _f("provenance", pa.string(), "JSON object: captions, repo commit, ..."),
        _f("num_voxels", pa.int32(), "N, number of occupied 64^3 voxels", False),
        _f("ss_latent", pa.binary(), "SS VAE mean", False, dtype="float32", shape="8,16,16,16"),
        _f("slat_coords", pa.binary(), "64^3 voxel indices (x, y, z)", False, dtype="uint8", shape="N,3"),
        _f("slat_feats", pa.binary(), "SLat encoder mean, not normalised", False, dtype="float32", shape="N,8"),
        _f("cond_images", pa.list_(pa.binary()), "encoded condition views (PNG RGBA / JPEG RGB on black), "
           "cropped to the object and resized to cond.image_size"),
        _f("cond_c2w", pa.binary(), "camera-to-world of the condition views, Blender/OpenGL camera axes",
           dtype="float32", shape="V,4,4"),
        _f("cond_fov", pa.binary(), "FOV of the uncropped condition renders, radians", dtype="float32", shape="V"),
        _f("cond_crop", pa.binary(), "crop box (x0, y0, x1, y1), normalised coordinates of the uncropped render",
           dtype="float32", shape="V,4"),
        _f("config_hash", pa.string(), "hash of the output-affecting preprocessing config", False),
        # Teacher-generated rows (jobs/synthesize.py); null in rows made from 3-D assets.
        _f("teacher_sha256", pa.string(), "sha256 of the SS teacher checkpoint (.safetensors) that sampled the row"),
        _f("sampler", pa.string(), "JSON: per stage the teacher checkpoint, its sha256 and its sampler settings"),
        _f("seed", pa.int64(), "seed of the row's teacher sample"),
        _f("source_sha256", pa.string(), "sha256 of the condition image file the row was sampled for"),
    ],
    metadata={"schema_version": str(SCHEMA_VERSION), "producer": "mdt-orchestrator pipelines.shards"},
)
SHARD_COLUMNS = SHARD_SCHEMA.names
PROVENANCE_COLUMNS = ("teacher_sha256", "sampler", "seed", "source_sha256")


# ------------------------------------------------------------------------------------- row conversion


class ShardRowError(ValueError):
    pass


def _arr(row: dict, key: str, dtype, shape: tuple | None = None) -> np.ndarray:
    a = unpack_array(row.get(key))
    if a is None:
        raise ShardRowError(f"missing {key}")
    a = np.asarray(a)
    if shape is not None:
        if a.size != int(np.prod(shape)):
            raise ShardRowError(f"{key} has shape {a.shape}, expected {shape}")
        a = a.reshape(shape)
    return np.ascontiguousarray(a.astype(dtype, copy=False))


def to_shard_row(row: dict, config_hash: str, required: Sequence[str] = ()) -> tuple[dict, dict]:
    """Stage row -> (shard row, stats for the ledger). Raises ShardRowError when the row is incomplete."""
    for key in required:
        v = row.get(key)
        if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
            raise ShardRowError(f"missing {key}")
    ss = _arr(row, "ss_latent", "<f4", SS_SHAPE)
    coords = _arr(row, "slat_coords", np.int64)
    feats = _arr(row, "slat_feats", "<f4")
    coords = coords.reshape(-1, 3)
    feats = feats.reshape(len(coords), -1) if len(coords) else feats.reshape(0, SLAT_CHANNELS)
    if feats.shape[1] != SLAT_CHANNELS:
        raise ShardRowError(f"slat_feats has {feats.shape[1]} channels, expected {SLAT_CHANNELS}")
    if len(coords) == 0:
        raise ShardRowError("no voxels")
    if coords.min() < 0 or coords.max() > 255:
        raise ShardRowError("slat_coords outside 0..255")
    if not np.isfinite(feats).all() or not np.isfinite(ss).all():
        raise ShardRowError("non-finite latent values")
    cond = row.get("cond_images")
    out = {
        "sha256": row["sha256"],
        "source": row["source"],
        "file_identifier": row["file_identifier"],
        "license": row.get("license"),
        "aesthetic_score": row.get("aesthetic_score"),
        "provenance": row.get("provenance") or "{}",
        "num_voxels": int(len(coords)),
        "ss_latent": ss.tobytes(),
        "slat_coords": coords.astype(np.uint8).tobytes(),
        "slat_feats": feats.tobytes(),
        "cond_images": [bytes(b) for b in cond] if cond is not None else None,
        "cond_c2w": _opt_raw(row.get("cond_c2w"), "<f4", (-1, 4, 4)),
        "cond_fov": _opt_raw(row.get("cond_fov"), "<f4", (-1,)),
        "cond_crop": _opt_raw(row.get("cond_crop"), "<f4", (-1, 4)),
        "config_hash": config_hash,
        **{k: row.get(k) for k in PROVENANCE_COLUMNS},
    }
    f64 = feats.astype(np.float64)
    stats = {"slat_mean": f64.mean(0).tolist(), "slat_sqmean": (f64**2).mean(0).tolist()}
    return out, stats


def _opt_raw(b, dtype, shape) -> bytes | None:
    a = unpack_array(b)
    if a is None:
        return None
    return np.ascontiguousarray(np.asarray(a, dtype=dtype).reshape(shape)).tobytes()


def row_nbytes(shard_row: dict) -> int:
    n = 0
    for v in shard_row.values():
        if isinstance(v, (bytes, str)):
            n += len(v)
        elif isinstance(v, list):
            n += sum(len(x) for x in v)
        elif v is not None:
            n += 8
    return n


def shard_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


# ------------------------------------------------------------------------------------- writer


def shard_dir(output: str, config_hash: str) -> str:
    return join_uri(output, "shards", config_hash)


def asset_encoding_of(row: dict) -> str:
    """The row's ``<format>/<encoding>`` for the report's coverage table: what the render stage read from the
    file (pipelines.preprocess.mesh_check.asset_encoding), else ``<format>/unchecked`` (the asset failed before it)."""
    try:
        enc = json.loads(row.get("asset_checks") or "{}").get("encoding")
    except (ValueError, AttributeError):
        enc = None
    return enc or f"{row.get('mesh_format') or 'unknown'}/unchecked"


class ShardWriter:
    """Ray Data ``map_batches`` actor: successes -> one shard file, every asset -> one ledger file.

    Returns one small summary row per asset (for progress and the report).
    """

    SUMMARY_KEYS = ("sha256", "source", "file_identifier", "status", "stage", "reason", "timings", "shard",
                    "bytes", "sandbox", "encoding")

    def __init__(self, cfg: PreprocessConfig, run_id: str, config_hash: str):
        self.cfg = cfg
        self.run_id = run_id
        self.config_hash = config_hash
        self.ledger = Ledger(cfg.output, config_hash, cfg.storage)
        self.dir = shard_dir(cfg.output, config_hash)

    def __call__(self, batch) -> dict[str, list]:
        rows = batch.to_pylist() if isinstance(batch, pa.Table) else _rows_from_columns(batch)
        return self.write_rows(rows)

    def write_rows(self, rows: list[dict]) -> dict[str, list]:
        t0 = time.time()
        good: list[tuple[dict, dict, dict]] = []  # (row, shard_row, stats)
        for row in rows:
            if row.get("error"):
                continue
            try:
                srow, stats = to_shard_row(row, self.config_hash, self.cfg.write.required)
                if row.get("asset_checks"):  # what was checked, and any importer warnings: never silent
                    stats["asset_checks"] = json.loads(row["asset_checks"])
                if row.get("render_info"):  # the Blender worker's own timings (start-up share, per step)
                    info = json.loads(row["render_info"])
                    stats["render_timings"] = {**info.get("timings", {}), "wall_s": info.get("wall_s")}
                good.append((row, srow, stats))
            except ShardRowError as e:
                row["error"] = f"{WRITE_STAGE}: {e}"
        shard_name = None
        if good:
            shard_name = f"part-{self.run_id}-{uuid.uuid4().hex[:12]}.parquet"
            table = shard_table([g[1] for g in good])
            buf = io.BytesIO()
            pq.write_table(table, buf, compression=self.cfg.write.compression)
            storage.write_bytes_atomic(join_uri(self.dir, shard_name), buf.getvalue(), self.cfg.storage)
        write_s = (time.time() - t0) / max(1, len(good))
        records, summary = [], {k: [] for k in self.SUMMARY_KEYS}
        stats_of = {id(g[0]): (g[1], g[2]) for g in good}
        for row in rows:
            t = timings(row)
            base = {"sha256": row.get("sha256"), "source": row.get("source"),
                    "file_identifier": row.get("file_identifier"), "uri": row.get("uri"),
                    "run_id": self.run_id, "config_hash": self.config_hash,
                    "sandbox": sandbox_mode(row, self.cfg.render.allow_unsandboxed)}
            err = row.get("error")
            bad_stage = error_stage(err)
            for stage, sec in t.items():
                if stage != bad_stage:
                    records.append({**base, "stage": stage, "status": "done", "seconds": sec})
            nbytes = None
            if err:
                reason = err.split(":", 1)[1].strip() if ":" in err else err
                status = "skipped" if reason.startswith("skipped") else "failed"
                records.append({**base, "stage": bad_stage or "unknown", "status": status, "reason": reason,
                                "seconds": t.get(bad_stage)})
                stage = bad_stage
            else:
                srow, stats = stats_of[id(row)]
                nbytes = row_nbytes(srow)
                status, stage, reason = "done", WRITE_STAGE, None
                records.append({**base, "stage": WRITE_STAGE, "status": "done", "seconds": write_s,
                                "shard": shard_name, "bytes": nbytes, "stats": json.dumps(stats)})
                t = {**t, WRITE_STAGE: write_s}
            for k, v in (("sha256", base["sha256"]), ("source", base["source"]),
                         ("file_identifier", base["file_identifier"]), ("status", status), ("stage", stage),
                         ("reason", reason), ("timings", json.dumps(t)), ("shard", shard_name if not err else None),
                         ("bytes", nbytes), ("sandbox", base["sandbox"]),
                         ("encoding", asset_encoding_of(row))):
                summary[k].append(v)
        # The ledger file is the commit: written after the shard is complete.
        self.ledger.write(records)
        self._drop_failed_from_cache(rows)
        return summary

    def _drop_failed_from_cache(self, rows: list[dict]) -> None:
        """A failed asset leaves nothing in the download cache (duplicates share the owner's entry: kept)."""
        for row in rows:
            err, uri = row.get("error"), row.get("cache_uri")
            if not err or not uri or err.split(":", 1)[-1].strip().startswith("skipped"):
                continue
            for u in (uri + ".json", uri):  # the sidecar (commit marker) first
                try:
                    storage.delete(u, self.cfg.storage)
                except OSError as e:
                    log.warning("could not remove failed asset %s from the cache: %s", u, e)


def _rows_from_columns(batch: dict) -> list[dict]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    out = []
    for i in range(n):
        r = {}
        for k in keys:
            v = batch[k][i]
            if isinstance(v, np.ndarray) and v.dtype == object:
                v = list(v)
            elif isinstance(v, np.generic):
                v = v.item()
            r[k] = v
        out.append(r)
    return out


# ------------------------------------------------------------------------------------- manifest


def manifest_uri(output: str) -> str:
    return join_uri(output, "manifest.json")


def shard_files(uri: str, storage_cfg=None) -> list[str]:
    """Committed shard files of a dataset: ``uri`` is the output dir (or its manifest.json)."""
    if uri.endswith(".json"):
        man = json.loads(storage.read_bytes(uri, storage_cfg))
        base = uri.rsplit("/", 1)[0]
    else:
        base = uri.rstrip("/")
        m = manifest_uri(base)
        man = json.loads(storage.read_bytes(m, storage_cfg)) if storage.exists(m, storage_cfg) else None
    if man is not None:
        d = shard_dir(base, man["config_hash"])
        return [join_uri(d, s) for s in man["shards"]]
    # No manifest yet (run in progress or killed): committed shards from the ledger(s).
    files = []
    for h in _ledger_hashes(base, storage_cfg):
        st = Ledger(base, h, storage_cfg).state()
        files += [join_uri(shard_dir(base, h), s) for s in sorted(st.shards)]
    return files


def _ledger_hashes(base: str, storage_cfg=None) -> list[str]:
    hashes = set()
    root = join_uri(base, "ledger")
    for f in storage.list_files(root, storage_cfg, suffix=".parquet"):
        rel = f[len(root):].lstrip("/")
        if "/" in rel:
            hashes.add(rel.split("/", 1)[0])
    return sorted(hashes)


def read_manifest(uri: str, storage_cfg=None) -> dict:
    if not uri.endswith(".json"):
        uri = manifest_uri(uri)
    return json.loads(storage.read_bytes(uri, storage_cfg))


# ------------------------------------------------------------------------------------- readers


READ_NUM_CPUS = 0.25


def read_shards(uri: str, *, storage_cfg=None, max_voxels: int | None = None, min_aesthetic: float | None = None,
                columns: list[str] | None = None, **read_kwargs):
    """Committed shards as a Ray Dataset (one row per asset, columns of SHARD_SCHEMA)."""
    import ray.data  # heavy: ray, pandas

    files = shard_files(uri, storage_cfg)
    if not files:
        raise FileNotFoundError(f"no committed shards under {uri}")
    fs, _ = storage.filesystem(files[0], storage_cfg)
    paths = [storage.filesystem(f, storage_cfg)[1] for f in files]
    # Reading is I/O: a fraction of a CPU, so that it is scheduled even when training workers hold every
    # whole CPU of the cluster (with Ray's default of 1 CPU per read task the dataset would wait forever).
    read_kwargs.setdefault("num_cpus", READ_NUM_CPUS)
    # the filters read their own columns even when the caller asked for others; dropped again after filtering
    filter_columns = ([] if max_voxels is None else ["num_voxels"]) + ([] if min_aesthetic is None
                                                                        else ["aesthetic_score"])
    extra = [c for c in filter_columns if columns is not None and c not in columns]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=None if columns is None else list(columns) + extra,
                               **read_kwargs)
    if max_voxels is not None:
        ds = ds.filter(lambda r, m=max_voxels: r["num_voxels"] <= m, num_cpus=READ_NUM_CPUS)
    if min_aesthetic is not None:
        ds = ds.filter(lambda r, m=min_aesthetic: r["aesthetic_score"] is None or r["aesthetic_score"] >= m,
                       num_cpus=READ_NUM_CPUS)
    if extra:
        ds = ds.drop_columns(extra)
    return ds


def load_table(uri: str, storage_cfg=None, columns: list[str] | None = None) -> pa.Table:
    """All committed shards as one Arrow table (no Ray; for small datasets, tests and tools)."""
    tables = []
    for f in shard_files(uri, storage_cfg):
        tables.append(pq.read_table(io.BytesIO(storage.read_bytes(f, storage_cfg)), columns=columns))
    if not tables:
        return SHARD_SCHEMA.empty_table() if columns is None else SHARD_SCHEMA.empty_table().select(columns)
    return pa.concat_tables(tables)


# ------------------------------------------------------------------------------------- collate


def _as_rows(batch: Any) -> list[dict]:
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    if isinstance(batch, dict):
        return _rows_from_columns(batch)
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        return batch.to_dict("records")
    return list(batch)


def decode_ss(row: dict) -> np.ndarray:
    return np.frombuffer(row["ss_latent"], dtype="<f4").reshape(SS_SHAPE)


def decode_slat(row: dict) -> tuple[np.ndarray, np.ndarray]:
    coords = np.frombuffer(row["slat_coords"], dtype=np.uint8).reshape(-1, 3)
    feats = np.frombuffer(row["slat_feats"], dtype="<f4").reshape(-1, SLAT_CHANNELS)
    return coords, feats


def decode_array(row: dict, column: str) -> np.ndarray | None:
    """Any binary array column -> numpy, using the schema's dtype/shape metadata."""
    b = row.get(column)
    if b is None:
        return None
    meta = SHARD_SCHEMA.field(column).metadata
    dtype = meta[b"dtype"].decode()
    shape = [(-1 if s in ("N", "V") else int(s)) for s in meta[b"shape"].decode().split(",")]
    return np.frombuffer(b, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def filter_max_voxels(batch: Any, max_voxels: int | None) -> list[dict]:
    rows = _as_rows(batch)
    if max_voxels is None:
        return rows
    return [r for r in rows if int(r["num_voxels"]) <= max_voxels]


def collate_ss(batch: Any):
    """Rows -> dense SS latents float32 [B, 8, 16, 16, 16] (not normalised, as TRELLIS)."""
    import torch  # heavy: torch

    rows = _as_rows(batch)
    return torch.from_numpy(np.stack([decode_ss(r) for r in rows]).copy()) if rows else torch.zeros((0, *SS_SHAPE))


def _stats_tensors(stats):
    import torch  # heavy: torch

    if stats is None:
        return None, None
    if isinstance(stats, dict) and "slat_normalization" in stats:  # a manifest
        stats = stats["slat_normalization"]
    mean = torch.as_tensor(stats["mean"], dtype=torch.float32)
    std = torch.as_tensor(stats["std"], dtype=torch.float32)
    return mean, std


def collate_slat(batch: Any, stats: dict | None = None, max_voxels: int | None = None,
                 return_index: bool = False):
    """Rows -> ``mdt.sparse.SparseTensor`` (feats normalised ``(z - mean) / std`` when ``stats`` is given,
    coords int32 ``(batch, x, y, z)``). Rows with more than ``max_voxels`` voxels are dropped; with
    ``return_index`` the indices of the kept rows are returned too."""
    import torch  # heavy: torch

    from mdt.sparse import SparseTensor  # heavy: torch

    rows = _as_rows(batch)
    keep = [i for i, r in enumerate(rows) if max_voxels is None or int(r["num_voxels"]) <= max_voxels]
    feats, coords = [], []
    for b, i in enumerate(keep):
        c, f = decode_slat(rows[i])
        coords.append(np.concatenate([np.full((len(c), 1), b, np.int32), c.astype(np.int32)], 1))
        feats.append(f)
    if keep:
        f = torch.from_numpy(np.concatenate(feats).copy())
        c = torch.from_numpy(np.concatenate(coords))
    else:
        f, c = torch.zeros((0, SLAT_CHANNELS)), torch.zeros((0, 4), dtype=torch.int32)
    mean, std = _stats_tensors(stats)
    if mean is not None:
        f = (f - mean) / std
    x = SparseTensor(f, c, batch_size=len(keep))
    return (x, keep) if return_index else x


def decode_cond_image(data: bytes, image_size: int | None = None) -> np.ndarray:
    """Encoded condition view -> float32 [3, S, S] in [0, 1], RGB premultiplied by alpha (black background)."""
    from PIL import Image  # heavy: PIL

    img = Image.open(io.BytesIO(bytes(data)))
    img = img.convert("RGBA")
    if image_size is not None and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    a = np.asarray(img, np.float32) / 255.0
    return np.ascontiguousarray((a[..., :3] * a[..., 3:4]).transpose(2, 0, 1))


def collate_cond(batch: Any, view: int | None = None, generator=None, image_size: int | None = None):
    """Rows -> one condition image per row, float32 [B, 3, S, S] in [0, 1] (premultiplied alpha).

    ``view=None`` picks a random view per row (``generator``: a ``torch.Generator`` for reproducibility);
    DINOv2 normalisation is the conditioner's job (mdt/conditioning.py)."""
    import torch  # heavy: torch

    rows = _as_rows(batch)
    out = []
    for r in rows:
        imgs = r.get("cond_images") or []
        if not len(imgs):
            raise ValueError(f"asset {r.get('sha256')} has no condition images")
        if view is None:
            k = int(torch.randint(len(imgs), (1,), generator=generator))
        else:
            k = view % len(imgs)
        out.append(decode_cond_image(imgs[k], image_size))
    return torch.from_numpy(np.stack(out)) if out else torch.zeros((0, 3, image_size or 518, image_size or 518))


def collate(batch: Any, kind: str, stats: dict | None = None, max_voxels: int | None = None,
            cond_view: int | None = None, generator=None, image_size: int | None = None) -> dict:
    """Trainer-facing batch: ``{"x0": dense or SparseTensor, "cond": [B,3,S,S], "sha256": [...]}``.
    ``kind`` is ``"ss"`` or ``"slat"``; the max-voxels filter applies to both, consistently."""
    rows = filter_max_voxels(batch, max_voxels)
    if kind == "ss":
        x0 = collate_ss(rows)
    elif kind == "slat":
        x0 = collate_slat(rows, stats)
    else:
        raise ValueError(f"kind must be 'ss' or 'slat', got {kind!r}")
    return {"x0": x0, "cond": collate_cond(rows, cond_view, generator, image_size),
            "sha256": [r["sha256"] for r in rows]}


def iter_rows(uri: str, storage_cfg=None, columns: list[str] | None = None) -> Iterable[dict]:
    for f in shard_files(uri, storage_cfg):
        t = pq.read_table(io.BytesIO(storage.read_bytes(f, storage_cfg)), columns=columns)
        yield from t.to_pylist()


# ------------------------------------------------------------------------------------- manifest writer


def checkpoint_info(cfg: PreprocessConfig) -> dict:
    """Encoder (and feature model) checkpoints with content hashes when they are local files."""
    out = {}
    refs = {}
    if "features" in cfg.stages:
        refs["features"] = cfg.features.checkpoint or cfg.features.model
    if "encode" in cfg.stages:
        refs["ss_encoder"] = cfg.encode.ss_encoder
        refs["slat_encoder"] = cfg.encode.slat_encoder
    for name, ref in refs.items():
        info: dict = {"ref": ref}
        files = [p for p in (f"{ref}.safetensors", f"{ref}.json", ref) if ref and os.path.isfile(p)]
        if ref and os.path.isdir(ref):  # a transformers-style directory (config.json + model.safetensors)
            files = sorted(os.path.join(ref, f) for f in os.listdir(ref)
                           if f.endswith((".safetensors", ".json", ".bin")))
        for p in files:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            info[os.path.basename(p)] = h.hexdigest()
        if not files:
            info["note"] = "hub reference (hash not computed on the driver)"
        out[name] = info
    return out


def write_manifest(cfg: PreprocessConfig, chash: str, run_id: str, resolved_config: dict | None = None) -> dict:
    """``<output>/manifest.json`` (and ``manifest-<config_hash>.json``) from the ledger: shard list, counts,
    SLat normalisation stats over every done asset, bytes per asset, checkpoints."""
    st = Ledger(cfg.output, chash, cfg.storage).state()
    d = shard_dir(cfg.output, chash)
    shards, missing = [], []
    shard_bytes = 0
    for s in sorted(st.shards):
        try:
            size = storage.size(join_uri(d, s), cfg.storage)
        except OSError:
            size = None
        if size is None:  # a done record whose shard was deleted behind our back: do not list it
            missing.append(s)
            continue
        shards.append(s)
        shard_bytes += size
    if missing:
        log.warning("%d committed shard files are missing under %s: %s", len(missing), d, missing[:5])
    n_done = st.done_count
    man = {
        "schema_version": SCHEMA_VERSION,
        "config_hash": chash,
        "last_run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "counts": {"done": n_done, "failed": len(st.failed_ids), "duplicates": len(st.skipped_ids - st.done_ids)},
        "bytes": {"shards_total": shard_bytes, "per_asset_in_shards": (shard_bytes / n_done) if n_done else None,
                  "per_asset_uncompressed": (st.bytes_done / n_done) if n_done else None},
        "slat_normalization": slat_normalisation(st.slat_stats),
        "checkpoints": checkpoint_info(cfg),
        "schema": [{"name": f.name, "type": str(f.type),
                    **{k.decode(): v.decode() for k, v in (f.metadata or {}).items()}} for f in SHARD_SCHEMA],
        "config": resolved_config if resolved_config is not None else asdict(cfg),
        "shards": shards,
        "missing_shards": missing,
    }
    blob = json.dumps(man, indent=2, sort_keys=False, default=str).encode()
    storage.write_bytes_atomic(join_uri(cfg.output, f"manifest-{chash}.json"), blob, cfg.storage)
    storage.write_bytes_atomic(manifest_uri(cfg.output), blob, cfg.storage)
    return man
