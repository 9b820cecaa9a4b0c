"""MLflow tracking of the distillation job against a real `mlflow server` (SQLite backend, proxied artifact
store) on 127.0.0.1, read back through MLflow's REST API: params and the resolved config, metrics (losses, the
10 per-time-bin losses, lr and its log10, grad norm, throughput, skipped steps), snapshot PNGs, the exported
TRELLIS-format student (which loads with from_pretrained and reproduces the trained student exactly) and its
model version."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from _distill_helpers import fault_injected_run, metric_history, rest, rest_bytes

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def fr():
    return fault_injected_run()


def _artifacts(url: str, run_id: str, path: str) -> list[dict]:
    return rest(url, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path=path).get("files", [])


def _download(url: str, run: dict, path: str) -> bytes:
    # proxied artifact store: runs:/ artifact_uri is mlflow-artifacts:/<exp>/<run>/artifacts
    root = run["info"]["artifact_uri"].split("mlflow-artifacts:/", 1)[1].strip("/")
    return rest_bytes(url, f"/api/2.0/mlflow-artifacts/artifacts/{root}/{path}")


def test_params_and_resolved_config(fr):
    url, run_id = fr["server"].url, fr["res"].mlflow_run_id
    run = rest(url, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["objective.name"] == "mdt" and params["stage"] == "ss"
    assert params["train.max_steps"] == "9" and params["scaling.num_workers"] == "2"
    assert params["objective.mdt.mode"] == "discrete" and params["model.teacher"] == fr["teacher"]
    # only the active objective's section (mdt) is a param
    others = ("objective.flow_matching.", "objective.cm.", "objective.pcm.", "objective.scm.", "objective.target")
    assert not [k for k in params if k.startswith(others)]
    files = [f["path"] for f in _artifacts(url, run_id, "config")]
    assert "config/resolved.yaml" in files
    assert b"objective:" in _download(url, run, "config/resolved.yaml")


def test_metrics_including_time_bins(fr):
    url, run_id = fr["server"].url, fr["res"].mlflow_run_id
    latest = {m["key"]: m["value"] for m in rest(url, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]["data"]["metrics"]}
    for key in ("loss", "loss_vm", "loss_vd", "lr", "grad_norm", "samples_per_s", "step_time_s", "data_time_s",
                "skipped_steps", "loss_fixed_batch"):
        assert key in latest and math.isfinite(latest[key]), key
    assert latest["skipped_steps"] == 0 and latest["lr"] == pytest.approx(1e-3)
    assert latest["lr_log10"] == pytest.approx(-3)                 # what MLflow's chart draws off its 0 line
    bins = {i: metric_history(url, run_id, f"loss_bin_{i}") for i in range(10)}
    assert sum(len(v) for v in bins.values()) >= 9             # every logged step fills at least one t-bin
    assert bins[9] or bins[8]                                   # logit-normal(1, 1) t sits mostly near 1
    assert all(math.isfinite(m["value"]) for v in bins.values() for m in v)
    assert [m["step"] for m in sorted(metric_history(url, run_id, "grad_norm"), key=lambda m: m["timestamp"])][-1] == 9


def test_snapshot_pngs(fr):
    url, run_id = fr["server"].url, fr["res"].mlflow_run_id
    run = rest(url, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    names = sorted(Path(f["path"]).name for f in _artifacts(url, run_id, "snapshots"))
    assert {"step_0000000.png", "step_0000003.png", "step_0000009.png"} <= set(names)
    png = _download(url, run, "snapshots/step_0000009.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_exported_student_is_trellis_format_and_exact(fr, tmp_path):
    from safetensors.torch import load_file

    from mdt.models import build_model, from_pretrained

    url, run_id = fr["server"].url, fr["res"].mlflow_run_id
    run = rest(url, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    listed = {Path(f["path"]).name for f in _artifacts(url, run_id, "export/student")}
    assert listed == {"ss_flow_student.json", "ss_flow_student.safetensors"}
    for name in listed:
        (tmp_path / name).write_bytes(_download(url, run, f"export/student/{name}"))
    exported = from_pretrained(tmp_path / "ss_flow_student")
    assert json.loads((tmp_path / "ss_flow_student.json").read_text())["args"]["model_channels"] == 32
    # the trained student = the final checkpoint's full float32 weights
    ckpt = Path(fr["res"].checkpoint)
    state = json.loads((ckpt / "state.json").read_text())
    trained = build_model(state["model"]["name"], state["model"]["args"])
    trained.load_state_dict(load_file(str(ckpt / "student.safetensors")))
    trained.eval()
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 8, 16, 16, 16, generator=g), torch.tensor([250.0, 900.0]), torch.randn(2, 21, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(exported(x, t, c), trained(x, t, c))
    # and it is not the teacher any more
    teacher = from_pretrained(fr["teacher"])
    with torch.no_grad():
        assert not torch.equal(teacher(x, t, c), trained(x, t, c))


def test_registered_model_version(fr):
    url, run_id = fr["server"].url, fr["res"].mlflow_run_id
    reg = rest(url, "/api/2.0/mlflow/registered-models/get", name="ci-student")["registered_model"]
    versions = reg.get("latest_versions", [])
    assert versions and versions[0]["run_id"] == run_id
    # the EMA weights: what evaluation samples from (mlflow.register_weights, default ema)
    assert versions[0]["source"].rstrip("/").endswith("export/ema")
    tags = {t["key"]: t["value"] for t in rest(url, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]["data"]["tags"]}
    assert tags["registered_model"] == "ci-student/1" and tags["registered_weights"] == "ema"
