"""Evaluation of TRELLIS.2's shape and texture stages: latent MSE and per-voxel cosine against the 12-step teacher
from the same noise, NFE with the guidance interval, warm latency, on tiny TRELLIS.2-architecture flows."""
from __future__ import annotations

import numpy as np
import pytest
import torch


def test_latent_agreement_against_numpy():
    from mdt.eval.trellis2 import latent_agreement

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 32)), rng.normal(size=(50, 32))
    got = latent_agreement(torch.tensor(a), torch.tensor(b))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert got["mse"] == pytest.approx(((a - b) ** 2).mean(), rel=1e-5)
    assert got["cosine"] == pytest.approx(cos.mean(), rel=1e-4, abs=1e-6)
    assert latent_agreement(torch.tensor(a), torch.tensor(-2 * a))["cosine"] == pytest.approx(-1.0, abs=1e-6)


def test_nfe_counts_the_guidance_interval():
    """Shape stage at its released settings: 12 steps, rescale_t 3 -> 9 grid times inside [0.6, 1] (two passes)
    and 3 outside (one): 21. Texture (w = 1, no guidance): one pass per step. Students: one per step."""
    from mdt.eval.trellis2 import LatentSamplerSpec, sampler_nfe
    from mdt.generate import GuidanceSampler

    shape = GuidanceSampler(12, 7.5, 0.5, [0.6, 1.0], 3.0)
    t = [1 - i / 12 for i in range(12)]
    warped = [3 * x / (1 + 2 * x) for x in t]
    assert sampler_nfe(LatentSamplerSpec("teacher", 12), shape) == sum(2 if x >= 0.6 else 1 for x in warped) == 21
    assert sampler_nfe(LatentSamplerSpec("teacher", 12), GuidanceSampler(12, 1.0, 0.0, [0.6, 0.9], 3.0)) == 12
    assert sampler_nfe(LatentSamplerSpec("student", 2), shape) == 2


@pytest.fixture(scope="module")
def flows(tmp_path_factory):
    from mdt.models.zoo import save_tiny_model
    from mdt.models import from_pretrained

    d = tmp_path_factory.mktemp("t2eval")
    return {slot: from_pretrained(save_tiny_model(slot, d / slot, cond_channels=16, seed=i)).eval()
            for i, slot in enumerate(("t2_shape_flow", "t2_tex_flow"))}


def inputs():
    g = torch.Generator().manual_seed(3)
    coords = [torch.unique(torch.randint(0, 32, (n, 3), generator=g), dim=0).int() for n in (40, 25)]
    return torch.randn(2, 5, 16, generator=g), coords


@pytest.mark.slow
def test_shape_stage_table(flows):
    """The 12-step teacher row is the reference itself (MSE 0, cosine 1: same noise); fewer teacher steps and the
    student (here the teacher's own network sampled as a student: uniform grid, no guidance) disagree; every
    sampler of the default list is a row."""
    from mdt.eval.trellis2 import evaluate_latent_stage, latent_table
    from mdt.generate import GuidanceSampler

    cond, coords = inputs()
    released = GuidanceSampler(12, 7.5, 0.5, [0.6, 1.0], 3.0)
    rows = evaluate_latent_stage(flows["t2_shape_flow"], flows["t2_shape_flow"],
                                 cond, coords, [0, 1], released, repeats=1, warmup=0)
    by = {r["sampler"]: r for r in rows}
    assert list(by) == ["teacher 12-step", "teacher 4-step", "teacher 2-step", "teacher 1-step",
                        "student 1-step", "student 2-step", "student 4-step"]
    assert by["teacher 12-step"]["mse"] == 0.0 and by["teacher 12-step"]["cosine"] == pytest.approx(1.0)
    assert by["teacher 1-step"]["mse"] > by["teacher 4-step"]["mse"] > 0
    assert by["student 1-step"]["mse"] > 0 and by["student 1-step"]["nfe"] == 1
    assert [by[f"teacher {s}-step"]["nfe"] for s in (12, 4, 2, 1)] == [
        GuidanceSampler(s, 7.5, 0.5, [0.6, 1.0], 3.0).nfe() for s in (12, 4, 2, 1)]
    assert all(r["latency_ms"] > 0 for r in rows)
    table = latent_table(rows, "shape")
    assert "MSE vs teacher 12-step" in table and table.count("\n") == len(rows) + 1


@pytest.mark.slow
def test_texture_stage_uses_the_shape_latent(flows):
    """The texture flow sees concat_cond in every call: another shape latent changes every sampler's result."""
    from mdt.eval.trellis2 import LatentSamplerSpec, evaluate_latent_stage, sample_latent
    from mdt.generate import GuidanceSampler, sparse_noise

    cond, coords = inputs()
    released = GuidanceSampler(12, 1.0, 0.0, [0.6, 0.9], 3.0)
    n = sum(c.shape[0] for c in coords)
    shape = torch.randn(n, 32, generator=torch.Generator().manual_seed(5))
    noise = sparse_noise(coords, 32, [torch.Generator().manual_seed(s) for s in (0, 1)], torch.device("cpu"))
    tex = flows["t2_tex_flow"]
    for spec in (LatentSamplerSpec("teacher", 2), LatentSamplerSpec("student", 1)):
        a = sample_latent(tex, spec, noise, cond, released, shape).feats
        b = sample_latent(tex, spec, noise, cond, released, shape + 1).feats
        assert (a - b).abs().max() > 1e-3
    rows = evaluate_latent_stage(tex, tex, cond, coords, [0, 1], released, concat_cond=shape, repeats=1, warmup=0)
    assert rows[0]["mse"] == 0.0 and all(np.isfinite(r["mse"]) for r in rows)


