"""Evaluation of teacher and student samplers: a Ray Data batch-inference graph over a split of preprocessing shards.

    result = run(cfg)          # cfg: EvaluateConfig (jobs/configs/evaluate_*.yaml)

Graph: shards (`pipelines.preprocess.shards.read_shards`) -> split filter (a fixed hash of sha256: `holdout` / `train` /
`all`) -> `SamplerActor` pool (`compute.num_actors` actors, `compute.num_gpus` each: GPU actors on a cluster, CPU
here) -> one row per (asset, seed, sampler) with its measurements, plus one per asset for the ground truth.
Each actor loads the conditioner, the SS models, the SS decoder and the two feature networks once and, per
batch of assets, samples every configured sampler from the same noise and condition (noise seeded per asset
and seed, so results do not depend on batching or actor count), decodes the occupancy and measures:

* geometry against the conditioning asset's voxels at the decoder's resolution: voxel IoU, Chamfer distance
  and F-score of boundary-voxel centres (threshold `metrics.fscore_voxels` voxels), no learned weights;
* agreement with the reference sampler (the 25-step teacher) from the same noise: latent MSE and IoU;
* appearance features: `metrics.views` renders of the decoded occupancy (and of the ground truth, drawn by the
  same renderer) through Inception-v3 and DINOv2 (`mdt.eval.features`; the result names the networks used).

With the SLat models configured (`models.slat_decoder` + the SLat flows) every sampler runs the whole chain: its
decoded occupancy's voxels -> SLat sample (`SamplerSpec.slat_model` in `slat_steps`, SLat noise seeded per asset
and seed) -> de-normalised with the SLat statistics (`models.slat_normalization`, default the shards' manifest
statistics the distillation job trains with) -> Gaussian decoder -> 3-D Gaussians (`mdt.generate`'s SLat noise and
decoding helpers, `mdt.flow` / `mdt.distill` samplers), and the assets are measured (`mdt.eval.assets`):
`metrics.views` point-splat renders of the Gaussians (the preview renderer: centres in DC colour) -> asset
features, and Chamfer distance / F-score of at most `metrics.max_points` visible Gaussian centres. The ground-truth
asset is the shard row's SLat latent (`slat_coords`, `slat_feats`, stored as encoded, i.e. already in the
decoder's space) decoded by the same Gaussian decoder and drawn by the same renderer. The paper renders the
ground-truth meshes instead; here both sides share decoder and renderer, so the asset metrics measure the flows'
samples against the decoder's view of the true latents and leave the decoder's reconstruction error out
(results.json `notes` says so).

The driver pools the rows: per sampler the Fréchet distances between generated and ground-truth render features
(FD_incep, FD_dinov2; with the full chain also FD_incep_asset, FD_dinov2_asset), means of the per-sample metrics,
NFE (both stages for the full chain), and warm per-stage latency (median of `latency.repeats` after
`latency.warmup` calls, measured in one task with the actors' resources; stages condition, ss_sample, ss_decode
and, for the full chain, slat_sample, slat_decode). Outputs in
`<output>/<name>/`: results.json, table.md, metrics.png, previews/<sampler>.html (interactive 3-D view: ground
truth, reference and sampler side by side) and .png, and the same in one MLflow run
(tag `mdt.distill_run_id` links it to the distillation run).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mdt.eval.chain import SamplingChain
from mdt.training.config import ConditionConfig
from pipelines.common.config import RayConfig
from mdt.config import load_config
from mdt.eval.features import load_feature_net
from mdt.sparse import SparseTensor
from mdt.eval.assets import asset_cloud, asset_points, render_asset_views
from mdt.eval.shapes import chamfer_fscore, paired_iou, surface_points
from mdt.eval.snapshots import occupancy_grid
from mdt.eval.latency import warm_latency
from mdt.models.base import PRECISIONS
from mdt.eval import report
from mdt.eval.snapshots import image_grid, render_voxels
from mdt.export.html import write_orbit_viewer
from mdt.export.preview import PointCloud, render_points
from mdt.flow import count_nfe
from mdt.config import to_dict
from mdt.generate import checkpoint_exists, looks_like_hub_path
from pipelines.common.cluster import durable_output
from pipelines.common.cluster import created_model_path, resolve_local_path as fix

log = logging.getLogger(__name__)

SPLITS = ("holdout", "train", "all")
GROUND_TRUTH = "ground truth"
STAGES = ("condition", "ss_sample", "ss_decode", "slat_sample", "slat_decode")
GROUND_TRUTH_NOTE = (
    "ground-truth assets are the shards' encoded SLat latents decoded by the same Gaussian decoder and drawn by the "
    "same renderer as the samples (the paper renders the ground-truth meshes): the asset FDs and Chamfer "
    "distances measure the flows, not the decoder's reconstruction error")


# ------------------------------------------------------------------------------------------------ config


@dataclass
class SamplerSpec:
    """One way of sampling: the SS stage with the teacher (Euler, `steps`) or the distilled student (`steps`),
    and, when the SLat models are configured (`models.slat_decoder`), the SLat stage with `slat_model` in
    `slat_steps`. SLat defaults: the same kind of model as the SS stage with the same number of steps, i.e.
    "teacher 25-step" is TRELLIS's 25 + 25 and "student 1-step" the paper's 1 + 1 (its latency rows pair equal
    step counts); set them to evaluate a mix (e.g. a student SS stage before the teacher's SLat stage)."""

    model: str = "teacher"              # teacher | student
    steps: int = 25
    name: str = ""                      # default: "<model> <steps>-step" (+ the SLat part when it differs)
    slat_model: str | None = None       # teacher | student; None: `model`
    slat_steps: int | None = None       # None: `steps`
    student_rule: str = "euler"         # students: euler (x <- x - dt S, the MDT-dist release's) | consistency (x0_hat
                                        # re-noised with fresh noise at each step; mdt.distill.student_sample)

    @property
    def slat_kind(self) -> str:
        return self.slat_model or self.model

    @property
    def slat_step_count(self) -> int:
        return self.slat_steps or self.steps

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        ss = f"{self.model} {self.steps}-step" + (" re-noised" if self.student_rule == "consistency" else "")
        if (self.slat_kind, self.slat_step_count) == (self.model, self.steps):
            return ss
        return f"{ss} + SLat {self.slat_kind} {self.slat_step_count}-step"


def default_samplers() -> list[SamplerSpec]:
    return [SamplerSpec("teacher", s) for s in (25, 4, 2, 1)] + [SamplerSpec("student", s) for s in (1, 2, 4)]


@dataclass
class EvalDataConfig:
    uri: str = ""                       # preprocessing output (local dir or s3://)
    split: str = "holdout"              # holdout | train | all (a fixed hash of sha256 decides)
    holdout_fraction: float = 0.1
    split_seed: int = 0
    max_assets: int | None = None       # first N assets of the split (by sha256), None: all
    cond_view: int = 0                  # which condition view conditions the sample


@dataclass
class EvalModelsConfig:
    """Checkpoints `<dir>/<stem>` or hub paths `<owner>/<repo>/<path/to/stem>` (mdt.models.from_pretrained, the
    loader of the generation chain). With `slat_decoder` set every sampler runs the whole chain (SS -> occupancy
    -> SLat -> Gaussians) and the assets are measured too; without it only the SS stage is evaluated."""

    teacher: str | None = None          # SS flow checkpoint
    student: str | None = None          # distilled SS student checkpoint
    ss_decoder: str = ""                # TRELLIS SS decoder or OccupancyProbe (mdt.eval.snapshots.load_decoder)
    slat_teacher: str | None = None     # SLat flow teacher (TRELLIS slat_flow_img_dit_L_64l8p2_fp16)
    slat_student: str | None = None     # distilled SLat student
    slat_decoder: str | None = None     # SLat Gaussian decoder (TRELLIS slat_dec_gs_swin8_B_64l8gs32_fp16)
    # SLat statistics {mean, std} the flows' latents are normalised with; None: the shards' manifest statistics
    # (`slat_normalization`, what the distillation job trains with, TRELLIS's rule of reference 3.6)
    slat_normalization: dict[str, list[float]] | None = None

    @property
    def full_chain(self) -> bool:
        return bool(self.slat_decoder)


@dataclass
class EvalSamplingConfig:
    seeds: int = 1                      # samples per asset (each sampler uses the same noises)
    seed: int = 0
    teacher_cfg: float = 0.0            # classifier-free guidance (TRELLIS convention), teacher
    teacher_cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    teacher_rescale_t: float = 1.0
    teacher_guidance_rescale: float = 0.0   # TRELLIS.2 teachers: guidance rescale (TRELLIS has none)
    student_cfg: float = 0.0
    slat_teacher_cfg: float | None = None   # SLat stage (interval and rescale_t shared); None: as the SS stage
    slat_student_cfg: float | None = None
    reference: str = "teacher 25-step"  # sampler whose samples are the `*_ref` reference

    def cfg_strength(self, kind: str, stage: str) -> float:
        slat = self.slat_teacher_cfg if kind == "teacher" else self.slat_student_cfg
        if stage == "slat" and slat is not None:
            return slat
        return self.teacher_cfg if kind == "teacher" else self.student_cfg


@dataclass
class EvalMetricsConfig:
    inception: str | None = None        # FID Inception TorchScript file; None: the torch hub cache
    dinov2: str | None = None           # DINOv2 dir or hub id in the local cache; None: facebook/dinov2-large
    views: int = 4                      # renders per shape for the appearance features
    render_size: int = 128
    fscore_voxels: float = 1.0          # F-score threshold, in voxels of the decoded grid
    max_points: int = 4096              # surface points (Gaussian centres) per shape (asset) for Chamfer / F-score


@dataclass
class EvalLatencyConfig:
    enabled: bool = True                # false: no latency task (no latency / speed-up columns)
    repeats: int = 5
    warmup: int = 2


@dataclass
class EvalComputeConfig:
    num_actors: int = 1
    num_gpus: float = 0.0               # per actor (and for the latency task)
    num_cpus: float = 1.0
    batch_size: int = 4                 # assets per actor call
    max_voxels_per_chunk: int = 100_000  # SLat voxels decoded to Gaussians together (whole samples, >= 1)
    torch_threads: int | None = None    # None: num_cpus rounded up
    precision: str = "auto"             # flows and SLat decoder: auto (fp16 torso on CUDA, fp32 on CPU) | fp32 | fp16 | bf16


@dataclass
class EvalMlflowConfig:
    enabled: bool = True
    tracking_uri: str | None = None     # None: $MLFLOW_TRACKING_URI, else sqlite:///<output>/mlflow.db
    experiment: str = "mdt-eval"
    run_name: str | None = None         # default: the evaluation's name
    distill_run_id: str | None = None   # the distillation run evaluated (tag + param on the evaluation run)


@dataclass
class EvaluateConfig:
    name: str = "evaluate"
    output: str = "outputs/eval"
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    models: EvalModelsConfig = field(default_factory=EvalModelsConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    samplers: list[SamplerSpec] = field(default_factory=default_samplers)
    sampling: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    metrics: EvalMetricsConfig = field(default_factory=EvalMetricsConfig)
    latency: EvalLatencyConfig = field(default_factory=EvalLatencyConfig)
    compute: EvalComputeConfig = field(default_factory=EvalComputeConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: EvalMlflowConfig = field(default_factory=EvalMlflowConfig)
    previews: int = 4                   # assets shown per sampler in the preview images

    def validate(self) -> "EvaluateConfig":
        """Raises ValueError with one line on the first inconsistency (nothing is started before this)."""
        if not self.data.uri:
            raise ValueError("data.uri (--data) is required")
        if self.data.split not in SPLITS:
            raise ValueError(f"data.split must be one of {SPLITS}, got {self.data.split!r}")
        if not 0 < self.data.holdout_fraction < 1:
            raise ValueError("data.holdout_fraction must be in (0, 1)")
        if not self.samplers:
            raise ValueError("samplers: at least one sampler is needed")
        labels = [s.label for s in self.samplers]
        if len(set(labels)) != len(labels):
            raise ValueError(f"samplers: duplicate names {labels}")
        for s in self.samplers:
            if s.model not in ("teacher", "student"):
                raise ValueError(f"sampler {s.label!r}: model must be teacher or student")
            if s.steps < 1:
                raise ValueError(f"sampler {s.label!r}: steps must be >= 1")
            if s.student_rule not in ("euler", "consistency"):
                raise ValueError(f"sampler {s.label!r}: student_rule must be euler or consistency")
            if s.student_rule != "euler" and "teacher" in (s.model, s.slat_kind):
                raise ValueError(f"sampler {s.label!r}: student_rule applies to students only (teachers sample "
                                 "with TRELLIS's Euler sampler)")
            if not getattr(self.models, s.model):
                raise ValueError(f"sampler {s.label!r} needs models.{s.model} (--{s.model})")
            if s.slat_kind not in ("teacher", "student") or s.slat_step_count < 1:
                raise ValueError(f"sampler {s.label!r}: slat_model must be teacher or student, slat_steps >= 1")
            if self.models.full_chain and not getattr(self.models, f"slat_{s.slat_kind}"):
                raise ValueError(f"sampler {s.label!r} needs models.slat_{s.slat_kind} (--slat-{s.slat_kind}): "
                                 "models.slat_decoder is set, so every sampler runs the SLat stage")
        if not self.models.full_chain and (self.models.slat_teacher or self.models.slat_student):
            raise ValueError("models.slat_teacher / slat_student need models.slat_decoder (--slat-decoder)")
        norm = self.models.slat_normalization
        if norm is not None and set(norm) != {"mean", "std"}:
            raise ValueError("models.slat_normalization must have exactly the keys mean and std")
        if not self.models.ss_decoder:
            raise ValueError("models.ss_decoder (--decoder) is required: the metrics are on decoded occupancy")
        if self.sampling.reference not in labels:
            raise ValueError(f"sampling.reference {self.sampling.reference!r} is not one of the samplers {labels}")
        if self.compute.precision not in PRECISIONS:
            raise ValueError(f"compute.precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{self.compute.precision!r}")
        if self.sampling.seeds < 1 or self.latency.repeats < 1 or self.metrics.views < 1:
            raise ValueError("sampling.seeds, latency.repeats and metrics.views must be >= 1")
        return self


def make_config(preset: str = "demo", *, data: str | None = None, teacher: str | None = None,
                student: str | None = None, decoder: str | None = None, output: str | None = None,
                distill_run_id: str | None = None, slat_teacher: str | None = None,
                slat_student: str | None = None, slat_decoder: str | None = None, overrides=()) -> EvaluateConfig:
    """`jobs/configs/evaluate_<preset>.yaml` with the given paths (those left None keep the preset's) and
    further overrides ("a.b=c" strings or (key, value) pairs) — e.g. for a training job that evaluates its
    student at the end: `run(make_config("trellis", data=..., student=export, distill_run_id=run_id))`."""

    given = {"data.uri": data, "models.teacher": teacher, "models.student": student, "models.ss_decoder": decoder,
             "output": output, "mlflow.distill_run_id": distill_run_id, "models.slat_teacher": slat_teacher,
             "models.slat_student": slat_student, "models.slat_decoder": slat_decoder}
    ov = [(k, v) for k, v in given.items() if v is not None] + list(overrides)
    return load_config(EvaluateConfig, preset, ov, prefix="evaluate_")


# ------------------------------------------------------------------------------------------------ split


def split_of(sha256: str, fraction: float, seed: int = 0) -> str:
    """'holdout' for a fixed pseudo-random `fraction` of assets (by a hash of seed and sha256), else 'train'."""
    h = int(hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()[:12], 16) / float(16 ** 12)
    return "holdout" if h < fraction else "train"


def in_split(sha256: str, data: EvalDataConfig) -> bool:
    return data.split == "all" or split_of(sha256, data.holdout_fraction, data.split_seed) == data.split


def _noise_seed(seed: int, sha256: str, k: int) -> int:
    return int(hashlib.sha256(f"{seed}:{sha256}:{k}".encode()).hexdigest()[:15], 16)


# ------------------------------------------------------------------------------------------------ models


def _device(cfg: EvaluateConfig) -> torch.device:
    return torch.device("cuda" if cfg.compute.num_gpus > 0 and torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------ actor


def render_views(occ: torch.Tensor, views: int, size: int) -> np.ndarray:
    """`views` renders around the shape (azimuths evenly spaced, 30° above): uint8 [views, size, size, 3]."""

    return np.stack([render_voxels(occ, size=size, azimuth=45.0 + 360.0 * k / views, elevation=-60.0)
                     for k in range(views)])


def _f32(a) -> bytes:
    return np.asarray(a, np.float32).tobytes()


class SamplerActor:
    """Ray Data callable class: a batch of shard rows -> measurement rows (see the module docstring)."""

    def __init__(self, cfg: EvaluateConfig):
        threads = cfg.compute.torch_threads or max(1, math.ceil(cfg.compute.num_cpus))
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.models = SamplingChain(cfg, _device(cfg))
        self.feature_nets = {"incep": load_feature_net("inception", cfg.metrics.inception),
                             "dinov2": load_feature_net("dinov2", cfg.metrics.dinov2)}

    def _features(self, renders: list[np.ndarray], suffix: str = "") -> dict[str, list[bytes]]:
        """Per shape, the features of its `views` renders [V, S, S, 3] (one feature-net pass over the batch)."""
        v = self.cfg.metrics.views
        imgs = np.concatenate(renders)
        out = {}
        for k, net in self.feature_nets.items():
            f = net(imgs)
            out[f"feat_{k}{suffix}"] = [_f32(f[i * v:(i + 1) * v]) for i in range(len(renders))]
        return out

    def _ground_truth_assets(self, rows: list[dict]) -> list:
        """The shard rows' SLat latents (as encoded, i.e. in the decoder's space) -> their Gaussians."""
        from pipelines.preprocess.shards import decode_slat  # heavy: pyarrow

        coords, feats = [], []
        for i, r in enumerate(rows):
            c, f = decode_slat(r)
            coords.append(np.concatenate([np.full((len(c), 1), i, np.int32), c.astype(np.int32)], 1))
            feats.append(f)
        dev = self.models.device
        slat = SparseTensor(torch.from_numpy(np.concatenate(feats).copy()).to(dev),
                            torch.from_numpy(np.concatenate(coords)).to(dev), batch_size=len(rows))
        return self.models.decode_gaussians(slat)

    def _asset_measures(self, rows: list[dict], cond_k: torch.Tensor, samples: dict, out: dict) -> None:
        """The full chain: per sampler the SLat stage on its decoded occupancy and the Gaussian decoder; Chamfer /
        F-score of Gaussian centres against the ground-truth asset and the renders' features, per output row
        (ground truth rows first, then the samplers', in the order `__call__` emitted them)."""

        cfg, m = self.cfg, self.cfg.metrics
        n, k = len(rows), cfg.sampling.seeds
        gt = self._ground_truth_assets(rows)
        gt_points = [asset_points(g, m.max_points) for g in gt]
        tau = m.fscore_voxels * 2.0 / next(iter(self.models.slat_nets.values())).resolution
        seeds = [_noise_seed(cfg.sampling.seed, f"{r['sha256']}:slat", j) for j in range(k) for r in rows]
        assets, cd, fs = list(gt), [float("nan")] * n, [float("nan")] * n
        for spec in cfg.samplers:
            gen = self.models.assets(spec, samples[spec.label][1], cond_k, seeds)
            for i, g in enumerate(gen):
                c, f = chamfer_fscore(asset_points(g, m.max_points), gt_points[i % n], tau)
                cd.append(c)
                fs.append(f)
            assets += gen
        out["chamfer_asset"], out["fscore_asset"] = cd, fs
        out["asset_cloud"] = [_f32(asset_cloud(g, m.max_points)) for g in assets]
        out.update(self._features([render_asset_views(g, m.views, m.render_size) for g in assets], "_asset"))

    def __call__(self, batch) -> dict[str, list]:
        from pipelines.preprocess.shards import _as_rows, collate_cond  # heavy: pyarrow

        cfg = self.cfg
        rows = _as_rows(batch)
        cond = self.models.condition(collate_cond(rows, view=cfg.data.cond_view,
                                                  image_size=cfg.condition.image_size))
        shape = self.models.latent_shape()
        n, k = len(rows), cfg.sampling.seeds
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
            _noise_seed(cfg.sampling.seed, r["sha256"], j))) for j in range(k) for r in rows])   # seed-major
        cond_k = cond.repeat(k, *([1] * (cond.dim() - 1)))
        out: dict[str, list] = {c: [] for c in ("sha256", "seed", "sampler", "iou", "chamfer", "fscore", "mse_ref",
                                                "iou_ref", "occupancy")}

        def emit(sha, seed, sampler, occ, **m):
            out["sha256"].append(sha)
            out["seed"].append(seed)
            out["sampler"].append(sampler)
            for c in ("iou", "chamfer", "fscore", "mse_ref", "iou_ref"):
                out[c].append(float(m.get(c, float("nan"))))
            out["occupancy"].append(np.packbits(occ.numpy().astype(bool)).tobytes())
            shapes.append(occ)

        shapes: list[torch.Tensor] = []

        samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        renoise = [torch.Generator().manual_seed(_noise_seed(cfg.sampling.seed, f"{r['sha256']}:renoise", j))
                   for j in range(k) for r in rows]          # students' re-noising, per sample as the noise
        for spec in cfg.samplers:
            x = self.models.sample(spec, noise.to(self.models.device), cond_k, generators=renoise).float().cpu()
            samples[spec.label] = (x, self.models.decode(x))
        ref_x, ref_occ = samples[cfg.sampling.reference]
        res = ref_occ.shape[-1]
        gt = torch.stack([occupancy_grid(np.frombuffer(r["slat_coords"], np.uint8).reshape(-1, 3), res)
                          for r in rows])
        gt_points = surface_points(gt, cfg.metrics.max_points)
        for r, g in zip(rows, gt):
            emit(r["sha256"], -1, GROUND_TRUTH, g)
        tau = cfg.metrics.fscore_voxels * 2.0 / res            # surface points live in [-1, 1]^3
        gt_k = gt.repeat(k, 1, 1, 1)
        for spec in cfg.samplers:
            x, occ = samples[spec.label]
            iou = paired_iou(occ, gt_k)
            iou_ref = paired_iou(occ, ref_occ)
            mse_ref = (x - ref_x).pow(2).flatten(1).mean(1)
            pts = surface_points(occ, cfg.metrics.max_points)
            for i in range(n * k):
                cd, fs = chamfer_fscore(pts[i], gt_points[i % n], tau)
                emit(rows[i % n]["sha256"], i // n, spec.label, occ[i], iou=iou[i], chamfer=cd, fscore=fs,
                     mse_ref=mse_ref[i], iou_ref=iou_ref[i])
        out.update(self._features([render_views(o, cfg.metrics.views, cfg.metrics.render_size) for o in shapes]))
        if self.models.slat_nets:
            self._asset_measures(rows, cond_k, samples, out)
        return out


