"""Image -> 3D: TRELLIS's image-to-3D chain with any mix of teacher / student flow models per stage.

    cfg = load_config(GenerateConfig, "demo", prefix="generate_")          # jobs/configs/generate_demo.yaml
    pipe = ImageTo3D.from_config(cfg)                                       # loads (or creates tiny) models
    gen = pipe.run(load_image("cat.png"), num_samples=2, seed=42)          # -> Generation (per-stage timings)
    gen.samples[0].gaussians, gen.samples[0].mesh, gen.samples[0].coords
    report = generate(cfg, ["cat.png"], "outputs/gen")                     # all of it, files written per input

The chain (TRELLIS's `TrellisImageTo3DPipeline` and its `pipeline.json`): condition image (alpha crop / centring, premultiplied on black) -> DINOv2
tokens -> SS flow (dense 16³×8 latent, Euler + CFG on an interval) -> SS decoder -> occupied voxels = logits > 0
-> SLat flow on those coordinates (normalised latent, de-normalised after sampling) -> Gaussian decoder and mesh
decoder (-> FlexiCubes). `num_samples` samples per image run as one batch in every stage; decoding and mesh
extraction run over groups of whole samples holding at most `decode.max_voxels_per_chunk` voxels at a time.

Functions and classes (stable API):
* `GenerateConfig` (+ `StageSampler`, `GenerateModels`, `DecodeConfig`, `PreviewConfig`): the config tree,
  presets `jobs/configs/generate_<name>.yaml`.
* `resolve_model_paths(cfg) -> dict[slot, ModelSource]`: which checkpoint each slot uses and where it came from
  (the preset / an override, a TRELLIS `pipeline.json`, or a random-weight tiny model created by this run).
* `ImageTo3D.from_config(cfg)`; `with_flows(ss_flow=, slat_flow=)` (same decoders, other flows); methods
  `condition`, `sample_structure`, `decode_structure`, `sample_latent`, `decode_gaussians`, `decode_meshes`,
  `run` (one image -> `Generation`), `warmup`, `occupancy_resolution`.
* `load_image(path)`, `preprocess_image(image, size)`: hostile-input-safe loading and TRELLIS's crop.
* `Generation` / `GeneratedSample`: what `run` returns (coords, Gaussians, mesh, occupancy mesh, timings, NFE).
* `write_sample_files`, `write_previews`: the per-input files; `generate(cfg, images, output)`: the whole job.
* `save_tiny_model(slot, path, cond_channels)`: random-weight tiny models of the real architectures (TRELLIS's
  five slots and TRELLIS.2's flows `t2_ss_flow`, `t2_shape_flow`, `t2_tex_flow`).
* TRELLIS.2 (docs/trellis2.md): `Trellis2GenerateConfig` (presets `generate_trellis2*.yaml`, `family: trellis2`),
  `Trellis2ImageTo3D` (image -> SS latent -> occupancy -> shape latent -> texture latent; the latents are not
  decoded: TRELLIS.2's VAEs need CUDA-only extensions), `generate_trellis2(cfg, images, output)`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mdt.conditioning import (DINOV2_HUB_ID, ImageConditioner, preprocess_condition_image, save_tiny_dinov2,
                              to_pil)
from mdt.models.occupancy_probe import OccupancyProbe, load_decoder
from mdt.flow import FlowEulerSampler, count_nfe
from mdt.models import Gaussians, TrellisModule, from_pretrained, save_pretrained
from mdt.sparse import SparseTensor, sparse_cat, sparse_unbind

log = logging.getLogger(__name__)

SLOTS = ("ss_flow", "ss_decoder", "slat_flow", "slat_decoder_gs", "slat_decoder_mesh")
# TRELLIS pipeline.json `models` keys for our slots.
PIPELINE_KEYS = {"ss_flow": "sparse_structure_flow_model", "ss_decoder": "sparse_structure_decoder",
                 "slat_flow": "slat_flow_model", "slat_decoder_gs": "slat_decoder_gs",
                 "slat_decoder_mesh": "slat_decoder_mesh"}
FORMATS = ("gaussians", "mesh")
MAX_IMAGE_PIXELS = 64_000_000       # larger inputs are refused (decompression bombs), far above any photo
MAX_IMAGE_BYTES = 256 * 1024 * 1024


# ------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------

@dataclass
class StageSampler:
    """Euler sampling of one flow stage (TRELLIS's FlowEulerGuidanceIntervalSampler parameters)."""

    steps: int = 25
    cfg_strength: float = 5.0
    cfg_interval: list[float] = field(default_factory=lambda: [0.5, 1.0])
    rescale_t: float = 3.0

    def nfe(self) -> int:
        return count_nfe(self.steps, self.cfg_strength, tuple(self.cfg_interval), self.rescale_t)


@dataclass
class GenerateModels:
    """Checkpoints per slot: `<dir>/<stem>` or `<owner>/<repo>/<path/to/stem>` (TRELLIS json + safetensors).

    A slot left null is taken from `pipeline` (a TRELLIS model repo: HF id or local directory with
    pipeline.json). With `tiny_models` set, a slot whose checkpoint does not exist gets a random-weight tiny model
    of the real architecture, written once under that directory (the output says so)."""

    pipeline: str | None = None
    dinov2: str | None = None
    ss_flow: str | None = None
    ss_decoder: str | None = None
    slat_flow: str | None = None
    slat_decoder_gs: str | None = None
    slat_decoder_mesh: str | None = None
    tiny_models: str | None = None


@dataclass
class DecodeConfig:
    formats: list[str] = field(default_factory=lambda: ["gaussians", "mesh"])
    max_voxels_per_chunk: int = 100_000   # SLat voxels decoded together (whole samples, at least one)
    max_structure_voxels: int | None = None  # cap on occupied voxels per sample (the highest logits are kept)
    occupancy_mesh: bool = False          # also a coarse mesh of the SS occupancy (occupancy.glb)


@dataclass
class PreviewConfig:
    png: bool = True
    html: bool = True
    views: int = 4
    size: int = 192
    surface_points: int = 20000           # mesh surface samples shown per mesh


@dataclass
class GenerateConfig:
    models: GenerateModels = field(default_factory=GenerateModels)
    ss: StageSampler = field(default_factory=StageSampler)
    slat: StageSampler = field(default_factory=StageSampler)
    image_size: int = 518                 # DINOv2 input side (518 -> 37² patches for ViT-L/14)
    alpha_threshold: float = 204.0        # bbox of alpha > 0.8·255, as TRELLIS's inference path
    slat_normalization: dict[str, list[float]] | None = None   # {mean, std}; null: from pipeline.json
    num_samples: int = 1
    seed: int = 42
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    precision: str = "auto"               # auto (fp16 torso on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    warmup: bool = True                   # one untimed pass first, so timings.json holds warm figures
    torch_threads: int | None = None      # intra-op CPU threads for generate() (None: torch's default)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    output: str = "outputs/generate"

    def validate(self) -> None:
        from mdt.config import ConfigError

        for name, s in (("ss", self.ss), ("slat", self.slat)):
            if s.steps < 1:
                raise ConfigError(f"{name}.steps must be >= 1, got {s.steps}")
            if len(s.cfg_interval) != 2 or s.cfg_interval[0] > s.cfg_interval[1]:
                raise ConfigError(f"{name}.cfg_interval must be [lo, hi] with lo <= hi, got {s.cfg_interval}")
            if s.rescale_t <= 0:
                raise ConfigError(f"{name}.rescale_t must be > 0")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {self.num_samples}")
        bad = [f for f in self.decode.formats if f not in FORMATS]
        if bad:
            raise ConfigError(f"decode.formats: unknown {bad}; known: {list(FORMATS)}")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ConfigError(f"precision must be auto, fp32, fp16 or bf16, got {self.precision!r}")
        if self.decode.max_voxels_per_chunk < 1:
            raise ConfigError("decode.max_voxels_per_chunk must be >= 1")
        if self.slat_normalization is not None and set(self.slat_normalization) != {"mean", "std"}:
            raise ConfigError("slat_normalization must have exactly the keys mean and std")


# ------------------------------------------------------------------------------------------------------------
# Models: where each comes from
# ------------------------------------------------------------------------------------------------------------

TINY_NOW = "random-weight tiny model, created by this run"
TINY_EARLIER = "random-weight tiny model, created by an earlier run"


@dataclass
class ModelSource:
    path: str
    origin: str        # "config" | "pipeline.json" | TINY_NOW | TINY_EARLIER


def checkpoint_exists(path: str) -> bool:
    return Path(str(path) + ".json").exists() and Path(str(path) + ".safetensors").exists()


def looks_like_hub_path(path: str) -> bool:
    parts = str(path).split("/")
    return len(parts) >= 3 and not str(path).startswith((".", "/", "~")) and not Path(parts[0]).exists()


def check_checkpoint_arg(value: str, flag: str) -> str:
    """A checkpoint argument: a local `<stem>.json` + `<stem>.safetensors`, or a hub path; else ValueError."""
    if not (checkpoint_exists(value) or looks_like_hub_path(value)):
        raise ValueError(f"{flag} {value}: no {value}.json + {value}.safetensors and not a hub path "
                         "'<owner>/<repo>/<stem>'")
    return value


def read_pipeline_json(pipeline: str) -> dict:
    local = Path(pipeline) / "pipeline.json"
    if local.exists():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download  # honours HF_HUB_OFFLINE and the local cache

    return json.loads(Path(hf_hub_download(pipeline, "pipeline.json")).read_text())


def resolve_model_paths(cfg: GenerateConfig) -> tuple[dict[str, ModelSource], dict]:
    """(slot -> ModelSource, the pipeline.json `args` or {}). Creates tiny models where the config says so."""
    m = cfg.models
    pipe_args = read_pipeline_json(m.pipeline).get("args", {}) if m.pipeline else {}
    sources: dict[str, ModelSource] = {}
    for slot in SLOTS:
        path = getattr(m, slot)
        origin = "config"
        if path is None and pipe_args:
            rel = pipe_args.get("models", {}).get(PIPELINE_KEYS[slot])
            if rel is not None:
                path, origin = f"{m.pipeline.rstrip('/')}/{rel}", "pipeline.json"
        if path is not None and m.tiny_models and not checkpoint_exists(path) and not looks_like_hub_path(path):
            path = None                       # a demo path that this clone has not produced yet
        if path is None:
            if not m.tiny_models:
                raise FileNotFoundError(f"no checkpoint for {slot}: set models.{slot} or models.pipeline")
            path = str(Path(m.tiny_models) / f"{slot}_tiny")
            origin = TINY_EARLIER if checkpoint_exists(path) else TINY_NOW
        sources[slot] = ModelSource(str(path), origin)
    dino, origin = m.dinov2, "config"
    if dino is None and pipe_args:
        dino, origin = DINOV2_HUB_ID, "pipeline.json"  # image_cond_model dinov2_vitl14_reg = this HF checkpoint
    if dino is not None and m.tiny_models and not (Path(dino) / "config.json").exists() \
            and not _is_hub_repo_id(dino):
        dino = None                           # a demo path that this clone has not produced yet
    if dino is None:
        if not m.tiny_models:
            raise FileNotFoundError("no DINOv2 model: set models.dinov2 or models.pipeline")
        dino = str(Path(m.tiny_models) / "dinov2_tiny")
        origin = TINY_EARLIER if (Path(dino) / "config.json").exists() else TINY_NOW
    sources["dinov2"] = ModelSource(str(dino), origin)
    return sources, pipe_args


def _is_hub_repo_id(s: str) -> bool:
    parts = str(s).split("/")
    return len(parts) == 2 and all(parts) and not str(s).startswith((".", "/", "~"))


# Tiny versions of the real architectures (same classes, small widths), for tests and the CPU demo.
def tiny_model_args(slot: str, cond_channels: int) -> tuple[str, dict]:
    """(class name, constructor args) of `slot`'s tiny model: TRELLIS's five generation slots, or a TRELLIS.2 flow
    (`TRELLIS2_SLOTS`)."""
    swin = dict(resolution=64, latent_channels=8, num_blocks=1, num_heads=4, mlp_ratio=2, attn_mode="swin",
                window_size=8, pe_mode="ape", use_fp16=False)
    table = {
        "ss_flow": ("SparseStructureFlowModel", dict(
            resolution=16, in_channels=8, out_channels=8, model_channels=64, cond_channels=cond_channels,
            num_blocks=1, num_heads=4, mlp_ratio=2, patch_size=2, pe_mode="ape", qk_rms_norm=True,
            use_fp16=False)),
        "ss_decoder": ("SparseStructureDecoder", dict(
            out_channels=1, latent_channels=8, num_res_blocks=1, num_res_blocks_middle=1, channels=[32, 16, 8],
            use_fp16=False)),
        "slat_flow": ("SLatFlowModel", dict(
            resolution=64, in_channels=8, out_channels=8, model_channels=64, cond_channels=cond_channels,
            num_blocks=1, num_heads=4, mlp_ratio=2, patch_size=2, num_io_res_blocks=1, io_block_channels=[32],
            pe_mode="ape", qk_rms_norm=True, use_fp16=False)),
        "slat_decoder_gs": ("SLatGaussianDecoder", dict(
            model_channels=64, **swin, representation_config={
                "lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1},
                "perturb_offset": True, "voxel_size": 1.5, "num_gaussians": 32, "2d_filter_kernel_size": 0.1,
                "3d_filter_kernel_size": 9e-4, "scaling_bias": 4e-3, "opacity_bias": 0.1,
                "scaling_activation": "softplus"})),
        # 256 channels: the subdivision blocks' GroupNorm(32) needs model_channels / 8 >= 32.
        "slat_decoder_mesh": ("SLatMeshDecoder", dict(model_channels=256, **swin,
                                                      representation_config={"use_color": True})),
    }
    if slot in TRELLIS2_SLOTS:
        return tiny_trellis2_args(slot, cond_channels)
    return table[slot]


def full_size_model_args(slot: str) -> tuple[str, dict]:
    """The released TRELLIS-image-large configuration of `slot` (the `ckpts/*.json` of the released repository)."""
    swin = dict(resolution=64, model_channels=768, latent_channels=8, num_blocks=12, num_heads=12, mlp_ratio=4,
                attn_mode="swin", window_size=8, use_fp16=True)
    flow = dict(in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024, num_blocks=24,
                num_heads=16, mlp_ratio=4, pe_mode="ape", qk_rms_norm=True, use_fp16=True)
    gs = tiny_model_args("slat_decoder_gs", 1024)[1]["representation_config"]
    table = {
        "ss_flow": ("SparseStructureFlowModel", dict(resolution=16, patch_size=1, **flow)),
        "ss_decoder": ("SparseStructureDecoder", dict(out_channels=1, latent_channels=8, num_res_blocks=2,
                                                      num_res_blocks_middle=2, channels=[512, 128, 32],
                                                      use_fp16=True)),
        "slat_flow": ("SLatFlowModel", dict(resolution=64, patch_size=2, num_io_res_blocks=2,
                                            io_block_channels=[128], **flow)),
        "slat_decoder_gs": ("SLatGaussianDecoder", dict(**swin, representation_config=gs)),
        "slat_decoder_mesh": ("SLatMeshDecoder", dict(**swin, representation_config={"use_color": True})),
    }
    return table[slot]


# Checkpoint stems of TRELLIS-image-large (pipeline.json `models` values are "ckpts/<stem>").
TRELLIS_STEMS = {"ss_flow": "ss_flow_img_dit_L_16l8_fp16", "ss_decoder": "ss_dec_conv3d_16l8_fp16",
                 "slat_flow": "slat_flow_img_dit_L_64l8p2_fp16",
                 "slat_decoder_gs": "slat_dec_gs_swin8_B_64l8gs32_fp16",
                 "slat_decoder_mesh": "slat_dec_mesh_swin8_B_64l8m256c_fp16"}
# SLat normalisation of TRELLIS-image-large (`slat_normalization` of its `pipeline.json`), for repositories written here.
TRELLIS_SLAT_MEAN = [-2.1687545776367188, -0.004347046371549368, -0.13352349400520325, -0.08418072760105133,
                     -0.5271206498146057, 0.7238689064979553, -1.1414450407028198, 1.2039363384246826]
TRELLIS_SLAT_STD = [2.377650737762451, 2.386378288269043, 2.124418020248413, 2.1748552322387695,
                    2.663944721221924, 2.371192216873169, 2.6217446327209473, 2.684523105621338]


def write_trellis_repo(directory: str | os.PathLike, full_size: bool = False, cond_channels: int = 64,
                       occupancy: float | None = None, seed: int = 0) -> Path:
    """A TRELLIS-image-large-shaped model repository with random weights: pipeline.json (sampler values and
    SLat normalisation as released) + ckpts/<stem>.json/.safetensors for the five generation models. Tiny widths
    by default (tests), or the released sizes (`full_size`, for latency benchmarks). Returns the directory."""
    directory = Path(directory)
    occupancy = occupancy if occupancy is not None else (0.08 if full_size else TINY_OCCUPANCY)
    for i, slot in enumerate(SLOTS):
        save_tiny_model(slot, directory / "ckpts" / TRELLIS_STEMS[slot], cond_channels=cond_channels,
                        seed=seed + i, occupancy=occupancy, full_size=full_size)
    sampler = {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5},
               "params": {"steps": 25, "cfg_strength": 5.0, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0}}
    pipeline = {"name": "TrellisImageTo3DPipeline", "args": {
        "models": {PIPELINE_KEYS[s]: f"ckpts/{TRELLIS_STEMS[s]}" for s in SLOTS},
        "sparse_structure_sampler": sampler, "slat_sampler": sampler,
        "slat_normalization": {"mean": TRELLIS_SLAT_MEAN, "std": TRELLIS_SLAT_STD},
        "image_cond_model": "dinov2_vitl14_reg"}}
    (directory / "pipeline.json").write_text(json.dumps(pipeline, indent=2))
    return directory


