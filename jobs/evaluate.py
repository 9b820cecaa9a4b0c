"""Evaluation job: teacher and student samplers on a split of preprocessing shards -> FD_incep, FD_dinov2,
Chamfer / F-score / voxel IoU, NFE and warm latency per sampler (a Table-2-style Markdown table, results.json,
plots and previews, all logged to one MLflow run). With the SLat models (--slat-decoder and the SLat flows) each
sampler runs the whole chain and the decoded Gaussian assets are measured against the ground-truth assets.

    python jobs/evaluate.py --preset ci --data outputs/pre --teacher T --student S --decoder D --output outputs/eval
    python jobs/evaluate.py --preset ci --data outputs/pre --teacher T --student S --decoder D \\
        --slat-teacher ST --slat-student SS --slat-decoder GS --output outputs/eval-assets
    ray job submit --working-dir . -- python jobs/evaluate.py --preset trellis --data s3://bucket/toys4k \\
        --teacher JeffreyXiang/TRELLIS-image-large/ckpts/ss_flow_img_dit_L_16l8_fp16 --student s3://.../ss_student \\
        --slat-student s3://.../slat_student --distill-run <mlflow run id>   # SLat teacher, decoders: the preset

Exit status: 0 when every sampler was evaluated; 2 for a bad preset/override/argument (before anything starts);
1 when the evaluation could not run (no shards, no asset in the split, a model that does not load...).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python jobs/evaluate.py` and `ray job submit --working-dir .`
    sys.path.insert(0, str(ROOT))

from mdt.config import ConfigError, add_config_args, dump_yaml  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default_preset="demo")
    p.add_argument("--data", help="preprocessing output (shards) to evaluate on: data.uri")
    p.add_argument("--teacher", help="SS flow teacher checkpoint: models.teacher")
    p.add_argument("--student", help="distilled SS student checkpoint: models.student")
    p.add_argument("--decoder", help="SS decoder or occupancy probe: models.ss_decoder")
    p.add_argument("--slat-teacher", help="SLat flow teacher checkpoint: models.slat_teacher")
    p.add_argument("--slat-student", help="distilled SLat student checkpoint: models.slat_student")
    p.add_argument("--slat-decoder", help="SLat Gaussian decoder (evaluates the whole chain): models.slat_decoder")
    p.add_argument("--output", help="output directory (results under <output>/<name>/)")
    p.add_argument("--distill-run", help="MLflow run id of the distillation run evaluated (linked by a tag)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    from pipelines.evaluate.driver import make_config  # heavy: PIL, numpy

    return make_config(args.preset, data=args.data, teacher=args.teacher, student=args.student,
                       decoder=args.decoder, output=args.output, distill_run_id=args.distill_run,
                       slat_teacher=args.slat_teacher, slat_student=args.slat_student,
                       slat_decoder=args.slat_decoder, overrides=args.overrides)


def main(argv=None) -> int:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from pipelines.evaluate import driver as evaluate  # heavy: PIL, numpy

    try:
        cfg = build_config(args)
        if not args.print_config:
            evaluate.prepare(cfg)  # before Ray: config, output, shards, checkpoints; local paths absolute
    except (ConfigError, ValueError) as e:
        print(f"argument error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print("# resolved config\n" + dump_yaml(cfg), flush=True)
    if args.print_config:
        return 0

    try:
        result = evaluate.run(cfg)
    except Exception as e:
        logging.getLogger("evaluate").debug("evaluation failed", exc_info=True)
        print(f"evaluation failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print((Path(result.run_dir) / "table.md").read_text(), flush=True)
    print(f"results: {result.run_dir}/results.json"
          + (f"\nMLflow run: {result.mlflow_run_id}" if result.mlflow_run_id else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
