#!/usr/bin/env python3
"""Cost and throughput estimate of preprocessing TRELLIS-500K (and of a distillation run) on the AWS cluster
of infra/ray/aws-cluster.yaml, from per-stage timings.

    python infra/estimate.py                                  # the PLACEHOLDER figures (docs/scaling-out.md)
    python infra/estimate.py --report <output>/runs/<run_id>/report.json   # a benchmark run's measured figures
    python infra/estimate.py --bench outputs/bench-preprocess/bench.json   # `make bench-preprocess`'s figures
    python infra/estimate.py --seconds render=140 --seconds features=3.5 --render-nodes 32 --spot

Model (steady-state pipeline, every stage's actor pool sized to keep up):
  per asset, GPU-seconds = sum over stages of mean_s x num_gpus, CPU-seconds = sum of mean_s x num_cpus
  (mean_s: one actor's wall time per asset, from the run report; num_gpus / num_cpus: that stage's actor
  resources from the run's config). Wall time = max(N x GPU-s / GPUs, N x CPU-s / CPUs) / efficiency;
  cost = wall time x the nodes' hourly prices; shards stored in S3 = N x bytes per asset.
Figures marked PLACEHOLDER are not measured: replace them with a benchmark run's report (see the docs).

Data-free alternative (`jobs/synthesize.py --preset trellis`: condition images -> the teacher's own samples, no
3-D asset): per image, K = synthesize.samples_per_image teacher samples, each the SS flow's and the SLat flow's
network evaluations at the preset's sampler settings (`mdt.flow.count_nfe`), so
  GPU-seconds per image = num_gpus x K x (NFE_ss + NFE_slat) x seconds per network evaluation
(the conditioner and the SS decoder run once per sample and are counted inside the per-evaluation figure),
on the same GPU nodes; GPU-hours = N x GPU-s / 3600 for both paths.

Distillation memory per GPU (the `trellis-ss` / `trellis-slat` presets, no FSDP): the student's float32 weights,
gradients, AdamW moments and EMA (20 bytes per parameter), the teacher's published fp16 weights (2 bytes per
parameter), the bf16 DINOv2 ViT-L conditioner, and activations = micro-batch (batch_size / batch_split) x graphs
kept for one backward (MDT-dist: 2, the student's VM prediction and its one-step VD generation) x per-sample
activation memory of the flow from the measured model of `mdt.bench.activations` (float32: an upper bound under
bf16 autocast), with or without gradient checkpointing as the preset says.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from mdt.config import load_config, to_dict
from pipelines.preprocess.config import PreprocessConfig

ROOT = Path(__file__).resolve().parents[1]

# On-demand list prices, us-west-2, USD per hour, at the time of writing: check before quoting a budget.
PRICES = {"g5.12xlarge": 5.672, "m6i.8xlarge": 1.536, "m6i.2xlarge": 0.384, "p4d.24xlarge": 32.7726}
SPOT_FACTOR = 0.40  # typical spot price / on-demand for g5 / m6i in us-west-2 (varies by hour and zone)
S3_GB_MONTH = 0.023


@dataclass
class Node:
    instance: str
    gpus: int
    cpus: int


RENDER = Node("g5.12xlarge", 4, 48)
CPU = Node("m6i.8xlarge", 0, 32)
HEAD = Node("m6i.2xlarge", 0, 8)
TRAIN = Node("p4d.24xlarge", 8, 96)

# PLACEHOLDER per-stage figures: one actor's seconds per asset with the `trellis` preset's settings (150 views at
# 512 px + 24 condition views at 1024 px, Cycles 128 spp; DINOv2 ViT-L/14-reg on 150 views; both encoders).
# Not measured. Replace with the benchmark's report (--report) once it exists.
PLACEHOLDER_SECONDS = {"download": 3.0, "render": 150.0, "voxelize": 5.0, "features": 4.0, "encode": 1.0,
                       "write": 0.5}
PLACEHOLDER_BYTES_PER_ASSET = 2_500_000  # shard bytes per asset (latents + 24 cond PNGs at 518 px): PLACEHOLDER
# Distillation PLACEHOLDERS: seconds per optimizer step of MDT-dist on 16 A100s (batch 8 per GPU).
PLACEHOLDER_TRAIN_STEP_S = 1.5
# Synthesis PLACEHOLDER: seconds per network evaluation of TRELLIS-image-large's flows, from the MDT-dist paper's
# 6.1 s for its 25 + 25-step chain (44 + 44 evaluations with the CFG interval, decoding included) on an A800; not
# measured here, and an A10G is slower than an A800. Replace with a synthesis run's `seconds_per_sample_mean`
# (runs/<run_id>/synthesize.json) divided by its NFE per sample.
PLACEHOLDER_SYNTH_EVAL_S = 6.1 / 88


GIB = 2 ** 30
DINOV2_L_PARAMS = 304_000_000        # ViT-L/14 with registers (its conditioner weights, bf16)
STATE_BYTES_PER_PARAM = 20           # fp32 student weights + grads + AdamW exp_avg, exp_avg_sq + EMA
TEACHER_BYTES_PER_PARAM = 2          # published fp16 torso
GPU_MEMORY_GIB = 80.0                # A100 / H100 80 GB


def distill_memory(stage: str, activation_coef: dict | None = None) -> dict:
    """Per-GPU memory of one `trellis-<stage>` training step at the preset's batch (module docstring)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from mdt.bench import activations  # heavy: torch, safetensors
    from mdt.models.zoo import full_size_model_args  # heavy: torch, safetensors
    from mdt.models import build_model  # heavy: torch, safetensors
    from pipelines.distill.config import DistillJobConfig  # heavy: torch, numpy

    cfg = load_config(DistillJobConfig, f"trellis-{stage}", [("data.uri", "-")], prefix="distill_")
    name, args = full_size_model_args(f"{stage}_flow")
    params = sum(p.numel() for p in build_model(name, args, device="meta").parameters())
    coef = activation_coef or activations.MEASURED
    full = activations.full_size(coef)[f"{stage}_flow"]
    ckpt = bool(cfg.model.gradient_checkpointing)
    per_sample = full["gib_checkpointed" if ckpt else "gib"]
    micro = cfg.data.batch_size // cfg.data.batch_split
    graphs = 2 if cfg.objective.name == "mdt" and cfg.objective.mdt.lambda_vd > 0 else 1
    out = {"parameters": params, "per_gpu_batch": cfg.data.batch_size, "micro_batch": micro,
           "graphs_with_grad": graphs, "gradient_checkpointing": ckpt, "activation_gib_per_sample": per_sample,
           "activation_gib_per_sample_without_checkpointing": full["gib"],
           "student_state_gib": params * STATE_BYTES_PER_PARAM / GIB,
           "teacher_gib": params * TEACHER_BYTES_PER_PARAM / GIB, "conditioner_gib": DINOV2_L_PARAMS * 2 / GIB,
           "activations_gib": micro * graphs * per_sample, "tokens": full["tokens"]}
    if "voxels" in full:
        out["voxels"] = full["voxels"]
    out["total_gib"] = (out["student_state_gib"] + out["teacher_gib"] + out["conditioner_gib"]
                        + out["activations_gib"])
    out["total_gib_without_checkpointing"] = out["total_gib"] - out["activations_gib"] + micro * graphs * full["gib"]
    return out