TINY_OCCUPANCY = 0.004   # fraction of the 64³ grid a tiny random SS decoder marks occupied (~1k voxels)


def save_tiny_model(slot: str, path: str | os.PathLike, cond_channels: int = 64, seed: int = 0,
                    occupancy: float = TINY_OCCUPANCY, full_size: bool = False, arch: dict | None = None) -> str:
    """A random-weight model of `slot`'s real architecture in TRELLIS format: tiny widths, or with `full_size` the
    released configuration (its `ckpts/*.json`, fp16 torso); `arch` overrides constructor arguments (e.g.
    narrower SS decoder channels for cheaper tests). Every parameter is redrawn (std 1/sqrt(fan_in), norm weights
    around 1, zero-initialised output layers included) so that no output is trivially zero; the SS decoder's
    output bias is set so that about `occupancy` of the grid is occupied for a standard-normal latent."""
    from mdt.models import build_model

    name, args = full_size_model_args(slot) if full_size else tiny_model_args(slot, cond_channels)
    args = {**args, **(arch or {})}
    torch.manual_seed(seed)
    model = build_model(name, args)
    model.float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1 or pname.endswith("gamma"):
                base = 1.0 if (("norm" in pname and pname.endswith("weight")) or pname.endswith("gamma")) else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.numel() // p.shape[0] if "conv" not in pname or p.ndim != 5 else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)
        if slot == "ss_decoder":
            z = torch.randn(2, 8, 16, 16, 16, generator=g)
            logits = model(z)
            q = torch.quantile(logits.flatten()[::7], 1 - occupancy)
            model.out_layer[-1].bias -= q
        if args.get("use_fp16"):
            model.convert_to_fp16()
    save_pretrained(model, path)
    return str(path)


