"""End-of-run report: counts per stage, failure reasons, time per asset per stage, throughput, ETA, and the
coverage table (per format and encoding: assets done, failed per reason).

Printed, saved as ``<output>/runs/<run_id>/report.{json,md}`` (with the resolved ``config.yaml``), and logged to
MLflow when a tracking URI is configured (``mlflow.tracking_uri`` or ``$MLFLOW_TRACKING_URI``).
"""
from __future__ import annotations

import json
import logging
import os
import re
import statistics
from collections import Counter

from pipelines.common import storage
from pipelines.preprocess.config import PreprocessConfig, join_uri
from pipelines.preprocess.stages import stage_resources
import yaml

log = logging.getLogger(__name__)

_HEX = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{12,}\b…?")


def normalise_reason(reason: str | None) -> str:
    """Group similar reasons: content hashes (hex with letters and digits, 12+ characters) become <hash>;
    numbers (sizes, limits, counts) stay readable."""
    return _HEX.sub("<hash>", reason or "")[:200]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def coverage(summaries: list[dict]) -> dict[str, dict]:
    """Per ``<format>/<encoding>`` (``gltf/draco``, ``glb/plain``, ``obj/mtl`` …): how many assets were done,
    failed and skipped, and the failures per ``<stage>: <reason>`` (most frequent first)."""
    table: dict[str, dict] = {}
    for s in summaries:
        enc = s.get("encoding") or "unknown/unchecked"
        row = table.setdefault(enc, {"done": 0, "failed": 0, "skipped": 0, "reasons": Counter()})
        row[s["status"]] = row.get(s["status"], 0) + 1
        if s["status"] == "failed":
            row["reasons"][f"{s.get('stage')}: {normalise_reason(s.get('reason'))}"] += 1
    return {enc: {**r, "reasons": dict(r["reasons"].most_common())} for enc, r in sorted(table.items())}


def _concurrency(cfg: PreprocessConfig, stage: str) -> int:
    return stage_resources(cfg, stage).concurrency if stage in (*cfg.stages, "write") else 1


def build_report(cfg: PreprocessConfig, result) -> dict:
    summaries = result.summaries
    stages = list(cfg.stages) + ["write"]
    per_stage = {s: {"done": 0, "failed": 0, "skipped": 0, "seconds": []} for s in stages}
    reasons: Counter = Counter()
    status = Counter()
    for s in summaries:
        status[s["status"]] += 1
        t = json.loads(s["timings"] or "{}")
        bad = s["stage"] if s["status"] != "done" else None
        for stage, sec in t.items():
            ps = per_stage.setdefault(stage, {"done": 0, "failed": 0, "skipped": 0, "seconds": []})
            if stage != bad:
                ps["done"] += 1
                ps["seconds"].append(float(sec))
        if bad:
            ps = per_stage.setdefault(bad, {"done": 0, "failed": 0, "skipped": 0, "seconds": []})
            ps[s["status"]] += 1
            if s["status"] == "failed":
                reasons[(bad, normalise_reason(s["reason"]))] += 1
    stage_rows = {}
    for stage, ps in per_stage.items():
        secs = ps.pop("seconds")
        stage_rows[stage] = {
            **ps,
            "mean_s": statistics.fmean(secs) if secs else None,
            "median_s": statistics.median(secs) if secs else None,
            "p90_s": _pct(secs, 0.9) if secs else None,
            "concurrency": _concurrency(cfg, stage),
        }
    wall_h = max(result.wall_s, 1e-9) / 3600
    processed = len(summaries)
    done = status["done"]
    done_per_h = done / wall_h if processed else None
    # Pipelined bound: the slowest stage (mean time / actors) limits the steady-state throughput.
    bottleneck = None
    for stage, r in stage_rows.items():
        if r["mean_s"]:
            per_asset = r["mean_s"] / max(1, r["concurrency"])
            if bottleneck is None or per_asset > bottleneck[1]:
                bottleneck = (stage, per_asset)
    eta = {}
    for n in cfg.report.eta_assets:
        eta[str(n)] = {
            "observed_hours": (n / done_per_h) if done_per_h else None,
            "bottleneck_hours": (n * bottleneck[1] / 3600) if bottleneck else None,
        }
    man = result.manifest or {}
    return {
        "run_id": result.run_id,
        "config_hash": result.config_hash,
        "output": result.output,
        "listed": result.listed,
        "skipped_already_done": result.skipped_done,
        "skipped_failed_before": result.skipped_failed,
        "processed": processed,
        "done": done,
        "failed": status["failed"],
        "skipped": status["skipped"],
        "wall_s": result.wall_s,
        "assets_per_hour": (processed / wall_h) if processed else None,
        "done_per_hour": done_per_h,
        "stages": stage_rows,
        "bottleneck": {"stage": bottleneck[0], "seconds_per_asset": bottleneck[1]} if bottleneck else None,
        "failure_reasons": [{"stage": st, "reason": r, "count": c}
                            for (st, r), c in reasons.most_common(cfg.report.top_reasons)],
        "coverage": coverage(summaries),
        "eta": eta,
        "dataset_total": man.get("counts"),
        "bytes_per_asset": (man.get("bytes") or {}).get("per_asset_in_shards"),
        "listing": result.listing,
        # per asset: the render sandbox it ran in (namespace / userns / none) or the job's rule if it never did
        "sandbox": dict(Counter(s.get("sandbox") or "unknown" for s in summaries)),
    }


