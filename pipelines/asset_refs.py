"""External references an asset file makes, and the rule that keeps every asset self-contained.

An asset may only refer to ``data:`` URIs and to relative paths that stay inside its own bundle (the directory
of its main file) after normalisation and symlink resolution. Everything else (absolute paths, ``../`` escapes,
URLs, drive letters, symlinks leading out) fails the asset with ``external reference outside the asset: …``
before any importer sees it.

References found per format (``references``):
* glTF / GLB: ``buffers[].uri``, ``images[].uri`` (GLB: of its JSON chunk)
* OBJ: ``mtllib`` names; MTL: texture maps (``map_*``, ``bump``, ``disp``, ``decal``, ``refl``, ``norm``)
* DAE: ``<init_from>`` and ``url="…"`` attributes that are not in-document (``#id``)
* FBX: ``FileName`` / ``Filename`` / ``RelativeFilename`` properties (binary and ASCII FBX)
* .blend: path strings (``//relative`` or absolute) naming files of known kinds (libraries, images, media)
* USDA: ``@asset path@`` references; PLY: ``comment TextureFile``
Formats whose references are binary-encoded beyond a cheap scan (USDC, USDZ layers, Alembic layers) are
covered by the render worker's own check after import and by its file-system wall (pipelines/README.md).
"""
from __future__ import annotations

import gzip
import json
import os
import posixpath
import re
import struct
from pathlib import Path
from urllib.parse import unquote

OUTSIDE = "external reference outside the asset"
# Formats that may refer to other files (the download stage bundles what they refer to).
REFERRING_FORMATS = {"glb", "gltf", "obj", "mtl", "dae", "fbx", "blend", "usda", "ply"}

_MTL_MAP = re.compile(r"^\s*(map_\w+|bump|disp|decal|refl|norm)\s+(.+)$", re.IGNORECASE)
_MTL_OPTION_ARGS = {"-bm": 1, "-blendu": 1, "-blendv": 1, "-boost": 1, "-cc": 1, "-clamp": 1, "-imfchan": 1,
                    "-mm": 2, "-o": 3, "-s": 3, "-t": 3, "-texres": 1, "-type": 1}
_FBX_BINARY = re.compile(rb"(?:\x08FileName|\x08Filename|\x10RelativeFilename)S")
_FBX_ASCII = re.compile(rb"(?:FileName|Filename|RelativeFilename)\s*:\s*\"([^\"]*)\"")
_BLEND_EXT = (b"blend|png|jpe?g|exr|hdr|tiff?|tga|bmp|webp|dds|cin|dpx|j2c|jp2|psd|mp4|mov|avi|mkv|ogg|ogv|webm|"
              b"wav|mp3|flac|abc|usd[acz]?|vdb|ttf|otf|pfb|svg|obj|ply|stl|fbx|glb|gltf|py|txt")
_BLEND_PATH = re.compile(rb"(?:/|[A-Za-z]:[\\/]|\\\\)[\x20-\x7e]{0,1000}?\.(?:" + _BLEND_EXT + rb")(?=\x00)",
                         re.IGNORECASE)
_USDA_REF = re.compile(rb"@([^@\n]*)@")


class ExternalReferenceError(Exception):
    """The asset refers to something outside its bundle; the message names the reference."""

    def __init__(self, ref: str, why: str = ""):
        super().__init__(f"{OUTSIDE}: {ref!r}" + (f" ({why})" if why else ""))


def file_format(name: str) -> str:
    base = name.lower().replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1] if "." in base else ""


def _gltf_refs(doc: dict) -> list[str]:
    out = []
    for key in ("buffers", "images"):
        for item in doc.get(key) or []:
            if isinstance(item, dict) and isinstance(item.get("uri"), str):
                out.append(item["uri"])
    return out


def _glb_json(data: bytes) -> dict:
    if len(data) < 20 or data[:4] != b"glTF":
        return {}
    n, kind = struct.unpack("<II", data[12:20])
    if kind != 0x4E4F534A:  # "JSON"
        return {}
    return json.loads(data[20:20 + n])


def _mtl_file(arg: str) -> list[str]:
    """The file name of a texture statement (options like ``-bm 1.0`` come first); the whole remainder too,
    since an importer may read a name with spaces."""
    toks = arg.split()
    i = 0
    while i < len(toks) and toks[i].lower() in _MTL_OPTION_ARGS:
        i += 1 + _MTL_OPTION_ARGS[toks[i].lower()]
    rest = toks[i:]
    return [" ".join(rest), rest[-1]] if rest else []


def _fbx_refs(data: bytes) -> list[str]:
    out = []
    for m in _FBX_BINARY.finditer(data):
        p = m.end()
        if p + 4 <= len(data):
            n = struct.unpack("<I", data[p:p + 4])[0]
            if n <= 4096:
                out.append(data[p + 4:p + 4 + n].decode("utf-8", "replace"))
    if data[:18] != b"Kaydara FBX Binary":
        out += [m.group(1).decode("utf-8", "replace") for m in _FBX_ASCII.finditer(data)]
    return out


def _blend_refs(data: bytes) -> list[str]:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    elif data[:4] == b"\x28\xb5\x2f\xfd":  # zstd (Blender >= 3.0 compressed files)
        import zstandard

        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    out = []
    for m in _BLEND_PATH.finditer(data):
        s = m.group(0).decode("ascii")
        out.append(s)
    return out


