"""Flow-matching conventions and the Euler sampler (the golden sampling cases are in test_golden.py)."""
from __future__ import annotations

import pytest
import torch

from mdt.flow import (FlowEulerSampler, count_nfe, eps_from_velocity, noise_sample, sample_time, time_grid,
                      velocity_target, x0_from_velocity)
from mdt.sparse import SparseTensor


def test_noising_and_velocity_conversions_are_consistent():
    g = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(4, 3, 2, generator=g), torch.randn(4, 3, 2, generator=g), torch.rand(4, generator=g)
    xt = noise_sample(x0, eps, t, 1e-5)
    v = velocity_target(x0, eps, 1e-5)
    torch.testing.assert_close(x0_from_velocity(xt, v, t, 1e-5), x0, atol=2e-5, rtol=0)
    torch.testing.assert_close(eps_from_velocity(xt, v, t), eps, atol=2e-5, rtol=0)
    # d x_t / dt equals the velocity target.
    h = 1e-3
    torch.testing.assert_close((noise_sample(x0, eps, t + h, 1e-5) - xt) / h, v, atol=1e-3, rtol=0)


def test_sparse_noising_broadcasts_t_per_sample():
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.int32)
    x0 = SparseTensor(torch.ones(3, 2), coords)
    eps = x0.replace(torch.zeros(3, 2))
    out = noise_sample(x0, eps, torch.tensor([0.25, 0.75]), 0.0)
    torch.testing.assert_close(out.feats, torch.tensor([[0.75, 0.75], [0.75, 0.75], [0.25, 0.25]]))


def test_time_schedules():
    g = torch.Generator().manual_seed(0)
    t = sample_time(200_000, "logit_normal", 1.0, 1.0, generator=g)
    assert abs(t.median().item() - 0.731) < 0.005 and abs(t.mean().item() - 0.697) < 0.005
    u = sample_time(100_000, "uniform", generator=g)
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01


def test_time_grid_and_nfe():
    grid = time_grid(25, 3.0)
    assert [round(x, 4) for x in grid[:4]] == [1.0, 0.9863, 0.9718, 0.9565] and grid[-1] == 0
    assert time_grid(2) == [1.0, 0.5, 0.0]
    # TRELLIS pipeline.json sampling: 25 steps, cfg 5, interval [0.5, 1], rescale 3 -> 19 guided steps.
    assert count_nfe(25, 5.0, (0.5, 1.0), 3.0) == 25 + 19
    assert count_nfe(1) == 1 and count_nfe(2) == 2 and count_nfe(25, 3.0) == 50
    with pytest.raises(ValueError):
        time_grid(0)


class LinearVelocity(torch.nn.Module):
    """v(x, t, c) = a·x + c (c a per-sample scalar row), enough to check the sampler's arithmetic exactly."""

    def __init__(self, a):
        super().__init__()
        self.a, self.calls = a, []

    def forward(self, x, t, cond):
        self.calls.append((float(t[0]) / 1000, cond.clone()))
        if isinstance(x, SparseTensor):
            return x * self.a + cond
        return x * self.a + cond.view(-1, *[1] * (x.dim() - 1))


def test_euler_sampler_arithmetic_guidance_and_interval():
    x = torch.ones(2, 3)
    cond, neg = torch.tensor([1.0, 2.0]), torch.zeros(2)
    model = LinearVelocity(0.5)
    out = FlowEulerSampler().sample(model, x, cond, neg, steps=2, cfg_strength=2.0, cfg_interval=(0.6, 1.0))
    # step 1 (t=1 -> 0.5, guided): v = 3(0.5x + c) - 2(0.5x) = 0.5x + 3c ; step 2 (t=0.5, unguided): v = 0.5x + c
    ref = x.clone()
    ref = ref - 0.5 * (0.5 * ref + 3 * cond[:, None])
    ref = ref - 0.5 * (0.5 * ref + cond[:, None])
    torch.testing.assert_close(out, ref)
    # guided step: one forward of the doubled batch [x; x] with [cond; neg_cond]; unguided step: one of B
    assert [(round(t, 3), len(c)) for t, c in model.calls] == [(1.0, 4), (0.5, 2)]
    torch.testing.assert_close(model.calls[0][1], torch.cat([cond, neg]))
    sequential = LinearVelocity(0.5)
    out_seq = FlowEulerSampler().sample(sequential, x, cond, neg, steps=2, cfg_strength=2.0, cfg_interval=(0.6, 1.0),
                                        cfg_batched=False)
    torch.testing.assert_close(out_seq, ref)
    assert [(round(t, 3), len(c)) for t, c in sequential.calls] == [(1.0, 2), (1.0, 2), (0.5, 2)]


