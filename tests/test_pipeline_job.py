"""The preprocessing CLI: config handling and exit codes, kill-and-rerun (resume, retry of failures, no
duplicates, no partial shard), the report in MLflow, and `ray job submit` against a loopback head."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from _pipeline_helpers import (PROJECT_ROOT, S3_ENV, set_sleep_or_fail,
                               shared_ray_head)
from mdt.config import ConfigError, load_config, parse_override
from jobs.preprocess import main
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.ledger import Ledger
from pipelines.preprocess.shards import load_table, shard_files


def reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/report.json"))]


def job_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(PROJECT_ROOT / "jobs" / "preprocess.py"), "--preset", "ci", "--output", str(out),
            "--set", f"download.cache_uri={out.parent / 'cache'}", *extra]


def job_env(**extra) -> dict:
    return {**os.environ, **S3_ENV, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


# --------------------------------------------------------------------------------------- config / CLI


def test_config_loader_overrides_and_errors(tmp_path):
    cfg = load_config(PreprocessConfig, "ci", ["write.rows_per_shard=7", "resources.render.num_gpus=0.5",
                                               "sources.specs=[synthetic:2, 'local:/x']", "filter.min_aesthetic=null"],
                      prefix="preprocess_")
    assert cfg.write.rows_per_shard == 7 and cfg.resources["render"].num_gpus == 0.5
    assert cfg.resources["download"].num_cpus == 0.25  # from the preset, merged with defaults
    assert cfg.sources.specs == ["synthetic:2", "local:/x"] and cfg.stages == ["download", "stand_in"]
    assert parse_override("a.b=s3://x/y") == ("a.b", "s3://x/y")
    (tmp_path / "child.yaml").write_text("base: ci\nwrite: {rows_per_shard: 3}\n")
    child = load_config(PreprocessConfig, str(tmp_path / "child.yaml"), [], prefix="preprocess_")
    assert child.write.rows_per_shard == 3 and child.stages == ["download", "stand_in"]
    with pytest.raises(ConfigError, match="did you mean rows_per_shard"):
        load_config(PreprocessConfig, None, ["write.rows_per_shrd=1"])
    with pytest.raises(ConfigError, match="expected an int"):
        load_config(PreprocessConfig, None, ["write.rows_per_shard=many"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(PreprocessConfig, "nope", [], prefix="preprocess_")


def test_cli_exit_codes(tmp_path, capsys):
    assert main(["--preset", "nope"]) == 2
    assert main(["--preset", "ci", "--set", "write.bogus=1"]) == 2
    assert main(["--preset", "trellis", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "num_views: 150" in printed and "image_size: 518" in printed and "num_views: 24" in printed
    from jobs.preprocess import build_config, parse_args

    c = build_config(parse_args(["--preset", "ci", "--source", "synthetic:2", "--source", "local:/a b",
                                 "--output", "s3://b/p", "--retry-failed"]))
    assert c.sources.specs == ["synthetic:2", "local:/a b"] and c.output == "s3://b/p" and c.resume.retry_failed
    # a source that does not exist is an input error: exit 2, before anything is started
    assert main(["--preset", "ci", "--source", f"local:{tmp_path}/missing", "--output", str(tmp_path / "o")]) == 2


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_run_where_every_asset_fails_exits_1(tmp_path):
    """Nothing succeeded: the report and ledger are written, and the job says so with exit 1 (not 0)."""
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "not_a_mesh.glb").write_bytes(b"this is a text file, not a mesh\n" * 8)
    (assets / "half_a_header.glb").write_bytes(b"glTF\x02\x00\x00\x00")
    out = tmp_path / "out"
    r = subprocess.run(job_cmd(out, "--source", f"local:{assets}"), env=job_env(), cwd=PROJECT_ROOT,
                       capture_output=True, text=True, timeout=280)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    (rep,) = reports(out)
    assert (rep["processed"], rep["done"], rep["failed"]) == (2, 0, 2), rep
    (chash,) = [p.name for p in (out / "ledger").iterdir()]
    assert "preprocess: 0 of 2 assets succeeded (2 failed)" in r.stderr
    assert str(out / "ledger" / chash) in r.stderr.strip().splitlines()[-1]


def test_mlflow_report_logging(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from pipelines.preprocess.report import log_mlflow

    cfg = load_config(PreprocessConfig, None, [f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
                                               f"mlflow.artifact_location={tmp_path}/art"])
    from types import SimpleNamespace

    from pipelines.preprocess.report import build_report, to_markdown

    t = lambda **kw: json.dumps(kw)  # noqa: E731
    summaries = [
        {"status": "done", "stage": "write", "reason": None, "timings": t(download=0.1, render=2.0, write=0.01)},
        {"status": "done", "stage": "write", "reason": None, "timings": t(download=0.3, render=4.0, write=0.01)},
        {"status": "failed", "stage": "render", "reason": "blender timed out after 600 s",
         "timings": t(download=0.2, render=600.0)},
        {"status": "failed", "stage": "download", "reason": "sha256 mismatch: expected 0123456789ab…, got 9876543210ab…",
         "timings": t(download=0.2)},
    ]
    result = SimpleNamespace(run_id="r1", config_hash="h", output="o", listed=5, skipped_done=1, skipped_failed=0,
                             summaries=summaries, wall_s=36.0, manifest={"counts": {"done": 3}}, listing={})
    cfg.report.eta_assets = [500000]
    cfg.stages = ["download", "render"]
    rep = build_report(cfg, result)
    assert rep["stages"]["download"]["done"] == 3 and rep["stages"]["download"]["failed"] == 1
    assert rep["stages"]["render"]["done"] == 2 and rep["stages"]["render"]["mean_s"] == pytest.approx(3.0)
    assert rep["assets_per_hour"] == pytest.approx(400.0) and rep["done_per_hour"] == pytest.approx(200.0)
    assert rep["eta"]["500000"]["observed_hours"] == pytest.approx(2500.0)
    assert rep["bottleneck"]["stage"] == "render"
    assert {"stage": "download", "reason": "sha256 mismatch: expected <hash>, got <hash>", "count": 1} in \
        rep["failure_reasons"]
    assert "| render | 2 | 1 |" in to_markdown(rep)
    assert log_mlflow(cfg, rep, {"output": "o"})
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["preprocess"])
    assert runs.loc[0, "metrics.done"] == 2 and runs.loc[0, "metrics.eta_hours.500000"] == pytest.approx(2500.0)
    assert (tmp_path / "art").exists()


# --------------------------------------------------------------------------------------- kill and rerun


@pytest.mark.ray
@pytest.mark.timeout(420)
@pytest.mark.slow
def test_kill_and_rerun(tmp_path):
    """Kill the job mid-run; rerun: finished assets are not redone, no duplicate rows, no partial shard;
    a failed asset does not stop the job and is skipped on rerun unless --retry-failed is given."""
    head = shared_ray_head()
    out = tmp_path / "out"
    n = 10
    common = ["--source", f"synthetic:{n}", "--set", f"ray.address={head.address}",
              "--set", "stages=[download, tests._pipeline_helpers:SleepOrFail, stand_in]", "--set", "write.rows_per_shard=2"]
    # run 1: ~1 asset/s through the sleep stage, killed (SIGKILL, whole process group) after the first commits
    log1 = open(tmp_path / "run1.log", "w")
    set_sleep_or_fail(out, sleep_s=1.0)
    p = subprocess.Popen(job_cmd(out, *common), env=job_env(), cwd=PROJECT_ROOT,
                         stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    ledger_dir = out / "ledger"
    t0 = time.time()
    committed = set()
    try:
        while time.time() - t0 < 120:
            assert p.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            files = list(ledger_dir.glob("*/batch-*.parquet"))
            if files:
                chash = files[0].parent.name
                committed = Ledger(str(out), chash).state().done_ids
                if len(committed) >= 2:
                    break
            time.sleep(0.2)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        log1.close()
    assert len(committed) >= 2, (tmp_path / "run1.log").read_text()[-3000:]
    # The driver is dead; Ray stops the job's actors shortly after (a batch in flight may still commit).
    # Wait until the ledger is quiet, then take what is committed.
    last, quiet_since = None, time.time()
    while time.time() - quiet_since < 4:
        now = sorted(x.name for x in ledger_dir.glob("*/*.parquet"))
        if now != last:
            last, quiet_since = now, time.time()
        time.sleep(0.3)
    committed = Ledger(str(out), chash).state().done_ids
    assert 2 <= len(committed) < n, "the job was not killed mid-run"
    # What a reader sees after the kill: only complete, committed shards
    visible = shard_files(str(out))
    assert visible and all(pq.read_metadata(f).num_rows > 0 for f in visible)
    assert load_table(str(out)).num_rows == len(committed)

    # run 2: resumes; one asset fails (injected) -> still exit 0
    set_sleep_or_fail(out, sleep_s=0, fail="synthetic-5")
    r2 = subprocess.run(job_cmd(out, *common), env=job_env(),
                        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=180)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    rep2 = reports(out)[-1]
    assert rep2["skipped_already_done"] == len(committed)
    assert rep2["processed"] == n - len(committed)
    assert rep2["failed"] == (0 if "synthetic\x1fsynthetic-5" in committed else 1)
    t = load_table(str(out))
    ids = t["file_identifier"].to_pylist()
    assert len(ids) == len(set(ids)) == n - rep2["failed"]
    assert len(set(t["sha256"].to_pylist())) == len(ids)
    # orphans of the killed run are gone; every remaining shard file is listed in the manifest
    man = json.loads((out / "manifest.json").read_text())
    on_disk = sorted(x.name for x in (out / "shards" / man["config_hash"]).iterdir())
    assert on_disk == man["shards"]
    if rep2["failed"]:
        assert rep2["failure_reasons"][0]["reason"] == "RuntimeError: injected failure for synthetic-5"
        assert rep2["stages"]["test_hook"]["failed"] == 1
    # what a third run would do, without and with --retry-failed (plan only: no Ray)
    from pipelines.preprocess.driver import plan

    cfg = load_config(PreprocessConfig, "ci", [f"output={out}", f"sources.specs=[synthetic:{n}]",
                                               "stages=[download, tests._pipeline_helpers:SleepOrFail, stand_in]",
                                               "write.rows_per_shard=2"], prefix="preprocess_")
    p3 = plan(cfg)
    assert (len(p3.todo), p3.skipped_done, p3.skipped_failed) == (0, n - rep2["failed"], rep2["failed"])
    cfg.resume.retry_failed = True
    assert [r["file_identifier"] for r in plan(cfg).todo] == (["synthetic-5"] if rep2["failed"] else [])


def test_failed_assets_are_skipped_without_retry_flag(tmp_path):
    """Resume filter alone (no Ray needed): failed records are skipped unless retry_failed is set."""
    from pipelines.preprocess.driver import run

    out = tmp_path / "o"
    cfg = load_config(PreprocessConfig, "ci", [f"output={out}", "sources.specs=[synthetic:2]"], prefix="preprocess_")
    from pipelines.preprocess.config import config_hash

    led = Ledger(str(out), config_hash(cfg))
    led.write([{"sha256": None, "source": "synthetic", "file_identifier": "synthetic-0", "stage": "render",
                "status": "failed", "reason": "boom"},
               {"sha256": None, "source": "synthetic", "file_identifier": "synthetic-1", "stage": "write",
                "status": "done", "shard": "p.parquet"}])
    res = run(cfg)  # nothing to do: no Ray is started
    assert (res.skipped_done, res.skipped_failed, res.report["processed"]) == (1, 1, 0)
