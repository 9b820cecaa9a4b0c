"""The evaluation job end to end on a few tiny shards: `jobs/evaluate.py --preset ci` with tiny random-weight
teacher/student/decoder, through the Ray Data graph, to results.json, table.md, plots, previews and one MLflow
run linked to a distillation run; bad arguments exit 2 before anything starts."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from _distill_helpers import perturbed_teacher, write_tiny_shards

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from mdt.eval.snapshots import OccupancyProbe

    tmp = tmp_path_factory.mktemp("eval")
    data = write_tiny_shards(tmp / "data", n=5)
    teacher = perturbed_teacher(tmp / "models" / "teacher")
    student = perturbed_teacher(tmp / "models" / "student", seed=2)
    probe = OccupancyProbe(8, hidden=8)
    probe.save(tmp / "models" / "probe")
    return {"tmp": tmp, "data": str(data), "teacher": teacher, "student": student,
            "decoder": str(tmp / "models" / "probe")}


def _args(inputs, out: Path, *extra: str) -> list[str]:
    return ["--preset", "ci", "--data", inputs["data"], "--teacher", inputs["teacher"], "--student",
            inputs["student"], "--decoder", inputs["decoder"], "--output", str(out), *extra]


def test_evaluate_job_end_to_end(inputs, ray_connected, monkeypatch, capsys):
    from mlflow import MlflowClient

    from jobs.evaluate import main

    tmp = inputs["tmp"]
    monkeypatch.chdir(tmp)                                   # the ci preset's relative paths land here
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    c = MlflowClient(uri)
    distill_run = c.create_run(c.create_experiment("distill")).info.run_id

    assert main(_args(inputs, tmp / "eval", "--distill-run", distill_run)) == 0
    printed = capsys.readouterr().out
    run_dir = tmp / "eval" / "evaluate-ci"
    res = json.loads((run_dir / "results.json").read_text())
    assert res["assets"] == 4                                 # max_assets of the preset (5 shards)
    labels = [r["sampler"] for r in res["rows"]]
    assert labels == ["teacher 4-step", "teacher 1-step", "student 1-step", "student 2-step"]
    # no weights on disk: the run says which random networks it used
    assert res["feature_nets"]["inception"]["name"].startswith("tiny-random-inception")
    assert res["feature_nets"]["dinov2"]["name"].startswith("tiny-random-dinov2")
    assert not res["feature_nets"]["inception"]["real_weights"]
    for r in res["rows"]:
        assert r["samples"] == 4
        assert 0.0 <= r["iou"] <= 1.0 and 0.0 <= r["fscore"] <= 1.0 and r["chamfer"] >= 0.0
        assert r["fd_incep"] >= 0.0 and r["fd_dinov2"] >= 0.0 and math.isfinite(r["fd_incep"])
        assert r["latency_s"] > 0 and set(r["latency_stages_s"]) == {"condition", "ss_sample", "ss_decode"}
    nfe = {r["sampler"]: r["nfe"] for r in res["rows"]}
    assert nfe == {"teacher 4-step": 4, "teacher 1-step": 1, "student 1-step": 1, "student 2-step": 2}
    ref = res["rows"][0]                                      # the reference sampler against itself
    assert ref["mse_ref"] == 0.0 and ref["iou_ref"] == 1.0 and ref["speedup"] == pytest.approx(1.0)
    assert res["rows"][1]["mse_ref"] > 0.0                    # a different sampler from the same noise
    table = (run_dir / "table.md").read_text()
    assert "| teacher 4-step | 4 |" in table and "tiny-random-inception" in table and table in printed + table
    assert (run_dir / "metrics.png").stat().st_size > 1000
    assert sorted(p.name for p in (run_dir / "previews").iterdir()) == sorted(
        f"{lbl.replace(' ', '_')}.png" for lbl in labels)
    # one MLflow run per evaluation, linked both ways to the distillation run
    runs = c.search_runs([c.get_experiment_by_name("mdt-eval-ci").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["mdt.distill_run_id"] == distill_run
    assert c.get_run(distill_run).data.tags["mdt.eval_run_id"] == run.info.run_id
    assert run.data.metrics["student_1-step.iou"] == pytest.approx(res["rows"][2]["iou"])
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"results.json", "table.md", "metrics.png", "previews"} <= arts


@pytest.mark.parametrize("drop, message", [("--data", "data.uri"), ("--decoder", "ss_decoder"),
                                           ("--student", "models.student")])
def test_missing_arguments_exit_2_with_one_line(inputs, tmp_path, capsys, drop, message):
    from jobs.evaluate import main

    args = _args(inputs, tmp_path)
    i = args.index(drop)
    del args[i:i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "evaluate-ci").exists()


def test_unknown_key_exits_2(inputs, tmp_path, capsys):
    from jobs.evaluate import main

    assert main(_args(inputs, tmp_path, "--set", "sampling.seedz=2")) == 2
    assert "did you mean" in capsys.readouterr().err
