"""Training: the optimisation step of any objective (`Trainer`), how objectives call the networks (`wrappers`),
checkpoints, the workers' MLflow calls and the Ray Train worker loop (`loop.WorkerLoop`). Everything except `loop`
and `tracking` is plain PyTorch; the driver that runs the loop is `pipelines.distill`."""
from .config import (OBJECTIVES, STAGES, ClipConfig, ConditionConfig, DataConfig, DistillConfig, EMAConfig,
                     MlflowConfig, ModelConfig, ObjectiveConfig, OptimConfig, RayConfig, ScalingConfig,
                     SnapshotConfig, TrainConfig)
from .machinery import EMA, AdaptiveGradClipper, objective_fn, resolve_precision
from .step import StepResult, Trainer, split_batch

__all__ = [
    "OBJECTIVES", "STAGES", "ClipConfig", "ConditionConfig", "DataConfig", "DistillConfig", "EMAConfig",
    "MlflowConfig", "ModelConfig", "ObjectiveConfig", "OptimConfig", "RayConfig", "ScalingConfig",
    "SnapshotConfig", "TrainConfig", "EMA", "AdaptiveGradClipper", "objective_fn", "resolve_precision",
    "StepResult", "Trainer", "split_batch",
]
