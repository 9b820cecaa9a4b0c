"""Problem `gmm`: class-conditional isotropic Gaussian mixtures with an exact flow teacher.

Each class c has `modes` modes on a sphere of radius `radius_scale`·sqrt(D) around a class centre (random
directions, resampled until every pair of modes is >= `min_separation` mode standard deviations apart), equal
weights and per-coordinate standard deviation `mode_std`. The class mean lies >= (radius - tiny) away from every
mode, where the density is ~0: a sampler that collapses to E[x0 | c] (one Euler step of any flow teacher from
noise) lands off the data. The teacher is exact: `mdt.distill.analytic.GaussianMixtureFlow` gives the marginal
velocity in closed form (CFG: (1 + w) v(x | c) - w v(x | all classes)); its probability-flow ODE, integrated with
`ODE_STEPS` Heun steps in float64, gives each noise's exact endpoint: the paired reference of every method. The
network `MixtureVelocityNet` trained by flow matching on the data is the students' initialisation; the
distillation objectives query the exact teacher.

Straightness of the (guided) teacher: E||x0_ODE - (x1 - v(x1, 1))||^2 / E||x1 - x0_ODE||^2, the share of the
transport a single Euler step misses (0: straight, distillation unnecessary).

Metrics per class (averaged over classes): `pair_l2_ode` (primary: RMS per coordinate of x - x0_ODE from the same
noise), `mode_coverage` (fraction of modes holding at least a quarter of their expected share of on-mode samples),
`off_mode` (fraction of samples on no mode: ||x - m_j||^2 / s^2 above the chi^2_D 0.999 quantile for every j),
`swd_ode` (sliced W2 to the ODE endpoints of independent noise), `nll` (exact -log p(x | c) / D under the data
mixture).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch import nn

from mdt.distill.analytic import GaussianMixtureFlow
from mdt.eval import sliced_wasserstein
from mdt.flow import SIGMA_MIN, TIME_SCALE

from .nets import MixtureVelocityNet
from .protocol import wanted_metrics

ODE_STEPS = 400
D64 = torch.float64


@dataclass
class GMMSpec:
    dim: int = 8
    num_classes: int = 4
    modes: int = 8
    mode_std: float = 0.1
    radius_scale: float = 1.5           # modes at radius radius_scale * sqrt(dim) from the class centre
    centre_scale: float = 0.5           # class centres ~ N(0, centre_scale^2 I)
    min_separation: float = 8.0         # every pair of a class's modes at least this many mode_std apart
    cfg: float = 0.0                    # the teacher's guidance (targets, ODE references and teacher sampling)
    world_seed: int = 4321
    hidden: int = 128
    depth: int = 3


def chi2_quantile(d: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi^2_d quantile at standard-normal quantile z (3.09: 0.999)."""
    k = 2.0 / (9.0 * d)
    return d * (1 - k + z * math.sqrt(k)) ** 3


class ExactMixtureTeacher(nn.Module):
    """model(x, 1000 t, onehot) -> exact marginal velocity; the zero one-hot is the unconditional mixture."""

    def __init__(self, problem: "GMMProblem"):
        super().__init__()
        self.problem = problem
        self.scale = nn.Parameter(torch.ones((), dtype=D64), requires_grad=False)

    def forward(self, x: Tensor, tau: Tensor, cond: Tensor) -> Tensor:
        p = self.problem
        has = cond.sum(-1) > 0
        log_w = torch.where(has[:, None], p.class_logw_all[cond.argmax(-1)], p.all_logw[None])     # [N, K M]
        v = p.flow.velocity(x.double(), (tau / TIME_SCALE).double(), p.all_means, log_w)
        return v.to(x.dtype)


