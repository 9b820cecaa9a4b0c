"""Argument and input errors of the preprocessing, evaluation and generation jobs: exit 2 with one line before
Ray starts or a model loads (the distillation job's own cases: tests/test_distill_job_args.py, the synthesis
job's: tests/test_synthesize.py); under
`ray job submit --working-dir` a relative output is refused the same way, and a model that a job creates
itself goes under the output instead of the job's temporary copy of the code."""
from __future__ import annotations

import json
import os

import pytest

from _distill_helpers import perturbed_teacher, run_cli_without_ray, write_tiny_shards

SUBMITTED = json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}})  # what the job server sets


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job-args")
    return tmp, write_tiny_shards(tmp / "data", n=2), perturbed_teacher(tmp / "teacher" / "ss_flow_tiny")


def _assert_one_line(job, argv, needle, capsys, monkeypatch):
    rc, err = run_cli_without_ray(argv, capsys, monkeypatch, job=job)
    assert rc == 2 and len(err) == 1 and needle in err[0], (job, argv, rc, err)
    return err[0]


def test_preprocess_source_errors_exit_2_before_ray(tmp_path, capsys, monkeypatch):
    out = ["--output", str(tmp_path / "pre")]
    for argv, needle in [
        (["--preset", "ci", "--source", "bogus:3", *out], "unknown source kind 'bogus'"),
        (["--preset", "ci", "--source", "local:/nonexistent/meshes", *out], "/nonexistent/meshes does not exist"),
        (["--preset", "ci", "--source", "manifest:" + str(tmp_path / "no.csv"), *out], "no.csv does not exist"),
        (["--preset", "ci", "--source", "synthetic:many", *out], "needs a count"),
        (["--preset", "ci", "--source", "nonsense", *out], "kind:argument"),
    ]:
        _assert_one_line("preprocess", argv, needle, capsys, monkeypatch)
    assert not (tmp_path / "pre").exists()


def test_evaluate_missing_inputs_exit_2_before_ray(inputs, tmp_path, capsys, monkeypatch):
    tmp, data, ckpt = inputs
    base = {"--data": str(data), "--teacher": ckpt, "--student": ckpt, "--decoder": ckpt,
            "--output": str(tmp_path / "eval")}
    for flag, value, needle in [
        ("--teacher", str(tmp_path / "no" / "teacher"), "--teacher"),
        ("--student", str(tmp_path / "no" / "student"), "--student"),
        ("--decoder", str(tmp_path / "no" / "probe"), "--decoder"),
        ("--data", str(tmp_path / "no-shards"), "no committed shards"),
    ]:
        argv = ["--preset", "ci"] + [x for k, v in {**base, flag: value}.items() for x in (k, v)]
        line = _assert_one_line("evaluate", argv, needle, capsys, monkeypatch)
        assert value in line
    # the same inputs all present: the job gets past its checks (to the recorded Ray start)
    argv = ["--preset", "ci"] + [x for k, v in base.items() for x in (k, v)]
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("ray.init reached")))
    from jobs.evaluate import main

    assert main(argv) == 1 and "ray.init reached" in capsys.readouterr().err


def test_generate_non_image_exits_2_before_models_load(tmp_path, capsys, monkeypatch):
    text = tmp_path / "notes.png"
    text.write_text("not an image at all\n")
    _assert_one_line("generate", ["--preset", "demo", "--image", str(text), "--output", str(tmp_path / "g")],
                     f"--image {text}: not an image", capsys, monkeypatch)
    assert not (tmp_path / "g").exists()


def test_generate_rgb_input_gets_a_note_rgba_none(tmp_path):
    from PIL import Image

    from mdt.generate import check_image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "rgb.png")
    Image.new("RGBA", (8, 8), (200, 10, 10, 255)).save(tmp_path / "rgba.png")
    note = check_image(tmp_path / "rgb.png")
    assert note and "no alpha channel" in note and "no background removal" in note
    assert check_image(tmp_path / "rgba.png") is None


@pytest.mark.parametrize("job", ["preprocess", "evaluate", "generate", "synthesize"])
def test_relative_output_refused_under_job_submit(job, inputs, tmp_path, capsys, monkeypatch):
    from PIL import Image

    tmp, data, ckpt = inputs
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", SUBMITTED)
    monkeypatch.chdir(tmp_path)
    Image.new("RGBA", (8, 8)).save(tmp_path / "in.png")
    argv = {"preprocess": ["--preset", "ci", "--source", "synthetic:2", "--output", "outputs/pre"],
            "evaluate": ["--preset", "ci", "--data", str(data), "--teacher", ckpt, "--student", ckpt,
                         "--decoder", ckpt, "--output", "outputs/eval"],
            "generate": ["--preset", "demo", "--image", "in.png", "--output", "outputs/gen"],
            "synthesize": ["--preset", "ci", "--source", f"local:{tmp_path}", "--teacher", ckpt,
                           "--output", "outputs/synth"]}[job]
    _assert_one_line(job, argv, "is relative: under `ray job submit --working-dir`", capsys, monkeypatch)
    # the preset's default output is relative too: also refused
    no_output = argv[:argv.index("--output")] if job != "generate" else None
    if no_output:
        _assert_one_line(job, no_output, "is relative", capsys, monkeypatch)


