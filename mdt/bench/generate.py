"""Per-stage latency of the image -> 3D chain at several step counts, side by side in one run (warm medians).

    python -m mdt.bench.generate --full-size --device cuda --precision fp16 --steps 1 25   # vs the paper's 0.68 / 6.1 s
    python -m mdt.bench.generate --steps 1 4 --repeats 1                                   # tiny models, CPU

The models are random-weight TRELLIS-image-large-shaped checkpoints written by `mdt.generate.write_trellis_repo`
into `--repo` (the released sizes with `--full-size`, ~2.3 GB; DINOv2 ViT-L/14-reg-shaped), loaded through the
`trellis` preset as a local copy of the repository. The SS decoder's bias is set so that ~8% of the 64³ grid is
occupied (about 21k voxels, the size of a typical TRELLIS structure), since the SLat stages' cost follows the
voxel count. Both flows use the same step count per row, with pipeline.json's CFG (5.0 on t in [0.5, 1]) and
rescale_t 3; a row's NFE is printed beside it.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mdt.config import load_config
from mdt.generate import GenerateConfig, ImageTo3D, StageSampler, load_image
from mdt.models.base import PRECISIONS
from mdt.models.zoo import save_tiny_dinov2, write_trellis_repo

STAGES = ("condition", "ss_flow", "ss_decode", "slat_flow", "decode_gaussians", "decode_mesh")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default="outputs/bench-generate/trellis-random", help="model repository (written once)")
    p.add_argument("--full-size", action="store_true", help="the released model sizes (default: tiny)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS))
    p.add_argument("--steps", type=int, nargs="+", default=[1, 25])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--occupancy", type=float, default=None,
                   help="fraction of the 64³ grid the random SS decoder occupies (default 0.08 full-size, 0.004 tiny)")
    p.add_argument("--formats", nargs="+", choices=["gaussians", "mesh"], default=None,
                   help="decoded outputs (default: the preset's, both)")
    p.add_argument("--image", default=str(Path(__file__).resolve().parents[2] / "docs" / "examples" / "mug.png"))
    args = p.parse_args(argv)

    repo = Path(args.repo)
    if not (repo / "pipeline.json").exists():
        print(f"writing random-weight {'full-size' if args.full_size else 'tiny'} models to {repo}", flush=True)
        write_trellis_repo(repo, full_size=args.full_size, occupancy=args.occupancy)
        if args.full_size:
            save_tiny_dinov2(repo / "dinov2", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)
        else:
            save_tiny_dinov2(repo / "dinov2", hidden_size=64)
    overrides = [("models.pipeline", str(repo)), ("models.dinov2", str(repo / "dinov2")), ("device", args.device),
                 ("precision", args.precision), ("num_samples", args.num_samples)]
    if args.formats:
        overrides.append(("decode.formats", list(args.formats)))
    cfg = load_config(GenerateConfig, "trellis", overrides, prefix="generate_")
    pipe = ImageTo3D.from_config(cfg)
    image = load_image(args.image)
    pipe.warmup(image)
    rows = {}
    for n in args.steps:
        s = StageSampler(steps=n, cfg_strength=cfg.ss.cfg_strength, cfg_interval=list(cfg.ss.cfg_interval),
                         rescale_t=cfg.ss.rescale_t)
        runs = [pipe.run(image, ss=s, slat=s) for _ in range(args.repeats)]
        med = {k: statistics.median(r.timings.get(k, 0.0) for r in runs) for k in STAGES}
        med["sampling"] = sum(med[k] for k in ("condition", "ss_flow", "ss_decode", "slat_flow"))
        med["total"] = sum(med[k] for k in STAGES)
        rows[n] = {"seconds": med, "nfe": runs[0].nfe, "voxels": [int(x.coords.shape[0]) for x in runs[0].samples]}
    cols = list(STAGES) + ["sampling", "total"]
    print(f"\ndevice {pipe.device}, precision {cfg.precision}, {'full-size' if args.full_size else 'tiny'} models, "
          f"median of {args.repeats} warm runs, {args.num_samples} sample(s), seconds:")
    print("| steps (SS+SLat) | NFE | voxels | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 3))
    for n, r in rows.items():
        print(f"| {n}+{n} | {r['nfe']['ss_flow']}+{r['nfe']['slat_flow']} | {r['voxels']} | "
              + " | ".join(f"{r['seconds'][c]:.3f}" for c in cols) + " |")
    lo, hi = min(rows), max(rows)
    if lo != hi:
        for c in ("sampling", "total"):
            print(f"{c}: {hi}+{hi} steps / {lo}+{lo} steps = "
                  f"{rows[hi]['seconds'][c] / max(rows[lo]['seconds'][c], 1e-9):.2f}x")
    out = repo.parent / "results.json"
    out.write_text(json.dumps({"device": str(pipe.device), "precision": cfg.precision, "full_size": args.full_size,
                               "rows": rows}, indent=2))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