class GMMProblem:
    name = "gmm"
    metrics_lower_is_better = {"pair_l2_ode": True, "mode_coverage": False, "off_mode": True, "swd_ode": True,
                               "nll": True}

    def __init__(self, spec: GMMSpec):
        self.spec = s = spec
        self.num_classes = s.num_classes
        rng = np.random.default_rng(s.world_seed)
        d, radius = s.dim, s.radius_scale * math.sqrt(s.dim)
        centres = rng.standard_normal((s.num_classes, d)) * s.centre_scale
        means = []
        for c in range(s.num_classes):
            for _ in range(1000):
                u = rng.standard_normal((s.modes, d))
                m = centres[c] + radius * u / np.linalg.norm(u, axis=1, keepdims=True)
                gaps = np.linalg.norm(m[:, None] - m[None], axis=-1) + np.eye(s.modes) * 1e9
                if gaps.min() >= s.min_separation * s.mode_std:
                    break
            else:
                raise ValueError(f"gmm: no mode layout with separation >= {s.min_separation} sigma")
            means.append(m)
        self.means = torch.tensor(np.stack(means))                                  # [K, M, D]
        self.log_w = torch.full((s.num_classes, s.modes), -math.log(s.modes), dtype=D64)
        self.all_means = self.means.reshape(-1, d)                                  # [K M, D]
        self.all_logw = torch.full((self.all_means.shape[0],), -math.log(self.all_means.shape[0]), dtype=D64)
        # class c: weight 1 / M on its own modes, 0 (log -inf) on the others'; the zero one-hot: every mode
        own = torch.arange(s.num_classes).repeat_interleave(s.modes)[None] == torch.arange(s.num_classes)[:, None]
        self.class_logw_all = torch.where(own, torch.tensor(-math.log(s.modes), dtype=D64),
                                          torch.tensor(-math.inf, dtype=D64))      # [K, K M]
        self.flow = GaussianMixtureFlow(s.mode_std, SIGMA_MIN)
        self.teacher = ExactMixtureTeacher(self)

    # ---- data ------------------------------------------------------------------------------------------------
    def build_model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return MixtureVelocityNet(self.spec.dim, self.spec.num_classes, self.spec.hidden, self.spec.depth)

    def exact_teacher(self) -> torch.nn.Module:
        return self.teacher

    def onehot(self, labels: Tensor) -> Tensor:
        return torch.nn.functional.one_hot(labels, self.spec.num_classes).float()

    def sample_data(self, labels: Tensor, g: torch.Generator) -> Tensor:
        comp = torch.randint(self.spec.modes, (labels.shape[0],), generator=g)
        z = torch.randn(labels.shape[0], self.spec.dim, generator=g, dtype=D64)
        return (self.means[labels, comp] + self.spec.mode_std * z).float()

    def train_batch(self, n: int, g: torch.Generator) -> dict:
        labels = torch.randint(self.spec.num_classes, (n,), generator=g)
        return {"x0": self.sample_data(labels, g), "cond": self.onehot(labels)}

    # ---- the exact teacher's ODE -----------------------------------------------------------------------------
    def guided_velocity(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        w = self.spec.cfg
        tau = t * TIME_SCALE
        v = self.teacher(x, tau, cond)
        if w:
            v = (1 + w) * v - w * self.teacher(x, tau, torch.zeros_like(cond))
        return v

    @torch.no_grad()
    def ode_endpoints(self, noise: Tensor, cond: Tensor, steps: int = ODE_STEPS) -> Tensor:
        """x0 of the guided probability-flow ODE from x1 = noise (Heun, float64, uniform grid)."""
        x = noise.double()
        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=D64)
        for t, t_next in zip(ts[:-1], ts[1:]):
            tb, tn = t.expand(x.shape[0]), t_next.expand(x.shape[0])
            v = self.guided_velocity(x, tb, cond)
            x_e = x - (t - t_next) * v
            x = x - (t - t_next) * 0.5 * (v + self.guided_velocity(x_e, tn, cond))
        return x.float()

    def straightness(self, n_per_class: int = 256, seed: int = 0) -> float:
        labels = torch.arange(self.spec.num_classes).repeat_interleave(n_per_class)
        cond = self.onehot(labels)
        x1 = torch.randn(labels.shape[0], self.spec.dim, generator=torch.Generator().manual_seed(seed), dtype=D64)
        x0 = self.ode_endpoints(x1, cond).double()
        one_step = x1 - self.guided_velocity(x1, torch.ones(x1.shape[0], dtype=D64), cond)
        return float((x0 - one_step).pow(2).sum(1).mean() / (x1 - x0).pow(2).sum(1).mean())

    def class_mean_sample(self, es: dict) -> Tensor:
        """The reference collapsed sampler: every sample of class c is E[x0 | c]."""
        return self.means.mean(1)[es["labels"]].float()

    # ---- evaluation ------------------------------------------------------------------------------------------
    def eval_set(self, n_per_class: int, seed: int) -> dict:
        labels = torch.arange(self.spec.num_classes).repeat_interleave(n_per_class)
        g = torch.Generator().manual_seed(10_000 + seed)
        return {"labels": labels, "cond": self.onehot(labels), "data": self.sample_data(labels, g)}

    def noise(self, es: dict, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(es["labels"].shape[0], self.spec.dim, generator=g)

    def on_mode(self, x: Tensor, labels: Tensor) -> Tensor:
        """[N, M] bool: sample n within the chi^2_D 0.999 ball of its class's mode j."""
        sq = (x.double()[:, None, :] - self.means[labels]).pow(2).sum(-1) / self.spec.mode_std ** 2
        return sq <= chi2_quantile(self.spec.dim)

    def evaluate(self, x: Tensor, es: dict, ref_teacher: Tensor, paired_teacher: Tensor | None,
                 metrics=None) -> dict:
        """ref_teacher / paired_teacher: exact ODE endpoints of independent / the same noise."""
        wanted = wanted_metrics(self.metrics_lower_is_better, metrics)
        labels, k, d = es["labels"], self.spec.num_classes, self.spec.dim
        out = {}
        x = x.double()
        if "pair_l2_ode" in wanted:
            out["pair_l2_ode"] = (math.nan if paired_teacher is None else
                                  float(((x - paired_teacher.double()).pow(2).sum(1) / d).sqrt().mean()))
        if wanted & {"mode_coverage", "off_mode"}:
            on = self.on_mode(x, labels)
            cov, off = 0.0, 0.0
            for c in range(k):
                m = labels == c
                counts = on[m].sum(0).double()
                cov += float((counts >= 0.25 * m.sum() / self.spec.modes).double().mean()) / k
                off += float((~on[m].any(1)).double().mean()) / k
            if "mode_coverage" in wanted:
                out["mode_coverage"] = cov
            if "off_mode" in wanted:
                out["off_mode"] = off
        if "swd_ode" in wanted:
            out["swd_ode"] = sum(sliced_wasserstein(x[labels == c], ref_teacher[labels == c], seed=c)
                                 for c in range(k)) / k
        if "nll" in wanted:
            means = self.means[labels]
            out["nll"] = float(-self.flow.log_prob(x, means, self.log_w[labels]).mean() / d)
        return out

    def nonfinite_guard(self, x: Tensor) -> Tensor:
        return torch.nan_to_num(x, nan=1e3, posinf=1e3, neginf=-1e3).clamp(-1e3, 1e3)
