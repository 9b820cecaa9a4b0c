"""Typed configuration of the trainer (`Trainer`, the networks it builds, the data it reads): defaults here, presets in
jobs/configs/distill_*.yaml.

One dataclass tree. The distillation job's configuration (`pipelines.distill.config.DistillJobConfig`) is this tree
plus the sections of the Ray job around the trainer (`JOB_SECTIONS`: workers, cluster, tracking, snapshots,
evaluation after training), so a preset holds both; library code reads a preset's trainer settings with
``load_trainer_config(preset, overrides)``, which leaves those sections out. The objective sections embed
``mdt.distill``'s own config dataclasses, so every hyper-parameter of an objective is settable with
``--set objective.mdt.w_vm=3.0``. Defaults follow the released MDT-dist configs (reference section 5.2) where one
exists; the CPU presets shrink everything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mdt.config import load_config
from mdt.distill import CMConfig, FlowMatchingConfig, MDTConfig, PCMConfig, SCMConfig

OBJECTIVES = ("flow_matching", "mdt", "vm", "cm", "pcm", "scm")
STAGES = ("ss", "slat")
# Top-level sections of a distill_*.yaml preset that configure the Ray job around the trainer
# (`pipelines.distill.config.DistillJobConfig`), not the trainer.
JOB_SECTIONS = ("scaling", "ray", "mlflow", "snapshot", "eval")


@dataclass
class DataConfig:
    """Training shards (the preprocessing job's output) and how each worker batches them."""

    uri: str = ""                       # preprocessing output dir (or its manifest.json), local or s3://
    batch_size: int = 8                 # per worker and step (TRELLIS/MDT: batch_size_per_gpu 8)
    batch_split: int = 1                # micro-batches per step (gradient accumulation; MDT: 2)
    max_voxels: int | None = 32768      # SLat: assets with more voxels are dropped (both stages, consistently)
    min_aesthetic: float | None = None
    cond_view: int | None = None        # condition view per asset; None: a random one per row and step
    shuffle_buffer: int = 64            # local shuffle buffer of each worker's stream (0: off)
    cache_in_memory: bool = False       # keep the worker's rows after the first epoch (tiny CPU datasets only)
    prefetch_batches: int = 1
    storage_s3_endpoint_url: str | None = None  # S3 endpoint of s3:// shards and outputs (else $AWS_ENDPOINT_URL)
    skip_on_resume: bool = True         # re-read and drop the batches of the interrupted epoch already consumed
    allow_teacher_mismatch: bool = False  # distil from teacher-generated shards of another teacher (jobs/synthesize.py)


@dataclass
class ModelConfig:
    """Teacher and student networks (TRELLIS checkpoints, ``mdt.models.from_pretrained`` paths)."""

    teacher: str | None = None          # `<dir>/<stem>` or `<hf_repo>/ckpts/<stem>`; None: no teacher
    student: str | None = None          # student init; None: a copy of the teacher (or `name`/`args` from scratch)
    name: str = "SparseStructureFlowModel"  # class built from `args` when neither checkpoint is given
    args: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    # `<stem>.json` + `<stem>.safetensors` of the export; `{stage}` and `{role}` are filled in by validate() (role:
    # `teacher` for flow_matching, `student` for the distillation objectives), so the default names an exported
    # flow-matching teacher `ss_flow_teacher` and an MDT-dist student `ss_flow_student`; a literal name is kept
    export_stem: str = "{stage}_flow_{role}"
    teacher_dtype: str = "auto"         # auto (fp16 layout on CUDA as published, fp32 on CPU) | float32 | bfloat16
    shape_teacher: str | None = None    # TRELLIS.2 texture stage: the shape flow whose samples are concat_cond
    gradient_checkpointing: bool = False  # student: recompute each transformer block in backward (TRELLIS's
                                          # use_checkpoint); same gradients, activations of one block at a time


@dataclass
class ConditionConfig:
    """Frozen DINOv2 conditioner on the shards' condition images (zeros as the negative condition)."""

    model: str = "facebook/dinov2-with-registers-large"  # hub id or local dir (save_pretrained)
    image_size: int = 518
    tiny: bool = False                  # CPU presets: create a tiny random DINOv2 at `model` if it is missing
    tiny_hidden_size: int = 64
    tiny_kind: str = "dinov2"           # the tiny model's family: dinov2 (TRELLIS) | dinov3 (TRELLIS.2)
    dtype: str = "auto"                 # auto: bfloat16 on CUDA, float32 on CPU


@dataclass
class ObjectiveConfig:
    name: str = "mdt"                   # flow_matching | mdt | vm | cm | pcm | scm
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    mdt: MDTConfig = field(default_factory=lambda: MDTConfig(mode="discrete"))  # also used by `vm`
    cm: CMConfig = field(default_factory=CMConfig)
    pcm: PCMConfig = field(default_factory=PCMConfig)
    scm: SCMConfig = field(default_factory=SCMConfig)
    target: str = "student"             # cm/pcm/scm target network: student (stop-grad) | ema


@dataclass
class TeacherSamplerConfig:
    """TRELLIS.2's `FlowEulerGuidanceIntervalSampler` settings (defaults: its shape stage as released)."""

    steps: int = 12
    guidance_strength: float = 7.5      # TRELLIS.2 form: w·v(cond) + (1 − w)·v(neg_cond)
    guidance_rescale: float = 0.5
    guidance_interval: list[float] = field(default_factory=lambda: [0.6, 1.0])
    rescale_t: float = 3.0


@dataclass
class TeacherDataConfig:
    """Training latents generated by the teacher instead of read from the shards (TRELLIS.2's shape and texture
    stages, whose latents have no preprocessing path here): on each batch's voxel coordinates (the shards' SLat
    coords pooled to `resolution`³) and condition, x0 = the teacher's sample from fresh noise; for the texture stage the shape latent
    (concat_cond) is first sampled by `model.shape_teacher` on the same coordinates."""

    enabled: bool = False
    resolution: int = 32                # the shards' 64³ SLat voxels pooled to this grid (TRELLIS.2 512: 32³)
    sampler: TeacherSamplerConfig = field(default_factory=TeacherSamplerConfig)
    shape_sampler: TeacherSamplerConfig = field(default_factory=TeacherSamplerConfig)
    seed: int = 7                       # noise stream of the generated latents (per rank: seed·1000 + rank)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0               # linear warm-up of the learning rate


@dataclass
class ClipConfig:
    """TRELLIS's AdaptiveGradClipper: clip at max_norm until the buffer is full, then at
    min(percentile of the last `buffer` finite norms, max_norm). max_norm <= 0 disables clipping."""

    max_norm: float = 1.0
    percentile: float = 95.0
    buffer: int = 1000
    adaptive: bool = True


@dataclass
class EMAConfig:
    rate: float = 0.9999
    enabled: bool = True


@dataclass
class TrainConfig:
    max_steps: int = 1000
    log_every: int = 10                 # MLflow metrics interval (steps)
    # at each log (not under FSDP): the objective on this (re)start's first batch with fixed draws, without grad,
    # a low-noise progress curve; it costs one more objective evaluation (every teacher call) per log
    fixed_batch_loss: bool = True
    ckpt_every: int = 100               # checkpoint interval (steps); also at the end
    keep_checkpoints: int | None = 3
    seed: int = 0
    precision: str = "auto"             # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    fsdp: bool = False                  # shard the student (torch FSDP2) instead of DDP; for L-size models
    find_unused_parameters: bool = False
    nan_guard: bool = True              # skip steps with a non-finite loss or gradient (counted, alerted)
    max_consecutive_skips: int = 50     # abort the run after this many skipped steps in a row
    export: bool = True                 # export student (+ EMA) in TRELLIS format at the end
    wait_for_commit: bool = True        # block after each checkpoint until Ray Train has registered it
    commit_timeout_s: float = 600.0
    torch_threads: int | None = None    # per worker; None: the job's CPUs per worker (its scaling.cpus_per_worker)


@dataclass
class DistillConfig:
    name: str | None = None             # run name (Ray Train RunConfig.name; re-running it resumes); None: <stage>-<objective>
    output: str = "outputs/distill"     # storage path (local dir or s3://): checkpoints, exports, resolved config
    stage: str = "ss"                   # ss (dense SS latents) | slat (sparse SLat latents)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    teacher_data: TeacherDataConfig = field(default_factory=TeacherDataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def role(self) -> str:
        """What the trained network is: `teacher` (flow matching) or `student` (every distillation objective)."""
        return "teacher" if self.objective.name == "flow_matching" else "student"

    def validate(self) -> "DistillConfig":
        if not self.name:
            self.name = f"{self.stage}-{self.objective.name}"
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.objective.name not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective.name!r}")
        if self.objective.name != "flow_matching" and not self.model.teacher:
            raise ValueError(f"objective {self.objective.name!r} needs a teacher (model.teacher / --teacher)")
        if self.objective.target not in ("student", "ema"):
            raise ValueError("objective.target must be 'student' or 'ema'")
        if self.objective.name == "scm" and self.objective.scm.adaptive_weighting:
            # the learned weight network would need its own optimiser state and checkpoint slot in this trainer
            raise ValueError("objective.scm.adaptive_weighting is not supported by the trainer (the learned weight "
                             "network would need its own optimiser state and checkpoint slot)")
        if self.data.batch_split < 1 or self.data.batch_size < self.data.batch_split:
            raise ValueError("need 1 <= data.batch_split <= data.batch_size")
        if not self.data.uri:
            raise ValueError("data.uri (--data) is required")
        if self.train.precision not in ("auto", "fp32", "bf16"):
            raise ValueError("train.precision must be auto, fp32 or bf16")
        if self.condition.tiny_kind not in ("dinov2", "dinov3"):
            raise ValueError("condition.tiny_kind must be 'dinov2' or 'dinov3'")
        if self.teacher_data.enabled and (self.stage != "slat" or not self.model.teacher):
            raise ValueError("teacher_data.enabled generates sparse latents with the teacher: needs stage 'slat' "
                             "and model.teacher")
        if self.model.shape_teacher and not self.teacher_data.enabled:
            raise ValueError("model.shape_teacher (texture stage) needs teacher_data.enabled")
        try:
            self.model.export_stem = self.model.export_stem.format(stage=self.stage, role=self.role)
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"model.export_stem {self.model.export_stem!r}: the only fields are {{stage}} and "
                             "{role}") from None
        stem = self.model.export_stem
        if not stem or "/" in stem:
            raise ValueError(f"model.export_stem {stem!r}: a file name stem, not a path")
        says = "teacher" if "teacher" in stem else "student" if ("student" in stem or stem.endswith("_mdt")) else None
        if says and says != self.role:
            raise ValueError(f"model.export_stem {stem!r} names a {says}, but objective {self.objective.name!r} "
                             f"trains a {self.role}: give --set model.export_stem=<name> (e.g. "
                             f"{self.stage}_flow_{{role}})")
        return self


def load_trainer_config(preset: str | None, overrides=()) -> DistillConfig:
    """The trainer's settings of a distill_*.yaml preset (+ ``--set`` style overrides), not validated. The job's
    sections (`JOB_SECTIONS`) are left out unread; any other key that is not a trainer setting is an error."""
    return load_config(DistillConfig, preset, overrides, prefix="distill_", other_layers=JOB_SECTIONS)
