"""The MLflow run of a training job, on the driver: where the store is, one run per training run (created, or
found again on a re-run), its params and resolved config.

* Tracking URI: `mlflow.tracking_uri` of the config, else $MLFLOW_TRACKING_URI, else a SQLite store beside the
  run's outputs, `sqlite:///<output>/mlflow.db` with artifacts in `<output>/artifacts` (a local `output`
  only: with an s3:// output a tracking URI must be given).
* One MLflow run per training run (`<output>/<name>`): its id is recorded in `<output>/<name>/mlflow_run.json`
  (local or s3://, through `pipelines.common.storage`, so a custom S3 endpoint applies); re-running the same job, or
  Ray Train restarting workers after a failure, logs into the same run.
* Params: the resolved config, of the objectives only the active one's section.

The workers' side (rank 0 of a training run): `MetricLogger` (metrics with their step, tags, artifacts) and
`register_model`, through `mlflow.MlflowClient` with the run id the driver created. Non-finite steps are
skipped by the trainer; the run gets the metric `skipped_steps` and the tag `alert.nonfinite_steps`. The
learning rate goes in as `lr` and as `lr_log10` (`lr_metrics`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.common import storage

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
# the objective.<section> each objective reads its hyper-parameters from (vm is MDT-dist without VD)
OBJECTIVE_SECTION = {"flow_matching": "flow_matching", "mdt": "mdt", "vm": "mdt", "cm": "cm", "pcm": "pcm",
                     "scm": "scm"}


def resolve_tracking_uri(configured: str | None, output: str) -> str | None:
    """The configured / environment URI, else a SQLite store under a local `output` (None for a remote one)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if "://" in output:
        return None
    root = Path(output).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a local SQLite store: an absolute artifacts dir beside the database (None: the server decides)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None


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


def start_or_resume_run(tracking_uri: str, experiment: str, run_dir: str, run_name: str,
                        tags: dict[str, str] | None = None, storage_cfg=None) -> tuple[str, bool]:
    """(run id, resumed): the run recorded in `<run_dir>/mlflow_run.json` (set back to RUNNING), else a new one."""
    c = client(tracking_uri)
    rec_uri = f"{run_dir.rstrip('/')}/{RUN_FILE}"
    if storage.exists(rec_uri, storage_cfg):
        info = json.loads(storage.read_bytes(rec_uri, storage_cfg))
        try:
            run = c.get_run(info["run_id"])
            if run.info.lifecycle_stage == "active":
                c.update_run(run.info.run_id, status="RUNNING")
                c.set_tag(run.info.run_id, "resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
                return run.info.run_id, True
        except Exception as e:  # the store was reset: start a new run
            log.warning("recorded MLflow run %s not found (%s); starting a new run", info.get("run_id"), e)
    exp_id = ensure_experiment(c, experiment, tracking_uri)
    run = c.create_run(exp_id, run_name=run_name, tags={"ray_run_dir": run_dir, **(tags or {})})
    storage.write_bytes_atomic(rec_uri, json.dumps({"run_id": run.info.run_id, "experiment_id": exp_id,
                                                    "tracking_uri": tracking_uri}).encode(), storage_cfg)
    return run.info.run_id, False


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix.rstrip(".")] = json.dumps(d) if isinstance(d, (list, tuple)) else str(d)
    return out


def run_params(resolved: dict) -> dict[str, str]:
    """The flattened resolved config without the sections of objectives this run does not use."""
    obj = dict(resolved.get("objective", {}))
    active = OBJECTIVE_SECTION.get(obj.get("name"), obj.get("name"))
    keep = {k: v for k, v in obj.items() if k not in OBJECTIVE_SECTION.values() or k == active}
    if obj.get("name") not in ("cm", "pcm", "scm"):
        keep.pop("target", None)  # the consistency objectives' target network
    return flatten({**resolved, "objective": keep})


def log_params(c, run_id: str, params: dict[str, str]) -> None:
    """Params in batches of 100; a key the run already has (a resumed run) is left as it is."""
    from mlflow.entities import Param  # heavy: mlflow, fastapi

    existing = c.get_run(run_id).data.params
    items = [Param(k, v[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def start_training_run(cfg, run_dir: str, resolved: dict, yaml_text: str, storage_cfg=None,
                       tags: dict[str, str] | None = None) -> dict | None:
    """The MLflow run of a training run -> {"tracking_uri", "run_id"} (None when MLflow is off); `tags` are set on
    it (e.g. where its data came from)."""
    if not cfg.mlflow.enabled:
        return None
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.output)
    run_id, resumed = start_or_resume_run(
        uri, cfg.mlflow.experiment, run_dir, cfg.mlflow.run_name or cfg.name,
        tags={"objective": cfg.objective.name, "stage": cfg.stage, "job": "jobs/distill.py"}, storage_cfg=storage_cfg)
    c = client(uri)
    for k, v in (tags or {}).items():
        c.set_tag(run_id, k, v)
    log_params(c, run_id, run_params(resolved))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / ("resolved.yaml" if not resumed else f"resolved-resume-{int(time.time())}.yaml")
        p.write_text(yaml_text)
        c.log_artifact(run_id, str(p), "config")
    log.info("MLflow: %s run %s (%s)", uri, run_id, "resumed" if resumed else "new")
    return {"tracking_uri": uri, "run_id": run_id}


def log_eval_table(tracking_uri: str, run_id: str, eval_dir: str, headline: dict[str, float],
                   name: str = "eval") -> None:
    """An evaluation's table as one artifact folder (`<name>/table.md` and `<name>/results.json`, from
    `eval_dir`) plus a few headline metrics (`<name>/<key>`), instead of one single-point chart per cell."""
    c = client(tracking_uri)
    with tempfile.TemporaryDirectory() as d:
        for f in ("table.md", "results.json"):
            shutil.copy(Path(eval_dir) / f, Path(d) / f)
        c.log_artifacts(run_id, d, name)
    for k, v in headline.items():
        c.log_metric(run_id, f"{name}/{k}", float(v))


# ---------------------------------------------------------------------------------------------- workers' side

def client(tracking_uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient  # heavy: mlflow, fastapi

    return MlflowClient(tracking_uri=tracking_uri)


def lr_metrics(lr: float) -> dict[str, float]:
    """`lr` as it is, and `lr_log10` = log10(lr) (omitted at lr 0, e.g. the first warm-up step). MLflow's charts
    (plotly autorange) draw a constant metric v on the axis [v - 1, v + 1]: a constant lr of 1e-3 is a flat line
    indistinguishable from 0 there, whereas its log10 is a line on the -3 tick."""
    return {"lr": lr, **({"lr_log10": math.log10(lr)} if lr > 0 else {})}


class MetricLogger:
    """Rank-0 metric writer: `log(step, {name: value})`; NaN/inf values are dropped (empty t-bins)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.c = client(tracking_uri)
        self.run_id = run_id
        self.alerted = 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric  # heavy: mlflow, fastapi

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
