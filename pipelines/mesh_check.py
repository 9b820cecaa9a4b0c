"""Cheap geometry parsing and validation, before any renderer or voxelizer sees an asset.

``check_geometry(vertices, faces)`` is the rule (used on the raw file here and on Blender's imported scene in
the render worker): every position finite, every face index in range, a non-zero total surface area.
``parse_mesh(path, fmt)`` reads the raw geometry of the formats trimesh parses without a renderer (glb, gltf,
obj, ply, stl, off); OBJ face indices are checked line by line because loaders drop out-of-range faces
silently. Nothing here repairs a mesh: a broken one fails with the reason.
"""
from __future__ import annotations

import os

import numpy as np

PARSED_FORMATS = ("glb", "gltf", "obj", "ply", "stl", "off")


class MeshError(Exception):
    """Broken or missing geometry; the message is the ledger reason."""


def check_geometry(vertices: np.ndarray, faces: np.ndarray) -> dict:
    """Raise MeshError for non-finite positions, out-of-range indices or zero total area; else basic stats."""
    v = np.asarray(vertices, np.float64).reshape(-1, 3)
    f = np.asarray(faces).reshape(-1, 3) if len(faces) else np.zeros((0, 3), np.int64)
    if not len(v) or not len(f):
        raise MeshError("no mesh geometry in the asset")
    bad = ~np.isfinite(v).all(axis=1)
    if bad.any():
        raise MeshError(f"non-finite vertex positions ({int(bad.sum())} of {len(v)} vertices)")
    out = (f < 0) | (f >= len(v))
    if out.any():
        raise MeshError(f"face indices out of range ({int(out.any(axis=1).sum())} of {len(f)} faces index "
                        f"past {len(v)} vertices)")
    tri = v[f]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum()
    extent = float(np.ptp(v, axis=0).max())
    if not area > 1e-12 * max(extent, 1e-30) ** 2:
        raise MeshError("zero total surface area")
    return {"vertices": int(len(v)), "faces": int(len(f)), "area_over_extent2": float(area / extent**2)}


def _obj_faces(path: str) -> None:
    """OBJ face indices against the vertices declared before them (1-based, negative = relative)."""
    n = 0
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.startswith(b"v ") or line.startswith(b"v\t"):
                n += 1
            elif line.startswith((b"f ", b"f\t", b"l ", b"l\t")):
                for tok in line.split()[1:]:
                    head = tok.split(b"/", 1)[0]
                    try:
                        i = int(head)
                    except ValueError:
                        raise MeshError(f"malformed face on line {lineno}") from None
                    if i == 0 or i > n or i < -n:
                        raise MeshError(f"face indices out of range (line {lineno}: index {i}, {n} vertices "
                                        f"declared)")


def parse_mesh(path: str | os.PathLike, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw vertices [N, 3] and triangles [F, 3] of a file (scene graph transforms applied), no processing.

    Raises MeshError when the file is not a mesh this parser understands."""
    import trimesh

    fmt = fmt.lower()
    if fmt not in PARSED_FORMATS:
        raise MeshError(f"format {fmt!r} is not parsed without a renderer")
    if fmt == "obj":
        _obj_faces(str(path))
    try:
        loaded = trimesh.load(str(path), file_type=fmt, process=False, force=None, skip_materials=True)
    except Exception as e:  # noqa: BLE001 - any parser failure means "not a mesh we can read"
        msg = str(e).strip().splitlines()
        raise MeshError(f"not a readable {fmt} mesh: {type(e).__name__}" + (f": {msg[-1][:160]}" if msg else "")) \
            from None
    if isinstance(loaded, trimesh.Scene):
        verts, faces, base = [], [], 0
        for name in loaded.graph.nodes_geometry:
            transform, geom_name = loaded.graph[name]
            g = loaded.geometry.get(geom_name)
            if not isinstance(g, trimesh.Trimesh):
                continue
            v = np.asarray(g.vertices, np.float64)
            verts.append(v @ transform[:3, :3].T + transform[:3, 3])
            faces.append(np.asarray(g.faces, np.int64) + base)
            base += len(v)
        if not verts:
            raise MeshError("no mesh geometry in the asset")
        return np.concatenate(verts), np.concatenate(faces)
    if isinstance(loaded, trimesh.Trimesh):
        return np.asarray(loaded.vertices, np.float64), np.asarray(loaded.faces, np.int64)
    raise MeshError("no mesh geometry in the asset")
