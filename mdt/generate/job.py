"""The generation job: `generate(cfg, images, output)` runs the chain per input and writes its files."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from mdt.export.html import write_orbit_viewer
from mdt.export.mesh import sample_surface, write_glb
from mdt.export.ply import write_gaussian_ply
from mdt.export.preview import PointCloud, gaussian_cloud, save_preview, shade_normals
from mdt.generate.chain import GeneratedSample, Generation, ImageTo3D
from mdt.generate.config import GenerateConfig, PreviewConfig
from mdt.generate.images import load_image

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------

def sample_point_clouds(sample: GeneratedSample, resolution: int, surface_points: int, prefix: str = ""):
    """What previews show of one sample: Gaussian centres, mesh surface samples, occupied voxel centres."""
    clouds = []
    if sample.gaussians is not None:
        clouds.append(gaussian_cloud(sample.gaussians, f"{prefix}gaussians"))
    if sample.mesh is not None and sample.mesh.num_faces:
        pts, nrm, col = sample_surface(sample.mesh, surface_points)
        clouds.append(PointCloud(f"{prefix}mesh", pts, shade_normals(nrm, col)))
    if sample.occupancy_mesh is not None and sample.occupancy_mesh.num_faces:
        pts, nrm, col = sample_surface(sample.occupancy_mesh, surface_points)
        clouds.append(PointCloud(f"{prefix}occupancy", pts, shade_normals(nrm, col)))
    elif sample.coords.shape[0]:
        c = (sample.coords.float() + 0.5) / resolution - 0.5
        clouds.append(PointCloud(f"{prefix}occupancy", c, torch.full_like(c, 0.5)))
    return clouds


def write_sample_files(directory: Path, sample: GeneratedSample) -> dict[str, str]:
    """gaussians.ply, mesh.glb, occupancy.glb (when present) -> {kind: path}."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    if sample.gaussians is not None:
        files["gaussians"] = str(write_gaussian_ply(directory / "gaussians.ply", sample.gaussians))
    if sample.mesh is not None and sample.mesh.num_faces:
        files["mesh"] = str(write_glb(directory / "mesh.glb", sample.mesh))
    elif sample.mesh is not None:
        sample.note = (sample.note + "; " if sample.note else "") + "mesh extraction found no surface"
    if sample.occupancy_mesh is not None and sample.occupancy_mesh.num_faces:
        files["occupancy_mesh"] = str(write_glb(directory / "occupancy.glb", sample.occupancy_mesh))
    return files


def write_previews(directory: Path, name: str, gen: Generation, resolution: int, cfg: PreviewConfig) -> dict:
    many = len(gen.samples) > 1
    clouds = []
    for k, s in enumerate(gen.samples):
        clouds += sample_point_clouds(s, resolution, cfg.surface_points, prefix=f"sample {k}: " if many else "")
    files = {}
    if not clouds:
        return files
    if cfg.png:
        files["preview"] = str(save_preview(directory / "preview.png", clouds, views=cfg.views, size=cfg.size))
    if cfg.html:
        files["viewer"] = str(write_orbit_viewer(directory / "viewer.html", clouds, title=name))
    return files


def safe_name(path: str, taken: set[str]) -> str:
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(path).stem) or "image"
    name, i = stem, 1
    while name in taken:
        i += 1
        name = f"{stem}_{i}"
    taken.add(name)
    return name


def generate(cfg: GenerateConfig, images: list[str], output: str | None = None,
             pipeline: ImageTo3D | None = None, echo=print) -> dict:
    """Run the chain on every image; per input write `<output>/<name>/` (gaussians.ply, mesh.glb, preview.png,
    viewer.html, timings.json, occupancy.glb with decode.occupancy_mesh; with num_samples K > 1 the asset files
    go to `sample_<k>/`). Returns the run summary (also `<output>/summary.json`). A failing input is recorded
    with its reason; the others still run. `cfg.torch_threads` applies for the duration of the call."""
    threads = torch.get_num_threads()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    try:
        return _generate(cfg, images, output, pipeline, echo)
    finally:
        torch.set_num_threads(threads)


def _generate(cfg: GenerateConfig, images: list[str], output: str | None, pipeline: ImageTo3D | None,
              echo) -> dict:
    out = Path(output or cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    pipe = pipeline or ImageTo3D.from_config(cfg)
    for slot, src in pipe.sources.items():
        echo(f"model {slot}: {src.path} [{src.origin}]")
    summary = {"models": {k: vars(v) for k, v in pipe.sources.items()}, "device": str(pipe.device),
               "precision": cfg.precision, "ss": vars(cfg.ss), "slat": vars(cfg.slat),
               "num_samples": cfg.num_samples, "seed": cfg.seed, "inputs": []}
    taken: set[str] = set()
    warmed = not cfg.warmup
    for path in images:
        name = safe_name(path, taken)
        entry: dict[str, Any] = {"image": str(path), "name": name, "dir": str(out / name)}
        summary["inputs"].append(entry)
        try:
            image = load_image(path)
            if not warmed:
                t0 = time.perf_counter()
                pipe.warmup(image)
                entry["warmup_s"] = round(time.perf_counter() - t0, 3)
                warmed = True
            gen = pipe.run(image)
        except Exception as exc:  # one bad input is a recorded failure, not the end of the run
            log.debug("input %s failed", path, exc_info=True)
            entry["error"] = f"{type(exc).__name__}: {exc}"
            echo(f"{name}: FAILED: {entry['error']}")
            continue
        directory = out / name
        directory.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        resolution = pipe.occupancy_resolution()
        files: dict[str, Any] = {}
        for k, sample in enumerate(gen.samples):
            sdir = directory if len(gen.samples) == 1 else directory / f"sample_{k}"
            files[str(k)] = write_sample_files(sdir, sample)
        t_export = time.perf_counter() - t0
        t0 = time.perf_counter()
        previews = write_previews(directory, name, gen, resolution, cfg.preview)
        timings = dict(gen.timings)
        timings["export"] = round(t_export, 6)
        timings["previews"] = round(time.perf_counter() - t0, 6)
        record = {"image": str(path), "warm": cfg.warmup, "device": str(pipe.device), "precision": cfg.precision,
                  "seconds": timings,
                  "generation_s": round(sum(v for k_, v in gen.timings.items() if k_ != "preprocess"), 6),
                  "nfe": gen.nfe, "steps": {"ss": cfg.ss.steps, "slat": cfg.slat.steps},
                  "num_samples": len(gen.samples),
                  "samples": [{"voxels": int(s.coords.shape[0]),
                               "gaussians": 0 if s.gaussians is None else int(s.gaussians.xyz.shape[0]),
                               "mesh_faces": 0 if s.mesh is None else s.mesh.num_faces,
                               "note": s.note} for s in gen.samples]}
        (directory / "timings.json").write_text(json.dumps(record, indent=2))
        entry.update({"files": files, "previews": previews, "timings": str(directory / "timings.json"),
                      "seconds": timings, "samples": record["samples"]})
        produced = sum(len(f) for f in files.values())
        if not produced:
            entry["error"] = "; ".join(s.note for s in gen.samples if s.note) or "no asset was produced"
        status = "FAILED: " + entry["error"] if "error" in entry else f"{produced} asset files"
        echo(f"{name}: {status} -> {directory}  ({', '.join(f'{k_} {v:.3f}s' for k_, v in timings.items())})")
    summary["ok"] = sum("error" not in e for e in summary["inputs"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