def test_sampler_runs_on_sparse_tensors():
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.int32)
    noise = SparseTensor(torch.ones(3, 2), coords)
    out = FlowEulerSampler().sample(LinearVelocity(0.0), noise, torch.tensor([[1.0], [2.0]]), steps=4)
    assert isinstance(out, SparseTensor) and torch.equal(out.coords, coords)
    torch.testing.assert_close(out.feats, torch.tensor([[0.0, 0.0], [0.0, 0.0], [-1.0, -1.0]]))


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_batched_guidance_equals_sequential_in_fp32(layout):
    """Teacher sampler (guidance interval, per-instance CFG) and student sampler (both modes): one forward of the
    doubled batch equals two forwards to 1e-6 of the result's scale in float32 (a few ulps: a batch of 2B may take
    another matmul blocking than B)."""
    from mdt.distill import student_sample
    from mdt.distill.analytic import ToyVelocityNet

    g = torch.Generator().manual_seed(0)
    if layout == "dense":
        noise = torch.randn(3, 4, 2, 2, 2, generator=g)
    else:
        coords = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1], [2, 1, 0, 1], [2, 1, 1, 1], [2, 0, 1, 1]],
                              dtype=torch.int32)
        noise = SparseTensor(torch.randn(6, 4, generator=g), coords)
    cond = torch.randn(3, 2, 5, generator=g)
    model = ToyVelocityNet(4, 10, seed=3, dtype=torch.float32)
    per_instance = torch.tensor([0.0, 1.5, 4.0])

    def run(batched):
        return [
            FlowEulerSampler().sample(model, noise, cond, steps=6, rescale_t=3.0, cfg_strength=3.0,
                                      cfg_interval=(0.5, 1.0), cfg_batched=batched),
            FlowEulerSampler().sample(model, noise, cond, steps=3, cfg_strength=per_instance, cfg_batched=batched),
            student_sample(model, noise, cond, steps=2, cfg_strength=2.0, cfg_batched=batched),
            student_sample(model, noise, cond, steps=2, cfg_strength=2.0, mode="consistency",
                           generator=torch.Generator().manual_seed(1), cfg_batched=batched),
        ]

    for a, b in zip(run(True), run(False)):
        fa, fb = (a.feats, b.feats) if layout == "sparse" else (a, b)
        assert (fa - fb).abs().max() <= 1e-6 * fb.abs().max() and fb.abs().max() > 0.1
        if layout == "sparse":
            assert torch.equal(a.coords, noise.coords)
    # per-instance strengths: sample 0 (w = 0) is the unguided sample, sample 2 the w = 4 one
    unguided = FlowEulerSampler().sample(model, noise, cond, steps=3)
    strong = FlowEulerSampler().sample(model, noise, cond, steps=3, cfg_strength=4.0)
    mixed = run(True)[1]
    d = (lambda x: x.feats[noise.batch_idx == 0]) if layout == "sparse" else (lambda x: x[0])
    e = (lambda x: x.feats[noise.batch_idx == 2]) if layout == "sparse" else (lambda x: x[2])
    for got, ref in ((d(mixed), d(unguided)), (e(mixed), e(strong))):
        assert (got - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_per_sample_generators_make_a_samples_noise_independent_of_its_batch(layout):
    """Consistency sampling with one generator per sample: sample i of a batch equals sample i sampled alone with
    the same generator seed (dense and sparse), and the re-noising really uses the generators (another seed
    changes the sample)."""
    from mdt.distill import student_sample
    from mdt.flow import randn_like
    from mdt.distill.analytic import ToyVelocityNet
    from mdt.sparse import sparse_unbind

    g = torch.Generator().manual_seed(0)
    if layout == "dense":
        noise = torch.randn(3, 4, 2, 2, 2, generator=g)
        parts = [noise[i:i + 1] for i in range(3)]
    else:
        coords = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1], [2, 1, 0, 1], [2, 1, 1, 1], [2, 0, 1, 1]],
                              dtype=torch.int32)
        noise = SparseTensor(torch.randn(6, 4, generator=g), coords)
        parts = sparse_unbind(noise)
    cond = torch.randn(3, 2, 5, generator=g)
    model = ToyVelocityNet(4, 10, seed=3, dtype=torch.float32)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    def values(x):
        return x.feats if layout == "sparse" else x

    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn_like(noise, gens([1, 2]))
    batch = values(student_sample(model, noise, cond, steps=3, mode="consistency", generator=gens([7, 8, 9])))
    alone = torch.cat([values(student_sample(model, p, cond[i:i + 1], steps=3, mode="consistency",
                                             generator=gens([7 + i]))) for i, p in enumerate(parts)])
    assert (batch - alone).abs().max() <= 1e-5 * alone.abs().max()
    other = values(student_sample(model, noise, cond, steps=3, mode="consistency", generator=gens([7, 8, 10])))
    n_last = 1 if layout == "dense" else 3       # rows of the last sample
    assert torch.equal(other[:-n_last], batch[:-n_last]) and (other[-n_last:] - batch[-n_last:]).abs().max() > 1e-3
