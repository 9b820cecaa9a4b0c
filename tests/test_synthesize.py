"""Data-free distillation: `jobs/synthesize.py` (condition images -> teacher-generated shards) and how the
distillation job reads them (provenance in MLflow, the teacher-mismatch refusal)."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _distill_helpers import perturbed_teacher
from _pipeline_helpers import PROJECT_ROOT

SYNTH = PROJECT_ROOT / "jobs" / "synthesize.py"
DISTILL = PROJECT_ROOT / "jobs" / "distill.py"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_images(d: Path) -> dict[str, bytes]:
    """An object on transparent background, an RGB photo (no alpha), a fully transparent image, a corrupt file."""
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    a = np.zeros((64, 64, 4), np.uint8)
    a[16:48, 20:44] = (200, 60, 30, 255)
    Image.fromarray(a, "RGBA").save(d / "object.png")
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(d / "photo.jpg")
    Image.fromarray(np.zeros((32, 32, 4), np.uint8), "RGBA").save(d / "transparent.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 4)
    return {p.name: p.read_bytes() for p in d.iterdir()}


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            # a raylet on a busy shared 2-core machine can take longer than Ray's default wait to register
            "RAY_raylet_start_wait_time_s": os.environ.get("RAY_raylet_start_wait_time_s", "180")}


# ------------------------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("extra, needle", [
    (["--source", "synthetic:4"], "synthesize reads images"),
    (["--source", "local:/no/such/folder"], "no such folder"),
    (["--set", "synthesize.samples_per_image=0"], "samples_per_image"),
    (["--teacher", "/no/such/teacher"], "no /no/such/teacher.safetensors"),
    (["--set", "resources.synthesize.batch_size=0"], "batch_size=0"),
    (["--set", "synthesize.ss_decoder=/no/such/probe"], "/no/such/probe: no such checkpoint"),
])
def test_argument_errors_exit_2_before_ray(tmp_path, extra, needle, capsys):
    """Bad arguments: exit 2 with one line, before Ray starts or any model loads."""
    import ray

    from jobs import synthesize as job

    (tmp_path / "imgs").mkdir()
    teacher = perturbed_teacher(tmp_path / "t" / "ss_flow")
    args = ["--source", str(tmp_path / "imgs"), "--teacher", teacher, "--output", str(tmp_path / "out")]
    args = [f"local:{a}" if a == str(tmp_path / "imgs") else a for a in args]
    # later flags of the same name replace earlier ones (sources: extra sources are appended, so drop ours)
    if extra[0] == "--source":
        args = args[2:]
    if extra[0] == "--teacher":
        args = args[:2] + args[4:]
    rc = job.main(args + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not ray.is_initialized()


# ------------------------------------------------------------------------------------------- the whole path


def _wait_quiet(ledger_dir: Path, seconds: float = 4.0) -> None:
    last, quiet_since = None, time.time()
    while time.time() - quiet_since < seconds:
        now = sorted(x.name for x in ledger_dir.glob("*/*.parquet"))
        if now != last:
            last, quiet_since = now, time.time()
        time.sleep(0.3)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_images_to_shards_to_distillation(tmp_path):
    """The `ci` preset through the CLI on a folder with a corrupt file, an RGB image and a transparent image:
    killed mid-run and rerun (nothing lost, nothing duplicated), provenance columns, failures with reasons, and
    `jobs/distill.py --preset ci` trains on the result and records its origin in MLflow."""
    from pipelines.preprocess.ledger import Ledger
    from pipelines.preprocess.shards import load_table

    images = write_images(tmp_path / "imgs")
    teacher = perturbed_teacher(tmp_path / "teacher" / "ss_flow")
    teacher_sha = sha(Path(teacher + ".safetensors").read_bytes())
    out = tmp_path / "out"
    cmd = [sys.executable, str(SYNTH), "--preset", "ci", "--source", f"local:{tmp_path / 'imgs'}",
           "--teacher", teacher, "--output", str(out)]
    k = 2  # samples_per_image of the ci preset
    # run 1, killed (SIGKILL, whole process group) once the first batch is committed
    log1 = open(tmp_path / "run1.log", "w")
    p = subprocess.Popen(cmd, env=env(), cwd=tmp_path, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    try:
        while time.time() - t0 < 300 and not list((out / "ledger").glob("*/batch-*.parquet")):
            assert p.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        log1.close()
    _wait_quiet(out / "ledger")
    chash = next((out / "ledger").iterdir()).name
    first = Ledger(str(out), chash).state()
    assert len(first.done_ids | first.failed_ids) < 4 * k, "the job was not killed mid-run"

    # run 2: resumes
    r = subprocess.run(cmd, env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 image(s) without alpha" in r.stdout
    t = load_table(str(out)).to_pylist()
    done_ids = sorted(x["file_identifier"] for x in t)
    assert done_ids == [f"{n}#{i}" for n in ("object.png", "photo.jpg") for i in range(k)]  # no duplicate
    for row in t:
        name = row["file_identifier"].split("#")[0]
        assert row["source_sha256"] == sha(images[name])
        assert row["teacher_sha256"] == teacher_sha
        smp = json.loads(row["sampler"])
        assert smp["ss"]["teacher_sha256"] == teacher_sha and smp["ss"]["steps"] == 25
        assert smp["ss"]["cfg_strength"] == 5.0 and smp["slat"]["steps"] == 25
        assert row["num_voxels"] > 0 and len(row["cond_images"]) == 1
    assert len({row["seed"] for row in t}) == len(t) and len({row["sha256"] for row in t}) == len(t)
    st = Ledger(str(out), chash).state()
    reasons = {key.split("\x1f")[1].split("#")[0]: why for key, why in st.failed_reason.items()}
    assert set(reasons) == {"corrupt.png", "transparent.png"}
    assert "blank condition" in reasons["transparent.png"]
    assert "Error" in reasons["corrupt.png"]  # the decoder's own reason
    rep = [json.loads(x.read_text()) for x in sorted((out / "runs").glob("*/synthesize.json"))][-1]
    assert rep["images_without_alpha_used_whole"] == 1 and rep["teacher_sha256"] == teacher_sha

    # distillation trains on the shards as they are, and says where its data came from
    d = subprocess.run([sys.executable, str(DISTILL), "--preset", "ci", "--data", str(out), "--teacher", teacher,
                        "--output", str(tmp_path / "distill")],
                       env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert d.returncode == 0, d.stdout[-3000:] + d.stderr[-3000:]
    res = json.loads(d.stdout[d.stdout.index("{\n"):d.stdout.index("\n}") + 2])
    assert res["export_dir"] and res["error"] is None
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(res["tracking_uri"]).get_run(res["mlflow_run_id"]).data.tags
    assert tags["data_origin"] == "teacher-generated"
    assert tags["data_ss_teacher_sha256"] == teacher_sha


# ------------------------------------------------------------------------------------------- teacher mismatch


def write_generated_shards(out: Path, teacher_sha: str | None) -> None:
    """Two rows through the real shard writer and manifest, with (or without) the provenance columns."""
    import io

    from PIL import Image

    from mdt.config import load_config
    from pipelines.preprocess import shards
    from pipelines.preprocess.config import config_hash
    from pipelines.preprocess.rows import pack_array
    from pipelines.synthesize.driver import SynthesizeConfig

    cfg = load_config(SynthesizeConfig, "ci", [f"output={out}"], prefix="synthesize_")
    chash = config_hash(cfg)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
    rows = []
    for i in range(2):
        rows.append({"sha256": f"{i:064x}", "source": "local", "file_identifier": f"img{i}.png#0", "uri": f"u{i}",
                     "license": None, "aesthetic_score": None, "provenance": "{}", "error": None, "timings": "{}",
                     "ss_latent": pack_array(rng.standard_normal((8, 16, 16, 16)).astype(np.float32)),
                     "slat_coords": pack_array(np.array([[1, 2, 3], [4, 5, 6]])),
                     "slat_feats": pack_array(rng.standard_normal((2, 8)).astype(np.float32)),
                     "cond_images": [buf.getvalue()],
                     **({"teacher_sha256": teacher_sha, "seed": i, "source_sha256": f"{i:064x}",
                         "sampler": json.dumps({"slat": {"teacher_sha256": "f" * 64}})} if teacher_sha else {})})
    shards.ShardWriter(cfg, "test", chash).write_rows(rows)
    shards.write_manifest(cfg, chash, "test")


def test_teacher_mismatch_refused(tmp_path, capsys):
    """Shards generated by teacher A: distilling with A passes the check, with B exits 2 in one line (before
    Ray), with B and data.allow_teacher_mismatch passes; data-driven shards are never refused."""
    import ray

    from jobs import distill as job
    from pipelines.distill import driver as distill
    from pipelines.synthesize.driver import data_teachers

    a = perturbed_teacher(tmp_path / "a" / "ss_flow", seed=1)
    b = perturbed_teacher(tmp_path / "b" / "ss_flow", seed=2)
    a_sha = sha(Path(a + ".safetensors").read_bytes())
    gen, data = tmp_path / "gen", tmp_path / "data"
    write_generated_shards(gen, a_sha)
    write_generated_shards(data, None)
    assert data_teachers(str(gen)) == {"origin": "teacher-generated", "ss": [a_sha], "slat": ["f" * 64]}
    assert data_teachers(str(data))["origin"] == "data-driven"

    def cfg(data_dir, teacher, *extra):
        return job.build_config(job.parse_args(["--preset", "ci", "--data", str(data_dir), "--teacher", teacher,
                                                "--output", str(tmp_path / "o"), *extra]))

    distill.prepare(cfg(gen, a))
    distill.prepare(cfg(data, b))
    distill.prepare(cfg(gen, b, "--set", "data.allow_teacher_mismatch=true"))
    with pytest.raises(distill.ArgumentError, match="data.allow_teacher_mismatch"):
        distill.prepare(cfg(gen, b))
    capsys.readouterr()
    rc = job.main(["--preset", "ci", "--data", str(gen), "--teacher", b, "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "generated by the ss teacher" in err[0], err
    assert not ray.is_initialized()


# ------------------------------------------------------------------------------------------- the trellis preset


STAGE_SCRIPT = """
import json, sys
from jobs import synthesize as job
from pipelines.synthesize import driver as S
from pipelines.preprocess.stages import stage_keys
from pipelines.preprocess.driver import StageRunner
cfg = S.prepare(job.build_config(job.parse_args(["--preset", PRESET, "--source", "local:imgs", "--output", "out"])))
rows, _ = S.list_image_rows(cfg)
runner = StageRunner("synthesize", cfg, dict(stage_keys(cfg.stages))["synthesize"])
out = [runner(dict(r)) for r in rows]
print(json.dumps({"res": cfg.resources["synthesize"].num_gpus, "s": {k: v for k, v in vars(cfg.synthesize).items()
                  if k.endswith("sha256") or k in ("family", "teacher", "slat_teacher", "ss_decoder", "dinov2",
                                                   "dinov3")},
                  "rows": [{k: r[k] for k in ("file_identifier", "error", "sampler")} for r in out]}))
