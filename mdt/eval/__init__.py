"""Evaluation metrics: sample-set distances for low-dimensional data and voxel-shape metrics."""
from .distribution import (RandomFeatureMap, frechet_distance, frechet_from_stats, gaussian_stats,
                           random_directions, sliced_wasserstein)
from .shapes import (OccupancyFeatureNet, boundary, chamfer_matrix, coverage_mmd, grouped_coverage_mmd,
                     iou_matrix, surface_points)

__all__ = [
    "sliced_wasserstein", "frechet_distance", "frechet_from_stats", "gaussian_stats", "random_directions",
    "RandomFeatureMap", "iou_matrix", "boundary", "surface_points", "chamfer_matrix", "coverage_mmd",
    "grouped_coverage_mmd", "OccupancyFeatureNet",
]