def ensure_tiny_models(sources: dict[str, ModelSource], cfg: GenerateConfig) -> None:
    """Write the tiny checkpoints `sources` says this run creates (DINOv2 first: its width is the flows'
    condition width)."""
    dino = sources["dinov2"]
    if dino.origin == TINY_NOW:
        save_tiny_dinov2(dino.path, hidden_size=64, image_size=cfg.image_size)
    cond_channels = 64
    if (Path(dino.path) / "config.json").exists():
        cond_channels = int(json.loads((Path(dino.path) / "config.json").read_text()).get("hidden_size", 64))
    for i, slot in enumerate(SLOTS):
        src = sources[slot]
        if src.origin == TINY_NOW:
            save_tiny_model(slot, src.path, cond_channels=cond_channels, seed=i + 1)


# ------------------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------------------

def load_image(path: str | os.PathLike):
    """Read one image file (only that file); refuse oversize files and decompression bombs."""
    from PIL import Image

    path = Path(path)
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise ValueError(f"{path.name}: {size} bytes is larger than the {MAX_IMAGE_BYTES} accepted")
    with Image.open(path) as im:
        return _checked_pil(im, path.name)


def load_image_bytes(data: bytes, name: str = "image"):
    """`load_image` for bytes already read (under the same byte cap): the pixel cap, then decode."""
    import io

    from PIL import Image

    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{name}: {len(data)} bytes is larger than the {MAX_IMAGE_BYTES} accepted")
    with Image.open(io.BytesIO(bytes(data))) as im:
        return _checked_pil(im, name)


