"""`make demo`: the whole product end to end on a 2-core CPU — preprocessing -> teacher -> MDT-dist student ->
image-to-3D generation -> evaluation, then a data-free student (the teacher's samples for the condition images ->
MDT-dist) — with the evaluation job's table at the end, both students in it.

    python jobs/demo.py [--preset cpu] [--out outputs/demo] [--fresh] [--set teacher.steps=1200]

What runs and why each setting is what it is: pipelines/demo/driver.py and jobs/configs/demo_cpu.yaml.
Exit status: 0 when the demo ran and passed its checks (the teacher's 25-step samples follow their conditioning
shapes, IoU >= `min_teacher_iou`; the 1-step student is clearly closer to the 25-step teacher than the 1-step
teacher); 3 when it ran but a check failed (one line per failed check); 2 for a bad argument; 1 when a stage
could not run.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # fully offline: every model is a local checkpoint
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mdt.config import ConfigError, add_config_args, load_config  # noqa: E402
from pipelines.demo.driver import DemoConfig, mlflow_ui_hint, run
from mdt.config import dump_yaml


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default_preset="cpu")
    p.add_argument("--out", help="working directory of the demo (default: the preset's output)")
    p.add_argument("--fresh", action="store_true", help="delete the working directory first")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)

    overrides: list = list(args.overrides)
    if args.out:
        overrides.append(("output", args.out))
    if args.fresh:
        overrides.append(("fresh", True))
    try:
        cfg = load_config(DemoConfig, args.preset, overrides, prefix="demo_")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:

        print(dump_yaml(cfg))
        return 0
    try:
        res = run(cfg)
    except Exception as e:
        logging.getLogger("demo").debug("demo failed", exc_info=True)
        print(f"demo failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    r = res.results
    print("\n" + res.table)
    for note in r["notes"]:
        print(f"⚠ {note}")
    print(f"\nfeature networks: {r['feature_nets']['inception']['name']}, {r['feature_nets']['dinov2']['name']}")
    print(f"teacher 25-step samples vs their conditioning shapes: IoU {r['teacher25_iou_with_condition']:.3f} "
          f"(threshold {cfg.min_teacher_iou})")
    if r.get("data_free"):
        syn = r["data_free"]["synthesis"]
        print(f"data-free student: distilled from {syn['samples_done']} teacher samples of {syn['images_done']} "
              f"condition images ({syn['images_per_s']:.3f} images/s, {syn['samples_per_s']:.3f} samples/s), no "
              f"3-D data; evaluation: {r['data_free']['evaluation_dir']}")
    print(f"results: {Path(cfg.output).resolve() / 'results.json'}; evaluation: {r['evaluation_dir']}")
    phases = ", ".join(f"{k.split(' (')[0].split(':')[0]}: {v:.0f}s" for k, v in r["phases_s"].items())
    print(f"total wall time: {r['total_s'] / 60:.1f} min  ({phases})")
    print(f"\nMLflow UI:  {mlflow_ui_hint(r['mlflow_tracking_uri'])}")
    for reason in res.reasons:
        print(f"FAILED: {reason}", file=sys.stderr)
    return 0 if res.ok else 3


if __name__ == "__main__":
    sys.exit(main())
