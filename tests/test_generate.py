"""The image -> 3D chain (mdt/generate/), its exporters (mdt/export/) and jobs/generate.py.

Tiny random-weight models of the real architectures; expected values are derived independently of the code under
test (analytic SDFs, plyfile as the PLY reader, trimesh as the GLB reader, scipy rotations).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "mug.png"


@pytest.fixture(autouse=True, scope="module")
def restore_torch_threads():
    """The demo preset (torch_threads: 1) and the chain fixture set torch's global thread count; later test
    modules get theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run_job(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 300):
    # One intra-op thread: the suite shares 2 cores; a second thread per process only adds contention.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def link_repo(cwd: Path) -> None:
    """A working directory in which `python jobs/generate.py ... docs/examples/...` runs as printed, with the
    preset's relative output paths landing in the tmp dir, not in the checkout."""
    cwd.mkdir(parents=True, exist_ok=True)
    for name in ("jobs", "docs"):
        if not (cwd / name).exists():
            (cwd / name).symlink_to(ROOT / name)


# ------------------------------------------------------------------------------------------------ FlexiCubes

def sphere_grid(resolution: int, radius: float):
    idx = torch.arange(resolution + 1)
    g = torch.stack(torch.meshgrid(idx, idx, idx, indexing="ij"), -1).reshape(-1, 3).double() / resolution - 0.5
    return g, g.norm(dim=1) - radius


def test_flexicubes_sphere_dense_grid():
    from mdt.export.flexicubes import dense_grid_flexicubes

    import trimesh

    resolution, radius = 24, 0.3
    _, sdf = sphere_grid(resolution, radius)
    mesh = dense_grid_flexicubes(sdf.float(), resolution)
    err = (mesh.vertices.double().norm(dim=1) - radius).abs()
    assert mesh.num_faces > 500
    assert float(err.max()) < 1.0 / resolution          # surface distance below one voxel
    assert float(err.mean()) < 0.1 / resolution
    tm = trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy(), process=True)
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume == pytest.approx(4 / 3 * math.pi * radius ** 3, rel=0.05)   # > 0: normals point outwards


def test_flexicubes_trellis_handoff_sparse_sphere():
    """The mesh-decoder hand-off on a sparse shell of voxels whose 8 corner values encode a sphere's SDF (plus the
    1/R that the hand-off subtracts): the mesh lies on the sphere, closed, attributes interpolated."""
    from mdt.export.flexicubes import CORNER_OFFSETS, mesh_from_decoder_output

    import trimesh

    resolution, radius = 32, 0.31
    idx = torch.arange(resolution)
    cubes = torch.stack(torch.meshgrid(idx, idx, idx, indexing="ij"), -1).reshape(-1, 3)
    centre_d = ((cubes.double() + 0.5) / resolution - 0.5).norm(dim=1) - radius
    # The solid ball plus a band outside it: as in a dense grid, cubes that are not given count as outside (+1),
    # so the given region must hold the whole inside.
    shell = cubes[centre_d < 2.0 / resolution]
    corners = (shell.unsqueeze(1) + CORNER_OFFSETS).double() / resolution - 0.5
    sdf = corners.norm(dim=-1) - radius + 1.0 / resolution
    n = shell.shape[0]
    colour = torch.zeros(n, 8, 6)
    colour[:, :, 0] = 0.8                                                # constant red survives interpolation
    feats = torch.cat([sdf.float(), torch.zeros(n, 24), torch.zeros(n, 21), colour.reshape(n, 48)], 1)
    mesh = mesh_from_decoder_output(shell, feats, resolution)
    err = (mesh.vertices.double().norm(dim=1) - radius).abs()
    assert mesh.num_faces > 500 and float(err.max()) < 1.0 / resolution
    assert torch.allclose(mesh.attributes[:, 0], torch.full_like(mesh.attributes[:, 0], 0.8), atol=1e-5)
    tm = trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy(), process=True)
    assert tm.is_watertight
    assert tm.volume == pytest.approx(4 / 3 * math.pi * radius ** 3, rel=0.05)


