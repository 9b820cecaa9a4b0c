"""The asset side of the evaluation: decoded 3-D Gaussians -> what the appearance and geometry metrics see.

* `asset_points(gaussians, max_points)`: the centres of the visible Gaussians (those a preview draws,
  `mdt.export.preview.gaussian_cloud`: activated opacity > 0.05) in [-1, 1]^3 — twice the world frame, the frame
  of `mdt.eval.shapes.surface_points` — at most `max_points` of them (a fixed-seed subsample per asset, so the
  result does not depend on which assets share a batch). The point sets of the asset Chamfer distance / F-score.
* `render_asset_views(gaussians, views, size)`: `views` renders by the point-splat renderer of the previews
  (`mdt.export.preview.render_points`: Gaussian centres in their DC colour, z-buffered) on evenly spaced
  azimuths, 30° above the equator: uint8 [views, size, size, 3], the images of the asset FD_incep / FD_dinov2.
* `asset_cloud(gaussians, max_points)`: the same subsample with colours, what the previews show.
`None` stands for an asset without Gaussians (an empty decoded occupancy): no points, background renders.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mdt.export.preview import gaussian_cloud, render_points

from .shapes import subsample_points

VIEW_ELEVATION = 30.0
VIEW_AZIMUTH0 = 45.0


def asset_points(gaussians, max_points: int = 4096, seed: int = 0) -> Tensor:
    """Visible Gaussian centres in [-1, 1]^3, float64 [P, 3] with P <= max_points."""
    if gaussians is None:
        return torch.zeros((0, 3), dtype=torch.float64)
    pts = gaussian_cloud(gaussians).points.detach().double().cpu() * 2.0
    return subsample_points(pts, max_points, torch.Generator().manual_seed(seed))


def asset_cloud(gaussians, max_points: int = 4096, seed: int = 0) -> np.ndarray:
    """What the previews show of an asset: visible Gaussian centres (world frame) and their colours, float32
    [P, 6] (x, y, z, r, g, b) with P <= max_points."""
    if gaussians is None:
        return np.zeros((0, 6), np.float32)
    c = gaussian_cloud(gaussians)
    both = torch.cat([c.points.detach().float().cpu(), c.colors.detach().float().cpu()], 1)
    return subsample_points(both, max_points, torch.Generator().manual_seed(seed)).numpy()


def render_asset_views(gaussians, views: int, size: int) -> np.ndarray:
    """`views` point-splat renders of the visible Gaussians around the asset: uint8 [views, size, size, 3]."""
    if gaussians is None:
        pts, cols = torch.zeros((0, 3)), torch.zeros((0, 3))
    else:
        cloud = gaussian_cloud(gaussians)
        pts, cols = cloud.points, cloud.colors
    radius = max(1, size // 128)
    return np.stack([render_points(pts, cols, azimuth=VIEW_AZIMUTH0 + 360.0 * k / views, elevation=VIEW_ELEVATION,
                                   size=size, radius_px=radius) for k in range(views)])
