"""Render stage: camera scheme, Blender worker isolation (timeout, memory cap, .blend scripts), real and
synthetic assets in every import format, and agreement between the rendered silhouettes and the cameras."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import textwrap
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import trimesh
from PIL import Image

from conftest import shared_path
from mdt.config import load_config
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.features import project_voxels
from pipelines.preprocess.render import (COND_R_MAX, COND_R_MIN, Render, cond_cameras, feature_cameras,
                              hammersley_yaw_pitch, look_at_origin)
from pipelines.preprocess.rows import unpack_array
from pipelines.preprocess.synthetic_meshes import synthetic_mesh_glb, synthetic_scene
from pipelines.preprocess.voxelize import mesh_from_ply

GLBS = ["kenney_ladder.glb", "kenney_tree.glb", "khronos_box_vertex_colors.glb", "khronos_cesium_milk_truck.glb",
        "khronos_fox.glb", "khronos_iridescence_suzanne.glb", "quaternius_cart.glb", "quaternius_fence.glb",
        "quaternius_rock_path_square_small.glb", "quaternius_well.glb"]
RES = 64


def tiny_stage(**render) -> Render:
    r = dict(num_views=6, resolution=RES, samples=4, threads=2, timeout_s=120, denoise=False)
    r.update(render)
    cond = dict(num_views=2, render_resolution=RES, samples=4, image_size=48)
    return Render(load_config(PreprocessConfig, None, [*((f"render.{k}", v) for k, v in r.items()),
                                                       *((f"cond.{k}", v) for k, v in cond.items())]))


def asset_row(data: bytes, fmt: str, name: str = "asset", bundle: bool = False) -> dict:
    return {"sha256": name, "error": None, "mesh_bytes": data, "mesh_format": fmt,
            "mesh_name": name if "." in name else f"{name}.{fmt}", "mesh_bundle": bundle,
            "untrusted_blend": fmt == "blend"}


def alpha(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))[..., 3]


def check_rendered(row: dict, name: str, border_ok: bool = False) -> None:
    assert row["error"] is None, row["error"]
    views = row["views"]
    c2w, fov = unpack_array(row["views_c2w"]), unpack_array(row["views_fov"])
    assert len(views) == len(c2w) == len(fov) == 6 and c2w.shape == (6, 4, 4)
    # the normalised mesh: longest side 1, bbox centred at the origin
    v, f = mesh_from_ply(row["mesh_ply"])
    assert len(f) and f.max() < len(v)
    assert abs(np.ptp(v, axis=0).max() - 1) < 1e-4, name
    assert np.abs(v.min(axis=0) + v.max(axis=0)).max() < 1e-4, name
    # silhouettes: not blank, centred, inside the frame; mesh vertices projected with the stored cameras land
    # on the object (checks camera axes, FOV and the OpenGL -> OpenCV conversion used by the features stage)
    uv = project_voxels((v.astype(np.float64) + 0.5) * 64 - 0.5, c2w, fov).numpy()
    from scipy.ndimage import binary_dilation

    offsets = []
    for i, png in enumerate(views):
        a = alpha(png)
        assert a.shape == (RES, RES)
        mask = a > 0
        assert mask.mean() > 0.01, f"{name} view {i} is blank"
        ys, xs = np.nonzero(mask)
        offsets.append(math.hypot(xs.mean() - (RES - 1) / 2, ys.mean() - (RES - 1) / 2) / RES)
        border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        # radius 2 / FOV 40 deg does not contain the unit cube's bounding sphere: boxy assets may touch the edge
        assert border.mean() < (0.35 if border_ok else 0.1), f"{name} view {i} leaves the frame"
        px = np.clip(np.floor(uv[i] * RES).astype(int), 0, RES - 1)
        on = binary_dilation(mask, iterations=1)[px[:, 1], px[:, 0]]
        assert on.mean() > 0.95, f"{name} view {i}: {on.mean():.3f} of the vertices project onto the object"
    assert max(offsets) < 0.15 and np.median(offsets) < 0.1, (name, offsets)
    # condition views: cropped to the object at the stored size; the object never leaves the frame
    cond = row["cond_images"]
    crops = unpack_array(row["cond_crop"])
    cfov = unpack_array(row["cond_fov"])
    assert len(cond) == len(crops) == len(cfov) == 2
    for png, (x0, y0, x1, y1) in zip(cond, crops):
        a = alpha(png)
        assert a.shape == (48, 48) and (a > 0).mean() > 0.05
        cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 / 1.2
        assert -0.05 < cx - half and cx + half < 1.05 and -0.05 < cy - half and cy + half < 1.05
    info = json.loads(row["render_info"])
    assert info["engine"] == "CYCLES" and (info["device"] == "CPU" or info["device"].startswith("GPU"))


# ------------------------------------------------------------------------------------------------ cameras

def test_hammersley_scheme_and_look_at():
    yaw, pitch = hammersley_yaw_pitch(150, (0.3, 0.7))
    assert np.all(np.abs(pitch) <= math.pi / 2)
    assert 0.72 < np.mean(pitch >= 0) < 0.78  # the u remap puts ~3/4 of the views above the equator
    c2w, fov = feature_cameras(150, (0.3, 0.7))
    assert np.allclose(fov, math.radians(40))
    for m in c2w:
        r = m[:3, :3]
        assert np.allclose(r.T @ r, np.eye(3), atol=1e-5) and np.isclose(np.linalg.det(r), 1, atol=1e-5)
        assert np.isclose(np.linalg.norm(m[:3, 3]), 2, atol=1e-5)
        forward = -r[:, 2]  # OpenGL camera looks along -Z
        assert np.allclose(forward, -m[:3, 3] / 2, atol=1e-5)
        assert r[2, 1] >= -1e-6  # camera up has a non-negative world-Z component (Z-up world)
    straight_down = look_at_origin(np.array([0.0, 0.0, 3.0]))
    assert np.allclose(straight_down[:3, 2], [0, 0, 1])
    # position formula r (cos yaw cos pitch, sin yaw cos pitch, sin pitch)
    p = feature_cameras(4, (0.0, 0.0))[0][:, :3, 3]
    y, pt = hammersley_yaw_pitch(4, (0.0, 0.0))
    assert np.allclose(p[:, 2], 2 * np.sin(pt), atol=1e-5) and np.allclose(p[:, 0], 2 * np.cos(y) * np.cos(pt), atol=1e-5)


def test_condition_cameras_fill_the_frame():
    c2w, fov = cond_cameras(2000, (0.1, 0.2), np.random.default_rng(0))
    r = np.linalg.norm(c2w[:, :3, 3], axis=1)
    assert COND_R_MIN - 1e-4 <= r.min() and r.max() <= COND_R_MAX + 1e-3
    assert np.allclose(r * np.sin(fov / 2), math.sqrt(3) / 2, atol=1e-4)  # bounding sphere just fills the frame
    assert math.radians(10) - 1e-4 <= fov.min() and fov.max() <= math.radians(70) + 1e-4
    inv = 1 / r**2  # 1/r^2 uniform
    assert abs(np.mean(inv) - (1 / COND_R_MIN**2 + 1 / COND_R_MAX**2) / 2) < 0.01


def test_cameras_are_deterministic_per_asset():
    st = tiny_stage()
    a, b, c = st.cameras("abc"), st.cameras("abc"), st.cameras("abd")
    assert np.array_equal(a["views"][0], b["views"][0]) and np.array_equal(a["cond"][1], b["cond"][1])
    assert not np.array_equal(a["views"][0], c["views"][0])


# ------------------------------------------------------------------------------------------------ assets

@pytest.mark.blender
@pytest.mark.slow
@pytest.mark.parametrize("name", GLBS)
def test_render_shared_glb(name):
    path = shared_path("assets", "glb", name)
    row = tiny_stage()(asset_row(path.read_bytes(), "glb", name))
    check_rendered(row, name, border_ok=name == "khronos_box_vertex_colors.glb")  # unit cube: corners leave 40 deg


def _bpy(script: str, *args: str) -> None:
    subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], check=True, capture_output=True,
                   timeout=120)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The synthetic asset of seed 4 in every import format (obj/ply/stl by trimesh, fbx/blend by Blender, a
    .gltf + .bin bundle), plus a .blend that carries auto-run Python."""
    d = tmp_path_factory.mktemp("formats")
    glb = synthetic_mesh_glb(4)
    (d / "a.glb").write_bytes(glb)
    mesh = synthetic_scene(4).to_geometry()
    for fmt in ("obj", "ply", "stl"):
        mesh.export(d / f"a.{fmt}")
    (d / "gltf").mkdir()
    files = trimesh.exchange.gltf.export_gltf(synthetic_scene(4))  # model.gltf + buffers (+ textures)
    assert "model.gltf" in files and len(files) > 1
    for k, v in files.items():
        (d / "gltf" / k).write_bytes(v)
    _bpy("""
        import sys, bpy
        src, fbx, blend, evil, marker = sys.argv[1:]
        bpy.context.preferences.filepaths.use_scripts_auto_execute = False
        bpy.ops.wm.read_factory_settings(use_empty=True)
        bpy.ops.import_scene.gltf(filepath=src)
        bpy.ops.export_scene.fbx(filepath=fbx)
        bpy.ops.wm.save_as_mainfile(filepath=blend)
        # a .blend whose registered text block and driver expression would create marker files if run
        bpy.ops.wm.read_factory_settings(use_empty=True)
        bpy.ops.mesh.primitive_cube_add(size=1.0)
        text = bpy.data.texts.new("autorun.py")
        text.write(f"open({marker!r} + '.text', 'w').write('ran')\\n")
        text.use_module = True
        fc = bpy.context.active_object.driver_add("location", 0)
        fc.driver.type = "SCRIPTED"
        fc.driver.expression = f"__import__('builtins').open({marker!r} + '.driver', 'w').write('x') and 0"
        bpy.ops.wm.save_as_mainfile(filepath=evil)
    """, str(d / "a.glb"), str(d / "a.fbx"), str(d / "a.blend"), str(d / "evil.blend"), str(d / "marker"))
    return d