def test_flexicubes_deformation_moves_vertices():
    """Deformation and weights take effect: the deformed mesh differs from the undeformed one, stays within the
    half-cell bound of the tanh deformation, and every face still references valid vertices."""
    from mdt.export.flexicubes import CORNER_OFFSETS, mesh_from_decoder_output

    resolution, radius = 16, 0.3
    idx = torch.arange(resolution)
    cubes = torch.stack(torch.meshgrid(idx, idx, idx, indexing="ij"), -1).reshape(-1, 3)
    corners = (cubes.unsqueeze(1) + CORNER_OFFSETS).double() / resolution - 0.5
    sdf = (corners.norm(dim=-1) - radius + 1.0 / resolution).float()
    n = cubes.shape[0]
    base = torch.cat([sdf, torch.zeros(n, 24 + 21 + 48)], 1)
    g = torch.Generator().manual_seed(0)
    moved = base.clone()
    moved[:, 8:53] = torch.randn(n, 45, generator=g)
    a = mesh_from_decoder_output(cubes, base, resolution)
    b = mesh_from_decoder_output(cubes, moved, resolution)
    assert a.num_faces > 0 and b.num_faces > 0
    assert int(b.faces.max()) < b.vertices.shape[0]
    assert not torch.allclose(a.vertices[: min(len(a.vertices), len(b.vertices))],
                              b.vertices[: min(len(a.vertices), len(b.vertices))])
    assert float((b.vertices.norm(dim=1) - radius).abs().max()) < 2.0 / resolution


# ------------------------------------------------------------------------------------------------ PLY

def random_gaussians(n: int = 50, seed: int = 0):
    from mdt.models import Gaussians

    g = torch.Generator().manual_seed(seed)
    return Gaussians(xyz=torch.rand(n, 3, generator=g), features_dc=torch.randn(n, 1, 3, generator=g),
                     scaling=torch.randn(n, 3, generator=g), rotation=torch.randn(n, 4, generator=g) * 0.3,
                     opacity=torch.randn(n, 1, generator=g))


def test_gaussian_ply_layout_and_values(tmp_path):
    from plyfile import PlyData
    from scipy.spatial.transform import Rotation

    from mdt.export.ply import write_gaussian_ply

    gs = random_gaussians()
    path = write_gaussian_ply(tmp_path / "g.ply", gs)
    ply = PlyData.read(str(path))
    assert [e.name for e in ply.elements] == ["vertex"]
    v = ply["vertex"]
    names = [p.name for p in v.properties]
    assert names == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                     "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert all(p.val_dtype in ("f4", "float32", "float") for p in v.properties)
    assert v.count == 50
    d = v.data
    # Independent expectations: TRELLIS activations written out by hand, Z-up (x, y, z) -> Y-up (x, z, -y).
    world = gs.xyz.numpy() - 0.5
    np.testing.assert_allclose(np.stack([d["x"], d["y"], d["z"]], 1),
                               np.stack([world[:, 0], world[:, 2], -world[:, 1]], 1), atol=1e-6)
    np.testing.assert_array_equal(np.stack([d["nx"], d["ny"], d["nz"]], 1), 0)
    np.testing.assert_allclose(np.stack([d[f"f_dc_{i}"] for i in range(3)], 1), gs.features_dc.numpy()[:, 0], atol=1e-6)
    opacity = 1 / (1 + np.exp(-(gs.opacity.numpy()[:, 0] + np.log(0.1 / 0.9))))
    np.testing.assert_allclose(1 / (1 + np.exp(-d["opacity"])), opacity, rtol=1e-4)
    s = np.log1p(np.exp(gs.scaling.numpy() + np.log(np.expm1(4e-3))))
    s = np.sqrt(s ** 2 + 9e-4 ** 2)
    np.testing.assert_allclose(np.exp(np.stack([d[f"scale_{i}"] for i in range(3)], 1)), s, rtol=1e-4)
    q = np.stack([d[f"rot_{i}"] for i in range(4)], 1)                 # (w, x, y, z), unit length
    q_act = gs.rotation.numpy() + np.array([1, 0, 0, 0])
    assert np.linalg.norm(q_act, axis=1).std() > 0.01                   # the raw quaternions are not unit
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)
    r_file = Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()
    r_obj = Rotation.from_quat(q_act[:, [1, 2, 3, 0]]).as_matrix()
    to_y_up = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], np.float64)
    np.testing.assert_allclose(r_file, to_y_up @ r_obj, atol=1e-5)