def references(fmt: str, data: bytes) -> list[str]:
    """Every reference string the file makes (``data:`` URIs included). Raises ValueError on a file whose
    references cannot be read (e.g. a glTF that is not JSON)."""
    fmt = fmt.lower()
    try:
        if fmt == "gltf":
            return _gltf_refs(json.loads(data.decode("utf-8")))
        if fmt == "glb":
            return _gltf_refs(_glb_json(data))
        if fmt == "obj":
            out = []
            for line in data.decode("utf-8", "replace").splitlines():
                s = line.strip()
                if s[:7].lower() == "mtllib " or s[:7].lower() == "mtllib\t":
                    arg = s[7:].strip()
                    out += [arg, *arg.split()]
            return out
        if fmt == "mtl":
            out = []
            for line in data.decode("utf-8", "replace").splitlines():
                m = _MTL_MAP.match(line)
                if m:
                    out += _mtl_file(m.group(2))
            return out
        if fmt == "dae":
            text = data.decode("utf-8", "replace")
            out = re.findall(r"<init_from>\s*([^<]+?)\s*</init_from>", text)
            out += [u for u in re.findall(r"\burl\s*=\s*\"([^\"]*)\"", text) if not u.startswith("#")]
            return out
        if fmt == "fbx":
            return _fbx_refs(data)
        if fmt == "blend":
            return _blend_refs(data)
        if fmt == "usda":
            return [m.group(1).decode("utf-8", "replace") for m in _USDA_REF.finditer(data)]
        if fmt == "ply":
            head = data[:65536].split(b"end_header", 1)[0].decode("ascii", "replace")
            return [ln.split(None, 2)[2].strip() for ln in head.splitlines()
                    if ln.lower().startswith("comment texturefile") and len(ln.split(None, 2)) == 3]
    except (UnicodeDecodeError, json.JSONDecodeError, struct.error, AttributeError) as e:
        raise ValueError(f"unreadable {fmt} file: {type(e).__name__}") from None
    return []


def resolve_reference(ref: str, referrer: str, fmt: str = "") -> str | None:
    """Bundle-relative path of a reference made by the file ``referrer`` (itself bundle-relative), or None for a
    ``data:`` URI. Raises :class:`ExternalReferenceError` for anything that would leave the bundle."""
    if ref.startswith("data:"):
        return None
    r = ref
    if fmt in ("gltf", "glb", "dae", "usda"):
        r = unquote(r)  # URIs: %2e%2e is ".."
    r = r.replace("\\", "/").strip()
    if "\x00" in r or not r:
        raise ExternalReferenceError(ref, "empty or NUL in path")
    if fmt == "blend" and r.startswith("//"):
        r = r[2:]  # Blender's "relative to the .blend file"
    if r.startswith("/") or re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", r):
        raise ExternalReferenceError(ref)  # absolute path, drive letter or URL scheme (file:, http:, ...)
    rel = posixpath.normpath(posixpath.join(posixpath.dirname(referrer), r))
    if rel == ".." or rel.startswith("../") or rel.startswith("/"):
        raise ExternalReferenceError(ref)
    return rel


def bundle_files(main_name: str, main_bytes: bytes, read_rel, max_files: int = 256) -> dict[str, bytes]:
    """The main file plus everything it refers to, recursively (obj -> mtl -> textures).

    ``read_rel(rel)`` returns the bytes of a bundle-relative path, None when it does not exist, and raises
    :class:`ExternalReferenceError` when the path leads out of the bundle (a symlink). A reference that
    leaves the bundle raises; a missing referenced file is left to the importer.
    """
    files = {main_name: main_bytes}
    queue = [main_name]
    base = posixpath.dirname(main_name)  # the bundle is the main file's directory (inside an archive too)
    while queue:
        cur = queue.pop(0)
        fmt = file_format(cur)
        if fmt not in REFERRING_FORMATS:
            continue
        for ref in references(fmt, files[cur]):
            rel = resolve_reference(ref, cur, fmt)
            if rel is None or rel in files:
                continue
            if base and not rel.startswith(base + "/"):
                raise ExternalReferenceError(ref)
            data = read_rel(rel)
            if data is None:
                continue
            if len(files) >= max_files:
                raise ValueError(f"asset refers to more than {max_files} files")
            files[rel] = data
            queue.append(rel)
    return files


def confined_reader(root: str | os.PathLike, max_bytes: int | None = None):
    """``read_rel`` for :func:`bundle_files` over a local directory: a path that resolves outside ``root``
    (a symlink) or to anything but a regular file (``/dev/*``, a FIFO) fails the asset."""
    from pipelines.storage import OutsideRootError, read_local_confined

    def read_rel(rel: str) -> bytes | None:
        p = os.path.join(root, rel)
        if not os.path.lexists(p):
            return None
        try:
            return read_local_confined(p, root, max_bytes)
        except OutsideRootError as e:
            raise ExternalReferenceError(rel, str(e)) from None

    return read_rel


def check_tree(main: str | os.PathLike, root: str | os.PathLike) -> None:
    """Check a materialised asset before it is imported: every reference of the main file (recursively)
    resolves inside ``root``, and everything under ``root`` is a regular file or a directory (no symlink,
    device, FIFO or socket). Raises ExternalReferenceError."""
    root = Path(root)
    for p in root.rglob("*"):
        if p.is_symlink():
            raise ExternalReferenceError(str(p.relative_to(root)), "symlink in the bundle")
        if not (p.is_file() or p.is_dir()):
            raise ExternalReferenceError(str(p.relative_to(root)), "not a regular file")
    main = Path(main)
    rel = main.relative_to(root).as_posix()
    bundle_files(rel, main.read_bytes(), confined_reader(root))
