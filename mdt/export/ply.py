"""3D Gaussians as a 3D Gaussian Splatting PLY at spherical-harmonics degree 0 (the layout TRELLIS's `save_ply`
writes: 17 float properties, no `f_rest_*`; viewers that accept degree-0 files open it, those that require the
degree-3 layout of the original 3DGS code do not).

One binary little-endian `vertex` element, all properties float32, in the order of `GAUSSIAN_PLY_PROPERTIES`.
Values are stored before activation: opacity as a logit, scales as logs of the activated (3-D-filtered) scales,
colour as the raw DC coefficients, normals zero; the quaternion (w first) is the raw rotation + [1, 0, 0, 0]
normalised to unit length (TRELLIS writes it unnormalised; renderers normalise it, and a unit quaternion is what
a reader that does not normalise needs). Positions are world positions (xyz − 0.5) rotated from TRELLIS's
Z-up frame into the Y-up frame viewers expect: (x, y, z) -> (x, z, −y); quaternions are rotated alike.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mdt.models.representations import Gaussians

GAUSSIAN_PLY_PROPERTIES = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                           "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
# Z-up -> Y-up: p' = Z_UP_TO_Y_UP @ p, a rotation of −90° about x.
Z_UP_TO_Y_UP = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
Z_UP_TO_Y_UP_QUAT = torch.tensor([math.sqrt(0.5), -math.sqrt(0.5), 0.0, 0.0])  # (w, x, y, z)


def quaternion_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product a ⊗ b of (w, x, y, z) quaternions, broadcasting."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz,
                        aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx,
                        aw * bz + ax * by - ay * bx + az * bw], -1)


def gaussian_ply_columns(g: Gaussians) -> np.ndarray:
    """[M, 17] float32 columns in `GAUSSIAN_PLY_PROPERTIES` order."""
    xyz = g.world_xyz.detach().float().cpu() @ Z_UP_TO_Y_UP.T
    rot = g.rotation.detach().float().cpu() + torch.tensor([1.0, 0.0, 0.0, 0.0])
    rot = quaternion_multiply(Z_UP_TO_Y_UP_QUAT.expand_as(rot), rot)
    rot = rot / rot.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    opacity = torch.logit(g.activated_opacity.detach().float().cpu().clamp(1e-7, 1 - 1e-7))
    scale = torch.log(g.activated_scaling.detach().float().cpu())
    f_dc = g.features_dc.detach().float().cpu().reshape(-1, 3)
    normals = torch.zeros_like(xyz)
    cols = torch.cat([xyz, normals, f_dc, opacity.reshape(-1, 1), scale, rot], 1)
    return cols.numpy().astype(np.float32)


def write_gaussian_ply(path: str | os.PathLike, g: Gaussians) -> Path:
    """Write `g` as a binary 3DGS PLY; returns the path."""
    cols = gaussian_ply_columns(g)
    path = Path(path)
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {cols.shape[0]}"]
    header += [f"property float {name}" for name in GAUSSIAN_PLY_PROPERTIES]
    header.append("end_header")
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(np.ascontiguousarray(cols, dtype="<f4").tobytes())
    return path


def gaussian_colors(g: Gaussians) -> Tensor:
    """Display colour of each Gaussian: SH degree 0 -> RGB in [0, 1]."""
    sh_c0 = 0.28209479177387814
    return (0.5 + sh_c0 * g.features_dc.detach().float().reshape(-1, 3)).clamp(0, 1)