def _checked_pil(im, name: str):
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:  # checked on the header, before any pixel is decoded
        raise ValueError(f"{name}: {w}x{h} pixels is more than the {MAX_IMAGE_PIXELS} accepted")
    im.load()
    return to_pil(im.copy())


def check_image(path: str | os.PathLike) -> str | None:
    """An input checked before any model loads, from its header only: ValueError (one line) when it is not a
    readable image within the size limits; returns a note when it has no alpha channel (it is then used whole:
    this chain has no background removal), else None."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ValueError(f"{path}: not a readable file")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is larger than the {MAX_IMAGE_BYTES} accepted")
    try:
        with Image.open(path) as im:
            (w, h), bands = im.size, im.getbands()
            has_alpha = "A" in bands or "transparency" in im.info
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not an image ({type(e).__name__})") from None
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"{path}: {w}x{h} pixels is more than the {MAX_IMAGE_PIXELS} accepted")
    if not has_alpha:
        return (f"{path.name} has no alpha channel: the whole image conditions the model (no background removal; "
                "cut the object out to RGBA first for TRELLIS's object-centred crop)")
    return None


def preprocess_image(image, size: int = 518, alpha_threshold: float = 204.0) -> Tensor:
    """TRELLIS's inference preprocessing: square 1.2× crop around the alpha bbox (alpha > 0.8·255), Lanczos
    resize, RGB premultiplied on black -> [3, size, size]. Images without alpha are used whole (background
    removal is not part of this chain)."""
    return preprocess_condition_image(image, size=size, alpha_threshold=alpha_threshold)


# ------------------------------------------------------------------------------------------------------------
# The chain
# ------------------------------------------------------------------------------------------------------------

@dataclass
class GeneratedSample:
    coords: Tensor                         # [N, 3] int, occupied voxels of the SS grid
    gaussians: Gaussians | None = None
    mesh: Any = None                       # mdt.export.flexicubes.MeshData
    occupancy_mesh: Any = None
    note: str = ""                         # why something is missing or was cut (empty occupancy, cap...)


@dataclass
class Generation:
    samples: list[GeneratedSample]
    timings: dict[str, float]              # seconds per stage (this call)
    nfe: dict[str, int]
    condition_image: Tensor                # [3, S, S] the preprocessed input


class StageTimer:
    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _set_precision(model: TrellisModule, precision: str, device: torch.device) -> TrellisModule:
    if precision == "fp32" or device.type != "cuda":
        return model.float()
    if precision == "bf16":
        model.float()
        for _, module in model.torso_primitives():
            module.to(torch.bfloat16)
    elif precision == "fp16":
        model.float()
        model.convert_to_fp16()
    return model  # auto: the published mixed layout from_pretrained keeps on CUDA


class ImageTo3D:
    """The loaded chain. Flow models of either stage may be a teacher or a student (any TRELLIS-format
    checkpoint of the right class)."""

    def __init__(self, models: dict[str, nn.Module], conditioner: ImageConditioner, cfg: GenerateConfig,
                 slat_mean: Tensor, slat_std: Tensor, sources: dict[str, ModelSource] | None = None):
        self.models, self.conditioner, self.cfg = models, conditioner, cfg
        self.device = pick_device(cfg.device)
        self.slat_mean, self.slat_std = slat_mean.to(self.device), slat_std.to(self.device)
        self.sources = sources or {}
        self.sampler = FlowEulerSampler()

    @classmethod
    def from_config(cls, cfg: GenerateConfig) -> "ImageTo3D":
        cfg.validate()
        sources, pipe_args = resolve_model_paths(cfg)
        ensure_tiny_models(sources, cfg)
        device = pick_device(cfg.device)
        models = {}
        for slot in SLOTS:
            if slot == "ss_decoder":  # a TRELLIS SS decoder or an occupancy probe (the CPU demo's SS decoder)
                model = load_decoder(sources[slot].path).to(device)
            else:
                model = from_pretrained(sources[slot].path, device=device)
            if isinstance(model, TrellisModule):
                model = _set_precision(model, cfg.precision, device)
            models[slot] = model.eval()
        dino_dtype = torch.float16 if device.type == "cuda" and cfg.precision != "fp32" else torch.float32
        conditioner = ImageConditioner(sources["dinov2"].path, image_size=cfg.image_size, device=device,
                                       dtype=dino_dtype)
        norm = cfg.slat_normalization or pipe_args.get("slat_normalization")
        if norm is None:
            raise ValueError("no SLat normalisation: set slat_normalization or use a pipeline.json that has it")
        mean, std = torch.tensor(norm["mean"], dtype=torch.float32), torch.tensor(norm["std"], dtype=torch.float32)
        check_compatible(models, conditioner, mean)
        return cls(models, conditioner, cfg, mean, std, sources)

    def with_flows(self, ss_flow: "str | nn.Module | None" = None,
                   slat_flow: "str | nn.Module | None" = None) -> "ImageTo3D":
        """The same chain (shared conditioner and decoders) with other flow models for either stage: a
        checkpoint path (`<dir>/<stem>` or hub path) or a loaded module, e.g. teacher SS flow + student SLat."""
        models, sources = dict(self.models), dict(self.sources)
        for slot, new in (("ss_flow", ss_flow), ("slat_flow", slat_flow)):
            if new is None:
                continue
            if not isinstance(new, nn.Module):
                sources[slot] = ModelSource(str(new), "config")
                new = _set_precision(from_pretrained(str(new), device=self.device), self.cfg.precision,
                                     self.device).eval()
            models[slot] = new
        check_compatible(models, self.conditioner, self.slat_mean)
        return ImageTo3D(models, self.conditioner, self.cfg, self.slat_mean, self.slat_std, sources)

    # ---- stages ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, images: Tensor) -> Tensor:
        """[B, 3, S, S] in [0, 1] -> cond [B, T, C] (the negative condition is zeros)."""
        return self.conditioner(images.to(self.device))

    @torch.no_grad()
    def sample_structure(self, cond: Tensor, num_samples: int,
                         generator: "torch.Generator | list[torch.Generator]",
                         sampler: StageSampler | None = None) -> Tensor:
        """cond [1, T, C] (or one per sample [K, T, C]) -> SS latents [K, 8, R, R, R] in one batch; noise drawn
        from `generator`, or sample i's from `generator[i]` (noise that does not depend on which samples share
        the batch)."""
        s = sampler or self.cfg.ss
        flow = self.models["ss_flow"]
        r = flow.resolution
        if isinstance(generator, torch.Generator):
            noise = torch.randn((num_samples, flow.in_channels, r, r, r), generator=generator, device=self.device)
        else:
            noise = torch.cat([torch.randn((1, flow.in_channels, r, r, r), generator=g, device=self.device)
                               for g in generator])
        return self.sampler.sample(flow, noise, cond, torch.zeros_like(cond), steps=s.steps,
                                   rescale_t=s.rescale_t, cfg_strength=s.cfg_strength,
                                   cfg_interval=tuple(s.cfg_interval))

    @torch.no_grad()
    def decode_structure(self, z: Tensor) -> tuple[list[Tensor], list[str]]:
        """SS latents -> per sample the occupied voxel coords [N, 3] (decoder logits > 0) and a note."""
        return self.occupied(self.models["ss_decoder"](z).float())

    def occupied(self, logits: Tensor) -> tuple[list[Tensor], list[str]]:
        """Per sample: coords [N, 3] of logits > 0 (capped to the highest `max_structure_voxels`), and a note."""
        cap = self.cfg.decode.max_structure_voxels
        coords, notes = [], []
        for k in range(logits.shape[0]):
            lg = logits[k, 0]
            idx = torch.nonzero(lg > 0)
            note = ""
            if cap is not None and idx.shape[0] > cap:
                vals = lg[idx[:, 0], idx[:, 1], idx[:, 2]]
                keep = torch.topk(vals, cap).indices.sort().values
                note = f"occupancy capped from {idx.shape[0]} to {cap} voxels (decode.max_structure_voxels)"
                idx = idx[keep]
            if idx.shape[0] == 0:
                note = "empty occupancy (no SS decoder logit > 0): nothing to decode"
            coords.append(idx.int())
            notes.append(note)
        return coords, notes

    @torch.no_grad()
    def sample_latent(self, cond: Tensor, coords: list[Tensor],
                      generator: "torch.Generator | list[torch.Generator]",
                      sampler: StageSampler | None = None) -> SparseTensor:
        """cond [1, T, C] (or one per sample), per-sample coords (all non-empty) -> de-normalised SLat, one batch
        entry per sample; noise as `sparse_noise` draws it."""
        s = sampler or self.cfg.slat
        flow = self.models["slat_flow"]
        noise = sparse_noise(coords, flow.in_channels, generator, self.device)
        cond_k = cond if cond.shape[0] == len(coords) else cond.expand(len(coords), *cond.shape[1:])
        z = self.sampler.sample(flow, noise, cond_k, torch.zeros_like(cond_k), steps=s.steps,
                                rescale_t=s.rescale_t, cfg_strength=s.cfg_strength,
                                cfg_interval=tuple(s.cfg_interval))
        return denormalize_slat(z, self.slat_mean, self.slat_std)

    def chunks(self, slat: SparseTensor) -> list[list[int]]:
        """Groups of whole samples holding at most decode.max_voxels_per_chunk voxels (at least one sample)."""
        return sample_groups(slat.counts.tolist(), self.cfg.decode.max_voxels_per_chunk)

    @torch.no_grad()
    def decode_gaussians(self, slat: SparseTensor) -> list[Gaussians]:
        return decode_gaussians(self.models["slat_decoder_gs"], slat, self.cfg.decode.max_voxels_per_chunk)

    @torch.no_grad()
    def decode_meshes(self, slat: SparseTensor) -> list:
        from mdt.export.flexicubes import MeshData, mesh_from_decoder_output

        dec, parts, out = self.models["slat_decoder_mesh"], sparse_unbind(slat), []
        resolution = dec.resolution * 4
        for group in self.chunks(slat):
            h = dec(sparse_cat([parts[i] for i in group]))
            for sl in h.layout:
                m = mesh_from_decoder_output(h.coords[sl][:, 1:], h.feats[sl], resolution)
                out.append(MeshData(m.vertices.cpu(), m.faces.cpu(),
                                    None if m.attributes is None else m.attributes.cpu()))
            del h  # the 4×-resolution decoder output is the largest tensor of the chain
        return out

    # ---- everything --------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, image, num_samples: int | None = None, seed: int | None = None,
            formats: list[str] | None = None, ss: StageSampler | None = None,
            slat: StageSampler | None = None) -> Generation:
        """One input image (PIL / array / bytes, or an already preprocessed [3, S, S] tensor) -> `num_samples`
        samples in one batch. `ss` / `slat` override the config's samplers for this call."""
        from mdt.export.mesh import occupancy_mesh

        k = num_samples or self.cfg.num_samples
        formats = formats or self.cfg.decode.formats
        ss, slat_s = ss or self.cfg.ss, slat or self.cfg.slat
        timer = StageTimer(self.device)
        with timer("preprocess"):
            img = image if isinstance(image, Tensor) else preprocess_image(image, self.cfg.image_size,
                                                                           self.cfg.alpha_threshold)
        with timer("condition"):
            cond = self.condition(img.unsqueeze(0))
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed if seed is None else seed)
        with timer("ss_flow"):
            z = self.sample_structure(cond, k, generator, ss)
        with timer("ss_decode"):
            coords, notes = self.decode_structure(z)
        resolution = self.occupancy_resolution()
        samples = [GeneratedSample(coords=c.cpu(), note=n) for c, n in zip(coords, notes)]
        if self.cfg.decode.occupancy_mesh:
            with timer("occupancy_mesh"):
                for smp in samples:
                    smp.occupancy_mesh = occupancy_mesh(smp.coords, resolution)
        live = [i for i, c in enumerate(coords) if c.shape[0] > 0]
        if live:
            with timer("slat_flow"):
                latent = self.sample_latent(cond, [self.to_slat_grid(coords[i]) for i in live], generator, slat_s)
            if "gaussians" in formats:
                with timer("decode_gaussians"):
                    for i, g in zip(live, self.decode_gaussians(latent)):
                        samples[i].gaussians = g
            if "mesh" in formats:
                with timer("decode_mesh"):
                    for i, m in zip(live, self.decode_meshes(latent)):
                        samples[i].mesh = m
        return Generation(samples, {k_: round(v, 6) for k_, v in timer.seconds.items()},
                          {"ss_flow": ss.nfe(), "slat_flow": slat_s.nfe()}, img.cpu())

    def occupancy_resolution(self) -> int:
        """Side of the occupancy grid the SS decoder produces (×2 per upsampling block of the latent grid, or an
        occupancy probe's upsampling factor)."""
        dec = self.models["ss_decoder"]
        if isinstance(dec, OccupancyProbe):
            return self.models["ss_flow"].resolution * dec.upsample
        ups = sum(1 for b in dec.blocks if type(b).__name__ == "UpsampleBlock3d")
        return self.models["ss_flow"].resolution * 2 ** ups

    def to_slat_grid(self, coords: Tensor) -> Tensor:
        """Occupied cells [N, 3] of the occupancy grid -> voxels of the SLat flow's grid: the same cells for
        TRELLIS's 64³ decoder; for a coarser decoder (a 16³ probe) each cell's centre voxel, so that the SLat
        stage and its Gaussians stay where the shape is."""
        r = self.models["slat_flow"].resolution // self.occupancy_resolution()
        return coords if r <= 1 else coords * r + r // 2

    def warmup(self, image, num_samples: int | None = None) -> None:
        """One untimed pass with 1 step per stage and the same batch shape (kernels, caches, allocator)."""
        one = StageSampler(steps=1, cfg_strength=0.0, cfg_interval=[0.0, 1.0], rescale_t=1.0)
        self.run(image, num_samples=num_samples, ss=one, slat=one)


