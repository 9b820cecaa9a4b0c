"""How an objective calls the two networks during training.

* `StudentCalls`: calls that build a graph go through the data-parallel wrapper (DDP, or the FSDP2-sharded
  module) under the step's autocast, so that gradients are synchronised. No-grad calls (the student's own
  targets: the finite difference dv/dt of VD, sCM's tangent, the forward-mode JVP of continuous MDT / sCM) go
  to the unwrapped module, in float32 with autocast off: DDP's forward copies buffers in place
  (`broadcast_buffers`), which `torch.func.jvp` refuses (the SS flow has a `pos_emb` buffer), and a difference
  of two bf16 outputs divided by a small step multiplies their rounding error by 1/step.
* `FrozenTeacher`: the teacher runs outside the student's autocast, in its checkpoint's dtype (the models
  cast inputs to their torso dtype themselves), on float32 inputs, returning float32: its published fp16
  weights are not recomputed in bf16, and CFG (x40..100) does not amplify a bf16 error.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP


def _fp32(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if hasattr(x, "feats") and hasattr(x, "replace"):  # SparseTensor
        return x.replace(x.feats.float()) if x.feats.is_floating_point() else x
    return x


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


class StudentCalls(nn.Module):
    """`model` (DDP / FSDP2 / the student itself) for grad-enabled calls; `module` (unwrapped, or the FSDP2
    module, whose hooks gather the shards) for no-grad calls, in float32."""

    def __init__(self, model: nn.Module, module: nn.Module):
        super().__init__()
        self.model = model
        self.__dict__["module"] = module  # not a registered child: `model` already holds its parameters

    def forward(self, x, t, cond, *args, **kwargs):
        if torch.is_grad_enabled():
            return self.model(x, t, cond, *args, **kwargs)
        with _no_autocast(_device_type(self.module)):
            return _fp32(self.module(_fp32(x), _fp32(t), _fp32(cond), *args, **kwargs))

    def no_sync(self):
        return self.model.no_sync()

    def set_requires_gradient_sync(self, sync: bool) -> None:
        fn = getattr(self.model, "set_requires_gradient_sync", None)
        if fn is not None:
            fn(sync)


class FrozenTeacher(nn.Module):
    """The frozen teacher, called outside any autocast on float32 inputs; float32 outputs."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, x, t, cond, *args, **kwargs):
        with _no_autocast(_device_type(self.teacher)):
            return _fp32(self.teacher(_fp32(x), _fp32(t), _fp32(cond), *args, **kwargs))


def _device_type(m: nn.Module) -> str:
    for p in m.parameters():
        return p.device.type
    return "cpu"


def wrap_student(student: nn.Module, cfg, world: int) -> nn.Module:
    """The data-parallel student: DDP (default) or FSDP2 (`train.fsdp`, in place); the student itself when
    world == 1. Objectives get `StudentCalls(wrap_student(...), student)`."""

    if world <= 1 or not dist.is_initialized():
        return student
    if cfg.train.fsdp:

        for name in ("input_blocks", "blocks", "out_blocks"):
            for blk in getattr(student, name, None) or []:
                fully_shard(blk)
        fully_shard(student)
        return student

    return DDP(student, device_ids=None, find_unused_parameters=cfg.train.find_unused_parameters)