@pytest.mark.blender
def test_render_all_import_formats(converted):
    d = converted
    bundle = io.BytesIO()
    with zipfile.ZipFile(bundle, "w") as z:
        for p in sorted((d / "gltf").iterdir()):
            z.write(p, p.name)
    rows = [asset_row((d / f"a.{fmt}").read_bytes(), fmt, f"a.{fmt}") for fmt in ("glb", "obj", "ply", "stl",
                                                                                   "fbx", "blend")]
    rows.append(asset_row(bundle.getvalue(), "gltf", "model.gltf", bundle=True))
    stage = tiny_stage()
    for row in rows:
        name = row["mesh_name"]
        out = stage(row)
        check_rendered(out, name)
        v, _ = mesh_from_ply(out["mesh_ply"])
        if name == "a.glb":
            ref_extent = np.sort(np.ptp(v, axis=0))
        else:  # same object whatever the container (up to axis conventions of the format)
            assert np.allclose(np.sort(np.ptp(v, axis=0)), ref_extent, atol=2e-3), name


@pytest.mark.blender
def test_blend_scripts_do_not_run(converted):
    d = converted
    out = tiny_stage()(asset_row((d / "evil.blend").read_bytes(), "blend", "evil.blend"))
    assert out["error"] is None, out["error"]
    assert not list(d.glob("marker*")), "Python stored in the .blend was executed"
    # positive control: the same file does run its script when opened trusted
    _bpy("""
        import sys, bpy
        bpy.context.preferences.filepaths.use_scripts_auto_execute = True
        bpy.ops.wm.open_mainfile(filepath=sys.argv[1], use_scripts=True)
        bpy.context.scene.frame_set(2)
    """, str(d / "evil.blend"))
    assert (d / "marker.text").exists()