def sparse_noise(coords: list[Tensor], channels: int, generator: "torch.Generator | list[torch.Generator]",
                 device: torch.device) -> SparseTensor:
    """Standard-normal SLat noise on per-sample voxel coordinates [N_i, 3], one batch entry per sample: drawn
    from one generator for the whole batch, or sample i from `generator[i]` (noise that does not depend on which
    samples share the batch)."""
    batch = torch.cat([torch.cat([torch.full((c.shape[0], 1), i, dtype=torch.int32, device=c.device), c.int()], 1)
                       for i, c in enumerate(coords)]).to(device)
    if isinstance(generator, torch.Generator):
        feats = torch.randn((batch.shape[0], channels), generator=generator, device=generator.device)
    else:
        feats = torch.cat([torch.randn((c.shape[0], channels), generator=g, device=g.device)
                           for c, g in zip(coords, generator)])
    return SparseTensor(feats.to(device), batch, batch_size=len(coords))


def denormalize_slat(z: SparseTensor, mean: Tensor, std: Tensor) -> SparseTensor:
    """A sampled (normalised) SLat -> the decoders' latent space: feats * std + mean, per channel."""
    return z.replace(z.feats.float() * std.to(z.feats.device) + mean.to(z.feats.device))


def sample_groups(counts: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of whole samples holding at most `budget` voxels (at least one sample per group)."""
    groups, cur, n = [], [], 0
    for i, c in enumerate(counts):
        if cur and n + c > budget:
            groups.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += c
    if cur:
        groups.append(cur)
    return groups


@torch.no_grad()
def decode_gaussians(decoder: nn.Module, slat: SparseTensor, max_voxels_per_chunk: int) -> list[Gaussians]:
    """A de-normalised SLat batch -> per sample its float32 CPU Gaussians, decoded over groups of whole samples
    holding at most `max_voxels_per_chunk` voxels (decoding, not sampling, bounds the memory)."""
    parts, out = sparse_unbind(slat), []
    for group in sample_groups(slat.counts.tolist(), max_voxels_per_chunk):
        out.extend(_gaussians_to_float(g) for g in decoder(sparse_cat([parts[i] for i in group])))
    return out


def _gaussians_to_float(g: Gaussians) -> Gaussians:
    return Gaussians(xyz=g.xyz.float().cpu(), features_dc=g.features_dc.float().cpu(),
                     scaling=g.scaling.float().cpu(), rotation=g.rotation.float().cpu(),
                     opacity=g.opacity.float().cpu(), scaling_bias=g.scaling_bias, opacity_bias=g.opacity_bias,
                     filter_3d=g.filter_3d)


def check_compatible(models: dict[str, nn.Module], conditioner: ImageConditioner, slat_mean: Tensor) -> None:
    """One readable error for models that cannot work together (instead of a shape error mid-run)."""
    problems = []
    for slot in ("ss_flow", "slat_flow"):
        cond_in = models[slot].blocks[0].cross_attn.to_kv.in_features   # keys/values come from the condition
        if cond_in != conditioner.channels:
            problems.append(f"{slot} expects {cond_in}-channel condition tokens, DINOv2 gives {conditioner.channels}")
    ssf, ssd = models["ss_flow"], models["ss_decoder"]
    if ssf.out_channels != ssd.latent_channels:
        problems.append(f"ss_flow makes {ssf.out_channels}-channel latents, ss_decoder takes {ssd.latent_channels}")
    lat = models["slat_flow"].out_channels
    for slot in ("slat_decoder_gs", "slat_decoder_mesh"):
        if models[slot].latent_channels != lat:
            problems.append(f"{slot} takes {models[slot].latent_channels}-channel latents, slat_flow makes {lat}")
    if slat_mean.numel() != lat:
        problems.append(f"slat_normalization has {slat_mean.numel()} channels, slat_flow makes {lat}")
    if problems:
        raise ValueError("incompatible models: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------

def sample_point_clouds(sample: GeneratedSample, resolution: int, surface_points: int, prefix: str = ""):
    """What previews show of one sample: Gaussian centres, mesh surface samples, occupied voxel centres."""
    from mdt.export.mesh import sample_surface
    from mdt.export.preview import PointCloud, gaussian_cloud, shade_normals

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
    from mdt.export.mesh import write_glb
    from mdt.export.ply import write_gaussian_ply

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
    from mdt.export.html import write_orbit_viewer
    from mdt.export.preview import save_preview

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



# ------------------------------------------------------------------------------------------------------------
# TRELLIS.2: image -> DINOv3 tokens -> SS latent -> occupancy -> shape latent -> texture latent
# ------------------------------------------------------------------------------------------------------------
# TRELLIS.2's shape and texture VAEs need CUDA-only extensions (FlexGEMM, o-voxel, CuMesh), so this chain stops at
# the latents: it writes them with their voxel coordinates, plus the occupancy mesh of the SS stage (decoded by
# TRELLIS's SS decoder, which TRELLIS.2 reuses).

TRELLIS2_SLOTS = ("t2_ss_flow", "t2_shape_flow", "t2_tex_flow")
TRELLIS2_LATENT_CHANNELS = 32          # shape and texture latents (the texture flow takes 32 + 32 in)


def tiny_trellis2_args(slot: str, cond_channels: int) -> tuple[str, dict]:
    """TRELLIS.2's released flow args at CPU size: RoPE, shared adaLN + per-block modulation bias, qk RMS norm in
    self- and cross-attention, no patching, float32 torso; the real latent channels (8 SS, 32 shape/texture)."""
    torso = dict(model_channels=64, cond_channels=cond_channels, num_blocks=1, num_heads=4, mlp_ratio=2,
                 pe_mode="rope", share_mod=True, initialization="scaled", qk_rms_norm=True,
                 qk_rms_norm_cross=True, dtype="float32")
    c = TRELLIS2_LATENT_CHANNELS
    table = {"t2_ss_flow": ("SparseStructureFlowModel", dict(resolution=16, in_channels=8, out_channels=8, **torso)),
             "t2_shape_flow": ("SLatFlowModel", dict(resolution=32, in_channels=c, out_channels=c, **torso)),
             "t2_tex_flow": ("SLatFlowModel", dict(resolution=32, in_channels=2 * c, out_channels=c, **torso))}
    return table[slot]


def write_trellis2_repo(directory: str | os.PathLike, cond_channels: int = 64, seed: int = 0,
                        shape_normalization: dict | None = None, tex_normalization: dict | None = None) -> Path:
    """A TRELLIS.2-4B-shaped repository with tiny random weights: ckpts/<stem>.json/.safetensors of the 512
    pipeline's SS, shape and texture flows (the stems `jobs/configs/generate_trellis2.yaml` names) and a
    pipeline.json with the shape/texture latent normalisation (identity unless given). Returns the directory."""
    directory = Path(directory)
    stems = {"t2_ss_flow": "ss_flow_img_dit_1_3B_64_bf16", "t2_shape_flow": "slat_flow_img2shape_dit_1_3B_512_bf16",
             "t2_tex_flow": "slat_flow_imgshape2tex_dit_1_3B_512_bf16"}
    for i, (slot, stem) in enumerate(stems.items()):
        save_tiny_model(slot, directory / "ckpts" / stem, cond_channels=cond_channels, seed=seed + i)
    identity = {"mean": [0.0] * TRELLIS2_LATENT_CHANNELS, "std": [1.0] * TRELLIS2_LATENT_CHANNELS}
    pipeline = {"name": "Trellis2ImageTo3DPipeline", "args": {
        "models": {"sparse_structure_flow_model": f"ckpts/{stems['t2_ss_flow']}",
                   "shape_slat_flow_model_512": f"ckpts/{stems['t2_shape_flow']}",
                   "tex_slat_flow_model_512": f"ckpts/{stems['t2_tex_flow']}"},
        "shape_slat_normalization": shape_normalization or identity,
        "tex_slat_normalization": tex_normalization or identity}}
    (directory / "pipeline.json").write_text(json.dumps(pipeline, indent=2))
    return directory


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
        from mdt.flow import count_nfe_trellis2

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

    def validate(self) -> None:
        from mdt.config import ConfigError

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
            if norm is None and not self.models.pipeline:
                raise ConfigError(f"{name} is required ({{mean, std}} of the {TRELLIS2_LATENT_CHANNELS} channels) "
                                  "unless models.pipeline gives it")
            if norm is not None and (set(norm) != {"mean", "std"}
                                     or any(len(norm[k]) != TRELLIS2_LATENT_CHANNELS for k in norm)):
                raise ConfigError(f"{name} must be {{mean, std}} with {TRELLIS2_LATENT_CHANNELS} values each")


def resolve_trellis2_paths(cfg: Trellis2GenerateConfig) -> dict[str, ModelSource]:
    """slot -> ModelSource for dinov3, ss_flow, ss_decoder, shape_flow, tex_flow (tiny ones where configured)."""
    m, sources = cfg.models, {}
    for slot in ("ss_flow", "ss_decoder", "shape_flow", "tex_flow"):
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
    from mdt.conditioning import save_tiny_dinov3

    dino = sources["dinov3"]
    if dino.origin == TINY_NOW:
        save_tiny_dinov3(dino.path, hidden_size=64, image_size=cfg.image_size)
    cond_channels = int(json.loads((Path(dino.path) / "config.json").read_text()).get("hidden_size", 64)) \
        if (Path(dino.path) / "config.json").exists() else 64
    for i, slot in enumerate(("ss_flow", "ss_decoder", "shape_flow", "tex_flow")):
        if sources[slot].origin == TINY_NOW:
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
    -> shape flow on them -> texture flow with the normalised shape latent as `concat_cond`."""

    def __init__(self, models: dict[str, nn.Module], conditioner: ImageConditioner, cfg: Trellis2GenerateConfig,
                 sources: dict[str, ModelSource] | None = None):
        from mdt.flow import FlowEulerGuidanceIntervalSampler

        self.models, self.conditioner, self.cfg = models, conditioner, cfg
        self.device = pick_device(cfg.device)
        self.sources = sources or {}
        self.sampler = FlowEulerGuidanceIntervalSampler()
        pipe_args = read_pipeline_json(cfg.models.pipeline).get("args", {}) if cfg.models.pipeline else {}
        self.norm = {}
        for stage, given in (("shape", cfg.shape_normalization), ("tex", cfg.tex_normalization)):
            norm = given or pipe_args.get(f"{stage}_slat_normalization")
            if norm is None:
                raise ValueError(f"no {stage} latent normalisation: set {stage}_normalization")
            self.norm[stage] = {k: torch.tensor(norm[k], dtype=torch.float32, device=self.device)
                                for k in ("mean", "std")}

    @classmethod
    def from_config(cls, cfg: Trellis2GenerateConfig) -> "Trellis2ImageTo3D":
        cfg.validate()
        sources = resolve_trellis2_paths(cfg)
        ensure_tiny_trellis2(sources, cfg)
        device = pick_device(cfg.device)
        models = {slot: from_pretrained(sources[slot].path, device=device).float().eval()
                  for slot in ("ss_flow", "ss_decoder", "shape_flow", "tex_flow")}
        conditioner = ImageConditioner(sources["dinov3"].path, image_size=cfg.image_size, device=device)
        problems = [f"{slot} expects {m.blocks[0].cross_attn.to_kv.in_features}-channel condition tokens, DINOv3 "
                    f"gives {conditioner.channels}" for slot in ("ss_flow", "shape_flow", "tex_flow")
                    for m in [models[slot]] if m.blocks[0].cross_attn.to_kv.in_features != conditioner.channels]
        if models["ss_flow"].out_channels != models["ss_decoder"].latent_channels:
            problems.append("ss_flow and ss_decoder disagree on the SS latent channels")
        if models["tex_flow"].in_channels != models["tex_flow"].out_channels + models["shape_flow"].out_channels:
            problems.append("tex_flow input is not its latent plus the shape latent (concat_cond)")
        if problems:
            raise ValueError("incompatible models: " + "; ".join(problems))
        return cls(models, conditioner, cfg, sources)

    @torch.no_grad()
    def run(self, image, num_samples: int | None = None, seed: int | None = None,
            samplers: dict[str, GuidanceSampler] | None = None) -> Trellis2Generation:
        """One image -> `num_samples` samples in one batch; `samplers` overrides {ss, shape, tex} for this call."""
        from mdt.export.mesh import occupancy_mesh

        cfg, k = self.cfg, num_samples or self.cfg.num_samples
        s = {"ss": cfg.ss, "shape": cfg.shape, "tex": cfg.tex, **(samplers or {})}
        timer = StageTimer(self.device)
        with timer("preprocess"):
            img = preprocess_image(image, cfg.image_size, cfg.alpha_threshold)
        with timer("condition"):
            cond = self.conditioner(img.unsqueeze(0).to(self.device))
        cond_k = cond.expand(k, *cond.shape[1:])
        neg_k = torch.zeros_like(cond_k)
        generator = torch.Generator(self.device).manual_seed(cfg.seed if seed is None else seed)
        ssf = self.models["ss_flow"]
        with timer("ss_flow"):
            noise = torch.randn((k, ssf.in_channels) + (ssf.resolution,) * 3, generator=generator,
                                device=self.device)
            z = self.sampler.sample(ssf, noise, cond_k, neg_k, **s["ss"].kwargs())
        with timer("ss_decode"):
            occ = max_pool_occupancy(self.models["ss_decoder"](z).float(), cfg.structure_resolution)
        samples = []
        for grid in occ:
            coords, note = torch.nonzero(grid).int(), ""
            if cfg.max_structure_voxels is not None and coords.shape[0] > cfg.max_structure_voxels:
                note = f"occupancy capped from {coords.shape[0]} to {cfg.max_structure_voxels} voxels"
                coords = coords[:cfg.max_structure_voxels]
            if coords.shape[0] == 0:
                note = "empty occupancy (no SS decoder logit > 0): no shape or texture latent"
            samples.append(Trellis2Sample(coords=coords.cpu(), note=note))
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
    import numpy as np

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
    from mdt.export.mesh import write_glb

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
