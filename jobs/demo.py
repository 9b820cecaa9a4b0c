"""`make demo`: the whole product end to end on a 2-core CPU, in about 5 minutes (20 at most).

    python jobs/demo.py [--out outputs/demo] [--assets 16] [--fresh]

1. a private local Ray instance (no dashboard) and a local MLflow store (SQLite, `<out>/mlflow.db`);
2. synthetic assets -> the preprocessing job's Ray Data graph (`jobs/configs/preprocess_demo.yaml`: Blender
   Cycles renders, voxelizer, tiny random DINOv2 features, tiny SS/SLat encoders) -> shards;
3. a small SS-stage teacher trained with flow matching (`jobs/distill.py`, preset demo, objective flow_matching);
4. the teacher distilled with MDT-dist (VM + VD) into a student (preset demo, objective mdt);
5. 1/2/4-step student vs the 25-step teacher (and the teacher at 1/2/4 steps): shape quality of the decoded
   samples and wall time per sample -> printed table + `<out>/results.json` (+ logged to the MLflow run).

Decoding: the demo's SS encoder is a tiny random network (no SS VAE decoder exists for it), so the demo fits an
`OccupancyProbe` (latent -> 16³ occupancy, mdt/eval/snapshots.py) on the shards and decodes every sample with
it, for the snapshot grids and the metrics. Metrics per sampler, over every asset's condition x seeds:
* `mse_t25` mean squared difference per latent element to the 25-step teacher's sample from the same noise and
  condition (what few-step distillation aims at: 0 = the 25-step result in 1 step);
* `iou_t25` IoU of the decoded occupancy with the decoded 25-step teacher sample (the same, as a shape);
* `iou_nn`  mean IoU of each decoded sample with its closest training shape (sample fidelity; 1 = a clean shape);
* `iou_cond` mean IoU with the shape of the asset whose image conditioned it (does it follow the condition);
* `latent_nn` mean squared distance to the closest training latent, per element (0 = on the data).
Pass/fail (exit status 3 on fail): the 1-step student is at least 2x closer to the 25-step teacher (`mse_t25`) than
the teacher's own 1-step sample, and its decoded shape agrees better with it (`iou_t25`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # fully offline: every model is a tiny local checkpoint
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("demo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/demo", help="working directory of the demo")
    p.add_argument("--assets", type=int, default=16, help="number of synthetic assets")
    p.add_argument("--teacher-steps", type=int, default=400, help="flow-matching steps of the teacher")
    p.add_argument("--distill-steps", type=int, default=None, help="MDT-dist steps (default: the demo preset's)")
    p.add_argument("--seeds", type=int, default=2, help="samples per condition in the comparison")
    p.add_argument("--fresh", action="store_true", help="delete <out> first (default: reuse finished stages)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the distill demo preset for both runs (e.g. train.max_steps=100)")
    return p.parse_args(argv)


class Clock:
    def __init__(self):
        self.t0 = time.time()
        self.phases: dict[str, float] = {}

    def phase(self, name: str):
        clock = self

        class _P:
            def __enter__(self):
                self.t = time.time()
                print(f"\n=== {name} ===", flush=True)

            def __exit__(self, *a):
                clock.phases[name] = round(time.time() - self.t, 1)
                print(f"=== {name}: {clock.phases[name]:.0f} s (total {time.time() - clock.t0:.0f} s) ===",
                      flush=True)
        return _P()


# ------------------------------------------------------------------------------------------------ models


def calibrate_ss_encoder(path: str, resolution: int = 64) -> None:
    """Rescale the tiny random SS encoder's output so that its latents are about zero-mean, unit-variance per
    channel (as a KL-regularised SS VAE's are) on simple shapes; a random encoder's raw latents are ~0.1."""
    import torch

    from mdt.models import from_pretrained, save_pretrained
    from pipelines.synthetic_meshes import box_surface_voxels, sphere_surface_voxels

    enc = from_pretrained(path)
    shapes = [sphere_surface_voxels((0, 0, 0), r, resolution) for r in (0.15, 0.25, 0.35, 0.45)]
    shapes += [box_surface_voxels((-a, -b, -c), (a, b, c), resolution)
               for a, b, c in ((0.4, 0.2, 0.1), (0.1, 0.3, 0.45), (0.3, 0.3, 0.3), (0.45, 0.1, 0.25))]
    occ = torch.from_numpy(__import__("numpy").stack(shapes)).float()[:, None]
    with torch.no_grad():
        z = enc(occ)
        mu, sd = z.mean((0, 2, 3, 4)), z.std((0, 2, 3, 4)).clamp(min=1e-6)
        conv = enc.out_layer[-1]
        L = enc.latent_channels
        conv.weight[:L] /= sd.view(-1, 1, 1, 1, 1)
        conv.bias[:L] = (conv.bias[:L] - mu) / sd
    save_pretrained(enc, path)


def prepare_models(out: Path) -> dict[str, str]:
    from mdt.conditioning import save_tiny_dinov2
    from pipelines.encode import save_tiny_encoders

    d = out / "models"
    paths = {"dinov2": str(d / "tiny-dinov2"), "ss_encoder": str(d / "ss_enc_tiny"),
             "slat_encoder": str(d / "slat_enc_tiny")}
    if not (d / "tiny-dinov2" / "config.json").exists():
        save_tiny_dinov2(d / "tiny-dinov2", hidden_size=64)
    if not Path(paths["ss_encoder"] + ".json").exists():
        save_tiny_encoders(d, feature_channels=64)
        calibrate_ss_encoder(paths["ss_encoder"])
    return paths


# ------------------------------------------------------------------------------------------------ stages


def preprocess(out: Path, n: int, models: dict[str, str]) -> str:
    from mdt.config import load_config
    from pipelines import graph
    from pipelines.config import PreprocessConfig

    data = out / "preprocess"
    cfg = load_config(PreprocessConfig, "demo", [
        f"sources.specs=['synthetic:{n}']", f"output='{data}'", f"features.checkpoint='{models['dinov2']}'",
        f"encode.ss_encoder='{models['ss_encoder']}'", f"encode.slat_encoder='{models['slat_encoder']}'"],
        prefix="preprocess_")
    res = graph.run(cfg)
    counts = (res.manifest or {}).get("counts", {})
    print(f"preprocessing: {counts} in {res.wall_s:.0f} s -> {data}", flush=True)
    if not counts.get("done"):
        raise RuntimeError("preprocessing produced no shards")
    return str(data)


def dataset_arrays(data: str):
    """SS latents [N, 8, 16³], 16³ occupancies [N, 16³] and condition rows of the shards."""
    import numpy as np
    import torch

    from mdt.eval.snapshots import occupancy_grid
    from pipelines import shards

    rows = list(shards.iter_rows(data, columns=["sha256", "ss_latent", "slat_coords", "cond_images"]))
    x = shards.collate_ss(rows)
    occ = torch.stack([occupancy_grid(np.frombuffer(r["slat_coords"], np.uint8).reshape(-1, 3), 16) for r in rows])
    return rows, x, occ


def fit_probe(out: Path, data: str) -> str:
    from mdt.eval.snapshots import fit_occupancy_probe

    path = out / "models" / "ss_occupancy_probe"
    _, x, occ = dataset_arrays(data)
    probe = fit_occupancy_probe(x, occ, steps=200, hidden=16, batch_size=8, log=print)
    with __import__("torch").no_grad():
        acc = ((probe(x)[:, 0] > 0) == occ).float().mean().item()
    print(f"occupancy probe: per-cell accuracy on the shards {acc:.3f}", flush=True)
    probe.save(path)
    return str(path)


def distill_cfg(name: str, out: Path, data: str, models: dict, probe: str, tracking_uri: str, objective: str,
                teacher: str | None, steps: int | None, overrides: list[str]):
    from mdt.config import load_config
    from mdt.training.config import DistillConfig

    ov = [f"name={name}", f"output='{out / 'runs'}'", f"data.uri='{data}'", f"condition.model='{models['dinov2']}'",
          f"snapshot.decoder='{probe}'", f"mlflow.tracking_uri='{tracking_uri}'", f"objective.name={objective}"]
    ov.append(f"model.teacher='{teacher}'" if teacher else "model.teacher=null")
    if steps:
        ov.append(f"train.max_steps={steps}")
    ov += overrides
    return load_config(DistillConfig, "demo", ov, prefix="distill_").validate()


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate(teacher_path: str, student_path: str, data: str, probe_path: str, cfg, seeds: int) -> dict:
    import numpy as np
    import torch

    from mdt.distill import student_sample
    from mdt.eval.shapes import iou_matrix
    from mdt.eval.snapshots import load_decoder
    from mdt.flow import FlowEulerSampler
    from mdt.models import from_pretrained
    from mdt.training.build import build_conditioner
    from pipelines import shards

    torch.set_num_threads(2)
    rows, x, occ = dataset_arrays(data)
    conditioner = build_conditioner(cfg.condition, torch.device("cpu"))
    cond = conditioner(shards.collate_cond(rows, view=0, image_size=cfg.condition.image_size))
    teacher = from_pretrained(teacher_path).eval()
    student = from_pretrained(student_path).eval()
    probe = load_decoder(probe_path)
    n = x.shape[0]
    w_t, w_s = cfg.snapshot.cfg_strength, cfg.snapshot.cfg_strength
    samplers = [("teacher", 25), ("teacher", 4), ("teacher", 2), ("teacher", 1),
                ("student", 1), ("student", 2), ("student", 4)]
    g = torch.Generator().manual_seed(cfg.snapshot.seed)
    noises = [torch.randn(x.shape, generator=g) for _ in range(seeds)]
    x_flat = x.flatten(1)
    results = []
    ref_samples = ref_occ = None                       # the 25-step teacher's samples (first sampler)
    for kind, steps in samplers:
        samples, secs = [], 0.0
        for noise in noises:
            t0 = time.perf_counter()
            with torch.no_grad():
                if kind == "teacher":
                    s = FlowEulerSampler().sample(teacher, noise, cond, torch.zeros_like(cond), steps=steps,
                                                  cfg_strength=w_t)
                else:
                    s = student_sample(student, noise, cond, steps=steps, cfg_strength=w_s)
            secs += time.perf_counter() - t0
            samples.append(s)
        s = torch.cat(samples)
        with torch.no_grad():
            dec = probe(s)[:, 0] > 0
        if ref_samples is None:
            ref_samples, ref_occ = s, dec
        iou = iou_matrix(dec, occ)                                   # [n * seeds, n]
        inter = (dec & ref_occ).flatten(1).sum(1).double()
        union = (dec | ref_occ).flatten(1).sum(1).double()
        iou_t25 = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        own = torch.arange(n).repeat(seeds)
        d_lat = torch.cdist(s.flatten(1).double(), x_flat.double()).pow(2) / x_flat.shape[1]
        nfe = steps * (2 if (w_t if kind == "teacher" else w_s) > 0 else 1)
        results.append({"sampler": f"{kind} {steps}-step", "kind": kind, "steps": steps, "nfe": nfe,
                        "mse_t25": float((s - ref_samples).pow(2).mean()), "iou_t25": float(iou_t25.mean()),
                        "iou_nn": float(iou.max(1).values.mean()), "iou_cond": float(iou[torch.arange(len(own)), own].mean()),
                        "latent_nn": float(d_lat.min(1).values.mean()),
                        "ms_per_sample": 1000.0 * secs / (n * seeds)})
    ref = next(r for r in results if r["kind"] == "teacher" and r["steps"] == 25)
    for r in results:
        r["speedup_vs_teacher25"] = ref["ms_per_sample"] / max(r["ms_per_sample"], 1e-9)
    return {"samples_per_sampler": n * seeds, "cfg_strength": w_t, "rows": results}


def table(res: dict) -> str:
    head = (f"| {'sampler':<16} | {'NFE':>3} | {'MSE to T25':>10} | {'IoU to T25':>10} | {'IoU nearest':>11} | "
            f"{'IoU cond':>8} | {'ms/sample':>9} | {'speed-up':>8} |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in res["rows"]:
        lines.append(f"| {r['sampler']:<16} | {r['nfe']:>3} | {r['mse_t25']:>10.4f} | {r['iou_t25']:>10.3f} | "
                     f"{r['iou_nn']:>11.3f} | {r['iou_cond']:>8.3f} | {r['ms_per_sample']:>9.1f} | "
                     f"{r['speedup_vs_teacher25']:>7.1f}x |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"

    import ray
    import ray.data

    from pipelines.cluster import init_ray
    from pipelines.distill import run as run_distill

    with clock.phase("start Ray (local, 2 CPUs, no dashboard)"):
        init_ray(num_cpus=2)
        ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        with clock.phase("tiny models (random DINOv2, SS/SLat encoders)"):
            models = prepare_models(out)
        data = out / "preprocess"
        with clock.phase(f"preprocess {args.assets} synthetic assets (Ray Data)"):
            if not (data / "manifest.json").exists():
                data = preprocess(out, args.assets, models)
            else:
                print(f"reusing {data}", flush=True)
            data = str(data)
        with clock.phase("occupancy probe (stand-in SS decoder)"):
            probe = out / "models" / "ss_occupancy_probe"
            probe = fit_probe(out, data) if not Path(str(probe) + ".json").exists() else str(probe)

        with clock.phase("teacher: flow matching (Ray Train)"):
            tcfg = distill_cfg("demo-teacher", out, data, models, probe, tracking_uri, "flow_matching", None,
                               args.teacher_steps, ["optim.lr=2.0e-3", "ema.rate=0.99", "snapshot.every=0",
                                                    "model.export_stem=ss_flow_demo_teacher"] + args.overrides)
            tres = run_distill(tcfg)
            if tres.error or not tres.export_dir:
                raise RuntimeError(f"teacher training failed: {tres.error}")
            teacher_path = str(Path(tres.export_dir) / "ema" / tcfg.model.export_stem)
            print(f"teacher: {teacher_path}", flush=True)

        with clock.phase("student: MDT-dist (Ray Train)"):
            scfg = distill_cfg("demo-mdt", out, data, models, probe, tracking_uri, "mdt", teacher_path,
                               args.distill_steps, args.overrides)
            sres = run_distill(scfg)
            if sres.error or not sres.export_dir:
                raise RuntimeError(f"distillation failed: {sres.error}")
            student_path = str(Path(sres.export_dir) / "ema" / scfg.model.export_stem)
            print(f"student: {student_path}", flush=True)

        with clock.phase("compare: student 1/2/4 steps vs teacher 25 steps"):
            res = evaluate(teacher_path, student_path, data, probe, scfg, args.seeds)
    finally:
        ray.shutdown()

    total = time.time() - clock.t0
    res.update({"teacher": teacher_path, "student": student_path, "data": data, "phases_s": clock.phases,
                "total_s": round(total, 1), "mlflow_tracking_uri": tracking_uri,
                "mlflow_runs": {"teacher": tres.mlflow_run_id, "student": sres.mlflow_run_id}})
    t1 = next(r for r in res["rows"] if r["sampler"] == "teacher 1-step")
    s1 = next(r for r in res["rows"] if r["sampler"] == "student 1-step")
    # The distillation target is the 25-step teacher: the 1-step student must land clearly closer to it (from the
    # same noise and condition) than the teacher's own 1-step sample, in latent space and as a decoded shape.
    res["student1_beats_teacher1"] = bool(s1["mse_t25"] < 0.5 * t1["mse_t25"] and s1["iou_t25"] > t1["iou_t25"])
    run_dir = Path(sres.run_dir)
    (run_dir / "results.json").write_text(json.dumps(res, indent=2))
    (out / "results.json").write_text(json.dumps(res, indent=2))
    try:
        from mdt.training import tracking

        c = tracking.client(tracking_uri)
        for r in res["rows"]:
            key = r["sampler"].replace(" ", "_")
            for m in ("mse_t25", "iou_t25", "iou_nn", "iou_cond", "latent_nn", "ms_per_sample"):
                c.log_metric(sres.mlflow_run_id, f"eval.{key}.{m}", r[m])
        c.log_artifact(sres.mlflow_run_id, str(out / "results.json"), "eval")
    except Exception as e:  # the table is on disk either way
        log.warning("could not log the comparison to MLflow: %s", e)

    print("\n" + table(res))
    print(f"\n{res['samples_per_sampler']} samples per sampler ({args.seeds} seeds x every asset's condition), "
          f"CFG {res['cfg_strength']}. 'T25' = the 25-step teacher's sample from the same noise and condition "
          f"(MSE per latent element; IoU of the decoded 16³ occupancies); 'IoU nearest' / 'IoU cond' = decoded "
          f"occupancy vs the closest training shape / the conditioning asset's shape.")
    print(f"student 1-step vs teacher 1-step: MSE to the 25-step teacher {s1['mse_t25']:.4f} vs {t1['mse_t25']:.4f} "
          f"({t1['mse_t25'] / max(s1['mse_t25'], 1e-12):.1f}x closer), decoded-shape IoU with it {s1['iou_t25']:.3f} vs "
          f"{t1['iou_t25']:.3f} -> {'student better' if res['student1_beats_teacher1'] else 'NOT better'}")
    print(f"\nresults: {out / 'results.json'} (and {run_dir / 'results.json'})")
    phases = ", ".join(f"{k.split(' (')[0]}: {v:.0f}s" for k, v in clock.phases.items())
    print(f"total wall time: {total / 60:.1f} min  ({phases})")
    print(f"\nMLflow UI:  {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {tracking_uri} "
          f"--host 127.0.0.1 --port 5000   then open http://127.0.0.1:5000 (experiment 'mdt-distill-demo': "
          f"runs demo-teacher and demo-mdt, snapshots under Artifacts/snapshots)")
    return 0 if res["student1_beats_teacher1"] else 3


if __name__ == "__main__":
    sys.exit(main())
