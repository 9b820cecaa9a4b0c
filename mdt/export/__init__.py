"""Files and previews of generated assets: 3DGS PLY, FlexiCubes meshes -> GLB, the coarse occupancy mesh,
a CPU multi-view PNG strip and a self-contained interactive HTML view."""
from .flexicubes import MeshData, dense_grid_flexicubes, flexicubes, mesh_from_decoder_output
from .html import write_orbit_viewer
from .mesh import occupancy_mesh, sample_surface, write_glb
from .ply import GAUSSIAN_PLY_PROPERTIES, write_gaussian_ply
from .preview import PointCloud, preview_strip, render_points, save_preview

__all__ = ["MeshData", "flexicubes", "dense_grid_flexicubes", "mesh_from_decoder_output", "write_orbit_viewer",
           "occupancy_mesh", "sample_surface", "write_glb", "GAUSSIAN_PLY_PROPERTIES", "write_gaussian_ply",
           "PointCloud", "preview_strip", "render_points", "save_preview"]
