"""The model zoo: random-weight models of the real architectures, in the formats the real checkpoints come in
(TRELLIS `<stem>.json` + `.safetensors`, Hugging Face `save_pretrained` directories). Tiny widths for tests, CI and
the CPU demo; the released sizes (`full_size`) for latency and memory benchmarks. Every "random model" of the
project is made here:

* `save_tiny_model(slot, path, cond_channels)`: TRELLIS's five generation slots (`SLOTS`) and TRELLIS.2's flows
  (`TRELLIS2_SLOTS`); `tiny_model_args` / `full_size_model_args` give their constructor arguments.
* `write_trellis_repo(dir)`, `write_trellis2_repo(dir)`: whole repositories (pipeline.json + ckpts/).
* `save_tiny_encoders(dir)`: the SS and SLat encoders of the preprocessing job.
* `save_tiny_dinov2(path)`, `save_tiny_dinov3(path)`: the conditioners / feature extractors (Hugging Face).
* `ensure_tiny_dino(path, kind, hidden_size)`, `ensure_tiny_preprocess_models(dir)`: the same, written
  once per path and safe against concurrent writers.

The weights are meaningless; the shapes and code paths are the real ones.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from mdt.conditioning import IMAGE_SIZE
from mdt.models.io import build_model, save_pretrained
from mdt.models.slat_vae import SLatEncoder
from mdt.models.ss_vae import SparseStructureEncoder

SLOTS = ("ss_flow", "ss_decoder", "slat_flow", "slat_decoder_gs", "slat_decoder_mesh")
# TRELLIS pipeline.json `models` keys for our slots.
PIPELINE_KEYS = {"ss_flow": "sparse_structure_flow_model", "ss_decoder": "sparse_structure_decoder",
                 "slat_flow": "slat_flow_model", "slat_decoder_gs": "slat_decoder_gs",
                 "slat_decoder_mesh": "slat_decoder_mesh"}

TRELLIS2_SLOTS = ("t2_ss_flow", "t2_shape_flow", "t2_tex_flow")
TRELLIS2_LATENT_CHANNELS = 32          # shape and texture latents (the texture flow takes 32 + 32 in)



# Tiny versions of the real architectures (same classes, small widths), for tests and the CPU demo.
def tiny_model_args(slot: str, cond_channels: int) -> tuple[str, dict]:
    """(class name, constructor args) of `slot`'s tiny model: TRELLIS's five generation slots, or a TRELLIS.2 flow
    (`TRELLIS2_SLOTS`)."""
    swin = dict(resolution=64, latent_channels=8, num_blocks=1, num_heads=4, mlp_ratio=2, attn_mode="swin",
                window_size=8, pe_mode="ape", use_fp16=False)
    table = {
        "ss_flow": ("SparseStructureFlowModel", dict(
            resolution=16, in_channels=8, out_channels=8, model_channels=64, cond_channels=cond_channels,
            num_blocks=1, num_heads=4, mlp_ratio=2, patch_size=2, pe_mode="ape", qk_rms_norm=True,
            use_fp16=False)),
        "ss_decoder": ("SparseStructureDecoder", dict(
            out_channels=1, latent_channels=8, num_res_blocks=1, num_res_blocks_middle=1, channels=[32, 16, 8],
            use_fp16=False)),
        "slat_flow": ("SLatFlowModel", dict(
            resolution=64, in_channels=8, out_channels=8, model_channels=64, cond_channels=cond_channels,
            num_blocks=1, num_heads=4, mlp_ratio=2, patch_size=2, num_io_res_blocks=1, io_block_channels=[32],
            pe_mode="ape", qk_rms_norm=True, use_fp16=False)),
        "slat_decoder_gs": ("SLatGaussianDecoder", dict(
            model_channels=64, **swin, representation_config={
                "lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1},
                "perturb_offset": True, "voxel_size": 1.5, "num_gaussians": 32, "2d_filter_kernel_size": 0.1,
                "3d_filter_kernel_size": 9e-4, "scaling_bias": 4e-3, "opacity_bias": 0.1,
                "scaling_activation": "softplus"})),
        # 256 channels: the subdivision blocks' GroupNorm(32) needs model_channels / 8 >= 32.
        "slat_decoder_mesh": ("SLatMeshDecoder", dict(model_channels=256, **swin,
                                                      representation_config={"use_color": True})),
    }
    if slot in TRELLIS2_SLOTS:
        return tiny_trellis2_args(slot, cond_channels)
    return table[slot]


def full_size_model_args(slot: str) -> tuple[str, dict]:
    """The released TRELLIS-image-large configuration of `slot` (the `ckpts/*.json` of the released repository)."""
    swin = dict(resolution=64, model_channels=768, latent_channels=8, num_blocks=12, num_heads=12, mlp_ratio=4,
                attn_mode="swin", window_size=8, use_fp16=True)
    flow = dict(in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024, num_blocks=24,
                num_heads=16, mlp_ratio=4, pe_mode="ape", qk_rms_norm=True, use_fp16=True)
    gs = tiny_model_args("slat_decoder_gs", 1024)[1]["representation_config"]
    table = {
        "ss_flow": ("SparseStructureFlowModel", dict(resolution=16, patch_size=1, **flow)),
        "ss_decoder": ("SparseStructureDecoder", dict(out_channels=1, latent_channels=8, num_res_blocks=2,
                                                      num_res_blocks_middle=2, channels=[512, 128, 32],
                                                      use_fp16=True)),
        "slat_flow": ("SLatFlowModel", dict(resolution=64, patch_size=2, num_io_res_blocks=2,
                                            io_block_channels=[128], **flow)),
        "slat_decoder_gs": ("SLatGaussianDecoder", dict(**swin, representation_config=gs)),
        "slat_decoder_mesh": ("SLatMeshDecoder", dict(**swin, representation_config={"use_color": True})),
    }
    return table[slot]


# Checkpoint stems of TRELLIS-image-large (pipeline.json `models` values are "ckpts/<stem>").
TRELLIS_STEMS = {"ss_flow": "ss_flow_img_dit_L_16l8_fp16", "ss_decoder": "ss_dec_conv3d_16l8_fp16",
                 "slat_flow": "slat_flow_img_dit_L_64l8p2_fp16",
                 "slat_decoder_gs": "slat_dec_gs_swin8_B_64l8gs32_fp16",
                 "slat_decoder_mesh": "slat_dec_mesh_swin8_B_64l8m256c_fp16"}
# SLat normalisation of TRELLIS-image-large (`slat_normalization` of its `pipeline.json`), for repositories written here.
TRELLIS_SLAT_MEAN = [-2.1687545776367188, -0.004347046371549368, -0.13352349400520325, -0.08418072760105133,
                     -0.5271206498146057, 0.7238689064979553, -1.1414450407028198, 1.2039363384246826]
TRELLIS_SLAT_STD = [2.377650737762451, 2.386378288269043, 2.124418020248413, 2.1748552322387695,
                    2.663944721221924, 2.371192216873169, 2.6217446327209473, 2.684523105621338]


def write_trellis_repo(directory: str | os.PathLike, full_size: bool = False, cond_channels: int = 64,
                       occupancy: float | None = None, seed: int = 0) -> Path:
    """A TRELLIS-image-large-shaped model repository with random weights: pipeline.json (sampler values and
    SLat normalisation as released) + ckpts/<stem>.json/.safetensors for the five generation models. Tiny widths
    by default (tests), or the released sizes (`full_size`, for latency benchmarks). Returns the directory."""
    directory = Path(directory)
    occupancy = occupancy if occupancy is not None else (0.08 if full_size else TINY_OCCUPANCY)
    for i, slot in enumerate(SLOTS):
        save_tiny_model(slot, directory / "ckpts" / TRELLIS_STEMS[slot], cond_channels=cond_channels,
                        seed=seed + i, occupancy=occupancy, full_size=full_size)
    sampler = {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5},
               "params": {"steps": 25, "cfg_strength": 5.0, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0}}
    pipeline = {"name": "TrellisImageTo3DPipeline", "args": {
        "models": {PIPELINE_KEYS[s]: f"ckpts/{TRELLIS_STEMS[s]}" for s in SLOTS},
        "sparse_structure_sampler": sampler, "slat_sampler": sampler,
        "slat_normalization": {"mean": TRELLIS_SLAT_MEAN, "std": TRELLIS_SLAT_STD},
        "image_cond_model": "dinov2_vitl14_reg"}}
    (directory / "pipeline.json").write_text(json.dumps(pipeline, indent=2))
    return directory


TINY_OCCUPANCY = 0.004   # fraction of the 64³ grid a tiny random SS decoder marks occupied (~1k voxels)


def save_tiny_model(slot: str, path: str | os.PathLike, cond_channels: int = 64, seed: int = 0,
                    occupancy: float = TINY_OCCUPANCY, full_size: bool = False, arch: dict | None = None) -> str:
    """A random-weight model of `slot`'s real architecture in TRELLIS format: tiny widths, or with `full_size` the
    released configuration (its `ckpts/*.json`, fp16 torso); `arch` overrides constructor arguments (e.g.
    narrower SS decoder channels for cheaper tests). Every parameter is redrawn (std 1/sqrt(fan_in), norm weights
    around 1, zero-initialised output layers included) so that no output is trivially zero; the SS decoder's
    output bias is set so that about `occupancy` of the grid is occupied for a standard-normal latent."""
    name, args = full_size_model_args(slot) if full_size else tiny_model_args(slot, cond_channels)
    args = {**args, **(arch or {})}
    torch.manual_seed(seed)
    model = build_model(name, args)
    model.float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1 or pname.endswith("gamma"):
                base = 1.0 if (("norm" in pname and pname.endswith("weight")) or pname.endswith("gamma")) else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.numel() // p.shape[0] if "conv" not in pname or p.ndim != 5 else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)
        if slot == "ss_decoder":
            z = torch.randn(2, 8, 16, 16, 16, generator=g)
            logits = model(z)
            q = torch.quantile(logits.flatten()[::7], 1 - occupancy)
            model.out_layer[-1].bias -= q
        if args.get("use_fp16"):
            model.convert_to_fp16()
    save_pretrained(model, path)
    return str(path)



def tiny_trellis2_args(slot: str, cond_channels: int) -> tuple[str, dict]:
    """TRELLIS.2's released flow args at CPU size: RoPE, shared adaLN + per-block modulation bias, qk RMS norm in
    self- and cross-attention, no patching, float32 torso; the real latent channels (8 SS, 32 shape/texture)."""
    torso = dict(model_channels=64, cond_channels=cond_channels, num_blocks=1, num_heads=4, mlp_ratio=2,
                 pe_mode="rope", share_mod=True, initialization="scaled", qk_rms_norm=True,
                 qk_rms_norm_cross=True, dtype="float32")
    c = TRELLIS2_LATENT_CHANNELS
    table = {"t2_ss_flow": ("SparseStructureFlowModel", dict(resolution=16, in_channels=8, out_channels=8, **torso)),
             "t2_shape_flow": ("SLatFlowModel", dict(resolution=32, in_channels=c, out_channels=c, **torso)),
             "t2_tex_flow": ("SLatFlowModel", dict(resolution=32, in_channels=2 * c, out_channels=c, **torso))}
    return table[slot]


def write_trellis2_repo(directory: str | os.PathLike, cond_channels: int = 64, seed: int = 0,
                        shape_normalization: dict | None = None, tex_normalization: dict | None = None) -> Path:
    """A TRELLIS.2-4B-shaped repository with tiny random weights: ckpts/<stem>.json/.safetensors of the 512
    pipeline's SS, shape and texture flows (the stems `jobs/configs/generate_trellis2.yaml` names) and a
    pipeline.json with the shape/texture latent normalisation (identity unless given). Returns the directory."""
    directory = Path(directory)
    stems = {"t2_ss_flow": "ss_flow_img_dit_1_3B_64_bf16", "t2_shape_flow": "slat_flow_img2shape_dit_1_3B_512_bf16",
             "t2_tex_flow": "slat_flow_imgshape2tex_dit_1_3B_512_bf16"}
    for i, (slot, stem) in enumerate(stems.items()):
        save_tiny_model(slot, directory / "ckpts" / stem, cond_channels=cond_channels, seed=seed + i)
    identity = {"mean": [0.0] * TRELLIS2_LATENT_CHANNELS, "std": [1.0] * TRELLIS2_LATENT_CHANNELS}
    pipeline = {"name": "Trellis2ImageTo3DPipeline", "args": {
        "models": {"sparse_structure_flow_model": f"ckpts/{stems['t2_ss_flow']}",
                   "shape_slat_flow_model_512": f"ckpts/{stems['t2_shape_flow']}",
                   "tex_slat_flow_model_512": f"ckpts/{stems['t2_tex_flow']}"},
        "shape_slat_normalization": shape_normalization or identity,
        "tex_slat_normalization": tex_normalization or identity}}
    (directory / "pipeline.json").write_text(json.dumps(pipeline, indent=2))
    return directory



def save_tiny_encoders(directory, feature_channels: int = 64, seed: int = 0) -> tuple[str, str]:
    """Random-weight tiny SS and SLat encoders in TRELLIS checkpoint format (tests and the CPU demo).

    Every parameter is redrawn (std 1/sqrt(fan_in), norms around 1) so that no output is trivially zero.
    Returns the two checkpoint paths `<directory>/ss_enc_tiny`, `<directory>/slat_enc_tiny` for
    `encode.ss_encoder` / `encode.slat_encoder`."""
    torch.manual_seed(seed)
    ss = SparseStructureEncoder(in_channels=1, latent_channels=8, num_res_blocks=1, num_res_blocks_middle=1,
                                channels=[8, 16, 32], use_fp16=False)
    slat = SLatEncoder(resolution=64, in_channels=feature_channels, model_channels=64, latent_channels=8,
                       num_blocks=2, num_heads=4, mlp_ratio=4, attn_mode="swin", window_size=8, use_fp16=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (ss, slat):
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                    p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    fan_in = int(np.prod(p.shape[1:]))
                    p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    directory = Path(directory)
    save_pretrained(ss, directory / "ss_enc_tiny")
    save_pretrained(slat, directory / "slat_enc_tiny")
    return str(directory / "ss_enc_tiny"), str(directory / "slat_enc_tiny")


def _save_random_hf(make, path: str | os.PathLike, seed: int) -> Path:
    """Build a Hugging Face model (`make()`, after seeding torch), redraw every weight from `seed` (norm weights
    around 1, other vectors around 0, matrices with std 1/sqrt(fan_in); the mask token untouched), and
    `save_pretrained` it at `path`."""
    torch.manual_seed(seed)
    model = make().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mask_token"):
                continue
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)
    path = Path(path)
    model.save_pretrained(path)
    return path


def save_tiny_dinov2(path: str | os.PathLike, hidden_size: int = 64, num_hidden_layers: int = 2,
                     num_attention_heads: int = 4, image_size: int = IMAGE_SIZE, patch_size: int = 14,
                     num_register_tokens: int = 4, seed: int = 0) -> Path:
    """Write a random-weight Dinov2WithRegisters model (same code path as the real checkpoint) with
    `save_pretrained`; every weight, including the layer-norm affines, is randomised so that prenorm and
    postnorm outputs differ. Returns the directory."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel  # heavy: transformers

    config = Dinov2WithRegistersConfig(
        hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        mlp_ratio=4, image_size=image_size, patch_size=patch_size, num_register_tokens=num_register_tokens,
        layerscale_value=1.0)
    return _save_random_hf(lambda: Dinov2WithRegistersModel(config), path, seed)