# ------------------------------------------------------------------------------------------------ latency


def measure_latency(cfg: EvaluateConfig, cond_image: np.ndarray) -> dict[str, dict]:
    """Warm per-stage latency of every sampler for one asset (batch 1): {sampler: {stage: warm_latency}};
    stages condition, ss_sample, ss_decode and, for the full chain, slat_sample and slat_decode (Gaussians)."""

    threads = cfg.compute.torch_threads or max(1, math.ceil(cfg.compute.num_cpus))
    torch.set_num_threads(threads)
    models = SamplingChain(cfg, _device(cfg))
    image = torch.from_numpy(np.array(cond_image, np.float32))[None]
    noise = torch.randn((1, *models.latent_shape()), generator=torch.Generator().manual_seed(cfg.sampling.seed),
                        device="cpu").to(models.device)
    rep, warm = cfg.latency.repeats, cfg.latency.warmup

    def timed(fn):
        """(warm latency of fn, the output of its last timed call): the next stage runs on that output instead
        of one more untimed call (at full size each SLat call is minutes on a CPU)."""
        box = {}
        stats = warm_latency(lambda: box.__setitem__("out", fn()), rep, warm)
        return stats, box["out"]

    out = {}
    for spec in cfg.samplers:
        lat = {}
        lat["condition"], cond = timed(lambda: models.condition(image))
        lat["ss_sample"], x = timed(lambda: models.sample(spec, noise, cond))
        lat["ss_decode"], occ = timed(lambda: models.decode(x))
        if models.slat_nets:
            coords = [occ[0].nonzero().int()]
            if coords[0].shape[0]:
                lat["slat_sample"], z = timed(lambda: models.sample_slat(spec, coords, cond, [cfg.sampling.seed]))
                lat["slat_decode"], _ = timed(lambda: models.decode_gaussians(z))
            else:   # nothing to run the SLat stage on: the chain ends after the SS decoder
                lat["slat_sample"] = lat["slat_decode"] = {"median_s": 0.0, "note": "empty occupancy"}
        out[spec.label] = lat
    return out


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class EvalResult:
    run_dir: str
    results: dict
    table: str
    mlflow_run_id: str | None = None


