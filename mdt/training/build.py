"""Building the networks of a run: frozen teacher, student (a copy of the teacher unless told otherwise),
frozen image conditioner. Plain PyTorch (used by the Ray Train loop, the demo and tests)."""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from mdt.conditioning import ImageConditioner
from mdt.models import build_model, from_pretrained, save_pretrained
from mdt.models.zoo import ensure_tiny_dino

log = logging.getLogger(__name__)


def _dtype(name: str) -> torch.dtype | None:
    return {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]


def build_teacher(mcfg, device: torch.device, path: str | None = None) -> nn.Module | None:
    """The frozen teacher (eval mode, no grad). On CUDA the published fp16 torso layout is kept ("auto").
    `path`: another frozen network with the same settings (TRELLIS.2's shape teacher of the texture stage)."""
    path = path or mcfg.teacher
    if not path:
        return None
    dt = _dtype(mcfg.teacher_dtype)
    keep_fp16 = None if dt is None else False
    teacher = from_pretrained(path, device=device, keep_fp16=keep_fp16)
    if dt is not None:
        teacher = teacher.to(dt)
    teacher.eval().requires_grad_(False)
    return teacher


def build_student(mcfg, device: torch.device, teacher: nn.Module | None = None) -> nn.Module:
    """Student in float32 (master weights; TRELLIS#162: AdamW on fp16 weights diverges).

    `model.student` checkpoint if given, else a copy of the teacher's checkpoint, else `model.name(**args)`
    initialised with `model.init_seed`."""
    if mcfg.student:
        student = from_pretrained(mcfg.student, device=device, keep_fp16=False)
    elif mcfg.teacher:
        student = from_pretrained(mcfg.teacher, device=device, keep_fp16=False)
    else:
        if not mcfg.args:
            raise ValueError("no teacher, no student checkpoint and no model.args: nothing to build")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mcfg.init_seed)
            student = build_model(mcfg.name, dict(mcfg.args), device="cpu")
        student = student.to(device)
    student.float()
    if hasattr(student, "convert_to_fp32"):
        student.convert_to_fp32()
    if getattr(mcfg, "gradient_checkpointing", False):
        if not hasattr(student, "use_checkpoint"):
            raise ValueError(f"model.gradient_checkpointing: {type(student).__name__} has no use_checkpoint")
        student.use_checkpoint = True
    student.requires_grad_(True)
    return student.train()


def ensure_tiny_conditioner(ccfg) -> None:
    """CPU presets (`condition.tiny`): a tiny random DINOv2 (or DINOv3, `tiny_kind`) at `condition.model` unless one
    is there (`mdt.models.zoo.ensure_tiny_dino`)."""
    if ccfg.tiny:
        ensure_tiny_dino(ccfg.model, getattr(ccfg, "tiny_kind", "dinov2"), ccfg.tiny_hidden_size)


def build_conditioner(ccfg, device: torch.device):
    ensure_tiny_conditioner(ccfg)
    dt = _dtype(ccfg.dtype)
    if dt is None:
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    return ImageConditioner(ccfg.model, image_size=ccfg.image_size, device=device, dtype=dt)


def export_model(like: tuple[str, dict], state: dict[str, torch.Tensor], path: str | os.PathLike):
    """Write `state` (a full float32 state dict of model class `like[0]` with args `like[1]`) as a TRELLIS
    checkpoint `<path>.json` + `<path>.safetensors` (published dtypes: fp16 torso when args say use_fp16)."""
    name, args = like
    model = build_model(name, dict(args), device="meta").to_empty(device="cpu")
    model.float()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return save_pretrained(model, path, args=dict(args))