def test_glb_is_y_up_with_vertex_colours(tmp_path):
    import trimesh

    from mdt.export.flexicubes import MeshData
    from mdt.export.mesh import write_glb

    # A tetrahedron whose apex is the top (max z) in TRELLIS's frame.
    v = torch.tensor([[0.0, 0, 0], [0.3, 0, 0], [0, 0.3, 0], [0.1, 0.1, 0.4]])
    f = torch.tensor([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]])
    attrs = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
    path = write_glb(tmp_path / "m.glb", MeshData(v, f, attrs))
    scene = trimesh.load(str(path))
    mesh = next(iter(scene.geometry.values())) if hasattr(scene, "geometry") else scene
    assert len(mesh.faces) == 4
    top = mesh.vertices[np.argmax(mesh.vertices[:, 1])]
    np.testing.assert_allclose(top, [0.1, 0.4, -0.1], atol=1e-6)      # Z-up apex is the Y-up top
    colours = mesh.visual.vertex_colors[:, :3]
    assert {tuple(c) for c in colours} == {(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)}


def test_occupancy_mesh_is_closed_box_surface():
    import trimesh

    from mdt.export.mesh import occupancy_mesh

    coords = torch.tensor([[x, y, z] for x in range(2, 5) for y in range(3, 5) for z in range(1, 2)])
    m = occupancy_mesh(coords, 8)
    # A 3×2×1 block exposes 2·(3·2 + 3·1 + 2·1) = 22 unit squares = 44 triangles.
    assert m.num_faces == 44
    tm = trimesh.Trimesh(m.vertices.numpy(), m.faces.numpy(), process=True)
    assert tm.is_watertight and tm.volume == pytest.approx(6 / 8 ** 3, rel=1e-6)


def test_preview_renders_the_object_not_the_background():
    from mdt.export.preview import BACKGROUND, render_points

    pts = torch.rand(2000, 3) * 0.4 - 0.2
    img = render_points(pts, torch.tensor([[0.9, 0.1, 0.1]]).expand(2000, 3), size=64)
    fg = (img != np.array(BACKGROUND)).any(-1)
    assert 0.1 < fg.mean() < 0.9
    # nearest splat wins: a near blue point in front of a far red one at the same pixel
    two = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0]])   # camera at azimuth 0 looks down −x
    img = render_points(two, torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), azimuth=0, elevation=0, size=33)
    assert tuple(img[16, 16]) == (0, 0, 255)


# ------------------------------------------------------------------------------------------------ the chain

@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from mdt.config import load_config
    from mdt.generate import GenerateConfig, ImageTo3D

    tmp = tmp_path_factory.mktemp("gen")
    cfg = load_config(GenerateConfig, "demo", [("models.tiny_models", str(tmp / "tiny")),
                                               ("models.dinov2", str(tmp / "absent-dinov2")),
                                               ("output", str(tmp / "out")), ("num_samples", 2)],
                      prefix="generate_")
    torch.set_num_threads(1)
    return cfg, ImageTo3D.from_config(cfg), tmp


