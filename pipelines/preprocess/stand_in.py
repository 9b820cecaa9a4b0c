"""``stand_in``: the CI preset's cheap replacement for render -> voxelize -> features -> encode.

It treats the asset like the real stages do up to the geometry: the file is materialised, its external
references checked (pipelines.preprocess.asset_refs), its raw mesh parsed and validated (pipelines.preprocess.mesh_check), the
normalised mesh voxelized with the real voxelizer. A file that is not a mesh fails here as it would in the
render stage. Only what needs Blender and the networks is stood in for: the latents and the condition images
are deterministic noise seeded by the asset's bytes, with the shapes of the real fields.
"""
from __future__ import annotations

import hashlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np

from pipelines.preprocess.asset_refs import ExternalReferenceError, check_tree
from pipelines.preprocess.mesh_check import MeshError, check_geometry, parse_mesh
from pipelines.preprocess.rows import fail, pack_array
from pipelines.preprocess.voxelize import voxelize_mesh

MAX_VIEWS, MAX_IMAGE_SIZE = 4, 64


def sniff_format(data: bytes) -> str:
    """Format of a row without ``mesh_format`` (bytes only): GLB by its magic, else PLY / OBJ by content."""
    if data[:4] == b"glTF":
        return "glb"
    if data[:3] == b"ply":
        return "ply"
    return "obj"


class StandInCompute:
    name = "stand_in"
    outputs = ("ss_latent", "slat_coords", "slat_feats", "num_voxels", "cond_images", "cond_c2w", "cond_fov",
               "cond_crop", "asset_checks")
    drops = ("mesh_bytes",)
    resources = {"num_cpus": 0.5}

    def __init__(self, cfg: "PreprocessConfig"):
        self.views = min(cfg.cond.num_views, MAX_VIEWS)
        self.size = min(cfg.cond.image_size, MAX_IMAGE_SIZE)
        self.resolution = cfg.voxelize.resolution
        self.storage_cfg = cfg.storage

    def _geometry(self, row: dict) -> tuple[np.ndarray, np.ndarray, dict, bytes]:
        from pipelines.preprocess.download import materialize_mesh  # heavy: psutil, pyarrow

        r = dict(row)
        with tempfile.TemporaryDirectory(prefix="mdt-stand-in-") as tmp:
            root = Path(tmp) / "asset"
            if r.get("mesh_bytes") is not None and not r.get("mesh_format"):
                r["mesh_format"] = sniff_format(bytes(r["mesh_bytes"]))
            path = materialize_mesh(r, root, self.storage_cfg)
            check_tree(path, root)
            fmt = (r.get("mesh_format") or path.suffix.lstrip(".")).lower()
            v, f = parse_mesh(path, fmt)
            return v, f, check_geometry(v, f), path.read_bytes()

    def __call__(self, row: dict) -> dict:
        try:
            v, f, checks, data = self._geometry(row)
        except (ExternalReferenceError, MeshError, ValueError) as e:
            return fail(row, self.name, str(e))
        lo, hi = v.min(axis=0), v.max(axis=0)
        v = (v - (lo + hi) / 2) / float((hi - lo).max())  # longest side 1, centred: the render stage's frame
        coords = voxelize_mesh(v, f, self.resolution).astype(np.uint8)
        if not len(coords):
            return fail(row, self.name, "no occupied voxels")
        rng = np.random.default_rng(int(hashlib.sha256(data).hexdigest()[:8], 16))
        row["ss_latent"] = pack_array(rng.standard_normal((8, 16, 16, 16)).astype(np.float32))
        row["slat_coords"] = pack_array(coords)
        row["slat_feats"] = pack_array(rng.standard_normal((len(coords), 8)).astype(np.float32))
        row["num_voxels"] = int(len(coords))
        row["cond_images"] = [self._image(rng) for _ in range(self.views)]
        row["cond_c2w"] = pack_array(np.tile(np.eye(4, dtype=np.float32), (self.views, 1, 1)))
        row["cond_fov"] = pack_array(np.full(self.views, np.radians(40), np.float32))
        row["cond_crop"] = pack_array(np.tile(np.array([0, 0, 1, 1], np.float32), (self.views, 1)))
        row["asset_checks"] = json.dumps(checks, sort_keys=True)
        row["mesh_bytes"] = None
        return row

    def _image(self, rng: np.random.Generator) -> bytes:
        from PIL import Image  # heavy: PIL

        a = np.zeros((self.size, self.size, 4), np.uint8)
        a[..., :3] = rng.integers(0, 255, 3, dtype=np.uint8)
        a[self.size // 4: 3 * self.size // 4, self.size // 4: 3 * self.size // 4, 3] = 255
        buf = io.BytesIO()
        Image.fromarray(a, "RGBA").save(buf, format="PNG")
        return buf.getvalue()
