"""Synthesis job: condition images -> teacher-generated training shards (data-free distillation).

    python jobs/synthesize.py --preset ci --source local:images --teacher T --output outputs/synth
    python jobs/synthesize.py --preset trellis --source s3://bucket/images --output s3://bucket/synth
    python jobs/synthesize.py --preset trellis2 --source s3://bucket/images --output s3://bucket/synth2
    ray job submit --working-dir . -- python jobs/synthesize.py --preset trellis --source s3://bucket/images \\
        --output s3://bucket/synth

Per image: TRELLIS's condition preprocessing, the conditioner, then `synthesize.samples_per_image` samples of the
teacher chain at the teacher's own sampler settings, one shard row per (image, sample); `jobs/distill.py --data
<output>` trains on them. TRELLIS.2 (`--preset trellis2 | trellis2-ci`): the SS flow's sample and the SS decoder's
occupied voxels, no SLat (docs/trellis2.md). Ledger, resume, manifest and report are the preprocessing job's.

Exit status: 0 when at least one sample was written; 2 for a bad preset/override/argument (before Ray starts or
any model loads); 1 when the job could not run or every image it processed failed.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python jobs/synthesize.py` and `ray job submit --working-dir .`
    sys.path.insert(0, str(ROOT))

from mdt.config import ConfigError, add_config_args, dump_yaml, load_config, to_dict  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default_preset="ci")
    p.add_argument("--source", action="append", default=[], metavar="SPEC",
                   help="images (repeatable), replaces the preset's: local:<dir>, s3://bucket/prefix, "
                        "manifest:<csv|parquet>, shards:<preprocessing output>")
    p.add_argument("--teacher", help="SS flow teacher checkpoint <dir>/<stem> (default: the preset's pipeline)")
    p.add_argument("--slat-teacher", dest="slat_teacher", help="SLat flow teacher checkpoint <dir>/<stem>")
    p.add_argument("--output", help="output dir or s3:// prefix (shards, ledger, manifest, reports)")
    p.add_argument("--retry-failed", action="store_true", help="also redo images that failed in earlier runs")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    from pipelines.synthesize.driver import SynthesizeConfig  # heavy: torch, pyarrow

    overrides = list(args.overrides)
    if args.source:
        overrides.append(("sources.specs", list(args.source)))
    for flag, key in (("teacher", "synthesize.teacher"), ("slat_teacher", "synthesize.slat_teacher"),
                      ("output", "output")):
        if getattr(args, flag):
            overrides.append((key, getattr(args, flag)))
    if args.retry_failed:
        overrides.append(("resume.retry_failed", True))
    return load_config(SynthesizeConfig, args.preset, overrides, prefix="synthesize_")


def main(argv=None) -> int:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from pipelines.synthesize import driver as synthesize  # heavy: torch, pyarrow

    try:
        cfg = build_config(args)
        if not args.print_config:
            cfg = synthesize.prepare(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"argument error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    resolved = to_dict(cfg)
    print("# resolved config\n" + dump_yaml(cfg), flush=True)
    if args.print_config:
        return 0
    from pipelines.preprocess import driver as graph, report  # heavy: pyarrow, numpy

    try:
        result = synthesize.run(cfg, resolved_config=resolved)
    except Exception:
        logging.getLogger("synthesize").exception("the job could not run")
        return 1
    print(report.to_markdown(result.report) + "\n" + synthesize.to_markdown(result.report["synthesize"]), flush=True)
    report_md = f"{graph.run_dir(cfg, result.run_id)}/report.md"
    print(f"output: {cfg.output}\nmanifest: {cfg.output.rstrip('/')}/manifest.json\nreport: {report_md}", flush=True)
    rep = result.report
    if rep.get("failed") and not rep.get("done"):
        print(f"synthesize: 0 of {rep.get('processed')} samples succeeded ({rep['failed']} failed); reasons in "
              f"{report_md}", file=sys.stderr)
        return 1
    if not rep.get("processed") and not (rep.get("dataset_total") or {}).get("done"):
        print("synthesize: no image to process in the sources", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
