"""Training: the optimisation step of any objective (`Trainer`), checkpoints, MLflow tracking and the Ray Train
worker loop (`loop.train_loop_per_worker`). Everything except `loop` and `tracking` is plain PyTorch."""
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
