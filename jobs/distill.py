"""Distillation / training job on Ray Train: TRELLIS teacher -> few-step student (MDT-dist, VM, CM, PCM, sCM) or
flow-matching training of a teacher, on the preprocessing job's shards, tracked in MLflow.

    python jobs/distill.py --preset ci --data outputs/preprocess-ci --objective flow_matching
    python jobs/distill.py --preset ci --data outputs/preprocess-ci \
        --teacher outputs/distill-ci/ss-flow_matching/export/ema/ss_flow_teacher
    python jobs/distill.py --preset trellis-ss --data s3://bucket/trellis --set scaling.num_workers=8
    python jobs/distill.py --preset demo --data outputs/preprocess-demo --teacher T --bench

With `--set eval.enabled=true --set eval.decoder=D` (`eval.*`), the exported student is evaluated after training
(`jobs/evaluate.py`'s graph, SS stage) and its table is logged onto the run's MLflow run.

The run name defaults to `<stage>-<objective>`; re-running the same `--name` and `--output` resumes from the last
checkpoint and logs into the same MLflow run (a different objective, stage, teacher or model under that name is
refused). Exit status: 0 done; 2 bad preset/override/argument (before anything starts); 1 the run failed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python jobs/distill.py` and `ray job submit`
    sys.path.insert(0, str(ROOT))

from mdt.config import ConfigError, add_config_args, dump_yaml, load_config, to_dict  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default_preset="demo")
    p.add_argument("--data", help="preprocessing output (dir, manifest.json or s3:// prefix)")
    p.add_argument("--teacher", help="teacher checkpoint: <dir>/<stem> or <hf_repo>/ckpts/<stem>, e.g. a "
                   "flow-matching run's <output>/<name>/export/ema/ss_flow_teacher")
    p.add_argument("--student", help="student init checkpoint (default: a copy of the teacher)")
    p.add_argument("--shape-teacher", dest="shape_teacher",
                   help="TRELLIS.2 texture stage: the shape flow checkpoint whose samples condition the texture")
    p.add_argument("--objective", help="flow_matching | mdt | vm | cm | pcm | scm")
    p.add_argument("--stage", choices=["ss", "slat"])
    p.add_argument("--output", help="storage path for checkpoints and exports (local dir or s3://)")
    p.add_argument("--name", help="run name (default <stage>-<objective>; re-running the same name resumes)")
    p.add_argument("--steps", type=int, help="train.max_steps")
    p.add_argument("--bench", action="store_true",
                   help="benchmark instead of training: one step against the sum of its parts and against a naive "
                        "step of the same maths, then samples/s of short Ray Train runs with each of --bench-workers")
    p.add_argument("--bench-workers", default="1,2", help="worker counts of the throughput comparison")
    p.add_argument("--bench-steps", type=int, default=30, help="steps of each throughput run")
    p.add_argument("--bench-json", help="also write the benchmark's JSON to this file")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    from pipelines.distill.config import DistillJobConfig  # heavy: numpy, torch

    ov = list(args.overrides)
    for flag, key in (("data", "data.uri"), ("teacher", "model.teacher"), ("student", "model.student"),
                      ("shape_teacher", "model.shape_teacher"),
                      ("objective", "objective.name"), ("stage", "stage"), ("output", "output"), ("name", "name"),
                      ("steps", "train.max_steps")):
        if getattr(args, flag) is not None:
            ov.append((key, getattr(args, flag)))
    return load_config(DistillJobConfig, args.preset, ov, prefix="distill_").validate()


def main(argv=None) -> int:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = parse_args(argv)
    from pipelines.distill import driver as distill  # heavy: numpy, pyarrow

    try:
        cfg = build_config(args)
        if not args.print_config:
            cfg = distill.prepare(cfg)
    except (ConfigError, ValueError) as e:
        print(f"argument error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print("# resolved config\n" + dump_yaml(cfg), flush=True)
    if args.print_config:
        return 0
    try:
        if args.bench:
            out = distill.bench(cfg, [int(w) for w in args.bench_workers.split(",") if w.strip()], args.bench_steps)
            if args.bench_json:
                Path(args.bench_json).write_text(json.dumps(out, indent=2))
            print(json.dumps(out, indent=2), flush=True)
            return 0
        res = distill.run(cfg, to_dict(cfg))
    except distill.ArgumentError as e:  # found once Ray is up: the cluster cannot run the job
        print(f"argument error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res.__dict__, indent=2), flush=True)
    if res.eval_dir:
        print(Path(res.eval_dir, "table.md").read_text(), flush=True)
    if res.tracking_uri:
        print(f"MLflow: mlflow ui --backend-store-uri {res.tracking_uri}  (run {res.mlflow_run_id})", flush=True)
    if res.error:
        print(f"the run failed: {res.error.splitlines()[0]}", file=sys.stderr)
    return 1 if res.error else 0


if __name__ == "__main__":
    sys.exit(main())
