"""Real collections' encodings: every shared glTF variant (plain, Draco, quantized, KTX2/BasisU) rendered with its
textures, Draco geometry checked on the decoded scene, corrupted Draco data and KTX2 textures failing with their
reason, Blender's missing-texture magenta caught, and the run report's coverage table per format/encoding."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from mdt.config import load_config
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.mesh_check import CompressedGeometry, MeshError, asset_encoding, parse_mesh

# folder -> its encoding, as the variants' README lists them
VARIANTS = {
    "Avocado-glTF": "gltf/plain",
    "Avocado-glTF-Draco": "gltf/draco",
    "Avocado-glTF-Quantized": "gltf/quantized",
    "CesiumMilkTruck-glTF-Draco": "gltf/draco",
    "AnimatedMorphCube-glTF-Quantized": "gltf/quantized",
    "StainedGlassLamp-glTF-KTX-BasisU": "gltf/ktx2",
}
MAGENTA_MAX = 0.01  # share of an image's visible pixels allowed in Blender's missing-texture colour


def magenta_fraction(png: bytes) -> float:
    """Share of the visible pixels (alpha > 0, or not black without alpha) in Blender's missing-texture colour:
    (1, 0, 1) magenta, shaded — red and blue both clearly lit, green under a quarter of the weaker of them."""
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA")).astype(np.float32)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    visible = (a[..., 3] > 0) & (a[..., :3].max(axis=-1) > 8)
    magenta = visible & (r > 48) & (b > 48) & (g < 0.25 * np.minimum(r, b))
    return float(magenta.sum() / max(1, visible.sum()))


def variant_dir(name: str) -> Path:
    return shared_path("assets", "gltf-variants", name)


def bundle_row(folder: Path, name: str | None = None) -> dict:
    """The download stage's row for a .gltf bundle: the main file and its files, zipped."""
    main = folder / f"{folder.name.split('-glTF')[0]}.gltf"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix != ".md":
                zf.write(p, p.name)
    return {"sha256": name or folder.name, "error": None, "mesh_bytes": buf.getvalue(), "mesh_format": "gltf",
            "mesh_name": main.name, "mesh_bundle": True, "untrusted_blend": False}


