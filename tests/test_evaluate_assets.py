"""The evaluation over the whole two-stage chain: the README's full-chain `jobs/evaluate.py --preset ci` command
(tiny random-weight SS and SLat flows, TRELLIS-architecture SS decoder and Gaussian decoder) through the Ray Data
graph — asset Fréchet distances, asset Chamfer / F-score, NFE of both stages, SLat latency stages — plus
known-case checks of the asset point sets and renders, and the trellis preset as shipped."""
from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import pytest
import torch

from _distill_helpers import perturbed_teacher, write_tiny_shards

SECTION = "The evaluation job"


def readme_lines() -> tuple[str, str]:
    """The README's two full-chain lines: the tiny-model writer and the evaluation command."""
    from infra.doc_commands import commands

    lines = [c.text for c in commands((Path(__file__).resolve().parents[1] / "README.md").read_text())
             if c.section == SECTION]
    command = next(t for t in lines if "--slat-decoder" in t)
    writer = lines[lines.index(command) - 1]
    assert writer.startswith('python -c "from mdt.generate import write_trellis_repo')
    return writer, command


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A directory laid out as the README's preceding lines leave it (the distillation section's `ci` shards,
    teacher and student as tiny stand-ins), then the README's tiny-model line run verbatim."""
    import shlex
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("eval-assets")
    writer, command = readme_lines()
    opt = dict(zip(shlex.split(command)[2::2], shlex.split(command)[3::2]))
    write_tiny_shards(tmp / opt["--data"], n=3)
    perturbed_teacher(tmp / opt["--teacher"])
    perturbed_teacher(tmp / opt["--student"], seed=2)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run(["bash", "-c", writer.replace("python ", f"{sys.executable} ", 1)], cwd=tmp, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp


@pytest.mark.ray
def test_readme_full_chain_command(inputs, ray_connected, tmp_path, monkeypatch, capsys):
    """The README's full-chain command, verbatim, run in a directory holding its inputs."""
    from jobs.evaluate import main

    monkeypatch.chdir(inputs)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    argv = shlex.split(readme_lines()[1])
    assert argv[:2] == ["python", "jobs/evaluate.py"]
    assert main(argv[2:]) == 0, capsys.readouterr().err[-3000:]

    run_dir = inputs / "outputs" / "eval-assets" / "evaluate-ci"
    res = json.loads((run_dir / "results.json").read_text())
    assert res["assets"] == 3
    assert "ground-truth assets are the shards' encoded SLat latents" in res["notes"][0]
    nfe = {r["sampler"]: (r["nfe"], r["nfe_stages"]) for r in res["rows"]}
    # SLat part defaults to the SS part's kind and steps (no CFG in the ci preset): NFE = 2 x steps
    assert nfe == {"teacher 4-step": (8, {"ss": 4, "slat": 4}), "teacher 1-step": (2, {"ss": 1, "slat": 1}),
                   "student 1-step": (2, {"ss": 1, "slat": 1}), "student 2-step": (4, {"ss": 2, "slat": 2})}
    for row in res["rows"]:
        assert row["samples"] == 3
        for k in ("fd_incep_asset", "fd_dinov2_asset", "fd_incep", "fd_dinov2"):
            assert math.isfinite(row[k]) and row[k] >= 0.0, (row["sampler"], k)
        assert 0.0 < row["chamfer_asset"] < 1.0 and 0.0 <= row["fscore_asset"] <= 1.0
        stages = row["latency_stages_s"]
        assert set(stages) == {"condition", "ss_sample", "ss_decode", "slat_sample", "slat_decode"}
        assert stages["slat_sample"] > 0 and stages["slat_decode"] > 0
        assert row["latency_s"] == pytest.approx(sum(stages.values()))
    table = (run_dir / "table.md").read_text()
    assert "FD_incep asset" in table and "CD asset" in table and "| teacher 4-step | 8 |" in table
    assert "the paper renders the ground-truth meshes" in table
    page = (run_dir / "previews" / "student_1-step.html").read_text()
    assert "ground truth (Gaussians)" in page and "student 1-step (Gaussians)" in page


def _gaussians(xyz: torch.Tensor, rgb=(0.8, 0.2, 0.2)):
    """Opaque Gaussians at world positions xyz [M, 3] with one DC colour."""
    from mdt.models import Gaussians

    m = xyz.shape[0]
    dc = (torch.tensor(rgb) - 0.5) / 0.28209479177387814
    return Gaussians(xyz=xyz + 0.5, features_dc=dc.expand(m, 1, 3).clone(), scaling=torch.zeros(m, 3),
                     rotation=torch.zeros(m, 4), opacity=torch.full((m, 1), 10.0))


def test_asset_points_chamfer_known_cases():
    """Identical assets: Chamfer 0, F-score 1; an asset shifted by d (less than half the spacing h of its grid of
    centres) along x: every nearest neighbour is the point's own copy, so Chamfer = 2 d in the [-1, 1]^3 frame
    (twice the world frame), F-score 1 above that distance and 0 below it."""
    from mdt.eval.assets import asset_points
    from mdt.eval.shapes import chamfer_fscore

    h, d = 0.1, 0.03
    ax = torch.arange(-2, 3) * h
    xyz = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    a = asset_points(_gaussians(xyz))
    assert a.shape == (125, 3) and a.abs().max().item() == pytest.approx(2 * 2 * h)
    cd, fs = chamfer_fscore(a, asset_points(_gaussians(xyz)), threshold=1e-6)
    assert cd == 0.0 and fs == 1.0
    shifted = asset_points(_gaussians(xyz + torch.tensor([d, 0.0, 0.0])))
    cd, fs = chamfer_fscore(a, shifted, threshold=2 * d + 1e-6)
    assert cd == pytest.approx(2 * d, abs=1e-6) and fs == 1.0
    assert chamfer_fscore(a, shifted, threshold=2 * d - 1e-3)[1] == 0.0
    # transparent Gaussians are not part of the asset; the subsample is bounded and fixed
    g = _gaussians(xyz)
    g.opacity[:25] = -20.0
    assert asset_points(g).shape == (100, 3)
    sub = asset_points(_gaussians(xyz), max_points=10)
    assert sub.shape == (10, 3) and torch.equal(sub, asset_points(_gaussians(xyz), max_points=10))
    assert asset_points(None).shape == (0, 3)


def test_asset_renders_known_cases():
    """Renders show the visible Gaussian centres in their DC colour on the background (none: background only); the
    same assets give the same renders, hence features at Fréchet distance 0; another colour changes exactly the
    pixels of the points."""
    import numpy as np

    from mdt.eval.assets import render_asset_views
    from mdt.eval.distribution import frechet_distance
    from mdt.export.preview import BACKGROUND

    torch.manual_seed(0)
    xyzs = [torch.rand(400, 3) * 0.6 - 0.3 for _ in range(6)]
    views = [render_asset_views(_gaussians(x), views=2, size=48) for x in xyzs]
    assert views[0].shape == (2, 48, 48, 3) and views[0].dtype == np.uint8
    red, blue = np.array([204, 51, 51]), np.array([51, 51, 204])
    on = (views[0] == red).all(-1)
    assert on.sum() > 100 and ((views[0] == np.array(BACKGROUND)).all(-1) | on).all()
    assert (render_asset_views(None, 2, 48) == np.array(BACKGROUND, np.uint8)).all()
    recoloured = render_asset_views(_gaussians(xyzs[0], rgb=(0.2, 0.2, 0.8)), 2, 48)
    assert np.array_equal((recoloured == blue).all(-1), on)

    def feats(renders):                                                  # mean colour per view: a fixed feature
        return np.concatenate([r.reshape(len(r), -1, 3).mean(1) for r in renders]).astype(np.float64)

    again = [render_asset_views(_gaussians(x), 2, 48) for x in xyzs]
    assert frechet_distance(feats(views), feats(again)) == pytest.approx(0.0, abs=1e-9)


def test_trellis_preset_configures_the_full_chain():
    """The trellis preset as shipped: the released SLat flow and Gaussian decoder, MDT-dist's SLat CFG for the
    student, NFE per stage as TRELLIS counts it (25 steps, CFG on t in [0.5, 1], rescale_t 3)."""
    from mdt.config import load_config
    from pipelines.evaluate.driver import EvaluateConfig, _nfe

    cfg = load_config(EvaluateConfig, "trellis", [("data.uri", "d"), ("models.teacher", "t"),
                                                  ("models.student", "s"), ("models.slat_student", "ss")],
                      prefix="evaluate_").validate()
    assert cfg.models.full_chain and cfg.models.slat_teacher.endswith("slat_flow_img_dit_L_64l8p2_fp16")
    assert cfg.models.slat_decoder.endswith("slat_dec_gs_swin8_B_64l8gs32_fp16")
    teacher = next(s for s in cfg.samplers if s.label == "teacher 25-step")
    assert _nfe(cfg, teacher) == {"ss": 44, "slat": 44}
    student = next(s for s in cfg.samplers if s.label == "student 1-step")
    assert _nfe(cfg, student) == {"ss": 2, "slat": 2}                   # CFG 3.0 / 0.1: two passes per step
    with pytest.raises(ValueError, match="slat_student"):
        load_config(EvaluateConfig, "trellis", [("data.uri", "d"), ("models.teacher", "t"),
                                                ("models.student", "s")], prefix="evaluate_").validate()


def test_student_rule_is_checked_before_anything_starts():
    """`student_rule` takes euler or consistency, and students only (teachers sample with TRELLIS's Euler
    sampler); the re-noised rule has its own label and is recorded on its row."""
    from mdt.config import load_config
    from pipelines.evaluate.driver import EvaluateConfig

    base = [("data.uri", "d"), ("models.teacher", "t"), ("models.student", "s"), ("models.ss_decoder", "p")]

    def cfg(samplers):
        return load_config(EvaluateConfig, "ci", base + [("samplers", samplers), ("sampling.reference",
                                                                                  "teacher 4-step")],
                           prefix="evaluate_").validate()

    ok = cfg([{"model": "teacher", "steps": 4}, {"model": "student", "steps": 2, "student_rule": "consistency"}])
    assert [s.label for s in ok.samplers] == ["teacher 4-step", "student 2-step re-noised"]
    with pytest.raises(ValueError, match="student_rule must be euler or consistency"):
        cfg([{"model": "teacher", "steps": 4}, {"model": "student", "steps": 2, "student_rule": "ddim"}])
    with pytest.raises(ValueError, match="students only"):
        cfg([{"model": "teacher", "steps": 4}, {"model": "teacher", "steps": 2, "student_rule": "consistency"}])
