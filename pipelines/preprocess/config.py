"""Typed configuration of the preprocessing job (defaults here, presets in jobs/configs/preprocess_*.yaml).

Every section is a dataclass; ``mdt/config.py`` loads a YAML preset and ``--set a.b=c`` overrides into
this tree. Defaults are TRELLIS's settings (reference §4.4) where one exists.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from mdt.config import ConfigError
from pipelines.common.config import RayConfig, StorageConfig

SCHEMA_VERSION = 1  # bumped whenever the shard schema changes (pipelines/preprocess/shards.py)

MESH_FORMATS = ["glb", "gltf", "obj", "ply", "fbx", "stl", "blend", "dae", "usdz", "usd", "usda", "usdc", "abc"]


@dataclass
class StageResources:
    """Ray resources of one stage's actor pool."""

    concurrency: int = 1  # number of actors
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_gb: float | None = None  # Ray logical memory per actor (scheduling only)
    batch_size: int = 1  # rows per call for a stage that processes batches (`call_batch`: synthesize)


@dataclass
class SourcesConfig:
    specs: list[str] = field(default_factory=list)  # "local:<dir>", "synthetic:<n>", ... (see sources/__init__)
    limit_per_source: int | None = None
    synthetic_seed: int = 0
    # Objaverse 1.0 / XL
    objaverse_dir: str = "~/.objaverse"  # the objaverse package's cache (annotations, object-paths)
    objaverse_hf_base: str = "https://huggingface.co/datasets/allenai/objaverse/resolve/main"
    objaverse_xl_sources: list[str] = field(default_factory=lambda: ["sketchfab", "github"])
    github_archive_url: str = "https://codeload.github.com/{org}/{repo}/zip/{commit}"
    thingiverse_url: str = "https://www.thingiverse.com/download:{file_id}"
    # HSSD (gated Hugging Face dataset; token from $HF_TOKEN via huggingface_hub)
    hf_endpoint: str | None = None  # None: huggingface_hub's default ($HF_ENDPOINT or huggingface.co)
    hssd_repo: str = "hssd/hssd-models"
    hssd_revision: str = "main"


@dataclass
class FilterConfig:
    """Applied on the driver to the listed source rows, before anything is downloaded."""

    trellis_metadata: list[str] = field(default_factory=list)  # TRELLIS-500K CSVs (path / s3:// / http(s)://)
    min_aesthetic: float | None = None  # TRELLIS: 5.5 for Objaverse-XL, 4.5 for the others
    sha256_list: str | None = None  # text file, one sha256 per line
    licenses: list[str] | None = None  # keep only these licence strings (None: all)
    file_types: list[str] | None = None  # keep only these extensions (None: all of MESH_FORMATS)
    limit: int | None = None  # total rows after filtering (first N, deterministic order)


@dataclass
class DownloadConfig:
    cache_uri: str = ""  # content-addressed cache: local dir or s3://; "" = <output>/cache
    max_bytes: int = 512 * 1024 * 1024  # size cap per file (archives: per archive, see max_archive_bytes)
    max_archive_bytes: int = 64 * 1024**3
    timeout_s: float = 60.0
    attempts: int = 5  # total attempts per request (tenacity)
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    per_host_concurrency: int = 4  # per download actor; cluster-wide bound = actors x this
    # Files up to this size travel in the row (Ray's object store); larger ones are streamed from the cache to
    # the local disk of the stage that needs them (pipelines.preprocess.download.materialize_mesh). 0: never in the row.
    carry_max_bytes: int = 8 * 1024 * 1024
    extract_dir: str = ""  # per-node directory for unpacked archives; "" = <tmp>/mdt-archives
    bundle_max_files: int = 256  # multi-file assets (gltf/obj): at most this many referenced files


@dataclass
class RenderConfig:
    """Feature-view rendering (TRELLIS: 150 views, 512 px, radius 2, FOV 40°, Cycles 128 spp)."""

    num_views: int = 150
    resolution: int = 512
    engine: str = "CYCLES"
    samples: int = 128
    radius: float = 2.0
    fov_deg: float = 40.0
    timeout_s: float = 900.0
    device: str = "auto"  # auto | cpu | gpu
    threads: int = 0  # Cycles threads per render (0: Blender decides)
    denoise: bool = True
    memory_limit_mb: int = 16384  # address-space cap of the Blender child process
    view_transform: str = "Filmic"
    bottom_light_up: bool = False
    seed: int = 0  # mixed into the per-asset camera offsets
    export_mesh: bool = True  # normalised mesh for the voxelizer
    # A warm worker (a started interpreter) per concurrent render forks one child per asset (same timeout,
    # memory cap, wall and fresh scene; the child imports bpy). False: a new Python process per asset.
    warm_workers: bool = True
    # The worker's sandbox (pipelines/README.md, "The render sandbox") is required: an asset fails with
    # "no sandbox: <why>" where it cannot be set up. True renders without it (logged, recorded per row).
    allow_unsandboxed: bool = False
    # Formats the checker cannot scan for references (usdc, usdz, abc): refused unless listed here, and then
    # rendered only inside the sandbox.
    unscannable_formats: list[str] = field(default_factory=list)
    # Per image, checked from its header before any decoder runs: 8192^2 px is 1 GiB as Blender's float RGBA.
    max_image_pixels: int = 8192 * 8192

    def __post_init__(self):
        bad = set(self.unscannable_formats) - {"usdc", "usdz", "abc"}
        if bad:
            raise ConfigError(f"render.unscannable_formats: {sorted(bad)} are not unscannable formats "
                              "(usdc, usdz, abc)")
        if self.unscannable_formats and self.allow_unsandboxed:
            raise ConfigError("render.unscannable_formats needs the sandbox: not with render.allow_unsandboxed")


