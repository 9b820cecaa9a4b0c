"""The Gaussian-mixture problem of the benchmark: its exact teacher, ODE references, collapse-sensitive metrics and
straightness; and the benchmark's students training through the product's Trainer with common random numbers."""
from __future__ import annotations

import math

import pytest
import torch

from mdt.distill.analytic import GaussianFlow, GaussianMixtureFlow
from mdt.experiments.gmm import GMMProblem, GMMSpec, chi2_quantile
from mdt.flow import SIGMA_MIN

D64 = torch.float64


def test_mixture_velocity_is_the_posterior_mean_target_by_tweedie():
    """Independent derivation: with x_t = a x0 + b eps, E[eps | x] = -b grad log p_t(x) and E[x0 | x] =
    (x - b E[eps | x]) / a, so v = (1 - sigma_min) E[eps | x] - E[x0 | x]; p_t is the mixture of N(a m_j, std_t^2),
    its score by autograd."""
    g = torch.Generator().manual_seed(0)
    s = 0.3
    f = GaussianMixtureFlow(s, SIGMA_MIN)
    means = 2 * torch.randn(5, 3, generator=g, dtype=D64)
    log_w = torch.log_softmax(torch.randn(5, generator=g, dtype=D64), 0)
    x = torch.randn(7, 3, generator=g, dtype=D64)
    t = torch.tensor([0.05, 0.2, 0.4, 0.5, 0.7, 0.9, 0.99], dtype=D64)
    a, b = 1 - t[:, None], SIGMA_MIN + (1 - SIGMA_MIN) * t[:, None]
    std2 = a ** 2 * s ** 2 + b ** 2
    xr = x.clone().requires_grad_(True)
    logp = torch.logsumexp(log_w - (xr[:, None] - a[:, None] * means).pow(2).sum(-1) / (2 * std2), -1)
    score, = torch.autograd.grad(logp.sum(), xr)
    e_eps = -b * score
    e_x0 = (x - b * e_eps) / a
    assert torch.allclose(f.velocity(x, t, means, log_w), (1 - SIGMA_MIN) * e_eps - e_x0, atol=1e-10)
    # one mode: the Gaussian flow's closed form
    single = f.velocity(x, t, means[:1], torch.zeros(1, dtype=D64))
    assert torch.allclose(single, GaussianFlow(s, SIGMA_MIN).velocity(x, t, means[:1].expand_as(x)), atol=1e-12)


@pytest.mark.slow
def test_gmm_layout_teacher_and_collapse_sensitive_metrics():
    p = GMMProblem(GMMSpec(num_classes=3))
    s = p.spec
    for c in range(s.num_classes):
        m = p.means[c]
        gaps = (m[:, None] - m[None]).norm(dim=-1) + torch.eye(s.modes, dtype=D64) * 1e9
        assert gaps.min() >= s.min_separation * s.mode_std
        # the class mean is far outside every mode (> 10 mode std in norm per sqrt(D) units)
        assert ((m - m.mean(0)).norm(dim=-1) / (s.mode_std * math.sqrt(s.dim))).min() > 10
    es = p.eval_set(96, 0)
    noise = p.noise(es, 1)
    ode = p.ode_endpoints(noise, es["cond"])
    finer = p.ode_endpoints(noise, es["cond"], steps=800)
    assert (ode - finer).abs().max() < 1e-2                               # converged ODE references
    ref = p.ode_endpoints(p.noise(es, 2), es["cond"])
    exact = p.evaluate(ode, es, ref, ode)
    data = p.evaluate(es["data"], es, ref, ode)
    collapsed = p.evaluate(p.class_mean_sample(es), es, ref, ode)
    assert exact["pair_l2_ode"] == 0.0 and exact["mode_coverage"] == 1.0 and exact["off_mode"] < 0.02
    assert data["mode_coverage"] == 1.0 and data["off_mode"] < 0.02 and abs(exact["nll"] - data["nll"]) < 0.1
    assert collapsed["mode_coverage"] == 0.0 and collapsed["off_mode"] == 1.0
    assert collapsed["nll"] > data["nll"] + 10 and collapsed["swd_ode"] > 2 * data["swd_ode"]
    # the exact teacher's single Euler step is that class-mean sampler (up to sigma_min)
    one = noise - p.guided_velocity(noise.double(), torch.ones(noise.shape[0], dtype=D64), es["cond"])
    assert (one - p.class_mean_sample(es)).abs().max() < 1e-3
    # the on-mode test: the chi^2_D 0.999 quantile (Wilson-Hilferty) against Monte Carlo
    z = torch.randn(200_000, s.dim, generator=torch.Generator().manual_seed(0), dtype=D64)
    assert (z.pow(2).sum(1) > chi2_quantile(s.dim)).double().mean().item() == pytest.approx(1e-3, abs=4e-4)


