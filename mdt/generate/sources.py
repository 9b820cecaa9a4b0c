"""Where each model of a run comes from: the config, a TRELLIS `pipeline.json`, or a random-weight tiny model
(`mdt.models.zoo`) created by this run or an earlier one."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mdt.conditioning import DINOV2_HUB_ID
from mdt.generate.config import GenerateConfig
from mdt.models.zoo import PIPELINE_KEYS, SLOTS, save_tiny_dinov2, save_tiny_model

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
    from huggingface_hub import hf_hub_download  # heavy: huggingface_hub; honours HF_HUB_OFFLINE and the cache

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