@pytest.mark.slow
def test_generate_writes_readable_assets_for_two_batched_samples(tiny_pipeline):
    from plyfile import PlyData

    import trimesh

    from mdt.generate import TINY_NOW, generate

    cfg, pipe, tmp = tiny_pipeline
    assert all(src.origin == TINY_NOW for src in pipe.sources.values())
    summary = generate(cfg, [str(EXAMPLE)], str(tmp / "out"), pipeline=pipe, echo=lambda *_: None)
    assert summary["ok"] == 1
    d = tmp / "out" / "mug"
    for k in range(2):
        ply = PlyData.read(str(d / f"sample_{k}" / "gaussians.ply"))
        assert ply["vertex"].count > 0 and len(ply["vertex"].properties) == 17
        glb = trimesh.load(str(d / f"sample_{k}" / "mesh.glb"), force="mesh")
        assert len(glb.faces) > 0
        occ = trimesh.load(str(d / f"sample_{k}" / "occupancy.glb"), force="mesh")
        assert len(occ.faces) > 0
    png = np.asarray(Image.open(d / "preview.png").convert("RGB"))
    assert (png != np.array([245, 245, 245])).any(-1).mean() > 0.05      # not blank
    timings = json.loads((d / "timings.json").read_text())
    assert timings["warm"] is True and timings["num_samples"] == 2
    for stage in ("condition", "ss_flow", "ss_decode", "slat_flow", "decode_gaussians", "decode_mesh"):
        assert timings["seconds"][stage] > 0
    assert timings["nfe"] == {"ss_flow": 4 * 2, "slat_flow": 4}      # demo: SS CFG on every step, SLat none
    voxels = [s["voxels"] for s in timings["samples"]]
    assert all(v > 0 for v in voxels)
    assert all(s["gaussians"] == 32 * s["voxels"] for s in timings["samples"])
    for k, s in enumerate(timings["samples"]):   # 32 Gaussians per occupied voxel, all of them in the file
        assert PlyData.read(str(d / f"sample_{k}" / "gaussians.ply"))["vertex"].count == 32 * s["voxels"]
    assert "<script src" not in (d / "viewer.html").read_text()