@pytest.mark.blender
def test_synthetic_assets_render():
    stage = tiny_stage()
    for seed in (0, 1):
        check_rendered(stage(asset_row(synthetic_mesh_glb(seed), "glb", f"synthetic{seed}")), f"synthetic{seed}")


# ------------------------------------------------------------------------------------------------ failures

@pytest.mark.blender
def test_broken_inputs_fail_cleanly():
    good = synthetic_mesh_glb(1)
    stage = tiny_stage(timeout_s=60)
    cases = {
        "empty": asset_row(b"", "glb", "empty.glb"),
        "corrupt": asset_row(b"glTF\x02\x00\x00\x00" + b"\x00garbage" * 20, "glb", "corrupt.glb"),
        "truncated": asset_row(good[: len(good) // 2], "glb", "truncated.glb"),
        "format": asset_row(good, "xyz", "a.xyz"),
    }
    for what, row in cases.items():
        out = stage(row)
        assert out["error"] and out["error"].startswith("render: "), (what, out["error"])
        assert "/tmp" not in out["error"]
    assert stage(cases["empty"])["error"] == "render: empty or missing asset file"
    assert "GLB" in stage(cases["corrupt"])["error"]


@pytest.mark.blender
def test_memory_cap_fails_cleanly():
    out = tiny_stage(memory_limit_mb=300)(asset_row(synthetic_mesh_glb(1), "glb", "capped.glb"))
    assert out["error"] and out["error"].startswith("render: ")


HANGING_WORKER = """
import os, sys, time
sys.path.insert(0, {pipelines!r})
import blender_worker

real_import = blender_worker._import


def import_or_hang(bpy, path, fmt, warnings):
    if "hangme" in os.path.basename(path):
        while True:
            time.sleep(1)
    return real_import(bpy, path, fmt, warnings)


blender_worker._import = import_or_hang
blender_worker.run_cli(sys.argv[1:])
"""


@pytest.mark.blender
def test_hanging_render_is_killed_while_others_complete(monkeypatch, tmp_path):
    import pipelines.preprocess.render

    # the real worker, except that it hangs while importing an asset whose file name contains "hangme"
    script = tmp_path / "hanging_blender_worker.py"
    script.write_text(HANGING_WORKER.format(pipelines=str(pipelines.preprocess.render.WORKER.parent)))
    monkeypatch.setattr(pipelines.preprocess.render, "WORKER", script)
    stage = tiny_stage(timeout_s=10)
    rows = [asset_row(synthetic_mesh_glb(s), "glb", n) for s, n in ((0, "a.glb"), (1, "hangme.glb"), (2, "b.glb"))]
    with ThreadPoolExecutor(2) as pool:
        out = list(pool.map(stage, rows))
    assert out[1]["error"] == "render: blender timed out after 10 s (worker killed)"
    assert out[0]["error"] is None and out[2]["error"] is None
    assert not _my_workers(), "a Blender worker was left running"


STUCK_WARM_WORKER = """
import os, sys, time
sys.path.insert(0, {pipelines!r})
import blender_worker

if sys.argv[1:] == ["--serve"]:
    if {mode!r} == "never_ready":
        time.sleep(3600)
    if os.fork():
        os._exit(0)
    print(f"ready {{os.getpid()}} 0.0", flush=True)
    time.sleep(3600)  # never reads a job, never answers
blender_worker.run_cli(sys.argv[1:])
"""


@pytest.mark.parametrize("mode", ["never_ready", "no_reply"])
def test_stuck_warm_worker_is_killed_and_the_asset_renders_in_a_fresh_process(monkeypatch, tmp_path, mode):
    import time

    import pipelines.preprocess.render

    # the real worker for assets; as a warm worker it either never gets ready or never answers a job
    script = tmp_path / f"stuck_{mode}_worker.py"
    script.write_text(STUCK_WARM_WORKER.format(pipelines=str(pipelines.preprocess.render.WORKER.parent), mode=mode))
    monkeypatch.setattr(pipelines.preprocess.render, "WORKER", script)
    monkeypatch.setattr(pipelines.preprocess.render.WarmWorker, "STARTUP_TIMEOUT_S", 4.0)
    monkeypatch.setattr(pipelines.preprocess.render.WarmWorker, "REPLY_TIMEOUT_S", 3.0)
    stage = tiny_stage(timeout_s=60)
    t0 = time.time()
    out = stage(asset_row(synthetic_mesh_glb(0), "glb", "a.glb"))
    assert out["error"] is None, out["error"]
    assert time.time() - t0 < 60
    time.sleep(1)
    assert not _processes(script.name.encode()), "the stuck warm worker was left running"
    stage.close()


def _my_workers() -> list[int]:
    """Blender workers that are children of this test process (other sessions' workers are not ours)."""
    import os

    return _processes(b"blender_worker.py", parent=os.getpid())


def _processes(needle: bytes, parent: int | None = None) -> list[int]:
    """Pids of running processes whose command line contains ``needle`` (and whose parent is ``parent``)."""
    import os

    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
            cmd = open(f"/proc/{d}/cmdline", "rb").read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if needle in cmd and parent in (None, ppid):
            pids.append(int(d))
    return pids


@pytest.mark.blender
@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_cycles_renders_on_every_core_in_the_sandboxed_worker(warm, tmp_path):
    """bpy is imported after the worker's last fork: oneTBB's worker threads, started by that import, are not
    copied by a fork, and a worker forked after it rendered on one thread. The worker reports the CPU seconds of
    all its threads per wall second of rendering."""
    import os

    from pipelines.preprocess.render import RenderPass, RenderSettings, WarmWorker, render_file

    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one CPU: nothing to show")
    (tmp_path / "asset").mkdir()
    asset = tmp_path / "asset" / "a.glb"
    asset.write_bytes(shared_path("assets", "glb", "kenney_tree.glb").read_bytes())
    c2w, fov = feature_cameras(4, (0.1, 0.2))
    worker = WarmWorker() if warm else None
    try:
        res = render_file(asset, "glb", [RenderPass("views", 256, c2w, fov)],
                          RenderSettings(samples=32, denoise=False, device="cpu"), workdir=tmp_path,
                          bundle_dir=tmp_path / "asset", warm=worker)
    finally:
        if worker is not None:
            worker.close()
    assert res.ok, res.error
    used = res.info["timings"]["render_busy_cores"]
    # forked after the import: 1.00 (no oneTBB workers); on an idle 2-core machine about 1.97, a loaded one less
    assert used > 1.15, f"{used:.2f} busy cores of {cores} while rendering"