def test_created_models_go_under_the_output_under_job_submit(tmp_path, monkeypatch):
    """A tiny conditioner / tiny-model folder that a job creates: under the cwd normally, under `<output>/models`
    when the cwd is the job's temporary copy; models that must exist are never moved."""
    from mdt.config import load_config
    from pipelines.evaluate import driver as evaluate
    from pipelines.preprocess import driver as graph
    from pipelines.common.cluster import created_model_path
    from pipelines.preprocess.config import PreprocessConfig

    monkeypatch.chdir(tmp_path)
    assert created_model_path("outputs/models/tiny", "/abs/out") == str(tmp_path / "outputs/models/tiny")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", SUBMITTED)
    assert created_model_path("outputs/models/tiny", "/abs/out") == "/abs/out/models/tiny"
    assert created_model_path("/fixed/tiny", "/abs/out") == "/fixed/tiny"
    cfg = load_config(PreprocessConfig, "demo", [("output", "/abs/pre"), ("sources.specs", ["synthetic:1"])],
                      prefix="preprocess_")
    graph.prepare(cfg)
    assert cfg.tiny_models == "/abs/pre/models/tiny-models"
    ecfg = evaluate.make_config("ci", output="/abs/eval")
    evaluate.absolutize_paths(ecfg)
    assert ecfg.condition.model == "/abs/eval/models/tiny-dinov2" and not ecfg.condition.model.startswith(
        str(tmp_path))
    from pipelines.synthesize import driver as synthesize

    scfg = load_config(synthesize.SynthesizeConfig, "ci", [("output", str(tmp_path / "abs-synth"))],
                       prefix="synthesize_")
    scfg.sources.specs = [f"local:{tmp_path}"]
    scfg.synthesize.teacher = perturbed_teacher(tmp_path / "teacher" / "ss_flow_tiny")
    synthesize.prepare(scfg)
    for created in (scfg.synthesize.tiny_models, scfg.synthesize.dinov2):
        assert created.startswith(str(tmp_path / "abs-synth" / "models")), created
    t2 = load_config(synthesize.SynthesizeConfig, "trellis2-ci", [("output", str(tmp_path / "abs-synth2"))],
                     prefix="synthesize_")
    t2.sources.specs = [f"local:{tmp_path}"]
    synthesize.prepare(t2)
    for created in (t2.synthesize.tiny_models, t2.synthesize.dinov3, t2.synthesize.teacher, t2.synthesize.ss_decoder):
        assert created.startswith(str(tmp_path / "abs-synth2" / "models")), created
    assert not (tmp_path / "outputs").exists()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_relative_outputs_refused_under_a_real_ray_job_submit(inputs, tmp_path):
    """Each job submitted with `ray job submit --working-dir .` and a relative output: the job fails with the
    one line, and nothing is written into the job's temporary copy of the code."""
    from _distill_helpers import PROJECT_ROOT, VENV_BIN
    from _pipeline_helpers import RayHead, ray_job_submit

    tmp, data, ckpt = inputs
    jobs = {"preprocess": ["--preset", "ci", "--source", "synthetic:2", "--output", "outputs/relative-test"],
            "distill": ["--preset", "ci", "--data", str(data), "--objective", "flow_matching",
                        "--output", "outputs/relative-test"],
            "evaluate": ["--preset", "ci", "--data", str(data), "--teacher", ckpt, "--student", ckpt,
                         "--decoder", ckpt, "--output", "outputs/relative-test"],
            "generate": ["--preset", "demo", "--image", "docs/examples/mug.png", "--output", "outputs/relative-test"],
            "synthesize": ["--preset", "ci", "--source", "local:docs/examples", "--teacher", ckpt,
                           "--output", "outputs/relative-test"]}
    head = RayHead(dashboard=True, num_cpus=2)
    try:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_ADDRESS": head.dashboard_url}
        for job, argv in jobs.items():
            cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir", ".",
                   "--", "python", f"jobs/{job}.py", *argv]
            r = ray_job_submit(cmd, env, timeout=240)
            out = r.stdout + r.stderr
            assert r.returncode != 0 and "failed" in out.lower(), (job, out[-3000:])
            lines = [ln for ln in out.splitlines() if "is relative: under `ray job submit --working-dir`" in ln]
            assert lines and "--output outputs/relative-test" in lines[0], (job, out[-3000:])
            assert "Traceback" not in out, (job, out[-3000:])
        assert not (PROJECT_ROOT / "outputs" / "relative-test").exists()
    finally:
        head.stop()