def save_tiny_dinov3(path: str | os.PathLike, hidden_size: int = 64, num_hidden_layers: int = 2,
                     num_attention_heads: int = 4, image_size: int = 64, patch_size: int = 16,
                     num_register_tokens: int = 4, seed: int = 0) -> Path:
    """Write a random-weight `DINOv3ViTModel` (TRELLIS.2's conditioner class) with `save_pretrained`, every
    weight randomised like `save_tiny_dinov2`'s. Returns the directory."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel  # heavy: transformers

    config = DINOv3ViTConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                             num_attention_heads=num_attention_heads, intermediate_size=2 * hidden_size,
                             image_size=image_size, patch_size=patch_size, num_register_tokens=num_register_tokens)
    return _save_random_hf(lambda: DINOv3ViTModel(config), path, seed)


def ensure_tiny_dino(path: str | os.PathLike, kind: str = "dinov2", hidden_size: int = 64) -> None:
    """A tiny random DINOv2 (or DINOv3, `kind`) at `path` unless one is there already; written under a temporary
    name and renamed, so concurrent writers (Ray Train workers) leave one complete model."""
    path = Path(path)
    if (path / "config.json").exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_tiny = save_tiny_dinov3 if kind == "dinov3" else save_tiny_dinov2
    save_tiny(tmp, hidden_size=hidden_size)
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_tiny_preprocess_models(directory: str | os.PathLike, feature_channels: int = 64) -> dict[str, str]:
    """The preprocessing job's tiny models under `directory`, created once (file lock) and reused: a DINOv2
    (`features.checkpoint`) and the SS / SLat encoders (`encode.ss_encoder`, `encode.slat_encoder`).
    Returns {"dino", "ss", "slat"} paths."""
    d = Path(directory).expanduser().resolve()
    d.mkdir(parents=True, exist_ok=True)
    paths = {"dino": str(d / "dinov2"), "ss": str(d / "ss_enc_tiny"), "slat": str(d / "slat_enc_tiny")}
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / "dinov2" / "config.json").exists():
            save_tiny_dinov2(d / "dinov2", hidden_size=feature_channels)
        if not (d / "slat_enc_tiny.safetensors").exists():
            save_tiny_encoders(d, feature_channels=feature_channels)
    return paths
