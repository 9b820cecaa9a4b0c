"""The README's "Running on a Ray cluster" section, run as written on 127.0.0.1: its head (`ray start --head
--block`, with the authentication choice the section makes), then its second block as one bash script —
preprocessing, a flow-matching teacher and its MDT-dist student submitted with `ray job submit --working-dir .`
— and its `mlflow ui` line. Substituted, because the machine is shared: the ports (free ones, every Ray
component's given explicitly), the head's temp dir (one per port) and `$OUT` (a temporary directory instead of
the checkout's `outputs/`).
The head's process group is stopped at the end (never `ray stop`)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from _distill_helpers import PROJECT_ROOT, VENV_BIN
from _pipeline_helpers import free_port, ray_port_args, stop_process_group
from infra.doc_commands import commands

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SECTION = "Running on a Ray cluster"


def section_blocks() -> list[list[str]]:
    cmds = [c for c in commands((PROJECT_ROOT / "README.md").read_text()) if c.section == SECTION]
    blocks: dict[int, list[str]] = {}
    for c in cmds:
        blocks.setdefault(c.block, []).append(c.text)
    return [blocks[b] for b in sorted(blocks)]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI", "PYTHONPATH"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", RAY_USAGE_STATS_ENABLED="0",
               MLFLOW_DISABLE_TELEMETRY="true", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        try:
            urllib.request.urlopen(url, timeout=3)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


def _wait_job_agent(dashboard_url: str, timeout: float = 120) -> None:
    """The head's job agent registers a little after the dashboard answers: submit a no-op until it is taken."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client, t0 = JobSubmissionClient(dashboard_url), time.time()
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except Exception:  # noqa: BLE001 - "No available agent" while it registers
            assert time.time() - t0 < timeout, "no job agent"
            time.sleep(2)
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(0.5)


def test_readme_cluster_section_runs_as_written(tmp_path):
    head_block, jobs_block = section_blocks()
    assert head_block[0] == "export RAY_AUTH_MODE=disabled" and head_block[-1].startswith("ray start --head --block")
    port, dash, ui_port = free_port(), free_port(), free_port()
    head_lines = [line.replace("6379", str(port)).replace("--dashboard-port=8265", f"--dashboard-port={dash}")
                  .replace("--temp-dir=/tmp/ray-mdt", f"--temp-dir=/tmp/ray-mdt-{port}") for line in head_block]
    head_lines[-1] = "exec " + head_lines[-1] + " " + " ".join(ray_port_args(port, dash))
    env = _env()
    head = subprocess.Popen(["bash", "-c", "\n".join(head_lines)], env=env, cwd=PROJECT_ROOT,
                            stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    ui = None
    try:
        dashboard = f"http://127.0.0.1:{dash}"
        _wait_http(f"{dashboard}/api/version", head, 180)
        _wait_job_agent(dashboard)
        ui_line = next(line for line in jobs_block if line.startswith("mlflow ui"))
        script = [line.replace("http://127.0.0.1:8265", dashboard)
                  .replace("OUT=$PWD/outputs/cluster", f"OUT={tmp_path / 'cluster'}")
                  for line in jobs_block if line != ui_line]
        r = subprocess.run(["bash", "-ec", "\n".join(script)], env=env, cwd=PROJECT_ROOT, capture_output=True,
                           text=True, timeout=900)
        out = r.stdout + r.stderr
        (tmp_path / "jobs.log").write_text(out)
        assert r.returncode == 0, out[-6000:]
        assert out.count("succeeded") >= 3 and "Found multiple active Ray instances" not in out, out[-3000:]
        runs = tmp_path / "cluster" / "distill"
        teacher = json.loads((runs / "ss-flow_matching" / "result.json").read_text())
        student = json.loads((runs / "ss-mdt" / "result.json").read_text())
        for res in (teacher, student):
            assert res["error"] is None and res["metrics"]["step"] == 6, res
        assert Path(runs, "ss-mdt", "export", "ema", "ss_flow_student.safetensors").exists()

        # the UI line, on a free port, shows both runs with their own losses
        ui = subprocess.Popen(["bash", "-c", "exec " + ui_line.replace("--port 5000", f"--port {ui_port}")
                               .replace("$OUT", str(tmp_path / "cluster"))], env=env, cwd=PROJECT_ROOT,
                              stdout=open(tmp_path / "ui.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
        url = f"http://127.0.0.1:{ui_port}"
        _wait_http(f"{url}/health", ui, 180)
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=mdt-distill-ci",
                                    timeout=30) as resp:
            exp_id = json.loads(resp.read())["experiment"]["experiment_id"]
        req = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp_id]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            found = {r["info"]["run_name"]: {m["key"] for m in r["data"].get("metrics", [])}
                     for r in json.loads(resp.read())["runs"]}
        assert set(found) == {"ss-flow_matching", "ss-mdt"}, found
        assert {"loss_vm", "loss_vd"} <= found["ss-mdt"] and "loss_vm" not in found["ss-flow_matching"]
        assert re.search(r"loss", " ".join(found["ss-flow_matching"]))
    finally:
        if ui is not None:
            stop_process_group(ui, timeout=20)
        stop_process_group(head, timeout=20)
        shutil.rmtree(f"/tmp/ray-mdt-{port}", ignore_errors=True)
