"""The CPU demo end to end (`make demo`, jobs/demo.py): preprocessing -> teacher -> MDT-dist student -> generate ->
evaluate, on one private local Ray instance and a local MLflow store (`<output>/mlflow.db`).

    result = run(load_config(DemoConfig, "cpu", prefix="demo_"))      # jobs/configs/demo_cpu.yaml

1. tiny models: a random DINOv2 (conditioning and features) and tiny SS/SLat encoders, the SS encoder's latents
   standardised per channel on simple shapes (`mdt.eval.calibration`);
2. `assets` simple single-primitive shapes written as GLB files -> the preprocessing job's Ray Data graph
   (`jobs/configs/preprocess_demo.yaml`: Blender renders, voxelizer, features, encoders) -> shards;
3. an `OccupancyProbe` (latent -> 16³ occupancy, `mdt.eval.snapshots`) fitted on the shards: the demo's SS
   decoder (the tiny random encoder has no VAE decoder);
4. a small SS-stage teacher trained with flow matching, then distilled with MDT-dist (VM + VD) into a student
   (the distillation driver, presets `distill_demo`);
5. image -> 3-D with the student for a few condition images (the generation chain, `generate_demo`);
6. the evaluation job (`evaluate_demo`): teacher 25/4/2/1 and student 1/2/4 steps (+ 2/4 re-noised) -> the final table;
7. data-free (`data_free.enabled`): the synthesis job (`synthesize_demo`) turns the condition images into the
   teacher's own samples, a second student is distilled from them with the same MDT-dist budget and evaluated on
   the same assets and seeds; its rows ("data-free student N-step") join the final table.
Finished stages are reused when `output` already holds them (`fresh: true` starts over).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
import sys
from mdt.config import load_config
from pipelines.common.config import RayConfig
from pipelines.preprocess.config import PreprocessConfig

log = logging.getLogger(__name__)


@dataclass
class DemoAssetsConfig:
    count: int = 8
    families: list[str] = field(default_factory=lambda: ["box", "sphere", "cylinder", "cone", "torus", "capsule"])
    seed: int = 0


@dataclass
class DemoTeacherConfig:
    steps: int = 400                    # flow-matching steps
    overrides: list[str] = field(default_factory=list)  # on top of the distill_demo preset


@dataclass
class DemoStudentConfig:
    steps: int | None = None            # MDT-dist steps (None: the distill_demo preset's)
    overrides: list[str] = field(default_factory=list)


@dataclass
class DemoProbeConfig:
    steps: int = 200
    hidden: int = 16
    noise_std: float = 0.0              # latent noise during fitting: a decoder tolerant of sampling error


@dataclass
class DemoDataFreeConfig:
    enabled: bool = True                # synthesize -> distil -> evaluate a data-free student beside the other
    overrides: list[str] = field(default_factory=list)  # on top of the synthesize_demo preset


@dataclass
class DemoConfig:
    output: str = "outputs/demo"
    fresh: bool = False
    assets: DemoAssetsConfig = field(default_factory=DemoAssetsConfig)
    probe: DemoProbeConfig = field(default_factory=DemoProbeConfig)
    teacher: DemoTeacherConfig = field(default_factory=DemoTeacherConfig)
    student: DemoStudentConfig = field(default_factory=DemoStudentConfig)
    data_free: DemoDataFreeConfig = field(default_factory=DemoDataFreeConfig)
    generate_images: int = 2            # condition images turned into 3-D by the student
    evaluate_overrides: list[str] = field(default_factory=list)  # on top of the evaluate_demo preset
    min_teacher_iou: float = 0.5        # the teacher's 25-step samples vs their conditioning shapes
    min_generated_iou: float = 0.5      # generated (student 1-step) occupancies vs their conditioning assets, mean
    structured_latents: bool = True     # SS encoder latents = a smooth function of the shape (else random)


@dataclass
class DemoResult:
    results: dict
    table: str
    ok: bool
    reasons: list[str]


class Clock:
    """Named phases with wall times, printed as they start and end."""

    def __init__(self):
        self.t0 = time.time()
        self.phases: dict[str, float] = {}

    def phase(self, name: str):
        clock = self

        class _Phase:
            def __enter__(self):
                self.t = time.time()
                print(f"\n=== {name} ===", flush=True)

            def __exit__(self, *exc):
                clock.phases[name] = round(time.time() - self.t, 1)
                print(f"=== {name}: {clock.phases[name]:.0f} s (total {time.time() - clock.t0:.0f} s) ===",
                      flush=True)
        return _Phase()


# ------------------------------------------------------------------------------------------------ stages


def distill_driver():
    """The Ray Train distillation driver: `run(DistillJobConfig) -> result` (.error, .export_dir, .run_dir,
    .mlflow_run_id)."""
    from pipelines.distill.driver import run  # heavy: pyarrow, numpy
    return run


def prepare_models(out: Path, structured_latents: bool = True) -> dict[str, str]:
    """Tiny random DINOv2 and SLat encoder; the SS encoder with occupancy-fraction weights (`structured_latents`,
    `mdt.eval.calibration.set_occupancy_fraction_weights`) or random ones, standardised on simple shapes."""
    import numpy as np  # heavy: numpy
    import torch  # heavy: torch, numpy

    from mdt.models.zoo import save_tiny_dinov2  # heavy: torch, safetensors
    from mdt.eval.calibration import set_occupancy_fraction_weights, standardize_latents  # heavy: torch, safetensors
    from mdt.models import from_pretrained, save_pretrained  # heavy: torch, safetensors
    from mdt.models.zoo import save_tiny_encoders  # heavy: torch, safetensors
    from pipelines.preprocess.synthetic_meshes import box_surface_voxels, sphere_surface_voxels  # heavy: trimesh, scipy

    d = out / "models"
    paths = {"dinov2": str(d / "tiny-dinov2"), "ss_encoder": str(d / "ss_enc_tiny"),
             "slat_encoder": str(d / "slat_enc_tiny")}
    if not (d / "tiny-dinov2" / "config.json").exists():
        save_tiny_dinov2(d / "tiny-dinov2", hidden_size=64)
    if not Path(paths["ss_encoder"] + ".json").exists():
        save_tiny_encoders(d, feature_channels=64)
        shapes = [sphere_surface_voxels((0, 0, 0), r, 64) for r in (0.15, 0.25, 0.35, 0.45)]
        shapes += [box_surface_voxels((-a, -b, -c), (a, b, c), 64)
                   for a, b, c in ((0.4, 0.2, 0.1), (0.1, 0.3, 0.45), (0.3, 0.3, 0.3), (0.45, 0.1, 0.25))]
        enc = from_pretrained(paths["ss_encoder"])
        if structured_latents:
            set_occupancy_fraction_weights(enc)
        standardize_latents(enc, torch.from_numpy(np.stack(shapes)).float()[:, None])
        save_pretrained(enc, paths["ss_encoder"])
    return paths


def write_assets(directory: Path, cfg: DemoAssetsConfig) -> str:
    """`count` single primitives, one per GLB, families taken in turn, centred, upright, random sizes."""
    import numpy as np  # heavy: numpy

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    for i in range(cfg.count):
        data = primitive_glb(cfg.families[i % len(cfg.families)], rng)
        path = directory / f"shape_{i:02d}.glb"
        if not path.exists():
            path.write_bytes(data)
    return str(directory)


def primitive_glb(family: str, rng) -> bytes:
    """One centred primitive filling most of the unit cube, a random size and a single random colour (GLB)."""
    import numpy as np  # heavy: numpy
    import trimesh  # heavy: trimesh, scipy

    c = trimesh.creation
    s = rng.uniform(0.75, 1.0)
    if family == "box":
        mesh = c.box(extents=s * rng.uniform(0.5, 1.0, size=3))
    elif family == "sphere":
        mesh = c.icosphere(subdivisions=3, radius=0.5 * s)
    elif family == "cylinder":
        mesh = c.cylinder(radius=s * rng.uniform(0.25, 0.45), height=s, sections=32)
    elif family == "cone":
        mesh = c.cone(radius=s * rng.uniform(0.3, 0.5), height=s, sections=32)
        mesh.apply_translation([0, 0, -mesh.bounds.mean(0)[2]])
    elif family == "torus":
        mesh = c.torus(major_radius=0.32 * s, minor_radius=0.14 * s, major_sections=32, minor_sections=16)
    elif family == "capsule":
        mesh = c.capsule(height=0.5 * s, radius=0.22 * s, count=[16, 16])
        mesh.apply_translation([0, 0, -mesh.bounds.mean(0)[2]])
    else:
        raise ValueError(f"unknown primitive family {family!r}")
    colour = np.append((rng.uniform(0.2, 0.9, size=3) * 255).astype(np.uint8), 255)
    mesh.visual.vertex_colors = np.tile(colour, (len(mesh.vertices), 1))
    return trimesh.Scene(mesh).export(file_type="glb")


def preprocess(out: Path, assets_dir: str, models: dict[str, str]) -> str:
    from pipelines.preprocess import driver as graph  # heavy: pyarrow, numpy

    data = out / "preprocess"
    cfg = load_config(PreprocessConfig, "demo", [
        ("sources.specs", [f"local:{assets_dir}"]), ("output", str(data)),
        ("features.checkpoint", models["dinov2"]), ("encode.ss_encoder", models["ss_encoder"]),
        ("encode.slat_encoder", models["slat_encoder"])], prefix="preprocess_")
    res = graph.run(cfg)
    counts = (res.manifest or {}).get("counts", {})
    print(f"preprocessing: {counts} in {res.wall_s:.0f} s -> {data}", flush=True)
    if not counts.get("done"):
        raise RuntimeError("preprocessing produced no shards")
    return str(data)


def fit_probe(out: Path, data: str, cfg: DemoProbeConfig) -> str:
    import numpy as np  # heavy: numpy
    import torch  # heavy: torch, numpy

    from mdt.eval.shapes import paired_iou  # heavy: torch, numpy
    from mdt.eval.snapshots import fit_occupancy_probe, occupancy_grid  # heavy: torch, safetensors
    from pipelines.preprocess import shards  # heavy: pyarrow, numpy

    path = out / "models" / "ss_occupancy_probe"
    rows = list(shards.iter_rows(data, columns=["ss_latent", "slat_coords"]))
    x = shards.collate_ss(rows)
    occ = torch.stack([occupancy_grid(np.frombuffer(r["slat_coords"], np.uint8).reshape(-1, 3), 16) for r in rows])
    probe = fit_occupancy_probe(x, occ, steps=cfg.steps, hidden=cfg.hidden, batch_size=8,
                                noise_std=cfg.noise_std)
    with torch.no_grad():
        iou = paired_iou(probe(x)[:, 0] > 0, occ).mean().item()
    print(f"occupancy probe: IoU of decoded shard latents with their voxels {iou:.3f}", flush=True)
    probe.save(path)
    return str(path)


def distill_config(name: str, out: Path, data: str, models: dict, probe: str, tracking_uri: str, objective: str,
                   teacher: str | None, steps: int | None, overrides: list[str]):
    from pipelines.distill.config import DistillJobConfig  # heavy: torch, numpy

    ov = [("name", name), ("output", str(out / "runs")), ("data.uri", data), ("condition.model", models["dinov2"]),
          ("snapshot.decoder", probe), ("mlflow.tracking_uri", tracking_uri), ("objective.name", objective),
          ("model.teacher", teacher)]
    if steps:
        ov.append(("train.max_steps", steps))
    return load_config(DistillJobConfig, "demo", ov + list(overrides), prefix="distill_").validate()


def train(cfg) -> tuple[str, str | None, str]:
    """One distillation-driver run -> (exported EMA checkpoint, MLflow run id, run dir)."""
    res = distill_driver()(cfg)
    if res.error or not res.export_dir:
        raise RuntimeError(f"{cfg.name} failed: {res.error}")
    return str(Path(res.export_dir) / "ema" / cfg.model.export_stem), res.mlflow_run_id, res.run_dir


def write_condition_images(directory: Path, data: str, n: int | None = None) -> tuple[list[str], list]:
    """The first `n` assets' condition view 0 of the shards as RGB PNGs in `directory` -> (paths, each asset's
    voxel coords [N, 3]). The view as training saw it (`shards.decode_cond_image`: the preprocessing's crop,
    premultiplied on black), as RGB so that the chain uses the whole frame: re-cropping the stored RGBA crop
    reframes soft-edged shapes (measured on the demo's assets: mean student IoU 0.38 re-cropped at alpha > 0)."""
    import numpy as np  # heavy: numpy
    from PIL import Image  # heavy: PIL

    from pipelines.preprocess import shards  # heavy: pyarrow, numpy

    images, voxels = [], []
    directory.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(shards.iter_rows(data, columns=["sha256", "cond_images", "slat_coords"])):
        if n is not None and i >= n:
            break
        p = directory / f"{row['sha256'][:8]}.png"
        rgb = (shards.decode_cond_image(row["cond_images"][0]).transpose(1, 2, 0) * 255).round().astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(p)
        images.append(str(p))
        voxels.append(np.frombuffer(row["slat_coords"], np.uint8).reshape(-1, 3))
    return images, voxels


def generate_samples(out: Path, data: str, student: str, probe: str, models: dict, n: int) -> dict:
    """Image -> 3-D (`mdt.generate`, preset generate_demo) with the 1-step student as the SS flow and the demo's
    occupancy probe as the SS decoder, for `n` condition images of the shards; then each generated occupancy's
    IoU with its conditioning asset's voxels at the probe's resolution (`iou_with_condition`, per input). The
    SLat flow and decoders are random-weight tiny models (the demo trains only the SS stage), so the output that
    shows the student's shape is the SS occupancy (occupancy.glb, the previews' occupancy view); the chain's
    files, formats and timings are the real ones."""
    import torch  # heavy: torch, numpy

    from mdt.eval.shapes import paired_iou  # heavy: torch, numpy
    from mdt.eval.snapshots import occupancy_grid  # heavy: torch, safetensors
    from mdt.generate import GenerateConfig, ImageTo3D, generate, load_image  # heavy: torch, safetensors

    images, voxels = write_condition_images(out / "generate" / "inputs", data, n)
    cfg = load_config(GenerateConfig, "demo", [
        ("models.ss_flow", student), ("models.ss_decoder", probe), ("models.dinov2", models["dinov2"]),
        ("models.tiny_models", str(out / "models" / "generate-tiny")), ("ss.steps", 1), ("ss.cfg_strength", 0.0),
        ("decode.max_structure_voxels", None),   # the probe's 16³ grid bounds the occupancy: nothing to cut
        ("output", str(out / "generate"))], prefix="generate_")
    cfg.validate()
    pipe = ImageTo3D.from_config(cfg)
    summary = generate(cfg, images, cfg.output, pipeline=pipe)
    res = pipe.occupancy_resolution()
    for entry, path, vox in zip(summary["inputs"], images, voxels):
        coords = pipe.run(load_image(path), formats=["gaussians"]).samples[0].coords  # the files' sample (seeded)
        generated = torch.zeros((res,) * 3, dtype=torch.bool)
        generated[coords[:, 0].long(), coords[:, 1].long(), coords[:, 2].long()] = True
        truth = occupancy_grid(vox, res)
        entry["iou_with_condition"] = round(float(paired_iou(generated[None], truth[None])[0]), 4)
        print(f"generated {entry['name']}: IoU {entry['iou_with_condition']:.3f} with its conditioning asset "
              f"({int(generated.sum())} vs {int(truth.sum())} occupied cells of {res}³)", flush=True)
    return summary


def generation_failures(summary: dict, min_iou: float) -> list[str]:
    """One line when what `make demo` generates is not its inputs' shapes: an input without a generated
    occupancy, or a mean IoU of the generated occupancies with their conditioning assets below `min_iou` (the
    mean over inputs, as the teacher's check: single 1-step samples of the demo's student range from about
    0.2 to 0.9 per asset)."""
    ious = [e.get("iou_with_condition") for e in summary["inputs"]]
    missing = [e["name"] for e, iou in zip(summary["inputs"], ious) if iou is None]
    if missing:
        return [f"no generated occupancy for {', '.join(missing)}"]
    mean = sum(ious) / max(len(ious), 1)
    if not ious or mean < min_iou:
        return [f"the generated occupancies have mean IoU {mean:.3f} with their conditioning assets (< {min_iou}; "
                f"per input {', '.join(f'{i:.2f}' for i in ious)})"]
    return []


def evaluate(out: Path, data: str, teacher: str, student: str, probe: str, models: dict, tracking_uri: str,
             distill_run: str | None, overrides: list, output: Path | None = None):
    from pipelines.evaluate import driver as ev  # heavy: torch, safetensors

    cfg = ev.make_config("demo", data=data, teacher=teacher, student=student, decoder=probe,
                         output=str(output or out / "eval"), distill_run_id=distill_run,
                         overrides=[("condition.model", models["dinov2"]), ("mlflow.tracking_uri", tracking_uri)]
                         + list(overrides))
    return ev.run(cfg.validate())


DATA_FREE = "data-free student"


def synthesize(out: Path, data: str, teacher: str, probe: str, models: dict, overrides: list[str]) -> tuple[str, dict]:
    """The teacher's own samples for the demo's condition images (`jobs/synthesize.py --preset demo`: the
    synthesis job's Ray Data graph) -> (teacher-generated shards, the job's synthesis summary)."""
    from pipelines.synthesize import driver as syn  # heavy: torch, pyarrow

    images = out / "condition-images"
    write_condition_images(images, data)
    cfg = load_config(syn.SynthesizeConfig, "demo", [
        ("sources.specs", [f"local:{images}"]), ("output", str(out / "synthesize")), ("synthesize.teacher", teacher),
        ("synthesize.dinov2", models["dinov2"]), ("synthesize.ss_decoder", probe),
        ("synthesize.tiny_models", str(out / "models" / "synthesize-tiny"))] + list(overrides), prefix="synthesize_")
    res = syn.run(syn.prepare(cfg))
    summary = res.report["synthesize"]
    print(syn.to_markdown(summary), flush=True)
    if not (res.manifest or {}).get("counts", {}).get("done"):
        raise RuntimeError("synthesis produced no shards")
    return cfg.output, summary


def evaluate_data_free(out: Path, data: str, teacher: str, student: str, probe: str, models: dict,
                       tracking_uri: str, distill_run: str | None, overrides: list[str]):
    """The data-free student on the same assets, seeds and reference (teacher 25-step) as the data-driven one."""
    samplers = [{"model": "teacher", "steps": 25}] + [
        {"model": "student", "steps": s, "name": f"{DATA_FREE} {s}-step"} for s in (1, 2)]
    return evaluate(out, data, teacher, student, probe, models, tracking_uri, distill_run,
                    [("samplers", samplers), ("name", "evaluate-demo-data-free")] + list(overrides),
                    output=out / "eval-data-free")


def merged_table(rows: list[dict], data_free_rows: list[dict]) -> tuple[list[dict], str]:
    """The evaluation's rows followed by the data-free student's (its evaluation's reference row left out)."""
    from mdt.eval import report  # heavy: torch, numpy

    merged = list(rows) + [r for r in data_free_rows if r["sampler"].startswith(DATA_FREE)]
    return merged, report.markdown_table(merged)


# ------------------------------------------------------------------------------------------------ run


def run(cfg: DemoConfig) -> DemoResult:
    from pipelines.preprocess import driver as graph  # heavy: pyarrow, numpy

    out = Path(cfg.output).resolve()
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    import ray  # heavy: ray, requests

    with clock.phase("start Ray (local, 2 CPUs, no dashboard)"):
        graph.init_ray(PreprocessConfig(ray=RayConfig(num_cpus=2)))
    try:
        with clock.phase("tiny models (random DINOv2, SS/SLat encoders)"):
            models = prepare_models(out, cfg.structured_latents)
        data = out / "preprocess"
        with clock.phase(f"preprocess {cfg.assets.count} simple shapes (Ray Data)"):
            if (data / "manifest.json").exists():
                print(f"reusing {data}", flush=True)
            else:
                preprocess(out, write_assets(out / "assets", cfg.assets), models)
            data = str(data)
        with clock.phase("occupancy probe (the demo's SS decoder)"):
            probe = str(out / "models" / "ss_occupancy_probe")
            if not Path(probe + ".json").exists():
                fit_probe(out, data, cfg.probe)
        with clock.phase("teacher: flow matching (Ray Train)"):
            tcfg = distill_config("demo-teacher", out, data, models, probe, tracking_uri, "flow_matching", None,
                                  cfg.teacher.steps, cfg.teacher.overrides)
            teacher, teacher_run, _ = train(tcfg)
        with clock.phase("student: MDT-dist (Ray Train)"):
            scfg = distill_config("demo-mdt", out, data, models, probe, tracking_uri, "mdt", teacher,
                                  cfg.student.steps, cfg.student.overrides)
            student, student_run, student_dir = train(scfg)
        with clock.phase("generate: image -> 3-D with the 1-step student"):
            generated = generate_samples(out, data, student, probe, models, cfg.generate_images)
        with clock.phase("evaluate: teacher 25/4/2/1, student 1/2/4 (Euler) and 2/4 (re-noised) steps (Ray Data)"):
            ev = evaluate(out, data, teacher, student, probe, models, tracking_uri, student_run,
                          cfg.evaluate_overrides)
        free = None
        if cfg.data_free.enabled:
            with clock.phase("data-free: the teacher's samples for the condition images (Ray Data)"):
                free_data, synthesis = synthesize(out, data, teacher, probe, models, cfg.data_free.overrides)
            with clock.phase("data-free student: MDT-dist on the teacher's samples (Ray Train)"):
                fcfg = distill_config("demo-mdt-data-free", out, free_data, models, probe, tracking_uri, "mdt",
                                      teacher, cfg.student.steps, cfg.student.overrides)
                free_student, free_run, _ = train(fcfg)
            with clock.phase("evaluate: the data-free student 1/2 steps (Ray Data)"):
                free_ev = evaluate_data_free(out, data, teacher, free_student, probe, models, tracking_uri,
                                             free_run, cfg.evaluate_overrides)
            free = {"student": free_student, "data": free_data, "synthesis": synthesis, "mlflow_run": free_run,
                    "evaluation_dir": free_ev.run_dir, "rows": free_ev.results["rows"]}
    finally:
        ray.shutdown()

    res = dict(ev.results)
    table = ev.table
    if free:
        res["rows"], table = merged_table(res["rows"], free["rows"])
        res["notes"] = list(res.get("notes", [])) + list(free_ev.results.get("notes", []))
        res["data_free"] = {k: v for k, v in free.items() if k != "rows"}
    rows = {r["sampler"]: r for r in res["rows"]}
    t25, t1, s1 = rows["teacher 25-step"], rows["teacher 1-step"], rows["student 1-step"]
    reasons = []
    if t25["iou"] < cfg.min_teacher_iou:
        reasons.append(f"the teacher's 25-step samples have IoU {t25['iou']:.3f} with their conditioning shapes "
                       f"(< {cfg.min_teacher_iou})")
    reasons += generation_failures(generated, cfg.min_generated_iou)
    # the distillation target is the 25-step teacher: the 1-step student must land clearly closer to it than the
    # teacher's own 1-step sample from the same noise and condition, in latent space and as a decoded shape
    if not (s1["mse_ref"] < 0.5 * t1["mse_ref"] and s1["iou_ref"] > t1["iou_ref"]):
        reasons.append(f"the 1-step student is not clearly closer to the 25-step teacher than the 1-step teacher "
                       f"(MSE {s1['mse_ref']:.4f} vs {t1['mse_ref']:.4f}, IoU {s1['iou_ref']:.3f} vs "
                       f"{t1['iou_ref']:.3f})")
    total = time.time() - clock.t0
    res.update({"teacher": teacher, "student": student, "data": data, "phases_s": clock.phases,
                "total_s": round(total, 1), "mlflow_tracking_uri": tracking_uri, "evaluation_dir": ev.run_dir,
                "mlflow_runs": {"teacher": teacher_run, "student": student_run, "evaluation": ev.mlflow_run_id},
                "generated": generated, "teacher25_iou_with_condition": t25["iou"], "ok": not reasons,
                "failures": reasons})
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    shutil.copy(out / "results.json", Path(student_dir) / "results.json")
    return DemoResult(res, table, not reasons, reasons)


def mlflow_ui_hint(tracking_uri: str) -> str:
    return (f"{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {tracking_uri} --host 127.0.0.1 "
            f"--port 5000   then open http://127.0.0.1:5000 (experiment 'mdt-distill-demo': runs demo-teacher, "
            f"demo-mdt and evaluate-demo; 3-D previews under the evaluation run's Artifacts/previews)")

