"""Distillation / training job on Ray Train: TRELLIS teacher -> few-step student (MDT-dist, VM, CM, PCM, sCM) or
flow-matching training of a teacher, on the preprocessing job's shards, tracked in MLflow.

    python jobs/distill.py --preset demo --data outputs/preprocess-demo --objective flow_matching
    python jobs/distill.py --preset ci --data outputs/preprocess-ci --teacher outputs/teacher/export/ss_flow_student
    python jobs/distill.py --preset trellis-ss --data s3://bucket/trellis --set scaling.num_workers=8
    ray job submit --address http://127.0.0.1:8265 -- python jobs/distill.py --preset ci --data ...

Re-running with the same `--name` and `--output` resumes from the last checkpoint and logs into the same MLflow
run. Exit status: 0 done; 2 bad preset/override/argument; 1 the run failed.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python jobs/distill.py` and `ray job submit`
    sys.path.insert(0, str(ROOT))

from mdt.config import ConfigError, add_config_args, dump_yaml, load_config, to_dict  # noqa: E402

log = logging.getLogger("distill")

SHARD_COLUMNS = {"ss": ["sha256", "num_voxels", "ss_latent", "cond_images"],
                 "slat": ["sha256", "num_voxels", "slat_coords", "slat_feats", "cond_images"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default_preset="demo")
    p.add_argument("--data", help="preprocessing output (dir, manifest.json or s3:// prefix)")
    p.add_argument("--teacher", help="teacher checkpoint: <dir>/<stem> or <hf_repo>/ckpts/<stem>")
    p.add_argument("--student", help="student init checkpoint (default: a copy of the teacher)")
    p.add_argument("--objective", help="flow_matching | mdt | vm | cm | pcm | scm")
    p.add_argument("--stage", choices=["ss", "slat"])
    p.add_argument("--output", help="storage path for checkpoints and exports (local dir or s3://)")
    p.add_argument("--name", help="run name (re-running the same name resumes)")
    p.add_argument("--steps", type=int, help="train.max_steps")
    p.add_argument("--bench", action="store_true",
                   help="benchmark instead of training: one step (teacher/student forwards, backward, total), then "
                        "samples/s of short Ray Train runs with each of --bench-workers")
    p.add_argument("--bench-workers", default="1,2", help="worker counts of the throughput comparison")
    p.add_argument("--bench-steps", type=int, default=30, help="steps of each throughput run")
    return p.parse_args(argv)


def _q(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def build_config(args: argparse.Namespace):
    from mdt.training.config import DistillConfig

    ov = list(args.overrides)
    for flag, key in (("data", "data.uri"), ("teacher", "model.teacher"), ("student", "model.student"),
                      ("objective", "objective.name"), ("stage", "stage"), ("output", "output"), ("name", "name")):
        v = getattr(args, flag)
        if v is not None:
            ov.append(f"{key}={_q(v)}")
    if args.steps is not None:
        ov.append(f"train.max_steps={args.steps}")
    return load_config(DistillConfig, args.preset, ov, prefix="distill_").validate()


# ------------------------------------------------------------------------------------------------------ run


@dataclass
class DistillResult:  # noqa: D101 (fields documented inline)
    name: str
    run_dir: str
    checkpoint: str | None       # path of the last checkpoint
    export_dir: str | None       # <checkpoint>/export (student/ and ema/ TRELLIS checkpoints)
    mlflow_run_id: str | None
    tracking_uri: str | None
    wall_s: float
    error: str | None = None
    metrics: dict | None = None  # the last ray.train.report of rank 0 (step, loss, samples_per_s, ...)


def abs_uri(p: str) -> str:
    return p if "://" in p else str(Path(p).expanduser().resolve())


def init_ray(cfg) -> bool:
    """Connect to `ray.address` / $RAY_ADDRESS, or start a private local instance (never join a cluster that
    merely happens to run on this machine)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # A private instance for this process only: without this, Ray 2.60 turns token authentication on and
        # writes ~/.ray/auth_token, which then changes every later `ray start` on the machine.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                 log_to_driver=True)
    return True


def _local_abs(p: str | None, create_ok: bool = False) -> str | None:
    """A relative local path -> absolute (Ray Train workers run in another working directory); hub ids
    (`org/repo/ckpts/stem`, not present locally) and URIs stay as they are."""
    if not p or "://" in p or os.path.isabs(p):
        return p
    q = Path(p)
    if create_ok or q.exists() or Path(p + ".json").exists() or Path(p + ".safetensors").exists():
        return str(q.resolve())
    return p