def test_batched_samples_differ_and_chunked_decoding_matches_one_pass(tiny_pipeline):
    from mdt.generate import load_image

    cfg, pipe, _ = tiny_pipeline
    gen = pipe.run(load_image(EXAMPLE), num_samples=2, seed=3, formats=["gaussians"])
    a, b = gen.samples
    assert not (a.coords.shape == b.coords.shape and torch.equal(a.coords, b.coords))
    # The same latent decoded in one pass and in one-sample chunks gives the same Gaussians.
    cond = pipe.condition(gen.condition_image.unsqueeze(0))
    lat = pipe.sample_latent(cond, [a.coords, b.coords], torch.Generator().manual_seed(0))
    one = pipe.decode_gaussians(lat)
    old = cfg.decode.max_voxels_per_chunk
    cfg.decode.max_voxels_per_chunk = 1
    try:
        assert len(pipe.chunks(lat)) == 2
        chunked = pipe.decode_gaussians(lat)
    finally:
        cfg.decode.max_voxels_per_chunk = old
    for x, y in zip(one, chunked):
        torch.testing.assert_close(x.xyz, y.xyz, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.opacity, y.opacity, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_bad_input_is_a_recorded_failure_and_the_others_run(tiny_pipeline, tmp_path):
    from mdt.generate import generate

    cfg, pipe, _ = tiny_pipeline
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    cfg.num_samples = 1
    try:
        summary = generate(cfg, [str(bad), str(EXAMPLE)], str(tmp_path / "out"), pipeline=pipe,
                           echo=lambda *_: None)
    finally:
        cfg.num_samples = 2
    assert summary["ok"] == 1
    failed = [e for e in summary["inputs"] if "error" in e]
    assert [e["name"] for e in failed] == ["broken"] and "UnidentifiedImageError" in failed[0]["error"]
    assert (tmp_path / "out" / "mug" / "gaussians.ply").exists()


# ------------------------------------------------------------------------------------------------ the CLI

@pytest.mark.parametrize("args, message", [
    (["--preset", "demo", "--image", "missing.png", "--output", "o"], "--image missing.png: not a readable file"),
    (["--preset", "demo", "--image", str(EXAMPLE), "--output", "o", "--cfg", "1", "2", "3"], "--cfg takes one"),
    (["--preset", "demo", "--image", str(EXAMPLE), "--output", "o", "--cfg", "-1"], "--cfg must be >= 0"),
    (["--preset", "demo", "--image", str(EXAMPLE), "--output", "o", "--ss-steps", "0"], "--ss-steps must be >= 1"),
    (["--preset", "demo", "--image", str(EXAMPLE), "--output", "o", "--num-samples", "0"], "--num-samples must"),
    (["--preset", "demo", "--image", str(EXAMPLE), "--output", "o", "--ss-model", "nowhere/x"], "--ss-model"),
    (["--preset", "nope", "--image", str(EXAMPLE), "--output", "o"], "unknown preset 'nope'"),
    (["--preset", "demo", "--image", str(EXAMPLE), "--output", "o", "--set", "decode.formats=[nerf]"],
     "decode.formats: unknown ['nerf']"),
    (["--preset", "demo", "--image", str(EXAMPLE)], "--output"),
    (["--preset", "demo", "--image", str(EXAMPLE), "--output", "o", "--num-samples", "x"], "invalid int"),
    (["--preset", "demo", "--output", "o"], "--image"),
])
def test_cli_argument_errors_exit_2_with_one_line_before_building(tmp_path, monkeypatch, capsys, args, message):
    import mdt.generate
    from jobs.generate import main

    def must_not_run(*a, **k):
        raise AssertionError("generation started despite a bad argument")

    monkeypatch.setattr(mdt.generate, "generate", must_not_run)
    monkeypatch.chdir(tmp_path)
    try:
        code = main(args)
    except SystemExit as exc:   # argparse's own errors
        code = exc.code
    assert code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "o").exists() and not (tmp_path / "outputs").exists()   # nothing was built


def test_cli_exit_status_2_from_the_process(tmp_path):
    res = run_job([str(ROOT / "jobs" / "generate.py"), "--preset", "demo", "--image", "missing.png", "--output",
                   "o"], cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == "argument error: --image missing.png: not a readable file"


def test_cli_incompatible_student_fails_with_one_line(tmp_path, monkeypatch, capsys):
    """A flow checkpoint whose condition width does not fit the DINOv2: exit 1, one readable line."""
    from jobs.generate import main
    from mdt.models.zoo import save_tiny_model

    link_repo(tmp_path)
    monkeypatch.chdir(tmp_path)
    save_tiny_model("ss_flow", tmp_path / "student" / "ss_flow_wide", cond_channels=32)
    code = main(["--preset", "demo", "--image", "docs/examples/mug.png", "--output", "o",
                 "--ss-model", "student/ss_flow_wide"])
    assert code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "Loading weights" not in ln]
    assert err[-1] == ("generation could not run: ValueError: incompatible models: ss_flow expects 32-channel "
                       "condition tokens, DINOv2 gives 64"), err


def readme_generation_commands() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from infra.doc_commands import commands

    text = (ROOT / "README.md").read_text()
    return [c.text for c in commands(text) if c.section == "Generation"]


