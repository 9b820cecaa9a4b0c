"""What an asset file is, read from its bytes, and the content rules an asset must pass before any importer
opens it. Names (extensions) only say which rule applies; the bytes must agree.

* ``sniff``: format by magic bytes (``glTF``, ``BLENDER`` also inside gzip/zstd, ``Kaydara FBX Binary``,
  ``ply``, ``PXR-USDC``, ``#usda``, zip, Alembic Ogawa/HDF5, JSON, XML, image formats).
* ``check_content(fmt, data)``: the extension's format must be the content's (a ``.glb`` holding glTF JSON, a
  ``.usd`` holding USDC, a ``.obj`` holding a GLB all fail); formats whose references cannot be scanned (binary
  USD, USDZ, Alembic) fail unless listed in ``unscannable_ok``; a ``.blend`` fails when it links libraries or
  holds a block that reads files by itself at evaluation time (geometry-node Import nodes, Mesh Cache / Mesh
  Sequence Cache modifiers, cache files, fluid / ocean caches); images fail above ``max_pixels``.
* ``check_gltf(doc, buffers)``: every accessor and buffer view lies inside its buffer, counts are sane, and
  every image (file, ``data:`` URI or buffer view) is a known format within the pixel cap.

Every failure is a :class:`ContentError` whose message is short and names no local path.
"""
from __future__ import annotations

import base64
import json
import re
import struct
from pipelines.preprocess.asset_refs import decompress_all
from pipelines.preprocess.asset_refs import file_format, resolve_reference

# Formats whose external references live in binary structures the checker does not parse.
UNSCANNABLE = {"usdc": "binary USD", "usdz": "packaged USD", "abc": "Alembic"}
MAX_PIXELS = 8192 * 8192  # per image; Blender decodes a whole image into RAM (float RGBA: 16 B/pixel)
MAX_ACCESSOR_COUNT = 1 << 26
# .blend struct types that read files when the scene is evaluated (not datablocks with a `filepath` that the
# worker's post-import check sees) or that bring other .blend files in.
BLEND_FORBIDDEN_STRUCTS = {
    "MeshCacheModifierData": "Mesh Cache modifier", "MeshSeqCacheModifierData": "Mesh Sequence Cache modifier",
    "CacheFile": "cache file", "Library": "linked library", "FluidDomainSettings": "fluid cache",
    "OceanModifierData": "ocean cache",
}
BLEND_FORBIDDEN_CODES = {b"LI\x00\x00": "linked library", b"CF\x00\x00": "cache file"}
_IMPORT_NODE = re.compile(rb"GeometryNodeImport\w*")


class ContentError(ValueError):
    """The asset's bytes break a content rule; the message is the reason."""


def sniff(data: bytes) -> str:
    """Format of ``data`` by its leading bytes: a mesh format, an image format, ``gzip``/``zstd`` (other
    than a compressed .blend), ``text``, or ``binary``."""
    head = data[:64]
    if head[:4] == b"glTF":
        return "glb"
    if head[:7] == b"BLENDER":
        return "blend"
    if head[:2] == b"\x1f\x8b" or head[:4] == b"\x28\xb5\x2f\xfd":

        try:
            inner = decompress_all(data, cap=1 << 31)
        except Exception:  # noqa: BLE001 - corrupt stream
            return "binary"
        return "blend" if inner[:7] == b"BLENDER" else "compressed"
    if head[:18] == b"Kaydara FBX Binary":
        return "fbx"
    if head[:8] == b"PXR-USDC":
        return "usdc"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:5] == b"Ogawa" or head[:4] == b"\x89HDF":
        return "abc"
    for magic, kind in ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"\xabKTX 20\xbb", "ktx2"),
                        (b"GIF8", "gif"), (b"BM", "bmp"), (b"\x76\x2f\x31\x01", "exr"), (b"#?RADIANCE", "hdr"),
                        (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"DDS ", "dds")):
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:3] == b"ply" and text[3:4] in (b"\n", b"\r"):
        return "ply"
    if text[:5] == b"#usda":
        return "usda"
    if text[:1] in (b"{", b"["):
        return "json"
    if text[:5] == b"<?xml" or text[:8] == b"<COLLADA":
        return "xml"
    return "text" if b"\x00" not in data[:4096] else "binary"


# extension -> contents it may hold
_ALLOWED = {
    "glb": {"glb"}, "gltf": {"json"}, "blend": {"blend"}, "fbx": {"fbx", "text"}, "ply": {"ply"},
    "usda": {"usda"}, "usd": {"usda", "usdc"}, "usdc": {"usdc"}, "usdz": {"zip"}, "abc": {"abc"},
    "obj": {"text"}, "mtl": {"text"}, "stl": {"text", "binary"}, "dae": {"xml"},
}
IMAGE_FORMATS = {"png", "jpeg", "webp", "ktx2", "gif", "bmp", "exr", "hdr", "tiff", "dds"}