def absolute_paths(cfg):
    """Resolve the local checkpoint / data paths of a config against the driver's working directory."""
    cfg.data.uri = _local_abs(cfg.data.uri)
    cfg.model.teacher = _local_abs(cfg.model.teacher)
    cfg.model.student = _local_abs(cfg.model.student)
    cfg.condition.model = _local_abs(cfg.condition.model, create_ok=cfg.condition.tiny)
    cfg.snapshot.decoder = _local_abs(cfg.snapshot.decoder)
    return cfg


def load_dataset(cfg):
    """Ray Dataset of the committed shards (max-voxels and aesthetic filters applied), SLat statistics, and the
    first rows (snapshot conditions)."""
    from pipelines import shards
    from pipelines.config import StorageConfig

    storage = StorageConfig(s3_endpoint_url=cfg.data.storage_s3_endpoint_url)
    uri = cfg.data.uri
    ds = shards.read_shards(uri, storage_cfg=storage, max_voxels=cfg.data.max_voxels,
                            min_aesthetic=cfg.data.min_aesthetic, columns=SHARD_COLUMNS[cfg.stage])
    stats = None
    if cfg.stage == "slat":
        man = shards.read_manifest(uri, storage)
        stats = man.get("slat_normalization")
        if not stats:
            raise ValueError(f"{uri}: the manifest has no slat_normalization statistics")
    return ds, stats


def first_rows(cfg, n: int) -> list[dict]:
    """The first `n` assets of the dataset (fixed snapshot conditions), read directly from the first shards."""
    import io

    import pyarrow.parquet as pq

    from pipelines import shards, storage
    from pipelines.config import StorageConfig

    st = StorageConfig(s3_endpoint_url=cfg.data.storage_s3_endpoint_url)
    rows: list[dict] = []
    for f in shards.shard_files(cfg.data.uri, st):
        t = pq.read_table(io.BytesIO(storage.read_bytes(f, st)), columns=SHARD_COLUMNS[cfg.stage])
        for r in t.to_pylist():
            if cfg.data.max_voxels is None or r["num_voxels"] <= cfg.data.max_voxels:
                rows.append(r)
            if len(rows) >= n:
                return rows
    return rows


def make_collate(cfg, stats):
    from pipelines import shards

    return functools.partial(shards.collate, kind=cfg.stage, stats=stats, max_voxels=cfg.data.max_voxels,
                             cond_view=cfg.data.cond_view, image_size=cfg.condition.image_size)


def setup_mlflow(cfg, run_dir: str, resolved: dict) -> dict | None:
    if not cfg.mlflow.enabled:
        return None
    from mdt.training import tracking

    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    run_id, resumed = tracking.start_or_resume_run(
        uri, cfg.mlflow.experiment, run_dir, cfg.mlflow.run_name or cfg.name,
        tags={"objective": cfg.objective.name, "stage": cfg.stage, "job": "jobs/distill.py"})
    c = tracking.client(uri)
    tracking.log_params(c, run_id, tracking.flatten(resolved))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / ("resolved.yaml" if not resumed else f"resolved-resume-{int(time.time())}.yaml")
        p.write_text(dump_yaml(resolved))
        c.log_artifact(run_id, str(p), "config")
    log.info("MLflow: %s run %s (%s)", uri, run_id, "resumed" if resumed else "new")
    return {"tracking_uri": uri, "run_id": run_id}


