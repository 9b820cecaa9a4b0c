"""The distillation job's arguments: every error exits 2 with one line before Ray starts or a network is built;
a re-run under an existing name must be the same run; the cluster check names the shortfall."""
from __future__ import annotations

import json
import re

import pytest

from _distill_helpers import perturbed_teacher, run_cli_without_ray, write_tiny_shards


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("args")
    return tmp, write_tiny_shards(tmp / "data", n=2), perturbed_teacher(tmp / "teacher" / "ss_flow_tiny")


def test_argument_errors_exit_2_with_one_line_before_anything_starts(inputs, capsys, tmp_path, monkeypatch):
    tmp, data, teacher = inputs
    out = ["--output", str(tmp_path / "runs")]
    cases = [
        (["--preset", "nope", "--data", str(data)], "nope"),
        (["--preset", "ci", "--data", str(tmp_path / "missing"), "--objective", "flow_matching", *out], "no committed"),
        (["--preset", "ci", "--data", str(data), "--teacher", str(tmp_path / "no" / "teacher"), *out], "--teacher"),
        (["--preset", "ci", "--data", str(data), *out], "needs a teacher"),
        (["--preset", "ci", "--data", str(data), "--objective", "nope", *out], "objective"),
        (["--preset", "ci", "--data", str(data), "--teacher", teacher, "--objective", "scm",
          "--set", "objective.scm.adaptive_weighting=true", *out], "adaptive_weighting"),
        # checks across the job's sections (pipelines.distill.config) and the trainer's
        (["--preset", "ci", "--data", str(data), "--teacher", teacher, "--set", "train.fsdp=true",
          "--set", "scaling.num_workers=1", *out], "train.fsdp needs scaling.num_workers >= 2"),
        (["--preset", "ci", "--data", str(data), "--teacher", teacher, "--set", "mlflow.register_weights=both",
          *out], "mlflow.register_weights"),
        (["--preset", "ci", "--data", str(data), "--teacher", teacher, "--set", "eval.enabled=true", *out],
         "needs eval.decoder"),
        (["--preset", "ci", "--data", str(data), "--teacher", teacher, "--stage", "slat", "--set", "eval.enabled=true",
          "--set", "eval.decoder=/x", *out], "SS stage only"),
        (["--preset", "ci", "--data", str(data), "--teacher", teacher, "--set", "scalng.num_workers=2", *out],
         "unknown config key 'scalng'"),
    ]
    for argv, needle in cases:
        rc, err = run_cli_without_ray(argv, capsys, monkeypatch)
        assert rc == 2 and len(err) == 1 and needle in err[0], (argv, err)


def test_one_preset_holds_the_trainer_config_and_the_job_around_it():
    """The job's config is the trainer's tree plus the sections `JOB_SECTIONS` names; the library reads a shipped
    preset's trainer settings alone (the same values as the job's), and a key that neither layer has is an error."""
    from dataclasses import fields

    from mdt.config import CONFIGS_DIR, ConfigError, load_config, to_dict
    from mdt.training.config import JOB_SECTIONS, DistillConfig, load_trainer_config
    from pipelines.distill.config import DistillJobConfig

    trainer_fields = [f.name for f in fields(DistillConfig)]
    assert [f.name for f in fields(DistillJobConfig)] == trainer_fields + list(JOB_SECTIONS)
    presets = sorted(p.stem.removeprefix("distill_") for p in CONFIGS_DIR.glob("distill_*.yaml"))
    assert len(presets) >= 5, presets
    ov = [("data.uri", "/d"), ("model.teacher", "/t")]
    for preset in presets:
        job = to_dict(load_config(DistillJobConfig, preset, ov, prefix="distill_"))
        trainer = load_trainer_config(preset, ov)
        assert type(trainer) is DistillConfig
        assert to_dict(trainer) == {k: job[k] for k in trainer_fields}, preset
    assert load_trainer_config("ci", ["scaling.num_workers=8"]) == load_trainer_config("ci")  # the job's section
    for bad, key in (("scalng.num_workers=8", "scalng"), ("train.fsdpp=true", "train.fsdpp"), ("rayy={}", "rayy")):
        with pytest.raises(ConfigError, match=f"unknown config key '{re.escape(key)}'"):
            load_trainer_config("ci", [bad])
        with pytest.raises(ConfigError, match=f"unknown config key '{re.escape(key)}'"):
            load_config(DistillJobConfig, "ci", [bad], prefix="distill_")
    with pytest.raises(ValueError, match="fields of DistillConfig"):   # a section the class has is not another's
        load_config(DistillConfig, "ci", prefix="distill_", other_layers=("train",))


def test_default_run_name_says_stage_and_objective():
    from mdt.config import load_config
    from pipelines.distill.config import DistillJobConfig

    for objective in ("flow_matching", "mdt"):
        cfg = load_config(DistillJobConfig, "ci", [("data.uri", "/d"), ("model.teacher", "/t"),
                                                   ("objective.name", objective)], prefix="distill_").validate()
        assert cfg.name == f"ss-{objective}"


