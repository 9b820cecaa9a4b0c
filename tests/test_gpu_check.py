"""`make gpu-check` (mdt/bench/gpu_check.py): its CPU self-test runs every check on tiny models and writes the
report; a check that disagrees with the float32 CPU reference fails it."""
from __future__ import annotations

import json

import pytest
import torch

from mdt.bench import gpu_check


@pytest.mark.slow
def test_cpu_self_test_runs_every_check(tmp_path, capsys):
    rc = gpu_check.main(["--out", str(tmp_path), "--size", "tiny", "--budget-s", "3600"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0, report["failed"]
    assert set(report["checks"]) == {"backends", "precision", "train_ss", "train_slat", "latency"}
    assert all(c["ok"] for c in report["checks"].values())
    back = report["checks"]["backends"]["rows"]
    assert {(r["op"], r["precision"]) for r in back} == {(op, p) for op in ("sparse conv 3x3x3", "varlen attention")
                                                         for p in ("fp32", "fp16", "bf16")}
    prec = report["checks"]["precision"]["rows"]
    assert len(prec) == 8 and all(0 < r["rel_error"] <= r["tolerance"] for r in prec)   # > 0: really cast
    for stage in ("ss", "slat"):
        step = report["checks"][f"train_{stage}"]
        assert step["per_gpu_batch"] == 8 and step["gradient_checkpointing"] and step["step_s"] > 0
    lat = report["checks"]["latency"]["seconds_total"]
    assert set(lat) == {"1", "2"} and all(v > 0 for v in lat.values())
    md = (tmp_path / "gpu_check.md").read_text()
    if not torch.cuda.is_available():
        assert "No CUDA device" in md and "no CUDA device" in capsys.readouterr().out


def test_a_backend_off_the_reference_fails_the_check(monkeypatch):
    from mdt.sparse import attention

    real = attention._sdpa_varlen

    def off(q, k, v, cu_q, cu_k):          # a kernel 2% off in half precision
        out = real(q, k, v, cu_q, cu_k)
        return out * 1.02 if q.dtype != torch.float32 else out

    monkeypatch.setattr(attention, "_sdpa_varlen", off)
    res = gpu_check.backend_parity("cpu", "tiny")
    bad = [r for r in res["rows"] if not r["ok"]]
    assert not res["ok"] and {(r["op"], r["precision"]) for r in bad} == {("varlen attention", "fp16")}


def test_full_size_without_cuda_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", str(tmp_path), "--size", "full"])
    assert e.value.code == 2
    assert not (tmp_path / "gpu_check.json").exists()