@dataclass
class CondConfig:
    """Condition views (TRELLIS: 24 views at 1024 px, random FOV 10°–70°) and how shards store them."""

    enabled: bool = True
    num_views: int = 24
    render_resolution: int = 1024
    samples: int = 128
    image_size: int = 518  # stored size after cropping to the object
    image_format: str = "png"  # png (RGBA) | jpeg (RGB, premultiplied on black)
    jpeg_quality: int = 95
    crop_margin: float = 0.1  # extra border around the alpha bbox, fraction of its size


@dataclass
class VoxelizeConfig:
    resolution: int = 64  # the voxel grid (also the grid features are gathered on and latents encode)
    clamp_eps: float = 1e-6  # vertices are clamped this far inside the unit cube before voxelizing


@dataclass
class FeaturesConfig:
    model: str = "dinov2_vitl14_reg"  # name used in the manifest
    checkpoint: str | None = None  # local dir / HF repo of the DINOv2 weights; None = ViT-L/14-reg
    image_size: int = 518
    batch_size: int = 16
    device: str = "auto"  # auto | cpu | cuda[:i]
    dtype: str = "float32"  # DINOv2 compute dtype: float32 | float16 (float32 on a CPU) | bfloat16

    def __post_init__(self):
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"features.dtype must be float32, float16 or bfloat16, got {self.dtype!r}")


@dataclass
class EncodeConfig:
    ss_encoder: str = "microsoft/TRELLIS-image-large/ckpts/ss_enc_conv3d_16l8_fp16"
    slat_encoder: str = "microsoft/TRELLIS-image-large/ckpts/slat_enc_swin8_B_64l8_fp16"
    device: str = "auto"


@dataclass
class WriteConfig:
    rows_per_shard: int = 64  # also the ledger commit unit: a kill loses at most this many in-flight assets
    compression: str = "zstd"
    # Row fields an asset must have to be written (else it is a "write: missing ..." failure).
    required: list[str] = field(default_factory=lambda: ["ss_latent", "slat_coords", "slat_feats", "cond_images"])
    compact_ledger: bool = True  # merge the run's ledger batch files at the end


@dataclass
class ResumeConfig:
    enabled: bool = True  # skip assets already done for this config hash
    retry_failed: bool = False  # also redo assets whose last record is "failed"


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else no MLflow logging
    experiment: str = "preprocess"
    run_name: str | None = None
    artifact_location: str | None = None  # used when the experiment is created (None: the server's default)


@dataclass
class ReportConfig:
    eta_assets: list[int] = field(default_factory=lambda: [10_000, 500_000])
    top_reasons: int = 10


DEFAULT_STAGES = ["download", "render", "voxelize", "features", "encode"]


@dataclass
class PreprocessConfig:
    output: str = "outputs/preprocess"  # local dir or s3://bucket/prefix
    # CPU demo / CI only: a local directory where random-weight tiny DINOv2 and SS/SLat encoders are created
    # (if missing) and used instead of features.checkpoint / encode.* (mdt.models.zoo.ensure_tiny_preprocess_models).
    tiny_models: str | None = None
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    resources: dict[str, StageResources] = field(
        default_factory=lambda: {
            "download": StageResources(concurrency=2, num_cpus=0.5),
            "render": StageResources(concurrency=1, num_cpus=1),
            "voxelize": StageResources(concurrency=1, num_cpus=1),
            "features": StageResources(concurrency=1, num_cpus=1),
            "encode": StageResources(concurrency=1, num_cpus=1),
            "write": StageResources(concurrency=1, num_cpus=0.5),
        }
    )
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    cond: CondConfig = field(default_factory=CondConfig)
    voxelize: VoxelizeConfig = field(default_factory=VoxelizeConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def cache_uri(self) -> str:
        return self.download.cache_uri or join_uri(self.output, "cache")


# Sections whose settings change what lands in a shard. Sources, paths and resources do not.
OUTPUT_SECTIONS = ("render", "cond", "voxelize", "features", "encode")


def config_hash(cfg: PreprocessConfig) -> str:
    """Short hash of the output-affecting settings: the ledger's resume key."""
    d = asdict(cfg)
    # A job built on this config (pipelines.synthesize) names its own output-affecting sections.
    payload = {k: d[k] for k in (*OUTPUT_SECTIONS, *getattr(cfg, "extra_output_sections", ()))}
    payload["stages"] = list(cfg.stages)
    payload["schema_version"] = SCHEMA_VERSION
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI (keeps ``s3://``)."""
    out = base.rstrip("/")
    for p in parts:
        if p:
            out = f"{out}/{p.strip('/')}"
    return out
