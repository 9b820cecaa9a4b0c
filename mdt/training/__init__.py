"""Training: the optimisation step of any objective (`Trainer`), how objectives call the networks (`wrappers`),
checkpoint state and the networks a run builds (`build`). Plain PyTorch: the Ray Train worker loop that feeds
`Trainer` shards and logs to MLflow is `pipelines.distill.worker`."""
from .config import (JOB_SECTIONS, OBJECTIVES, STAGES, ClipConfig, ConditionConfig, DataConfig, DistillConfig,
                     EMAConfig, ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig, load_trainer_config)
from .machinery import EMA, AdaptiveGradClipper, objective_fn, resolve_precision
from .step import StepResult, Trainer, split_batch

__all__ = [
    "JOB_SECTIONS", "OBJECTIVES", "STAGES", "ClipConfig", "ConditionConfig", "DataConfig", "DistillConfig",
    "EMAConfig", "ModelConfig", "ObjectiveConfig", "OptimConfig", "TrainConfig", "load_trainer_config", "EMA",
    "AdaptiveGradClipper", "objective_fn", "resolve_precision",
    "StepResult", "Trainer", "split_batch",
]
