"""CPU previews: a z-buffered point-splat renderer and a multi-view PNG strip (no GPU, no rasteriser needed).

Points are coloured splats of a few pixels, orthographic camera orbiting the origin of TRELLIS's Z-up frame
(objects live in [−0.5, 0.5]³); the nearest splat wins each pixel. Mesh rows are drawn from area-weighted
surface samples shaded by |n · light|, Gaussian rows from the Gaussian centres with their DC colour.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from mdt.export.ply import gaussian_colors

BACKGROUND = (245, 245, 245)


@dataclass
class PointCloud:
    """What a preview row or an HTML panel shows: points [N, 3] (Z-up frame), colours [N, 3] in [0, 1]."""

    title: str
    points: Tensor
    colors: Tensor


def gaussian_cloud(gaussians, title: str = "gaussians", min_opacity: float = 0.05) -> PointCloud:
    """What a preview draws of 3-D Gaussians (`mdt.models.Gaussians`): the centres (world frame) of those with
    activated opacity above `min_opacity`, in their DC colour."""
    keep = gaussians.activated_opacity.reshape(-1) > min_opacity
    return PointCloud(title, gaussians.world_xyz[keep], gaussian_colors(gaussians)[keep])


def view_rotation(azimuth_deg: float, elevation_deg: float) -> Tensor:
    """World (Z-up) -> camera (x right, y up, z towards the viewer) for a camera orbiting at the given angles."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    # Camera position direction and the basis looking at the origin.
    eye = torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    up = torch.tensor([0.0, 0.0, 1.0])
    right = torch.linalg.cross(up, eye)
    right = right / right.norm()
    cam_up = torch.linalg.cross(eye, right)
    return torch.stack([right, cam_up, eye])


def render_points(points: Tensor, colors: Tensor, azimuth: float = 30.0, elevation: float = 20.0,
                  size: int = 192, radius_px: int = 1, extent: float = 0.75) -> np.ndarray:
    """uint8 [size, size, 3]. `extent`: half-width of the orthographic view in world units."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    if points.shape[0] == 0:
        return img
    cam = points.detach().float().cpu() @ view_rotation(azimuth, elevation).T
    px = ((cam[:, 0] / extent + 1) * 0.5 * (size - 1)).round().long()
    py = ((1 - (cam[:, 1] / extent + 1) * 0.5) * (size - 1)).round().long()
    depth = cam[:, 2]                                                          # larger = nearer the camera
    rgb = (colors.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    offs = torch.arange(-radius_px, radius_px + 1)
    ox, oy = torch.meshgrid(offs, offs, indexing="ij")
    ox, oy = ox.reshape(-1), oy.reshape(-1)
    X = (px.unsqueeze(1) + ox).reshape(-1)
    Y = (py.unsqueeze(1) + oy).reshape(-1)
    D = depth.repeat_interleave(len(ox))
    C = rgb.repeat_interleave(len(ox), dim=0)
    ok = (X >= 0) & (X < size) & (Y >= 0) & (Y < size)
    X, Y, D, C = X[ok], Y[ok], D[ok], C[ok]
    pix = Y * size + X
    # z-buffer: the nearest splat (largest camera z) of each pixel wins.
    zbuf = torch.full((size * size,), -float("inf")).scatter_reduce(0, pix, D, reduce="amax")
    win = D >= zbuf[pix]
    flat = img.reshape(-1, 3)
    flat[pix[win].numpy()] = C[win].numpy()
    return img


def shade_normals(normals: Tensor, colors: Tensor, light=(0.4, -0.5, 0.75)) -> Tensor:
    """Two-sided Lambert shading with some ambient light."""
    light = torch.tensor(light) / torch.tensor(light).norm()
    lam = (normals.float() @ light).abs().unsqueeze(1)
    return (colors.float() * (0.35 + 0.65 * lam)).clamp(0, 1)


def preview_strip(rows: list[PointCloud], views: int = 4, size: int = 192, elevation: float = 20.0,
                  radius_px: int = 1) -> Image.Image:
    """One row per point cloud, `views` azimuths per row, with the row title written in the first tile."""
    label_h = 14
    strip = Image.new("RGB", (views * size, len(rows) * (size + label_h)), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        y0 = r * (size + label_h)
        draw.text((4, y0 + 1), row.title, fill=(40, 40, 40))
        for v in range(views):
            tile = render_points(row.points, row.colors, azimuth=30 + 360.0 * v / views, elevation=elevation,
                                 size=size, radius_px=radius_px)
            strip.paste(Image.fromarray(tile), (v * size, y0 + label_h))
    return strip


def save_preview(path: str | os.PathLike, rows: list[PointCloud], **kwargs) -> Path:
    path = Path(path)
    preview_strip(rows, **kwargs).save(path)
    return path
