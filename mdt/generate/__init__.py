"""Image -> 3D: TRELLIS's image-to-3D chain with any mix of teacher / student flow models per stage.

    cfg = load_config(GenerateConfig, "demo", prefix="generate_")          # jobs/configs/generate_demo.yaml
    pipe = ImageTo3D.from_config(cfg)                                       # loads (or creates tiny) models
    gen = pipe.run(load_image("cat.png"), num_samples=2, seed=42)          # -> Generation (per-stage timings)
    gen.samples[0].gaussians, gen.samples[0].mesh, gen.samples[0].coords
    report = generate(cfg, ["cat.png"], "outputs/gen")                     # all of it, files written per input

The chain (TRELLIS's `TrellisImageTo3DPipeline` and its `pipeline.json`): condition image (alpha crop / centring, premultiplied on black) -> DINOv2
tokens -> SS flow (dense 16³×8 latent, Euler + CFG on an interval) -> SS decoder -> occupied voxels = logits > 0
-> SLat flow on those coordinates (normalised latent, de-normalised after sampling) -> Gaussian decoder and mesh
decoder (-> FlexiCubes). `num_samples` samples per image run as one batch in every stage; decoding and mesh
extraction run over groups of whole samples holding at most `decode.max_voxels_per_chunk` voxels at a time.

Functions and classes (stable API):
* `GenerateConfig` (+ `StageSampler`, `GenerateModels`, `DecodeConfig`, `PreviewConfig`): the config tree,
  presets `jobs/configs/generate_<name>.yaml`.
* `resolve_model_paths(cfg) -> dict[slot, ModelSource]`: which checkpoint each slot uses and where it came from
  (the preset / an override, a TRELLIS `pipeline.json`, or a random-weight tiny model created by this run).
* `ImageTo3D.from_config(cfg)`; `with_flows(ss_flow=, slat_flow=)` (same decoders, other flows); methods
  `condition`, `sample_structure`, `decode_structure`, `sample_latent`, `decode_gaussians`, `decode_meshes`,
  `run` (one image -> `Generation`), `warmup`, `occupancy_resolution`.
* `load_image(path)`, `preprocess_image(image, size)`: hostile-input-safe loading and TRELLIS's crop.
* `Generation` / `GeneratedSample`: what `run` returns (coords, Gaussians, mesh, occupancy mesh, timings, NFE).
* `write_sample_files`, `write_previews`: the per-input files; `generate(cfg, images, output)`: the whole job.
* `save_tiny_model(slot, path, cond_channels)`, `write_trellis_repo(dir)`: random-weight models of the real
  architectures (TRELLIS's five slots and TRELLIS.2's flows); they live in `mdt.models.zoo`, re-exported here.
* TRELLIS.2 (docs/trellis2.md): `Trellis2GenerateConfig` (presets `generate_trellis2*.yaml`, `family: trellis2`),
  `Trellis2ImageTo3D` (image -> SS latent -> occupancy -> shape latent -> texture latent; the latents are not
  decoded: TRELLIS.2's VAEs need CUDA-only extensions; `from_config(cfg, slots=SLOTS_STRUCTURE)` loads the chain up
  to the occupancy only), `generate_trellis2(cfg, images, output)`.

Modules: `config` (the config tree), `sources` (model-source resolution), `images` (image I/O), `chain`
(`ImageTo3D`), `job` (`generate`: the file-writing driver), `trellis2` (TRELLIS.2's chain); random-weight
models: `mdt.models.zoo`. Every name above is importable from `mdt.generate`.
"""
from __future__ import annotations

from mdt.generate.chain import (GeneratedSample, Generation, ImageTo3D, StageTimer, check_compatible, decode_gaussians,
                                denormalize_slat, pick_device, sample_groups, sparse_noise)
from mdt.generate.config import FORMATS, DecodeConfig, GenerateConfig, GenerateModels, PreviewConfig, StageSampler
from mdt.generate.images import (MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, check_image, load_image, load_image_bytes,
                                 preprocess_image)
from mdt.generate.job import generate, safe_name, sample_point_clouds, write_previews, write_sample_files
from mdt.generate.sources import (TINY_EARLIER, TINY_NOW, ModelSource, check_checkpoint_arg, checkpoint_exists,
                                  ensure_tiny_models, looks_like_hub_path, read_pipeline_json, resolve_model_paths)
from mdt.generate.trellis2 import (SLOTS_STRUCTURE, GuidanceSampler, Trellis2GenerateConfig, Trellis2Generation,
                                   Trellis2ImageTo3D, Trellis2Models, Trellis2Sample, ensure_tiny_trellis2,
                                   generate_trellis2, max_pool_occupancy, resolve_trellis2_paths,
                                   write_trellis2_latents)
from mdt.models.zoo import (PIPELINE_KEYS, SLOTS, TINY_OCCUPANCY, TRELLIS2_LATENT_CHANNELS, TRELLIS2_SLOTS,
                            TRELLIS_SLAT_MEAN, TRELLIS_SLAT_STD, TRELLIS_STEMS, full_size_model_args, save_tiny_model,
                            tiny_model_args, tiny_trellis2_args, write_trellis2_repo, write_trellis_repo)

__all__ = ['FORMATS', 'StageSampler', 'GenerateModels', 'DecodeConfig', 'PreviewConfig', 'GenerateConfig', 'TINY_NOW',
           'TINY_EARLIER', 'ModelSource', 'checkpoint_exists', 'looks_like_hub_path', 'check_checkpoint_arg',
           'read_pipeline_json', 'resolve_model_paths', 'ensure_tiny_models', 'MAX_IMAGE_PIXELS', 'MAX_IMAGE_BYTES',
           'load_image', 'load_image_bytes', 'check_image', 'preprocess_image', 'GeneratedSample', 'Generation',
           'StageTimer', 'pick_device', 'ImageTo3D', 'sparse_noise', 'denormalize_slat', 'sample_groups',
           'decode_gaussians', 'check_compatible', 'sample_point_clouds', 'write_sample_files', 'write_previews',
           'safe_name', 'generate', 'SLOTS_STRUCTURE', 'GuidanceSampler', 'Trellis2Models',
           'Trellis2GenerateConfig', 'resolve_trellis2_paths', 'ensure_tiny_trellis2', 'Trellis2Sample',
           'Trellis2Generation', 'max_pool_occupancy', 'Trellis2ImageTo3D', 'write_trellis2_latents', 'generate_trellis2', 'SLOTS',
           'PIPELINE_KEYS', 'TRELLIS2_SLOTS', 'TRELLIS2_LATENT_CHANNELS', 'TINY_OCCUPANCY', 'TRELLIS_STEMS',
           'TRELLIS_SLAT_MEAN', 'TRELLIS_SLAT_STD', 'tiny_model_args', 'full_size_model_args', 'save_tiny_model',
           'write_trellis_repo', 'tiny_trellis2_args', 'write_trellis2_repo']