def summarize(cfg: EvaluateConfig, rows: dict[str, np.ndarray], latency: dict[str, dict],
              nfe: dict[str, dict[str, int]]) -> list[dict]:

    sampler = np.asarray(rows["sampler"])

    def feats(name: str, label: str) -> np.ndarray:
        return np.stack([np.frombuffer(b, np.float32) for b in np.asarray(rows[name], object)[sampler == label]]
                        ).reshape(-1, len(np.frombuffer(rows[name][0], np.float32)) // cfg.metrics.views)

    kinds = [f"{k}{suffix}" for suffix in ("", "_asset") for k in ("incep", "dinov2") if f"feat_{k}{suffix}" in rows]
    means = [c for c in ("chamfer", "fscore", "iou", "mse_ref", "iou_ref", "chamfer_asset", "fscore_asset")
             if c in rows]
    gt_feats = {k: feats(f"feat_{k}", GROUND_TRUTH) for k in kinds}
    out = []
    for spec in cfg.samplers:
        m = sampler == spec.label
        r = {"sampler": spec.label, "kind": spec.model, "steps": spec.steps, "nfe": sum(nfe[spec.label].values()),
             "samples": int(m.sum()), "student_rule": spec.student_rule}
        if cfg.models.full_chain:
            r.update(slat_kind=spec.slat_kind, slat_steps=spec.slat_step_count, nfe_stages=nfe[spec.label])
        for k in kinds:
            r[f"fd_{k}"] = report.fd(feats(f"feat_{k}", spec.label), gt_feats[k])
        for c in means:
            r[c] = float(np.nanmean(np.asarray(rows[c], np.float64)[m]))
        lat = latency.get(spec.label)
        if lat:
            r["latency_stages_s"] = {st: v["median_s"] for st, v in lat.items()}
            r["latency_s"] = sum(r["latency_stages_s"].values())
        out.append(r)
    report.add_speedup(out, cfg.sampling.reference)
    return out


def write_previews(cfg: EvaluateConfig, rows: dict[str, np.ndarray], directory: Path) -> list[str]:
    """Per sampler: `<label>.html`, a self-contained interactive 3-D view (orbit; works offline in MLflow's
    artifact viewer) and `<label>.png`, a grid — the ground truth, the reference sampler and the sampler side by
    side for the first `previews` assets (first seed), as decoded occupied voxels; for the full chain the grid
    shows the decoded Gaussians (centres in DC colour, the points the asset metrics use) and the 3-D view both."""

    directory.mkdir(parents=True, exist_ok=True)
    sampler, seed, sha = (np.asarray(rows[c]) for c in ("sampler", "seed", "sha256"))
    gt_rows = np.flatnonzero(sampler == GROUND_TRUTH)
    assets = sorted(sha[gt_rows])[:cfg.previews]
    res = round(np.unpackbits(np.frombuffer(rows["occupancy"][gt_rows[0]], np.uint8)).size ** (1 / 3))
    colours = {GROUND_TRUTH: (0.55, 0.55, 0.55), cfg.sampling.reference: (0.85, 0.55, 0.35)}

    def occ(label, a, s):
        i = int(np.flatnonzero((sampler == label) & (sha == a) & (seed == s))[0])
        return np.unpackbits(np.frombuffer(rows["occupancy"][i], np.uint8))[:res ** 3].reshape(res, res, res)

    def cloud(title, o, colour):
        pts = torch.from_numpy((np.argwhere(o) + 0.5) / res - 0.5).float()
        return PointCloud(title, pts, torch.tensor(colour).expand(len(pts), 3))

    def gaussians(title, label, a, s):
        i = int(np.flatnonzero((sampler == label) & (sha == a) & (seed == s))[0])
        c = torch.from_numpy(np.frombuffer(rows["asset_cloud"][i], np.float32).reshape(-1, 6).copy())
        return PointCloud(title, c[:, :3], c[:, 3:])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # many small point-splat renders: intra-op threads only add start-up cost
    paths = []
    try:
        for spec in cfg.samplers:
            columns = [(GROUND_TRUTH, -1), (cfg.sampling.reference, 0), (spec.label, 0)]
            grid = [[occ(lbl, a, s) for lbl, s in columns] for a in assets]
            stem = directory / spec.label.replace(" ", "_")
            panels = [cloud(f"{a[:8]} {lbl}", o, colours.get(lbl, (0.35, 0.55, 0.85)))
                      for a, r in zip(assets, grid) for o, (lbl, _) in zip(r, columns)]
            if "asset_cloud" in rows:   # the assets: the grid shows the Gaussians, the 3-D view both
                clouds = [[gaussians(f"{a[:8]} {lbl} (Gaussians)", lbl, a, s) for lbl, s in columns]
                          for a in assets]
                cells = [[render_points(c.points, c.colors, azimuth=45.0, elevation=30.0, size=96) for c in r]
                         for r in clouds]
                panels += [c for r in clouds for c in r]
                what = "decoded Gaussians (centres in DC colour)"
            else:
                cells = [[render_voxels(o, size=96, colour=colours.get(lbl, (0.35, 0.55, 0.85)))
                          for o, (lbl, _) in zip(r, columns)] for r in grid]
                what = "decoded occupancy"
            Path(f"{stem}.png").write_bytes(image_grid(cells, [a[:8] for a in assets], [c[0] for c in columns],
                                                       title=f"{spec.label}: {what}"))
            write_orbit_viewer(f"{stem}.html", panels, title=f"{cfg.name}: {spec.label} vs ground truth and "
                                                             f"{cfg.sampling.reference}", size=220)
            paths += [f"{stem}.html", f"{stem}.png"]
    finally:
        torch.set_num_threads(threads)
    return paths


def _collect(ds) -> dict[str, np.ndarray]:
    cols: dict[str, list] = {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for k, v in batch.items():
            cols.setdefault(k, []).extend(list(v))
    return {k: np.asarray(v, dtype=object) if k.startswith(("feat_", "occupancy", "asset_cloud")) else np.asarray(v)
            for k, v in cols.items()}


def run(cfg: EvaluateConfig) -> EvalResult:
    """Run the evaluation graph and write results.json, table.md, metrics.png, previews and the MLflow run."""
    import ray  # heavy: ray, psutil
    import ray.data  # heavy: ray, pandas

    from pipelines.preprocess import shards  # heavy: pyarrow
    from pipelines.preprocess.driver import init_ray  # heavy: pyarrow

    cfg.validate()
    t0 = time.time()
    if cfg.models.full_chain and cfg.models.slat_normalization is None:
        stats = shards.read_manifest(cfg.data.uri).get("slat_normalization")
        if not stats:
            raise ValueError(f"{cfg.data.uri}: the manifest has no slat_normalization statistics; set "
                             "models.slat_normalization")
        cfg = dataclasses.replace(cfg, models=dataclasses.replace(
            cfg.models, slat_normalization={"mean": list(stats["mean"]), "std": list(stats["std"])}))
    run_dir = Path(cfg.output) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    started = init_ray(cfg)
    try:
        columns = ["sha256", "slat_coords", "cond_images"] + (["slat_feats"] if cfg.models.full_chain else [])
        ds = shards.read_shards(cfg.data.uri, columns=columns)
        data = cfg.data
        ds = ds.filter(lambda r, d=data: in_split(r["sha256"], d), num_cpus=shards.READ_NUM_CPUS)
        if data.max_assets:
            ds = ds.sort("sha256").limit(data.max_assets)
        ds = ds.map_batches(SamplerActor, fn_constructor_args=(cfg,), batch_size=cfg.compute.batch_size,
                            batch_format="pyarrow", concurrency=cfg.compute.num_actors,
                            num_gpus=cfg.compute.num_gpus or None, num_cpus=cfg.compute.num_cpus)
        rows = _collect(ds)
        if not len(rows.get("sampler", [])):
            raise RuntimeError(f"no assets in split {data.split!r} of {data.uri}")
        first = next(shards.iter_rows(data.uri, columns=["sha256", "cond_images"]))
        image = shards.decode_cond_image(first["cond_images"][data.cond_view % len(first["cond_images"])],
                                         cfg.condition.image_size)
        latency = {}
        if cfg.latency.enabled:
            latency_task = ray.remote(measure_latency).options(num_cpus=cfg.compute.num_cpus,
                                                              num_gpus=cfg.compute.num_gpus or None)
            latency = ray.get(latency_task.remote(cfg, image))
    finally:
        if started:
            ray.shutdown()

    models_nfe = {s.label: _nfe(cfg, s) for s in cfg.samplers}
    table_rows = summarize(cfg, rows, latency, models_nfe)
    notes = report.flag_regressions(table_rows)
    table = report.markdown_table(table_rows)
    nets = {k: load_feature_net(k, getattr(cfg.metrics, k)).describe() for k in ("inception", "dinov2")}
    n_assets = int((np.asarray(rows["sampler"]) == GROUND_TRUTH).sum())
    results = {
        "name": cfg.name, "data": cfg.data.uri, "split": cfg.data.split, "assets": n_assets,
        "seeds": cfg.sampling.seeds, "reference": cfg.sampling.reference, "feature_nets": nets,
        "renders": f"{cfg.metrics.views} views of the decoded SS occupancy (and of the ground-truth voxels) "
                   f"at {cfg.metrics.render_size} px, drawn by mdt.eval.snapshots.render_voxels",
        "geometry": f"voxel IoU, Chamfer distance and F-score (threshold {cfg.metrics.fscore_voxels} voxel) of "
                    f"boundary-voxel centres in [-1, 1]^3, against the conditioning asset's voxels",
        "latency": (f"warm median of {cfg.latency.repeats} calls after {cfg.latency.warmup} warm-up calls, batch 1, "
                    f"per stage ({', '.join(STAGES[:5 if cfg.models.full_chain else 3])}), device "
                    f"{_device(cfg).type}, precision {cfg.compute.precision}") if cfg.latency.enabled
                   else "not measured (latency.enabled false)",
        "rows": table_rows, "notes": notes, "models": dataclasses.asdict(cfg.models),
        "distill_run_id": cfg.mlflow.distill_run_id, "wall_s": round(time.time() - t0, 1),
    }
    if cfg.models.full_chain:
        m = cfg.metrics
        results["assets_measured"] = (
            f"full chain per sampler (SS sample -> decoded occupancy -> SLat sample on its voxels -> Gaussian "
            f"decoder); *_asset columns: {m.views} point-splat renders of the Gaussians (centres in DC colour, "
            f"mdt.export.preview) at {m.render_size} px for FD_incep_asset / FD_dinov2_asset, Chamfer distance "
            f"and F-score (threshold {m.fscore_voxels} voxel of the SLat grid) of at most {m.max_points} visible "
            f"Gaussian centres in [-1, 1]^3; NFE = SS + SLat")
        results["notes"] = [GROUND_TRUTH_NOTE] + notes
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (run_dir / "table.md").write_text(_table_md(results, table))
    report.plot_metrics(table_rows, str(run_dir / "metrics.png"))
    previews = write_previews(cfg, rows, run_dir / "previews")
    run_id = log_mlflow(cfg, results, run_dir, previews) if cfg.mlflow.enabled else None
    return EvalResult(str(run_dir), results, table, run_id)


def headline_metrics(results: dict) -> dict[str, float]:
    """A few figures of the table: FD_dinov2 and IoU of the reference sampler and of each kind's fewest-step
    other sampler (with its speedup over the reference), keyed `<figure>_<kind>_<steps>step`."""
    rows, ref = results["rows"], results["reference"]
    picked = [r for r in rows if r["sampler"] == ref]
    for kind in ("student", "teacher"):
        others = [r for r in rows if r["kind"] == kind and r["sampler"] != ref]
        if others:
            picked.append(min(others, key=lambda r: r["steps"]))
    out = {}
    for r in picked:
        key = f"{r['kind']}_{r['steps']}step"
        out[f"FD_dinov2_{key}"], out[f"IoU_{key}"] = r.get("fd_dinov2"), r.get("iou")
        out[f"FD_dinov2_asset_{key}"] = r.get("fd_dinov2_asset")     # full chain only
        if r["sampler"] != ref:
            out[f"speedup_{key}"] = r.get("speedup")
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def _nfe(cfg: EvaluateConfig, spec: SamplerSpec) -> dict[str, int]:
    """Network evaluations per sample and stage: {"ss": n} or, for the full chain, {"ss": n, "slat": m}."""

    s = cfg.sampling

    def stage(kind: str, steps: int, name: str) -> int:
        w = s.cfg_strength(kind, name)
        if kind == "teacher":
            return count_nfe(steps, w, tuple(s.teacher_cfg_interval), s.teacher_rescale_t)
        return steps * (2 if w > 0 else 1)

    out = {"ss": stage(spec.model, spec.steps, "ss")}
    if cfg.models.full_chain:
        out["slat"] = stage(spec.slat_kind, spec.slat_step_count, "slat")
    return out


def _table_md(results: dict, table: str) -> str:
    nets = results["feature_nets"]
    lines = [f"# {results['name']}: {results['assets']} assets ({results['split']} split) x {results['seeds']} "
             f"seed(s)", "", table, "",
             f"- feature networks: Inception = {nets['inception']['name']}, DINOv2 = {nets['dinov2']['name']}"
             + ("" if nets["inception"]["real_weights"] and nets["dinov2"]["real_weights"] else
                " (random weights: FD values rank samplers but are not comparable with published ones)"),
             f"- renders: {results['renders']}", f"- geometry: {results['geometry']}",
             f"- 'ref' = the {results['reference']} sample from the same noise and condition",
             f"- latency: {results['latency']}"]
    if "assets_measured" in results:
        lines.insert(-3, "- assets ('asset' columns): " + results["assets_measured"] + "; the other quality "
                     "columns are of the decoded SS occupancy")
    lines += [f"- ⚠ {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def log_mlflow(cfg: EvaluateConfig, results: dict, run_dir: Path, previews: list[str]) -> str | None:
    """One MLflow run per evaluation: params, per-sampler metrics, the files as artifacts, linked to the
    distillation run (tag/param `mdt.distill_run_id` here, tag `mdt.eval_run_id` there)."""
    from pipelines.common import tracking  # heavy: pyarrow

    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.output)
    if uri is None:
        raise ValueError(f"output {cfg.output} is not local: give mlflow.tracking_uri (or $MLFLOW_TRACKING_URI)")
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, cfg.mlflow.experiment, uri)
    tags = {"mdt.kind": "evaluation"}
    if cfg.mlflow.distill_run_id:
        tags["mdt.distill_run_id"] = cfg.mlflow.distill_run_id
    run = c.create_run(exp, run_name=cfg.mlflow.run_name or cfg.name, tags=tags)
    rid = run.info.run_id

    tracking.log_params(c, rid, tracking.flatten(to_dict(cfg)))
    for r in results["rows"]:
        key = r["sampler"].replace(" ", "_")
        for m in ("nfe", "fd_incep", "fd_dinov2", "chamfer", "fscore", "iou", "mse_ref", "iou_ref", "latency_ms",
                  "speedup", "fd_incep_asset", "fd_dinov2_asset", "chamfer_asset", "fscore_asset"):
            v = r.get(m)
            if v is not None and math.isfinite(float(v)):
                c.log_metric(rid, f"{key}.{m}", float(v))
    for f in ("results.json", "table.md", "metrics.png"):
        c.log_artifact(rid, str(run_dir / f))
    for p in previews:
        c.log_artifact(rid, p, "previews")
    if cfg.mlflow.distill_run_id:
        try:
            c.set_tag(cfg.mlflow.distill_run_id, "mdt.eval_run_id", rid)
        except Exception as e:  # the distillation run may live in another store
            log.warning("could not tag distillation run %s: %s", cfg.mlflow.distill_run_id, e)
    c.set_terminated(rid)
    return rid


def distill_run_of(checkpoint: str | None) -> dict | None:
    """The distillation run that exported a local checkpoint (`<output>/<name>/.../export/<ema|student>/<stem>`):
    its `result.json` (tracking_uri, mlflow_run_id), found among the checkpoint's first parents; else None."""
    if not checkpoint or "://" in checkpoint:
        return None
    for parent in list(Path(checkpoint).parents)[:5]:
        f = parent / "result.json"
        if f.is_file():
            try:
                res = json.loads(f.read_text())
            except ValueError:
                return None
            return res if res.get("tracking_uri") and res.get("mlflow_run_id") else None
    return None


def prepare(cfg: EvaluateConfig) -> EvaluateConfig:
    """The job's arguments checked before Ray starts or a model loads (one-line ValueError: the config, a relative
    output under `ray job submit`, shards or a checkpoint that are not there), then local paths made absolute."""
    from pipelines.preprocess import shards  # heavy: pyarrow

    cfg.validate()
    durable_output(cfg.output, "--output")
    absolutize_paths(cfg)
    if not shards.shard_files(cfg.data.uri):
        raise ValueError(f"--data {cfg.data.uri}: no committed shards there (a preprocessing output dir, its "
                         "manifest.json or an s3:// prefix)")
    if not cfg.mlflow.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        run = distill_run_of(cfg.models.student) or distill_run_of(cfg.models.teacher)
        if run:  # the run it evaluates: the same MLflow store, linked to it
            cfg.mlflow.tracking_uri = run["tracking_uri"]
            cfg.mlflow.distill_run_id = cfg.mlflow.distill_run_id or run["mlflow_run_id"]
    for key, flag in (("teacher", "--teacher"), ("student", "--student"), ("ss_decoder", "--decoder"),
                      ("slat_teacher", "--slat-teacher"), ("slat_student", "--slat-student"),
                      ("slat_decoder", "--slat-decoder")):
        p = getattr(cfg.models, key)
        if p and "://" not in p and not checkpoint_exists(p) and not looks_like_hub_path(p):
            raise ValueError(f"{flag} {p}: no checkpoint there (expected {p}.json and {p}.safetensors)")
    return cfg


def absolutize_paths(cfg: EvaluateConfig) -> None:
    """Local paths made absolute: Ray workers do not share the driver's working directory."""

    cfg.output = fix(cfg.output)
    cfg.data.uri = fix(cfg.data.uri)
    for k in ("teacher", "student", "ss_decoder", "slat_teacher", "slat_student", "slat_decoder"):
        setattr(cfg.models, k, fix(getattr(cfg.models, k), must_exist=True))   # else a hub path: kept
    if cfg.condition.tiny:
        cfg.condition.model = created_model_path(cfg.condition.model, cfg.output)
    elif Path(cfg.condition.model).exists():
        cfg.condition.model = fix(cfg.condition.model)
    for k in ("inception", "dinov2"):
        v = getattr(cfg.metrics, k)
        if v and Path(v).exists():
            setattr(cfg.metrics, k, fix(v))
