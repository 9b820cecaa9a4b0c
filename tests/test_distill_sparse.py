"""The objectives on mdt.sparse.SparseTensor: agreement with dense on a full grid, per-sample reductions on ragged
batches, and the VD fake noise on the coordinates of the real x0."""
from __future__ import annotations

import pytest
import torch

from mdt.distill import (CMConfig, FlowMatchingConfig, MDTConfig, PCMConfig, SCMConfig, cm_loss,
                         flow_matching_loss, mdt_loss, pcm_loss, scm_loss, student_sample, vm_loss)
from mdt.sparse import SparseTensor, from_dense, sparse_unbind

from mdt.distill.analytic import ToyVelocityNet as ToyNet

D64 = torch.float64

C, R, TOK, CC = 3, 4, 2, 5


def grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def zero_grads(*models):
    for m in models:
        for p in m.parameters():
            p.grad = None


def full_grid(dense: torch.Tensor) -> SparseTensor:
    mask = torch.ones(dense.shape[0], *dense.shape[2:], dtype=torch.bool)
    return from_dense(dense, mask)


def dense_and_sparse_batch(seed: int = 0, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, C, R, R, R, generator=g, dtype=D64)
    eps = torch.randn(b, C, R, R, R, generator=g, dtype=D64)
    eps_f = torch.randn(b, C, R, R, R, generator=g, dtype=D64)
    cond = torch.randn(b, TOK, CC, generator=g, dtype=D64)
    t = torch.tensor([0.34, 0.88, 0.61, 0.12][:b], dtype=D64)
    dense = {"x0": x0, "noise": eps, "noise_fake": eps_f, "cond": cond, "t": t}
    sparse = {"x0": full_grid(x0), "noise": full_grid(eps), "noise_fake": full_grid(eps_f), "cond": cond, "t": t}
    return dense, sparse


OBJECTIVES = [
    ("fm", flow_matching_loss, FlowMatchingConfig(p_uncond=0.0)),
    ("vm-discrete", vm_loss, MDTConfig(mode="discrete", w_vm=3.0)),
    ("vm-continuous", vm_loss, MDTConfig(mode="continuous", w_vm=3.0)),
    ("mdt-discrete", mdt_loss, MDTConfig(mode="discrete", w_vm=[2.0, 4.0], w_vd=6.0)),
    ("mdt-continuous", mdt_loss, MDTConfig(mode="continuous", w_vm=2.0, w_vd=6.0)),
    ("mdt-cm", mdt_loss, MDTConfig(mode="cm", multiphase=2, w_vm=2.0, w_vd=6.0)),
    ("cm", cm_loss, CMConfig(w=1.0)),
    ("pcm", pcm_loss, PCMConfig(phases=4, num_steps=8, w=1.0)),
    ("scm", scm_loss, SCMConfig(w=1.0)),
]