def test_export_names_say_teacher_or_student_and_stage(capsys, monkeypatch, inputs, tmp_path):
    """A flow-matching run exports a teacher and every distillation objective a student, named so per stage; a
    preset's `{role}` is filled in the same way; a literal name that says the other role is refused (exit 2)."""
    from mdt.config import load_config
    from mdt.training.config import OBJECTIVES
    from pipelines.distill.config import DistillJobConfig

    def stem(preset, *ov):
        return load_config(DistillJobConfig, preset, [("data.uri", "/d"), ("model.teacher", "/t"), *ov],
                           prefix="distill_").validate().model.export_stem

    for objective in OBJECTIVES:
        role = "teacher" if objective == "flow_matching" else "student"
        for stage in ("ss", "slat"):
            assert stem("ci", ("objective.name", objective), ("stage", stage)) == f"{stage}_flow_{role}"
        assert stem("demo", ("objective.name", objective)) == f"ss_flow_demo_{role}"
        assert stem("trellis2-shape-ci", ("objective.name", objective)) == f"slat_flow_trellis2_shape_{role}"
    assert stem("ci", ("model.export_stem", "my_ss_model")) == "my_ss_model"            # a literal name is kept
    assert stem("trellis-ss") == "ss_flow_img_dit_L_16l8_fp16_mdt"
    tmp, data, teacher = inputs
    out = ["--output", str(tmp_path / "runs")]
    for argv, needle in (
            (["--preset", "ci", "--data", str(data), "--objective", "flow_matching", "--set",
              "model.export_stem=ss_flow_student", *out], "names a student, but objective 'flow_matching'"),
            (["--preset", "trellis-ss", "--data", str(data), "--objective", "flow_matching", *out],
             "names a student"),
            (["--preset", "ci", "--data", str(data), "--teacher", teacher, "--set",
              "model.export_stem=ss_flow_teacher", *out], "names a teacher, but objective 'mdt'"),
            (["--preset", "ci", "--data", str(data), "--teacher", teacher, "--set",
              "model.export_stem=ss_{kind}", *out], "the only fields are {stage} and {role}")):
        rc, err = run_cli_without_ray(argv, capsys, monkeypatch)
        assert rc == 2 and len(err) == 1 and needle in err[0], (argv, err)


def test_rerun_under_a_name_must_match_the_stored_run(inputs, capsys, tmp_path, monkeypatch):
    """The README's teacher line, then the MDT line under the teacher run's name: refused, not 'resumed'."""
    from mdt.config import load_config
    from pipelines.distill.config import DistillJobConfig
    from pipelines.distill import driver as distill

    tmp, data, teacher = inputs
    base = [("data.uri", str(data)), ("output", str(tmp_path / "runs")), ("name", "shared")]
    fm = load_config(DistillJobConfig, "ci", base + [("objective.name", "flow_matching")], prefix="distill_").validate()
    distill.prepare(fm)
    rdir = tmp_path / "runs" / "shared"
    rdir.mkdir(parents=True)
    (rdir / distill.RUN_IDENTITY_FILE).write_text(json.dumps(distill.run_identity(fm)))
    distill.prepare(fm)                                    # the same run: resumes
    more = load_config(DistillJobConfig, "ci", base + [("objective.name", "flow_matching"), ("train.max_steps", 60)],
                       prefix="distill_").validate()
    distill.prepare(more)                                  # more steps of the same run: fine
    rc, err = run_cli_without_ray(["--preset", "ci", "--data", str(data), "--teacher", teacher, "--output", str(tmp_path / "runs"),
                     "--name", "shared"], capsys, monkeypatch)
    assert rc == 2 and len(err) == 1 and "objective 'flow_matching' -> 'mdt'" in err[0] and "--name" in err[0], err
    assert f"teacher None -> '{teacher}'" in err[0] and not re.search(r"[(;] ?(args|name) ", err[0]), err


def test_relative_output_refused_under_job_submit(inputs, monkeypatch):
    from mdt.config import load_config
    from pipelines.distill.config import DistillJobConfig
    from pipelines.distill import driver as distill

    tmp, data, teacher = inputs
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    cfg = load_config(DistillJobConfig, "ci", [("data.uri", str(data)), ("objective.name", "flow_matching")],
                      prefix="distill_").validate()
    with pytest.raises(distill.ArgumentError, match="relative"):
        distill.prepare(cfg)


def test_cluster_check_names_the_shortfall(monkeypatch):
    """The ci preset as shipped needs 3 logical CPUs (2 workers x 1 + 1 for data reads); a 2-CPU cluster is
    refused up front with the figures, a 3-CPU one accepted; a private instance is sized to fit."""
    import ray

    from mdt.config import load_config
    from pipelines.distill.config import DistillJobConfig
    from pipelines.distill import driver as distill

    cfg = load_config(DistillJobConfig, "ci", [("data.uri", "/d"), ("model.teacher", "/t")],
                      prefix="distill_").validate()
    assert distill.required_resources(cfg) == {"CPU": 3.0}
    for cpus, ok in ((2, False), (3, True)):
        monkeypatch.setattr(ray, "cluster_resources", lambda c=cpus: {"CPU": float(c)})
        monkeypatch.setattr(ray, "nodes", lambda c=cpus: [{"Alive": True, "Resources": {"CPU": float(c)}}])
        if ok:
            distill.check_cluster(cfg)
        else:
            with pytest.raises(distill.ArgumentError, match=r"needs 3 CPU \(cluster has 2\)"):
                distill.check_cluster(cfg)
    # the GPU presets ask for one GPU per worker; an autoscaling cluster is not checked
    big = load_config(DistillJobConfig, "trellis-image-large", [("data.uri", "/d")], prefix="distill_").validate()
    assert distill.required_resources(big) == {"CPU": 8 * 8 + 1.0, "GPU": 8.0}
    with pytest.raises(distill.ArgumentError, match=r"65 CPU \(cluster has 3\) and 8 GPU \(cluster has 0\)"):
        distill.check_cluster(big)
    big.ray.autoscaling = True
    distill.check_cluster(big)
    started = {}
    monkeypatch.setattr(distill, "init_ray", lambda address, **kw: started.update(kw))
    distill.start_ray(cfg)
    assert started["num_cpus"] >= 3
