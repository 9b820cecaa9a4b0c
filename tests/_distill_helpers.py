"""Helpers for the distillation-job tests: tiny shards written with the real shard writer (no Ray needed), a
tiny TRELLIS-format teacher, a real `mlflow server` on loopback, and the distill config for them."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from _pipeline_helpers import stop_process_group

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

TINY_SS_ARGS = dict(resolution=16, in_channels=8, out_channels=8, model_channels=32, cond_channels=32,
                    num_blocks=1, num_heads=2, mlp_ratio=2, patch_size=4, pe_mode="ape", qk_rms_norm=True,
                    use_fp16=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_shards(out: Path, n: int = 8, image_size: int = 56, views: int = 2) -> Path:
    """`n` synthetic assets through download's bytes + StandInCompute + the real ShardWriter/manifest (no Ray)."""
    from mdt.config import load_config
    from pipelines.preprocess import shards
    from pipelines.preprocess.config import PreprocessConfig, config_hash
    from pipelines.preprocess.synthetic_meshes import synthetic_mesh_glb
    from pipelines.preprocess.stand_in import StandInCompute

    cfg = load_config(PreprocessConfig, "ci", [f"output={out}", f"cond.image_size={image_size}",
                                               f"cond.num_views={views}"], prefix="preprocess_")
    chash = config_hash(cfg)
    fc = StandInCompute(cfg)
    rows = []
    for i in range(n):
        data = synthetic_mesh_glb(i)
        import hashlib

        row = {"sha256": hashlib.sha256(data).hexdigest(), "source": "synthetic", "file_identifier": f"synthetic-{i}",
               "uri": f"synthetic://{i}", "license": None, "aesthetic_score": None, "provenance": "{}",
               "error": None, "timings": "{}", "mesh_bytes": data}
        rows.append(fc(row))
    writer = shards.ShardWriter(cfg, "test", chash)
    writer.write_rows(rows)
    shards.write_manifest(cfg, chash, "test")
    return out


def perturbed_teacher(path: Path, args: dict | None = None, seed: int = 1, scale: float = 0.05) -> str:
    """A tiny SparseStructureFlowModel whose zero-initialised output layers are perturbed, saved in TRELLIS format."""
    from mdt.models import SparseStructureFlowModel

    torch.manual_seed(seed)
    return _save_perturbed(SparseStructureFlowModel(**(args or TINY_SS_ARGS)), path, seed, scale)


def _save_perturbed(model, path: Path, seed: int, scale: float) -> str:
    from mdt.models import save_pretrained

    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    save_pretrained(model, path)
    return str(path)



def run_cli_without_ray(argv, capsys, monkeypatch, job: str = "distill") -> tuple[int, list[str]]:
    """Run `jobs/<job>.py` in-process; Ray must not be started (or joined) and no generation model loaded on the
    way to the error. Another test module may have left this process connected to Ray, so `ray.is_initialized`
    answers False and every `ray.init` (each job's Ray entry point ends there) is recorded, as is the distill
    driver's own entry point."""
    import importlib

    import ray

    import mdt.generate
    from pipelines.distill import driver as distill

    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(("ray.init", a, k)))
    monkeypatch.setattr(distill, "init_ray", lambda *a, **k: started.append(("init_ray", a, k)))
    monkeypatch.setattr(mdt.generate.ImageTo3D, "from_config",
                        classmethod(lambda cls, *a, **k: started.append(("models", a, k))))
    rc = importlib.import_module(f"jobs.{job}").main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert not started, f"Ray was started or models loaded for {job} {argv}: {started[0][0]}"
    return rc, err


def ci_overrides(tmp: Path, data: Path, teacher: str | None, tracking_uri: str | None, **extra) -> list[str]:
    ov = [f"data.uri={data}", f"output={tmp / 'runs'}", f"condition.model={tmp / 'tiny-dinov2'}",
          "scaling.cpus_per_worker=0.5", "train.torch_threads=1"]
    if teacher:
        ov.append(f"model.teacher={teacher}")
    if tracking_uri:
        ov.append(f"mlflow.tracking_uri={tracking_uri}")
    else:
        ov.append("mlflow.enabled=false")
    ov += [f"{k}={v}" for k, v in extra.items()]
    return ov


def ci_config(tmp: Path, data: Path, teacher: str | None, tracking_uri: str | None, overrides=(), **extra):
    from mdt.config import load_config
    from pipelines.distill.config import DistillJobConfig

    ov = ci_overrides(tmp, data, teacher, tracking_uri, **extra) + list(overrides)
    return load_config(DistillJobConfig, "ci", ov, prefix="distill_").validate()


class MlflowServer:
    """`mlflow server` (SQLite backend, local artifact store) on 127.0.0.1 in its own process group."""

    def __init__(self, root: Path):
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        cmd = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root.resolve()}/mlflow.db",
               "--artifacts-destination", str(root.resolve() / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait()

    def _wait(self, timeout: float = 300) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not come up")

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=20)
        self.log.close()


