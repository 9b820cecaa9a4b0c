"""TRELLIS.2 generation: the README's `trellis2-demo` and `trellis2` commands as printed (tiny random-weight
models of TRELLIS.2's architectures; the second from a local hub cache by the released repository's id), the
occupancy max-pooling, the texture flow's concat_cond (the normalised shape latent) and the de-normalisation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_generate import ROOT, link_repo, readme_generation_commands, run_job


def check_latents(out: Path, nfe: dict) -> None:
    import trimesh

    z = np.load(out / "latents.npz")
    n = z["coords"].shape[0]
    assert n > 0 and z["coords"].dtype == np.int32 and z["coords"].min() >= 0 and z["coords"].max() < 32
    assert len({tuple(c) for c in z["coords"].tolist()}) == n                 # one row per voxel
    assert z["shape"].shape == (n, 32) and z["tex"].shape == (n, 32) and z["ss"].shape == (8, 16, 16, 16)
    assert np.isfinite(z["shape"]).all() and np.isfinite(z["tex"]).all()
    assert z["shape"].std() > 0.1 and z["tex"].std() > 0.1 and not np.allclose(z["shape"], z["tex"])
    assert len(trimesh.load(str(out / "occupancy.glb"), force="mesh").faces) > 0
    assert not (out / "mesh.glb").exists() and not (out / "gaussians.ply").exists()   # nothing claimed decoded
    timings = json.loads((out / "timings.json").read_text())
    assert timings["warm"] is True and timings["nfe"] == nfe


@pytest.mark.slow
def test_readme_trellis2_demo_command_runs_as_printed(tmp_path):
    cmds = [c for c in readme_generation_commands() if "--preset trellis2-demo" in c]
    assert cmds, "README's Generation section prints no trellis2-demo command"
    link_repo(tmp_path)
    for cmd in cmds:
        argv = cmd.split()
        assert argv[:2] == ["python", "jobs/generate.py"]
        res = run_job(argv[1:], cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert res.stdout.count("random-weight tiny model, created by this run") == 5   # 3 flows, SS decoder, DINOv3
        # TRELLIS.2's released settings: SS 12 steps (10 inside [0.6, 1] after rescale_t 5), shape 12 (9 inside
        # after rescale_t 3), texture w = 1 (conditional only): 22 + 21 + 12.
        check_latents(tmp_path / argv[argv.index("--output") + 1] / "mug", {"ss": 22, "shape": 21, "tex": 12})


def write_fake_trellis2_hub(cache: Path) -> None:
    """microsoft/TRELLIS.2-4B (pipeline.json + the 512 pipeline's three flows), TRELLIS-image-large's SS decoder and
    facebook/dinov3-vitl16-pretrain-lvd1689m, all tiny random weights, in a local Hugging Face cache."""
    from mdt.models.zoo import save_tiny_dinov3
    from mdt.models.zoo import TRELLIS_STEMS, save_tiny_model, write_trellis2_repo

    rev = "0" * 40
    for repo_dir, write in (
            ("models--microsoft--TRELLIS.2-4B", lambda d: write_trellis2_repo(d, cond_channels=64, seed=20)),
            ("models--microsoft--TRELLIS-image-large",
             lambda d: save_tiny_model("ss_decoder", d / "ckpts" / TRELLIS_STEMS["ss_decoder"], seed=21)),
            ("models--facebook--dinov3-vitl16-pretrain-lvd1689m",
             lambda d: save_tiny_dinov3(d, hidden_size=64, image_size=512))):
        repo = cache / repo_dir
        write(repo / "snapshots" / rev)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(rev)


@pytest.mark.slow
def test_readme_trellis2_command_loads_the_released_repository_by_hub_id(tmp_path):
    cmds = [c for c in readme_generation_commands() if "--preset trellis2 " in c]
    assert cmds, "README's Generation section prints no trellis2 command"
    cache = tmp_path / "hf"
    write_fake_trellis2_hub(cache)
    link_repo(tmp_path / "work")
    argv = cmds[0].split()
    res = run_job(argv[1:], cwd=tmp_path / "work", env_extra={"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path)},
                  timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for line in ("model ss_flow: microsoft/TRELLIS.2-4B/ckpts/ss_flow_img_dit_1_3B_64_bf16 [config]",
                 "model shape_flow: microsoft/TRELLIS.2-4B/ckpts/slat_flow_img2shape_dit_1_3B_512_bf16 [config]",
                 "model tex_flow: microsoft/TRELLIS.2-4B/ckpts/slat_flow_imgshape2tex_dit_1_3B_512_bf16 [config]",
                 "model ss_decoder: microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16 [config]",
                 "model dinov3: facebook/dinov3-vitl16-pretrain-lvd1689m [config]"):
        assert line in res.stdout, res.stdout
    check_latents(tmp_path / "work" / argv[argv.index("--output") + 1] / "mug", {"ss": 22, "shape": 21, "tex": 12})


def test_occupancy_is_the_decoder_grid_max_pooled():
    """A coarse cell is occupied iff one of its 2³ fine voxels has a logit > 0 (computed here voxel by voxel)."""
    from mdt.generate import max_pool_occupancy

    logits = torch.randn(2, 1, 8, 8, 8) - 1.5
    occ = max_pool_occupancy(logits, 4)
    expected = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
    for b, _, x, y, z in torch.nonzero(logits > 0).tolist():
        expected[b, x // 2, y // 2, z // 2] = True
    assert occ.any() and torch.equal(occ, expected)
    with pytest.raises(ValueError, match="not a multiple"):
        max_pool_occupancy(logits, 3)


def test_texture_flow_gets_the_normalised_shape_latent_and_outputs_are_denormalised(tmp_path):
    """The texture flow's concat_cond in every call is the sampled shape latent in the flow's normalised space;
    written latents are feats·std + mean per channel (non-identity normalisation)."""
    from mdt.config import load_config
    from mdt.generate import Trellis2GenerateConfig, Trellis2ImageTo3D

    mean = [0.1 * i for i in range(32)]
    std = [1.0 + 0.05 * i for i in range(32)]
    cfg = load_config(Trellis2GenerateConfig, "trellis2-demo", [
        ("models.tiny_models", str(tmp_path / "tiny")), ("shape_normalization", {"mean": mean, "std": std}),
        ("tex_normalization", {"mean": mean[::-1], "std": std[::-1]}), ("ss.steps", 2), ("shape.steps", 2),
        ("tex.steps", 2), ("num_samples", 2)], prefix="generate_")
    pipe = Trellis2ImageTo3D.from_config(cfg)
    seen = []
    pipe.models["tex_flow"].register_forward_hook(
        lambda m, args, kwargs, out: seen.append((args[0], kwargs["concat_cond"])), with_kwargs=True)
    image = (np.random.default_rng(0).random((80, 80, 4)) * 255).astype(np.uint8)
    image[..., 3] = 255
    gen = pipe.run(image)
    assert len(seen) == 2                                                # 2 steps, w = 1: one pass each
    shape = torch.cat([s.shape_latent for s in gen.samples if s.shape_latent is not None])
    normalised = (shape - torch.tensor(mean)) / torch.tensor(std)
    for x, concat in seen:
        assert torch.equal(concat.coords, x.coords)
        torch.testing.assert_close(concat.feats.float(), normalised, atol=1e-5, rtol=1e-5)
    assert sum(s.coords.shape[0] for s in gen.samples) == normalised.shape[0]
    tex = torch.cat([s.tex_latent for s in gen.samples if s.tex_latent is not None])
    assert torch.allclose(tex.mean(0), torch.tensor(mean[::-1]), atol=3 * max(std)) and tex.shape == shape.shape


@pytest.mark.parametrize("flag", [["--slat-model", "x/y/z"], ["--slat-steps", "1"], ["--cfg", "3"]])
def test_trellis2_preset_refuses_trellis_only_flags_with_exit_2(tmp_path, capsys, flag):
    import sys

    sys.path.insert(0, str(ROOT))
    from jobs.generate import main

    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGBA", (8, 8)).save(img)
    code = main(["--preset", "trellis2-demo", "--image", str(img), "--output", str(tmp_path / "o"), *flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "TRELLIS.2 preset" in err[0]
    assert not (tmp_path / "o").exists()