def writable_copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(variant_dir(name), dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


# ------------------------------------------------------------------------------------------- no Blender


def test_asset_encoding_names_each_shared_variant_and_glb():
    for folder, expected in VARIANTS.items():
        main = next(variant_dir(folder).glob("*.gltf"))
        assert asset_encoding(main, "gltf") == expected, folder
    for glb in shared_path("assets", "glb").glob("*.glb"):
        assert asset_encoding(glb, "glb") == "glb/plain", glb.name


def test_asset_encoding_of_synthetic_files(tmp_path):
    def gltf(doc: dict) -> Path:
        p = tmp_path / f"m{len(list(tmp_path.iterdir()))}.gltf"
        p.write_text(json.dumps({"asset": {"version": "2.0"}, **doc}))
        return p

    assert asset_encoding(gltf({"buffers": [{"uri": "data:application/octet-stream;base64,AAAA"}]}),
                          "gltf") == "gltf/embedded"
    assert asset_encoding(gltf({"buffers": [{"uri": "m.bin"}]}), "gltf") == "gltf/plain"
    assert asset_encoding(gltf({"extensionsUsed": ["EXT_meshopt_compression", "EXT_texture_webp"]}),
                          "gltf") == "gltf/meshopt+webp"
    (tmp_path / "bad.gltf").write_bytes(b"\x00not json")
    assert asset_encoding(tmp_path / "bad.gltf", "gltf") == "gltf/unreadable"
    (tmp_path / "a.obj").write_bytes(b"mtllib a.mtl\nv 0 0 0\n")
    (tmp_path / "b.obj").write_bytes(b"v 0 0 0\n")
    assert asset_encoding(tmp_path / "a.obj", "obj") == "obj/mtl"
    assert asset_encoding(tmp_path / "b.obj", "obj") == "obj/plain"
    assert asset_encoding(tmp_path / "x.fbx", "FBX") == "fbx/plain"


def test_raw_check_refuses_compressed_geometry_and_reads_the_rest(tmp_path):
    # Draco accessors hold no data: the raw parse must not judge them (it would see zero area)
    with pytest.raises(CompressedGeometry, match="KHR_draco_mesh_compression"):
        parse_mesh(next(variant_dir("Avocado-glTF-Draco").glob("*.gltf")), "gltf")
    # quantized accessors are plain data: parsed, and the same surface as the plain variant
    v0, f0 = parse_mesh(variant_dir("Avocado-glTF") / "Avocado.gltf", "gltf")
    v1, f1 = parse_mesh(variant_dir("Avocado-glTF-Quantized") / "Avocado.gltf", "gltf")
    assert len(f0) == len(f1) and np.abs(np.ptp(v0, 0) - np.ptp(v1, 0)).max() < 1e-3 * np.ptp(v0, 0).max()
    # an optional meshopt extension comes with a fallback buffer: the accessors are read as usual
    src = json.loads((variant_dir("Avocado-glTF") / "Avocado.gltf").read_text())
    src["extensionsUsed"] = ["EXT_meshopt_compression"]
    shutil.copy(variant_dir("Avocado-glTF") / "Avocado.bin", tmp_path / "Avocado.bin")
    (tmp_path / "Avocado.gltf").write_text(json.dumps(src))
    assert len(parse_mesh(tmp_path / "Avocado.gltf", "gltf")[1]) == len(f0)
    src["extensionsRequired"] = ["EXT_meshopt_compression"]
    (tmp_path / "Avocado.gltf").write_text(json.dumps(src))
    with pytest.raises(MeshError, match="^unsupported encoding: EXT_meshopt_compression required"):
        parse_mesh(tmp_path / "Avocado.gltf", "gltf")


def test_coverage_table_in_the_report():
    from pipelines.preprocess.report import build_report, to_markdown

    t = json.dumps({"download": 0.1, "render": 1.0})
    summaries = [
        {"status": "done", "stage": "write", "reason": None, "timings": t, "encoding": "gltf/draco"},
        {"status": "done", "stage": "write", "reason": None, "timings": t, "encoding": "gltf/draco"},
        {"status": "failed", "stage": "render", "reason": "Draco geometry not decoded: x", "timings": t,
         "encoding": "gltf/draco"},
        {"status": "failed", "stage": "render", "reason": "texture not loaded: a.ktx2 (KTX2: bad)", "timings": t,
         "encoding": "gltf/ktx2"},
        {"status": "failed", "stage": "download", "reason": "http 404", "timings": "{}", "encoding": None},
        {"status": "done", "stage": "write", "reason": None, "timings": t, "encoding": "obj/mtl"},
    ]
    cfg = load_config(PreprocessConfig, None, [])
    cfg.stages = ["download", "render"]
    result = SimpleNamespace(run_id="r", config_hash="h", output="o", listed=6, skipped_done=0, skipped_failed=0,
                             summaries=summaries, wall_s=10.0, manifest={}, listing={})
    cov = build_report(cfg, result)["coverage"]
    assert cov["gltf/draco"] == {"done": 2, "failed": 1, "skipped": 0,
                                 "reasons": {"render: Draco geometry not decoded: x": 1}}
    assert cov["gltf/ktx2"]["failed"] == 1 and cov["obj/mtl"]["done"] == 1
    assert cov["unknown/unchecked"]["reasons"] == {"download: http 404": 1}
    md = to_markdown(build_report(cfg, result))
    assert "| gltf/draco | 2 | 1 | 0 | render: Draco geometry not decoded: x (1) |" in md
    assert "| obj/mtl | 1 | 0 | 0 | - |" in md


# ------------------------------------------------------------------------------------------- Blender

BLENDER_MAGENTA = """
import bpy, sys
bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.ops.mesh.primitive_cube_add()
mat = bpy.data.materials.new("m")
mat.use_nodes = True
tex = mat.node_tree.nodes.new("ShaderNodeTexImage")  # an image-texture node whose image did not load
bsdf = mat.node_tree.nodes["Principled BSDF"]
mat.node_tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
bpy.context.object.data.materials.append(mat)
bpy.ops.wm.save_as_mainfile(filepath=sys.argv[1])
scene = bpy.context.scene
scene.render.engine = "CYCLES"; scene.cycles.samples = 4; scene.cycles.use_denoising = False
scene.render.resolution_x = scene.render.resolution_y = 32; scene.render.film_transparent = True
scene.view_settings.view_transform = "Filmic"
cam = bpy.data.objects.new("c", bpy.data.cameras.new("c")); scene.collection.objects.link(cam)
cam.location = (4, -4, 3); cam.rotation_euler = (1.1, 0, 0.785); scene.camera = cam
light = bpy.data.objects.new("l", bpy.data.lights.new("l", "SUN")); scene.collection.objects.link(light)
light.rotation_euler = (0.6, 0.2, 0.4)
scene.render.filepath = sys.argv[2]
bpy.ops.render.render(write_still=True)
"""


@pytest.mark.blender
def test_missing_texture_magenta_is_caught(tmp_path):
    """Blender draws an image-texture node without a loaded image in magenta: the detector sees it in a real
    Cycles render, and the render worker fails such an asset with its reason instead of rendering it."""
    from pipelines.preprocess.render import RenderPass, RenderSettings, feature_cameras, render_file

    script = tmp_path / "make.py"
    script.write_text(BLENDER_MAGENTA)
    blend, png = tmp_path / "bundle" / "cube.blend", tmp_path / "magenta.png"
    blend.parent.mkdir()
    subprocess.run([sys.executable, str(script), str(blend), str(png)], check=True, capture_output=True,
                   timeout=300)
    assert magenta_fraction(png.read_bytes()) > 0.5
    green = Image.new("RGBA", (8, 8), (40, 160, 30, 255))
    buf = io.BytesIO()
    green.save(buf, "PNG")
    assert magenta_fraction(buf.getvalue()) == 0.0
    c2w, fov = feature_cameras(1, (0.2, 0.4))
    res = render_file(blend, "blend", [RenderPass("views", 32, c2w, fov)],
                      RenderSettings(samples=2, denoise=False, threads=1, timeout_s=240))
    assert not res.ok and res.error.startswith("texture not loaded: m/"), res.error


BLENDER_GROUP = """
import bpy, sys
bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.ops.mesh.primitive_cube_add()
group = bpy.data.node_groups.new("g", "ShaderNodeTree")
group.interface.new_socket("Color", in_out="OUTPUT", socket_type="NodeSocketColor")
tex = group.nodes.new("ShaderNodeTexImage")  # empty, one node group down
group.links.new(tex.outputs["Color"], group.nodes.new("NodeGroupOutput").inputs[0])
mat = bpy.data.materials.new("m")
mat.use_nodes = True
node = mat.node_tree.nodes.new("ShaderNodeGroup")
node.node_tree = group
mat.node_tree.links.new(node.outputs[0], mat.node_tree.nodes["Principled BSDF"].inputs["Base Color"])
bpy.context.object.data.materials.append(mat)
bpy.ops.wm.save_as_mainfile(filepath=sys.argv[1])
"""


@pytest.mark.blender
def test_missing_texture_inside_a_node_group_fails(tmp_path):
    from pipelines.preprocess.render import RenderPass, RenderSettings, feature_cameras, render_file

    script, blend = tmp_path / "make.py", tmp_path / "bundle" / "group.blend"
    script.write_text(BLENDER_GROUP)
    blend.parent.mkdir()
    subprocess.run([sys.executable, str(script), str(blend)], check=True, capture_output=True, timeout=300)
    c2w, fov = feature_cameras(1, (0.2, 0.4))
    res = render_file(blend, "blend", [RenderPass("views", 32, c2w, fov)],
                      RenderSettings(samples=2, denoise=False, threads=1, timeout_s=240))
    assert not res.ok and res.error.startswith("texture not loaded: m/"), res.error


@pytest.fixture(scope="module")
def demo_render():
    """The render stage exactly as the `demo` preset configures it."""
    from pipelines.preprocess.render import Render

    stage = Render(load_config(PreprocessConfig, "demo", [], prefix="preprocess_"))
    yield stage
    stage.close()


@pytest.mark.blender
@pytest.mark.slow
def test_every_variant_renders_with_textures_and_draco_matches_plain(demo_render):
    from pipelines.preprocess.voxelize import mesh_from_ply, voxelize_mesh

    voxels = {}
    for folder, encoding in VARIANTS.items():
        row = demo_render(bundle_row(variant_dir(folder)))
        assert row["error"] is None, (folder, row["error"])
        assert json.loads(row["asset_checks"])["encoding"] == encoding
        for png in [*row["views"], *row["cond_images"]]:
            assert magenta_fraction(png) <= MAGENTA_MAX, folder
        v, f = mesh_from_ply(row["mesh_ply"])
        voxels[folder] = {tuple(c) for c in voxelize_mesh(v, f, 64).tolist()}
    for other in ("Avocado-glTF-Draco", "Avocado-glTF-Quantized"):
        a, b = voxels["Avocado-glTF"], voxels[other]
        assert len(a & b) / len(a | b) >= 0.95, other
    # a different object is far from the plain avocado: the IoU above can fail
    a, b = voxels["Avocado-glTF"], voxels["CesiumMilkTruck-glTF-Draco"]
    assert len(a & b) / len(a | b) < 0.5


def lamp_as_glb() -> bytes:
    """The KTX2 lamp as one GLB: its .bin and every .ktx2 image moved into the binary chunk (bufferViews), the
    layout Sketchfab-style exports use."""
    import struct

    d = variant_dir("StainedGlassLamp-glTF-KTX-BasisU")
    doc = json.loads((d / "StainedGlassLamp.gltf").read_text())
    blob = bytearray((d / doc["buffers"][0]["uri"]).read_bytes())
    for image in doc["images"]:
        blob += b"\0" * (-len(blob) % 8)
        data = (d / image.pop("uri")).read_bytes()
        doc["bufferViews"].append({"buffer": 0, "byteOffset": len(blob), "byteLength": len(data)})
        image["bufferView"] = len(doc["bufferViews"]) - 1
        blob += data
    blob += b"\0" * (-len(blob) % 4)
    doc["buffers"] = [{"byteLength": len(blob)}]
    text = json.dumps(doc).encode()
    text += b" " * (-len(text) % 4)
    body = struct.pack("<II", len(text), 0x4E4F534A) + text + struct.pack("<II", len(blob), 0x004E4942) + blob
    return b"glTF" + struct.pack("<II", 2, 12 + len(body)) + body


@pytest.mark.blender
@pytest.mark.slow
def test_ktx2_textures_inside_a_glb_render(demo_render, tmp_path):
    data = lamp_as_glb()
    (tmp_path / "lamp.glb").write_bytes(data)
    assert asset_encoding(tmp_path / "lamp.glb", "glb") == "glb/ktx2"
    row = demo_render({"sha256": "lamp-glb", "error": None, "mesh_bytes": data, "mesh_format": "glb",
                       "mesh_name": "lamp.glb", "mesh_bundle": False, "untrusted_blend": False})
    assert row["error"] is None, row["error"]
    fractions = [magenta_fraction(png) for png in [*row["views"], *row["cond_images"]]]
    assert max(fractions) <= MAGENTA_MAX, fractions


@pytest.mark.blender
def test_corrupted_draco_buffer_fails_with_its_reason(demo_render, tmp_path):
    d = writable_copy("Avocado-glTF-Draco", tmp_path)
    doc = json.loads((d / "Avocado.gltf").read_text())
    view = doc["bufferViews"][doc["meshes"][0]["primitives"][0]["extensions"]["KHR_draco_mesh_compression"]
                              ["bufferView"]]
    data = bytearray((d / "Avocado.bin").read_bytes())
    start = view.get("byteOffset", 0) + 16  # keep the Draco header, scramble the encoded mesh
    end = view.get("byteOffset", 0) + view["byteLength"]
    data[start:end] = bytes((x * 7 + 13) & 255 for x in data[start:end])
    (d / "Avocado.bin").write_bytes(bytes(data))
    row = demo_render(bundle_row(d))
    assert row["error"].startswith("render: Draco geometry not decoded: "), row["error"]
    assert json.loads(row["asset_checks"])["encoding"] == "gltf/draco"


@pytest.mark.blender
def test_corrupted_ktx2_texture_fails_with_its_reason(demo_render, tmp_path):
    d = writable_copy("StainedGlassLamp-glTF-KTX-BasisU", tmp_path)
    tex = d / "StainedGlassLamp_base_basecolor.ktx2"
    data = bytearray(tex.read_bytes())
    data[100:2000] = bytes(1900)  # the level index and format descriptor
    tex.write_bytes(bytes(data))
    row = demo_render(bundle_row(d))
    assert row["error"].startswith("render: texture not loaded: StainedGlassLamp_base_basecolor.ktx2 (KTX2: "), \
        row["error"]


@pytest.mark.blender
def test_unreadable_png_texture_fails_with_its_reason(demo_render, tmp_path):
    d = writable_copy("Avocado-glTF", tmp_path)
    png = d / "Avocado_baseColor.png"
    png.write_bytes(png.read_bytes()[:64])  # a truncated PNG: the header survives, the pixels do not
    row = demo_render(bundle_row(d))
    assert row["error"] == "render: texture not loaded: Avocado_baseColor.png (unreadable image data)", row["error"]


# ------------------------------------------------------------------------------------------- the job


@pytest.mark.blender
@pytest.mark.ray
@pytest.mark.slow
def test_demo_preset_job_on_every_shared_variant(tmp_path):
    """`python jobs/preprocess.py --preset demo --source local:<variants> --output DIR`, as a user runs it: every
    bundle done, condition renders free of magenta, Draco voxels matching the plain variant's, and the coverage
    table in the report."""
    from _pipeline_helpers import run_job
    from pipelines.preprocess.shards import decode_array, load_table

    variants = shared_path("assets", "gltf-variants")
    out = tmp_path / "out"
    proc = run_job(["--preset", "demo", "--source", f"local:{variants}", "--output", str(out)], timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(next((out / "runs").glob("*/report.json")).read_text())
    assert (report["processed"], report["done"]) == (len(VARIANTS), len(VARIANTS)), report["failure_reasons"]
    expected: dict[str, int] = {}
    for enc in VARIANTS.values():
        expected[enc] = expected.get(enc, 0) + 1
    assert {enc: r["done"] for enc, r in report["coverage"].items()} == expected
    assert "| gltf/draco | 2 | 0 | 0 | - |" in next((out / "runs").glob("*/report.md")).read_text()
    rows = {r["file_identifier"].split("/")[0]: r
            for r in load_table(str(out)).to_pylist()}
    assert sorted(rows) == sorted(VARIANTS)
    for folder, row in rows.items():
        for png in row["cond_images"]:
            assert magenta_fraction(png) <= MAGENTA_MAX, folder
    voxels = {k: {tuple(c) for c in decode_array(r, "slat_coords").tolist()} for k, r in rows.items()}
    a, b = voxels["Avocado-glTF"], voxels["Avocado-glTF-Draco"]
    assert len(a & b) / len(a | b) >= 0.95
