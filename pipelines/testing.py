"""Cheap stand-in stages for tests, CI and wiring checks (no Blender, no DINOv2, no encoders).

- ``FakeCompute`` ("fake_compute"): from the downloaded bytes alone, deterministic per sha256, produces every
  field the writer needs (``ss_latent``, ``slat_coords``, ``slat_feats``, ``num_voxels``, condition images and
  cameras). Replaces render → voxelize → features → encode.
- ``TestHook`` ("test_hook"): waits ``$PIPELINE_TEST_SLEEP_S`` seconds per row (makes a run long enough to be
  killed in the middle) and fails rows whose file_identifier contains ``$PIPELINE_TEST_FAIL``.
"""
from __future__ import annotations

import hashlib
import io
import os
import time

import numpy as np

from pipelines.rows import fail, pack_array


class FakeCompute:
    name = "fake_compute"
    outputs = ("ss_latent", "slat_coords", "slat_feats", "num_voxels", "cond_images", "cond_c2w", "cond_fov",
               "cond_crop")
    drops = ("mesh_bytes",)
    resources = {"num_cpus": 0.5}

    def __init__(self, cfg=None):
        cond = getattr(cfg, "cond", None)
        self.views = int(getattr(cond, "num_views", 2) or 2) if cond is not None else 2
        self.views = min(self.views, 4)
        self.size = min(int(getattr(cond, "image_size", 64) or 64), 64) if cond is not None else 64

    def __call__(self, row: dict) -> dict:
        data = row.get("mesh_bytes")
        if not data:
            return fail(row, self.name, "no mesh bytes")
        seed = int(hashlib.sha256(bytes(data)).hexdigest()[:8], 16)
        rng = np.random.default_rng(seed)
        n = int(rng.integers(20, 200))
        coords = np.unique(rng.integers(0, 64, size=(n, 3)), axis=0).astype(np.uint8)
        row["ss_latent"] = pack_array(rng.standard_normal((8, 16, 16, 16)).astype(np.float32))
        row["slat_coords"] = pack_array(coords)
        row["slat_feats"] = pack_array((rng.standard_normal((len(coords), 8)) * 2 - 1).astype(np.float32))
        row["num_voxels"] = int(len(coords))
        from PIL import Image

        imgs = []
        for _ in range(self.views):
            a = np.zeros((self.size, self.size, 4), np.uint8)
            a[..., :3] = rng.integers(0, 255, 3, dtype=np.uint8)
            a[self.size // 4: 3 * self.size // 4, self.size // 4: 3 * self.size // 4, 3] = 255
            buf = io.BytesIO()
            Image.fromarray(a, "RGBA").save(buf, format="PNG")
            imgs.append(buf.getvalue())
        row["cond_images"] = imgs
        row["cond_c2w"] = pack_array(np.tile(np.eye(4, dtype=np.float32), (self.views, 1, 1)))
        row["cond_fov"] = pack_array(np.full(self.views, np.radians(40), np.float32))
        row["cond_crop"] = pack_array(np.tile(np.array([0, 0, 1, 1], np.float32), (self.views, 1)))
        row["mesh_bytes"] = None
        return row


class TestHook:
    """Test hook stage ("test_hook"): sleeps ``$PIPELINE_TEST_SLEEP_S`` seconds per row (default 0) and fails
    rows whose file_identifier contains ``$PIPELINE_TEST_FAIL``. The job forwards ``PIPELINE_TEST_*`` variables
    to its Ray workers."""

    name = "test_hook"
    outputs = ()
    drops = ()
    resources = {"num_cpus": 0.25}

    def __init__(self, cfg=None):
        self.seconds = float(os.environ.get("PIPELINE_TEST_SLEEP_S", "0") or 0)
        self.pattern = os.environ.get("PIPELINE_TEST_FAIL", "")

    def __call__(self, row: dict) -> dict:
        if self.seconds:
            time.sleep(self.seconds)
        if self.pattern and self.pattern in row["file_identifier"]:
            raise RuntimeError(f"injected failure for {row['file_identifier']}")
        return row


def ensure_tiny_models(directory: str, feature_channels: int = 64) -> dict[str, str]:
    """Random-weight tiny DINOv2 (``mdt.conditioning.save_tiny_dinov2``) and SS/SLat encoders
    (``pipelines.encode.save_tiny_encoders``) under ``directory``, created once (file lock) and reused.
    For the CPU demo and CI: the latents they give are meaningless but have the real shapes and code paths."""
    import fcntl
    from pathlib import Path

    d = Path(directory).expanduser().resolve()
    d.mkdir(parents=True, exist_ok=True)
    paths = {"dino": str(d / "dinov2"), "ss": str(d / "ss_enc_tiny"), "slat": str(d / "slat_enc_tiny")}
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / "dinov2" / "config.json").exists():
            from mdt.conditioning import save_tiny_dinov2

            save_tiny_dinov2(d / "dinov2", hidden_size=feature_channels)
        if not (d / "slat_enc_tiny.safetensors").exists():
            from pipelines.encode import save_tiny_encoders

            save_tiny_encoders(d, feature_channels=feature_channels)
    return paths


def apply_tiny_models(cfg) -> None:
    """Point ``features.checkpoint`` and ``encode.*`` at the tiny models when ``cfg.tiny_models`` is set —
    only those still at their defaults (the released weights): explicitly given checkpoints win."""
    from pipelines.config import EncodeConfig, FeaturesConfig

    if not cfg.tiny_models:
        return
    f0, e0 = FeaturesConfig(), EncodeConfig()
    if (cfg.features.checkpoint == f0.checkpoint or cfg.encode.ss_encoder == e0.ss_encoder
            or cfg.encode.slat_encoder == e0.slat_encoder):
        p = ensure_tiny_models(cfg.tiny_models)
        if cfg.features.checkpoint == f0.checkpoint:
            cfg.features.checkpoint = p["dino"]
        if cfg.encode.ss_encoder == e0.ss_encoder:
            cfg.encode.ss_encoder = p["ss"]
        if cfg.encode.slat_encoder == e0.slat_encoder:
            cfg.encode.slat_encoder = p["slat"]
