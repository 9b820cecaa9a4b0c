"""TRELLIS.2's shape and texture stages: samplers compared with the 12-step teacher from the same noise.

    rows = evaluate_latent_stage(teacher, student, cond, coords, seeds, released=GuidanceSampler(12, 7.5, 0.5,
                                 [0.6, 1.0], 3.0), specs=default_latent_specs())
    print(latent_table(rows, stage="shape"))

Their latents cannot be decoded here (TRELLIS.2's VAEs need CUDA-only extensions), so a sampler is measured in
latent space against the reference sampler (the teacher at its released settings) from the same noise,
condition and voxels: latent MSE over voxels and channels, and the mean per-voxel cosine similarity of the
channel vectors. Teachers sample with TRELLIS.2's guidance (strength, rescale, interval, `rescale_t`: the released
settings, `steps` changed); students with `mdt.distill.student_sample` (uniform grid, guidance distilled: one
conditional pass per step). NFE per sample counts the guidance interval (`mdt.flow.count_nfe_trellis2`); latency is
warm (median of `repeats` after `warmup` calls) for the whole batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from mdt.distill import student_sample
from mdt.eval.latency import warm_latency
from mdt.flow import FlowEulerGuidanceIntervalSampler
from mdt.generate import sparse_noise


@dataclass(frozen=True)
class LatentSamplerSpec:
    model: str                            # teacher | student
    steps: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.steps}-step"


def default_latent_specs() -> list[LatentSamplerSpec]:
    """Teacher 12/4/2/1 steps (12 is the released setting and the reference), students 1/2/4."""
    return [LatentSamplerSpec("teacher", s) for s in (12, 4, 2, 1)] + \
        [LatentSamplerSpec("student", s) for s in (1, 2, 4)]


def latent_agreement(reference: Tensor, sample: Tensor) -> dict[str, float]:
    """Feats [N, C] of two latents on the same voxels -> MSE over all elements and mean per-voxel cosine."""
    ref, x = reference.float(), sample.float()
    return {"mse": float(((x - ref) ** 2).mean()),
            "cosine": float(F.cosine_similarity(x, ref, dim=1, eps=1e-12).mean())}


def sampler_nfe(spec: LatentSamplerSpec, released) -> int:
    """Network evaluations per sample: the teacher at the released guidance with `spec.steps`; a student one per
    step."""
    if spec.model == "student":
        return spec.steps
    return replace(released, steps=spec.steps).nfe()


def sample_latent(flow, spec: LatentSamplerSpec, noise, cond: Tensor, released, concat_cond: Tensor | None = None):
    """One sampler's latent (a SparseTensor on the noise's coordinates). concat_cond feats [N, Cs] (texture stage:
    the normalised shape latent) reach every call of the flow."""
    neg = torch.zeros_like(cond)
    bound = flow.bound_concat_cond(concat_cond) if concat_cond is not None else contextlib.nullcontext()
    with torch.no_grad(), bound:
        if spec.model == "teacher":
            return FlowEulerGuidanceIntervalSampler().sample(flow, noise, cond, neg,
                                                             **replace(released, steps=spec.steps).kwargs())
        return student_sample(flow, noise, cond, steps=spec.steps)


def evaluate_latent_stage(teacher, student, cond: Tensor, coords: list[Tensor], seeds: list[int], released,
                          specs: list[LatentSamplerSpec] | None = None, concat_cond: Tensor | None = None,
                          repeats: int = 3, warmup: int = 1) -> list[dict]:
    """Per sampler: mse / cosine against the teacher at `released` (its steps), nfe, latency_ms (warm, batch).

    cond [B, T, C]; coords per sample [N_i, 3]; noise of sample i from `seeds[i]` (CPU generator, independent of
    batching). `released`: a `mdt.generate.GuidanceSampler` (the stage's released settings)."""
    specs = specs or default_latent_specs()
    device = cond.device
    noise = sparse_noise(coords, teacher.out_channels, [torch.Generator().manual_seed(s) for s in seeds], device)
    nets = {"teacher": teacher, "student": student}
    ref_spec = LatentSamplerSpec("teacher", released.steps)
    ref = sample_latent(teacher, ref_spec, noise, cond, released, concat_cond).feats
    rows = []
    for spec in specs:
        if nets.get(spec.model) is None:
            continue
        run = partial(sample_latent, nets[spec.model], spec, noise, cond, released, concat_cond)
        x = run().feats
        lat = warm_latency(run, repeats=repeats, warmup=warmup)
        rows.append({"sampler": spec.label, "kind": spec.model, "steps": spec.steps,
                     "nfe": sampler_nfe(spec, released), **latent_agreement(ref, x),
                     "latency_ms": 1000 * lat["median_s"], "reference": ref_spec.label})
    return rows


def latent_table(rows: list[dict], stage: str) -> str:
    """Markdown table of `evaluate_latent_stage` rows."""
    ref = rows[0]["reference"] if rows else ""
    lines = [f"| {stage} sampler | NFE | MSE vs {ref} | cosine vs {ref} | latency (ms, warm) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['sampler']} | {r['nfe']} | {r['mse']:.4g} | {r['cosine']:.4f} | {r['latency_ms']:.1f} |"
              for r in rows]
    return "\n".join(lines)
