"""The hostile constructions one at a time, without Ray or Blender: each fails at the first wall that can see it,
with its reason (the same files run through the `demo` preset in tests/test_pipeline_hostile.py)."""
from __future__ import annotations

import json
import os

import pytest

from mdt.config import load_config
from pipelines.common import storage
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.download import Download
from pipelines.preprocess.sources.base import make_row
from pipelines.preprocess.synthetic_meshes import synthetic_mesh_glb


def make_cfg(tmp_path) -> PreprocessConfig:
    over = {"output": str(tmp_path / "out"), "download.cache_uri": str(tmp_path / "cache"),
            "download.extract_dir": str(tmp_path / "x")}
    return load_config(PreprocessConfig, None, [f"{k}={v}" for k, v in over.items()])


def local_row(root, rel):
    return make_row(source="local", file_identifier=rel, uri=str(root / rel), root=str(root))


def download(tmp_path, root, rel) -> dict:
    return Download(make_cfg(tmp_path))(local_row(root, rel))


# ----------------------------------------------------------------------------------- 1. the source root


@pytest.fixture
def folder(tmp_path):
    """assets/ with one good GLB, a symlinked directory and a symlinked file leading to outside/."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.glb").write_bytes(synthetic_mesh_glb(7))
    assets = tmp_path / "assets"
    (assets / "sub").mkdir(parents=True)
    (assets / "good.glb").write_bytes(synthetic_mesh_glb(1))
    (assets / "sub" / "inner.glb").write_bytes(synthetic_mesh_glb(2))
    (assets / "linked_dir").symlink_to(outside, target_is_directory=True)
    (assets / "inside_link_dir").symlink_to(assets / "sub", target_is_directory=True)
    (assets / "linked_file.glb").symlink_to(outside / "secret.glb")
    return assets, outside


def test_listing_never_enters_a_symlinked_directory(folder):
    assets, _ = folder
    listed = [os.path.relpath(u, assets) for u in storage.list_files(str(assets))]
    assert listed == ["good.glb", "linked_file.glb", "sub/inner.glb"]


def test_download_refuses_paths_through_symlinks(folder, tmp_path):
    assets, outside = folder
    assert download(tmp_path, assets, "good.glb")["error"] is None
    assert download(tmp_path, assets, "sub/inner.glb")["error"] is None
    for rel in ("linked_file.glb", "linked_dir/secret.glb", "inside_link_dir/inner.glb"):
        err = download(tmp_path, assets, rel)["error"]
        assert err == f"download: external reference outside the asset: {rel!r} (symlink in the source folder)", err
    cached = [p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert (outside / "secret.glb").read_bytes() not in cached


def test_bundle_members_must_be_regular_files_inside(tmp_path):
    """A glTF buffer that is a symlink to /dev/zero, to a FIFO or to a file outside fails with its reason."""
    from _pipeline_helpers import TRIANGLE, _gltf_doc

    assets = tmp_path / "assets"
    assets.mkdir()
    os.mkfifo(assets / "fifo.bin")
    (assets / "dev.bin").symlink_to("/dev/zero")
    (tmp_path / "out.bin").write_bytes(TRIANGLE)
    (assets / "out.bin").symlink_to(tmp_path / "out.bin")
    for name, why in (("fifo.bin", "not a regular file"), ("dev.bin", "symlink to outside the bundle"),
                      ("out.bin", "symlink to outside the bundle")):
        (assets / f"{name}.gltf").write_text(json.dumps(_gltf_doc(name, len(TRIANGLE))))
        err = download(tmp_path, assets, f"{name}.gltf")["error"]
        assert err == f"download: external reference outside the asset: {name!r} ({why})", err


# ----------------------------------------------------------------------------------- 3. content, not names


def gltf_with(uri: str, n: int = 36, **extra) -> dict:
    from _pipeline_helpers import _gltf_doc

    doc = _gltf_doc(uri, n)
    doc.update(extra)
    return doc


def png_header(w: int, h: int) -> bytes:
    """The first bytes of a PNG claiming w x h pixels (a decoder would allocate for all of them)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def one_file(tmp_path, name: str, data: bytes) -> str | None:
    d = tmp_path / "assets"
    d.mkdir(exist_ok=True)
    (d / name).parent.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)
    return download(tmp_path, d, name)["error"]


def zstd_frames(*parts: bytes) -> bytes:
    import zstandard

    c = zstandard.ZstdCompressor()
    return b"".join(c.compress(p) for p in parts)


