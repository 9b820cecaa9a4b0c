"""MLflow calls of a training run's workers (rank 0): metrics with their step, tags, artifacts, and the
registration of an exported model, through `mlflow.MlflowClient` with an explicit run id (the driver creates
the run: `pipelines.tracking`). Non-finite steps are skipped by the trainer; the run gets the metric
`skipped_steps` and the tag `alert.nonfinite_steps` ("<n> steps skipped, last at step <s>").
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def client(tracking_uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


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
