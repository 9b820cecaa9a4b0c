"""Features stage (TRELLIS data toolkit step 3): per-voxel DINOv2 patch-token means.

For every rendered feature view: resize the RGBA render to 518 px (Lanczos), premultiply alpha (black
background), ImageNet-normalise, run DINOv2 ViT-L/14-reg and keep the prenorm patch tokens as a [C, 37, 37]
map (mdt.conditioning). Each 64^3 voxel centre is projected into every view: the camera-to-world matrix
(Blender/OpenGL camera axes) gets its 2nd and 3rd columns negated (OpenCV axes: +Y down, +Z forward) and is
inverted to world-to-camera; normalised intrinsics fx = fy = 0.5 / tan(fov / 2), cx = cy = 0.5 give
uv in [0, 1], mapped to [-1, 1] for a bilinear `grid_sample` (align_corners=False, zeros outside). The
samples are averaged over all views, with no visibility test, and stored as float16 [N, C].

Row in: `views` (PNG bytes), `views_c2w`, `views_fov`, `voxel_coords`. Row out: `voxel_feats`.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from mdt.conditioning import DINOV2_HUB_ID, IMAGE_SIZE, imagenet_normalize, load_dinov2, patch_token_maps
from pipelines.preprocess.rows import fail, pack_array, unpack_array


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def view_images(pngs, size: int = IMAGE_SIZE) -> Tensor:
    """PNG RGBA renders -> [V, 3, size, size] float32 in [0, 1], resized (Lanczos) and premultiplied."""
    out = []
    for data in pngs:
        img = Image.open(io.BytesIO(bytes(data)))
        img = img.convert("RGBA")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.LANCZOS)
        a = np.asarray(img, np.float32) / 255.0
        out.append(a[..., :3] * a[..., 3:4])
    return torch.from_numpy(np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2)))


def project_voxels(indices, c2w, fov, resolution: int = 64) -> Tensor:
    """Voxel centres projected into each view: uv float32 [V, N, 2] in normalised image coordinates
    ([0, 1] across the image, u right, v down)."""
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.float64)
    centres = (idx + 0.5) / resolution - 0.5  # [N, 3]
    c2w = torch.as_tensor(np.asarray(c2w), dtype=torch.float64).clone()  # [V, 4, 4]
    fov = torch.as_tensor(np.asarray(fov), dtype=torch.float64)  # [V]
    c2w[:, :3, 1:3] *= -1  # OpenGL -> OpenCV camera axes
    w2c = torch.linalg.inv(c2w)
    cam = centres @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]  # [V, N, 3]
    f = 0.5 / torch.tan(fov / 2)  # [V]
    uv = cam[..., :2] / cam[..., 2:3] * f[:, None, None] + 0.5
    return uv.float()


def sample_token_maps(maps: Tensor, uv: Tensor) -> Tensor:
    """Bilinear samples of maps [V, C, h, w] at uv [V, N, 2] ([0, 1]) -> [V, N, C]."""
    grid = (uv * 2 - 1).to(maps.dtype).unsqueeze(1)  # [V, 1, N, 2]
    out = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # [V, C, 1, N]
    return out[:, :, 0].transpose(1, 2)


@torch.no_grad()
def voxel_features(model, images: Tensor, c2w, fov, indices, batch_size: int = 16, resolution: int = 64,
                   voxel_chunk: int = 4096) -> Tensor:
    """Mean over views of the DINOv2 patch-token maps sampled at the voxel centres: float32 [N, C] (on CPU).

    images: [V, 3, S, S] in [0, 1], premultiplied (see `view_images`).
    """
    param = next(model.parameters())
    uv = project_voxels(indices, c2w, fov, resolution).to(param.device)  # [V, N, 2]
    n = uv.shape[1]
    total = None
    for s in range(0, len(images), batch_size):
        x = imagenet_normalize(images[s:s + batch_size].to(param.device, torch.float32)).to(param.dtype)
        maps = patch_token_maps(model, x).float()  # [b, C, h, w]
        if total is None:
            total = torch.zeros(n, maps.shape[1], device=maps.device)
        for v in range(0, n, voxel_chunk):  # bounds the [b, C, chunk] sample buffer
            total[v:v + voxel_chunk] += sample_token_maps(maps, uv[s:s + batch_size, v:v + voxel_chunk]).sum(dim=0)
    return (total / len(images)).cpu()


class Features:
    """Row stage: DINOv2 per-voxel features. Loads the model once per actor (GPU when present)."""

    name = "features"
    outputs = ("voxel_feats",)
    drops = ("views", "views_c2w", "views_fov")
    resources = {"num_cpus": 1}

    def __init__(self, cfg: "PreprocessConfig", model=None):
        self.cfg = cfg.features
        self.resolution = cfg.voxelize.resolution
        self.device = resolve_device(self.cfg.device)
        dtype = getattr(torch, self.cfg.dtype)
        if self.device.type == "cpu" and dtype == torch.float16:
            dtype = torch.float32   # no fast fp16 path on CPUs (4x slower than float32: mdt.bench.cpu_gemm)
        self.model = model if model is not None else load_dinov2(self.cfg.checkpoint or DINOV2_HUB_ID,
                                                                 device=self.device, dtype=dtype)

    def __call__(self, row: dict) -> dict:
        views = row.get("views")
        coords = unpack_array(row.get("voxel_coords"))
        if not views:
            return fail(row, self.name, "no views")
        if coords is None or not len(coords):
            return fail(row, self.name, "no voxels")
        c2w, fov = unpack_array(row["views_c2w"]), unpack_array(row["views_fov"])
        if len(c2w) != len(views) or len(fov) != len(views):
            return fail(row, self.name, f"{len(views)} views but {len(c2w)} cameras")
        images = view_images(views, self.cfg.image_size)
        feats = voxel_features(self.model, images, c2w, fov, coords, self.cfg.batch_size, self.resolution)
        if not torch.isfinite(feats).all():
            return fail(row, self.name, "non-finite features")
        row["voxel_feats"] = pack_array(feats.numpy().astype(np.float16))
        return row
