"""MLflow tracking of a training run (rank 0 / driver only), through `mlflow.MlflowClient` with an explicit run id.

* Tracking URI: `mlflow.tracking_uri` of the config, else $MLFLOW_TRACKING_URI, else a local SQLite store
  `sqlite:///<cwd>/mlruns/mlflow.db` with artifacts in `<cwd>/mlruns/artifacts` (absolute, so Ray workers with
  another working directory log to the same place).
* One MLflow run per training run (Ray Train `name` + `storage_path`): the driver creates it and records its id
  in `<storage>/<name>/mlflow_run.json`; re-running the same job (or Ray Train restarting workers after a
  failure) logs into the same run. Checkpoints carry the id too.
* Non-finite steps are skipped by the trainer; the run gets the metric `skipped_steps` and the tag
  `alert.nonfinite_steps` ("<n> steps skipped, last at step <s>").
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"


def default_tracking_uri(cwd: str | os.PathLike | None = None) -> str:
    root = Path(cwd or os.getcwd()).resolve() / "mlruns"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a local SQLite store: an absolute artifacts dir beside the database (None: the server decides)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "artifacts").resolve().as_uri()
    if tracking_uri.startswith(("file:", "/")):
        return None
    return None


def client(tracking_uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(c, name: str, tracking_uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=default_artifact_location(tracking_uri))
    except Exception:  # created concurrently
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ------------------------------------------------------------------------------------------------- run file


def _fs(uri: str):
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    return pafs.FileSystem.from_uri(uri)


def read_text(uri: str) -> str | None:
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    fs, path = _fs(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def start_or_resume_run(tracking_uri: str, experiment: str, run_dir: str, run_name: str,
                        tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """(run id, resumed): the run recorded in `<run_dir>/mlflow_run.json` (set back to RUNNING), else a new one."""
    c = client(tracking_uri)
    rec = read_text(f"{run_dir.rstrip('/')}/{RUN_FILE}")
    if rec:
        info = json.loads(rec)
        try:
            run = c.get_run(info["run_id"])
            if run.info.lifecycle_stage == "active":
                c.update_run(run.info.run_id, status="RUNNING")
                c.set_tag(run.info.run_id, "resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
                return run.info.run_id, True
        except Exception as e:  # store was reset: start a new run
            log.warning("recorded MLflow run %s not found (%s); starting a new run", info.get("run_id"), e)
    exp_id = ensure_experiment(c, experiment, tracking_uri)
    run = c.create_run(exp_id, run_name=run_name, tags={"ray_run_dir": run_dir, **(tags or {})})
    write_text(f"{run_dir.rstrip('/')}/{RUN_FILE}",
               json.dumps({"run_id": run.info.run_id, "experiment_id": exp_id, "tracking_uri": tracking_uri}))
    return run.info.run_id, False


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix.rstrip(".")] = json.dumps(d) if isinstance(d, (list, tuple)) else str(d)
    return out


def log_params(c, run_id: str, params: dict[str, str]) -> None:
    """Params in batches of 100; an already-logged key with the same value is fine (a resumed run)."""
    from mlflow.entities import Param

    existing = c.get_run(run_id).data.params
    items = [Param(k, v[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


class MetricLogger:
    """Rank-0 metric writer: `log(step, {name: value})`; NaN/inf values are dropped (empty t-bins)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.c = client(tracking_uri)
        self.run_id = run_id
        self.alerted = 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self.c.log_batch(self.run_id, metrics=items[i:i + 500])

    def alert_nonfinite(self, skipped_total: int, step: int) -> None:
        if skipped_total > self.alerted:
            self.alerted = skipped_total
            self.c.set_tag(self.run_id, "alert.nonfinite_steps", f"{skipped_total} steps skipped, last at step {step}")
            log.warning("non-finite loss/gradient: %d steps skipped so far (last at step %d)", skipped_total, step)

    def set_tag(self, key: str, value: str) -> None:
        self.c.set_tag(self.run_id, key, value)

    def artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(local_path)
        if p.is_dir():
            self.c.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.c.log_artifact(self.run_id, str(p), artifact_path)


def register_model(tracking_uri: str, run_id: str, name: str, artifact_path: str,
                   description: str | None = None) -> str:
    """Register `runs:/<run_id>/<artifact_path>` (a TRELLIS-format model directory) as a new model version."""
    c = client(tracking_uri)
    try:
        c.get_registered_model(name)
    except Exception:
        try:
            c.create_registered_model(name, description=description)
        except Exception:
            pass
    run = c.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    mv = c.create_model_version(name, source=source, run_id=run_id, description=description)
    return str(mv.version)
