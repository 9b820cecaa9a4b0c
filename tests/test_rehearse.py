"""`make rehearse` (pipelines/rehearse.py): its plan keeps every shipped size of the trellis presets and overrides
only what a CPU-only machine forces; the same driver runs end to end on tiny models."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import PROJECT_ROOT, shared_path

from pipelines import rehearse

# keys the full-size rehearsal may override: devices, workers, resources, batch, steps, samples, samplers,
# feature-net and model locations (never a model size, view count, image or latent resolution)
ALLOWED = {"resources.download", "resources.render", "resources.voxelize", "resources.features", "resources.encode",
           "resources.write", "ray.num_cpus", "render.samples", "cond.samples", "render.denoise", "features.dtype",
           "train.fixed_batch_loss", "precision",
           "features.checkpoint",
           "encode.ss_encoder", "encode.slat_encoder", "scaling.use_gpu", "scaling.num_workers",
           "scaling.cpus_per_worker", "scaling.backend", "data.batch_size", "data.batch_split", "data.shuffle_buffer",
           "train.max_steps", "train.ckpt_every", "train.precision", "snapshot.num_conditions",
           "snapshot.teacher_steps", "snapshot.student_steps", "snapshot.decoder", "condition.model", "mlflow.tracking_uri", "device",
           "warmup",
           "models.pipeline", "models.dinov2", "compute", "ray", "data.split", "samplers", "sampling.reference", "latency",
           "metrics.inception", "metrics.dinov2"}


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"_job_{name}", PROJECT_ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _configs(stages):
    out = {}
    for st in stages:
        if not st.argv[0].startswith("jobs/") or st.name == "generate":   # generate checks its files exist
            continue
        job = _job(st.argv[0].split("/")[1][:-3])
        out[st.name] = job.build_config(job.parse_args(st.command()[2:]))
    return out


def test_full_size_plan_keeps_the_shipped_sizes(tmp_path):
    stages = rehearse.plan(tmp_path, tmp_path / "a.glb", tiny=False)
    assert [s.name for s in stages] == ["models", "preprocess", "distill-ss", "distill-slat", "export", "generate",
                                        "evaluate"]
    for s in stages:
        assert all(o.why for o in s.overrides)
        assert {o.key for o in s.overrides} <= ALLOWED, s.name
    cfg = _configs(stages)
    pre = cfg["preprocess"]
    assert (pre.render.num_views, pre.render.resolution, pre.cond.num_views, pre.cond.render_resolution,
            pre.cond.image_size, pre.voxelize.resolution, pre.features.image_size) == (150, 512, 24, 1024, 518, 64,
                                                                                       518)
    assert all(r.num_gpus == 0 for r in pre.resources.values())
    # all actor pools start at once: more CPUs than the local Ray instance has would hang the graph
    assert sum(r.num_cpus * r.concurrency for r in pre.resources.values()) <= pre.ray.num_cpus
    for stage in ("ss", "slat"):
        d = cfg[f"distill-{stage}"]
        assert d.stage == stage
        assert d.model.gradient_checkpointing and d.model.teacher_dtype == "auto"
        assert d.condition.image_size == 518 and d.train.max_steps == 1 and not d.scaling.use_gpu
        assert d.train.precision == "bf16"
    ev = cfg["evaluate"]
    assert ev.compute.num_gpus == 0 and ev.metrics.render_size == 256 and ev.condition.image_size == 518
    assert [s.label for s in ev.samplers] == ["teacher 1-step", "student 1-step"]
    assert ev.sampling.reference == "teacher 1-step" and not ev.latency.enabled
    # half precision where the presets' fp16 is for GPUs: bf16, the CPU's fast half type
    assert pre.features.dtype == "bfloat16" and ev.compute.precision == "bf16"


def test_tiny_plan_only_adds_labelled_test_sizes(tmp_path):
    full = rehearse.plan(tmp_path, tmp_path / "a.glb", tiny=False)
    tiny = rehearse.plan(tmp_path, tmp_path / "a.glb", tiny=True)
    for f, t in zip(full, tiny):
        full_keys = {o.key for o in f.overrides}
        extra = [o for o in t.overrides if o.key not in full_keys or o not in f.overrides]
        # only test sizes and the tiny models' own locations differ
        assert all(o.why.startswith("tiny mode") or o.key.startswith("encode.") for o in extra), t.name
    cfg = _configs(tiny)
    assert cfg["preprocess"].render.num_views == 4


def test_bad_asset_exits_2_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rehearse.main(["--asset", str(tmp_path / "missing.glb"), "--output", str(tmp_path)])
    assert e.value.code == 2
    assert not (tmp_path / "report.json").exists()


def test_tree_rss_counts_children():
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "x = bytearray(200 * 2**20); import time; time.sleep(30)"])
    try:
        import time

        for _ in range(100):
            if rehearse.tree_rss_bytes(__import__("os").getpid()) - rehearse.tree_rss_bytes(child.pid) > 0 and \
                    rehearse.tree_rss_bytes(child.pid) > 150 * 2**20:
                break
            time.sleep(0.1)
        assert rehearse.tree_rss_bytes(child.pid) > 150 * 2**20
        assert rehearse.tree_rss_bytes(__import__("os").getpid()) >= rehearse.tree_rss_bytes(child.pid)
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.blender
def test_tiny_rehearsal_end_to_end(tmp_path):
    asset = shared_path("assets", "glb", "kenney_tree.glb")
    rc = rehearse.main(["--tiny", "--asset", str(asset), "--output", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert rc == 0 and report["ok"] and report["rss_unit"] == "GiB", report
    names = [s["name"] for s in report["stages"]]
    assert names == ["models", "preprocess", "distill-ss", "distill-slat", "export", "generate", "evaluate"]
    for s in report["stages"]:
        assert s["ok"] and s["wall_s"] > 0 and s["peak_rss_gb"] > 0.05, s
    assert report["stages"][1]["boundary"]["voxels"] > 0
    exported = json.loads((tmp_path / "distill" / "export_check.json").read_text())
    assert set(exported) == {"ss", "slat"}
    assert exported["ss"]["class"] == "SparseStructureFlowModel" and exported["slat"]["class"] == "SLatFlowModel"
    assert "student 1-step" in report["stages"][-1]["boundary"]["samplers"]
    assert (tmp_path / "report.md").read_text().count("| yes |") == 7


def _readme_commands() -> list[str]:
    from infra.doc_commands import commands

    text = (PROJECT_ROOT / "README.md").read_text()
    return [c.text.split(" #")[0].strip() for c in commands(text)
            if c.section == "Memory at full size, the rehearsal, the GPU check"]


def test_readme_commands_are_the_tested_entry_points():
    """The section's commands: `make rehearse` / `make gpu-check` run the modules the tests above and
    tests/test_gpu_check.py drive; estimate.py runs verbatim here, mdt.bench.activations in the slow test below."""
    cmds = _readme_commands()
    assert cmds == ["python -m mdt.bench.activations", "python infra/estimate.py", "make rehearse", "make gpu-check"]
    make = (PROJECT_ROOT / "Makefile").read_text()
    assert "rehearse: env\n\t$(BIN)/python -m pipelines.rehearse\n" in make
    assert "gpu-check: env\n\t$(BIN)/python -m mdt.bench.gpu_check\n" in make
    import subprocess

    out = subprocess.run([sys.executable, *cmds[1].split()[1:]], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| trellis-ss |" in out.stdout and "| trellis-slat |" in out.stdout


@pytest.mark.slow
def test_readme_activation_command_writes_its_fit(tmp_path):
    import subprocess

    cmd = _readme_commands()[0]
    out = subprocess.run([sys.executable, *cmd.split()[1:], "--quick", "--json", str(tmp_path / "a.json")],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr
    fit = json.loads((tmp_path / "a.json").read_text())
    for r in fit["fit"]["points"]:
        assert r["model_bytes"] == pytest.approx(r["bytes"], rel=0.1)
    assert fit["full_size"]["ss_flow"]["gib_checkpointed"] < fit["full_size"]["ss_flow"]["gib"]


@pytest.mark.ray
def test_trellis_aesthetic_filter_reads_its_column_beside_the_stage_columns(tmp_path, ray_connected):
    """The trellis presets set data.min_aesthetic; the training reader asks for the stage's columns only, so the
    filter must read aesthetic_score itself (found by the rehearsal: KeyError 'aesthetic_score')."""
    from _distill_helpers import write_tiny_shards

    from pipelines.preprocess import shards
    from pipelines.distill.training_data import STAGE_COLUMNS

    data = write_tiny_shards(tmp_path / "data", n=3)
    ds = shards.read_shards(str(data), max_voxels=10 ** 6, min_aesthetic=4.5, columns=STAGE_COLUMNS["ss"])
    rows = ds.take_all()
    assert len(rows) == 3 and set(rows[0]) == set(STAGE_COLUMNS["ss"])


def test_stage_selection_and_bad_names():
    assert rehearse.select_stages(None, None) == list(rehearse.STAGE_NAMES)
    assert rehearse.select_stages(None, "export") == ["export", "generate", "evaluate"]
    assert rehearse.select_stages("evaluate,preprocess", None) == ["preprocess", "evaluate"]   # pipeline order
    for only, start in (("distill", None), (None, "distil-ss"), ("", None), ("export", "export")):
        with pytest.raises(ValueError):
            rehearse.select_stages(only, start)
    # the plan knows exactly these stages
    assert tuple(s.name for s in rehearse.plan(__import__("pathlib").Path("o"), None, False)) == rehearse.STAGE_NAMES


def test_bad_stage_name_exits_2_before_anything_runs(tmp_path):
    asset = tmp_path / "a.glb"
    asset.write_bytes(b"glTF")
    with pytest.raises(SystemExit) as e:
        rehearse.main(["--asset", str(asset), "--output", str(tmp_path / "o"), "--from", "distil"])
    assert e.value.code == 2
    assert not (tmp_path / "o").exists()


def test_rerun_stages_replace_their_entries_and_keep_the_others(tmp_path, monkeypatch):
    """--from / --stages: the report has one entry per stage in pipeline order, earlier entries kept and marked,
    and it is ok only when every stage is present and ok."""
    earlier = [{"name": n, "ok": n != "distill-slat", "wall_s": 10.0, "peak_rss_gb": 1.0}
               for n in rehearse.STAGE_NAMES[:4]]
    (tmp_path / "report.json").write_text(json.dumps({"stages": earlier}))
    ran = []

    def fake_run(cmd, log_path, env):
        ran.append(cmd)
        log_path.write_text("done\n")
        return 0, 5.0, 2.5

    monkeypatch.setattr(rehearse, "run_measured", fake_run)
    monkeypatch.setattr(rehearse, "boundary", lambda stage, out, tiny: {"stage": stage})
    monkeypatch.setattr(rehearse, "gpu_plan", lambda report: {})
    asset = tmp_path / "a.glb"
    asset.write_bytes(b"glTF")
    report = rehearse.rehearse(tmp_path, asset, False, ["distill-slat", "export"])
    assert len(ran) == 2
    names = [s["name"] for s in report["stages"]]
    assert names == list(rehearse.STAGE_NAMES[:5])
    by = {s["name"]: s for s in report["stages"]}
    assert by["distill-slat"]["ok"] and by["distill-slat"]["wall_s"] == 5.0 and "from_previous_run" not in by["export"]
    assert by["preprocess"]["from_previous_run"] and by["preprocess"]["wall_s"] == 10.0
    assert report["wall_s"] == 4 * 10.0 - 10.0 + 2 * 5.0 and report["peak_rss_gb"] == 2.5
    assert not report["ok"] and report["not_run"] == ["generate", "evaluate"]
    report = rehearse.rehearse(tmp_path, asset, False, ["generate", "evaluate"])
    assert report["ok"] and [s["name"] for s in report["stages"]] == list(rehearse.STAGE_NAMES)
    assert "(earlier run)" in (tmp_path / "report.md").read_text()


def test_machine_state_reads_load_and_available_memory():
    m = rehearse.machine_state()
    with open("/proc/meminfo") as f:
        meminfo = dict(line.split(":", 1) for line in f)
    expected = int(meminfo["MemAvailable"].split()[0]) * 1024 / 1e9
    assert m["mem_available_gb"] == pytest.approx(expected, abs=1.0)
    assert m["load_average"] >= 0
