"""Random-weight tiny models for the CPU demo preset (``tiny_models: <dir>``): a tiny DINOv2 and tiny SS/SLat
encoders (`mdt.models.zoo.ensure_tiny_preprocess_models`) with the real architectures and code paths; the latents
they give are meaningless."""
from __future__ import annotations

from mdt.models.zoo import ensure_tiny_preprocess_models
from pipelines.preprocess.config import EncodeConfig, FeaturesConfig


def apply_tiny_models(cfg) -> None:
    """Point ``features.checkpoint`` and ``encode.*`` at the tiny models when ``cfg.tiny_models`` is set —
    only those still at their defaults (the released weights): explicitly given checkpoints win."""
    if not cfg.tiny_models:
        return
    f0, e0 = FeaturesConfig(), EncodeConfig()
    if (cfg.features.checkpoint == f0.checkpoint or cfg.encode.ss_encoder == e0.ss_encoder
            or cfg.encode.slat_encoder == e0.slat_encoder):
        p = ensure_tiny_preprocess_models(cfg.tiny_models)
        if cfg.features.checkpoint == f0.checkpoint:
            cfg.features.checkpoint = p["dino"]
        if cfg.encode.ss_encoder == e0.ss_encoder:
            cfg.encode.ss_encoder = p["ss"]
        if cfg.encode.slat_encoder == e0.slat_encoder:
            cfg.encode.slat_encoder = p["slat"]
