"""The config tree of the image -> 3-D chain (`GenerateConfig`; presets `jobs/configs/generate_<name>.yaml`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from mdt.config import ConfigError
from mdt.flow import count_nfe
from mdt.models.base import PRECISIONS

FORMATS = ("gaussians", "mesh")

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
    precision: str = "auto"               # auto (fp16 torso on CUDA, fp32 on CPU) | fp32 | fp16 | bf16 (any device)
    warmup: bool = True                   # one untimed pass first, so timings.json holds warm figures
    torch_threads: int | None = None      # intra-op CPU threads for generate() (None: torch's default)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    output: str = "outputs/generate"

    def validate(self) -> None:
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
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.decode.max_voxels_per_chunk < 1:
            raise ConfigError("decode.max_voxels_per_chunk must be >= 1")
        if self.slat_normalization is not None and set(self.slat_normalization) != {"mean", "std"}:
            raise ConfigError("slat_normalization must have exactly the keys mean and std")