def run(cfg, resolved: dict | None = None) -> DistillResult:
    """Build everything and run the TorchTrainer to `train.max_steps` (resuming when the run exists)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from mdt.training.build import ensure_tiny_conditioner
    from mdt.training.loop import train_loop_per_worker

    t0 = time.time()
    cfg = absolute_paths(cfg)
    resolved = resolved if resolved is not None else to_dict(cfg)
    storage = abs_uri(cfg.output)
    run_dir = f"{storage.rstrip('/')}/{cfg.name}"
    init_ray(cfg)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    ensure_tiny_conditioner(cfg.condition)
    ds, stats = load_dataset(cfg)
    collate = make_collate(cfg, stats)
    snapshot_rows = first_rows(cfg, cfg.snapshot.num_conditions) if cfg.snapshot.num_conditions > 0 else None
    tracking = setup_mlflow(cfg, run_dir, resolved)

    sc = cfg.scaling
    backend = sc.backend if sc.backend != "auto" else ("nccl" if sc.use_gpu else "gloo")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "collate": collate, "run_dir": run_dir, "mlflow": tracking,
                           "snapshot_rows": snapshot_rows},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker={"CPU": sc.cpus_per_worker},
                                               placement_strategy=sc.placement_strategy),
        run_config=ray.train.RunConfig(name=cfg.name, storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(
                                           num_to_keep=cfg.train.keep_checkpoints)),
        datasets={"train": ds},
    )
    error = None
    try:
        result = trainer.fit()
        ckpt = result.checkpoint.path if result.checkpoint is not None else None
        error = str(result.error) if getattr(result, "error", None) else None
        metrics = dict(result.metrics or {})
    except Exception as e:  # TrainingFailedError after max_failures
        log.exception("training failed")
        ckpt, error, metrics = None, f"{type(e).__name__}: {e}", None
    if tracking:
        from mdt.training import tracking as tr

        tr.client(tracking["tracking_uri"]).set_terminated(tracking["run_id"], "FAILED" if error else "FINISHED")
    export = None
    if ckpt and Path(ckpt, "export").exists():
        export = str(Path(ckpt, "export"))
    res = DistillResult(cfg.name, run_dir, ckpt, export, (tracking or {}).get("run_id"),
                        (tracking or {}).get("tracking_uri"), time.time() - t0, error, metrics)
    if "://" not in run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        Path(run_dir, "result.json").write_text(json.dumps(res.__dict__, indent=2))
        Path(run_dir, "resolved_config.yaml").write_text(dump_yaml(resolved))
    return res


def bench(cfg, workers: list[int], steps: int) -> dict:
    """One-step breakdown (no Ray) and samples/s of short Ray Train runs with each worker count."""
    import dataclasses

    from mdt.training.bench import bench_step, format_step

    step = bench_step(cfg, threads=max(1, int(cfg.train.torch_threads or cfg.scaling.cpus_per_worker)))
    print(format_step(step), flush=True)
    import shutil
    import tempfile

    runs = []
    cores = os.cpu_count() or 1
    scratch = tempfile.mkdtemp(prefix="mdt-distill-bench-")   # throw-away checkpoints of the throughput runs
    for n in workers:
        threads = max(1, cores // n)
        c = dataclasses.replace(
            cfg, name=f"{cfg.name}-bench-{n}w", output=scratch,
            train=dataclasses.replace(cfg.train, max_steps=steps, ckpt_every=0, log_every=max(1, steps // 3),
                                      export=False, torch_threads=threads),
            scaling=dataclasses.replace(cfg.scaling, num_workers=n, cpus_per_worker=min(cfg.scaling.cpus_per_worker,
                                                                                         max(0.25, (cores - 0.5) / n))),
            snapshot=dataclasses.replace(cfg.snapshot, every=0, num_conditions=0),
            mlflow=dataclasses.replace(cfg.mlflow, enabled=False))
        r = run(c)
        sps = (r.metrics or {}).get("samples_per_s")
        runs.append({"workers": n, "threads_per_worker": threads, "batch_per_worker": cfg.data.batch_size,
                     "steps": steps, "samples_per_s": sps, "wall_s": round(r.wall_s, 1), "error": r.error})
        print(f"{n} worker(s) x {threads} thread(s), batch {cfg.data.batch_size}/worker, {steps} steps: "
              f"{sps if sps is None else round(sps, 2)} samples/s (wall {r.wall_s:.0f} s)", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    base = next((r for r in runs if r["samples_per_s"]), None)
    print("\nthroughput (measured in this one run, same machine, same data):")
    print(f"  {'workers':>7} {'threads/worker':>14} {'samples/s':>10} {'vs ' + str(base['workers']) + ' worker(s)' if base else '':>16}")
    for r in runs:
        ratio = (r["samples_per_s"] / base["samples_per_s"]) if (base and r["samples_per_s"]) else None
        r["ratio_vs_first"] = ratio
        print(f"  {r['workers']:>7} {r['threads_per_worker']:>14} "
              f"{(r['samples_per_s'] or float('nan')):>10.2f} {('x%.2f' % ratio) if ratio else '-':>16}")
    return {"step": step, "throughput": runs}


def main(argv=None) -> int:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = parse_args(argv)
    try:
        cfg = build_config(args)
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    cfg = absolute_paths(cfg)
    resolved = to_dict(cfg)
    print("# resolved config\n" + dump_yaml(cfg), flush=True)
    if args.print_config:
        return 0
    if args.bench:
        out = bench(cfg, [int(w) for w in args.bench_workers.split(",") if w.strip()], args.bench_steps)
        print(json.dumps(out, indent=2), flush=True)
        return 0
    res = run(cfg, resolved)
    print(json.dumps(res.__dict__, indent=2), flush=True)
    if res.tracking_uri:
        print(f"MLflow: mlflow ui --backend-store-uri {res.tracking_uri}  (run {res.mlflow_run_id})", flush=True)
    return 1 if res.error else 0


if __name__ == "__main__":
    sys.exit(main())
