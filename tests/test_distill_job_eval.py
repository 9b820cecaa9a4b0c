"""Evaluation at the end of training (`eval.*`): the distillation job evaluates its exported EMA student against
its teacher on the same Ray instance and logs the table onto the distillation's MLflow run as one artifact
folder with a few headline metrics; a bad `eval.*` setting exits 2 with one line before Ray starts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _distill_helpers import perturbed_teacher, run_cli_without_ray, write_tiny_shards


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from mdt.eval.snapshots import OccupancyProbe

    tmp = tmp_path_factory.mktemp("distill-eval")
    probe = OccupancyProbe(8, hidden=8)
    probe.save(tmp / "models" / "probe")
    return {"tmp": tmp, "data": str(write_tiny_shards(tmp / "data", n=4)),
            "teacher": perturbed_teacher(tmp / "models" / "ss_flow_tiny"), "decoder": str(tmp / "models" / "probe")}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eval_after_training_logs_one_table_and_headline_metrics(inputs, ray_connected, tmp_path):
    """MDT-dist for 2 steps, then the `ci` evaluation preset (cut to 2 assets, 1 view) on the export."""
    from mlflow import MlflowClient

    from _distill_helpers import ci_config
    from pipelines.distill.driver import run

    cfg = ci_config(tmp_path, Path(inputs["data"]), inputs["teacher"], f"sqlite:///{tmp_path / 'mlflow.db'}", [
        "train.max_steps=2", "scaling.num_workers=1", "snapshot.num_conditions=0", "eval.enabled=true",
        "eval.preset=ci",
        f"eval.decoder={inputs['decoder']}",
        "eval.overrides=[data.max_assets=2, metrics.views=1, latency.repeats=1, latency.warmup=0, previews=1]"])
    res = run(cfg)
    out = tmp_path / "runs" / "ss-mdt"
    assert res.error is None and res.eval_dir == str(out / "eval")
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["assets"] == 2
    assert results["models"]["student"] == str(out / "export" / "ema" / "ss_flow_student")
    assert results["models"]["teacher"] == inputs["teacher"]
    assert results["distill_run_id"] == res.mlflow_run_id
    assert [row["sampler"] for row in results["rows"]] == ["teacher 4-step", "teacher 1-step", "student 1-step",
                                                           "student 2-step"]

    c = MlflowClient(tracking_uri=res.tracking_uri)
    run_ = c.get_run(res.mlflow_run_id)
    assert run_.info.status == "FINISHED"
    assert sorted(a.path for a in c.list_artifacts(run_.info.run_id, "eval")) == ["eval/results.json",
                                                                                  "eval/table.md"]
    logged = {k: v for k, v in run_.data.metrics.items() if k.startswith("eval/")}
    student_1 = next(row for row in results["rows"] if row["sampler"] == "student 1-step")
    assert logged["eval/FD_dinov2_student_1step"] == pytest.approx(student_1["fd_dinov2"])
    assert logged["eval/IoU_student_1step"] == pytest.approx(student_1["iou"])
    assert {"eval/FD_dinov2_teacher_4step", "eval/IoU_teacher_4step", "eval/speedup_student_1step"} <= set(logged)
    assert len(logged) <= 8                                   # headline figures, not one chart per cell
    eval_run = c.get_run(run_.data.tags["mdt.eval_run_id"])   # the evaluation's own run, linked both ways
    assert eval_run.data.tags["mdt.distill_run_id"] == run_.info.run_id


def test_bad_eval_settings_exit_2_with_one_line_before_ray(inputs, capsys, tmp_path, monkeypatch):
    base = ["--preset", "ci", "--data", inputs["data"], "--teacher", inputs["teacher"],
            "--output", str(tmp_path / "runs"), "--set", "eval.enabled=true"]
    dec = ["--set", f"eval.decoder={inputs['decoder']}"]
    cases = [
        (base, "eval.decoder"),
        (base + ["--set", f"eval.decoder={tmp_path / 'no-probe'}"], "eval.decoder"),
        (base + dec + ["--set", "eval.preset=nope"], "eval: "),
        (base + dec + ["--set", "eval.preset=ci", "--set", "eval.split=nope"], "data.split"),
        (base + dec + ["--stage", "slat"], "SS stage"),
    ]
    for argv, needle in cases:
        rc, err = run_cli_without_ray(argv, capsys, monkeypatch)
        assert rc == 2 and len(err) == 1 and needle in err[0], (argv, err)


def test_eval_config_evaluates_what_the_run_exports(inputs, tmp_path):
    """A distillation run: its registered export (EMA, or the raw student when asked) as the student against its
    teacher; a flow-matching run: its export as the teacher, teacher samplers only; the run's conditioner."""
    from _distill_helpers import ci_config
    from pipelines.distill.driver import eval_config, run_dir

    common = ["eval.enabled=true", "eval.preset=ci", f"eval.decoder={inputs['decoder']}", "eval.split=train"]
    mdt = ci_config(tmp_path, Path(inputs["data"]), inputs["teacher"], None, common)
    ec = eval_config(mdt, {"run_id": "r1", "tracking_uri": "sqlite:///x.db"}).validate()
    assert (ec.models.teacher, ec.models.student) == (inputs["teacher"],
                                                      f"{run_dir(mdt)}/export/ema/ss_flow_student")
    assert {s.model for s in ec.samplers} == {"teacher", "student"}
    assert ec.condition == mdt.condition and ec.data.uri == inputs["data"] and ec.data.split == "train"
    assert (ec.mlflow.distill_run_id, ec.mlflow.tracking_uri, ec.output) == ("r1", "sqlite:///x.db", run_dir(mdt))
    raw = ci_config(tmp_path, Path(inputs["data"]), inputs["teacher"], None,
                    common + ["mlflow.register_weights=student"])
    assert eval_config(raw).models.student == f"{run_dir(raw)}/export/student/ss_flow_student"
    fm = ci_config(tmp_path, Path(inputs["data"]), None, None, common + ["objective.name=flow_matching"])
    ec = eval_config(fm).validate()
    assert (ec.models.teacher, ec.models.student) == (f"{run_dir(fm)}/export/ema/ss_flow_teacher", None)
    assert {s.model for s in ec.samplers} == {"teacher"} and not ec.mlflow.enabled
