"""The evaluation job end to end on a few tiny shards: the README's `jobs/evaluate.py --preset ci` command with
tiny random-weight teacher/student/decoder, through the Ray Data graph, to results.json, table.md, plots,
previews and one MLflow run (linked to a distillation run); bad arguments exit 2 before anything starts."""
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
    data = write_tiny_shards(tmp / "pre", n=5)
    teacher = perturbed_teacher(tmp / "models" / "teacher")
    student = perturbed_teacher(tmp / "models" / "student", seed=2)
    probe = OccupancyProbe(8, hidden=8)
    probe.save(tmp / "models" / "probe")
    return {"tmp": tmp, "data": str(data), "teacher": teacher, "student": student,
            "decoder": str(tmp / "models" / "probe")}


CI_COMMAND = ("python jobs/evaluate.py --preset ci --data outputs/pre --teacher outputs/models/teacher "
              "--student outputs/models/student --decoder outputs/models/probe --output outputs/eval")


def _args(inputs, out: Path, *extra: str) -> list[str]:
    return ["--preset", "ci", "--data", inputs["data"], "--teacher", inputs["teacher"], "--student",
            inputs["student"], "--decoder", inputs["decoder"], "--output", str(out), *extra]


def test_ci_command_end_to_end(inputs, ray_connected, tmp_path):
    """The evaluation command with the ci preset, in a directory holding its inputs (shards, tiny models)."""
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    root = Path(__file__).resolve().parents[1]
    for d in ("jobs", "mdt", "pipelines"):
        (tmp_path / d).symlink_to(root / d)
    (tmp_path / "outputs").symlink_to(inputs["tmp"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(root),
           "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": ray_connected.address}
    r = subprocess.run(["bash", "-c", CI_COMMAND], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = inputs["tmp"] / "eval" / "evaluate-ci"
    res = json.loads((run_dir / "results.json").read_text())
    assert res["assets"] == 4                                 # max_assets of the preset (5 shards)
    labels = [r["sampler"] for r in res["rows"]]
    assert labels == ["teacher 4-step", "teacher 1-step", "student 1-step", "student 2-step"]
    # no weights on disk: the run says which random networks it used
    assert res["feature_nets"]["inception"]["name"].startswith("tiny-random-inception")
    assert res["feature_nets"]["dinov2"]["name"].startswith("tiny-random-dinov2")
    assert not res["feature_nets"]["inception"]["real_weights"]
    for row in res["rows"]:
        assert row["samples"] == 4
        assert 0.0 <= row["iou"] <= 1.0 and 0.0 <= row["fscore"] <= 1.0 and row["chamfer"] >= 0.0
        assert row["fd_incep"] >= 0.0 and row["fd_dinov2"] >= 0.0 and math.isfinite(row["fd_incep"])
        assert row["latency_s"] > 0 and set(row["latency_stages_s"]) == {"condition", "ss_sample", "ss_decode"}
    nfe = {row["sampler"]: row["nfe"] for row in res["rows"]}
    assert nfe == {"teacher 4-step": 4, "teacher 1-step": 1, "student 1-step": 1, "student 2-step": 2}
    ref = res["rows"][0]                                      # the reference sampler against itself
    assert ref["mse_ref"] == 0.0 and ref["iou_ref"] == 1.0 and ref["speedup"] == pytest.approx(1.0)
    assert res["rows"][1]["mse_ref"] > 0.0                    # a different sampler from the same noise
    table = (run_dir / "table.md").read_text()
    assert "| teacher 4-step | 4 |" in table and "tiny-random-inception" in table
    assert "| student 2-step |" in r.stdout
    assert (run_dir / "metrics.png").stat().st_size > 1000
    previews = {p.name for p in (run_dir / "previews").iterdir()}
    assert previews == {f"{lbl.replace(' ', '_')}.{ext}" for lbl in labels for ext in ("png", "html")}
    page = (run_dir / "previews" / "student_1-step.html").read_text()
    assert "ground truth" in page and "teacher 4-step" in page and "http" not in page.lower().replace(
        "http-equiv", "")                                     # self-contained: nothing fetched from anywhere
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("mdt-eval-ci").experiment_id])
    assert len(runs) == 1                                     # one MLflow run per evaluation
    assert runs[0].data.metrics["student_1-step.iou"] == pytest.approx(res["rows"][2]["iou"])
    arts = {a.path for a in c.list_artifacts(runs[0].info.run_id)}
    assert {"results.json", "table.md", "metrics.png", "previews"} <= arts
    html_arts = {a.path for a in c.list_artifacts(runs[0].info.run_id, "previews")}
    assert "previews/student_1-step.html" in html_arts


