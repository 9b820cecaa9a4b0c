"""Distillation objectives: plain functions `terms = objective(student, teacher, batch, cfg, generator=None)`.

* `flow_matching_loss` + `FlowMatchingConfig`: TRELLIS flow matching (teacher training / fine-tuning).
* `mdt_loss` (VM + VD), `vm_loss` (VM only), `vm_target` + `MDTConfig`: MDT-dist (reference section 5).
* `cm_loss` / `pcm_loss` / `scm_loss` + `CMConfig` / `PCMConfig` / `SCMConfig`: consistency baselines
  (`AdaptiveWeight`, `tangent_warmup_factor`: sCM's adaptive weighting and tangent warm-up).
* `student_sample`: 1/2/4-step sampling of a distilled student.

`batch` is a dict with `x0` (dense [B, ...] or mdt.sparse.SparseTensor), `cond` [B, ...], optional `neg_cond`
(default zeros) and optional fixed `t` [B] / `noise` / `noise_fake`. Returned dict: `loss` (scalar to backprop),
detached scalar terms and `loss_bins` ([10], mean per-instance loss per t-bin, NaN where empty).
"""
from .consistency import (AdaptiveWeight, CMConfig, PCMConfig, SCMConfig, cm_loss, consistency_times, pcm_loss,
                          scm_loss, tangent_warmup_factor)
from .flow_matching import FlowMatchingConfig, drop_condition, flow_matching_loss
from .mdt_dist import MDTConfig, VMOut, d_normalise, mdt_loss, mdt_time, phase_floor, vm_loss, vm_target
from .sampling import student_sample

__all__ = [
    "FlowMatchingConfig", "flow_matching_loss", "drop_condition",
    "MDTConfig", "VMOut", "mdt_loss", "vm_loss", "vm_target", "mdt_time", "phase_floor", "d_normalise",
    "CMConfig", "PCMConfig", "SCMConfig", "cm_loss", "pcm_loss", "scm_loss", "consistency_times",
    "AdaptiveWeight", "tangent_warmup_factor",
    "student_sample",
]