def check_content(fmt: str, data: bytes, unscannable_ok: frozenset | set = frozenset(),
                  max_pixels: int = MAX_PIXELS) -> str:
    """The content format of a file named with extension ``fmt`` (raises ContentError when they disagree or
    a rule fails). Extensions without a rule (buffers, unknown sidecars) are returned as sniffed."""
    kind = sniff(data)
    fmt = fmt.lower()
    if fmt in _ALLOWED:
        if not data:
            raise ContentError("empty or missing asset file")
        if kind not in _ALLOWED[fmt]:
            raise ContentError(f"content is not {fmt}: the file holds {kind} data")
        if fmt == "usd" and kind == "usdc":
            fmt = "usdc"
        if fmt in UNSCANNABLE and fmt not in unscannable_ok:
            raise ContentError(f"unscannable format: {fmt} ({UNSCANNABLE[fmt]})")
        if fmt == "blend":
            check_blend(data)
        return kind
    if kind in IMAGE_FORMATS or fmt in ("png", "jpg", "jpeg", "webp", "ktx2", "bmp", "tga", "tif", "tiff",
                                         "exr", "hdr", "gif", "dds"):
        check_image(data, max_pixels, fmt)
    return kind


def check_bundle(files: dict[str, bytes], main: str, unscannable_ok: frozenset | set = frozenset(),
                 max_pixels: int = MAX_PIXELS) -> None:
    """Every content rule over an asset bundle ({bundle-relative path: bytes}, ``main`` its main file):
    each file's content agrees with its name, images are within the pixel cap, a glTF's accessors, buffer
    views and images are sane."""

    for rel, data in files.items():
        check_content(file_format(rel), data, unscannable_ok, max_pixels)
    fmt = file_format(main)
    if fmt not in ("gltf", "glb"):
        return
    if fmt == "glb":
        doc, binary = glb_chunks(files[main])
    else:
        try:
            doc, binary = json.loads(files[main]), None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ContentError("gltf file is not JSON") from None

    def referenced(uri):
        if uri.startswith("data:"):
            try:
                return base64.b64decode(uri.split(";base64,", 1)[1])
            except (IndexError, ValueError):
                raise ContentError("data: URI is not base64") from None
        return files.get(resolve_reference(uri, main, fmt))

    def buffer_bytes(i):
        buffers = doc.get("buffers") or []
        b = buffers[i] if isinstance(i, int) and 0 <= i < len(buffers) else None
        if not isinstance(b, dict):
            raise ContentError(f"glTF buffer {i} is missing")
        if "uri" not in b:
            return binary
        return referenced(b["uri"]) if isinstance(b["uri"], str) else None

    for img in doc.get("images") or []:
        if isinstance(img, dict) and isinstance(img.get("uri"), str) and not img["uri"].startswith("data:"):
            data = referenced(img["uri"])
            if data is not None:
                img["_bytes"] = data
    check_gltf(doc, buffer_bytes, max_pixels)


# ------------------------------------------------------------------------------------------------ images


