"""`ImageTo3D`: TRELLIS's image -> 3-D chain with any mix of teacher / student flows per stage."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mdt.conditioning import ImageConditioner
from mdt.export.flexicubes import MeshData, mesh_from_decoder_output
from mdt.export.mesh import occupancy_mesh
from mdt.flow import FlowEulerSampler
from mdt.generate.config import GenerateConfig, StageSampler
from mdt.generate.images import preprocess_image
from mdt.generate.sources import ModelSource, ensure_tiny_models, resolve_model_paths
from mdt.models import Gaussians, TrellisModule, from_pretrained
from mdt.models.occupancy_probe import OccupancyProbe, load_decoder
from mdt.models.zoo import SLOTS
from mdt.sparse import SparseTensor, sparse_cat, sparse_unbind

# ------------------------------------------------------------------------------------------------------------
# The chain
# ------------------------------------------------------------------------------------------------------------

@dataclass
class GeneratedSample:
    coords: Tensor                         # [N, 3] int, occupied voxels of the SS grid
    gaussians: Gaussians | None = None
    mesh: Any = None                       # mdt.export.flexicubes.MeshData
    occupancy_mesh: Any = None
    note: str = ""                         # why something is missing or was cut (empty occupancy, cap...)


@dataclass
class Generation:
    samples: list[GeneratedSample]
    timings: dict[str, float]              # seconds per stage (this call)
    nfe: dict[str, int]
    condition_image: Tensor                # [3, S, S] the preprocessed input


class StageTimer:
    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ImageTo3D:
    """The loaded chain. Flow models of either stage may be a teacher or a student (any TRELLIS-format
    checkpoint of the right class)."""

    def __init__(self, models: dict[str, nn.Module], conditioner: ImageConditioner, cfg: GenerateConfig,
                 slat_mean: Tensor, slat_std: Tensor, sources: dict[str, ModelSource] | None = None):
        self.models, self.conditioner, self.cfg = models, conditioner, cfg
        self.device = pick_device(cfg.device)
        self.slat_mean, self.slat_std = slat_mean.to(self.device), slat_std.to(self.device)
        self.sources = sources or {}
        self.sampler = FlowEulerSampler()

    @classmethod
    def from_config(cls, cfg: GenerateConfig) -> "ImageTo3D":
        cfg.validate()
        sources, pipe_args = resolve_model_paths(cfg)
        ensure_tiny_models(sources, cfg)
        device = pick_device(cfg.device)
        models = {}
        for slot in SLOTS:
            if slot == "ss_decoder":  # a TRELLIS SS decoder or an occupancy probe (the CPU demo's SS decoder)
                model = load_decoder(sources[slot].path).to(device)
            else:
                model = from_pretrained(sources[slot].path, device=device)
            if isinstance(model, TrellisModule):
                model = model.set_precision(cfg.precision, device)
            models[slot] = model.eval()
        dino_dtype = torch.float16 if device.type == "cuda" and cfg.precision != "fp32" else torch.float32
        conditioner = ImageConditioner(sources["dinov2"].path, image_size=cfg.image_size, device=device,
                                       dtype=dino_dtype)
        norm = cfg.slat_normalization or pipe_args.get("slat_normalization")
        if norm is None:
            raise ValueError("no SLat normalisation: set slat_normalization or use a pipeline.json that has it")
        mean, std = torch.tensor(norm["mean"], dtype=torch.float32), torch.tensor(norm["std"], dtype=torch.float32)
        check_compatible(models, conditioner, mean)
        return cls(models, conditioner, cfg, mean, std, sources)

    def with_flows(self, ss_flow: "str | nn.Module | None" = None,
                   slat_flow: "str | nn.Module | None" = None) -> "ImageTo3D":
        """The same chain (shared conditioner and decoders) with other flow models for either stage: a
        checkpoint path (`<dir>/<stem>` or hub path) or a loaded module, e.g. teacher SS flow + student SLat."""
        models, sources = dict(self.models), dict(self.sources)
        for slot, new in (("ss_flow", ss_flow), ("slat_flow", slat_flow)):
            if new is None:
                continue
            if not isinstance(new, nn.Module):
                sources[slot] = ModelSource(str(new), "config")
                new = from_pretrained(str(new), device=self.device).set_precision(self.cfg.precision,
                                                                                 self.device).eval()
            models[slot] = new
        check_compatible(models, self.conditioner, self.slat_mean)
        return ImageTo3D(models, self.conditioner, self.cfg, self.slat_mean, self.slat_std, sources)

    # ---- stages ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, images: Tensor) -> Tensor:
        """[B, 3, S, S] in [0, 1] -> cond [B, T, C] (the negative condition is zeros)."""
        return self.conditioner(images.to(self.device))

    @torch.no_grad()
    def sample_structure(self, cond: Tensor, num_samples: int,
                         generator: "torch.Generator | list[torch.Generator]",
                         sampler: StageSampler | None = None) -> Tensor:
        """cond [1, T, C] (or one per sample [K, T, C]) -> SS latents [K, 8, R, R, R] in one batch; noise drawn
        from `generator`, or sample i's from `generator[i]` (noise that does not depend on which samples share
        the batch)."""
        s = sampler or self.cfg.ss
        flow = self.models["ss_flow"]
        r = flow.resolution
        if isinstance(generator, torch.Generator):
            noise = torch.randn((num_samples, flow.in_channels, r, r, r), generator=generator, device=self.device)
        else:
            noise = torch.cat([torch.randn((1, flow.in_channels, r, r, r), generator=g, device=self.device)
                               for g in generator])
        return self.sampler.sample(flow, noise, cond, torch.zeros_like(cond), steps=s.steps,
                                   rescale_t=s.rescale_t, cfg_strength=s.cfg_strength,
                                   cfg_interval=tuple(s.cfg_interval))

    @torch.no_grad()
    def decode_structure(self, z: Tensor) -> tuple[list[Tensor], list[str]]:
        """SS latents -> per sample the occupied voxel coords [N, 3] (decoder logits > 0) and a note."""
        return self.occupied(self.models["ss_decoder"](z).float())

    def occupied(self, logits: Tensor) -> tuple[list[Tensor], list[str]]:
        """Per sample: coords [N, 3] of logits > 0 (capped to the highest `max_structure_voxels`), and a note."""
        cap = self.cfg.decode.max_structure_voxels
        coords, notes = [], []
        for k in range(logits.shape[0]):
            lg = logits[k, 0]
            idx = torch.nonzero(lg > 0)
            note = ""
            if cap is not None and idx.shape[0] > cap:
                vals = lg[idx[:, 0], idx[:, 1], idx[:, 2]]
                keep = torch.topk(vals, cap).indices.sort().values
                note = f"occupancy capped from {idx.shape[0]} to {cap} voxels (decode.max_structure_voxels)"
                idx = idx[keep]
            if idx.shape[0] == 0:
                note = "empty occupancy (no SS decoder logit > 0): nothing to decode"
            coords.append(idx.int())
            notes.append(note)
        return coords, notes

    @torch.no_grad()
    def sample_latent(self, cond: Tensor, coords: list[Tensor],
                      generator: "torch.Generator | list[torch.Generator]",
                      sampler: StageSampler | None = None) -> SparseTensor:
        """cond [1, T, C] (or one per sample), per-sample coords (all non-empty) -> de-normalised SLat, one batch
        entry per sample; noise as `sparse_noise` draws it."""
        s = sampler or self.cfg.slat
        flow = self.models["slat_flow"]
        noise = sparse_noise(coords, flow.in_channels, generator, self.device)
        cond_k = cond if cond.shape[0] == len(coords) else cond.expand(len(coords), *cond.shape[1:])
        z = self.sampler.sample(flow, noise, cond_k, torch.zeros_like(cond_k), steps=s.steps,
                                rescale_t=s.rescale_t, cfg_strength=s.cfg_strength,
                                cfg_interval=tuple(s.cfg_interval))
        return denormalize_slat(z, self.slat_mean, self.slat_std)

    def chunks(self, slat: SparseTensor) -> list[list[int]]:
        """Groups of whole samples holding at most decode.max_voxels_per_chunk voxels (at least one sample)."""
        return sample_groups(slat.counts.tolist(), self.cfg.decode.max_voxels_per_chunk)

    @torch.no_grad()
    def decode_gaussians(self, slat: SparseTensor) -> list[Gaussians]:
        return decode_gaussians(self.models["slat_decoder_gs"], slat, self.cfg.decode.max_voxels_per_chunk)

    @torch.no_grad()
    def decode_meshes(self, slat: SparseTensor) -> list:
        dec, parts, out = self.models["slat_decoder_mesh"], sparse_unbind(slat), []
        resolution = dec.resolution * 4
        for group in self.chunks(slat):
            h = dec(sparse_cat([parts[i] for i in group]))
            for sl in h.layout:
                m = mesh_from_decoder_output(h.coords[sl][:, 1:], h.feats[sl], resolution)
                out.append(MeshData(m.vertices.cpu(), m.faces.cpu(),
                                    None if m.attributes is None else m.attributes.cpu()))
            del h  # the 4×-resolution decoder output is the largest tensor of the chain
        return out

    # ---- everything --------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, image, num_samples: int | None = None, seed: int | None = None,
            formats: list[str] | None = None, ss: StageSampler | None = None,
            slat: StageSampler | None = None) -> Generation:
        """One input image (PIL / array / bytes, or an already preprocessed [3, S, S] tensor) -> `num_samples`
        samples in one batch. `ss` / `slat` override the config's samplers for this call."""
        k = num_samples or self.cfg.num_samples
        formats = formats or self.cfg.decode.formats
        ss, slat_s = ss or self.cfg.ss, slat or self.cfg.slat
        timer = StageTimer(self.device)
        with timer("preprocess"):
            img = image if isinstance(image, Tensor) else preprocess_image(image, self.cfg.image_size,
                                                                           self.cfg.alpha_threshold)
        with timer("condition"):
            cond = self.condition(img.unsqueeze(0))
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed if seed is None else seed)
        with timer("ss_flow"):
            z = self.sample_structure(cond, k, generator, ss)
        with timer("ss_decode"):
            coords, notes = self.decode_structure(z)
        resolution = self.occupancy_resolution()
        samples = [GeneratedSample(coords=c.cpu(), note=n) for c, n in zip(coords, notes)]
        if self.cfg.decode.occupancy_mesh:
            with timer("occupancy_mesh"):
                for smp in samples:
                    smp.occupancy_mesh = occupancy_mesh(smp.coords, resolution)
        live = [i for i, c in enumerate(coords) if c.shape[0] > 0]
        if live:
            with timer("slat_flow"):
                latent = self.sample_latent(cond, [self.to_slat_grid(coords[i]) for i in live], generator, slat_s)
            if "gaussians" in formats:
                with timer("decode_gaussians"):
                    for i, g in zip(live, self.decode_gaussians(latent)):
                        samples[i].gaussians = g
            if "mesh" in formats:
                with timer("decode_mesh"):
                    for i, m in zip(live, self.decode_meshes(latent)):
                        samples[i].mesh = m
        return Generation(samples, {k_: round(v, 6) for k_, v in timer.seconds.items()},
                          {"ss_flow": ss.nfe(), "slat_flow": slat_s.nfe()}, img.cpu())

    def occupancy_resolution(self) -> int:
        """Side of the occupancy grid the SS decoder produces (×2 per upsampling block of the latent grid, or an
        occupancy probe's upsampling factor)."""
        dec = self.models["ss_decoder"]
        if isinstance(dec, OccupancyProbe):
            return self.models["ss_flow"].resolution * dec.upsample
        ups = sum(1 for b in dec.blocks if type(b).__name__ == "UpsampleBlock3d")
        return self.models["ss_flow"].resolution * 2 ** ups

    def to_slat_grid(self, coords: Tensor) -> Tensor:
        """Occupied cells [N, 3] of the occupancy grid -> voxels of the SLat flow's grid: the same cells for
        TRELLIS's 64³ decoder; for a coarser decoder (a 16³ probe) each cell's centre voxel, so that the SLat
        stage and its Gaussians stay where the shape is."""
        r = self.models["slat_flow"].resolution // self.occupancy_resolution()
        return coords if r <= 1 else coords * r + r // 2

    def warmup(self, image, num_samples: int | None = None) -> None:
        """One untimed pass with 1 step per stage and the same batch shape (kernels, caches, allocator)."""
        one = StageSampler(steps=1, cfg_strength=0.0, cfg_interval=[0.0, 1.0], rescale_t=1.0)
        self.run(image, num_samples=num_samples, ss=one, slat=one)