def test_content_decides_the_format(tmp_path):
    from _pipeline_helpers import TRIANGLE, _glb_json_only

    json_in_glb = json.dumps(gltf_with("/etc/hostname")).encode()
    assert one_file(tmp_path, "json.glb", json_in_glb) == "download: content is not glb: the file holds json data"
    assert one_file(tmp_path, "glb.obj", synthetic_mesh_glb(3)) == \
        "download: content is not obj: the file holds glb data"
    assert one_file(tmp_path, "text.usd", b"hello\n") == "download: content is not usd: the file holds text data"
    assert one_file(tmp_path, "fake.blend", b"#usda 1.0\n") == \
        "download: content is not blend: the file holds usda data"
    assert one_file(tmp_path, "ok.glb", _glb_json_only(gltf_with(
        "data:application/octet-stream;base64," + __import__("base64").b64encode(TRIANGLE).decode()))) is None


@pytest.mark.parametrize("uri", ["data:/etc/hostname", "data:,/etc/hostname", "data:text/plain,../x.bin",
                                 "data:application/octet-stream;base64/../../etc/hostname"])
def test_data_uri_only_with_base64(tmp_path, uri):
    err = one_file(tmp_path, "d.gltf", json.dumps(gltf_with(uri)).encode())
    assert err.startswith("download: external reference outside the asset: ") and \
        err.endswith("(data: URI without <mime>;base64,)"), err


@pytest.mark.parametrize("name,data,reason", [
    ("b.usdc", b"PXR-USDC" + b"\x00" * 80, "unscannable format: usdc (binary USD)"),
    ("b.usd", b"PXR-USDC" + b"\x00" * 80, "unscannable format: usdc (binary USD)"),
    ("p.usdz", b"PK\x03\x04" + b"\x00" * 80, "unscannable format: usdz (packaged USD)"),
    ("a.abc", b"Ogawa" + b"\x00" * 80, "unscannable format: abc (Alembic)"),
    ("e.usda", b'#usda 1.0\ndef "a" (references = @${HOME}/x.usda@) {}\n',
     "external reference outside the asset: '${HOME}/x.usda' (USD expression in an asset path)"),
    ("q.usda", b'#usda 1.0\ndef "a" (references = @`"/proc/self/" + "environ"`@) {}\n',
     "external reference outside the asset: '`\"/proc/self/\" + \"environ\"`' (USD expression in an asset path)"),
    ("t.usda", b'#usda 1.0\ndef "a" (payload = @@@/etc/host@name@@@) {}\n',
     "external reference outside the asset: '/etc/host@name'"),
    ("m.dae", b"<?xml version='1.0'?><COLLADA/>", "unsupported format 'dae': this Blender has no COLLADA importer"),
])
def test_unscannable_and_usd_expressions(tmp_path, name, data, reason):
    assert one_file(tmp_path, name, data) == f"download: {reason}"


def test_unscannable_listing(tmp_path):
    (tmp_path / "x.usdc").write_bytes(b"PXR-USDC")
    from pipelines.preprocess.sources.base import ListingHints, SourceSpec
    from pipelines.preprocess.sources.local import LocalSource

    rows = list(LocalSource(SourceSpec("local", str(tmp_path), {}), make_cfg(tmp_path), ListingHints()).rows())
    assert [r["file_identifier"] for r in rows] == ["x.usdc"]  # listed, so it fails with its reason


@pytest.mark.parametrize("line", [b"\x01mtllib ../outside/evil.mtl", b"\x0bmtllib ../outside/evil.mtl",
                                  b"mtllib\x0b../outside/evil.mtl", b'mtllib "../outside/evil.mtl"',
                                  b"  \x1fmtllib  ok.mtl \"../outside/evil.mtl\"",
                                  b"mtllib ../outside/\\\nevil.mtl", b"\x0cMTLLIB /etc/evil.mtl\r"])
