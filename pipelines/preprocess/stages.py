"""The stage registry: names usable in ``cfg.stages`` and what each stage adds to, removes from and needs
of a row. Graph building (pipelines.preprocess.driver) and reporting (pipelines.preprocess.report) both read it."""
from __future__ import annotations

import importlib

from pipelines.preprocess.config import PreprocessConfig, StageResources
from pipelines.preprocess.rows import SOURCE_KEYS

STAGES = {
    "download": "pipelines.preprocess.download:Download",
    "render": "pipelines.preprocess.render:Render",
    "voxelize": "pipelines.preprocess.voxelize:Voxelize",
    "features": "pipelines.preprocess.features:Features",
    "encode": "pipelines.preprocess.encode:Encode",
    "stand_in": "pipelines.preprocess.stand_in:StandInCompute",
    "synthesize": "pipelines.synthesize.driver:Synthesize",
}


def resolve_stage(name: str):
    """Stage name (``STAGES``) or ``module:Class`` -> the class."""
    path = STAGES.get(name, name)
    if ":" not in path:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(STAGES)} (or module:Class)")
    mod, cls = path.split(":", 1)
    return getattr(importlib.import_module(mod), cls)


def stage_keys(stage_names: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(stage name, keys of its output rows) for each stage, in order."""
    keys = list(SOURCE_KEYS)
    out = []
    for name in stage_names:
        cls = resolve_stage(name)
        for k in getattr(cls, "outputs", ()):
            if k not in keys:
                keys.append(k)
        drops = set(getattr(cls, "drops", ()))
        keys = [k for k in keys if k not in drops or k in SOURCE_KEYS]
        out.append((name, tuple(keys)))
    return out


def stage_resources(cfg: PreprocessConfig, name: str) -> StageResources:
    """Config entry ``resources.<name>``, else the stage class's ``resources`` defaults."""
    if name in cfg.resources:
        return cfg.resources[name]
    if name == "write":
        return StageResources(num_cpus=0.5)
    defaults = dict(getattr(resolve_stage(name), "resources", {}) or {})
    return StageResources(**{k: v for k, v in defaults.items() if k in StageResources.__dataclass_fields__})
