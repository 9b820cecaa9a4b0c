"""The shipped presets through the CLI, as a user runs them: a private local Ray instance sized by the job (2
workers + Ray Data's reads fit on a 2-core machine), no `--set` overrides.

* `ci`: the README's line `python jobs/distill.py --preset ci --data <shards> --objective flow_matching`, to its
  last step, with its MLflow run in the default store beside the outputs.
* `demo`: the preset `make demo` uses, for 2 steps (`--steps`; its 200 steps take minutes), to the end with an
  export.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _distill_helpers import PROJECT_ROOT, write_tiny_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    r = subprocess.run([sys.executable, str(PROJECT_ROOT / "jobs" / "distill.py"), *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return r


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("presets") / "data", n=8)


def test_ci_preset_as_shipped(shards, tmp_path):
    r = _cli(["--preset", "ci", "--data", str(shards), "--objective", "flow_matching"], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Found multiple active Ray instances" not in out
    run_dir = tmp_path / "outputs" / "distill-ci" / "ss-flow_matching"
    res = json.loads((run_dir / "result.json").read_text())
    assert res["error"] is None and res["metrics"]["step"] == 6 and res["checkpoint"].endswith("checkpoint_0000006")
    # a flow-matching run exports a teacher, named as one (the README's next line reads it from there)
    assert Path(res["export_dir"], "ema", "ss_flow_teacher.safetensors").exists()
    assert not Path(res["export_dir"], "ema", "ss_flow_student.safetensors").exists()
    assert res["tracking_uri"] == f"sqlite:///{tmp_path / 'outputs' / 'distill-ci' / 'mlflow.db'}"
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=res["tracking_uri"])
    run = c.get_run(res["mlflow_run_id"])
    assert run.data.params["objective.name"] == "flow_matching" and run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    versions = c.search_model_versions("name='ss-flow_matching-teacher'")
    assert versions and versions[0].source.rstrip("/").endswith("export/ema")
    # snapshot.every 0: one grid, at the end (the README's snapshot table)
    grids = [a.path for a in c.list_artifacts(run.info.run_id, "snapshots")]
    assert grids == ["snapshots/step_0000006.png"], grids


def test_demo_preset_as_shipped_starts_trains_and_finishes(shards, tmp_path):
    r = _cli(["--preset", "demo", "--data", str(shards), "--objective", "flow_matching", "--steps", "2"], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    res = json.loads((tmp_path / "outputs" / "demo" / "runs" / "ss-flow_matching" / "result.json").read_text())
    assert res["error"] is None and res["metrics"]["step"] == 2
    assert Path(res["export_dir"], "ema", "ss_flow_demo_teacher.safetensors").exists()