def image_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from an image's header, without decoding it. Raises ContentError for a format
    whose header is not read here (deny by default: the importer would decode it unbounded)."""
    kind = sniff(data)
    try:
        if kind == "png":
            w, h = struct.unpack(">II", data[16:24])
            return kind, w, h
        if kind == "jpeg":
            i = 2
            while i + 9 < len(data):
                if data[i] != 0xFF:
                    i += 1
                    continue
                marker = data[i + 1]
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                    i += 1 if marker == 0xFF else 2
                    continue
                n = struct.unpack(">H", data[i + 2:i + 4])[0]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    h, w = struct.unpack(">HH", data[i + 5:i + 9])
                    return kind, w, h
                i += 2 + n
            raise ContentError("jpeg image without a frame header")
        if kind == "webp":
            chunk = data[12:16]
            if chunk == b"VP8X":
                w = int.from_bytes(data[24:27], "little") + 1
                h = int.from_bytes(data[27:30], "little") + 1
            elif chunk == b"VP8L":
                b = int.from_bytes(data[21:25], "little")
                w, h = (b & 0x3FFF) + 1, ((b >> 14) & 0x3FFF) + 1
            elif chunk == b"VP8 ":
                w, h = (x & 0x3FFF for x in struct.unpack("<HH", data[26:30]))
            else:
                raise ContentError("webp image with an unknown chunk")
            return kind, w, h
        if kind == "ktx2":
            w, h = struct.unpack("<II", data[20:28])
            return kind, w, max(h, 1)
        if kind == "gif":
            w, h = struct.unpack("<HH", data[6:10])
            return kind, w, h
        if kind == "bmp":
            w, h = struct.unpack("<ii", data[18:26])
            return kind, abs(w), abs(h)
    except struct.error:
        raise ContentError(f"truncated {kind} image header") from None
    raise ContentError(f"image format not accepted: {kind}")


def check_image(data: bytes, max_pixels: int = MAX_PIXELS, name: str = "") -> None:
    kind, w, h = image_size(data)
    if w * h > max_pixels:
        raise ContentError(f"pixel cap: {kind} image of {w}x{h} pixels > {max_pixels}")


# ------------------------------------------------------------------------------------------------ glTF


_COMPONENT_BYTES = {5120: 1, 5121: 1, 5122: 2, 5123: 2, 5125: 4, 5126: 4}
_TYPE_COMPONENTS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT2": 4, "MAT3": 9, "MAT4": 16}


def glb_chunks(data: bytes) -> tuple[dict, bytes | None]:
    """(JSON document, BIN chunk or None) of a GLB."""
    if len(data) < 20 or data[:4] != b"glTF":
        raise ContentError("content is not glb")
    total = struct.unpack("<I", data[8:12])[0]
    n, kind = struct.unpack("<II", data[12:20])
    if kind != 0x4E4F534A or 20 + n > len(data):
        raise ContentError("GLB without a readable JSON chunk")
    try:
        doc = json.loads(data[20:20 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ContentError("GLB JSON chunk is not JSON") from None
    p = 20 + n + (-n % 4)
    binary = None
    if p + 8 <= min(total, len(data)):
        m, kind = struct.unpack("<II", data[p:p + 8])
        if kind == 0x004E4942:
            binary = data[p + 8:p + 8 + m]
    return doc, binary


def check_gltf(doc: dict, buffer_bytes, max_pixels: int = MAX_PIXELS) -> None:
    """Bounds of accessors and buffer views, and image sizes, of a glTF document. ``buffer_bytes(i)`` returns
    the bytes of buffer ``i`` (None when not available: its bounds are then checked against byteLength only);
    ``image_bytes`` of file images are given the same way through ``doc['images'][i]['_bytes']``."""
    if not isinstance(doc, dict):
        raise ContentError("glTF document is not an object")
    buffers = doc.get("buffers") or []
    views = doc.get("bufferViews") or []
    lengths = []
    for i, b in enumerate(buffers):
        n = b.get("byteLength") if isinstance(b, dict) else None
        if not isinstance(n, int) or n < 0:
            raise ContentError(f"glTF buffer {i} without a valid byteLength")
        data = buffer_bytes(i)
        if data is not None and len(data) < n:
            raise ContentError(f"glTF buffer {i} holds {len(data)} bytes < byteLength {n}")
        lengths.append(n)
    for i, v in enumerate(views):
        try:
            b, off, n = v["buffer"], int(v.get("byteOffset", 0)), int(v["byteLength"])
            stride = int(v.get("byteStride", 0))
        except (KeyError, TypeError, ValueError):
            raise ContentError(f"glTF bufferView {i} is malformed") from None
        if not (isinstance(b, int) and 0 <= b < len(lengths)) or off < 0 or n < 0 or off + n > lengths[b] \
                or not 0 <= stride <= 252:
            raise ContentError(f"glTF bufferView {i} out of bounds")
    for i, a in enumerate(doc.get("accessors") or []):
        try:
            count = int(a["count"])
            size = _COMPONENT_BYTES[a["componentType"]] * _TYPE_COMPONENTS[a["type"]]
        except (KeyError, TypeError, ValueError):
            raise ContentError(f"glTF accessor {i} is malformed") from None
        if not 0 <= count <= MAX_ACCESSOR_COUNT:
            raise ContentError(f"glTF accessor {i} count {count} out of range")
        if "bufferView" in a:
            vi = a["bufferView"]
            if not (isinstance(vi, int) and 0 <= vi < len(views)):
                raise ContentError(f"glTF accessor {i} names a missing bufferView")
            v = views[vi]
            stride = int(v.get("byteStride", 0)) or size
            need = int(a.get("byteOffset", 0)) + (stride * (count - 1) + size if count else 0)
            if int(a.get("byteOffset", 0)) < 0 or need > int(v["byteLength"]):
                raise ContentError(f"glTF accessor {i} out of bounds of its bufferView")
        sparse = a.get("sparse")
        if sparse is not None:
            n = int(sparse.get("count", -1)) if isinstance(sparse, dict) else -1
            if not 0 < n <= count:
                raise ContentError(f"glTF accessor {i} sparse count out of range")
    for i, img in enumerate(doc.get("images") or []):
        if not isinstance(img, dict):
            raise ContentError(f"glTF image {i} is malformed")
        data = None
        uri = img.get("uri")
        if isinstance(uri, str) and uri.startswith("data:"):
            try:
                data = base64.b64decode(uri.split(";base64,", 1)[1][:64 * 1024])
            except (IndexError, ValueError):
                raise ContentError(f"glTF image {i} data: URI is not base64") from None
        elif "bufferView" in img:
            vi = img["bufferView"]
            if not (isinstance(vi, int) and 0 <= vi < len(views)):
                raise ContentError(f"glTF image {i} names a missing bufferView")
            v = views[vi]
            buf = buffer_bytes(v["buffer"])
            if buf is not None:
                off = int(v.get("byteOffset", 0))
                data = buf[off:off + int(v["byteLength"])]
        elif isinstance(img.get("_bytes"), (bytes, bytearray)):
            data = img["_bytes"]
        if data is not None:
            check_image(bytes(data), max_pixels)


# ------------------------------------------------------------------------------------------------ .blend


def blend_blocks(data: bytes):
    """(block code, struct type name, offset, length) of each block of an uncompressed .blend file."""
    if data[:7] != b"BLENDER":
        raise ContentError("content is not blend")
    if data[7:9].isdigit():  # "BLENDER17-01v0500": header size, file format version (large block headers)
        hsize = int(data[7:9])
        if data[9:10] != b"-" or data[12:13] != b"v":
            raise ContentError("blend header not understood")
        head, hlen = "<4siQqq", 32  # code, struct index, old pointer, length, count

        def unpack(p):
            code, sdna, _, n, _ = struct.unpack_from(head, data, p)
            return code, sdna, n
    else:
        hsize = 12
        ptr = {b"_": 4, b"-": 8}.get(data[7:8])
        end = {b"v": "<", b"V": ">"}.get(data[8:9])
        if ptr is None or end is None:
            raise ContentError("blend header not understood")
        head = f"{end}4si{'I' if ptr == 4 else 'Q'}ii"  # code, length, old pointer, struct index, count
        hlen = struct.calcsize(head)

        def unpack(p):
            code, n, _, sdna, _ = struct.unpack_from(head, data, p)
            return code, sdna, n
    blocks, p = [], hsize
    try:
        while p + hlen <= len(data):
            code, sdna, n = unpack(p)
            if code == b"ENDB":
                break
            if n < 0 or p + hlen + n > len(data):
                raise ContentError("blend block out of bounds")
            blocks.append((code, sdna, p + hlen, n))
            p += hlen + n
        else:
            raise ContentError("blend file without its end block")
    except struct.error:
        raise ContentError("blend file truncated") from None
    dna = [b for b in blocks if b[0] == b"DNA1"]
    if not dna:
        raise ContentError("blend file without its DNA block")
    names = _sdna_struct_names(data[dna[0][2]:dna[0][2] + dna[0][3]])
    return [(code, names[s] if 0 <= s < len(names) else "", off, n) for code, s, off, n in blocks]


def _sdna_struct_names(dna: bytes) -> list[str]:
    """Struct index -> type name, from a DNA1 block (SDNA NAME / TYPE / TLEN / STRC sections)."""
    try:
        assert dna[:8] == b"SDNANAME"
        p = 8
        n = struct.unpack_from("<i", dna, p)[0]
        p += 4
        for _ in range(n):
            p = dna.index(b"\x00", p) + 1
        p += -p % 4
        assert dna[p:p + 4] == b"TYPE"
        n = struct.unpack_from("<i", dna, p + 4)[0]
        p += 8
        types = []
        for _ in range(n):
            e = dna.index(b"\x00", p)
            types.append(dna[p:e].decode("ascii", "replace"))
            p = e + 1
        p += -p % 4
        assert dna[p:p + 4] == b"TLEN"
        p += 4 + 2 * n
        p += -p % 4
        assert dna[p:p + 4] == b"STRC"
        ns = struct.unpack_from("<i", dna, p + 4)[0]
        p += 8
        out = []
        for _ in range(ns):
            t, nf = struct.unpack_from("<hh", dna, p)
            out.append(types[t])
            p += 4 + 4 * nf
        return out
    except (AssertionError, ValueError, struct.error, IndexError):
        raise ContentError("blend DNA block not understood") from None


def check_blend(data: bytes) -> None:
    """Refuse a .blend that links other files or holds a block that reads files by itself (module doc)."""

    try:
        raw = decompress_all(data)
    except Exception as e:  # noqa: BLE001 - corrupt stream
        raise ContentError(f"blend file cannot be decompressed: {type(e).__name__}") from None
    for code, struct_name, off, n in blend_blocks(raw):
        if code in BLEND_FORBIDDEN_CODES:
            raise ContentError(f"blend file holds a {BLEND_FORBIDDEN_CODES[code]}")
        why = BLEND_FORBIDDEN_STRUCTS.get(struct_name)
        if why:
            raise ContentError(f"blend file holds a {why}")
    m = _IMPORT_NODE.search(raw)
    if m:
        raise ContentError(f"blend file holds a geometry-node import node ({m.group(0).decode()})")
