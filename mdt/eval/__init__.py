"""Evaluation metrics: sample-set distances, voxel-shape and surface-point metrics, points and renders of decoded
assets (`assets`), image feature networks for appearance Fréchet distances, warm latency, latent calibration, the
per-sampler report, and the models an evaluation samples with (`chain`)."""
from .distribution import (RandomFeatureMap, frechet_distance, frechet_from_stats, gaussian_stats,
                           random_directions, sliced_wasserstein)
from .shapes import (OccupancyFeatureNet, boundary, chamfer_fscore, chamfer_matrix, coverage_mmd,
                     grouped_coverage_mmd, iou_matrix, paired_iou, subsample_points, surface_points)

__all__ = [
    "sliced_wasserstein", "frechet_distance", "frechet_from_stats", "gaussian_stats", "random_directions",
    "RandomFeatureMap", "iou_matrix", "paired_iou", "boundary", "surface_points", "chamfer_matrix",
    "chamfer_fscore", "subsample_points", "coverage_mmd", "grouped_coverage_mmd", "OccupancyFeatureNet",
]
