"""External references an asset file makes, and the rule that keeps every asset self-contained.

An asset may only refer to ``data:`` URIs and to relative paths that stay inside its own bundle (the directory
of its main file) after normalisation and symlink resolution. Everything else (absolute paths, ``../`` escapes,
URLs, drive letters, symlinks leading out) fails the asset with ``external reference outside the asset: …``
before any importer sees it.

References found per format (``references``):
* glTF / GLB: ``buffers[].uri``, ``images[].uri`` (GLB: of its JSON chunk); ``data:`` only as
  ``data:<mime>;base64,`` (an importer reads any other ``data:`` string as a path)
* OBJ: ``mtllib`` names; MTL: texture maps (``map_*``, ``bump``, ``disp``, ``decal``, ``refl``, ``norm``);
  statements split as Blender's parser splits them (``obj_statements``), every token and quoted name a candidate
* DAE: ``<init_from>`` and ``url="…"`` attributes that are not in-document (``#id``)
* FBX: ``FileName`` / ``Filename`` / ``RelativeFilename`` properties (binary and ASCII FBX)
* .blend: path strings (``//relative`` or absolute) naming files of known kinds, through every gzip member or
  zstd frame
* USDA: ``@asset path@`` and ``@@@…@@@`` references; any USD expression (``${…}``, backquotes) fails
* PLY: ``comment TextureFile``
Formats whose references are binary-encoded (USDC, USDZ, Alembic) are refused by the content rules
(pipelines.preprocess.asset_content) unless explicitly enabled for sandboxed rendering.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import struct
from pathlib import Path
from urllib.parse import unquote
import zstandard

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
_USDA_REF = re.compile(rb"@@@(.*?)@@@|@([^@\n]*)@", re.DOTALL)
_DATA_URI = re.compile(r"^data:[\w.+\-]+/[\w.+\-]+(;[\w.+\-]+=[\w.+\-]+)*;base64,[A-Za-z0-9+/=\s]*$")


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


def obj_statements(data: bytes) -> list[tuple[str, str]]:
    """(keyword, rest) per statement of an OBJ or MTL file, split as Blender's parser splits them: a backslash
    before a line break continues the line, lines end at ``\n`` only, and every byte up to the space (tabs,
    ``\r``, vertical tab, any control character) is white space."""
    text = re.sub(rb"\\\r?\n", b" ", data).decode("latin-1")
    out = []
    for line in text.split("\n"):
        s = line.lstrip(_OBJ_SPACE)
        if not s:
            continue
        parts = re.split(f"[{re.escape(_OBJ_SPACE)}]+", s, maxsplit=1)
        out.append((parts[0], parts[1].strip(_OBJ_SPACE) if len(parts) > 1 else ""))
    return out


_OBJ_SPACE = "".join(chr(c) for c in range(0x21))


def _path_candidates(arg: str) -> list[str]:
    """Every file name an importer could read from a statement's argument: the whole of it, each token, each
    with and without quotes."""
    toks = [t for t in re.split(f"[{re.escape(_OBJ_SPACE)}]+", arg) if t]
    cands = [arg, *toks]
    cands += [c.strip("\"'") for c in cands]
    cands += [m for m in re.findall(r'"([^"]*)"', arg)]
    return list(dict.fromkeys(c for c in cands if c.strip(_OBJ_SPACE + "\"'")))


def _mtl_file(arg: str) -> list[str]:
    """The file name of a texture statement (options like ``-bm 1.0`` come first); the whole remainder and
    each token too, since an importer may read a name with spaces or quotes."""
    toks = [t for t in re.split(f"[{re.escape(_OBJ_SPACE)}]+", arg) if t]
    i = 0
    while i < len(toks) and toks[i].lower() in _MTL_OPTION_ARGS:
        i += 1 + _MTL_OPTION_ARGS[toks[i].lower()]
    rest = toks[i:]
    return _path_candidates(" ".join(rest)) if rest else []


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


def decompress_all(data: bytes, cap: int = 1 << 31) -> bytes:
    """A gzip or zstd file decompressed through every frame / member (an importer reads them all), at most
    ``cap`` bytes; other data unchanged."""
    if data[:2] == b"\x1f\x8b":
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:  # reads every member
            out = _read_capped(f, cap)
    elif data[:4] == b"\x28\xb5\x2f\xfd":  # zstd (Blender >= 3.0 compressed files)

        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True) as f:
            out = _read_capped(f, cap)
    else:
        return data
    return out


def _read_capped(f, cap: int) -> bytes:
    buf, n = [], 0
    while chunk := f.read(1 << 20):
        n += len(chunk)
        if n > cap:
            raise ValueError(f"size cap: decompresses to more than {cap} bytes")
        buf.append(chunk)
    return b"".join(buf)


def _blend_refs(data: bytes) -> list[str]:
    data = decompress_all(data)
    return [m.group(0).decode("ascii") for m in _BLEND_PATH.finditer(data)]


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
            for keyword, arg in obj_statements(data):
                if keyword.lower() == "mtllib":
                    out += _path_candidates(arg)
            return out
        if fmt == "mtl":
            out = []
            for keyword, arg in obj_statements(data):
                if _MTL_MAP.match(keyword + " x"):
                    out += _mtl_file(arg)
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
            return [(m.group(1) or m.group(2) or b"").decode("utf-8", "replace") for m in _USDA_REF.finditer(data)]
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
        if not _DATA_URI.match(ref):  # an importer reads what follows "data:" without ";base64," as a path
            raise ExternalReferenceError(ref[:80], "data: URI without <mime>;base64,")
        return None
    if fmt in ("usda", "usd") and ("${" in ref or "`" in ref):
        raise ExternalReferenceError(ref, "USD expression in an asset path")
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


def bundle_sha256(files: dict[str, bytes], main: str) -> str:
    """Identity of an asset: the sha256 of its main file alone, or for a bundle the sha256 over every file in a
    canonical order (the main file, then the others by path relative to the main file's directory; each as
    its relative path, NUL, its own sha256), so a swapped ``.bin`` is a different asset."""
    if len(files) == 1:
        return hashlib.sha256(files[main]).hexdigest()
    base = posixpath.dirname(main)
    rel = {k: posixpath.relpath(k, base) if base else k for k in files}
    h = hashlib.sha256(b"mdt-bundle-1\x00")
    for k in [main, *sorted((k for k in files if k != main), key=lambda k: rel[k])]:
        h.update(rel[k].encode() + b"\x00" + hashlib.sha256(files[k]).digest())
    return h.hexdigest()


def confined_reader(root: str | os.PathLike, max_bytes: int | None = None):
    """``read_rel`` for :func:`bundle_files` over a local directory: a path that resolves outside ``root``
    (a symlink) or to anything but a regular file (``/dev/*``, a FIFO) fails the asset."""
    from pipelines.common.storage import OutsideRootError, read_local_confined  # heavy: numpy, pyarrow

    def read_rel(rel: str) -> bytes | None:
        p = os.path.join(root, rel)
        if not os.path.lexists(p):
            return None
        try:
            return read_local_confined(p, root, max_bytes)
        except OutsideRootError as e:
            raise ExternalReferenceError(rel, str(e)) from None

    return read_rel


def check_tree(main: str | os.PathLike, root: str | os.PathLike) -> dict[str, bytes]:
    """Check a materialised asset before it is imported: every reference of the main file (recursively)
    resolves inside ``root``, and everything under ``root`` is a regular file or a directory (no symlink,
    device, FIFO or socket). Raises ExternalReferenceError; returns the bundle ({relative path: bytes})."""
    root = Path(root)
    for p in root.rglob("*"):
        if p.is_symlink():
            raise ExternalReferenceError(str(p.relative_to(root)), "symlink in the bundle")
        if not (p.is_file() or p.is_dir()):
            raise ExternalReferenceError(str(p.relative_to(root)), "not a regular file")
    main = Path(main)
    rel = main.relative_to(root).as_posix()
    return bundle_files(rel, main.read_bytes(), confined_reader(root))
