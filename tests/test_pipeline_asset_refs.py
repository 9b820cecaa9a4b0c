"""External references per format (pipelines.preprocess.asset_refs) and the self-contained rule, on hand-made files."""
from __future__ import annotations

import gzip
import struct

import pytest

from pipelines.preprocess.asset_refs import (ExternalReferenceError, bundle_files, check_tree, references,
                                  resolve_reference)


def test_references_of_each_format():
    assert references("obj", b"v 0 0 0\nmtllib a.mtl b.mtl\n") == ["a.mtl b.mtl", "a.mtl", "b.mtl"]
    assert references("mtl", b"newmtl m\nmap_Kd -bm 1.0 -o 0 0 0 tex/a.png\nbump /abs/b.png\n") == \
        ["tex/a.png", "/abs/b.png"]
    assert references("dae", b'<init_from> ../x.png </init_from><instance_geometry url="#g"/>'
                             b'<instance_node url="file:///etc/passwd"/>') == ["../x.png", "file:///etc/passwd"]
    fbx = b"Kaydara FBX Binary  \x00" + b"\x10RelativeFilename" + b"S" + struct.pack("<I", 8) + b"../t.png"
    fbx += b"\x08FileName" + b"S" + struct.pack("<I", 9) + b"/etc/x.jp"
    assert references("fbx", fbx) == ["../t.png", "/etc/x.jp"]
    assert references("fbx", b'; FBX 7.4.0\nRelativeFilename: "tex\\\\a.png"\n') == ["tex\\\\a.png"]
    blend = b"BLENDER-v300" + b"\x00" * 8 + b"//textures/wood.png\x00" + b"junk" + b"/home/u/lib.blend\x00"
    assert references("blend", gzip.compress(blend)) == ["//textures/wood.png", "/home/u/lib.blend"]
    assert references("usda", b'#usda 1.0\ndef "a" (references = @./parts/b.usda@) {}\n') == ["./parts/b.usda"]
    ply = b"ply\nformat ascii 1.0\ncomment TextureFile ../t.png\nend_header\n"
    assert references("ply", ply) == ["../t.png"]
    with pytest.raises(ValueError):
        references("gltf", b"not json")


@pytest.mark.parametrize("ref", ["/etc/passwd", "../x.bin", "a/../../x.bin", "http://h/x.bin", "file:x.bin",
                                 "C:/x.bin", "%2e%2e/x.bin", "\\\\server\\x.bin"])
def test_references_leaving_the_bundle_fail(ref):
    with pytest.raises(ExternalReferenceError, match="external reference outside the asset"):
        resolve_reference(ref, "m.gltf", "gltf")


def test_references_inside_the_bundle(tmp_path):
    assert resolve_reference("a/../b.bin", "sub/m.gltf", "gltf") == "sub/b.bin"
    assert resolve_reference("//tex/a.png", "m.blend", "blend") == "tex/a.png"
    files = bundle_files("d/m.obj", b"mtllib m.mtl\n", {"d/m.mtl": b"map_Kd t.png\n", "d/t.png": b"png"}.get)
    assert sorted(files) == ["d/m.mtl", "d/m.obj", "d/t.png"]
    with pytest.raises(ExternalReferenceError):  # inside the archive, but outside the main file's directory
        bundle_files("d/m.obj", b"mtllib ../m.mtl\n", {"m.mtl": b""}.get)
    (tmp_path / "m.obj").write_text("mtllib m.mtl\n")
    (tmp_path / "m.mtl").symlink_to(tmp_path.parent)
    with pytest.raises(ExternalReferenceError, match="symlink"):
        check_tree(tmp_path / "m.obj", tmp_path)
