"""Presets of the reproduction benchmark (`ci`: a few minutes, `small`: <= 45 min on 2 CPU cores, `sweep`: the
Gaussian-mixture problem over guidance w in {0, 3, 7} and dimension D in {8, 512, 8 x 16^3}).

Every problem entry is a plain dict (it travels to the worker processes):
  name, kind ("gmm" | "shapes" | "shapes_sparse"), spec (problem), model (network size),
  teacher (methods.TeacherHP), distill (methods.DistillHP: the shared student budget and per-method knobs),
  eval_per_class, eval_batch, seeds (test seeds), timing_batch, primary (the collapse-sensitive metric of the gates,
  the ordering checks and the selection), ablations (extra distillation runs on seed 0: label, method, overrides),
  and the protocol's grid, val_seeds and selection (see below).

Primaries: gmm `pair_l2_ode` (RMS distance to the exact ODE endpoint of the same noise: a class-mean sampler
scores as badly as the teacher's single Euler step), shapes `cov_iou_data` (class-conditional coverage of held-out
shapes: one template per class covers 1 / n of them), shapes_sparse `mse_teacher` (per-voxel distance to the
teacher's 25-step sample from the same noise on the same coordinates).

Hyper-parameters (why they differ from MDT-dist's TRELLIS-scale defaults w_vm 40, w_vd 100, lr 4e-8):
* lr: 4e-8 moves a toy network by nothing in a few hundred steps; the students use AdamW 1e-4 (gmm 2e-4) through
  the distillation job's Trainer (adaptive clipping at 1, EMA, NaN guard), for every method alike.
* CFG: one strength per problem (gmm 0 in `ci`/`small`, shapes 2.0, sparse 1.0) is used for the teacher's sampling
  AND as the teacher guidance inside every distillation target (except `mdt_paper`, whose targets are unguided as
  the paper's and whose samples are guided at that strength).
* delta (finite-difference / teacher Euler step) 0.02 for CM/PCM/VM/MDT; PCM with 2 or 4 phases (grid); sCM with
  exact forward-mode JVP on gmm and finite differences (mdt.distill jvp="fd") on the transformers (cost); sCM
  without adaptive weighting (the Trainer has no slot for the weight network).
* t schedule: logit-normal(0, 1) for teacher and students.
* shapes_sparse: the SLat-like problem at a size whose teacher trains within its share of the budget -- the first
  8 classes at 16^3, a SLatFlowModel with TRELLIS's 2 io res blocks, 32 channels, 600 teacher updates of 8 shapes at
  lr 2e-3; students 30 updates of 4, 4 evaluation shapes per class.

Protocol (mdt.experiments.protocol): `grid` declares per method lr x the method's key knob, the same number of
configurations for every method (CM: EMA target rate; PCM: phase count; sCM: tangent warm-up steps; VM: d_norm;
mdt_release: lambda_VD; mdt_paper: discrete or continuous derivative -- its other settings are the paper's);
every configuration is distilled on the 3 `val_seeds` and scored by the primary metric averaged over 1 and 2 steps;
the best one per method is distilled again on the test `seeds`, which alone are reported, with common random
numbers (one data stream and one noise stream per seed, the same for every method).
"""
from __future__ import annotations

import copy

GMM = {
    "name": "gmm", "kind": "gmm",
    # D 8, 4 classes x 8 modes at radius 1.5 sqrt(D), mode std 0.1, w 0: straightness 1.02 (measured, 512 noises),
    # the class mean ~14 mode std from every mode
    "spec": {"dim": 8, "num_classes": 4, "modes": 8, "mode_std": 0.1, "cfg": 0.0, "hidden": 128, "depth": 3},
    "teacher": {"steps": 1500, "batch_size": 256, "lr": 2e-3, "warmup": 100, "ema": 0.995, "t_mean": 0.0},
    "distill": {"steps": 400, "batch_size": 256, "lr": 2e-4, "warmup": 20, "cfg": 0.0, "delta": 0.02,
                "pcm_phases": 2, "t_mean": 0.0, "jvp": "func", "d_norm": True},
    "eval_per_class": 200, "eval_batch": None, "seeds": [0, 1, 2], "timing_batch": 1000, "imageonly_k": 16,
    "primary": "pair_l2_ode",
    "ablations": [],
}

SHAPES = {
    "name": "shapes", "kind": "shapes",
    "spec": {"num_classes": 24},
    # noise_skip: with patch 4 each token's 512 latent values pass through 64 channels, and without the a(t) x_t
    # path (nets.ClassTokenFlow) 448 of them keep their initial noise through sampling: the 25-step teacher then
    # covered 0.14 of the held-out data (floor 0.59), with it 0.43 (FD 5.2 -> 0.36) at the same cost per update
    # (patch 2 would cost 8.7x, 128 channels 2x); 1900 teacher steps reach 0.47 but cost ~440 s of one core
    "model": {"model_channels": 64, "num_blocks": 2, "num_heads": 4, "patch_size": 4, "cond_channels": 32,
              "num_tokens": 4, "noise_skip": True},
    "teacher": {"steps": 1500, "batch_size": 32, "lr": 1e-3, "warmup": 100, "ema": 0.99, "t_mean": 0.0},
    "distill": {"steps": 200, "batch_size": 16, "lr": 1e-4, "warmup": 10, "cfg": 2.0, "delta": 0.02,
                "pcm_phases": 2, "t_mean": 0.0, "jvp": "fd", "d_norm": True},
    "eval_per_class": 16, "eval_batch": 128, "seeds": [0, 1, 2], "timing_batch": 16, "imageonly_k": 16,
    "primary": "cov_iou_data",
    "ablations": [],
}

