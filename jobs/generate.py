"""Generation job: image(s) -> 3D assets with TRELLIS's chain, teacher or student flow models per stage.

    python jobs/generate.py --preset demo --image cat.png --output outputs/gen
    python jobs/generate.py --preset trellis --image a.png b.png --output out --ss-model runs/x/ss_flow_student \\
        --ss-steps 1 --slat-steps 25 --cfg 3.0 5.0 --num-samples 4

Per input `<output>/<name>/`, TRELLIS: gaussians.ply, mesh.glb (FlexiCubes), preview.png, viewer.html (offline),
timings.json (per stage, warm), occupancy.glb with the demo preset; TRELLIS.2 (`--preset trellis2 | trellis2-demo`):
latents.npz (coords + shape/texture latents, not decoded: its VAEs need CUDA), occupancy.glb, timings.json.
Exit status: 0 when every input produced assets; 1 when any failed (each with its reason); 2: bad arguments.
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

from mdt.config import ConfigError, load_config, load_preset  # noqa: E402
from pipelines.common.cluster import created_model_path, durable_output


class ArgError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own usage dump is several lines)
        print(f"argument error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help="demo | trellis | trellis2-demo | trellis2 | path to a YAML file")
    p.add_argument("--image", nargs="+", required=True, metavar="PATH", help="input image(s), RGBA or RGB")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--ss-model", metavar="CKPT", help="SS flow checkpoint (<dir>/<stem> or <owner>/<repo>/<stem>)")
    p.add_argument("--slat-model", metavar="CKPT", help="SLat flow checkpoint")
    p.add_argument("--ss-steps", type=int, metavar="N", help="Euler steps of the SS flow")
    p.add_argument("--slat-steps", type=int, metavar="M", help="Euler steps of the SLat flow")
    p.add_argument("--cfg", type=float, nargs="+", metavar="W",
                   help="CFG strength: one value for both stages or two (SS, SLat)")
    p.add_argument("--seed", type=int, metavar="S")
    p.add_argument("--num-samples", type=int, metavar="K", help="samples per image, one batch")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    # heavy: PIL, numpy
    from mdt.generate import GenerateConfig, Trellis2GenerateConfig, check_checkpoint_arg, check_image

    trellis2 = load_preset(args.preset, prefix="generate_").get("family") == "trellis2"
    if trellis2 and (args.slat_model or args.slat_steps or args.cfg):  # its stages are set with --set shape.…
        raise ArgError("--slat-model/--slat-steps/--cfg: a TRELLIS.2 preset takes --set models.shape_flow=, …")
    for path in args.image:  # before any model loads: every input an image (header only), a note for RGB
        try:
            note = check_image(path)
        except ValueError as e:
            raise ArgError(f"--image {e}") from None
        if note:
            print(f"note: {note}", file=sys.stderr)
    for flag, value in (("--ss-steps", args.ss_steps), ("--slat-steps", args.slat_steps),
                        ("--num-samples", args.num_samples)):
        if value is not None and value < 1:
            raise ArgError(f"{flag} must be >= 1, got {value}")
    if args.cfg is not None and not 1 <= len(args.cfg) <= 2:
        raise ArgError(f"--cfg takes one value (both stages) or two (SS, SLat), got {len(args.cfg)}")
    if args.cfg is not None and min(args.cfg) < 0:
        raise ArgError("--cfg must be >= 0")
    ov: list = [("output", args.output)]
    if args.ss_model:
        ov.append(("models.ss_flow", check_checkpoint_arg(args.ss_model, "--ss-model")))
    if args.slat_model:
        ov.append(("models.slat_flow", check_checkpoint_arg(args.slat_model, "--slat-model")))
    for key, value in (("ss.steps", args.ss_steps), ("slat.steps", args.slat_steps), ("seed", args.seed),
                       ("num_samples", args.num_samples)):
        if value is not None:
            ov.append((key, value))
    if args.cfg is not None:
        ov += [("ss.cfg_strength", args.cfg[0]), ("slat.cfg_strength", args.cfg[-1])]
    cfg = load_config(Trellis2GenerateConfig if trellis2 else GenerateConfig, args.preset,
                      list(args.overrides) + ov, prefix="generate_")
    cfg.validate()
    durable_output(cfg.output, "--output")  # under `ray job submit --working-dir` the cwd is a temporary copy
    cfg.models.tiny_models = created_model_path(cfg.models.tiny_models, cfg.output)
    return cfg


def main(argv=None) -> int:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = build_config(args)
    except (ArgError, ConfigError, ValueError) as e:
        print(f"argument error: {e}", file=sys.stderr)
        return 2
    from mdt.generate import Trellis2GenerateConfig, generate, generate_trellis2  # heavy: PIL, numpy

    try:
        run = generate_trellis2 if isinstance(cfg, Trellis2GenerateConfig) else generate
        summary = run(cfg, args.image, cfg.output)
    except Exception as e:  # models missing, incompatible, unreadable: one line, non-zero
        logging.getLogger("generate").debug("generation could not run", exc_info=True)
        print(f"generation could not run: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    n, ok = len(summary["inputs"]), summary["ok"]
    print(f"{ok}/{n} inputs produced assets -> {cfg.output} (summary.json)", flush=True)
    if ok < n:
        print(f"{n - ok} input(s) failed: " + "; ".join(f"{e['name']}: {e['error']}"
                                                      for e in summary["inputs"] if "error" in e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