def render_memory(mem: dict[str, dict]) -> str:
    lines = ["", f"Distillation memory per GPU (float32 activations, an upper bound under bf16 autocast; "
                 f"{GPU_MEMORY_GIB:.0f} GiB cards):", "",
             "| preset | params | batch / micro | act. GiB per sample | weights+optimizer+EMA | teacher | "
             "activations | total GiB | without checkpointing |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage, m in mem.items():
        lines.append(f"| trellis-{stage} | {m['parameters'] / 1e6:.0f} M | {m['per_gpu_batch']} / {m['micro_batch']} "
                     f"x {m['graphs_with_grad']} graphs | {m['activation_gib_per_sample']:.2f} | "
                     f"{m['student_state_gib']:.1f} | {m['teacher_gib']:.1f} | {m['activations_gib']:.1f} | "
                     f"{m['total_gib']:.1f} | {m['total_gib_without_checkpointing']:.1f} |")
    return "\n".join(lines)


def preset_resources(preset: str = "trellis") -> dict[str, dict]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

    cfg = load_config(PreprocessConfig, preset, [], prefix="preprocess_")
    return {k: to_dict(v) for k, v in cfg.resources.items()}


def from_report(path: Path) -> tuple[dict[str, float], dict[str, dict], int | None]:
    rep = json.loads(path.read_text())
    seconds = {s: r["mean_s"] for s, r in (rep.get("stages") or {}).items() if r.get("mean_s")}
    cfg_path = path.with_name("config.yaml")
    resources = None
    if cfg_path.exists():
        resources = (yaml.safe_load(cfg_path.read_text()) or {}).get("resources")
    return seconds, resources or preset_resources(), rep.get("bytes_per_asset")


def from_bench(path: Path, workers: int | None = None) -> dict[str, float]:
    """Per-stage seconds per asset of one actor from the preprocessing benchmark (pipelines/preprocess/bench.py writes a list
    of configurations, each with `workers` and `stage_mean_s`): the configuration with `workers` workers, by
    default the one with the fewest (one actor per stage: no sharing of cores between stages)."""
    runs = json.loads(path.read_text())
    if isinstance(runs, dict):
        runs = [runs]
    runs = [r for r in runs if r.get("stage_mean_s")]
    if not runs:
        raise SystemExit(f"{path}: no configuration with stage_mean_s (is it pipelines/preprocess/bench.py's bench.json?)")
    if workers is None:
        run = min(runs, key=lambda r: r.get("workers", 1))
    else:
        match = [r for r in runs if r.get("workers") == workers]
        if not match:
            raise SystemExit(f"{path}: no configuration with {workers} workers "
                             f"(has {sorted(r.get('workers') for r in runs)})")
        run = match[0]
    return {k: float(v) for k, v in run["stage_mean_s"].items() if v}


def synthesize_preset(preset: str = "trellis") -> dict:
    """The synthesis preset's samples per image, NFE per sample of each flow and its actor's resources."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from mdt.flow import count_nfe  # heavy: torch, numpy
    from pipelines.synthesize.driver import SynthesizeConfig  # heavy: torch, pyarrow

    cfg = load_config(SynthesizeConfig, preset, [], prefix="synthesize_")
    s = cfg.synthesize
    nfe = {n: count_nfe(x.steps, x.cfg_strength, tuple(x.cfg_interval), x.rescale_t)
           for n, x in (("ss", s.ss), ("slat", s.slat))}
    return {"samples_per_image": s.samples_per_image, "nfe": nfe, "resources": to_dict(cfg.resources["synthesize"])}


def estimate_synthesize(preset: dict, eval_s: float, n_images: int, render_nodes: int, efficiency: float,
                        spot: bool) -> dict:
    """The data-free path's cost on the GPU nodes (module docstring): per image K x NFE x eval_s GPU-seconds."""
    gpus_per_actor = float(preset["resources"].get("num_gpus") or 0)
    sample_s = sum(preset["nfe"].values()) * eval_s
    gpu_s = gpus_per_actor * preset["samples_per_image"] * sample_s
    gpus = render_nodes * RENDER.gpus
    wall_h = n_images * gpu_s / max(gpus, 1) / 3600 / efficiency
    per_h = render_nodes * PRICES[RENDER.instance] * (SPOT_FACTOR if spot else 1.0) + PRICES[HEAD.instance]
    return {"sample_s": sample_s, "gpu_s_per_image": gpu_s, "gpu_h": n_images * gpu_s / 3600, "wall_h": wall_h,
            "usd_per_h": per_h, "usd": wall_h * per_h}


def render_synthesize(preset: dict, syn: dict, est: dict, eval_s_placeholder: bool, args) -> str:
    mark = " (PLACEHOLDER)" if eval_s_placeholder else ""
    nfe = preset["nfe"]
    return "\n".join([
        "", f"Data-free alternative: synthesizing {args.assets:,} condition images (jobs/synthesize.py --preset "
            f"trellis) on the same {args.render_nodes} x {RENDER.instance}, efficiency {args.efficiency:.2f}", "",
        f"- per image: {preset['samples_per_image']} sample(s) x (SS {nfe['ss']} + SLat {nfe['slat']} network "
        f"evaluations) x {syn['sample_s'] / sum(nfe.values()):.4f} s{mark} = {syn['sample_s']:.1f} s per sample "
        f"on {float(preset['resources'].get('num_gpus') or 0):g} GPU -> {syn['gpu_s_per_image']:.1f} GPU-s",
        f"- wall time {syn['wall_h']:.1f} h, cluster ${syn['usd_per_h']:,.2f}/h -> ${syn['usd']:,.0f} in all",
        f"- GPU-hours: {syn['gpu_h']:,.0f} synthesizing vs {est['gpu_h_total']:,.0f} preprocessing (preprocessing "
        f"{est['gpu_h_total'] / max(syn['gpu_h'], 1e-9):.1f}x), with no 3-D asset, render or encoder"])


def estimate(seconds: dict[str, float], resources: dict[str, dict], n_assets: int, render_nodes: int,
             cpu_nodes: int, efficiency: float, spot: bool, bytes_per_asset: float) -> dict:
    gpu_s = sum(t * float(resources.get(s, {}).get("num_gpus") or 0) for s, t in seconds.items())
    cpu_s = sum(t * float(resources.get(s, {}).get("num_cpus") or 1) for s, t in seconds.items())
    gpus = render_nodes * RENDER.gpus
    cpus = render_nodes * RENDER.cpus + cpu_nodes * CPU.cpus
    gpu_h = n_assets * gpu_s / max(gpus, 1) / 3600
    cpu_h = n_assets * cpu_s / max(cpus, 1) / 3600
    wall_h = max(gpu_h, cpu_h) / efficiency
    factor = SPOT_FACTOR if spot else 1.0
    per_h = (render_nodes * PRICES[RENDER.instance] + cpu_nodes * PRICES[CPU.instance]) * factor + PRICES[HEAD.instance]
    return {
        "gpu_s_per_asset": gpu_s, "cpu_s_per_asset": cpu_s, "gpus": gpus, "cpus": cpus,
        "gpu_bound_h": gpu_h, "cpu_bound_h": cpu_h, "gpu_h_total": n_assets * gpu_s / 3600, "bottleneck": "GPU" if gpu_h >= cpu_h else "CPU",
        "wall_h": wall_h, "assets_per_h": n_assets / wall_h if wall_h else None, "usd_per_h": per_h,
        "usd": wall_h * per_h, "usd_per_1k_assets": wall_h * per_h / n_assets * 1000,
        "shards_gb": n_assets * bytes_per_asset / 1e9,
        "s3_usd_month": n_assets * bytes_per_asset / 1e9 * S3_GB_MONTH,
    }


def render_markdown(seconds, resources, placeholders: set[str], est: dict, args) -> str:
    mark = lambda s: " (PLACEHOLDER)" if s in placeholders else ""  # noqa: E731
    lines = [f"Preprocessing {args.assets:,} assets on {args.render_nodes} x {RENDER.instance} "
             f"({est['gpus']} A10G) + {args.cpu_nodes} x {CPU.instance} + head {HEAD.instance}, "
             f"{'spot' if args.spot else 'on-demand'}, efficiency {args.efficiency:.2f}", "",
             "| stage | s per asset per actor | GPUs per actor | CPUs per actor | GPU-s per asset | CPU-s per asset |",
             "|---|---:|---:|---:|---:|---:|"]
    for s, t in seconds.items():
        r = resources.get(s, {})
        g, c = float(r.get("num_gpus") or 0), float(r.get("num_cpus") or 1)
        lines.append(f"| {s} | {t:g}{mark(s)} | {g:g} | {c:g} | {t * g:g} | {t * c:g} |")
    lines += ["", f"- per asset: {est['gpu_s_per_asset']:.1f} GPU-s, {est['cpu_s_per_asset']:.1f} CPU-s; "
                  f"{est['gpu_h_total']:,.0f} GPU-hours in all",
              f"- GPU bound {est['gpu_bound_h']:.1f} h, CPU bound {est['cpu_bound_h']:.1f} h -> "
              f"{est['bottleneck']}-bound; wall time {est['wall_h']:.1f} h ({est['wall_h'] / 24:.1f} days), "
              f"{est['assets_per_h']:,.0f} assets/h",
              f"- cluster ${est['usd_per_h']:,.2f}/h -> ${est['usd']:,.0f} in all, "
              f"${est['usd_per_1k_assets']:.2f} per 1,000 assets",
              f"- shards in S3: {est['shards_gb']:,.0f} GB{mark('bytes')} -> ${est['s3_usd_month']:,.0f}/month"]
    if args.train_steps:
        step = args.train_step_s
        train_h = args.train_steps * step / 3600
        usd = train_h * args.train_nodes * PRICES[TRAIN.instance]
        lines += [f"- distillation: {args.train_steps:,} steps x {step:g} s{mark('train')} on {args.train_nodes} x "
                  f"{TRAIN.instance} = {train_h:.1f} h, ${usd:,.0f} on-demand"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--report", type=Path, help="report.json of a preprocessing run (measured per-stage means)")
    ap.add_argument("--bench", type=Path, help="bench.json of the preprocessing benchmark (pipelines/preprocess/bench.py)")
    ap.add_argument("--bench-workers", type=int, help="which configuration of --bench (default: the fewest workers)")
    ap.add_argument("--seconds", action="append", default=[], metavar="STAGE=S",
                    help="override one stage's seconds per asset per actor")
    ap.add_argument("--assets", type=int, default=500_000, help="number of assets (TRELLIS-500K: 500,000)")
    ap.add_argument("--render-nodes", type=int, default=24)
    ap.add_argument("--cpu-nodes", type=int, default=8)
    ap.add_argument("--efficiency", type=float, default=0.8, help="fraction of the ideal pipelined throughput")
    ap.add_argument("--spot", action="store_true", help=f"spot prices ({SPOT_FACTOR * 100:.0f}%% of on-demand) for workers")
    ap.add_argument("--train-steps", type=int, default=100_000, help="distillation steps (0: no training line)")
    ap.add_argument("--train-step-s", type=float, default=PLACEHOLDER_TRAIN_STEP_S)
    ap.add_argument("--train-nodes", type=int, default=2)
    ap.add_argument("--synth-eval-s", type=float, default=PLACEHOLDER_SYNTH_EVAL_S,
                    help="data-free path: seconds per network evaluation of the teacher flows (measured: a "
                         "synthesis run's seconds_per_sample_mean / its NFE per sample)")
    ap.add_argument("--activations", type=Path,
                    help="JSON of `python -m mdt.bench.activations --json` (default: its stored measurement)")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = ap.parse_args(argv)

    placeholders: set[str] = set()
    if args.report and args.bench:
        ap.error("give --report or --bench, not both")
    if args.report:
        seconds, resources, bpa = from_report(args.report)
    elif args.bench:
        seconds, resources, bpa = from_bench(args.bench, args.bench_workers), preset_resources(), None
    else:
        seconds, resources, bpa = dict(PLACEHOLDER_SECONDS), preset_resources(), None
        placeholders |= set(seconds)
    if bpa is None:
        bpa = PLACEHOLDER_BYTES_PER_ASSET
        placeholders.add("bytes")
    for kv in args.seconds:
        k, v = kv.split("=", 1)
        seconds[k] = float(v)
        placeholders.discard(k)
    if args.train_step_s == PLACEHOLDER_TRAIN_STEP_S:
        placeholders.add("train")
    est = estimate(seconds, resources, args.assets, args.render_nodes, args.cpu_nodes, args.efficiency, args.spot,
                   bpa)
    coef = json.loads(args.activations.read_text())["fit"] if args.activations else None
    memory = {stage: distill_memory(stage, coef) for stage in ("ss", "slat")}
    preset = synthesize_preset()
    syn = estimate_synthesize(preset, args.synth_eval_s, args.assets, args.render_nodes, args.efficiency, args.spot)
    if args.synth_eval_s == PLACEHOLDER_SYNTH_EVAL_S:
        placeholders.add("synthesize")
    if args.json:
        print(json.dumps({"seconds": seconds, "placeholders": sorted(placeholders), **est,
                          "synthesize": {**preset, **syn}, "distill_memory": memory}, indent=2))
    else:
        print(render_markdown(seconds, resources, placeholders, est, args))
        print(render_synthesize(preset, syn, est, "synthesize" in placeholders, args))
        print(render_memory(memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
