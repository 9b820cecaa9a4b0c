"""Data-free training shards: condition images in, teacher samples out (Ray Data batch inference).

    images (local:/s3:/manifest: folders, shards:<dir>) -> K rows per image (driver) -> resume filter
    -> map(StageRunner(Synthesize)): read + check the image, TRELLIS's condition preprocessing, conditioner,
       SS teacher (its own sampler settings) -> SS decoder -> occupied voxels -> SLat teacher
       (family trellis2: DINOv3, TRELLIS.2's SS flow -> TRELLIS's SS decoder -> occupied 64³ voxels, no SLat)
    -> map_batches(ShardWriter): one shard row per (image, sample) in the shard schema + provenance columns

The graph, ledger, resume, failures-as-data, manifest and report are the preprocessing job's
(``pipelines.preprocess.driver.run`` with this module's lister and the ``synthesize`` stage). A row's ``x0`` is the teacher's
own many-step sample for its condition, so `jobs/distill.py --data <output>` trains on it unchanged.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

from mdt.generate import SLOTS_STRUCTURE, GuidanceSampler, StageSampler, Trellis2GenerateConfig, Trellis2ImageTo3D
from mdt.generate import Trellis2Models, ensure_tiny_trellis2, resolve_trellis2_paths
from mdt.config import ConfigError
from mdt.models.zoo import ensure_tiny_dino
from mdt.training.teacher_data import SHARD_RESOLUTION
from pipelines.common import storage
from pipelines.preprocess.config import PreprocessConfig, StageResources, join_uri
from types import SimpleNamespace
import io
from dataclasses import asdict
from mdt.generate import DecodeConfig, GenerateConfig, GenerateModels
from mdt.generate import checkpoint_exists, ensure_tiny_models, looks_like_hub_path, resolve_model_paths
from mdt.training.build import ensure_tiny_conditioner
from pipelines.common import cluster
from pipelines.preprocess import driver as graph
import pyarrow.parquet as pq
from pipelines.preprocess.shards import SLAT_CHANNELS, shard_files
import torch
from mdt.generate import ImageTo3D
from mdt.conditioning import alpha_bbox
from mdt.generate import load_image_bytes, preprocess_image
import numpy as np
from PIL import Image
from mdt.conditioning import encode_image
from pipelines.preprocess.rows import pack_array
from pipelines.preprocess.ledger import WRITE_STAGE, Ledger

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("png", "jpg", "jpeg", "webp")
BLANK_CONDITION = "blank condition"
NO_ALPHA_NOTE = "no alpha channel: the whole image is the condition (no background removal is shipped)"
SHARDS_PREFIX = "shards:"
SHARD_IMAGE_URI = "shard-image://"  # shard-image://<shard file>#<sha256> : the asset's first condition view
FAMILIES = ("trellis", "trellis2")


@dataclass
class SynthesizeSection:
    """The teacher chain and how it samples. Sampler defaults: TRELLIS-image-large's pipeline.json (25 Euler steps,
    CFG 5.0 on t in [0.5, 1], rescale_t 3, both stages; /work/shared/docs/trellis-reference.md §2).

    `family: trellis2`: TRELLIS.2's SS flow (`teacher`, conditioned on DINOv3 `dinov3`) sampled with
    `ss_guidance` (default: TRELLIS.2's released SS settings, docs/trellis2.md), TRELLIS's SS decoder
    (`ss_decoder`) -> the occupied voxels of its 64³ grid. No SLat stage: `slat_feats` are zeros and `slat`,
    `slat_teacher`, `pipeline`, `dinov2`, `slat_normalization` are not used; TRELLIS.2's shape and texture stages
    sample their own latents on the rows' coordinates (`jobs/distill.py --preset trellis2-shape`)."""

    family: str = "trellis"                  # trellis | trellis2
    teacher: str | None = None               # SS flow `<dir>/<stem>` (None: the pipeline's)
    slat_teacher: str | None = None          # SLat flow (None: the pipeline's, or a tiny one with tiny_models)
    ss_decoder: str | None = None            # SS decoder or occupancy probe (None: the pipeline's, or a tiny one)
    pipeline: str | None = None              # TRELLIS repo (HF id / dir): decoders, DINOv2, SLat normalisation
    dinov2: str | None = None
    dinov3: str | None = None                # trellis2: the conditioner (HF id / dir)
    tiny_models: str | None = None           # CPU presets: missing slots become random-weight tiny models here
    tiny_hidden_size: int = 32               # width of a tiny DINOv2 created at `dinov2` (the teacher's cond width)
    samples_per_image: int = 1               # K teacher samples (rows) per condition image
    seed: int = 0                            # sample k of image h draws its noise from sha256(seed:h:k)
    ss: StageSampler = field(default_factory=StageSampler)
    slat: StageSampler = field(default_factory=StageSampler)
    ss_guidance: GuidanceSampler = field(default_factory=lambda: Trellis2GenerateConfig().ss)  # trellis2
    image_size: int = 518                    # conditioner input side; also the stored condition image
    alpha_threshold: float = 204.0           # TRELLIS inference crop: bbox of alpha > 0.8·255
    slat_normalization: dict | None = None   # {mean, std}; None: the pipeline's
    max_structure_voxels: int | None = None  # cap on occupied voxels per sample (highest decoder logits kept)
    device: str = "auto"
    precision: str = "auto"
    torch_threads: int | None = None
    max_image_bytes: int = 64 * 1024 * 1024
    # Filled on the driver by `prepare` (part of the config hash: another teacher file is another dataset).
    teacher_sha256: str | None = None
    slat_teacher_sha256: str | None = None


@dataclass
class SynthesizeConfig(PreprocessConfig):
    extra_output_sections: ClassVar[tuple[str, ...]] = ("synthesize",)

    output: str = "outputs/synthesize"
    stages: list[str] = field(default_factory=lambda: ["synthesize"])
    resources: dict[str, StageResources] = field(default_factory=lambda: {
        "synthesize": StageResources(concurrency=1, num_cpus=1),
        "write": StageResources(concurrency=1, num_cpus=0.25)})
    synthesize: SynthesizeSection = field(default_factory=SynthesizeSection)


# ------------------------------------------------------------------------------------------------ driver


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_sha256(stem: str) -> str:
    """sha256 of a TRELLIS checkpoint's weights file `<stem>.safetensors` (hub paths: the cached download)."""
    local = f"{stem}.safetensors"
    if os.path.isfile(local):
        return file_sha256(local)

    if not looks_like_hub_path(stem):
        raise FileNotFoundError(f"checkpoint {stem}: no {local}")
    from huggingface_hub import hf_hub_download  # heavy: huggingface_hub

    repo = "/".join(stem.split("/")[:2])
    return file_sha256(hf_hub_download(repo, "/".join(stem.split("/")[2:]) + ".safetensors"))


def generate_config(s: SynthesizeSection):
    """The image -> 3-D chain's config (mdt.generate) for the synthesis teachers."""

    return GenerateConfig(
        models=GenerateModels(pipeline=s.pipeline, dinov2=s.dinov2, ss_flow=s.teacher, slat_flow=s.slat_teacher,
                              ss_decoder=s.ss_decoder, tiny_models=s.tiny_models),
        ss=s.ss, slat=s.slat, image_size=s.image_size, alpha_threshold=s.alpha_threshold,
        slat_normalization=s.slat_normalization, device=s.device, precision=s.precision,
        decode=DecodeConfig(formats=[], max_structure_voxels=s.max_structure_voxels))


def trellis2_config(s: SynthesizeSection) -> Trellis2GenerateConfig:
    """TRELLIS.2's chain config (mdt.generate.trellis2) up to the occupancy, for the trellis2 family."""
    return Trellis2GenerateConfig(
        models=Trellis2Models(dinov3=s.dinov3, ss_flow=s.teacher, ss_decoder=s.ss_decoder, tiny_models=s.tiny_models),
        ss=s.ss_guidance, image_size=s.image_size, alpha_threshold=s.alpha_threshold,
        max_structure_voxels=s.max_structure_voxels, device=s.device, torch_threads=s.torch_threads,
        occupancy_mesh=False, warmup=False)


def prepare(cfg: SynthesizeConfig) -> SynthesizeConfig:
    """Driver, before Ray: absolute paths, the sources checked, tiny models written, the teachers resolved and
    hashed. ValueError / FileNotFoundError for a bad argument (a relative output under `ray job submit`
    included); the tiny models it creates go under the output there, not into the job's temporary copy."""


    s = cfg.synthesize
    cluster.durable_output(cfg.output, "--output")
    if s.family not in FAMILIES:
        raise ValueError(f"synthesize.family must be one of {', '.join(FAMILIES)}, got {s.family!r}")
    if s.family == "trellis2":
        try:
            trellis2_config(s).validate(SLOTS_STRUCTURE)
        except ConfigError as e:
            raise ValueError(f"synthesize.ss_guidance: {e}") from e
        if s.slat_teacher:
            raise ValueError("--slat-teacher: the trellis2 family samples no SLat (its shape and texture stages "
                             "sample their latents in the distillation job)")
    else:
        generate_config(s).validate()
    if s.samples_per_image < 1:
        raise ValueError(f"synthesize.samples_per_image must be >= 1, got {s.samples_per_image}")
    if cfg.stages != ["synthesize"]:
        raise ValueError(f"stages must be [synthesize], got {cfg.stages}")
    if not cfg.sources.specs:
        raise ValueError("no image source: pass --source local:<dir> | s3://... | manifest:<csv> | shards:<dir>")
    for spec in cfg.sources.specs:
        check_source_spec(spec)
    graph.check_batching(cfg)
    graph.absolutize_paths(cfg)
    fix = cluster.resolve_local_path
    s.tiny_models = cluster.created_model_path(s.tiny_models, cfg.output)
    for name in ("pipeline", "dinov2"):  # a name not on disk stays: a hub id
        setattr(s, name, fix(getattr(s, name), must_exist=True))
    s.teacher = fix(s.teacher, must_exist=True)
    s.slat_teacher = fix(s.slat_teacher, must_exist=True)
    s.ss_decoder = fix(s.ss_decoder, must_exist=True)
    if s.ss_decoder and not looks_like_hub_path(s.ss_decoder) and not checkpoint_exists(s.ss_decoder):
        raise FileNotFoundError(f"synthesize.ss_decoder {s.ss_decoder}: no such checkpoint")
    for name, stem in (("--teacher", s.teacher), ("--slat-teacher", s.slat_teacher)):
        if stem and "://" not in stem and os.path.isabs(stem) and not os.path.isfile(f"{stem}.safetensors"):
            raise FileNotFoundError(f"{name} {stem}: no {stem}.safetensors")
    if s.family == "trellis2":
        return prepare_trellis2(cfg)
    if s.tiny_models and s.dinov2:  # CPU presets name a local directory, created here when missing
        s.dinov2 = cluster.created_model_path(s.dinov2, cfg.output)
        ensure_tiny_conditioner(SimpleNamespace(tiny=True, model=s.dinov2, tiny_hidden_size=s.tiny_hidden_size))
    gcfg = generate_config(s)
    sources, _ = resolve_model_paths(gcfg)
    ensure_tiny_models(sources, gcfg)  # once, here: every actor then loads the same files
    s.teacher, s.slat_teacher = sources["ss_flow"].path, sources["slat_flow"].path
    s.dinov2 = sources["dinov2"].path
    s.teacher_sha256 = checkpoint_sha256(s.teacher)
    s.slat_teacher_sha256 = checkpoint_sha256(s.slat_teacher)
    return cfg


def prepare_trellis2(cfg: SynthesizeConfig) -> SynthesizeConfig:
    """`prepare`'s model part for the trellis2 family: DINOv3 (a tiny one created at `dinov3` on CPU presets), the
    SS flow and SS decoder resolved (tiny ones written once under `tiny_models`), the SS teacher hashed."""
    s = cfg.synthesize
    s.dinov3 = cluster.resolve_local_path(s.dinov3, must_exist=True)  # a name not on disk stays: a hub id
    if s.tiny_models and s.dinov3:
        s.dinov3 = cluster.created_model_path(s.dinov3, cfg.output)
        ensure_tiny_dino(s.dinov3, "dinov3", s.tiny_hidden_size)
    tcfg = trellis2_config(s)
    sources = resolve_trellis2_paths(tcfg, SLOTS_STRUCTURE)
    ensure_tiny_trellis2(sources, tcfg)  # once, here: every actor then loads the same files
    s.teacher, s.ss_decoder, s.dinov3 = (sources[k].path for k in ("ss_flow", "ss_decoder", "dinov3"))
    s.teacher_sha256 = checkpoint_sha256(s.teacher)
    s.slat_teacher = s.slat_teacher_sha256 = None
    return cfg


def check_source_spec(text: str) -> None:
    """ValueError unless `text` is an image source this job reads (local:, s3:, manifest:, shards:)."""
    from pipelines.preprocess.sources import parse_spec  # heavy: ray, requests

    if text.startswith(SHARDS_PREFIX):
        if not text[len(SHARDS_PREFIX):]:
            raise ValueError("source shards: needs a directory (a preprocessing output)")
        return
    spec = parse_spec(text)
    if spec.kind not in ("local", "s3", "folder", "manifest"):
        raise ValueError(f"source {text!r}: synthesize reads images from local:, s3:, manifest: or shards: sources")
    if spec.kind in ("local", "folder") and "://" not in spec.arg and not os.path.isdir(os.path.expanduser(spec.arg)):
        raise FileNotFoundError(f"source {text!r}: no such folder")


def list_image_rows(cfg: SynthesizeConfig) -> tuple[list[dict], dict]:
    """K source rows per condition image (file_identifier `<image id>#<k>`), de-duplicated by uri."""
    from pipelines.preprocess.download import mesh_format  # heavy: ray, requests
    from pipelines.preprocess.sources import ListingHints, build_source  # heavy: ray, requests

    stats: Counter = Counter()
    out, seen = [], set()
    k_max = cfg.synthesize.samples_per_image
    for text in cfg.sources.specs:
        if text.startswith(SHARDS_PREFIX):
            rows = shard_image_rows(text[len(SHARDS_PREFIX):], cfg)
        else:
            rows = build_source(text, cfg, ListingHints(file_types=set(IMAGE_FORMATS))).rows()
        for row in rows:
            stats["listed"] += 1
            if not row["uri"].startswith(SHARD_IMAGE_URI) and mesh_format(row["uri"]) not in IMAGE_FORMATS:
                stats["dropped_file_type"] += 1
                continue
            if row["uri"] in seen:
                stats["dropped_duplicate"] += 1
                continue
            seen.add(row["uri"])
            if cfg.filter.limit is not None and stats["images"] >= cfg.filter.limit:
                break
            stats["images"] += 1
            prov = json.loads(row["provenance"] or "{}")
            for k in range(k_max):
                out.append({**row, "file_identifier": f"{row['file_identifier']}#{k}",
                            "provenance": json.dumps({**prov, "sample": k}, sort_keys=True)})
    stats["rows"] = len(out)
    return out, dict(stats)


def shard_image_rows(directory: str, cfg: SynthesizeConfig):
    """One source row per asset of committed shards (its first stored condition view)."""


    from pipelines.preprocess.sources import make_row  # heavy: ray, requests
    from pipelines.preprocess.sources.base import to_uri  # heavy: ray, requests

    files = shard_files(to_uri(directory), cfg.storage)
    if not files:
        raise FileNotFoundError(f"source shards:{directory}: no committed shards there")
    for f in files:
        t = pq.read_table(io.BytesIO(storage.read_bytes(f, cfg.storage)), columns=["sha256", "license"])
        for r in t.to_pylist():
            yield make_row(source="shards", file_identifier=r["sha256"], uri=f"{SHARD_IMAGE_URI}{f}#{r['sha256']}",
                           license=r["license"])


# ------------------------------------------------------------------------------------------------ stage


class BlankCondition(ValueError):
    pass


def sample_seed(seed: int, source_sha256: str, k: int) -> int:
    """The noise seed of sample k of an image: independent of which actor, batch or run draws it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{source_sha256}:{k}".encode()).digest()[:4], "little")


def sampler_json(s: SynthesizeSection) -> str:
    if s.family == "trellis2":
        return json.dumps({"family": "trellis2",
                           "ss": {"teacher": s.teacher, "teacher_sha256": s.teacher_sha256, **asdict(s.ss_guidance)},
                           "ss_decoder": s.ss_decoder, "conditioner": s.dinov3,
                           "coordinates": f"SS decoder logits > 0 on its {SHARD_RESOLUTION}^3 grid",
                           "max_structure_voxels": s.max_structure_voxels,
                           "image_size": s.image_size, "alpha_threshold": s.alpha_threshold,
                           "samples_per_image": s.samples_per_image}, sort_keys=True)
    return json.dumps({"ss": {"teacher": s.teacher, "teacher_sha256": s.teacher_sha256, **asdict(s.ss)},
                       "slat": {"teacher": s.slat_teacher, "teacher_sha256": s.slat_teacher_sha256,
                                **asdict(s.slat)},
                       "image_size": s.image_size, "alpha_threshold": s.alpha_threshold,
                       "samples_per_image": s.samples_per_image}, sort_keys=True)


class Synthesize:
    """Stage: one (image, k) row -> the teacher's k-th sample for that image (models loaded once per actor)."""

    name = "synthesize"
    outputs = ("ss_latent", "slat_coords", "slat_feats", "cond_images", "asset_checks", "teacher_sha256",
               "sampler", "seed", "source_sha256")
    resources = {"concurrency": 1, "num_cpus": 1}

    def __init__(self, cfg: SynthesizeConfig):


        self.cfg, self.s = cfg, cfg.synthesize
        if self.s.torch_threads:
            torch.set_num_threads(self.s.torch_threads)
        self.trellis2 = self.s.family == "trellis2"
        self.pipe = Trellis2ImageTo3D.from_config(trellis2_config(self.s), SLOTS_STRUCTURE) if self.trellis2 \
            else ImageTo3D.from_config(generate_config(self.s))
        self.sampler = sampler_json(self.s)

    def read_image_bytes(self, uri: str) -> bytes:
        """Only the image's own bytes, at most `max_image_bytes` of them."""
        cap = self.s.max_image_bytes
        if uri.startswith(SHARD_IMAGE_URI):


            f, sha = uri[len(SHARD_IMAGE_URI):].rsplit("#", 1)
            t = pq.read_table(io.BytesIO(storage.read_bytes(f, self.cfg.storage)), columns=["sha256", "cond_images"],
                              filters=[("sha256", "==", sha)])
            views = t.column("cond_images").to_pylist()[0] if t.num_rows else None
            if not views:
                raise ValueError("the asset has no condition image in its shard")
            return bytes(views[0])
        size = storage.size(uri, self.cfg.storage)
        if size is None or size > cap:
            raise ValueError(f"{size} bytes is more than the {cap} accepted (synthesize.max_image_bytes)")
        return storage.read_bytes(uri, self.cfg.storage)

    def __call__(self, row: dict) -> dict:
        out = self.call_batch([row])[0]
        if isinstance(out, Exception):
            raise out
        row.update(out)
        return row

    def prepare_row(self, row: dict) -> dict:
        """Read and check one (image, k) row -> its preprocessed condition image, seed and notes."""

        data = self.read_image_bytes(row["uri"])
        src_sha = hashlib.sha256(data).hexdigest()
        image = load_image_bytes(data, row["file_identifier"].rsplit("#", 1)[0])
        checks = {}
        if image.mode == "RGBA":
            if alpha_bbox(image, self.s.alpha_threshold) is None:
                raise BlankCondition(f"{BLANK_CONDITION}: no pixel with alpha > {self.s.alpha_threshold:g}")
        else:
            checks["alpha"] = NO_ALPHA_NOTE
        k = int(json.loads(row["provenance"] or "{}").get("sample", 0))
        return {"src_sha": src_sha, "seed": sample_seed(self.s.seed, src_sha, k), "checks": checks,
                "x": preprocess_image(image, self.s.image_size, self.s.alpha_threshold)}          # [3, S, S]

    def call_batch(self, rows: list[dict]) -> list:
        """Rows -> per row its outputs (dict) or the Exception it failed with. One conditioner forward for the
        batch's distinct images, then each teacher stage as one batched forward per sampler step; sample i draws
        its noise from its own generator (seeded `sample_seed`), so a row's sample does not depend on the batch."""
        out: list = [None] * len(rows)
        prep = {}
        for i, row in enumerate(rows):
            try:
                prep[i] = self.prepare_row(row)
            except Exception as e:  # an unreadable or blank image fails alone
                out[i] = e
        if prep:
            for i, res in self.sample(rows, prep).items():
                out[i] = res
        return out

    def sample(self, rows: list[dict], prep: dict[int, dict]) -> dict[int, object]:


        pipe, idx = self.pipe, list(prep)
        images = {}                                                     # distinct images: one conditioner pass
        for i in idx:
            images.setdefault(prep[i]["src_sha"], len(images))
        firsts = {v: next(i for i in idx if prep[i]["src_sha"] == sha) for sha, v in images.items()}
        x = torch.stack([prep[firsts[v]]["x"] for v in range(len(images))])
        cond_u = pipe.condition(x)                                                      # [U, T, C]
        cond = cond_u[torch.tensor([images[prep[i]["src_sha"]] for i in idx], device=cond_u.device)]
        gens = [torch.Generator(pipe.device).manual_seed(prep[i]["seed"]) for i in idx]
        if self.trellis2:
            z = pipe.sample_structure(cond, gens)                                      # [B, 8, 16, 16, 16]
            coords, notes = pipe.occupied(z, SHARD_RESOLUTION)                         # the decoder's 64³ grid
        else:
            z = pipe.sample_structure(cond, len(idx), gens)
            coords, notes = pipe.decode_structure(z)
        res: dict[int, object] = {}
        live = []
        for j, i in enumerate(idx):
            if coords[j].shape[0] == 0:
                res[i] = ValueError(notes[j])
            else:
                live.append(j)
                if notes[j]:
                    prep[i]["checks"]["structure"] = notes[j]
        if not live:
            return res
        if self.trellis2:  # no SLat stage: the coordinates, and zero features in the schema's SLat channels
            for j in live:
                c = coords[j].cpu().numpy().astype(np.int64)
                res[idx[j]] = self.shard_row(prep[idx[j]], z[j], c, np.zeros((len(c), SLAT_CHANNELS), np.float32))
            return res
        slat = pipe.sample_latent(cond[live], [pipe.to_slat_grid(coords[j]) for j in live], [gens[j] for j in live])
        for n, j in enumerate(live):
            sl = slat.layout[n]
            res[idx[j]] = self.shard_row(prep[idx[j]], z[j], slat.coords[sl, 1:].cpu().numpy().astype(np.int64),
                                         slat.feats[sl].float().cpu().numpy())
        return res

    def shard_row(self, p: dict, z, coords: np.ndarray, feats: np.ndarray) -> dict:
        """One sample's stage outputs: its SS latent, voxel coordinates and SLat features, condition image and
        provenance."""
        rgb = (p["x"].permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        return dict(
            sha256=hashlib.sha256(f"{p['src_sha']}:{self.s.teacher_sha256}:{self.s.slat_teacher_sha256}:"
                                  f"{p['seed']}".encode()).hexdigest(),
            ss_latent=pack_array(z.float().cpu().numpy()), slat_coords=pack_array(coords),
            slat_feats=pack_array(feats), cond_images=[encode_image(Image.fromarray(rgb, "RGB"), "png")],
            asset_checks=json.dumps(p["checks"]) if p["checks"] else None,
            teacher_sha256=self.s.teacher_sha256, sampler=self.sampler, seed=p["seed"], source_sha256=p["src_sha"])


# ------------------------------------------------------------------------------------------------ job


def run(cfg: SynthesizeConfig, resolved_config: dict | None = None):
    """The whole job (after `prepare`): the preprocessing graph with the image lister, then the synthesis
    summary (images/s, samples/s, images without alpha) in the report and `runs/<run_id>/synthesize.json`."""

    result = graph.run(cfg, resolved_config=resolved_config, lister=list_image_rows, unit="samples")
    result.report = {**(result.report or {}), "synthesize": summary(cfg, result)}
    storage.write_bytes_atomic(join_uri(graph.run_dir(cfg, result.run_id), "synthesize.json"),
                               json.dumps(result.report["synthesize"], indent=2).encode(), cfg.storage)
    return result


def summary(cfg: SynthesizeConfig, result) -> dict:
    recs = Ledger(cfg.output, result.config_hash, cfg.storage).records(result.run_id)
    done = [r for r in recs if r["stage"] == WRITE_STAGE and r["status"] == "done"]
    images = {r["file_identifier"].rsplit("#", 1)[0] for r in recs if r["file_identifier"]}
    done_images = {r["file_identifier"].rsplit("#", 1)[0] for r in done}
    no_alpha = {r["file_identifier"].rsplit("#", 1)[0] for r in done
                if r["stats"] and json.loads(r["stats"]).get("asset_checks", {}).get("alpha") == NO_ALPHA_NOTE}
    wall = max(result.wall_s, 1e-9)
    synth_s = [r["seconds"] for r in recs if r["stage"] == "synthesize" and r["status"] == "done"]
    return {"family": cfg.synthesize.family, "teacher": cfg.synthesize.teacher,
            "teacher_sha256": cfg.synthesize.teacher_sha256,
            "slat_teacher": cfg.synthesize.slat_teacher, "slat_teacher_sha256": cfg.synthesize.slat_teacher_sha256,
            "samples_per_image": cfg.synthesize.samples_per_image,
            "images_processed": len(images), "images_done": len(done_images), "samples_done": len(done),
            "images_per_s": len(done_images) / wall, "samples_per_s": len(done) / wall,
            "seconds_per_sample_mean": (sum(synth_s) / len(synth_s)) if synth_s else None,
            "images_without_alpha_used_whole": len(no_alpha)}


def to_markdown(syn: dict) -> str:
    slat = f"SLat teacher {syn['slat_teacher']} (sha256 {syn['slat_teacher_sha256']})" if syn["slat_teacher"] \
        else "no SLat stage (voxel coordinates only)"
    lines = ["## synthesis",
             f"- teacher {syn['teacher']} (sha256 {syn['teacher_sha256']}), {slat}, "
             f"{syn['samples_per_image']} sample(s) per image",
             f"- images done {syn['images_done']} of {syn['images_processed']}, samples done {syn['samples_done']}; "
             f"{syn['images_per_s']:.4f} images/s, {syn['samples_per_s']:.4f} samples/s (wall clock of this run)"]
    if syn["seconds_per_sample_mean"] is not None:
        lines.append(f"- synthesize stage {syn['seconds_per_sample_mean']:.3f} s per sample (mean; a batch's time "
                     "shared by its rows), the rest of the wall clock is Ray, actor start-up and writing")
    if syn["images_without_alpha_used_whole"]:
        lines.append(f"- {syn['images_without_alpha_used_whole']} image(s) without alpha: {NO_ALPHA_NOTE}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ distillation


def data_teachers(uri: str, storage_cfg=None) -> dict:
    """What a distillation dataset was made from: {"origin": "data-driven" | "teacher-generated" | "mixed",
    "ss": [sha256...], "slat": [sha256...]} from the shards' provenance columns."""


    ss, slat, n_gen, n_data = set(), set(), 0, 0
    for f in shard_files(uri, storage_cfg):
        fs, path = storage.filesystem(f, storage_cfg)
        pf = pq.ParquetFile(fs.open_input_file(path))  # reads the footer and the two columns only
        if "teacher_sha256" not in pf.schema_arrow.names:
            n_data += pf.metadata.num_rows
            continue
        t = pf.read(columns=["teacher_sha256", "sampler"])
        for sha, smp in zip(t.column("teacher_sha256").to_pylist(), t.column("sampler").to_pylist()):
            if sha is None:
                n_data += 1
                continue
            n_gen += 1
            ss.add(sha)
            slat.add((json.loads(smp or "{}").get("slat") or {}).get("teacher_sha256"))
    origin = "mixed" if (n_gen and n_data) else "teacher-generated" if n_gen else "data-driven"
    return {"origin": origin, "ss": sorted(ss), "slat": sorted(x for x in slat if x)}


def check_teacher(stage: str, teacher: str | None, data: dict) -> str | None:
    """The reason a student of `stage` distilled from `teacher` must not train on `data` (data_teachers), else
    None: teacher-generated targets of another teacher would teach the student that teacher's errors."""
    if data["origin"] == "data-driven" or not teacher:
        return None
    made_by = data["ss" if stage == "ss" else "slat"]
    if not made_by:
        return (f"the data holds no {stage} teacher's samples (TRELLIS.2 shards: SS latents and voxel coordinates "
                "only; the shape and texture stages sample their own with teacher_data.enabled); set "
                "data.allow_teacher_mismatch=true to distil anyway")
    try:
        mine = checkpoint_sha256(teacher)
    except (OSError, ValueError) as e:
        return f"cannot hash the teacher {teacher} to compare with the data's teacher: {e}"
    if made_by != [mine]:
        return (f"the data was generated by the {stage} teacher(s) {', '.join(x[:12] for x in made_by)} but the run's "
                f"teacher is {mine[:12]} ({teacher}); set data.allow_teacher_mismatch=true to distil anyway")
    return None


def data_tags(data: dict) -> dict[str, str]:
    """MLflow tags of a training run's data (data_teachers)."""
    return {"data_origin": data["origin"], "data_ss_teacher_sha256": ",".join(data["ss"]) or "-",
            "data_slat_teacher_sha256": ",".join(data["slat"]) or "-"}
