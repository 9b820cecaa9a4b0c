"""The README's "Running on a Ray cluster" section, run as written on a machine that already runs another Ray
instance (a local one on Ray's default ports, started here first): its first block (`make env`, the port check,
the token, `ray start --head --block`), then its second block as one bash script — preprocessing, a flow-matching
teacher and its MDT-dist student submitted with `ray job submit --working-dir .` — and its `mlflow ui` line.
Substituted: `$OUT` (a temporary directory instead of the checkout's `outputs/cluster`) and the UI's port (a free
one). A client without the token is refused, and the dashboard does not answer on the external address.
The head's process group is stopped at the end (never `ray stop`)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from _distill_helpers import PROJECT_ROOT, VENV_BIN
from _pipeline_helpers import free_port, stop_process_group
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
        except urllib.error.HTTPError as e:
            if e.code == 401:  # the token-protected dashboard answers: it is up
                return
            time.sleep(1)
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


def _wait_job_agent(setup_lines: list[str], env: dict, timeout: float = 120) -> None:
    """The head's job agent registers a little after the dashboard answers: submit a no-op (after the section's
    client set-up lines, token included) until it is taken."""
    setup = "\n".join(["set -e", *setup_lines])
    t0 = time.time()
    while True:
        r = subprocess.run(["bash", "-c", setup + "\nray job submit -- true"], env=env, cwd=PROJECT_ROOT,
                           capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            return
        assert time.time() - t0 < timeout, "no job agent: " + (r.stdout + r.stderr)[-2000:]
        time.sleep(3)


def _another_ray_instance(tmp_path) -> subprocess.Popen:
    """A local Ray instance with its dashboard, on Ray's default ports where they are free (GCS, dashboard 8265,
    agent 52365, client 10001): what a user may already run on the machine."""
    code = ("import ray, time; ray.init(address='local', num_cpus=1, include_dashboard=True); "
            "print('up', flush=True); time.sleep(3600)")
    env = {**_env(), "RAY_AUTH_MODE": "disabled"}
    log = tmp_path / "other-ray.log"
    proc = subprocess.Popen([str(VENV_BIN / "python"), "-c", code], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while "up" not in log.read_text():
        assert proc.poll() is None and time.time() - t0 < 180, log.read_text()[-2000:]
        time.sleep(1)
    return proc


def test_readme_cluster_section_runs_as_written(tmp_path):
    head_block, jobs_block = section_blocks()
    assert head_block[0] == "make env" and head_block[-1].startswith("ray start --head --block")
    start = head_block[-1].split()
    port = int(next(a for a in start if a.startswith("--port=")).split("=")[1])
    assert port != 6379                                         # Ray's default: another instance may hold it
    dash = int(next(a for a in start if a.startswith("--dashboard-port=")).split("=")[1])
    given = {a.split("=")[0] for a in start if a.startswith("--") and "=" in a}
    assert {"--dashboard-agent-listen-port", "--ray-client-server-port", "--metrics-export-port",
            "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--node-manager-port",
            "--object-manager-port", "--min-worker-port", "--max-worker-port"} <= given   # no port left to chance
    ui_port = free_port()
    env = _env()
    # the section's `make env` must be the no-op it is after `make test`'s own `make env`: a pip install into an
    # environment that other processes share is not this test's business
    if subprocess.run(["make", "-q", "env"], cwd=PROJECT_ROOT, env=env).returncode != 0:
        pytest.skip("the environment is not built for this checkout's pyproject.toml: run `make env` first")
    other = _another_ray_instance(tmp_path)
    head = subprocess.Popen(["bash", "-ec", "\n".join(head_block)], env=env, cwd=PROJECT_ROOT,
                            stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    ui = None
    try:
        dashboard = f"http://127.0.0.1:{dash}"
        _wait_http(f"{dashboard}/api/version", head, 180)
        setup = [line for line in jobs_block if not line.startswith(("ray job submit", "mlflow ui"))]
        _wait_job_agent(setup, env)
        ui_line = next(line for line in jobs_block if line.startswith("mlflow ui"))
        script = [line.replace("OUT=$PWD/outputs/cluster", f"OUT={tmp_path / 'cluster'}")
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

        # only token holders get in; the dashboard is not on the external address
        no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        r = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", dashboard], env=no_token,
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "token" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
        import socket

        external = socket.gethostbyname(socket.gethostname())
        if external != "127.0.0.1":
            with pytest.raises(OSError):
                socket.create_connection((external, dash), timeout=3).close()
        assert other.poll() is None                            # the other instance ran beside it throughout

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
        stop_process_group(other, timeout=20)
        shutil.rmtree("/tmp/ray-mdt", ignore_errors=True)