def sparse_noise(coords: list[Tensor], channels: int, generator: "torch.Generator | list[torch.Generator]",
                 device: torch.device) -> SparseTensor:
    """Standard-normal SLat noise on per-sample voxel coordinates [N_i, 3], one batch entry per sample: drawn
    from one generator for the whole batch, or sample i from `generator[i]` (noise that does not depend on which
    samples share the batch)."""
    batch = torch.cat([torch.cat([torch.full((c.shape[0], 1), i, dtype=torch.int32, device=c.device), c.int()], 1)
                       for i, c in enumerate(coords)]).to(device)
    if isinstance(generator, torch.Generator):
        feats = torch.randn((batch.shape[0], channels), generator=generator, device=generator.device)
    else:
        feats = torch.cat([torch.randn((c.shape[0], channels), generator=g, device=g.device)
                           for c, g in zip(coords, generator)])
    return SparseTensor(feats.to(device), batch, batch_size=len(coords))


def denormalize_slat(z: SparseTensor, mean: Tensor, std: Tensor) -> SparseTensor:
    """A sampled (normalised) SLat -> the decoders' latent space: feats * std + mean, per channel."""
    return z.replace(z.feats.float() * std.to(z.feats.device) + mean.to(z.feats.device))


def sample_groups(counts: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of whole samples holding at most `budget` voxels (at least one sample per group)."""
    groups, cur, n = [], [], 0
    for i, c in enumerate(counts):
        if cur and n + c > budget:
            groups.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += c
    if cur:
        groups.append(cur)
    return groups


@torch.no_grad()
def decode_gaussians(decoder: nn.Module, slat: SparseTensor, max_voxels_per_chunk: int) -> list[Gaussians]:
    """A de-normalised SLat batch -> per sample its float32 CPU Gaussians, decoded over groups of whole samples
    holding at most `max_voxels_per_chunk` voxels (decoding, not sampling, bounds the memory)."""
    parts, out = sparse_unbind(slat), []
    for group in sample_groups(slat.counts.tolist(), max_voxels_per_chunk):
        out.extend(_gaussians_to_float(g) for g in decoder(sparse_cat([parts[i] for i in group])))
    return out


def _gaussians_to_float(g: Gaussians) -> Gaussians:
    return Gaussians(xyz=g.xyz.float().cpu(), features_dc=g.features_dc.float().cpu(),
                     scaling=g.scaling.float().cpu(), rotation=g.rotation.float().cpu(),
                     opacity=g.opacity.float().cpu(), scaling_bias=g.scaling_bias, opacity_bias=g.opacity_bias,
                     filter_3d=g.filter_3d)


def check_compatible(models: dict[str, nn.Module], conditioner: ImageConditioner, slat_mean: Tensor) -> None:
    """One readable error for models that cannot work together (instead of a shape error mid-run)."""
    problems = []
    for slot in ("ss_flow", "slat_flow"):
        cond_in = models[slot].blocks[0].cross_attn.to_kv.in_features   # keys/values come from the condition
        if cond_in != conditioner.channels:
            problems.append(f"{slot} expects {cond_in}-channel condition tokens, DINOv2 gives {conditioner.channels}")
    ssf, ssd = models["ss_flow"], models["ss_decoder"]
    if ssf.out_channels != ssd.latent_channels:
        problems.append(f"ss_flow makes {ssf.out_channels}-channel latents, ss_decoder takes {ssd.latent_channels}")
    lat = models["slat_flow"].out_channels
    for slot in ("slat_decoder_gs", "slat_decoder_mesh"):
        if models[slot].latent_channels != lat:
            problems.append(f"{slot} takes {models[slot].latent_channels}-channel latents, slat_flow makes {lat}")
    if slat_mean.numel() != lat:
        problems.append(f"slat_normalization has {slat_mean.numel()} channels, slat_flow makes {lat}")
    if problems:
        raise ValueError("incompatible models: " + "; ".join(problems))