def test_obj_lines_normalised_like_blender(tmp_path, line):
    err = one_file(tmp_path, "m.obj", line + b"\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    assert err is not None and err.startswith("download: external reference outside the asset"), err


def test_mtl_lines_normalised_like_blender(tmp_path):
    d = tmp_path / "assets"
    d.mkdir()
    (d / "m.obj").write_bytes(b"mtllib m.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (d / "m.mtl").write_bytes(b"newmtl m\n\x0b\x01map_Kd -bm 1 \"/etc/x.png\"\n")
    assert download(tmp_path, d, "m.obj")["error"] == \
        "download: external reference outside the asset: '/etc/x.png'"


def test_blend_every_frame_and_forbidden_blocks(tmp_path):
    from _pipeline_helpers import tiny_blend

    whole = tiny_blend(body=b"//../../outside/secret.png\x00")
    two_frames = zstd_frames(whole[:40], whole[40:])  # the path starts in the first frame, ends in the second
    assert one_file(tmp_path, "z.blend", two_frames) == \
        "download: external reference outside the asset: '//../../outside/secret.png'"
    whole = tiny_blend(body=b"/proc/self/environ.txt\x00")
    gz_two_members = __import__("gzip").compress(whole[:40]) + __import__("gzip").compress(whole[40:])
    assert one_file(tmp_path, "g.blend", gz_two_members) == \
        "download: external reference outside the asset: '/proc/self/environ.txt'"
    for t, why in (("MeshCacheModifierData", "Mesh Cache modifier"),
                   ("MeshSeqCacheModifierData", "Mesh Sequence Cache modifier")):
        assert one_file(tmp_path, f"{t}.blend", tiny_blend(((b"DATA", t),))) == f"download: blend file holds a {why}"
    assert one_file(tmp_path, "li.blend", tiny_blend(((b"LI\x00\x00", "Library"),))) == \
        "download: blend file holds a linked library"
    assert one_file(tmp_path, "node.blend", tiny_blend(body=b"GeometryNodeImportText\x00")) == \
        "download: blend file holds a geometry-node import node (GeometryNodeImportText)"
    assert one_file(tmp_path, "ok.blend", tiny_blend()) is None


MAKE_BLENDS = r'''
import sys, bpy
out = sys.argv[-1]
bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.ops.mesh.primitive_cube_add()
ob = bpy.context.active_object
bpy.ops.wm.save_as_mainfile(filepath=out + "/plain.blend", compress=True)
ob.modifiers.new("m", "MESH_CACHE").filepath = "//cache.pc2"
bpy.ops.wm.save_as_mainfile(filepath=out + "/mesh_cache.blend", compress=True)
ob.modifiers.clear()
ob.modifiers.new("s", "MESH_SEQUENCE_CACHE")
bpy.ops.wm.save_as_mainfile(filepath=out + "/seq_cache.blend", compress=True)
ob.modifiers.clear()
tree = bpy.data.node_groups.new("g", "GeometryNodeTree")
tree.nodes.new("GeometryNodeImportOBJ")
ob.modifiers.new("n", "NODES").node_group = tree
bpy.ops.wm.save_as_mainfile(filepath=out + "/import_node.blend", compress=True)
'''


def test_real_blend_files_from_blender(tmp_path):
    """The same rules on files Blender itself wrote (zstd-compressed, Blender 5 large block headers)."""
    import subprocess
    import sys

    pytest.importorskip("bpy")
    d = tmp_path / "assets"
    d.mkdir()
    script = tmp_path / "make.py"
    script.write_text(MAKE_BLENDS)
    subprocess.run([sys.executable, str(script), str(d)], check=True, capture_output=True, timeout=120)
    got = {n: download(tmp_path, d, n)["error"] for n in ("plain.blend", "mesh_cache.blend", "seq_cache.blend",
                                                           "import_node.blend")}
    assert got == {"plain.blend": None, "mesh_cache.blend": "download: blend file holds a Mesh Cache modifier",
                   "seq_cache.blend": "download: blend file holds a Mesh Sequence Cache modifier",
                   "import_node.blend": "download: blend file holds a geometry-node import node "
                                        "(GeometryNodeImportOBJ)"}, got


# ----------------------------------------------------------------------------------- 4. identity, 5. bombs


def test_identity_covers_the_whole_bundle(tmp_path):
    from _pipeline_helpers import TRIANGLE

    d = tmp_path / "assets"
    for sub, buf in (("a", TRIANGLE), ("b", TRIANGLE[::-1]), ("c", TRIANGLE)):
        (d / sub).mkdir(parents=True)
        (d / sub / "m.gltf").write_text(json.dumps(gltf_with("m.bin")))
        (d / sub / "m.bin").write_bytes(buf)
    dl = Download(make_cfg(tmp_path))
    a, b, c = (dl(local_row(d, f"{s}/m.gltf")) for s in "abc")
    assert a["error"] is None and b["error"] is None, (a["error"], b["error"])  # same .gltf, different .bin
    assert a["sha256"] != b["sha256"]
    assert c["error"] == f"download: skipped: duplicate of local:a/m.gltf (same sha256 {a['sha256']})"


def test_pixel_cap_before_decode(tmp_path):
    import base64

    from _pipeline_helpers import TRIANGLE, _glb_json_only

    bomb = png_header(20000, 20000)
    doc = gltf_with("data:application/octet-stream;base64," + base64.b64encode(TRIANGLE).decode(),
                    images=[{"uri": "data:image/png;base64," + base64.b64encode(bomb).decode()}])
    assert one_file(tmp_path, "bomb.glb", _glb_json_only(doc)) == \
        "download: pixel cap: png image of 20000x20000 pixels > 67108864"
    d = tmp_path / "assets"
    (d / "tex.png").write_bytes(bomb)
    (d / "m.obj").write_bytes(b"mtllib m.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (d / "m.mtl").write_bytes(b"newmtl m\nmap_Kd tex.png\n")
    assert download(tmp_path, d, "m.obj")["error"] == "download: pixel cap: png image of 20000x20000 pixels > 67108864"
    (d / "tex.png").write_bytes(b"\x00not an image")
    assert download(tmp_path, d, "m.obj")["error"] == "download: image format not accepted: binary"


@pytest.mark.parametrize("change,reason", [
    ({"accessors": [{"bufferView": 0, "componentType": 5126, "count": 1 << 30, "type": "VEC3"}]},
     "glTF accessor 0 count 1073741824 out of range"),
    ({"accessors": [{"bufferView": 0, "componentType": 5126, "count": 4, "type": "VEC3"}]},
     "glTF accessor 0 out of bounds of its bufferView"),
    ({"bufferViews": [{"buffer": 0, "byteOffset": 30, "byteLength": 36}]}, "glTF bufferView 0 out of bounds"),
    ({"bufferViews": [{"buffer": 3, "byteLength": 36}]}, "glTF bufferView 0 out of bounds"),
])
def test_accessor_sanity_before_import(tmp_path, change, reason):
    import base64

    from _pipeline_helpers import TRIANGLE

    doc = gltf_with("data:application/octet-stream;base64," + base64.b64encode(TRIANGLE).decode())
    doc.update(change)
    assert one_file(tmp_path, "a.gltf", json.dumps(doc).encode()) == f"download: {reason}"


@pytest.mark.parametrize("uri", ["/proc/self/environ", "/dev/zero", "file:///proc/self/environ",
                                 "%2Fdev%2Fzero", "//proc/self/environ"])
def test_proc_and_dev_uris(tmp_path, uri):
    err = one_file(tmp_path, "p.gltf", json.dumps(gltf_with(uri)).encode())
    assert err.startswith("download: external reference outside the asset"), err


# ----------------------------------------------------------------------------------- 2. the sandbox's settings


@pytest.mark.parametrize("over,reason", [
    (["render.unscannable_formats=[usdc]", "render.allow_unsandboxed=true"],
     "render.unscannable_formats needs the sandbox: not with render.allow_unsandboxed"),
    (["render.unscannable_formats=[fbx]"], "render.unscannable_formats: ['fbx'] are not unscannable formats"),
])
def test_sandbox_settings_refused(over, reason):
    from mdt.config import ConfigError

    with pytest.raises(ConfigError, match=__import__("re").escape(reason)):
        load_config(PreprocessConfig, None, over)


def test_sandbox_rule_changes_the_config_hash_and_ledger_records():
    from pipelines.preprocess.config import config_hash
    from pipelines.preprocess.ledger import sandbox_mode

    off = load_config(PreprocessConfig, None, ["render.allow_unsandboxed=true"])
    assert config_hash(off) != config_hash(PreprocessConfig())
    assert sandbox_mode({"sandbox": "userns"}, False) == "userns"
    assert sandbox_mode({}, False) == "required" and sandbox_mode({"sandbox": None}, True) == "optional"


def test_unscannable_format_enabled_explicitly(tmp_path):
    cfg = load_config(PreprocessConfig, None, [f"output={tmp_path / 'out'}", f"download.cache_uri={tmp_path / 'c'}",
                                               "render.unscannable_formats=[usdc]"])
    d = tmp_path / "assets"
    d.mkdir()
    (d / "b.usdc").write_bytes(b"PXR-USDC" + b"\x00" * 80)
    (d / "p.usdz").write_bytes(b"PK\x03\x04" + b"\x00" * 80)
    assert Download(cfg)(local_row(d, "b.usdc"))["error"] is None
    assert Download(cfg)(local_row(d, "p.usdz"))["error"] == "download: unscannable format: usdz (packaged USD)"
