"""Data-free distillation of TRELLIS.2: `jobs/synthesize.py --preset trellis2-ci | trellis2` (TRELLIS.2's SS flow
-> TRELLIS's SS decoder -> the occupied 64³ voxels) and the TRELLIS.2 distillation presets on its shards."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_synthesize import DISTILL, SYNTH, env, readme_data_free_commands, rows_one_by_one, sha, write_images

RELEASED_SS = {"steps": 12, "guidance_strength": 7.5, "guidance_rescale": 0.7, "guidance_interval": [0.6, 1.0],
               "rescale_t": 5.0}   # /work/shared/docs/trellis2-reference.md, sampler table


def tiny_ss_teacher(path: Path, seed: int = 0) -> str:
    """A TRELLIS.2-architecture SS flow (the model zoo's tiny `t2_ss_flow`) at the tiny DINOv3's width 32."""
    from mdt.models.zoo import save_tiny_model

    save_tiny_model("t2_ss_flow", path, cond_channels=32, seed=seed)
    return str(path)


def run(script: Path, args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], env={**env(), "OMP_NUM_THREADS": "1"}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------- the CPU preset


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_trellis2_ci_images_to_shards_to_ss_and_shape_distillation(tmp_path):
    """`--preset trellis2-ci` on images -> shards whose rows hold the SS teacher's sample and exactly the SS
    decoder's occupied voxels of that sample (recomputed here), with provenance; `trellis2-ss-ci` distils the same
    SS flow from them and exports; `trellis2-shape-ci` trains on their coordinates; another SS teacher is refused."""
    from test_trellis2_distill import shape_teacher

    from mdt.models import from_pretrained
    from pipelines.preprocess.shards import load_table

    images = write_images(tmp_path / "imgs")
    teacher = tiny_ss_teacher(tmp_path / "teacher" / "ss_flow")
    teacher_sha = sha(Path(teacher + ".safetensors").read_bytes())
    out = tmp_path / "synth"
    r = run(SYNTH, ["--preset", "trellis2-ci", "--source", f"local:{tmp_path / 'imgs'}", "--teacher", teacher,
                    "--output", str(out)], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(r.stdout[r.stdout.index("## synthesis"):])  # the measured throughput, for the record
    assert "no SLat stage (voxel coordinates only)" in r.stdout

    rows = load_table(str(out)).to_pylist()
    k = 2  # samples_per_image of the preset
    assert sorted(x["file_identifier"] for x in rows) == [f"{n}#{i}" for n in ("object.png", "photo.jpg")
                                                         for i in range(k)]
    decoder = from_pretrained(str(tmp_path / "outputs" / "models" / "synthesize-trellis2-ci" / "ss_decoder_tiny"))
    decoder = decoder.float().eval()
    for row in rows:
        assert row["source_sha256"] == sha(images[row["file_identifier"].split("#")[0]])
        assert row["teacher_sha256"] == teacher_sha and row["seed"] is not None
        smp = json.loads(row["sampler"])
        assert smp["family"] == "trellis2" and "slat" not in smp
        assert smp["ss"]["teacher_sha256"] == teacher_sha
        assert {k: smp["ss"][k] for k in RELEASED_SS} == RELEASED_SS
        z = np.frombuffer(row["ss_latent"], "<f4").reshape(8, 16, 16, 16)
        with torch.no_grad():
            logits = decoder(torch.from_numpy(z.copy())[None]).float()[0, 0].numpy()
        coords = np.frombuffer(row["slat_coords"], np.uint8).reshape(-1, 3)
        assert 0 < len(coords) < 2000                                  # under the preset's max_structure_voxels
        got = np.zeros(logits.shape, bool)
        got[tuple(coords.astype(np.int64).T)] = True
        # the decoder's logits > 0 on its 64³ grid (a margin for batched vs single-sample float rounding)
        assert got[logits > 1e-4].all() and (logits[got] > -1e-4).all()
        assert len(np.unique(coords, axis=0)) == len(coords)
        assert row["num_voxels"] == len(coords)
        assert not np.frombuffer(row["slat_feats"], "<f4").any()       # no SLat stage: zero features
        assert len(row["cond_images"]) == 1
    assert len({x["seed"] for x in rows}) == len(rows)

    d = run(DISTILL, ["--preset", "trellis2-ss-ci", "--data", str(out), "--teacher", teacher], tmp_path)
    assert d.returncode == 0, d.stdout[-3000:] + d.stderr[-3000:]
    res = json.loads((tmp_path / "outputs" / "distill-trellis2-ci" / "ss-mdt" / "result.json").read_text())
    assert res["error"] is None and res["metrics"]["step"] == 2
    assert Path(res["export_dir"], "ema", "ss_flow_trellis2_student.safetensors").is_file()
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(res["tracking_uri"]).get_run(res["mlflow_run_id"]).data.tags
    assert tags["data_origin"] == "teacher-generated" and tags["data_ss_teacher_sha256"] == teacher_sha

    s = run(DISTILL, ["--preset", "trellis2-shape-ci", "--data", str(out), "--teacher", shape_teacher(tmp_path)],
            tmp_path)
    assert s.returncode == 0, s.stdout[-3000:] + s.stderr[-3000:]
    res = json.loads((tmp_path / "outputs" / "distill-trellis2-ci" / "slat-mdt" / "result.json").read_text())
    assert res["error"] is None and res["metrics"]["step"] == 2 and res["export_dir"]

    other = tiny_ss_teacher(tmp_path / "other" / "ss_flow", seed=5)
    m = run(DISTILL, ["--preset", "trellis2-ss-ci", "--data", str(out), "--teacher", other], tmp_path)
    err = m.stderr.strip().splitlines()
    assert m.returncode == 2 and len(err) == 1 and f"generated by the ss teacher(s) {teacher_sha[:12]}" in err[0], \
        m.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_trellis2_stage_rows_are_the_decoders_voxels_batched_or_not(tmp_path):
    """The trellis2 stage without Ray: a row's coordinates are exactly TRELLIS's SS decoder's logits > 0 on its 64³
    grid for the row's SS latent (recomputed here from the stored latent); one batch of every row gives the same
    rows as one row at a time; failed images fail alone."""
    from jobs import synthesize as job
    from pipelines.preprocess.rows import unpack_array
    from pipelines.synthesize import driver as S

    write_images(tmp_path / "imgs")
    teacher = tiny_ss_teacher(tmp_path / "teacher" / "ss_flow")
    cfg = S.prepare(job.build_config(job.parse_args(["--preset", "trellis2-ci", "--source",
                                                     f"local:{tmp_path / 'imgs'}", "--teacher", teacher,
                                                     "--output", str(tmp_path / "out")])))
    stage = S.Synthesize(cfg)
    rows, _ = S.list_image_rows(cfg)
    single = rows_one_by_one(stage, rows)
    batched = stage.call_batch([dict(r) for r in rows])
    decoder = stage.pipe.models["ss_decoder"]
    live = 0
    for r, a, b in zip(rows, single, batched):
        if isinstance(a, Exception):
            assert isinstance(b, Exception) and r["file_identifier"].split("#")[0] in ("corrupt.png", "transparent.png")
            continue
        live += 1
        assert not isinstance(b, Exception), (r["file_identifier"], b)
        z = unpack_array(a["ss_latent"])
        with torch.no_grad():
            logits = decoder(torch.from_numpy(np.ascontiguousarray(z, np.float32))[None]).float()[0, 0]
        np.testing.assert_array_equal(unpack_array(a["slat_coords"]), torch.nonzero(logits > 0).numpy())
        assert unpack_array(a["slat_feats"]).shape == (len(unpack_array(a["slat_coords"])), 8)
        for key in ("sha256", "seed", "source_sha256", "teacher_sha256", "sampler", "asset_checks", "cond_images"):
            assert a[key] == b[key], key
        np.testing.assert_allclose(unpack_array(a["ss_latent"]), unpack_array(b["ss_latent"]), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(unpack_array(a["slat_coords"]), unpack_array(b["slat_coords"]))
    assert live == 2 * cfg.synthesize.samples_per_image


# ------------------------------------------------------------------------------------------- the GPU preset


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_trellis2_preset_loads_the_released_teacher_by_hub_id(tmp_path):
    """The trellis2 preset as shipped: microsoft/TRELLIS.2-4B's SS flow, TRELLIS-image-large's SS decoder and
    DINOv3 by HF id (a local hub cache of tiny checkpoints in their formats, offline), the teacher hashed, one image
    through the stage at the released SS settings (no Ray: this preset's actors ask for GPUs; like `generate
    --preset trellis2`, it runs on the CPU when there is no GPU)."""
    from test_synthesize import run_stage_offline
    from test_trellis2_generate import write_fake_trellis2_hub

    res, cache = run_stage_offline(tmp_path, write_fake_trellis2_hub, "trellis2")
    s = res["s"]
    snap = next((cache / "models--microsoft--TRELLIS.2-4B" / "snapshots").iterdir())
    assert s["family"] == "trellis2" and s["slat_teacher"] is None and s["slat_teacher_sha256"] is None
    assert s["teacher"] == "microsoft/TRELLIS.2-4B/ckpts/ss_flow_img_dit_1_3B_64_bf16"
    assert s["teacher_sha256"] == hashlib.sha256(
        (snap / "ckpts" / "ss_flow_img_dit_1_3B_64_bf16.safetensors").read_bytes()).hexdigest()
    assert s["ss_decoder"] == "microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16"
    assert s["dinov3"] == "facebook/dinov3-vitl16-pretrain-lvd1689m"
    assert [x["file_identifier"] for x in res["rows"]] == ["object.png#0"]
    row = res["rows"][0]
    # the tiny random SS decoder may leave a sample without voxels: that is a failure with its reason, not a crash
    assert row["error"] is None or "empty occupancy" in row["error"], row["error"]
    if row["error"] is None:
        smp = json.loads(row["sampler"])
        assert {k: smp["ss"][k] for k in RELEASED_SS} == RELEASED_SS and smp["max_structure_voxels"] is None


# ------------------------------------------------------------------------------------------- arguments, docs


@pytest.mark.parametrize("extra, needle", [
    (["--slat-teacher", "x/slat_flow"], "the trellis2 family samples no SLat"),
    (["--set", "synthesize.family=trellis3"], "synthesize.family must be one of trellis, trellis2"),
    (["--set", "synthesize.ss_guidance.steps=0"], "synthesize.ss_guidance: ss.steps must be >= 1"),
])
def test_trellis2_argument_errors_exit_2_before_ray(tmp_path, extra, needle, capsys):
    import ray

    from jobs import synthesize as job

    (tmp_path / "imgs").mkdir()
    rc = job.main(["--preset", "trellis2-ci", "--source", f"local:{tmp_path / 'imgs'}",
                   "--output", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()


def test_slat_distillation_refuses_coordinate_only_shards():
    """A SLat-stage run without teacher_data on TRELLIS.2 shards (no SLat teacher made them): refused."""
    from pipelines.synthesize.driver import check_teacher

    why = check_teacher("slat", "any/slat_flow", {"origin": "teacher-generated", "ss": ["ab" * 32], "slat": []})
    assert why and "holds no slat teacher's samples" in why


def test_readme_data_free_trellis2_command_resolves():
    """The README's trellis2 synthesis line names the preset and flags the job has (its run needs GPUs and S3; the
    preset itself runs in test_trellis2_preset_loads_the_released_teacher_by_hub_id)."""
    from jobs import synthesize as job

    cmds = [c for c in readme_data_free_commands() if "--preset trellis2 " in c + " "]
    assert len(cmds) == 1
    argv = cmds[0].split()
    assert argv[:2] == ["python", "jobs/synthesize.py"]
    assert job.main(argv[2:] + ["--print-config"]) == 0