@pytest.mark.parametrize("name,fn,cfg", OBJECTIVES, ids=[o[0] for o in OBJECTIVES])
def test_dense_and_sparse_agree_on_a_full_grid(name, fn, cfg):
    dense, sparse = dense_and_sparse_batch(1)
    del dense["t"], sparse["t"]            # drawn from the same seeded generator in both runs
    student, teacher = ToyNet(C, TOK * CC, seed=1), ToyNet(C, TOK * CC, seed=2)
    out = {}
    for kind, batch in (("dense", dense), ("sparse", sparse)):
        zero_grads(student, teacher)
        terms = fn(student, teacher, batch, cfg, generator=torch.Generator().manual_seed(5))
        terms["loss"].backward()
        out[kind] = (terms, grads(student))
        assert all(p.grad is None for p in teacher.parameters())
    (td, gd), (ts, gs) = out["dense"], out["sparse"]
    assert set(td) == set(ts)
    for k in td:
        if k == "loss_bins":
            assert torch.allclose(td[k], ts[k], rtol=1e-5, equal_nan=True)
        else:
            assert td[k].item() == pytest.approx(ts[k].item(), rel=1e-10, abs=1e-14), k
    for a, b in zip(gd, gs):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def ragged_batch(seed: int = 2, counts=(10, 25, 7)):
    g = torch.Generator().manual_seed(seed)
    coords, b = [], len(counts)
    for i, n in enumerate(counts):
        idx = torch.randperm(R ** 3, generator=g)[:n].sort().values
        xyz = torch.stack([idx // (R * R), (idx // R) % R, idx % R], 1)
        coords.append(torch.cat([torch.full((n, 1), i), xyz], 1))
    coords = torch.cat(coords).int()
    n = coords.shape[0]
    mk = lambda: SparseTensor(torch.randn(n, C, generator=g, dtype=D64), coords, batch_size=b)  # noqa: E731
    return {"x0": mk(), "noise": mk(), "noise_fake": mk(),
            "cond": torch.randn(b, TOK, CC, generator=g, dtype=D64),
            "t": torch.tensor([0.15, 0.52, 0.97], dtype=D64)}


def split(batch: dict, i: int) -> dict:
    out = {}
    for k, v in batch.items():
        out[k] = sparse_unbind(v)[i] if isinstance(v, SparseTensor) else v[i:i + 1]
    return out


@pytest.mark.parametrize("mode", ["discrete", "continuous"])
def test_ragged_sparse_batch_reduces_per_sample(mode):
    """d_norm norms, t and the binned losses belong to each sample's own voxels: the batched per-instance losses
    equal the losses of each sample alone, and the batch loss is their voxel-weighted mean (TRELLIS)."""
    batch = ragged_batch()
    counts = torch.tensor([10, 25, 7], dtype=D64)
    student, teacher = ToyNet(C, TOK * CC, seed=3), ToyNet(C, TOK * CC, seed=4)
    cfg = MDTConfig(mode=mode, w_vm=3.0, w_vd=5.0)
    terms = mdt_loss(student, teacher, batch, cfg)
    singles = torch.tensor([mdt_loss(student, teacher, split(batch, i), cfg)["loss"].item() for i in range(3)],
                           dtype=D64)
    bins = terms["loss_bins"].double()
    assert torch.allclose(bins[[1, 5, 9]], singles, rtol=1e-5)
    assert torch.isnan(bins[[0, 2, 3, 4, 6, 7, 8]]).all()
    assert terms["loss"].item() == pytest.approx(((singles * counts).sum() / counts.sum()).item(), rel=1e-10)


class CoordRecorder(ToyNet):
    def forward(self, x, tau, cond):
        self.calls.append((x.coords, tau.detach().clone()))
        return super().forward(x, tau, cond)


def test_fake_noise_lives_on_the_coordinates_of_x0():
    batch = ragged_batch(3)
    del batch["noise_fake"], batch["noise"], batch["t"]
    student = CoordRecorder(C, TOK * CC, seed=1)
    student.calls = []
    teacher = ToyNet(C, TOK * CC, seed=2)
    terms = mdt_loss(student, teacher, batch, MDTConfig(), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(terms["loss"])
    assert len(student.calls) == 5                     # v_S, v_p, v_f, v_S', v_p' (reference 5.7)
    assert sum(bool((tau == 1000).all()) for _, tau in student.calls) == 1
    for coords, _ in student.calls:
        assert torch.equal(coords, batch["x0"].coords)
    # sampling keeps the noise's coordinates
    out = student_sample(student, batch["x0"], batch["cond"], steps=2)
    assert isinstance(out, SparseTensor) and torch.equal(out.coords, batch["x0"].coords)


def ragged_fp32_batch(seed: int, dtype=torch.float32):
    """Two samples with different voxel counts (3 and 5) on a 4^3 grid."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 2, 3], [0, 3, 3, 3],
                           [1, 0, 1, 0], [1, 1, 1, 1], [1, 2, 0, 1], [1, 2, 2, 2], [1, 3, 0, 3]], dtype=torch.int32)
    x0 = SparseTensor(torch.randn(8, C, generator=g, dtype=dtype), coords)
    return {"x0": x0, "noise": x0.replace(torch.randn(8, C, generator=g, dtype=dtype)),
            "noise_fake": x0.replace(torch.randn(8, C, generator=g, dtype=dtype)),
            "cond": torch.randn(2, TOK, CC, generator=g, dtype=dtype),
            "t": torch.tensor([0.37, 0.81], dtype=dtype)}


BATCHED_GUIDANCE = [
    ("vm-discrete", vm_loss, dict(mode="discrete", w_vm=3.0), MDTConfig),
    ("mdt-discrete", mdt_loss, dict(mode="discrete", w_vm=2.0, w_vd=6.0), MDTConfig),
    ("mdt-continuous", mdt_loss, dict(mode="continuous", w_vm=2.0, w_vd=6.0), MDTConfig),
    ("cm", cm_loss, dict(w=1.5), CMConfig),
    ("pcm", pcm_loss, dict(phases=2, w=1.5), PCMConfig),
    ("scm", scm_loss, dict(w=1.5), SCMConfig),
]


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("name,fn,kw,cls", BATCHED_GUIDANCE, ids=[o[0] for o in BATCHED_GUIDANCE])
def test_batched_guidance_equals_sequential_in_fp32(name, fn, kw, cls, layout):
    """One teacher forward of [x; x] with [cond; neg_cond] gives the two sequential forwards' outputs to 1e-6 of
    their scale in float32; the loss and the student gradient follow (to 1e-5: pred - target cancels digits)."""
    if layout == "dense":
        g = torch.Generator().manual_seed(3)
        batch = {k: torch.randn(2, C, R, R, R, generator=g) for k in ("x0", "noise", "noise_fake")}
        batch.update(cond=torch.randn(2, TOK, CC, generator=g), t=torch.tensor([0.37, 0.81]))
    else:
        batch = ragged_fp32_batch(3)
    student = ToyNet(C, TOK * CC, seed=1, dtype=torch.float32)
    teacher = ToyNet(C, TOK * CC, seed=2, dtype=torch.float32)
    calls = []
    teacher.register_forward_hook(
        lambda m, inp, out: calls.append((int(inp[2].shape[0]), (out.feats if layout == "sparse" else out).detach())))
    results = []
    for batched in (True, False):
        zero_grads(student)
        calls.clear()
        terms = fn(student, teacher, batch, cls(**kw, cfg_batched=batched))
        terms["loss"].backward()
        results.append((terms, grads(student), list(calls)))
    (tb, gb, cb), (ts, gs, cs) = results
    assert {n for n, _ in cb} == {4} and {n for n, _ in cs} == {2} and 2 * len(cb) == len(cs)
    for (_, both), (_, v_c), (_, v_u) in zip(cb, cs[0::2], cs[1::2]):
        ref = torch.cat([v_c, v_u])
        assert (both - ref).abs().max() <= 1e-6 * ref.abs().max()
    for k in tb:
        if k != "loss_bins":
            assert (tb[k] - ts[k]).abs().max() <= 1e-5 * ts[k].abs().max(), k
    scale = max(float(b.abs().max()) for b in gs)
    assert scale > 0 and all(float((a - b).abs().max()) <= 1e-5 * scale for a, b in zip(gb, gs))