"""


def run_stage_offline(tmp_path, write_hub, preset: str) -> tuple[dict, Path]:
    """One image through a shipped preset's synthesis stage in a subprocess (STAGE_SCRIPT), offline, against a
    local hub cache that `write_hub(cache)` fills with tiny checkpoints in the released formats; returns (its
    JSON, the cache)."""
    cache = tmp_path / "hf"
    write_hub(cache)
    write_images(tmp_path / "imgs")
    for name in ("corrupt.png", "transparent.png", "photo.jpg"):  # one image: the stage, not the failures
        (tmp_path / "imgs" / name).unlink()
    e = {**env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
         "HF_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    script = STAGE_SCRIPT.replace("PRESET", json.dumps(preset))
    r = subprocess.run([sys.executable, "-c", script], env=e, cwd=tmp_path, capture_output=True, text=True,
                       timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["res"] == 1
    return res, cache


def rows_one_by_one(stage, rows: list[dict]) -> list:
    """The stage called on each row alone: its output row, or the exception it raised (compared with batching)."""
    out = []
    for r in rows:
        try:
            out.append(stage(dict(r)))
        except Exception as e:  # noqa: BLE001 - the row's failure, compared by the caller
            out.append(e)
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_trellis_preset_loads_teacher_by_hub_id(tmp_path):
    """The trellis preset as shipped: TRELLIS-image-large by HF id (a local hub cache of tiny TRELLIS-format
    checkpoints, offline), its pipeline.json teachers hashed, one image through the stage (no Ray: this preset's
    actors ask for GPUs)."""
    from test_generate import write_fake_hub

    res, cache = run_stage_offline(tmp_path, write_fake_hub, "trellis")
    s = res["s"]
    snap = next((cache / "models--microsoft--TRELLIS-image-large" / "snapshots").iterdir())
    assert s["teacher"].endswith("ckpts/ss_flow_img_dit_L_16l8_fp16")
    assert s["teacher_sha256"] == sha((snap / "ckpts" / "ss_flow_img_dit_L_16l8_fp16.safetensors").read_bytes())
    assert s["slat_teacher_sha256"] == sha((snap / "ckpts" / "slat_flow_img_dit_L_64l8p2_fp16.safetensors")
                                           .read_bytes())
    assert [x["file_identifier"] for x in res["rows"]] == ["object.png#0"]
    row = res["rows"][0]
    # the tiny random SS decoder may leave a sample without voxels: that is a failure with its reason, not a crash
    assert row["error"] is None or "empty occupancy" in row["error"], row["error"]


# ------------------------------------------------------------------------------------------- the demo preset


def write_demo_models(root: Path) -> str:
    """What `make demo` leaves under outputs/demo/models that the demo preset names (its tiny DINOv2, its occupancy
    probe), and a demo-width (64-channel condition) teacher; returns the teacher."""
    from _distill_helpers import TINY_SS_ARGS

    from mdt.models.zoo import save_tiny_dinov2
    from mdt.eval.snapshots import OccupancyProbe

    models = root / "outputs" / "demo" / "models"
    save_tiny_dinov2(models / "tiny-dinov2", hidden_size=64)
    probe = OccupancyProbe(8, hidden=8)
    torch = __import__("torch")
    with torch.no_grad():
        probe.net[-1].bias.fill_(1.0)                        # some occupied cells for every latent
    probe.save(models / "ss_occupancy_probe")
    return perturbed_teacher(root / "teacher" / "ss_flow_demo_teacher", {**TINY_SS_ARGS, "cond_channels": 64})


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_preset_runs_as_shipped(tmp_path):
    """`--preset demo` with only its inputs (images, teacher) in a directory where `make demo` left its models:
    the demo's probe is the SS decoder, the rows carry its sampler (25 steps, no CFG), K = 4 rows per image, the
    batched stage writes them, and the report gives images/s and samples/s. Without the probe: exit 2, one line."""
    from pipelines.preprocess.shards import load_table

    teacher = write_demo_models(tmp_path)
    write_images(tmp_path / "imgs")
    for name in ("corrupt.png", "transparent.png"):
        (tmp_path / "imgs" / name).unlink()
    cmd = [sys.executable, str(SYNTH), "--preset", "demo", "--source", "local:imgs", "--teacher", teacher]
    r = subprocess.run(cmd, env={**env(), "OMP_NUM_THREADS": "1"}, cwd=tmp_path, capture_output=True, text=True,
                       timeout=800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(r.stdout[r.stdout.index("## synthesis"):])              # the measured throughput, for the record
    t = load_table(str(tmp_path / "outputs" / "demo" / "synthesize")).to_pylist()
    assert sorted(x["file_identifier"] for x in t) == [f"{n}#{k}" for n in ("object.png", "photo.jpg")
                                                       for k in range(4)]
    smp = json.loads(t[0]["sampler"])
    assert smp["ss"]["steps"] == 25 and smp["ss"]["cfg_strength"] == 0.0 and smp["ss"]["rescale_t"] == 1.0
    rep = [json.loads(x.read_text()) for x in (tmp_path / "outputs" / "demo" / "synthesize" / "runs")
           .glob("*/synthesize.json")][0]
    assert rep["samples_done"] == 8 and rep["images_done"] == 2 and rep["samples_per_s"] > 0
    assert "batch_size: 8" in r.stdout and "ss_occupancy_probe" in r.stdout     # the resolved config
    import shutil

    shutil.rmtree(tmp_path / "outputs" / "demo" / "models" / "ss_occupancy_probe", ignore_errors=True)
    for f in (tmp_path / "outputs" / "demo" / "models").glob("ss_occupancy_probe*"):
        f.unlink()
    r = subprocess.run(cmd, env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "ss_occupancy_probe" in err[0], r.stderr[-2000:]


# ------------------------------------------------------------------------------------------- README


def readme_data_free_commands() -> list[str]:
    sys.path.insert(0, str(PROJECT_ROOT))
    from infra.doc_commands import commands

    return [c.text for c in commands((PROJECT_ROOT / "README.md").read_text()) if c.section == "Data-free distillation"]


def test_readme_data_free_trellis_command_resolves(tmp_path):
    """The section's trellis command names the preset and flags the job has (its run needs GPUs and S3; the preset
    itself runs in test_trellis_preset_loads_teacher_by_hub_id)."""
    from jobs import synthesize as job

    cmds = [c for c in readme_data_free_commands() if "--preset trellis " in c]
    assert len(cmds) == 1
    argv = cmds[0].split()
    assert argv[:2] == ["python", "jobs/synthesize.py"]
    assert job.main(argv[2:] + ["--print-config"]) == 0


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_readme_data_free_ci_commands_run_as_printed(tmp_path):
    """The section's CPU block, verbatim and in order, in a fresh working directory: a teacher, its samples on
    docs/examples as shards, a student distilled from them, that student evaluated on the preprocessed assets."""
    from test_generate import link_repo

    from pipelines.preprocess.shards import load_table

    cmds = [c for c in readme_data_free_commands() if c.startswith("python") and "--preset trellis" not in c]
    assert len(cmds) == 6 and cmds[-1].startswith("python jobs/evaluate.py")
    link_repo(tmp_path)
    e = {**env(), "OMP_NUM_THREADS": "1"}  # PYTHONPATH: Ray workers import this checkout's code
    for cmd in cmds:
        argv = shlex.split(cmd)
        assert argv[0] == "python"
        r = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=e, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, cmd + "\n" + r.stdout[-3000:] + r.stderr[-3000:]
        if "jobs/synthesize.py" in cmd:
            print(r.stdout[r.stdout.index("## synthesis"):])  # the measured throughput, for the record
    t = load_table(str(tmp_path / "outputs" / "synthesize-ci"))
    assert t.num_rows == 2 and set(t["file_identifier"].to_pylist()) == {"mug.png#0", "mug.png#1"}
    assert (tmp_path / "outputs" / "distill-ci" / "ss-mdt-data-free" / "export").is_dir()
    res = json.loads(next((tmp_path / "outputs" / "eval-data-free").glob("*/results.json")).read_text())
    assert "student 1-step" in {r["sampler"] for r in res["rows"]}
    assert res["models"]["student"].endswith("ss-mdt-data-free/export/ema/ss_flow_student")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_readme_data_free_ray_job_submit_commands_run_as_printed(tmp_path):
    """The section's `ray job submit` lines, verbatim, against a Ray head started here, with `$OUT` a temporary
    directory holding the cluster section's teacher: the synthesized shards and the data-free student appear."""
    from _distill_helpers import VENV_BIN
    from _pipeline_helpers import RayHead, ray_job_submit

    from pipelines.preprocess.shards import load_table

    cmds = [c for c in readme_data_free_commands() if c.startswith("ray job submit")]
    assert len(cmds) == 2 and all(" --working-dir . -- python jobs/" in c for c in cmds)
    out = tmp_path / "cluster"
    perturbed_teacher(out / "distill" / "ss-flow_matching" / "export" / "ema" / "ss_flow_teacher")
    head = RayHead(dashboard=True, num_cpus=4, own_address=True)  # the cluster section's head: --num-cpus=4 and
    # RAY_ADDRESS in its environment
    try:
        e = {**env(), "RAY_ADDRESS": head.dashboard_url, "OUT": str(out),
             "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        e.pop("PYTHONPATH")                     # the job imports the uploaded copy of the code
        for cmd in cmds:
            r = ray_job_submit(["bash", "-c", cmd], e, timeout=900)
            assert r.returncode == 0, cmd + "\n" + (r.stdout + r.stderr)[-4000:]
    finally:
        head.stop()
    assert load_table(str(out / "synthesize")).num_rows == 2
    assert (out / "distill" / "ss-mdt-data-free" / "export").is_dir()


def test_shards_source_lists_each_asset_and_reads_its_stored_condition_image(tmp_path):
    """`shards:<dir>`: one image per committed asset (K rows each), read back as the stored PNG bytes."""
    from types import SimpleNamespace

    from mdt.config import load_config
    from pipelines.synthesize import driver as S
    from pipelines.preprocess.shards import load_table

    write_generated_shards(tmp_path / "pre", None)
    cfg = load_config(S.SynthesizeConfig, "ci", [f"output={tmp_path / 'out'}",
                                                 f"sources.specs=[shards:{tmp_path / 'pre'}]"], prefix="synthesize_")
    rows, stats = S.list_image_rows(cfg)
    k = cfg.synthesize.samples_per_image
    assert stats["images"] == 2 and len(rows) == 2 * k
    stored = {r["sha256"]: r["cond_images"][0] for r in load_table(str(tmp_path / "pre")).to_pylist()}
    fake = SimpleNamespace(s=cfg.synthesize, cfg=cfg)
    for r in rows:
        sha256 = r["file_identifier"].split("#")[0]
        assert S.Synthesize.read_image_bytes(fake, r["uri"]) == stored[sha256]


# ------------------------------------------------------------------------------------------- batching


def synth_stage(tmp_path, preset="ci", *overrides):
    """The prepared config and the stage (no Ray) of `preset` on write_images' folder with a perturbed teacher."""
    from jobs import synthesize as job
    from pipelines.synthesize import driver as S

    write_images(tmp_path / "imgs")
    Image = __import__("PIL.Image", fromlist=["Image"])
    a = np.zeros((48, 48, 4), np.uint8)
    a[8:40, 12:30] = (30, 200, 90, 255)
    Image.fromarray(a, "RGBA").save(tmp_path / "imgs" / "second.png")
    teacher = perturbed_teacher(tmp_path / "teacher" / "ss_flow")
    args = ["--preset", preset, "--source", f"local:{tmp_path / 'imgs'}", "--teacher", teacher,
            "--output", str(tmp_path / "out"), *overrides]
    cfg = S.prepare(job.build_config(job.parse_args(args)))
    return cfg, S.Synthesize(cfg)


def test_batched_rows_equal_unbatched_rows_with_one_forward_per_step(tmp_path):
    """Same rows (seeds, provenance, latents within float tolerance) from one batch of every (image, sample) row as
    from one row at a time; failed images fail alone inside a batch; the SS teacher runs one forward per sampler
    call for the whole batch (not one per image)."""
    from pipelines.synthesize import driver as S
    from pipelines.preprocess.rows import unpack_array

    cfg, stage = synth_stage(tmp_path)
    rows, _ = S.list_image_rows(cfg)
    assert len(rows) == 5 * cfg.synthesize.samples_per_image
    calls = []
    flow = stage.pipe.models["ss_flow"]
    hook = flow.register_forward_hook(lambda m, i, o: calls.append(int(i[0].shape[0])))
    single = rows_one_by_one(stage, rows)
    n_single = len(calls)
    calls.clear()
    batched = stage.call_batch([dict(r) for r in rows])
    hook.remove()
    live = [x for x in single if not isinstance(x, Exception)]
    assert len(live) == 3 * cfg.synthesize.samples_per_image          # object, photo, second (each K samples)
    assert n_single == len(live) * len(calls)                          # per row: as many forwards as the batch
    assert max(calls) == 2 * len(live)                                 # CFG: conditional + unconditional, batched
    for r, a, b in zip(rows, single, batched):
        if isinstance(a, Exception):
            assert type(b) is type(a) and str(b).split(" <")[0] == str(a).split(" <")[0], (r["file_identifier"], a, b)
            continue
        assert not isinstance(b, Exception), (r["file_identifier"], b)
        for key in ("sha256", "seed", "source_sha256", "teacher_sha256", "sampler", "asset_checks", "cond_images"):
            assert a[key] == b[key], key
        for key in ("ss_latent", "slat_feats"):
            np.testing.assert_allclose(unpack_array(a[key]), unpack_array(b[key]), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(unpack_array(a["slat_coords"]), unpack_array(b["slat_coords"]))
    # different images in the batch: different samples (the batch does not share one condition)
    lat = {b["source_sha256"]: unpack_array(b["ss_latent"]) for b in batched if not isinstance(b, Exception)}
    assert len(lat) == 3 and not np.allclose(*list(lat.values())[:2])


def test_batch_size_only_for_stages_that_take_batches():
    from mdt.config import load_config
    from pipelines.preprocess import driver as graph
    from pipelines.preprocess.config import PreprocessConfig
    from pipelines.synthesize.driver import SynthesizeConfig

    graph.check_batching(load_config(SynthesizeConfig, "ci", prefix="synthesize_"))
    cfg = load_config(PreprocessConfig, "demo", [("resources.render.batch_size", 4)], prefix="preprocess_")
    assert "render" in cfg.stages
    with pytest.raises(ValueError, match="resources.render.batch_size=4"):
        graph.check_batching(cfg)
