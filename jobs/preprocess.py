"""Preprocessing job: 3D assets -> training shards (SS latents, SLat latents, condition images).

    python jobs/preprocess.py --preset ci --source synthetic:4 --output outputs/pre
    python jobs/preprocess.py --preset trellis --source objaverse-xl:sketchfab --output s3://bucket/trellis \\
        --set filter.trellis_metadata=[hf://datasets/JeffreyXiang/TRELLIS-500K/ObjaverseXL_sketchfab.csv] \\
        --set filter.min_aesthetic=5.5
    ray job submit --working-dir . -- python jobs/preprocess.py --preset demo --source synthetic:8 --output \\
        "$PWD/outputs/pre"   # absolute: the entrypoint runs in a temporary copy (a relative output is refused)

Exit status: 0 when the job ran to the end with at least one asset done (assets that failed are in the ledger and
the report); 2 for a bad preset/override/argument; 1 when the job itself could not run (no source, unreachable
storage...) or when every asset it processed failed.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python jobs/preprocess.py` and `ray job submit --working-dir .`
    sys.path.insert(0, str(ROOT))

from mdt.config import ConfigError, add_config_args, dump_yaml, load_config, to_dict  # noqa: E402
from pipelines.preprocess.config import PreprocessConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default_preset="demo")
    p.add_argument("--source", action="append", default=[], metavar="SPEC",
                   help="asset source (repeatable), replaces the preset's: local:<dir>, manifest:<csv|parquet>, "
                        "synthetic:<n>, objaverse:<uids>, objaverse-xl:<subsets>, abo:<tar>, 3d-future:<zip>, "
                        "toys4k:<zip>, hssd:<csv>")
    p.add_argument("--output", help="output dir or s3:// prefix (shards, ledger, manifest, reports)")
    p.add_argument("--retry-failed", action="store_true", help="also redo assets that failed in earlier runs")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    overrides = list(args.overrides)
    if args.source:
        overrides.append(("sources.specs", list(args.source)))
    if args.output:
        overrides.append(("output", args.output))
    if args.retry_failed:
        overrides.append(("resume.retry_failed", True))
    return load_config(PreprocessConfig, args.preset, overrides, prefix="preprocess_")


def main(argv=None) -> int:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = build_config(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from pipelines.preprocess import driver as graph, report  # heavy: numpy, pyarrow

    if not args.print_config:
        try:
            graph.prepare(cfg)  # before Ray: output, sources; local paths absolute (workers do not share the cwd)
        except ValueError as e:
            print(f"argument error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
    resolved = to_dict(cfg)
    print("# resolved config\n" + dump_yaml(cfg), flush=True)
    if args.print_config:
        return 0

    try:
        result = graph.run(cfg, resolved_config=resolved)
    except Exception:
        logging.getLogger("preprocess").exception("the job could not run")
        return 1
    print(report.to_markdown(result.report), flush=True)
    report_md = f"{graph.run_dir(cfg, result.run_id)}/report.md"
    print(f"output: {cfg.output}\nmanifest: {cfg.output.rstrip('/')}/manifest.json\nreport: {report_md}", flush=True)
    rep = result.report or {}
    if rep.get("failed") and not rep.get("done"):
        from pipelines.preprocess.ledger import Ledger  # heavy: numpy, pyarrow

        print(f"preprocess: 0 of {rep.get('processed')} assets succeeded ({rep['failed']} failed); reasons in "
              f"{report_md} and the ledger {Ledger(cfg.output, result.config_hash).dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
