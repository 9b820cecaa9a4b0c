"""Presets of the reproduction benchmark (`ci`: a few minutes, `small`: <= 25 min on 2 CPU cores).

Every problem entry is a plain dict (it travels to the worker processes):
  name, kind ("mixture" | "shapes" | "shapes_sparse"), spec (problem), model (network size),
  teacher (methods.TeacherHP), distill (methods.DistillHP: the shared student budget and per-method knobs),
  eval_per_class, eval_batch, seeds, timing_batch, primary (metric used for the ordering checks),
  ablations (extra distillation runs on seed 0 for the notes: label, method, overrides).

Hyper-parameters (why they differ from MDT-dist's TRELLIS-scale defaults w_vm 40, w_vd 100, lr 4e-8):
* lr: 4e-8 moves a toy network by nothing in a few hundred steps; the students use AdamW 1e-4 (mixture 2e-4)
  with grad-norm clipping at 1, the teacher's optimiser family, for every method alike.
* CFG: one strength per problem (mixture 0.5, shapes 2.0, sparse 1.0) is used for the teacher's sampling AND as
  the teacher guidance inside every distillation target (w of CM/PCM/sCM, w_vm and w_vd of MDT), so that all
  students aim at the same distribution as the 25-step CFG teacher they are compared with. w = 40 / 100 would
  push a toy flow far off its data (see the notes of the CFG ablation).
* delta (finite-difference / teacher Euler step) 0.02 for CM/PCM/VM/MDT; PCM with 2 phases (students are
  sampled with the Euler rule, so 2 and 4 steps land on PCM's phase boundaries); sCM with exact forward-mode JVP
  on the mixture and finite differences (mdt.distill jvp="fd") on the transformers (cost, see notes).
* t schedule: logit-normal(0, 1) for teacher and students (TRELLIS image-large uses mean 1; on these problems the
  teacher's low-t detail matters and mean 0 trains it better in the budget).
"""
from __future__ import annotations

import copy

MIXTURE = {
    "name": "mixture", "kind": "mixture",
    "spec": {"dim": 8, "num_classes": 10, "components": 3, "hidden": 128, "depth": 3},
    "teacher": {"steps": 2000, "batch_size": 256, "lr": 2e-3, "warmup": 100, "ema": 0.995, "t_mean": 0.0},
    "distill": {"steps": 800, "batch_size": 256, "lr": 2e-4, "warmup": 20, "cfg": 0.5, "delta": 0.02,
                "pcm_phases": 2, "t_mean": 0.0, "jvp": "func", "d_norm": True},
    "eval_per_class": 300, "eval_batch": None, "seeds": [0, 1, 2], "timing_batch": 1000,
    "primary": "swd_teacher",
    "ablations": [],
}

SHAPES = {
    "name": "shapes", "kind": "shapes",
    "spec": {"num_classes": 24},
    "model": {"model_channels": 64, "num_blocks": 2, "num_heads": 4, "patch_size": 4, "cond_channels": 32,
              "num_tokens": 4},
    "teacher": {"steps": 1500, "batch_size": 32, "lr": 1e-3, "warmup": 100, "ema": 0.99, "t_mean": 0.0},
    "distill": {"steps": 200, "batch_size": 16, "lr": 1e-4, "warmup": 10, "cfg": 2.0, "delta": 0.02,
                "pcm_phases": 2, "t_mean": 0.0, "jvp": "fd", "d_norm": True},
    "eval_per_class": 16, "eval_batch": 128, "seeds": [0, 1, 2], "timing_batch": 16,
    "primary": "fd_teacher",
    "ablations": [],
}

SHAPES_SPARSE = {
    "name": "shapes_sparse", "kind": "shapes_sparse",
    "spec": {"num_classes": 24},
    "model": {"model_channels": 64, "num_blocks": 1, "num_heads": 4, "io_channels": 16, "cond_channels": 32,
              "num_tokens": 4},
    "teacher": {"steps": 60, "batch_size": 4, "lr": 1e-3, "warmup": 10, "ema": 0.9, "t_mean": 0.0},
    "distill": {"steps": 8, "batch_size": 4, "lr": 1e-4, "warmup": 2, "cfg": 1.0, "delta": 0.02,
                "pcm_phases": 2, "t_mean": 0.0, "jvp": "fd", "d_norm": True},
    "eval_per_class": 1, "eval_batch": None, "seeds": [0], "timing_batch": 4,
    "primary": "mse_teacher",
    "ablations": [],
}


def _ci() -> dict:
    mix, shp, spr = copy.deepcopy(MIXTURE), copy.deepcopy(SHAPES), copy.deepcopy(SHAPES_SPARSE)
    mix["teacher"].update(steps=600)
    mix["distill"].update(steps=60)
    mix["eval_per_class"] = 100
    mix["seeds"] = [0, 1]
    mix["timing_batch"] = 500
    shp["spec"]["num_classes"] = 6
    shp["teacher"].update(steps=60, batch_size=16)
    shp["distill"].update(steps=4, batch_size=8)
    shp["eval_per_class"] = 3
    shp["seeds"] = [0, 1]
    shp["timing_batch"] = 2
    spr["spec"]["num_classes"] = 4
    spr["teacher"].update(steps=6, batch_size=2)
    spr["distill"].update(steps=2, batch_size=2)
    spr["timing_batch"] = 1
    return {"name": "ci", "problems": [shp, mix, spr], "workers": 2, "timing_repeats": 2}


def _small() -> dict:
    return {"name": "small", "problems": [copy.deepcopy(SHAPES), copy.deepcopy(MIXTURE), copy.deepcopy(SHAPES_SPARSE)],
            "workers": 2, "timing_repeats": 5}


PRESETS = {"ci": _ci, "small": _small}


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r} (choose from {sorted(PRESETS)})")
    return PRESETS[name]()
