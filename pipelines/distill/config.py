"""Typed configuration of the distillation job (presets in jobs/configs/distill_*.yaml): the trainer's tree
(`mdt.training.config.DistillConfig`) plus the sections of the Ray job around it, `JOB_SECTIONS` in that order:
`scaling` (Ray Train workers), `ray` (the cluster), `mlflow` (tracking and the registered model), `snapshot`
(teacher vs student sample grids during training) and `eval` (the evaluation job after training).

    cfg = load_config(DistillJobConfig, preset, overrides, prefix="distill_").validate()
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mdt.training.config import DistillConfig


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    data_cpus: float = 1.0              # logical CPUs kept free for Ray Data's read tasks beside the workers
    placement_strategy: str = "PACK"    # PACK | SPREAD | STRICT_SPREAD
    backend: str = "auto"               # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    max_failures: int = 3               # worker failures recovered from the last checkpoint


@dataclass
class DistillRayConfig:
    address: str | None = None          # None: $RAY_ADDRESS (ray job submit) or a new local instance
    num_cpus: int | None = None         # local instance: at least the workers' CPUs + scaling.data_cpus
    autoscaling: bool = False           # the cluster grows on demand: no up-front check of its resources
    include_dashboard: bool = False     # local instance only


@dataclass
class DistillMlflowConfig:
    enabled: bool = True
    tracking_uri: str | None = None     # None: $MLFLOW_TRACKING_URI, else sqlite:///<output>/mlflow.db (local output)
    experiment: str = "mdt-distill"
    run_name: str | None = None         # default: the run name
    register_model: str | None = None   # registered-model name (None: <name>-teacher for flow_matching, else -student)
    register_weights: str = "ema"       # which exported weights are registered: ema (what evaluation uses) | student
    log_every: int | None = None        # None: train.log_every


@dataclass
class SnapshotConfig:
    """Teacher (many steps) vs student (1/2/4 steps) samples for fixed seeds and conditions -> PNG grid."""

    every: int = 0                      # steps; 0: only at the end
    num_conditions: int = 4             # first assets of the dataset
    seed: int = 3407
    teacher_steps: int = 25
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    cfg_strength: float = 3.0           # MDT snapshots: 3.0 (SS), 0.1 (SLat)
    decoder: str | None = None          # SS decoder checkpoint (TRELLIS) or occupancy probe; None: latent view
    image_size: int = 96                # pixels per cell


@dataclass
class EvalConfig:
    """Evaluation of the run's exported weights after training succeeds (`pipelines.evaluate`; SS stage only):
    the exported EMA student (`mlflow.register_weights`) against the run's teacher, or, for a flow-matching
    run, the trained model as the teacher. Its table lands on the run's MLflow run as one artifact (`eval/`)
    with a few headline metrics (`eval/FD_dinov2_student_1step`, ...)."""

    enabled: bool = False
    preset: str = "demo"                # jobs/configs/evaluate_<preset>.yaml: ci | demo | trellis
    decoder: str | None = None          # SS decoder checkpoint or occupancy probe (required when enabled)
    data: str | None = None             # shards evaluated on; None: data.uri
    split: str | None = None            # holdout | train | all; None: the preset's
    output: str | None = None           # results under <output>/eval; None: <output>/<name> (needs a local output)
    overrides: list[str] = field(default_factory=list)  # further evaluation settings, e.g. [sampling.seeds=2]


@dataclass
class DistillJobConfig(DistillConfig):
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    ray: DistillRayConfig = field(default_factory=DistillRayConfig)
    mlflow: DistillMlflowConfig = field(default_factory=DistillMlflowConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "DistillJobConfig":
        """The trainer's own checks, then those across the job's sections and the trainer's."""
        super().validate()
        if self.mlflow.register_weights not in ("ema", "student"):
            raise ValueError("mlflow.register_weights must be 'ema' or 'student'")
        if self.train.fsdp and self.scaling.num_workers < 2:
            raise ValueError("train.fsdp needs scaling.num_workers >= 2")
        if self.eval.enabled and self.stage != "ss":
            raise ValueError(f"eval.enabled: the evaluation covers the SS stage only (stage is {self.stage!r})")
        if self.eval.enabled and not self.eval.decoder:
            raise ValueError("eval.enabled needs eval.decoder (an SS decoder checkpoint or occupancy probe)")
        return self
