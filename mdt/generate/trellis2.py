"""TRELLIS.2's chain: image -> DINOv3 tokens -> SS latent -> occupancy -> shape latent -> texture latent."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mdt.conditioning import ImageConditioner
from mdt.config import ConfigError
from mdt.export.mesh import occupancy_mesh, write_glb
from mdt.flow import FlowEulerGuidanceIntervalSampler, count_nfe_trellis2
from mdt.generate.chain import StageTimer, pick_device, sparse_noise
from mdt.generate.images import load_image, preprocess_image
from mdt.generate.job import safe_name
from mdt.generate.sources import (TINY_EARLIER, TINY_NOW, ModelSource, _is_hub_repo_id, checkpoint_exists,
                                  looks_like_hub_path, read_pipeline_json)
from mdt.models import from_pretrained
from mdt.models.zoo import TRELLIS2_LATENT_CHANNELS, save_tiny_dinov3, save_tiny_model

log = logging.getLogger(__name__)

SLOTS_ALL = ("ss_flow", "ss_decoder", "shape_flow", "tex_flow")
SLOTS_STRUCTURE = ("ss_flow", "ss_decoder")   # image -> SS latent -> occupancy (no shape or texture stage)


# ------------------------------------------------------------------------------------------------------------
# TRELLIS.2: image -> DINOv3 tokens -> SS latent -> occupancy -> shape latent -> texture latent
# ------------------------------------------------------------------------------------------------------------
# TRELLIS.2's shape and texture VAEs need CUDA-only extensions (FlexGEMM, o-voxel, CuMesh), so this chain stops at
# the latents: it writes them with their voxel coordinates, plus the occupancy mesh of the SS stage (decoded by
# TRELLIS's SS decoder, which TRELLIS.2 reuses).

@dataclass
class GuidanceSampler:
    """One stage of TRELLIS.2's FlowEulerGuidanceIntervalSampler: guidance `w·v(cond) + (1 − w)·v(neg_cond)`
    (w = 1: conditional only), guidance rescale, interval and `rescale_t`."""

    steps: int = 12
    guidance_strength: float = 7.5
    guidance_rescale: float = 0.0
    guidance_interval: list[float] = field(default_factory=lambda: [0.6, 1.0])
    rescale_t: float = 3.0

    def nfe(self) -> int:
        return count_nfe_trellis2(self.steps, self.guidance_strength, tuple(self.guidance_interval), self.rescale_t)

    def kwargs(self) -> dict:
        return dict(steps=self.steps, guidance_strength=self.guidance_strength,
                    guidance_rescale=self.guidance_rescale, guidance_interval=tuple(self.guidance_interval),
                    rescale_t=self.rescale_t)


@dataclass
class Trellis2Models:
    """Checkpoints (`<dir>/<stem>` or `<owner>/<repo>/<stem>`, TRELLIS.2 json + safetensors) and the DINOv3 (HF
    directory or id). With `tiny_models` set, a slot whose checkpoint does not exist gets a random-weight tiny
    model of the real architecture, written once under that directory."""

    pipeline: str | None = None         # TRELLIS.2 repository (HF id or directory): latent normalisation source
    dinov3: str | None = None
    ss_flow: str | None = None
    ss_decoder: str | None = None       # TRELLIS's SS decoder (TRELLIS.2 reuses TRELLIS's SS VAE)
    shape_flow: str | None = None
    tex_flow: str | None = None
    tiny_models: str | None = None


@dataclass
class Trellis2GenerateConfig:
    family: str = "trellis2"
    models: Trellis2Models = field(default_factory=Trellis2Models)
    ss: GuidanceSampler = field(default_factory=lambda: GuidanceSampler(12, 7.5, 0.7, [0.6, 1.0], 5.0))
    shape: GuidanceSampler = field(default_factory=lambda: GuidanceSampler(12, 7.5, 0.5, [0.6, 1.0], 3.0))
    tex: GuidanceSampler = field(default_factory=lambda: GuidanceSampler(12, 1.0, 0.0, [0.6, 0.9], 3.0))
    image_size: int = 512                 # DINOv3 input side (TRELLIS.2's cond_512)
    alpha_threshold: float = 204.0
    structure_resolution: int = 32        # the SS decoder's 64³ occupancy max-pooled to 32³ (512 pipeline)
    max_structure_voxels: int | None = None
    # {mean, std} of the 32 latent channels; null: `<stage>_slat_normalization` of models.pipeline's pipeline.json
    shape_normalization: dict[str, list[float]] | None = None
    tex_normalization: dict[str, list[float]] | None = None
    num_samples: int = 1
    seed: int = 42
    device: str = "auto"
    warmup: bool = True
    torch_threads: int | None = None
    occupancy_mesh: bool = True
    output: str = "outputs/generate-trellis2"

    def validate(self, slots: tuple[str, ...] = SLOTS_ALL) -> None:
        """ConfigError for bad settings of the stages whose models `slots` name."""
        for name, s in (("ss", self.ss), ("shape", self.shape), ("tex", self.tex)):
            if s.steps < 1:
                raise ConfigError(f"{name}.steps must be >= 1, got {s.steps}")
            if len(s.guidance_interval) != 2 or s.guidance_interval[0] > s.guidance_interval[1]:
                raise ConfigError(f"{name}.guidance_interval must be [lo, hi] with lo <= hi")
            if s.rescale_t <= 0 or s.guidance_rescale < 0:
                raise ConfigError(f"{name}: rescale_t must be > 0 and guidance_rescale >= 0")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.structure_resolution < 1:
            raise ConfigError("structure_resolution must be >= 1")
        for name, norm in (("shape_normalization", self.shape_normalization),
                           ("tex_normalization", self.tex_normalization)):
            if f"{name.split('_')[0]}_flow" not in slots:
                continue
            if norm is None and not self.models.pipeline:
                raise ConfigError(f"{name} is required ({{mean, std}} of the {TRELLIS2_LATENT_CHANNELS} channels) "
                                  "unless models.pipeline gives it")
            if norm is not None and (set(norm) != {"mean", "std"}
                                     or any(len(norm[k]) != TRELLIS2_LATENT_CHANNELS for k in norm)):
                raise ConfigError(f"{name} must be {{mean, std}} with {TRELLIS2_LATENT_CHANNELS} values each")


def resolve_trellis2_paths(cfg: Trellis2GenerateConfig,
                           slots: tuple[str, ...] = SLOTS_ALL) -> dict[str, ModelSource]:
    """slot -> ModelSource for dinov3 and `slots` (all four flows/decoder by default; tiny ones where configured)."""
    m, sources = cfg.models, {}
    for slot in slots:
        path = getattr(m, slot)
        if path is not None and m.tiny_models and not checkpoint_exists(path) and not looks_like_hub_path(path):
            path = None
        if path is None:
            if not m.tiny_models:
                raise FileNotFoundError(f"no checkpoint for {slot}: set models.{slot}")
            path = str(Path(m.tiny_models) / f"{slot}_tiny")
            sources[slot] = ModelSource(path, TINY_EARLIER if checkpoint_exists(path) else TINY_NOW)
        else:
            sources[slot] = ModelSource(str(path), "config")
    dino = m.dinov3
    if dino is not None and m.tiny_models and not (Path(dino) / "config.json").exists() \
            and not _is_hub_repo_id(dino):
        dino = None
    if dino is None:
        if not m.tiny_models:
            raise FileNotFoundError("no DINOv3 model: set models.dinov3")
        dino = str(Path(m.tiny_models) / "dinov3_tiny")
        sources["dinov3"] = ModelSource(dino, TINY_EARLIER if (Path(dino) / "config.json").exists() else TINY_NOW)
    else:
        sources["dinov3"] = ModelSource(str(dino), "config")
    return sources


def ensure_tiny_trellis2(sources: dict[str, ModelSource], cfg: Trellis2GenerateConfig) -> None:
    """Write the tiny checkpoints this run creates (DINOv3 first: its width is the flows' condition width)."""
    dino = sources["dinov3"]
    if dino.origin == TINY_NOW:
        save_tiny_dinov3(dino.path, hidden_size=64, image_size=cfg.image_size)
    cond_channels = int(json.loads((Path(dino.path) / "config.json").read_text()).get("hidden_size", 64)) \
        if (Path(dino.path) / "config.json").exists() else 64
    for i, slot in enumerate(SLOTS_ALL):
        if slot in sources and sources[slot].origin == TINY_NOW:
            tiny = slot if slot == "ss_decoder" else f"t2_{slot}"
            save_tiny_model(tiny, sources[slot].path, cond_channels=cond_channels, seed=i + 1)


@dataclass
class Trellis2Sample:
    coords: Tensor                         # [N, 3] int, occupied voxels of the structure grid
    shape_latent: Tensor | None = None     # [N, 32] de-normalised (the shape decoder's space)
    tex_latent: Tensor | None = None       # [N, 32] de-normalised
    occupancy_mesh: Any = None
    note: str = ""


@dataclass
class Trellis2Generation:
    samples: list[Trellis2Sample]
    ss_latent: Tensor                      # [K, 8, 16, 16, 16]
    timings: dict[str, float]
    nfe: dict[str, int]


def max_pool_occupancy(logits: Tensor, resolution: int) -> Tensor:
    """SS decoder logits [K, 1, R, R, R] -> occupancy [K, r, r, r] on the coarser `resolution` grid (a cell is
    occupied when any of its fine voxels is: max-pooling, as TRELLIS.2's 512 pipeline does 64³ -> 32³)."""
    occ = (logits > 0).float()
    factor = logits.shape[-1] // resolution
    if factor * resolution != logits.shape[-1]:
        raise ValueError(f"occupancy grid {logits.shape[-1]}³ is not a multiple of {resolution}³")
    if factor > 1:
        occ = torch.nn.functional.max_pool3d(occ, factor)
    return occ[:, 0] > 0


class Trellis2ImageTo3D:
    """TRELLIS.2's chain up to its latents: DINOv3 tokens -> SS flow -> TRELLIS's SS decoder -> occupied voxels
    -> shape flow on them -> texture flow with the normalised shape latent as `concat_cond`. Built with
    `slots=SLOTS_STRUCTURE` it holds the conditioner, SS flow and SS decoder only (`condition`,
    `sample_structure`, `occupied`; data-free synthesis)."""

    def __init__(self, models: dict[str, nn.Module], conditioner: ImageConditioner, cfg: Trellis2GenerateConfig,
                 sources: dict[str, ModelSource] | None = None):
        self.models, self.conditioner, self.cfg = models, conditioner, cfg
        self.device = pick_device(cfg.device)
        self.sources = sources or {}
        self.sampler = FlowEulerGuidanceIntervalSampler()
        stages = [(stage, given) for stage, given in (("shape", cfg.shape_normalization),
                                                      ("tex", cfg.tex_normalization)) if f"{stage}_flow" in models]
        pipe_args = read_pipeline_json(cfg.models.pipeline).get("args", {}) \
            if cfg.models.pipeline and any(given is None for _, given in stages) else {}
        self.norm = {}
        for stage, given in stages:
            norm = given or pipe_args.get(f"{stage}_slat_normalization")
            if norm is None:
                raise ValueError(f"no {stage} latent normalisation: set {stage}_normalization")
            self.norm[stage] = {k: torch.tensor(norm[k], dtype=torch.float32, device=self.device)
                                for k in ("mean", "std")}

    @classmethod
    def from_config(cls, cfg: Trellis2GenerateConfig, slots: tuple[str, ...] = SLOTS_ALL) -> "Trellis2ImageTo3D":
        """Load (or create tiny) the conditioner and `slots`' models and check that they fit together."""
        cfg.validate(slots)
        sources = resolve_trellis2_paths(cfg, slots)
        ensure_tiny_trellis2(sources, cfg)
        device = pick_device(cfg.device)
        models = {slot: from_pretrained(sources[slot].path, device=device).float().eval() for slot in slots}
        conditioner = ImageConditioner(sources["dinov3"].path, image_size=cfg.image_size, device=device)
        problems = [f"{slot} expects {m.blocks[0].cross_attn.to_kv.in_features}-channel condition tokens, DINOv3 "
                    f"gives {conditioner.channels}" for slot in ("ss_flow", "shape_flow", "tex_flow") if slot in models
                    for m in [models[slot]] if m.blocks[0].cross_attn.to_kv.in_features != conditioner.channels]
        if models["ss_flow"].out_channels != models["ss_decoder"].latent_channels:
            problems.append("ss_flow and ss_decoder disagree on the SS latent channels")
        if "tex_flow" in models and \
                models["tex_flow"].in_channels != models["tex_flow"].out_channels + models["shape_flow"].out_channels:
            problems.append("tex_flow input is not its latent plus the shape latent (concat_cond)")
        if problems:
            raise ValueError("incompatible models: " + "; ".join(problems))
        return cls(models, conditioner, cfg, sources)

    @torch.no_grad()
    def condition(self, images: Tensor) -> Tensor:
        """Preprocessed images [B, 3, S, S] -> DINOv3 condition tokens [B, T, C]."""
        return self.conditioner(images.to(self.device))

    @torch.no_grad()
    def sample_structure(self, cond: Tensor, generator: "torch.Generator | list[torch.Generator]",
                         sampler: GuidanceSampler | None = None) -> Tensor:
        """cond [K, T, C] -> SS latents [K, 8, 16, 16, 16] in one batch at the SS sampler's settings (`neg_cond`
        zeros); noise from `generator`, or sample i's from `generator[i]` (then a sample does not depend on which
        samples share its batch)."""
        ssf = self.models["ss_flow"]
        shape = (ssf.in_channels,) + (ssf.resolution,) * 3
        if isinstance(generator, torch.Generator):
            noise = torch.randn((cond.shape[0],) + shape, generator=generator, device=self.device)
        else:
            noise = torch.cat([torch.randn((1,) + shape, generator=g, device=self.device) for g in generator])
        return self.sampler.sample(ssf, noise, cond, torch.zeros_like(cond), **(sampler or self.cfg.ss).kwargs())

    @torch.no_grad()
    def occupied(self, z: Tensor, resolution: int | None = None) -> tuple[list[Tensor], list[str]]:
        """SS latents -> per sample the occupied voxels [N, 3] of TRELLIS's SS decoder (logits > 0) max-pooled to
        `resolution`³ (default `structure_resolution`; the decoder's own grid side keeps them as decoded), the
        first `max_structure_voxels` of them, and a note (capped / empty)."""
        occ = max_pool_occupancy(self.models["ss_decoder"](z).float(), resolution or self.cfg.structure_resolution)
        cap, coords, notes = self.cfg.max_structure_voxels, [], []
        for grid in occ:
            c, note = torch.nonzero(grid).int(), ""
            if cap is not None and c.shape[0] > cap:
                note = f"occupancy capped from {c.shape[0]} to {cap} voxels"
                c = c[:cap]
            if c.shape[0] == 0:
                note = "empty occupancy (no SS decoder logit > 0): no shape or texture latent"
            coords.append(c.cpu())
            notes.append(note)
        return coords, notes

    @torch.no_grad()
    def run(self, image, num_samples: int | None = None, seed: int | None = None,
            samplers: dict[str, GuidanceSampler] | None = None) -> Trellis2Generation:
        """One image -> `num_samples` samples in one batch; `samplers` overrides {ss, shape, tex} for this call."""
        cfg, k = self.cfg, num_samples or self.cfg.num_samples
        s = {"ss": cfg.ss, "shape": cfg.shape, "tex": cfg.tex, **(samplers or {})}
        timer = StageTimer(self.device)
        with timer("preprocess"):
            img = preprocess_image(image, cfg.image_size, cfg.alpha_threshold)
        with timer("condition"):
            cond = self.condition(img.unsqueeze(0))
        cond_k = cond.expand(k, *cond.shape[1:])
        neg_k = torch.zeros_like(cond_k)
        generator = torch.Generator(self.device).manual_seed(cfg.seed if seed is None else seed)
        with timer("ss_flow"):
            z = self.sample_structure(cond_k, generator, s["ss"])
        with timer("ss_decode"):
            samples = [Trellis2Sample(coords=c, note=note) for c, note in zip(*self.occupied(z))]
        if cfg.occupancy_mesh:
            with timer("occupancy_mesh"):
                for smp in samples:
                    smp.occupancy_mesh = occupancy_mesh(smp.coords, cfg.structure_resolution)
        live = [i for i, smp in enumerate(samples) if smp.coords.shape[0] > 0]
        if live:
            coords = [samples[i].coords for i in live]
            cond_l, neg_l = cond_k[:len(live)], neg_k[:len(live)]
            with timer("shape_flow"):
                shape_n = self.sampler.sample(self.models["shape_flow"],
                                              sparse_noise(coords, self.models["shape_flow"].in_channels,
                                                           generator, self.device),
                                              cond_l, neg_l, **s["shape"].kwargs())
            with timer("tex_flow"):
                tex_noise = sparse_noise(coords, self.models["tex_flow"].out_channels, generator, self.device)
                tex_n = self.sampler.sample(self.models["tex_flow"], tex_noise, cond_l, neg_l,
                                            concat_cond=tex_noise.replace(shape_n.feats), **s["tex"].kwargs())
            shape = shape_n.feats.float() * self.norm["shape"]["std"] + self.norm["shape"]["mean"]
            tex = tex_n.feats.float() * self.norm["tex"]["std"] + self.norm["tex"]["mean"]
            for j, i in enumerate(live):
                rows = shape_n.batch_idx == j
                samples[i].shape_latent, samples[i].tex_latent = shape[rows].cpu(), tex[rows].cpu()
        return Trellis2Generation(samples, z.float().cpu(), {n: round(v, 6) for n, v in timer.seconds.items()},
                                  {n: s[n].nfe() for n in ("ss", "shape", "tex")})


def write_trellis2_latents(path: Path, sample: Trellis2Sample, ss_latent: Tensor) -> Path:
    """latents.npz: coords [N, 3] int32 (structure grid), shape [N, 32] and tex [N, 32] float32 (de-normalised),
    ss [8, 16, 16, 16] float32."""
    c = TRELLIS2_LATENT_CHANNELS
    empty = np.zeros((0, c), np.float32)
    np.savez(path, coords=sample.coords.numpy().astype(np.int32), ss=ss_latent.numpy().astype(np.float32),
             shape=empty if sample.shape_latent is None else sample.shape_latent.numpy().astype(np.float32),
             tex=empty if sample.tex_latent is None else sample.tex_latent.numpy().astype(np.float32))
    return path


def generate_trellis2(cfg: Trellis2GenerateConfig, images: list[str], output: str | None = None,
                      pipeline: Trellis2ImageTo3D | None = None, echo=print) -> dict:
    """TRELLIS.2's chain on every image; per input `<output>/<name>/` (`sample_<k>/` for K > 1): latents.npz,
    occupancy.glb, and timings.json (warm). Returns the summary (also `<output>/summary.json`)."""
    threads = torch.get_num_threads()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    try:
        out = Path(output or cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        pipe = pipeline or Trellis2ImageTo3D.from_config(cfg)
        for slot, src in pipe.sources.items():
            echo(f"model {slot}: {src.path} [{src.origin}]")
        summary = {"family": "trellis2", "models": {k: vars(v) for k, v in pipe.sources.items()},
                   "device": str(pipe.device), "samplers": {n: vars(getattr(cfg, n)) for n in ("ss", "shape", "tex")},
                   "decoded": "occupancy (TRELLIS's SS decoder); shape and texture latents are not decoded "
                              "(TRELLIS.2's VAEs need CUDA-only FlexGEMM, o-voxel and CuMesh)",
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
                    one = GuidanceSampler(1, 1.0, 0.0, [0.0, 1.0], 1.0)
                    pipe.run(image, samplers={"ss": one, "shape": one, "tex": one})
                    warmed = True
                gen = pipe.run(image)
            except Exception as exc:  # one bad input is a recorded failure, not the end of the run
                log.debug("input %s failed", path, exc_info=True)
                entry["error"] = f"{type(exc).__name__}: {exc}"
                echo(f"{name}: FAILED: {entry['error']}")
                continue
            directory = out / name
            files: dict[str, Any] = {}
            for k, smp in enumerate(gen.samples):
                sdir = directory if len(gen.samples) == 1 else directory / f"sample_{k}"
                sdir.mkdir(parents=True, exist_ok=True)
                f = {}
                if smp.shape_latent is not None:
                    f["latents"] = str(write_trellis2_latents(sdir / "latents.npz", smp, gen.ss_latent[k]))
                if smp.occupancy_mesh is not None and smp.occupancy_mesh.num_faces:
                    f["occupancy_mesh"] = str(write_glb(sdir / "occupancy.glb", smp.occupancy_mesh))
                files[str(k)] = f
            record = {"image": str(path), "warm": cfg.warmup, "device": str(pipe.device), "seconds": gen.timings,
                      "nfe": gen.nfe, "nfe_total": sum(gen.nfe.values()),
                      "samples": [{"voxels": int(smp.coords.shape[0]), "note": smp.note} for smp in gen.samples]}
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "timings.json").write_text(json.dumps(record, indent=2))
            entry.update({"files": files, "timings": str(directory / "timings.json"), "seconds": gen.timings,
                          "samples": record["samples"]})
            if not any("latents" in f for f in files.values()):
                entry["error"] = "; ".join(smp.note for smp in gen.samples if smp.note) or "no latent was produced"
            status = "FAILED: " + entry["error"] if "error" in entry else \
                f"{sum(len(f) for f in files.values())} files"
            echo(f"{name}: {status} -> {directory}  ({', '.join(f'{n} {v:.3f}s' for n, v in gen.timings.items())})")
        summary["ok"] = sum("error" not in e for e in summary["inputs"])
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
    finally:
        torch.set_num_threads(threads)