@pytest.mark.slow
def test_readme_demo_command_runs_as_printed(tmp_path):
    """The README's demo command, verbatim, with the preset as shipped (models created on the fly)."""
    import trimesh
    from plyfile import PlyData

    cmds = [c for c in readme_generation_commands() if "--preset demo" in c]
    assert cmds, "README's Generation section prints no demo command"
    link_repo(tmp_path)
    for cmd in cmds:
        argv = cmd.split()
        assert argv[:2] == ["python", "jobs/generate.py"]
        res = run_job(argv[1:], cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert "random-weight tiny model, created by this run" in res.stdout
        out = tmp_path / argv[argv.index("--output") + 1] / "mug"
        assert PlyData.read(str(out / "gaussians.ply"))["vertex"].count > 0
        assert len(trimesh.load(str(out / "mesh.glb"), force="mesh").faces) > 0
        assert len(trimesh.load(str(out / "occupancy.glb"), force="mesh").faces) > 0
        assert (out / "preview.png").exists() and (out / "viewer.html").exists()
        assert json.loads((out / "timings.json").read_text())["warm"] is True


def write_fake_hub(cache: Path) -> None:
    """A local Hugging Face cache holding microsoft/TRELLIS-image-large (pipeline.json + ckpts/ in TRELLIS format,
    tiny random weights) and facebook/dinov2-with-registers-large (tiny random weights): the trellis preset then
    loads "from the hub" offline through the real code paths. Few occupied voxels keep the 25 + 25 steps cheap."""
    from mdt.models.zoo import save_tiny_dinov2
    from mdt.models.zoo import write_trellis_repo

    rev = "0" * 40
    for repo_dir, write in (("models--microsoft--TRELLIS-image-large",
                             lambda d: write_trellis_repo(d, cond_channels=64, occupancy=0.0005, seed=10)),
                            ("models--facebook--dinov2-with-registers-large",
                             lambda d: save_tiny_dinov2(d, hidden_size=64))):
        repo = cache / repo_dir
        write(repo / "snapshots" / rev)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(rev)


@pytest.mark.slow
def test_readme_trellis_command_loads_trellis_checkpoints_by_hub_id(tmp_path):
    """The trellis preset as shipped, by HF id, from a local hub cache of tiny TRELLIS-format checkpoints."""
    import trimesh

    cmds = [c for c in readme_generation_commands() if "--preset trellis" in c and "--ss-model" not in c]
    assert cmds, "README's Generation section prints no trellis command"
    cache = tmp_path / "hf"
    write_fake_hub(cache)
    link_repo(tmp_path / "work")
    argv = cmds[0].split()
    res = run_job(argv[1:], cwd=tmp_path / "work", env_extra={"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path)},
                  timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ckpts/ss_flow_img_dit_L_16l8_fp16 [pipeline.json]" in res.stdout
    assert "facebook/dinov2-with-registers-large [pipeline.json]" in res.stdout
    out = tmp_path / "work" / argv[argv.index("--output") + 1] / "mug"
    timings = json.loads((out / "timings.json").read_text())
    assert timings["nfe"] == {"ss_flow": 25 + 19, "slat_flow": 25 + 19}   # pipeline.json sampling (§3.2)
    assert len(trimesh.load(str(out / "mesh.glb"), force="mesh").faces) > 0


@pytest.mark.slow
def test_generation_latency_benchmark_prints_rows_side_by_side(tmp_path, capsys):
    """`python -m mdt.bench.generate` on tiny random TRELLIS-shaped models (the GPU run uses --full-size)."""
    from mdt.bench.generate import main

    assert main(["--repo", str(tmp_path / "repo"), "--steps", "1", "2", "--repeats", "1", "--device", "cpu",
                 "--occupancy", "0.0005"]) == 0
    out = capsys.readouterr().out
    assert "| 1+1 | 2+2 |" in out and "| 2+2 | 4+4 |" in out and "sampling: 2+2 steps / 1+1 steps =" in out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows["1"]["seconds"]["ss_flow"] > 0 and rows["2"]["seconds"]["slat_flow"] > 0


def test_oversized_image_is_refused_before_decoding(tmp_path):
    """A small file that decodes to 81 M pixels (a decompression bomb) is refused from its header."""
    from mdt.generate import MAX_IMAGE_PIXELS, load_image

    path = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(path)
    assert path.stat().st_size < 200_000 and 9000 * 9000 > MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="9000x9000 pixels is more than"):
        load_image(path)