def _fmt(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def to_markdown(rep: dict) -> str:
    lines = [f"# Preprocessing run {rep.get('run_id')} (config {rep.get('config_hash')})", "",
             f"- output: {rep.get('output')}",
             f"- listed {rep.get('listed')}, already done {rep.get('skipped_already_done')}, failed before "
             f"{rep.get('skipped_failed_before')} (skipped)",
             f"- processed {rep.get('processed')}: done {rep.get('done')}, failed {rep.get('failed')}, skipped {rep.get('skipped')}",
             f"- wall {_fmt(rep.get('wall_s'), 1)} s, {_fmt(rep.get('assets_per_hour'), 1)} assets/h "
             f"({_fmt(rep.get('done_per_hour'), 1)} done/h)",
             f"- dataset total: {rep.get('dataset_total')}, bytes/asset in shards: {_fmt(rep.get('bytes_per_asset'), 0)}",
             f"- render sandbox per asset: {rep.get('sandbox')}",
             "", "| stage | done | failed | skipped | mean s | median s | p90 s | actors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for st, r in (rep.get("stages") or {}).items():
        lines.append(f"| {st} | {r.get('done')} | {r.get('failed')} | {r.get('skipped')} | {_fmt(r.get('mean_s'))} | "
                     f"{_fmt(r.get('median_s'))} | {_fmt(r.get('p90_s'))} | {r.get('concurrency')} |")
    if rep.get("failure_reasons"):
        lines += ["", "| failed at | reason | count |", "|---|---|---:|"]
        for f in rep["failure_reasons"]:
            lines.append(f"| {f['stage']} | {f['reason']} | {f['count']} |")
    if rep.get("coverage"):
        lines += ["", "| format/encoding | done | failed | skipped | failed for |", "|---|---:|---:|---:|---|"]
        for enc, r in rep["coverage"].items():
            why = "; ".join(f"{reason} ({n})" for reason, n in r["reasons"].items()) or "-"
            lines.append(f"| {enc} | {r['done']} | {r['failed']} | {r['skipped']} | {why} |")
    if rep.get("eta"):
        lines += ["", "| ETA for N assets | observed rate (h) | bottleneck bound (h) |", "|---:|---:|---:|"]
        for n, e in rep["eta"].items():
            lines.append(f"| {n} | {_fmt(e['observed_hours'], 2)} | {_fmt(e['bottleneck_hours'], 2)} |")
    if rep.get("bottleneck"):
        lines.append(f"\nbottleneck stage: {rep.get('bottleneck')['stage']} "
                     f"({rep.get('bottleneck')['seconds_per_asset']:.3f} s/asset with its actors)")
    return "\n".join(lines) + "\n"


def save_report(cfg: PreprocessConfig, result, resolved_config: dict | None = None) -> str:
    d = join_uri(cfg.output, "runs", result.run_id)
    rep = result.report
    storage.write_bytes_atomic(join_uri(d, "report.json"), json.dumps(rep, indent=2, default=str).encode(),
                               cfg.storage)
    storage.write_bytes_atomic(join_uri(d, "report.md"), to_markdown(rep).encode(), cfg.storage)
    if resolved_config is not None:
        storage.write_bytes_atomic(join_uri(d, "config.yaml"),
                                   yaml.safe_dump(resolved_config, sort_keys=False).encode(), cfg.storage)
    log_mlflow(cfg, rep, resolved_config)
    return d


def flat_metrics(rep: dict) -> dict[str, float]:
    m = {}
    for k in ("listed", "processed", "done", "failed", "skipped", "skipped_already_done", "wall_s",
              "assets_per_hour", "done_per_hour", "bytes_per_asset"):
        if isinstance(rep.get(k), (int, float)):
            m[k] = float(rep[k])
    for st, r in (rep.get("stages") or {}).items():
        for k in ("done", "failed", "mean_s", "p90_s"):
            if isinstance(r.get(k), (int, float)):
                m[f"stage.{st}.{k}"] = float(r[k])
    for enc, r in (rep.get("coverage") or {}).items():
        for k in ("done", "failed"):
            m[f"coverage.{enc.replace('+', '_')}.{k}"] = float(r[k])
    for n, e in (rep.get("eta") or {}).items():
        if e["observed_hours"] is not None:
            m[f"eta_hours.{n}"] = float(e["observed_hours"])
    return m


def log_mlflow(cfg: PreprocessConfig, rep: dict, resolved_config: dict | None) -> bool:
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return False
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow  # optional: mlflow

        mlflow.set_tracking_uri(uri)
        if cfg.mlflow.artifact_location and mlflow.get_experiment_by_name(cfg.mlflow.experiment) is None:
            mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=cfg.mlflow.artifact_location)
        mlflow.set_experiment(cfg.mlflow.experiment)
        with mlflow.start_run(run_name=cfg.mlflow.run_name or f"preprocess-{rep['run_id']}"):
            mlflow.set_tags({"job": "preprocess", "run_id": rep["run_id"], "config_hash": rep["config_hash"],
                             "output": rep["output"]})
            mlflow.log_metrics(flat_metrics(rep))
            mlflow.log_dict(rep, "report.json")
            mlflow.log_text(to_markdown(rep), "report.md")
            if resolved_config is not None:
                mlflow.log_dict(resolved_config, "config.yaml")
        return True
    except Exception as e:  # reporting must never turn a finished job into a failed one
        log.warning("MLflow logging failed (%s): %s", uri, e)
        return False
