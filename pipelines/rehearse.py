"""The shipped `trellis*` presets end to end on one CPU machine (`make rehearse`), at the released model sizes:

    python -m pipelines.rehearse [--output outputs/rehearse] [--asset ../shared/assets/glb/kenney_tree.glb]
    python -m pipelines.rehearse --tiny      # the same driver on tiny models and few small views (tests)
    python -m pipelines.rehearse --plan      # print the stages, commands and overrides; run nothing
    python -m pipelines.rehearse --from distill-slat   # rerun a stage and those after it (earlier results kept)
    python -m pipelines.rehearse --stages preprocess   # rerun only the named stages

Stages, each the user's command (`jobs/*.py --preset ...`) in its own process:

1. models: a local cache of random-weight checkpoints in TRELLIS-image-large's layout (`mdt.generate.
   write_trellis_repo`, the SS/SLat encoders, a DINOv2 ViT-L/14-reg-shaped conditioner), written once, reused;
2. preprocess --preset trellis: one real asset (150 views at 512 px, 24 condition views, 64³ voxels, features,
   both encoders);
3. distill --preset trellis-ss, then --preset trellis-slat: one step each (teacher in its checkpoint dtype, bf16
   autocast, gradient checkpointing, as shipped);
4. export: the EMA student each run exported, loaded back in TRELLIS format (and copied to `<output>/students`);
5. generate --preset trellis with both students at 1+1 steps;
6. evaluate --preset trellis on that asset: the whole chain, the 1-step samplers.

Only what a single CPU-only machine forces is overridden (device, worker and actor counts, GPU resources, batch,
steps, Cycles samples and denoiser, bf16 where a preset's fp16 is for GPUs, generate's warm-up, which samplers
run, the measurements that only repeat work at one step (fixed-batch loss, snapshots, latency rows), no network
for feature nets, the stages' thread count); each override is printed with its reason. Per stage: wall time, peak resident memory of
its whole process tree (GiB), shapes at its output boundary -> `<output>/report.json` (`{"stages": [{"name",
"ok", "wall_s", "peak_rss_gb", ...}], ...}`) and `report.md`.
Exit 1 when a stage fails (the following stages are not run), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
import io
import platform

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ASSET = ROOT.parent / "shared" / "assets" / "glb" / "kenney_tree.glb"
RSS_LIMIT_GIB = 22.0  # the acceptance limit; every peak_rss_gb figure is in GiB (2**30 bytes)


@dataclass
class Override:
    key: str
    value: object
    why: str

    def arg(self) -> list[str]:
        v = self.value
        text = json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)
        return ["--set", f"{self.key}={text}"]


@dataclass
class Stage:
    name: str
    argv: list[str]                     # the command (after the Python interpreter)
    overrides: list[Override] = field(default_factory=list)

    def command(self) -> list[str]:
        return [sys.executable, *self.argv, *[a for o in self.overrides for a in o.arg()]]


# ------------------------------------------------------------------------------------------------ models

ENCODER_ARGS = {   # the released ckpts/*.json (reference section 1)
    "ss_enc_conv3d_16l8_fp16": ("SparseStructureEncoder", dict(
        in_channels=1, latent_channels=8, num_res_blocks=2, num_res_blocks_middle=2, channels=[32, 128, 512],
        use_fp16=True)),
    "slat_enc_swin8_B_64l8_fp16": ("SLatEncoder", dict(
        resolution=64, in_channels=1024, model_channels=768, latent_channels=8, num_blocks=12, num_heads=12,
        mlp_ratio=4, attn_mode="swin", window_size=8, use_fp16=True)),
}


def model_paths(models: Path, tiny: bool) -> dict[str, str]:
    from mdt.models.zoo import TRELLIS_STEMS  # heavy: torch, safetensors

    repo = models / "TRELLIS-image-large"
    paths = {k: str(repo / "ckpts" / stem) for k, stem in TRELLIS_STEMS.items()}
    paths.update(repo=str(repo), dinov2=str(models / "dinov2-vitl14-reg"))
    if tiny:
        paths.update(ss_encoder=str(models / "encoders" / "ss_enc_tiny"),
                     slat_encoder=str(models / "encoders" / "slat_enc_tiny"))
    else:
        paths.update({k: str(repo / "ckpts" / stem) for k, stem in
                      (("ss_encoder", "ss_enc_conv3d_16l8_fp16"), ("slat_encoder", "slat_enc_swin8_B_64l8_fp16"))})
    return paths


def write_models(models: Path, tiny: bool) -> dict:
    """The random-weight cache (each part skipped when present). Returns paths, parameter counts, disk use."""
    import torch  # heavy: torch, numpy

    from mdt.models.zoo import save_tiny_dinov2  # heavy: torch, safetensors
    from mdt.models.zoo import write_trellis_repo  # heavy: torch, safetensors
    from mdt.models import build_model, save_pretrained  # heavy: torch, safetensors
    from mdt.models.zoo import save_tiny_encoders  # heavy: torch, safetensors

    paths = model_paths(models, tiny)
    repo = Path(paths["repo"])
    if not (repo / "pipeline.json").exists():
        write_trellis_repo(repo, full_size=not tiny, cond_channels=64)
    if not (Path(paths["dinov2"]) / "config.json").exists():
        if tiny:
            save_tiny_dinov2(paths["dinov2"], hidden_size=64)
        else:
            save_tiny_dinov2(paths["dinov2"], hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)
    if not Path(paths["ss_encoder"] + ".json").exists():
        if tiny:
            save_tiny_encoders(Path(paths["ss_encoder"]).parent, feature_channels=64)
        else:
            for stem, (name, args) in ENCODER_ARGS.items():
                torch.manual_seed(0)
                model = build_model(name, dict(args)).float()
                g = torch.Generator().manual_seed(1)
                with torch.no_grad():    # zero-initialised output layers would give all-zero latents: redraw all
                    for pname, p in model.named_parameters():
                        if p.ndim == 1:
                            base = 1.0 if ("norm" in pname and pname.endswith("weight")) else 0.0
                            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
                        else:
                            p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5))
                model.convert_to_fp16()
                save_pretrained(model, repo / "ckpts" / stem)
    size = sum(f.stat().st_size for f in models.rglob("*") if f.is_file())
    params = {}
    for key in ("ss_flow", "slat_flow", "ss_decoder", "slat_decoder_gs", "slat_decoder_mesh", "ss_encoder",
                "slat_encoder"):
        meta = json.loads(Path(paths[key] + ".json").read_text())
        params[key] = sum(p.numel() for p in build_model(meta["name"], meta["args"], device="meta").parameters())
    return {"paths": paths, "parameters": params, "disk_gb": size / 1e9}


# ------------------------------------------------------------------------------------------------ plan

# measured with the cached random-weight checkpoint, batch 1, 4096 tokens + 1374 condition tokens, one thread, on the
# 2-core machine under load (load average 10): 61 s under bf16 autocast, 76 s in float32
FORWARD_COST = "one full-size SS flow forward takes about 60 s on this CPU"
# `python -m mdt.bench.cpu_gemm` on the 2-core machine (AMD EPYC with AVX512-BF16, no AVX512-FP16), 4096x1024x4096:
# float32 168, bfloat16 351, float16 42 GFLOPS
HALF_CPU = "this CPU has no fast fp16 (GEMM: fp16 42, fp32 168, bf16 351 GFLOPS, python -m mdt.bench.cpu_gemm)"


# Ray gives an actor or train worker floor(num_cpus) >= 1 threads (OMP_NUM_THREADS) unless the variable is set.
# The stages run one after another and one asset moves through a stage's actors one at a time, so each may use all
# the cores: the DINOv2 ViT-L/14 features of one 518-px view took 7.0 s on 2 threads (idle machine, float32), i.e.
# 150 views in 17.5 min, twice that on one thread.
THREAD_ENV = [Override("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))),
                       "the stages run one at a time: each may use every core (Ray would give a fractional-CPU "
                       "actor one thread)")]


def cpu_overrides(kind: str) -> list[Override]:
    """What a CPU-only single machine forces, per job kind, with the reason."""
    no_gpu = "no GPU on this machine"
    two = "one 2-core machine: one actor per stage"
    if kind == "preprocess":
        # every stage's actor pool starts at once: their CPUs must add up to the machine's 2
        cpus = {"download": 0.25, "render": 0.5, "voxelize": 0.25, "features": 0.5, "encode": 0.25, "write": 0.25}
        ov = [Override(f"resources.{s}", {"concurrency": 1, "num_cpus": c, "num_gpus": 0},
                       f"{no_gpu}; {two}, CPUs adding up to 2") for s, c in cpus.items()]
        return ov + [Override("ray.num_cpus", 2, "local Ray instance on the 2-core machine"),
                     Override("render.samples", 16, "time: Cycles on 2 CPU cores, one 512-px view 7.0 s at 128 "
                                                     "spp, 1.0 s at 16 (idle, without the denoiser): 150 views + 24 "
                                                     "at 1024 px in about 4 min instead of 29; views and resolution "
                                                     "unchanged"),
                     Override("cond.samples", 16, "time: as render.samples"),
                     Override("features.dtype", "bfloat16",
                              f"hardware: the preset's float16 is for GPUs; {HALF_CPU} (the features actor "
                              "runs float16 as float32 on a CPU); bf16 is this CPU's half precision"),
                     Override("render.denoise", False, "time: the denoiser adds 2.5 s to each 512-px view at 16 "
                                                       "spp (3.5 vs 1.0 s, idle, 2 cores), about 10 min for the "
                                                       "asset's 150 + 24 views")]
    if kind == "distill":
        return [Override("scaling.use_gpu", False, no_gpu),
                Override("scaling.num_workers", 1, "one 2-core machine (FSDP is off in the preset)"),
                Override("scaling.cpus_per_worker", 1, "one 2-core machine: one core for the worker, one for data"),
                Override("scaling.backend", "gloo", "nccl needs GPUs"),
                Override("ray.num_cpus", 2, "local Ray instance on the 2-core machine"),
                Override("data.batch_size", 1, "time and memory: one sample (the asset) on a CPU; 8 per GPU "
                                               "is sized for 80 GB cards"),
                Override("data.batch_split", 1, "follows data.batch_size 1"),
                Override("data.shuffle_buffer", 0, "one asset"),
                Override("train.max_steps", 1, "time: one step proves the wiring at full size"),
                Override("train.ckpt_every", 1, "follows max_steps 1"),
                Override("train.precision", "bf16", "bf16 autocast as on GPU (the CPU supports it; 'auto' "
                                                    "means fp32 on CPU)"),
                Override("train.fixed_batch_loss", False,
                         "time: a progress curve compared between logs, and one step has one log; it repeats the "
                         f"step's objective without grad in float32 (both teacher CFG calls, three student calls: "
                         f"about 9 full-size forwards; {FORWARD_COST})"),
                Override("snapshot.num_conditions", 0,
                         "time: a snapshot samples the teacher and the student at full size, at step 0 and at the "
                         "end (about 5 + 2.5 min for the SS stage, 2 + 1 min for SLat, measured in a full-size "
                         "run); the generate and evaluate stages sample both students")]
    if kind == "generate":
        return [Override("device", "cpu", no_gpu),
                Override("precision", "bf16", f"hardware: the preset's fp16 torso is for GPUs; {HALF_CPU}"),
                Override("warmup", False, "time: the untimed warm-up is one more whole chain (full-size mesh decoder "
                                          "included); CPU latencies are not the GPU plan's")]
    if kind == "evaluate":
        return [Override("compute", {"num_actors": 1, "num_gpus": 0, "num_cpus": 1, "batch_size": 1,
                                     "max_voxels_per_chunk": 100000, "torch_threads": 2, "precision": "bf16"},
                         f"{no_gpu}; one actor on one of the 2 CPUs (the other reads the shards), 2 threads; "
                         f"bf16 torso: the preset's fp16 is for GPUs, {HALF_CPU}"),
                Override("ray", {"num_cpus": 2}, "local Ray instance on the 2-core machine"),
                Override("data.split", "all", "one asset: the hash split could leave the holdout empty"),
                Override("samplers", [{"model": "teacher", "steps": 1}, {"model": "student", "steps": 1}],
                         f"time: the 1-step samplers only; {FORWARD_COST} (TRELLIS's 25 + 25 steps with CFG in "
                         "[0.5, 1]: about 37 SS and 37 SLat forwards per chain)"),
                Override("sampling.reference", "teacher 1-step", "follows samplers (the 25-step teacher is not run)"),
                Override("latency", {"enabled": False},
                         "time: each latency row is one more whole chain per sampler (the SLat flow on the decoded "
                         "voxels: minutes per call on this CPU); generate's timings measure the students' 1+1 "
                         "chain at full size"),
                Override("metrics.inception", "outputs/no-inception-weights.pt",
                         "no network: the feature nets fall back to named random networks"),
                Override("metrics.dinov2", "outputs/no-dinov2-weights", "no network: as metrics.inception")]
    raise ValueError(kind)


def tiny_overrides(kind: str) -> list[Override]:
    """--tiny only: test-sized views and images (the full-size rehearsal never changes these)."""
    why = "tiny mode (test size)"
    if kind == "preprocess":
        return [Override("render.num_views", 4, why), Override("render.resolution", 64, why),
                Override("render.samples", 2, why), Override("cond.num_views", 2, why),
                Override("cond.render_resolution", 64, why), Override("cond.samples", 2, why),
                Override("cond.image_size", 56, why), Override("features.image_size", 56, why)]
    if kind == "distill":
        return [Override("condition.image_size", 56, why)]
    if kind == "generate":
        return [Override("image_size", 56, why), Override("decode.formats", ["gaussians"], why),
                Override("preview", {"png": False, "html": False}, why)]
    if kind == "evaluate":
        return [Override("condition.image_size", 56, why),
                Override("samplers", [{"model": "teacher", "steps": 2}, {"model": "teacher", "steps": 1},
                                      {"model": "student", "steps": 1}], why),
                Override("sampling.reference", "teacher 2-step", why),
                Override("metrics", {"views": 2, "render_size": 32, "inception": "outputs/no-inception-weights.pt",
                                     "dinov2": "outputs/no-dinov2-weights"}, why)]
    return []


def plan(out: Path, asset: Path, tiny: bool) -> list[Stage]:
    models = out / "models"
    p = model_paths(models, tiny)
    py = "jobs/"
    tracking = f"sqlite:///{out / 'mlflow.db'}"
    extra = tiny_overrides if tiny else (lambda kind: [])
    assets = out / "asset"
    stages = [Stage("models", ["-m", "pipelines.rehearse", "--write-models", str(models)] + (["--tiny"] if tiny else []))]
    pre = [Override("features.checkpoint", p["dinov2"], "local random-weight DINOv2 ViT-L/14-reg (no hub access)"),
           Override("encode.ss_encoder", p["ss_encoder"], "local random-weight encoder in the released layout"),
           Override("encode.slat_encoder", p["slat_encoder"], "as encode.ss_encoder")]
    stages.append(Stage("preprocess", [py + "preprocess.py", "--preset", "trellis", "--source", f"local:{assets}",
                                       "--output", str(out / "preprocess")],
                        pre + cpu_overrides("preprocess") + extra("preprocess")))
    for stage in ("ss", "slat"):
        ov = [Override("condition.model", p["dinov2"], "local random-weight DINOv2 (no hub access)"),
              Override("mlflow.tracking_uri", tracking, "a local MLflow store")]
        if stage == "ss":
            ov.append(Override("snapshot.decoder", p["ss_decoder"], "local random-weight SS decoder"))
        stages.append(Stage(f"distill-{stage}", [
            py + "distill.py", "--preset", f"trellis-{stage}", "--data", str(out / "preprocess"),
            "--teacher", p[f"{stage}_flow"], "--output", str(out / "distill"), "--name", f"rehearse-{stage}"],
            ov + cpu_overrides("distill") + extra("distill")))
    stages.append(Stage("export", ["-m", "pipelines.rehearse", "--check-export", str(out / "distill"),
                                   str(out / "students")]))
    students = {s: str(out / "students" / stem) for s, stem in STUDENT_STEMS.items()}
    stages.append(Stage("generate", [
        py + "generate.py", "--preset", "trellis", "--image", str(out / "condition.png"),
        "--output", str(out / "generate"), "--ss-model", students["ss"], "--slat-model", students["slat"],
        "--ss-steps", "1", "--slat-steps", "1"],
        [Override("models.pipeline", p["repo"], "local random-weight copy of the repository"),
         Override("models.dinov2", p["dinov2"], "local random-weight DINOv2")]
        + cpu_overrides("generate") + extra("generate")))
    stages.append(Stage("evaluate", [
        py + "evaluate.py", "--preset", "trellis", "--data", str(out / "preprocess"), "--teacher", p["ss_flow"],
        "--student", students["ss"], "--decoder", p["ss_decoder"], "--slat-teacher", p["slat_flow"],
        "--slat-student", students["slat"], "--slat-decoder", p["slat_decoder_gs"], "--output", str(out / "eval")],
        [Override("condition.model", p["dinov2"], "local random-weight DINOv2"),
         Override("mlflow.tracking_uri", tracking, "a local MLflow store")]
        + cpu_overrides("evaluate") + extra("evaluate")))
    return stages


# ------------------------------------------------------------------------------------------------ measuring

def tree_rss_bytes(root: int) -> int:
    """Resident memory of `root` and all its descendants (one /proc scan)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(parts[1]), []).append(int(d))     # field 4: ppid
            rss[int(d)] = int(parts[21]) * page                        # field 24: rss pages
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def machine_state() -> dict:
    """What else the machine is doing: 1-min load average and MemAvailable (GB), for the 'under load' notes."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = round(int(line.split()[1]) * 1024 / 1e9, 1)
    except OSError:
        pass
    return {"load_average": round(os.getloadavg()[0], 1), "mem_available_gb": avail}


def run_measured(cmd: list[str], log_path: Path, env: dict) -> tuple[int, float, float]:
    """(return code, wall s, peak GiB of the process tree's resident memory, sampled every 0.5 s)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        peak = [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
                done.wait(0.5)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        done.set()
        th.join()
    return rc, time.perf_counter() - start, peak[0] / 2 ** 30


def boundary(stage: str, out: Path, tiny: bool) -> dict:
    """Shapes and figures at a stage's output (what the next stage receives)."""
    import numpy as np  # heavy: numpy

    if stage == "models":
        return json.loads((out / "models" / "models.json").read_text())
    if stage == "preprocess":

        from PIL import Image  # heavy: PIL

        from pipelines.preprocess import shards  # heavy: pyarrow, numpy

        rows = list(shards.iter_rows(str(out / "preprocess")))
        if not rows:
            raise RuntimeError("preprocessing wrote no rows")
        r = rows[0]
        coords = np.frombuffer(r["slat_coords"], np.uint8).reshape(-1, 3)
        n = coords.shape[0]
        (out / "condition.png").write_bytes(r["cond_images"][0])
        image = Image.open(io.BytesIO(r["cond_images"][0]))
        return {"rows": len(rows), "voxels": int(n),
                "slat_transformer_tokens": int(np.unique(coords // 2, axis=0).shape[0]),
                "ss_transformer_tokens": 16 ** 3,
                "shapes": {"ss_latent": [8, 16, 16, 16] if len(r["ss_latent"]) == 8 * 16 ** 3 * 4 else
                           f"{len(r['ss_latent'])} bytes",
                           "slat_coords": [n, 3], "slat_feats": [n, len(r["slat_feats"]) // (4 * n)],
                           "cond_images": [len(r["cond_images"]), image.height, image.width, len(image.getbands())]}}
    if stage.startswith("distill-"):
        s = stage.split("-", 1)[1]
        run = out / "distill" / f"rehearse-{s}"
        files = sorted(str(p.relative_to(run)) for p in run.glob("**/export/*/*.json"))
        if not files:
            raise RuntimeError(f"{run}: no exported checkpoint")
        return {"exported": files}
    if stage == "export":
        return json.loads((out / "distill" / "export_check.json").read_text())
    if stage == "generate":
        files = sorted(str(p.relative_to(out / "generate")) for p in (out / "generate").rglob("*") if p.is_file())
        return {"files": files[:20], "count": len(files)}
    if stage == "evaluate":
        found = sorted((out / "eval").rglob("results.json"))
        if not found:
            raise RuntimeError("no evaluation results.json")
        res = json.loads(found[-1].read_text())
        return {"samplers": [r.get("sampler") for r in res.get("rows", [])]}
    return {}


STUDENT_STEMS = {"ss": "ss_flow_img_dit_L_16l8_fp16_mdt", "slat": "slat_flow_img_dit_L_64l8p2_fp16_mdt"}


def check_export(distill: Path, students: Path) -> int:
    """Find each run's exported EMA student (`<run>/checkpoint_*/export/ema/<stem>`, the latest), load it back
    in TRELLIS format, record class, parameters and dtypes, and copy it to `students/` for the next stages."""
    from mdt.models import from_pretrained  # heavy: torch, safetensors

    found = {}
    students.mkdir(parents=True, exist_ok=True)
    for stage, stem in STUDENT_STEMS.items():
        metas = sorted((distill / f"rehearse-{stage}").glob(f"**/export/ema/{stem}.json"), key=lambda p: p.stat().st_mtime)
        if not metas:
            print(f"export: no exported {stem} under {distill / f'rehearse-{stage}'}", file=sys.stderr)
            return 1
        src = metas[-1].with_suffix("")
        model = from_pretrained(str(src), device="cpu", keep_fp16=True)
        found[stage] = {"exported": str(src), "class": type(model).__name__,
                        "dtypes": sorted({str(v.dtype) for v in model.state_dict().values()}),
                        "parameters": sum(p.numel() for p in model.parameters()), "args": model.trellis_args}
        del model
        for suffix in (".json", ".safetensors"):
            shutil.copy(str(src) + suffix, students / (stem + suffix))
    (distill / "export_check.json").write_text(json.dumps(found, indent=2, default=str))
    print(json.dumps(found, indent=2, default=str))
    return 0


# ------------------------------------------------------------------------------------------------ report

def status(report: dict) -> str:
    if report.get("failed"):
        return f"FAILED at {report['failed']}"
    if report.get("not_run"):
        return f"not run: {', '.join(report['not_run'])}"
    return f"peak RSS over the {RSS_LIMIT_GIB:g} GiB limit"


def markdown(report: dict) -> str:
    lines = [f"# Rehearsal of the trellis presets ({report['mode']})", "",
             (f"{report['machine']}; total {report['wall_s'] / 60:.1f} min; "
              f"{'every stage ok' if report['ok'] else status(report)}; "
              f"peak RSS {report['peak_rss_gb']:.1f} GiB (limit {RSS_LIMIT_GIB:g})"), "",
             "| stage | ok | wall s | peak RSS GiB | load average (start, end) | GB available at start |",
             "|---|---|---:|---:|---|---:|"]
    for s in report["stages"]:
        m = s.get("machine_at_start") or {}
        lines.append(f"| {s['name']}{' (earlier run)' if s.get('from_previous_run') else ''} | "
                     f"{'yes' if s['ok'] else 'NO'} | {s['wall_s']:.0f} | {s['peak_rss_gb']:.2f} | "
                     f"{m.get('load_average', '')}, {m.get('load_average_end', '')} | {m.get('mem_available_gb', '')} |")
    lines += ["", "## Overrides (forced by a CPU-only machine)", ""]
    for s in report["stages"]:
        for o in s.get("overrides", []):
            lines.append(f"- {s['name']}: `{o['key']}={json.dumps(o['value'])}`: {o['why']}")
    for k, e in report.get("environment", {}).items():
        lines.append(f"- every stage: environment `{k}={e['value']}`: {e['why']}")
    if report.get("gpu_plan"):
        lines += ["", "## Figures for a GPU plan", "", "```", json.dumps(report["gpu_plan"], indent=2), "```"]
    for s in report["stages"]:
        if s.get("error"):
            lines += ["", f"{s['name']}: {s['error']}"]
    return "\n".join(lines) + "\n"


def gpu_plan(report: dict) -> dict:
    from mdt.bench import activations  # heavy: torch, safetensors

    plan = {"activation_memory_per_sample_float32": activations.full_size(activations.MEASURED)}
    for s in report["stages"]:
        if s["name"] == "models" and s["ok"]:
            plan["parameters"] = s["boundary"].get("parameters")
            plan["models_disk_gb"] = s["boundary"].get("disk_gb")
        if s["name"] == "preprocess" and s["ok"]:
            b = s["boundary"]
            plan["asset"] = {k: b[k] for k in ("voxels", "slat_transformer_tokens", "ss_transformer_tokens")}
            plan["activation_memory_per_sample_float32"] = activations.full_size(
                activations.MEASURED, b["voxels"], b["slat_transformer_tokens"])      # the asset's own tokens
    return plan


STAGE_NAMES = ("models", "preprocess", "distill-ss", "distill-slat", "export", "generate", "evaluate")


def select_stages(only: str | None, start: str | None) -> list[str]:
    """The stages to run: all, `--stages a,b` (a subset, in pipeline order) or `--from STAGE` (it and the rest).
    Raises ValueError on an unknown name."""
    if only is not None and start is not None:
        raise ValueError("--stages and --from exclude each other")
    if start is not None:
        if start not in STAGE_NAMES:
            raise ValueError(f"--from {start}: not a stage ({', '.join(STAGE_NAMES)})")
        return list(STAGE_NAMES[STAGE_NAMES.index(start):])
    if only is not None:
        names = [n.strip() for n in only.split(",") if n.strip()]
        bad = [n for n in names if n not in STAGE_NAMES]
        if bad or not names:
            raise ValueError(f"--stages {only}: unknown {', '.join(bad) or 'empty list'} ({', '.join(STAGE_NAMES)})")
        return [n for n in STAGE_NAMES if n in names]
    return list(STAGE_NAMES)


def merge_stages(previous: list[dict], new: list[dict]) -> list[dict]:
    """One entry per stage in pipeline order: the new run's entries replace the previous report's, the previous
    report's entries of stages not rerun are kept (marked `"from_previous_run": true`)."""
    by_name = {s["name"]: {**s, "from_previous_run": True} for s in previous}
    by_name.update({s["name"]: s for s in new})
    return [by_name[n] for n in STAGE_NAMES if n in by_name]


def write_report(out: Path, report: dict, previous: list[dict], ran: list[dict]) -> dict:
    """Merge this run's stage entries into the previous ones, derive the totals and write report.{json,md}."""
    report = {k: v for k, v in report.items() if k not in ("failed", "not_run")}
    report["stages"] = merge_stages(previous, ran)
    report["wall_s"] = sum(s["wall_s"] for s in report["stages"])      # all stages, earlier runs' included
    report["peak_rss_gb"] = max((s["peak_rss_gb"] for s in report["stages"]), default=0.0)
    if not all(s["ok"] for s in report["stages"]):
        report["failed"] = next(s["name"] for s in report["stages"] if not s["ok"])
    missing = [n for n in STAGE_NAMES if n not in {s["name"] for s in report["stages"]}]
    if missing:
        report["not_run"] = missing
    report["rss_unit"] = "GiB"                                          # of every peak_rss_gb
    report["ok"] = "failed" not in report and not missing and report["peak_rss_gb"] < RSS_LIMIT_GIB
    report["gpu_plan"] = gpu_plan(report)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(markdown(report))
    return report


def rehearse(out: Path, asset: Path, tiny: bool, stages: list[str] | None = None) -> dict:
    """Run `stages` (default all) in order, stop at the first failure, and write the report: the entries of
    stages not run this time come from `<out>/report.json` of an earlier run, when there is one."""

    out.mkdir(parents=True, exist_ok=True)
    (out / "asset").mkdir(exist_ok=True)
    target = out / "asset" / asset.name
    if not target.exists():
        shutil.copy(asset, target)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           **{o.key: o.value for o in THREAD_ENV}}
    for o in THREAD_ENV:
        print(f"  environment {o.key}={o.value}  ({o.why})", flush=True)
    report = {"mode": "tiny" if tiny else "full size", "asset": str(asset), "stages": [],
              "environment": {o.key: {"value": o.value, "why": o.why} for o in THREAD_ENV},
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    previous = []
    if stages is not None and (out / "report.json").exists():
        previous = json.loads((out / "report.json").read_text()).get("stages", [])
    ran: list[dict] = []
    for stage in plan(out, asset, tiny):
        if stages is not None and stage.name not in stages:
            continue
        print(f"\n=== {stage.name} ===", flush=True)
        for o in stage.overrides:
            print(f"  override {o.key}={json.dumps(o.value)}  ({o.why})", flush=True)
        cmd = stage.command()
        print("  $ " + " ".join(cmd[1:]), flush=True)
        machine = machine_state()
        print(f"  machine at start: load average {machine['load_average']}, "
              f"{machine['mem_available_gb']} GB available", flush=True)
        rc, wall, peak = run_measured(cmd, out / f"{stage.name}.log", env)
        machine["load_average_end"] = round(os.getloadavg()[0], 1)
        entry = {"name": stage.name, "ok": rc == 0, "wall_s": round(wall, 1), "peak_rss_gb": round(peak, 3),
                 "machine_at_start": machine,
                 "returncode": rc, "command": cmd[1:], "log": str(out / f"{stage.name}.log"),
                 "overrides": [{"key": o.key, "value": o.value, "why": o.why} for o in stage.overrides]}
        if rc == 0:
            try:
                entry["boundary"] = boundary(stage.name, out, tiny)
            except Exception as e:                                     # a stage that wrote nothing usable failed
                entry.update(ok=False, error=f"{type(e).__name__}: {e}")
        else:
            tail = (out / f"{stage.name}.log").read_text(errors="replace").strip().splitlines()[-1:]
            entry["error"] = f"exit {rc}: {tail[0] if tail else ''}"
        ran.append(entry)
        write_report(out, report, previous, ran)          # after each stage: an interrupted run keeps its figures
        print(f"=== {stage.name}: {'ok' if entry['ok'] else 'FAILED'} in {wall:.0f} s, peak RSS {peak:.2f} GiB ===",
              flush=True)
        if not entry["ok"]:
            break
    return write_report(out, report, previous, ran)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=None, help="default outputs/rehearse (--tiny: outputs/rehearse-tiny)")
    p.add_argument("--asset", default=str(DEFAULT_ASSET), help="one GLB file")
    p.add_argument("--tiny", action="store_true", help="tiny models and few small views (tests)")
    p.add_argument("--plan", action="store_true", help="print the stages and overrides, run nothing")
    p.add_argument("--stages", help=f"comma-separated subset to run ({','.join(STAGE_NAMES)}); the report keeps "
                                    "the other stages' entries of the previous run in --output")
    p.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and the ones after it")
    p.add_argument("--write-models", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--check-export", nargs=2, metavar=("DISTILL", "STUDENTS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.write_models:
        info = write_models(Path(a.write_models), a.tiny)
        Path(a.write_models, "models.json").write_text(json.dumps(info, indent=2))
        print(f"models: {info['disk_gb']:.2f} GB on disk in {a.write_models}")
        return 0
    if a.check_export:
        return check_export(Path(a.check_export[0]), Path(a.check_export[1]))
    out = Path(a.output or ("outputs/rehearse-tiny" if a.tiny else "outputs/rehearse")).resolve()
    asset = Path(a.asset).resolve()
    if not asset.is_file() or asset.suffix.lower() != ".glb":
        p.error(f"--asset {a.asset}: not a GLB file")
    try:
        selected = select_stages(a.stages, a.start) if (a.stages, a.start) != (None, None) else None
    except ValueError as e:
        p.error(str(e))
    if a.plan:
        for o in THREAD_ENV:
            print(f"environment of every stage: {o.key}={o.value}  # {o.why}")
        for stage in plan(out, asset, a.tiny):
            if selected is not None and stage.name not in selected:
                continue
            print(f"{stage.name}: {' '.join(stage.command()[1:])}")
            for o in stage.overrides:
                print(f"    {o.key}={json.dumps(o.value)}  # {o.why}")
        return 0
    report = rehearse(out, asset, a.tiny, selected)
    print(f"\n-> {out / 'report.json'}, {out / 'report.md'}")
    if not report["ok"]:
        why = (f"stage {report['failed']} failed" if "failed" in report
               else f"stages not run yet: {', '.join(report['not_run'])}" if report.get("not_run")
               else f"peak RSS {report['peak_rss_gb']:.1f} GiB >= {RSS_LIMIT_GIB:g}")
        print(f"rehearse: {why} (see {out / 'report.md'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
