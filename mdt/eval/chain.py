"""The models an evaluation samples with, loaded once per process, and the two sampling stages.

    chain = SamplingChain(cfg, device)      # cfg: pipelines.evaluate.driver.EvaluateConfig (condition, models, sampling)
    x = chain.sample(spec, noise, cond)     # SS latents of one sampler (spec: .model, .steps)
    occ = chain.decode(x)                   # bool occupancy [B, R, R, R]
    gaussians = chain.assets(spec, occ, cond, seeds)   # full chain: SLat on the occupied voxels -> Gaussians

Teachers sample with `mdt.flow.FlowEulerSampler` (TRELLIS's Euler sampler with CFG on an interval), students with
`mdt.distill.student_sample`; both work on dense SS latents and sparse SLat latents. The SLat noise and the
chunked Gaussian decoding are those of the generation chain (`mdt.generate.sparse_noise`, `decode_gaussians`).
"""
from __future__ import annotations

import torch

from mdt.distill import student_sample
from mdt.eval.snapshots import decode_occupancy, load_decoder
from mdt.flow import FlowEulerSampler
from mdt.generate import decode_gaussians, denormalize_slat, sparse_noise
from mdt.models import from_pretrained
from mdt.training.build import build_conditioner
from mdt.flow import FlowEulerGuidanceIntervalSampler, trellis2_strength


class SamplingChain:
    """Everything a sampler needs, loaded once per process: conditioner, SS teacher/student, SS decoder and, for
    the full chain, SLat teacher/student, the Gaussian decoder and the SLat statistics."""

    def __init__(self, cfg, device: torch.device):
        def load(path):   # compute.precision: the torso dtype of the flows and the Gaussian decoder
            net = from_pretrained(path, device=device).set_precision(cfg.compute.precision, device)
            return net.eval().requires_grad_(False)

        self.cfg, self.device = cfg, device
        self.conditioner = build_conditioner(cfg.condition, device)
        self.nets = {k: load(getattr(cfg.models, k)) for k in ("teacher", "student") if getattr(cfg.models, k)}
        self.decoder = load_decoder(cfg.models.ss_decoder).to(device)
        self.slat_nets: dict[str, torch.nn.Module] = {}
        if cfg.models.full_chain:
            m = cfg.models
            self.slat_nets = {k: load(getattr(m, f"slat_{k}")) for k in ("teacher", "student")
                              if getattr(m, f"slat_{k}")}
            self.gs_decoder = load(m.slat_decoder)
            norm = m.slat_normalization
            if norm is None:
                raise ValueError("no SLat statistics: the shards' manifest has no slat_normalization; set "
                                 "models.slat_normalization")
            self.slat_mean = torch.tensor(norm["mean"], dtype=torch.float32, device=device)
            self.slat_std = torch.tensor(norm["std"], dtype=torch.float32, device=device)
            self._check_chain()

    def _check_chain(self) -> None:
        """One readable error for SLat models that cannot follow the SS stage (instead of a shape error)."""
        net = next(iter(self.nets.values()))
        probe = torch.zeros((1, net.in_channels, *(net.resolution,) * 3), device=self.device)
        res = self.decode(probe).shape[-1]
        problems = []
        for k, flow in self.slat_nets.items():
            if flow.resolution != res:
                problems.append(f"slat_{k} works on a {flow.resolution}³ grid, the SS decoder gives {res}³")
            if flow.out_channels != self.gs_decoder.latent_channels:
                problems.append(f"slat_{k} makes {flow.out_channels}-channel latents, slat_decoder takes "
                                f"{self.gs_decoder.latent_channels}")
        if self.slat_mean.numel() != self.gs_decoder.latent_channels:
            problems.append(f"slat_normalization has {self.slat_mean.numel()} channels, slat_decoder takes "
                            f"{self.gs_decoder.latent_channels}")
        if problems:
            raise ValueError("incompatible SLat models: " + "; ".join(problems))

    @torch.no_grad()
    def condition(self, images: torch.Tensor) -> torch.Tensor:
        return self.conditioner(images.to(self.device))

    @torch.no_grad()
    def sample(self, spec, noise, cond: torch.Tensor, stage: str = "ss", generators=None):
        """Dense SS noise or sparse SLat noise -> the sample of `spec`'s model for that stage (the flow
        samplers of mdt.flow / mdt.distill work on both). `generators` (one per sample): the fresh noise of a
        student that samples with `spec.student_rule` "consistency"."""
        s = self.cfg.sampling
        kind, steps = (spec.model, spec.steps) if stage == "ss" else (spec.slat_kind, spec.slat_step_count)
        net = (self.nets if stage == "ss" else self.slat_nets)[kind]
        if kind == "teacher" and getattr(net, "GUIDANCE_FORM", "") == "trellis2":
            # TRELLIS.2 teacher: its guidance form (w' = 1 + w of the TRELLIS-convention weight) and rescale

            return FlowEulerGuidanceIntervalSampler().sample(
                net, noise, cond, torch.zeros_like(cond), steps=steps, rescale_t=s.teacher_rescale_t,
                guidance_strength=trellis2_strength(s.cfg_strength(kind, stage)),
                guidance_rescale=s.teacher_guidance_rescale, guidance_interval=tuple(s.teacher_cfg_interval))
        if kind == "teacher":
            return FlowEulerSampler().sample(net, noise, cond, torch.zeros_like(cond), steps=steps,
                                             rescale_t=s.teacher_rescale_t, cfg_strength=s.cfg_strength(kind, stage),
                                             cfg_interval=tuple(s.teacher_cfg_interval))
        rule = getattr(spec, "student_rule", "euler")
        return student_sample(net, noise, cond, steps=steps, cfg_strength=s.cfg_strength(kind, stage), mode=rule,
                              generator=generators if rule == "consistency" else None)

    @torch.no_grad()
    def sample_slat(self, spec, coords: list[torch.Tensor], cond: torch.Tensor,
                    seeds: list[int]):
        """Occupied voxels [N_i, 3] per sample (all non-empty), their conditions [B, T, C] -> the de-normalised
        SLat (noise of sample i from `seeds[i]`, drawn on the CPU: independent of batching and device)."""
        channels = next(iter(self.slat_nets.values())).in_channels
        noise = sparse_noise(coords, channels, [torch.Generator().manual_seed(x) for x in seeds], self.device)
        renoise = [torch.Generator().manual_seed(x ^ 0x5EED) for x in seeds]    # a stream apart from the noise's
        return denormalize_slat(self.sample(spec, noise, cond, "slat", renoise), self.slat_mean, self.slat_std)

    @torch.no_grad()
    def decode_gaussians(self, slat) -> list:
        return decode_gaussians(self.gs_decoder, slat, self.cfg.compute.max_voxels_per_chunk)

    @torch.no_grad()
    def assets(self, spec, occ: torch.Tensor, cond: torch.Tensor, seeds: list[int]) -> list:
        """Decoded occupancy [B, R, R, R] -> per sample its Gaussians (None where the occupancy is empty)."""
        coords = [o.nonzero().int() for o in occ]
        live = [i for i, c in enumerate(coords) if c.shape[0]]
        out = [None] * len(coords)
        if live:
            z = self.sample_slat(spec, [coords[i] for i in live], cond[live], [seeds[i] for i in live])
            for i, g in zip(live, self.decode_gaussians(z)):
                out[i] = g
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_occupancy(self.decoder, latents)

    def latent_shape(self) -> tuple[int, ...]:
        net = next(iter(self.nets.values()))
        return (net.in_channels, *(net.resolution,) * 3)
