"""Encode stage (TRELLIS data toolkit steps 4 and 5): SS latent and SLat latent of one asset per row.

* SS latent: dense occupancy float32 [1, 1, 64, 64, 64] (1 at the voxel indices) -> sparse-structure VAE
  encoder, posterior mean -> float32 [8, 16, 16, 16].
* SLat latent: SparseTensor(feats = the per-voxel DINOv2 features as float32 [N, 1024], coords = (0, x, y, z)
  int32) -> SLat encoder, posterior mean -> float32 [N, 8] on the same coords. Not normalised.

Both encoders are TRELLIS-format checkpoints read with `mdt.models.from_pretrained` (the released ones, e.g.
`microsoft/TRELLIS-image-large/ckpts/ss_enc_conv3d_16l8_fp16`, or tiny random ones written with
`mdt.models.save_pretrained` for tests and the CPU demo). The stage class loads them once per actor; give the
actor pool `num_gpus` when the cluster has GPUs (config `resources.encode.num_gpus`), it then runs on CUDA.

Row in: `voxel_coords`, `voxel_feats`. Row out: `ss_latent`, `slat_coords`, `slat_feats`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pipelines.preprocess.features import resolve_device
from mdt.sparse import SparseTensor
from pipelines.preprocess.rows import fail, pack_array, unpack_array


def occupancy(indices, resolution: int = 64, device=None) -> Tensor:
    """float32 [1, 1, R, R, R] with ones at the voxel indices."""
    idx = torch.as_tensor(np.asarray(indices, np.int64), device=device).reshape(-1, 3)
    x = torch.zeros((1, 1, resolution, resolution, resolution), dtype=torch.float32, device=device)
    x[0, 0, idx[:, 0], idx[:, 1], idx[:, 2]] = 1.0
    return x


@torch.no_grad()
def encode_ss(model, indices, resolution: int = 64) -> Tensor:
    """SS VAE posterior mean of one asset: float32 [C, r, r, r] on CPU."""
    device = next(model.parameters()).device
    z = model(occupancy(indices, resolution, device), sample_posterior=False)
    return z[0].float().cpu()


@torch.no_grad()
def encode_slat(model, indices, feats) -> Tensor:
    """SLat encoder posterior mean of one asset: float32 [N, L] on CPU, rows in the order of `indices`."""

    device = next(model.parameters()).device
    idx = torch.as_tensor(np.asarray(indices, np.int64)).reshape(-1, 3)
    coords = torch.cat([torch.zeros(len(idx), 1, dtype=torch.int64), idx], dim=1).to(torch.int32)
    f = torch.as_tensor(np.asarray(feats)).float()
    x = SparseTensor(f.to(device), coords.to(device))
    z = model(x, sample_posterior=False)
    out_coords = z.coords.cpu()
    out = z.feats.float().cpu()
    if not torch.equal(out_coords, coords):  # the contract keeps the input order; guard anyway
        key = lambda c: ((c[:, 1].long() * 4096 + c[:, 2].long()) * 4096 + c[:, 3].long())  # noqa: E731
        pos = {int(k): i for i, k in enumerate(key(out_coords))}
        out = out[torch.tensor([pos[int(k)] for k in key(coords)])]
    return out


class Encode:
    """Row stage: SS and SLat latents. Loads both encoders once per actor."""

    name = "encode"
    outputs = ("ss_latent", "slat_coords", "slat_feats")
    drops = ("voxel_feats", "voxel_coords")
    resources = {"num_cpus": 1}

    def __init__(self, cfg: "PreprocessConfig", ss_model=None, slat_model=None):
        from mdt.models import from_pretrained  # heavy: safetensors

        self.cfg = cfg.encode
        self.resolution = cfg.voxelize.resolution
        self.device = resolve_device(self.cfg.device)
        self.ss = ss_model if ss_model is not None else from_pretrained(self.cfg.ss_encoder, device=self.device)
        self.slat = slat_model if slat_model is not None else from_pretrained(self.cfg.slat_encoder,
                                                                              device=self.device)
        self.ss.eval()
        self.slat.eval()

    def __call__(self, row: dict) -> dict:
        coords = unpack_array(row.get("voxel_coords"))
        feats = unpack_array(row.get("voxel_feats"))
        if coords is None or not len(coords):
            return fail(row, self.name, "no voxels")
        if feats is None or len(feats) != len(coords):
            return fail(row, self.name, "features missing or not one per voxel")
        ss = encode_ss(self.ss, coords, self.resolution)
        slat = encode_slat(self.slat, coords, feats.astype(np.float32))
        if not (torch.isfinite(ss).all() and torch.isfinite(slat).all()):
            return fail(row, self.name, "non-finite latent")
        row["ss_latent"] = pack_array(ss.numpy().astype(np.float32))
        row["slat_coords"] = pack_array(np.asarray(coords).astype(np.uint8 if self.resolution <= 256 else np.int32))
        row["slat_feats"] = pack_array(slat.numpy().astype(np.float32))
        return row

