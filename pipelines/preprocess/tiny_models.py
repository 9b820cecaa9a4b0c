"""Random-weight tiny models for the CPU demo preset (``tiny_models: <dir>``): a tiny DINOv2 and tiny SS/SLat
encoders with the real architectures and code paths; the latents they give are meaningless."""
from __future__ import annotations


def ensure_tiny_models(directory: str, feature_channels: int = 64) -> dict[str, str]:
    """Random-weight tiny DINOv2 (``mdt.conditioning.save_tiny_dinov2``) and SS/SLat encoders
    (``pipelines.encode.save_tiny_encoders``) under ``directory``, created once (file lock) and reused.
    For the CPU demo and CI: the latents they give are meaningless but have the real shapes and code paths."""
    import fcntl
    from pathlib import Path

    d = Path(directory).expanduser().resolve()
    d.mkdir(parents=True, exist_ok=True)
    paths = {"dino": str(d / "dinov2"), "ss": str(d / "ss_enc_tiny"), "slat": str(d / "slat_enc_tiny")}
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / "dinov2" / "config.json").exists():
            from mdt.conditioning import save_tiny_dinov2

            save_tiny_dinov2(d / "dinov2", hidden_size=feature_channels)
        if not (d / "slat_enc_tiny.safetensors").exists():
            from pipelines.preprocess.encode import save_tiny_encoders

            save_tiny_encoders(d, feature_channels=feature_channels)
    return paths


def apply_tiny_models(cfg) -> None:
    """Point ``features.checkpoint`` and ``encode.*`` at the tiny models when ``cfg.tiny_models`` is set —
    only those still at their defaults (the released weights): explicitly given checkpoints win."""
    from pipelines.preprocess.config import EncodeConfig, FeaturesConfig

    if not cfg.tiny_models:
        return
    f0, e0 = FeaturesConfig(), EncodeConfig()
    if (cfg.features.checkpoint == f0.checkpoint or cfg.encode.ss_encoder == e0.ss_encoder
            or cfg.encode.slat_encoder == e0.slat_encoder):
        p = ensure_tiny_models(cfg.tiny_models)
        if cfg.features.checkpoint == f0.checkpoint:
            cfg.features.checkpoint = p["dino"]
        if cfg.encode.ss_encoder == e0.ss_encoder:
            cfg.encode.ss_encoder = p["ss"]
        if cfg.encode.slat_encoder == e0.slat_encoder:
            cfg.encode.slat_encoder = p["slat"]