def test_mlflow_run_is_linked_to_the_distillation_run(tmp_path):
    from mlflow import MlflowClient

    from mdt.config import load_config
    from pipelines.evaluate.driver import EvaluateConfig, log_mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    distill_run = c.create_run(c.create_experiment("distill")).info.run_id
    cfg = load_config(EvaluateConfig, "ci", [("mlflow.tracking_uri", uri), ("mlflow.distill_run_id", distill_run)],
                      prefix="evaluate_")
    for f in ("results.json", "table.md", "metrics.png"):
        (tmp_path / f).write_text("x")
    rows = [{"sampler": "student 1-step", "nfe": 1, "iou": 0.5, "fd_incep": float("nan")}]
    rid = log_mlflow(cfg, {"rows": rows}, tmp_path, [])
    run = c.get_run(rid)
    assert run.data.tags["mdt.distill_run_id"] == distill_run and run.data.params["mlflow.distill_run_id"] == \
        distill_run
    assert c.get_run(distill_run).data.tags["mdt.eval_run_id"] == rid
    assert run.data.metrics == {"student_1-step.nfe": 1.0, "student_1-step.iou": 0.5}   # NaN is not logged


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


def test_holdout_split_is_a_fixed_fraction_by_asset():
    import hashlib

    from pipelines.evaluate.driver import EvalDataConfig, in_split, split_of

    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    held = [s for s in shas if split_of(s, 0.1) == "holdout"]
    assert 0.08 < len(held) / len(shas) < 0.12
    assert held == [s for s in shas if split_of(s, 0.1) == "holdout"]            # deterministic
    assert set(held) != {s for s in shas if split_of(s, 0.1, seed=1) == "holdout"}  # the seed changes it
    train = EvalDataConfig(split="train", holdout_fraction=0.1)
    assert not any(in_split(s, train) for s in held) and all(in_split(s, EvalDataConfig(split="all")) for s in held)


def test_readme_evaluation_line_after_the_demo(tmp_path, monkeypatch, ray_connected):
    """The README's evaluation line, verbatim, in a directory laid out as `make demo` leaves it (its shards, the
    teacher's and the student's exports beside their runs' result.json, its probe, its tiny DINOv2 and MLflow
    store; tiny stand-ins): it runs, and its MLflow run lands in the demo's store, linked to the student's run."""
    import shlex

    from mlflow import MlflowClient

    from _distill_helpers import TINY_SS_ARGS, perturbed_teacher, write_tiny_shards
    from infra.doc_commands import commands
    from jobs.evaluate import main
    from mdt.eval.snapshots import OccupancyProbe

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(c.text for c in commands(readme) if c.section == "The evaluation job" and "--preset demo" in c.text)
    argv = shlex.split(line)
    assert argv[:2] == ["python", "jobs/evaluate.py"] and "--set" not in argv
    opt = dict(zip(argv[2::2], argv[3::2]))
    demo = tmp_path / "outputs" / "demo"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_tiny_shards(tmp_path / opt["--data"], n=3, image_size=56)
    store = f"sqlite:///{demo / 'mlflow.db'}"
    c = MlflowClient(store)
    exp = c.create_experiment("mdt-distill-demo")
    runs = {}
    for flag, seed in (("--teacher", 1), ("--student", 3)):
        ckpt = tmp_path / opt[flag]
        perturbed_teacher(ckpt, {**TINY_SS_ARGS, "cond_channels": 64}, seed=seed)   # the demo's DINOv2 width
        runs[flag] = c.create_run(exp).info.run_id
        (ckpt.parents[2] / "result.json").write_text(json.dumps({"tracking_uri": store,
                                                                 "mlflow_run_id": runs[flag]}))
    OccupancyProbe(8, hidden=8).save(tmp_path / opt["--decoder"])
    assert main(argv[2:]) == 0
    res = json.loads((tmp_path / opt["--output"] / "evaluate-demo" / "results.json").read_text())
    assert res["assets"] == 3 and len(res["rows"]) == 9 and res["distill_run_id"] == runs["--student"]
    evals = [r for r in c.search_runs([exp]) if r.data.tags.get("mdt.kind") == "evaluation"]
    assert len(evals) == 1 and evals[0].data.tags["mdt.distill_run_id"] == runs["--student"]
    assert c.get_run(runs["--student"]).data.tags["mdt.eval_run_id"] == evals[0].info.run_id
    assert not (tmp_path / opt["--output"] / "mlflow.db").exists()       # no second store
