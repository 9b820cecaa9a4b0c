"""Problem (a): a class-conditional Gaussian mixture in a low dimension, where distributions are known exactly.

Each class k has `components` Gaussian components with means around a class centre and anisotropic covariances
(random rotations, standard deviations in [std_min, std_max]); the whole "world" is fixed by `world_seed`.
Training data are drawn fresh from the true distribution at every step; held-out data for evaluation come
from separate seeds. Metrics (per class, averaged over classes, against held-out data and against the
teacher's 25-step CFG samples): sliced 2-Wasserstein distance, Frechet distance on a fixed random feature map,
the true negative log-likelihood of the samples, and the paired distance to the teacher's 25-step sample from
the same noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mdt.eval import RandomFeatureMap, frechet_distance, sliced_wasserstein

from .nets import MixtureVelocityNet
from .protocol import wanted_metrics


@dataclass
class MixtureSpec:
    dim: int = 8
    num_classes: int = 10
    components: int = 3
    centre_std: float = 1.0
    offset_std: float = 0.7
    std_min: float = 0.05
    std_max: float = 0.25
    world_seed: int = 1234
    hidden: int = 128
    depth: int = 3


class MixtureProblem:
    name = "mixture"
    metrics_lower_is_better = {"swd_data": True, "fd_data": True, "swd_teacher": True, "fd_teacher": True,
                               "nll": True, "pair_l2_teacher": True}

    def __init__(self, spec: MixtureSpec):
        self.spec = s = spec
        rng = np.random.default_rng(s.world_seed)
        k, c, d = s.num_classes, s.components, s.dim
        centres = rng.standard_normal((k, 1, d)) * s.centre_std
        self.means = torch.tensor(centres + rng.standard_normal((k, c, d)) * s.offset_std)      # [K, C, D]
        q, _ = np.linalg.qr(rng.standard_normal((k * c, d, d)))
        stds = rng.uniform(s.std_min, s.std_max, (k * c, d))
        self.chol = torch.tensor(q * stds[:, None, :]).reshape(k, c, d, d)                  # L = Q diag(s)
        w = rng.dirichlet(np.full(c, 3.0), size=k)
        self.log_w = torch.tensor(np.log(w))                                                  # [K, C]
        self.features = RandomFeatureMap(d, 32, seed=s.world_seed + 1)

    # ---- data ------------------------------------------------------------------------------------------------
    def build_model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return MixtureVelocityNet(self.spec.dim, self.spec.num_classes, self.spec.hidden, self.spec.depth)

    def onehot(self, labels: Tensor) -> Tensor:
        return torch.nn.functional.one_hot(labels, self.spec.num_classes).float()

    def sample_data(self, labels: Tensor, g: torch.Generator) -> Tensor:
        n = labels.shape[0]
        comp = torch.multinomial(self.log_w[labels].exp(), 1, generator=g).squeeze(1)
        z = torch.randn(n, self.spec.dim, generator=g, dtype=torch.float64)
        mu = self.means[labels, comp]
        chol = self.chol[labels, comp]
        return (mu + torch.einsum("nij,nj->ni", chol, z)).float()

    def train_batch(self, n: int, g: torch.Generator) -> dict:
        labels = torch.randint(self.spec.num_classes, (n,), generator=g)
        return {"x0": self.sample_data(labels, g), "cond": self.onehot(labels)}

    def log_prob(self, x: Tensor, labels: Tensor) -> Tensor:
        """True log-density log p(x | class) [N]."""
        x = x.double()
        mu, chol = self.means[labels], self.chol[labels]                                        # [N, C, D(, D)]
        diff = x[:, None, :] - mu
        # chol = Q diag(s): covariance = chol chol^T; use its Cholesky factor for the density
        cov = chol @ chol.transpose(-1, -2)
        lcov = torch.linalg.cholesky(cov)
        sol = torch.linalg.solve_triangular(lcov, diff.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = 2 * torch.log(torch.diagonal(lcov, dim1=-2, dim2=-1)).sum(-1)
        d = x.shape[1]
        comp = -0.5 * (sol ** 2).sum(-1) - 0.5 * logdet - 0.5 * d * math.log(2 * math.pi)
        return torch.logsumexp(self.log_w[labels] + comp, dim=1)

    # ---- evaluation ------------------------------------------------------------------------------------------
    def eval_set(self, n_per_class: int, seed: int) -> dict:
        """Conditions and noise for generation plus a held-out data set with the same labels (all seeded)."""
        labels = torch.arange(self.spec.num_classes).repeat_interleave(n_per_class)
        g = torch.Generator().manual_seed(10_000 + seed)
        data = self.sample_data(labels, g)
        return {"labels": labels, "cond": self.onehot(labels), "data": data}

    def data_as_sample(self, es: dict) -> Tensor:
        return es["data"]

    def noise(self, es: dict, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(es["labels"].shape[0], self.spec.dim, generator=g)

    def evaluate(self, x: Tensor, es: dict, ref_teacher: Tensor, paired_teacher: Tensor | None,
                 metrics=None) -> dict:
        """All metrics, or only those named in `metrics` (each computed exactly as in the full evaluation)."""
        wanted = wanted_metrics(self.metrics_lower_is_better, metrics)
        labels = es["labels"]
        out = {k: 0.0 for k in ("swd_data", "fd_data", "swd_teacher", "fd_teacher") if k in wanted}
        k = self.spec.num_classes
        refs = [(name, ref) for name, ref in (("data", es["data"]), ("teacher", ref_teacher))
                if wanted & {f"swd_{name}", f"fd_{name}"}]
        for c in range(k) if refs else ():
            m = labels == c
            gx = x[m]
            for ref_name, ref in refs:
                if f"swd_{ref_name}" in wanted:
                    out[f"swd_{ref_name}"] += sliced_wasserstein(gx, ref[m], seed=c) / k
                if f"fd_{ref_name}" in wanted:
                    out[f"fd_{ref_name}"] += frechet_distance(self.features(gx), self.features(ref[m])) / k
        if "nll" in wanted:
            out["nll"] = float(-self.log_prob(x, labels).mean())
        if "pair_l2_teacher" in wanted:
            out["pair_l2_teacher"] = (0.0 if paired_teacher is None else
                                      float((x.double() - paired_teacher.double()).norm(dim=1).mean()))
        return out

    def nonfinite_guard(self, x: Tensor) -> Tensor:
        return torch.nan_to_num(x, nan=1e3, posinf=1e3, neginf=-1e3).clamp(-1e3, 1e3)