def test_ss_stage_nfe_of_the_job_matches_trellis2_accounting():
    """The evaluation job counts a teacher's NFE with TRELLIS's rule on its TRELLIS-convention weight w; for a
    TRELLIS.2 teacher at w' = 1 + w that is TRELLIS.2's count, interval included (the preset's SS settings)."""
    from mdt.flow import count_nfe, count_nfe_trellis2, trellis2_strength

    for steps in (12, 4, 2, 1):
        assert count_nfe(steps, 6.5, (0.6, 1.0), 5.0) == count_nfe_trellis2(steps, trellis2_strength(6.5),
                                                                            (0.6, 1.0), 5.0)
    assert count_nfe_trellis2(12, 7.5, (0.6, 1.0), 5.0) == 22


@pytest.mark.ray
@pytest.mark.slow
def test_evaluation_job_table_for_a_trellis2_ss_student(ray_connected, tmp_path):
    """`jobs/evaluate.py --preset trellis2-ci` as shipped on tiny TRELLIS.2 SS flows (teacher, student), a tiny
    DINOv3 and TRELLIS's SS decoder: every sampler's row, TRELLIS.2 NFE accounting, the reference against itself."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from _distill_helpers import write_tiny_shards
    from mdt.models.zoo import save_tiny_model

    root = Path(__file__).resolve().parents[1]
    data = write_tiny_shards(tmp_path / "pre", n=4, image_size=64)
    teacher = save_tiny_model("t2_ss_flow", tmp_path / "models" / "teacher", cond_channels=32, seed=1)
    student = save_tiny_model("t2_ss_flow", tmp_path / "models" / "student", cond_channels=32, seed=2)
    decoder = save_tiny_model("ss_decoder", tmp_path / "models" / "ss_decoder", seed=3)
    env = {**os.environ, "PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "RAY_ADDRESS": ray_connected.address}
    r = subprocess.run([sys.executable, str(root / "jobs" / "evaluate.py"), "--preset", "trellis2-ci", "--data",
                        str(data), "--teacher", teacher, "--student", student, "--decoder", decoder, "--output",
                        str(tmp_path / "eval")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "evaluate-trellis2-ci" / "results.json").read_text())
    nfe = {row["sampler"]: row["nfe"] for row in res["rows"]}
    assert nfe == {"teacher 12-step": 22, "teacher 1-step": 2, "student 1-step": 1, "student 2-step": 2}
    ref = res["rows"][0]
    assert ref["mse_ref"] == 0.0 and ref["iou_ref"] == 1.0
    assert all(row["mse_ref"] > 0 for row in res["rows"][1:])
    table = (tmp_path / "eval" / "evaluate-trellis2-ci" / "table.md").read_text()
    assert "| student 1-step |" in table and "| teacher 12-step | 22 |" in table


def test_the_jobs_chain_samples_a_trellis2_teacher_with_its_guidance_and_rescale(flows, tmp_path):
    """SamplingChain.sample on a TRELLIS.2 SS teacher = TRELLIS.2's sampler at w' = 1 + w with the configured
    guidance rescale, which differs from TRELLIS's CFG (no rescale) on the same noise."""
    from types import SimpleNamespace

    from mdt.eval.chain import SamplingChain
    from mdt.flow import FlowEulerGuidanceIntervalSampler, FlowEulerSampler
    from mdt.models.zoo import save_tiny_model
    from mdt.models import from_pretrained
    from pipelines.evaluate.driver import EvalSamplingConfig, SamplerSpec

    net = from_pretrained(save_tiny_model("t2_ss_flow", tmp_path / "ss", cond_channels=16, seed=4)).eval()
    chain = SamplingChain.__new__(SamplingChain)
    sampling = EvalSamplingConfig(teacher_cfg=6.5, teacher_cfg_interval=[0.6, 1.0], teacher_rescale_t=5.0,
                                  teacher_guidance_rescale=0.7)
    chain.cfg, chain.nets = SimpleNamespace(sampling=sampling), {"teacher": net}
    g = torch.Generator().manual_seed(0)
    noise, cond = torch.randn(2, 8, 16, 16, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    got = chain.sample(SamplerSpec("teacher", 3), noise, cond)
    want = FlowEulerGuidanceIntervalSampler().sample(net, noise, cond, torch.zeros_like(cond), steps=3,
                                                     rescale_t=5.0, guidance_strength=7.5, guidance_rescale=0.7,
                                                     guidance_interval=(0.6, 1.0))
    torch.testing.assert_close(got, want)
    trellis = FlowEulerSampler().sample(net, noise, cond, torch.zeros_like(cond), steps=3, rescale_t=5.0,
                                        cfg_strength=6.5, cfg_interval=(0.6, 1.0))
    assert (got - trellis).abs().max() > 1e-3