SHAPES_SPARSE = {
    "name": "shapes_sparse", "kind": "shapes_sparse",
    "spec": {"num_classes": 8},
    "model": {"resolution": 16, "model_channels": 32, "num_blocks": 1, "num_heads": 4, "io_channels": 16,
              "num_io_res_blocks": 2, "cond_channels": 32, "num_tokens": 4},
    "teacher": {"steps": 600, "batch_size": 8, "lr": 2e-3, "warmup": 50, "ema": 0.99, "t_mean": 0.0},
    "distill": {"steps": 30, "batch_size": 4, "lr": 1e-3, "warmup": 3, "cfg": 1.0, "delta": 0.02,
                "pcm_phases": 2, "t_mean": 0.0, "jvp": "fd", "d_norm": True},
    "eval_per_class": 4, "eval_batch": None, "seeds": [0, 1, 2], "timing_batch": 4, "imageonly_k": 4,
    "primary": "mse_teacher",
    "ablations": [],
}


VAL_SEEDS = [10, 11, 12]      # validation seeds of every problem (test seeds: the problem's "seeds")


def with_protocol(pp: dict, lrs: list[float]) -> dict:
    """Declare the problem's grid: `lrs` x each method's key knob (2 values), the same size for every method."""
    steps = pp["distill"]["steps"]
    knobs = {"cm": {"target_ema": [0.0, 0.95]}, "pcm": {"pcm_phases": [2, 4]},
             "scm": {"scm_warmup": [0, max(1, steps // 4)]}, "vm": {"d_norm": [True, False]},
             "mdt_release": {"lambda_vd": [1.0, 0.1]}, "mdt_paper": {"vm_mode": ["discrete", "continuous"]}}
    pp["grid"] = {m: {"lr": list(lrs), **k} for m, k in knobs.items()}
    pp["val_seeds"] = list(VAL_SEEDS)
    pp["selection"] = {"metric": pp["primary"], "steps": ["1", "2"]}
    return pp


def _ci() -> dict:
    gmm, shp, spr = copy.deepcopy(GMM), copy.deepcopy(SHAPES), copy.deepcopy(SHAPES_SPARSE)
    gmm["teacher"].update(steps=300)
    gmm["distill"].update(steps=40)
    gmm["eval_per_class"] = 64
    gmm["timing_batch"] = 256
    shp["spec"]["num_classes"] = 6
    shp["teacher"].update(steps=60, batch_size=16)
    shp["distill"].update(steps=4, batch_size=8)
    shp["eval_per_class"] = 3
    shp["imageonly_k"] = 3
    shp["seeds"] = [0]
    shp["timing_batch"] = 2
    spr["spec"]["num_classes"] = 4
    spr["teacher"].update(steps=6, batch_size=2, warmup=2)
    spr["distill"].update(steps=2, batch_size=2, warmup=1)
    spr["eval_per_class"] = 1
    spr["imageonly_k"] = 1
    spr["seeds"] = [0]
    spr["timing_batch"] = 1
    problems = [with_protocol(pp, [pp["distill"]["lr"]]) for pp in (gmm, shp, spr)]    # 1 lr x 2 knob values
    for pp in problems[1:]:           # one validation seed for the transformer problems (cost); gmm has three
        pp["val_seeds"] = pp["val_seeds"][:1]
    return {"name": "ci", "problems": problems, "workers": 2, "timing_repeats": 2}


def _small() -> dict:
    # sized for <= 45 min on 2 idle cores: with gmm 400 / shapes 120 student updates, 16 evaluation shapes per class
    # and a 16-sample image-only pool per shapes class it took 59 min (12 of them under load; 5,930 CPU-s of jobs)
    gmm, shp, spr = copy.deepcopy(GMM), copy.deepcopy(SHAPES), copy.deepcopy(SHAPES_SPARSE)
    gmm["distill"].update(steps=300)
    shp["distill"].update(steps=80)
    shp["eval_per_class"] = 12
    shp["imageonly_k"] = 8
    problems = [with_protocol(pp, [pp["distill"]["lr"], pp["distill"]["lr"] / 5]) for pp in (gmm, shp, spr)]
    return {"name": "small", "problems": problems, "workers": 2, "timing_repeats": 5}


def _sweep() -> dict:
    """The Gaussian-mixture problem over guidance w in {0, 3, 7} and dimension D in {8, 512, 8 x 16^3} (d_norm's
    effect depends on D: the normalised derivative has norm < 1 whatever D)."""
    problems = []
    for dim in (8, 512, 8 * 16 ** 3):
        for w in (0.0, 3.0, 7.0):
            pp = copy.deepcopy(GMM)
            pp["name"] = f"gmm_d{dim}_w{w:g}"
            pp["spec"].update(dim=dim, cfg=w)
            pp["distill"].update(cfg=w)
            problems.append(with_protocol(pp, [pp["distill"]["lr"], pp["distill"]["lr"] / 5]))
    return {"name": "sweep", "problems": problems, "workers": 2, "timing_repeats": 2}


PRESETS = {"ci": _ci, "small": _small, "sweep": _sweep}


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r} (choose from {sorted(PRESETS)})")
    return PRESETS[name]()
