"""`ray job submit` of jobs/distill.py to a `ray start --head` (with its dashboard / job server) on 127.0.0.1."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from _distill_helpers import VENV_BIN, perturbed_teacher, write_tiny_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ray_job_submit_distill(tmp_path):
    from _pipeline_helpers import RayHead, ray_job_submit

    data = write_tiny_shards(tmp_path / "data", n=4)
    teacher = perturbed_teacher(tmp_path / "teacher" / "ss_flow_tiny")
    head = RayHead(dashboard=True, num_cpus=2)
    try:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_ADDRESS": head.dashboard_url}
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir", ".", "--",
               "python", "jobs/distill.py", "--preset", "ci", "--data", str(data), "--teacher", teacher,
               "--output", str(tmp_path / "runs"), "--name", "submitted", "--steps", "2",
               "--set", f"condition.model={tmp_path / 'tiny-dinov2'}", "--set", "scaling.cpus_per_worker=0.5",
               "--set", "train.torch_threads=1", "--set", "train.ckpt_every=2",
               "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
        r = ray_job_submit(cmd, env, timeout=420)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-5000:]
        assert "succeeded" in out.lower()
    finally:
        head.stop()
    res = json.loads((tmp_path / "runs" / "submitted" / "result.json").read_text())
    assert res["error"] is None and res["checkpoint"].endswith("checkpoint_0000002")
    assert Path(res["export_dir"], "student", "ss_flow_student.safetensors").exists()
