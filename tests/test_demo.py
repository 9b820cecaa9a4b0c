"""`make demo` piece by piece (the whole run takes ~4.5 min on an idle 2-core machine): the shipped preset and
every preset it builds on load and validate, the demo's assets, its structured SS encoder, its probe, and its
evaluation stage (the `evaluate_demo` preset as shipped) on tiny shards."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
@pytest.mark.slow
def test_make_demo_runs_the_demo_job_with_its_shipped_preset():
    make = (ROOT / "Makefile").read_text()
    assert "\t$(BIN)/python jobs/demo.py\n" in make            # no arguments: the preset as shipped
    r = subprocess.run([sys.executable, "jobs/demo.py", "--print-config"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "structured_latents: true" in r.stdout and "min_teacher_iou: 0.5" in r.stdout


def test_bad_demo_override_exits_2():
    r = subprocess.run([sys.executable, "jobs/demo.py", "--set", "teacher.stepz=3"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "teacher.stepz" in r.stderr


def test_every_config_the_demo_builds_loads_and_validates(tmp_path):
    from mdt.config import load_config
    from pipelines.demo import driver as demo
    from pipelines.evaluate.driver import EvaluateConfig

    cfg = load_config(demo.DemoConfig, "cpu", prefix="demo_")
    models = {"dinov2": str(tmp_path / "dino")}
    t = demo.distill_config("demo-teacher", tmp_path, str(tmp_path / "data"), models, "probe", "sqlite:///x.db",
                            "flow_matching", None, cfg.teacher.steps, cfg.teacher.overrides)
    s = demo.distill_config("demo-mdt", tmp_path, str(tmp_path / "data"), models, "probe", "sqlite:///x.db", "mdt",
                            "teacher", cfg.student.steps, cfg.student.overrides)
    assert t.train.max_steps == 800 and t.data.cond_view == 0 and t.model.teacher is None
    assert s.objective.name == "mdt" and s.data.cond_view == 0 and s.model.teacher == "teacher"
    # the exports the README's demo evaluation line reads: named by what each run trains
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("python jobs/evaluate.py --preset demo "))
    assert (t.model.export_stem, s.model.export_stem) == ("ss_flow_demo_teacher", "ss_flow_demo_student")
    for run in (t, s):
        assert f"/{run.name}/export/ema/{run.model.export_stem} " in line, (run.name, line)
    ev = load_config(EvaluateConfig, "demo", [("data.uri", "d"), ("models.teacher", "t"), ("models.student", "s"),
                                              ("models.ss_decoder", "p")] + cfg.evaluate_overrides,
                     prefix="evaluate_").validate()
    assert ev.data.cond_view == s.data.cond_view             # evaluated on the view it was trained on
    assert [x.label for x in ev.samplers] == ["teacher 25-step", "teacher 4-step", "teacher 2-step",
                                              "teacher 1-step", "student 1-step", "student 2-step", "student 4-step",
                                              "student 2-step re-noised", "student 4-step re-noised"]
    assert [x.student_rule for x in ev.samplers[-2:]] == ["consistency"] * 2
    # the data-free student: the same MDT-dist budget, on the synthesize_demo preset's rows
    assert cfg.data_free.enabled
    f = demo.distill_config("demo-mdt-data-free", tmp_path, str(tmp_path / "synth"), models, "probe",
                            "sqlite:///x.db", "mdt", "teacher", cfg.student.steps, cfg.student.overrides)
    assert (f.train.max_steps, f.objective, f.optim, f.data.batch_size) == (s.train.max_steps, s.objective, s.optim,
                                                                            s.data.batch_size)
    from pipelines.synthesize.driver import SynthesizeConfig

    syn = load_config(SynthesizeConfig, "demo", cfg.data_free.overrides, prefix="synthesize_").synthesize
    assert syn.ss.steps == 25 and syn.ss.cfg_strength == ev.sampling.teacher_cfg == 0.0   # the evaluation's reference
    assert syn.ss.rescale_t == ev.sampling.teacher_rescale_t and syn.image_size == ev.condition.image_size


def test_demo_assets_are_centred_single_primitives_with_distinct_colours(tmp_path):
    import trimesh

    from mdt.config import load_config
    from pipelines.demo import driver as demo

    cfg = load_config(demo.DemoConfig, "cpu", prefix="demo_")
    demo.write_assets(tmp_path, cfg.assets)
    files = sorted(tmp_path.glob("*.glb"))
    assert len(files) == cfg.assets.count
    colours = set()
    for f in files:
        scene = trimesh.load(io.BytesIO(f.read_bytes()), file_type="glb")
        assert len(scene.geometry) == 1
        mesh = next(iter(scene.geometry.values()))
        lo, hi = mesh.bounds
        assert np.allclose(lo, -hi, atol=1e-6) and hi.max() > 0.15   # centred, not degenerate
        colours.add(tuple(np.unique(mesh.visual.vertex_colors, axis=0)[0]))
    assert len(colours) == cfg.assets.count


def test_structured_ss_encoder_latent_is_a_function_of_the_cell_occupied_fraction():
    """Cells covering the same occupied fraction of their 4³ block get the same latent (the channels without the
    neighbourhood blur), different fractions different latents; the fraction is computed here by pooling."""
    import torch.nn.functional as F

    from mdt.eval.calibration import set_occupancy_fraction_weights
    from mdt.models import SparseStructureEncoder

    enc = SparseStructureEncoder(in_channels=1, latent_channels=8, num_res_blocks=1, num_res_blocks_middle=1,
                                 channels=[8, 16, 32], use_fp16=False).eval()
    set_occupancy_fraction_weights(enc)
    g = torch.Generator().manual_seed(0)
    occ = (torch.rand(2, 1, 64, 64, 64, generator=g) < torch.rand(2, 1, 16, 16, 16, generator=g).repeat_interleave(
        4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4) ** 3).float()
    with torch.no_grad():
        z = enc(occ)[:, :4]                                    # the cell-only channels
    p = F.avg_pool3d(occ, 4)                                   # [2, 1, 16, 16, 16]
    z, p = z.permute(0, 2, 3, 4, 1).reshape(-1, 4), (p.flatten() * 64).round().long()
    groups = [z[p == k] for k in p.unique() if (p == k).sum() > 1]
    assert len(groups) > 10
    assert max(float((gz - gz.mean(0)).abs().max()) for gz in groups) < 1e-4
    means = torch.stack([gz.mean(0) for gz in groups])
    assert torch.cdist(means, means).add(torch.eye(len(means)) * 1e9).min() > 1e-4


@pytest.mark.slow
def test_probe_noise_makes_decoding_tolerant_of_off_data_latents():
    from mdt.eval.shapes import paired_iou
    from mdt.eval.snapshots import fit_occupancy_probe

    g = torch.Generator().manual_seed(0)
    occ = torch.rand(8, 8, 8, 8, generator=g) > 0.7
    x = occ[:, None].float().repeat(1, 4, 1, 1, 1) * 2 - 1     # a latent that encodes the occupancy
    probe = fit_occupancy_probe(x, occ, steps=150, hidden=8, batch_size=8, noise_std=0.5)
    noisy = x + 0.5 * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        assert paired_iou(probe(noisy)[:, 0] > 0, occ).mean() > 0.9


@pytest.mark.ray
def test_demo_evaluation_stage_with_its_preset(tmp_path, monkeypatch, ray_connected):
    """The evaluation the demo runs (`evaluate_demo` as shipped, the demo's model paths) on tiny shards."""
    from _distill_helpers import TINY_SS_ARGS, perturbed_teacher, write_tiny_shards
    from mdt.eval.snapshots import OccupancyProbe
    from jobs.evaluate import main

    monkeypatch.chdir(tmp_path)                                # the preset's outputs/demo/... paths land here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = write_tiny_shards(tmp_path / "pre", n=3, image_size=56)
    args = {**TINY_SS_ARGS, "cond_channels": 64}               # the demo's tiny DINOv2 width
    teacher = perturbed_teacher(tmp_path / "t" / "teacher", args)
    student = perturbed_teacher(tmp_path / "s" / "student", args, seed=3)
    OccupancyProbe(8, hidden=8).save(tmp_path / "probe")
    rc = main(["--preset", "demo", "--data", str(data), "--teacher", teacher, "--student", student,
               "--decoder", str(tmp_path / "probe")])
    assert rc == 0
    res = json.loads((tmp_path / "outputs" / "demo" / "eval" / "evaluate-demo" / "results.json").read_text())
    assert res["assets"] == 3 and res["seeds"] == 2 and len(res["rows"]) == 9
    assert all(r["samples"] == 6 for r in res["rows"])
    rules = {r["sampler"]: r["student_rule"] for r in res["rows"] if r["kind"] == "student"}
    assert rules == {"student 1-step": "euler", "student 2-step": "euler", "student 4-step": "euler",
                     "student 2-step re-noised": "consistency", "student 4-step re-noised": "consistency"}
    rows = {r["sampler"]: r for r in res["rows"]}
    # the re-noised 2-step sample differs from the Euler one (its fresh noise is really drawn)
    assert rows["student 2-step re-noised"]["mse_ref"] != rows["student 2-step"]["mse_ref"]


@pytest.mark.slow
@pytest.mark.parametrize("bias", [100.0, -100.0])
def test_demo_generation_uses_its_probe_and_measures_iou_with_the_condition(tmp_path, bias):
    """The demo's generation step (the demo's tiny DINOv2 width, a student and its occupancy probe): the chain
    decodes with that probe (not a random tiny SS decoder), and each input's IoU with its conditioning asset is
    the one derived here — a probe that marks every cell occupied gives |asset| / 16³, one that marks none gives
    0, which fails the demo's check with one line per input."""
    from _distill_helpers import TINY_SS_ARGS, perturbed_teacher, write_tiny_shards
    from mdt.models.zoo import save_tiny_dinov2
    from mdt.eval.snapshots import OccupancyProbe, occupancy_grid
    from pipelines.demo import driver as demo
    from pipelines.preprocess import shards

    data = write_tiny_shards(tmp_path / "pre", n=2, image_size=56)
    student = perturbed_teacher(tmp_path / "s" / "student", {**TINY_SS_ARGS, "cond_channels": 64})
    probe = OccupancyProbe(8, hidden=4)
    with torch.no_grad():
        probe.net[-1].bias.fill_(bias)
    probe.save(tmp_path / "probe")
    save_tiny_dinov2(tmp_path / "dino", hidden_size=64)
    n = 1 if bias > 0 else 2                                   # every cell occupied: a slow SLat stage, once
    summary = demo.generate_samples(tmp_path, str(data), student, str(tmp_path / "probe"),
                                    {"dinov2": str(tmp_path / "dino")}, n=n)
    assert summary["models"]["ss_decoder"] == {"path": str(tmp_path / "probe"), "origin": "config"}
    rows = list(shards.iter_rows(str(data), columns=["slat_coords"]))
    for entry, row in zip(summary["inputs"], rows):
        truth = occupancy_grid(np.frombuffer(row["slat_coords"], np.uint8).reshape(-1, 3), 16)
        expected = truth.sum().item() / 16 ** 3 if bias > 0 else 0.0
        assert entry["iou_with_condition"] == pytest.approx(expected, abs=1e-4), entry
        assert Path(entry["dir"], "occupancy.glb").exists() == (bias > 0)
    failures = demo.generation_failures(summary, 0.5)
    assert len(failures) == 1 and "mean IoU" in failures[0] and "< 0.5" in failures[0], failures
    assert demo.generation_failures({"inputs": [{"name": "x", "iou_with_condition": 0.7}]}, 0.5) == []
    two = {"inputs": [{"name": "a", "iou_with_condition": 0.3}, {"name": "b", "iou_with_condition": 0.8}]}
    assert demo.generation_failures(two, 0.5) == []                  # mean 0.55
    assert "mean IoU 0.550" in demo.generation_failures(two, 0.6)[0]
    assert "no generated occupancy for b" in demo.generation_failures(
        {"inputs": [{"name": "a", "iou_with_condition": 0.9}, {"name": "b"}]}, 0.5)[0]


def test_merged_table_puts_the_data_free_rows_after_the_evaluation_rows():
    from pipelines.demo import driver as demo

    rows = [{"sampler": "teacher 25-step", "kind": "teacher", "steps": 25, "nfe": 25, "iou": 0.6},
            {"sampler": "student 1-step", "kind": "student", "steps": 1, "nfe": 1, "iou": 0.5}]
    free = [{"sampler": "teacher 25-step", "kind": "teacher", "steps": 25, "nfe": 25, "iou": 0.6},
            {"sampler": "data-free student 1-step", "kind": "student", "steps": 1, "nfe": 1, "iou": 0.4}]
    merged, table = demo.merged_table(rows, free)
    assert [r["sampler"] for r in merged] == ["teacher 25-step", "student 1-step", "data-free student 1-step"]
    lines = table.splitlines()
    assert len(lines) == 2 + 3 and lines[-1].startswith("| data-free student 1-step | 1 |")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_data_free_synthesis_and_evaluation_on_tiny_shards(tmp_path):
    """The demo's data-free steps on tiny shards with its presets (synthesize_demo, evaluate_demo): every asset's
    condition view becomes K teacher samples conditioned on exactly that image (its sha256 is the row's
    source_sha256), and the data-free student's evaluation rows are the ones the final table adds."""
    import hashlib

    from _distill_helpers import TINY_SS_ARGS, perturbed_teacher, write_tiny_shards
    from mdt.models.zoo import save_tiny_dinov2
    from mdt.eval.snapshots import OccupancyProbe
    from pipelines.demo import driver as demo
    from pipelines.preprocess import shards

    data = write_tiny_shards(tmp_path / "pre", n=2, image_size=56)
    args = {**TINY_SS_ARGS, "cond_channels": 64}
    teacher = perturbed_teacher(tmp_path / "t" / "teacher", args)
    student = perturbed_teacher(tmp_path / "s" / "student", args, seed=3)
    probe = OccupancyProbe(8, hidden=8)
    with torch.no_grad():
        probe.net[-1].bias.fill_(1.0)
    probe.save(tmp_path / "probe")
    save_tiny_dinov2(tmp_path / "dino", hidden_size=64)
    models = {"dinov2": str(tmp_path / "dino")}
    import ray

    try:                                                        # the jobs start a private Ray, as in the demo
        out_dir, summary = demo.synthesize(tmp_path, str(data), teacher, str(tmp_path / "probe"), models, [])
        ev = demo.evaluate_data_free(tmp_path, str(data), teacher, student, str(tmp_path / "probe"), models,
                                     f"sqlite:///{tmp_path / 'mlflow.db'}", None, [])
    finally:
        ray.shutdown()
    k = 4                                                       # synthesize_demo's samples_per_image
    assert summary["images_done"] == 2 and summary["samples_done"] == 2 * k
    written = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "condition-images").glob("*.png")}
    rows = list(shards.iter_rows(out_dir, columns=["source_sha256", "teacher_sha256"]))
    assert len(rows) == 2 * k and {r["source_sha256"] for r in rows} == written and len(written) == 2
    assert {r["teacher_sha256"] for r in rows} == {
        hashlib.sha256(Path(teacher + ".safetensors").read_bytes()).hexdigest()}
    labels = [r["sampler"] for r in ev.results["rows"]]
    assert labels == ["teacher 25-step", "data-free student 1-step", "data-free student 2-step"]
    merged, table = demo.merged_table([{"sampler": "student 1-step", "kind": "student", "steps": 1}],
                                      ev.results["rows"])
    assert [r["sampler"] for r in merged] == ["student 1-step", "data-free student 1-step",
                                              "data-free student 2-step"]
