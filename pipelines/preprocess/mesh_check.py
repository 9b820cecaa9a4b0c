"""Cheap geometry parsing and validation, before any renderer or voxelizer sees an asset.

``check_geometry(vertices, faces)`` is the rule (used on the raw file here and on Blender's imported scene in
the render worker): every position finite, every face index in range, a non-zero total surface area.
``parse_mesh(path, fmt)`` reads the raw geometry of the formats trimesh parses without a renderer (glb, gltf,
obj, ply, stl, off); OBJ face indices are checked line by line because loaders drop out-of-range faces
silently. Nothing here repairs a mesh: a broken one fails with the reason.

Compressed glTF geometry leaves the accessors empty. Draco (``KHR_draco_mesh_compression``): ``parse_mesh``
raises ``CompressedGeometry`` and the geometry is checked on what Blender's importer decoded, inside the render
worker's wall, by the same rule. A required ``EXT_meshopt_compression`` has no decoder in the renderer and fails
with ``unsupported encoding: …`` (an optional one comes with an uncompressed fallback, read as usual).
``asset_encoding(path, fmt)`` names a file's format and encodings (``gltf/draco``, ``glb/ktx2``, ``obj/mtl`` …)
for the run report's coverage table; it reads only the glTF JSON (or the OBJ's ``mtllib`` lines), never a buffer.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

PARSED_FORMATS = ("glb", "gltf", "obj", "ply", "stl", "off")


class MeshError(Exception):
    """Broken or missing geometry; the message is the ledger reason."""


class CompressedGeometry(MeshError):
    """The file's geometry is compressed: the raw accessors hold no data to check."""


# glTF extensions -> the encoding names of the coverage table (what a scraped collection contains)
GLTF_ENCODINGS = {
    "KHR_draco_mesh_compression": "draco",
    "EXT_meshopt_compression": "meshopt",
    "KHR_meshopt_compression": "meshopt",
    "KHR_mesh_quantization": "quantized",
    "KHR_texture_basisu": "ktx2",
    "EXT_texture_webp": "webp",
    "EXT_texture_avif": "avif",
}
# compressed geometry that Blender's importer decodes itself (inside the worker's wall)
DECODED_BY_IMPORTER = ("KHR_draco_mesh_compression",)
MAX_GLTF_JSON_BYTES = 64 << 20  # a larger JSON chunk is not read (the importer's limits apply to it)


def gltf_json(path: str | os.PathLike, fmt: str) -> dict | None:
    """The JSON document of a .gltf file or a .glb's JSON chunk; None when it cannot be read as one."""
    try:
        with open(path, "rb") as fh:
            if fmt == "glb":
                head = fh.read(20)
                if len(head) < 20 or head[:4] != b"glTF":
                    return None
                n, kind = struct.unpack("<II", head[12:20])
                if kind != 0x4E4F534A or n > MAX_GLTF_JSON_BYTES:
                    return None
                text = fh.read(n)
            else:
                text = fh.read(MAX_GLTF_JSON_BYTES + 1)
                if len(text) > MAX_GLTF_JSON_BYTES:
                    return None
        doc = json.loads(text)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _names(value) -> list[str]:
    return [x for x in value if isinstance(x, str)] if isinstance(value, list) else []


def gltf_extensions(doc: dict) -> tuple[set[str], set[str]]:
    """(extensionsUsed, extensionsRequired) of a glTF document."""
    return set(_names(doc.get("extensionsUsed"))), set(_names(doc.get("extensionsRequired")))


def compressed_geometry(doc: dict | None) -> str | None:
    """The compression extension whose decoded data the geometry check needs, or None.

    Draco: always (its accessors have no bufferView). Meshopt only when required: an optional meshopt
    extension comes with an uncompressed fallback the raw accessors read."""
    if doc is None:
        return None
    used, required = gltf_extensions(doc)
    for ext in DECODED_BY_IMPORTER:
        if ext in used | required:
            return ext
    for ext in ("EXT_meshopt_compression", "KHR_meshopt_compression"):
        if ext in required:
            return ext
    return None


def asset_encoding(path: str | os.PathLike, fmt: str) -> str:
    """``<format>/<encoding>[+<encoding>…]`` of one asset file: glTF/GLB encodings from their extensions
    (``plain`` or, for a .gltf whose buffers and images are all data: URIs, ``embedded``); OBJ ``mtl`` when it
    names a material library; other formats ``<format>/plain``."""
    fmt = fmt.lower().lstrip(".")
    if fmt in ("gltf", "glb"):
        doc = gltf_json(path, fmt)
        if doc is None:
            return f"{fmt}/unreadable"
        used, required = gltf_extensions(doc)
        names = sorted({GLTF_ENCODINGS[e] for e in used | required if e in GLTF_ENCODINGS})
        if not names and fmt == "gltf":
            uris = [x.get("uri") for key in ("buffers", "images") for x in doc.get(key) or []
                    if isinstance(x, dict) and isinstance(x.get("uri"), str)]
            if uris and all(u.startswith("data:") for u in uris):
                names = ["embedded"]
        return f"{fmt}/{'+'.join(names) or 'plain'}"
    if fmt == "obj":
        try:
            with open(path, "rb") as fh:
                mtl = any(line.startswith(b"mtllib") for line in fh)
        except OSError:
            mtl = False
        return "obj/mtl" if mtl else "obj/plain"
    return f"{fmt}/plain"


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
    import trimesh  # heavy: trimesh, PIL

    fmt = fmt.lower()
    if fmt not in PARSED_FORMATS:
        raise MeshError(f"format {fmt!r} is not parsed without a renderer")
    if fmt in ("gltf", "glb"):
        ext = compressed_geometry(gltf_json(path, fmt))
        if ext in DECODED_BY_IMPORTER:
            raise CompressedGeometry(f"geometry compressed with {ext} (the raw accessors hold no data)")
        if ext:  # Blender's importer has no decoder for it: its accessors would read an empty fallback
            raise MeshError(f"unsupported encoding: {ext} required (no decoder in the renderer)")
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
