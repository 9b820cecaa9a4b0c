"""The objectives with the TRELLIS networks (tiny configurations): dense SparseStructureFlowModel and sparse
SLatFlowModel, including the forward-mode JVP of the continuous mode and few-step sampling."""
from __future__ import annotations

import pytest
import torch

from mdt.distill import CMConfig, MDTConfig, SCMConfig, cm_loss, mdt_loss, scm_loss, student_sample
from mdt import flow
from mdt.distill.losses import _math_sdpa, call, time_derivative
from mdt.flow import data
from mdt.models import SLatFlowModel, SparseStructureFlowModel
from mdt.sparse import SparseTensor

SS_ARGS = dict(resolution=8, in_channels=4, out_channels=4, model_channels=32, cond_channels=16, num_blocks=1,
               num_heads=2, mlp_ratio=2, patch_size=2, pe_mode="ape", qk_rms_norm=True, use_fp16=False)
SLAT_ARGS = dict(resolution=16, in_channels=4, out_channels=4, model_channels=32, cond_channels=16, num_blocks=1,
                 num_heads=2, mlp_ratio=2, patch_size=2, num_io_res_blocks=1, io_block_channels=[16], pe_mode="ape",
                 qk_rms_norm=True, use_fp16=False)


def perturbed(cls, args, seed):
    """TRELLIS zero-initialises the output layers; perturb every weight so that outputs and JVPs are non-trivial."""
    torch.manual_seed(seed)
    model = cls(**args)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def make_x0(kind: str, g: torch.Generator, b: int = 2):
    if kind == "ss":
        return torch.randn(b, 4, 8, 8, 8, generator=g)
    coords = []
    for i, n in enumerate([40, 70, 25][:b]):
        idx = torch.randperm(16 ** 3, generator=g)[:n].sort().values
        coords.append(torch.cat([torch.full((n, 1), i), torch.stack([idx // 256, (idx // 16) % 16, idx % 16], 1)], 1))
    coords = torch.cat(coords).int()
    return SparseTensor(torch.randn(coords.shape[0], 4, generator=g), coords, batch_size=b)


MODELS = {"ss": (SparseStructureFlowModel, SS_ARGS), "slat": (SLatFlowModel, SLAT_ARGS)}


@pytest.mark.parametrize("kind", ["ss", "slat"])
@pytest.mark.parametrize("mode", ["discrete", "continuous"])
def test_mdt_loss_on_trellis_networks(kind, mode):
    cls, args = MODELS[kind]
    student, teacher = perturbed(cls, args, 1), perturbed(cls, args, 2)
    teacher.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    batch = {"x0": make_x0(kind, g), "cond": torch.randn(2, 3, 16, generator=g)}
    terms = mdt_loss(student, teacher, batch, MDTConfig(mode=mode), generator=torch.Generator().manual_seed(1))
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and terms["loss_vm"] > 0 and terms["loss_vd"] > 0
    assert terms["loss"].item() == pytest.approx((terms["loss_vm"] + terms["loss_vd"]).item(), rel=1e-5)
    assert all(p.grad is None for p in teacher.parameters())
    g_norm = sum(p.grad.double().pow(2).sum() for p in student.parameters() if p.grad is not None)
    assert torch.isfinite(g_norm) and g_norm > 0
    assert int(torch.isfinite(terms["loss_bins"]).sum()) in (1, 2)


@pytest.mark.parametrize("kind", ["ss", "slat"])
def test_forward_mode_jvp_through_trellis_networks(kind):
    """The continuous-mode derivative (torch.func.jvp, math attention) equals a double-backward JVP."""
    cls, args = MODELS[kind]
    model = perturbed(cls, args, 3).double()
    g = torch.Generator().manual_seed(4)
    x = make_x0(kind, g)
    x = x.double() if kind == "ss" else x.replace(x.feats.double())
    f = data(x)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    v = torch.randn(f.shape, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 3, 16, generator=g, dtype=torch.float64)
    ours = time_derivative(model, x, f, t, cond, v, "func")

    def fn(ff, tt):
        return call(model, x, ff, tt, cond)

    with _math_sdpa():  # the fused CPU attention kernel has no double backward either
        _, ref = torch.autograd.functional.jvp(fn, (f, t), (v, torch.ones_like(t)))
    # float32 inside the sinusoidal time embedding (as in TRELLIS) limits the agreement to ~1e-6
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours.abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["ss", "slat"])
def test_baselines_and_sampling_on_trellis_networks(kind):
    cls, args = MODELS[kind]
    student, teacher = perturbed(cls, args, 5), perturbed(cls, args, 6)
    g = torch.Generator().manual_seed(7)
    x0 = make_x0(kind, g)
    cond = torch.randn(2, 3, 16, generator=g)
    for fn, cfg in ((cm_loss, CMConfig(w=3.0)), (scm_loss, SCMConfig(w=3.0))):
        student.zero_grad()
        terms = fn(student, teacher, {"x0": x0, "cond": cond}, cfg, generator=torch.Generator().manual_seed(8))
        terms["loss"].backward()
        assert torch.isfinite(terms["loss"]) and all(p.grad is None for p in teacher.parameters())
    noise = flow.randn_like(x0, g)
    for steps in (1, 2, 4):
        out = student_sample(student, noise, cond, steps=steps, cfg_strength=0.5)
        ref = flow.FlowEulerSampler().sample(student, noise, cond, steps=steps, cfg_strength=0.5)
        assert torch.allclose(data(out), data(ref), atol=1e-5)
        if kind == "slat":
            assert torch.equal(out.coords, x0.coords)
    one = student_sample(student, noise, cond, steps=1)
    with torch.no_grad():
        manual = data(noise) - call(student, noise, data(noise), torch.ones(2), cond)
    assert torch.allclose(data(one), manual, atol=1e-6)


def test_jvp_switches_attention_backend_only_temporarily():
    from mdt.sparse import backends

    old = backends._attn
    try:
        backends.set_backends(attn="auto")
        model = perturbed(SLatFlowModel, SLAT_ARGS, 9)
        g = torch.Generator().manual_seed(10)
        x = make_x0("slat", g)
        seen = []
        orig = backends.attn_backend_for

        def spy(is_cuda, dtype):
            seen.append(backends._attn)
            return orig(is_cuda, dtype)

        backends.attn_backend_for = spy
        import mdt.sparse.attention as attention
        attention.attn_backend_for = spy
        try:
            time_derivative(model, x, x.feats, torch.tensor([0.4, 0.6]), torch.randn(2, 3, 16, generator=g),
                              torch.randn(x.feats.shape, generator=g), "func")
        finally:
            backends.attn_backend_for = orig
            attention.attn_backend_for = orig
        assert seen and set(seen) == {"sdpa"}
        assert backends._attn == "auto"
    finally:
        backends.set_backends(attn=old)