@pytest.mark.slow
def test_gmm_teacher_straightness_of_the_shipped_setting():
    """The shipped setting needs distillation: one Euler step misses most of the transport (>= 0.5)."""
    from mdt.experiments.presets import GMM

    p = GMMProblem(GMMSpec(**GMM["spec"]))
    st = p.straightness(64)
    assert st >= 0.5
    # a single-mode-per-class problem is (almost) straight: the measure can go below the threshold
    straight = GMMProblem(GMMSpec(modes=1, radius_scale=0.0, centre_scale=1.0, min_separation=0.0))
    assert straight.straightness(64) < 0.1


def test_students_train_through_the_trainer_with_common_random_numbers():
    """Every method of a seed sees the same data batches; the run goes through mdt.training.Trainer (its NaN guard
    stops a diverging run and reports it)."""
    from mdt.experiments import methods
    from mdt.experiments.nets import MixtureVelocityNet

    torch.manual_seed(0)
    teacher = MixtureVelocityNet(2, 3, hidden=16, depth=1)
    seen: dict = {}

    def batches(method):
        def batch(n, g):
            labels = torch.randint(3, (n,), generator=g)
            b = {"x0": torch.randn(n, 2, generator=g) + labels[:, None].float(),
                 "cond": torch.nn.functional.one_hot(labels, 3).float()}
            seen.setdefault(method, []).append(b["x0"].clone())
            return b
        return batch

    hp = methods.DistillHP(steps=3, batch_size=8, lr=1e-3, warmup=0)
    for method in ("cm", "vm", "mdt_release", "mdt_paper"):
        methods.distill(method, teacher, batches(method), hp, seed=5, log_every=1)
    for method in ("vm", "mdt_release", "mdt_paper"):
        assert all(torch.equal(a, b) for a, b in zip(seen["cm"], seen[method])) and len(seen[method]) == 3

    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, tau, cond):
            return x * self.w * float("nan")

    student, log = methods.distill("vm", Exploding(), batches("nan"), methods.DistillHP(steps=60, batch_size=4),
                                   seed=0, log_every=10)
    assert log[-1].get("diverged") is True and log[-1]["step"] == 51


def test_method_variants_are_what_they_are_named():
    from mdt.experiments.methods import PAPER_LAMBDA_VD, DistillHP, objective, sample_cfg

    hp = DistillHP(cfg=2.0, d_norm=True, lambda_vd=0.1)
    name, rel = objective("mdt_release", hp)
    assert name == "mdt" and (rel.d_norm, rel.w_vm, rel.w_vd, rel.vd_noise, rel.vd_weighting, rel.lambda_vd) == \
        (True, 2.0, 2.0, "shared", "released", 0.1)
    name, pap = objective("mdt_paper", hp)
    assert name == "mdt" and (pap.d_norm, pap.w_vm, pap.w_vd, pap.vd_noise, pap.vd_weighting, pap.lambda_vd) == \
        (False, 0.0, 0.0, "fresh", "paper", PAPER_LAMBDA_VD) and PAPER_LAMBDA_VD == 0.5
    assert objective("vm", hp)[1].lambda_vd == 0.0
    assert sample_cfg("mdt_paper", 2.0) == 2.0 and sample_cfg("mdt_release", 2.0) == 0.0