# ------------------------------------------------------------------------------------------ worker hooks
# Ray Train workers run `hook(loop, step, rows)` after every step (`pipelines.distill.worker`); this module is pickled by
# value so that the workers need not import the tests directory.
import ray.cloudpickle  # noqa: E402 (Ray pickles with its own copy of cloudpickle)

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KillOnce:
    """The last rank SIGKILLs its own process once at `step` (a marker file in the run dir makes it once)."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, loop, step: int, rows) -> None:
        marker = Path(loop.run_dir) / ".fail_injected"
        if step == self.step and loop.rank == loop.world - 1 and not marker.exists():
            marker.write_text(f"killed rank {loop.rank} (pid {os.getpid()}) at step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)


class RecordSamples:
    """Every rank appends (step, sha256 of each sample of the step's batch) to `<run dir>/samples-rank<r>.jsonl`."""

    def __call__(self, loop, step: int, rows) -> None:
        with open(Path(loop.run_dir) / f"samples-rank{loop.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "pid": os.getpid(), "sha256": [r["sha256"] for r in rows]}) + "\n")


def recorded_samples(run_dir: str | Path, rank: int) -> list[dict]:
    p = Path(run_dir) / f"samples-rank{rank}.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


# ------------------------------------------------------------------------------------------ one shared run

_FAULT_RUN: dict | None = None


def fault_injected_run() -> dict:
    """Once per test session: 2 CPU workers (gloo) distil a tiny teacher with MDT-dist on tiny shards for 9 steps
    (checkpoints every 3, snapshots every 3), logging to a real `mlflow server`; the last worker SIGKILLs itself
    at step 5 (an injected hook), Ray Train restarts the group from the step-3 checkpoint; every rank records the
    samples of each step. Used by test_distill_job.py and test_mlflow_tracking.py (the server is stopped at
    exit)."""
    global _FAULT_RUN
    if _FAULT_RUN is not None:
        return _FAULT_RUN
    import atexit
    import tempfile

    from _pipeline_helpers import connect_ray
    from pipelines.distill.driver import run

    tmp = Path(tempfile.mkdtemp(prefix="mdt-distill-test-"))
    server = MlflowServer(tmp / "mlflow")
    atexit.register(server.stop)
    data = write_tiny_shards(tmp / "data", n=8)
    teacher = perturbed_teacher(tmp / "teacher" / "ss_flow_tiny")
    connect_ray()
    cfg = ci_config(tmp, data, teacher, server.url, ["name=fault", "train.max_steps=9", "train.ckpt_every=3",
                                                     "snapshot.every=3", "mlflow.register_model=ci-student"])
    t0 = time.time()
    res = run(cfg, hooks=[RecordSamples(), KillOnce(5)])
    _FAULT_RUN = {"tmp": tmp, "server": server, "cfg": cfg, "res": res, "wall_s": time.time() - t0,
                  "data": data, "teacher": teacher}
    return _FAULT_RUN


def rest(server_url: str, endpoint: str, **params):
    """GET an MLflow REST endpoint -> parsed JSON."""
    import json
    import urllib.parse

    url = f"{server_url}{endpoint}?{urllib.parse.urlencode(params, doseq=True)}" if params else f"{server_url}{endpoint}"
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def rest_bytes(server_url: str, endpoint: str, **params) -> bytes:
    import urllib.parse

    url = f"{server_url}{endpoint}?{urllib.parse.urlencode(params)}" if params else f"{server_url}{endpoint}"
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


def metric_history(server_url: str, run_id: str, key: str) -> list[dict]:
    return rest(server_url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])


def rest_post(server_url: str, path: str, body: dict):
    import json

    req = urllib.request.Request(f"{server_url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


# patch 1 without the sparse-conv io blocks: the portable CPU sparse convolution makes a patch-2 model ~10x slower,
# and the job's plumbing (sparse batches, normalisation, objectives) is what the SLat tests here check
TINY_SLAT_ARGS = dict(resolution=64, in_channels=8, out_channels=8, model_channels=32, cond_channels=32, num_blocks=1,
                      num_heads=2, mlp_ratio=2, patch_size=1, num_io_res_blocks=0, io_block_channels=[],
                      pe_mode="ape", qk_rms_norm=True, use_fp16=False)


def perturbed_slat_teacher(path: Path, seed: int = 2, scale: float = 0.05) -> str:
    """A tiny SLatFlowModel with perturbed (non-zero) output layers, saved in TRELLIS format."""
    from mdt.models import SLatFlowModel

    torch.manual_seed(seed)
    return _save_perturbed(SLatFlowModel(**TINY_SLAT_ARGS), path, seed, scale)
