"""DINOv2 conditioning and per-voxel features, against independent direct computations.

A tiny random-weight Dinov2WithRegisters model is written with `save_pretrained` and loaded through the
same code path as the real checkpoint (`facebook/dinov2-with-registers-large`)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mdt.conditioning import (ImageConditioner, crop_condition_image, encode_image, load_dinov2,
                              preprocess_condition_image, prenorm_tokens, zero_negative_condition)
from mdt.models.zoo import save_tiny_dinov2
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.features import Features
from pipelines.preprocess.render import feature_cameras
from pipelines.preprocess.rows import pack_array, unpack_array

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("dino") / "tiny-dinov2-reg")


@pytest.fixture(scope="module")
def dino(dino_dir):
    return load_dinov2(dino_dir)


def random_views(n: int, size: int, seed: int = 0) -> list[bytes]:
    """RGBA PNGs with a soft-edged opaque blob on transparent black (like a render)."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(n):
        rgb = rng.integers(0, 256, size=(size, size, 3))
        cx, cy, r = rng.uniform(0.35, 0.65, size=3) * [1, 1, 0.5]
        a = np.clip((r - np.hypot(xx - cx, yy - cy)) * 8 * size / 64, 0, 1)
        rgba = np.concatenate([rgb, np.round(a * 255)[..., None]], -1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# ------------------------------------------------------------------------------------- DINOv2 conditioning

def test_prenorm_tokens_are_last_hidden_state_before_layernorm(dino):
    x = torch.randn(2, 3, 518, 518)
    out = dino(pixel_values=x, output_hidden_states=True)
    pre = prenorm_tokens(dino, x)
    assert pre.shape == (2, 1 + 4 + 37 * 37, 64)
    assert torch.allclose(pre, out.hidden_states[-1])  # transformers 5.x: the last entry is the prenorm output
    assert not torch.allclose(pre, out.last_hidden_state, atol=1e-2)  # last_hidden_state is post-layernorm
    assert torch.allclose(dino.layernorm(pre), out.last_hidden_state, atol=1e-5)


def test_conditioner_all_tokens_nonaffine_layernorm(dino_dir, dino):
    cond_model = ImageConditioner(dino_dir)
    images = torch.rand(2, 3, 518, 518)
    cond = cond_model(images)
    assert cond.shape == (2, 1374, 64) and cond_model.num_tokens() == 1374
    # independent: normalise by hand, take hidden_states[-1], layer norm without affine
    x = (images - torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)) / torch.tensor(
        STD, dtype=torch.float32).view(1, 3, 1, 1)
    h = dino(pixel_values=x, output_hidden_states=True).hidden_states[-1]
    mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    assert torch.allclose(cond, (h - mu) / torch.sqrt(var + 1e-5), atol=1e-4)
    neg = cond_model.neg_cond(cond)
    assert torch.equal(neg, torch.zeros_like(cond)) and torch.equal(zero_negative_condition(cond), neg)
    # frozen
    assert not any(p.requires_grad for p in cond_model.parameters())
    cond_model.train()
    assert not cond_model.model.training
    # other sizes are resized to 518 first: token count stays 1374
    assert cond_model(torch.rand(1, 3, 256, 256)).shape == (1, 1374, 64)


def test_condition_image_crop_resize_premultiply():
    img = np.zeros((200, 300, 4), np.uint8)
    img[50:90, 100:180] = [200, 100, 50, 255]  # object bbox x 100..179, y 50..89
    img[10, 10] = [255, 255, 255, 100]  # faint pixel: inside the training bbox (alpha > 0), not at 0.8
    crop, box = crop_condition_image(img, size=518, margin=0.1, alpha_threshold=0.8 * 255)
    side = int(1.2 * 80)  # the object covers pixels [100, 180) x [50, 90)
    cx, cy = 140, 70
    x0, y0 = cx - side // 2, cy - side // 2
    assert np.allclose(box, (x0 / 300, y0 / 200, (x0 + side) / 300, (y0 + side) / 200))
    assert crop.size == (518, 518) and crop.mode == "RGBA"
    a = np.asarray(crop)[..., 3]
    ys, xs = np.nonzero(a > 128)
    assert abs(xs.mean() - 258.5) < 1 and abs(ys.mean() - 258.5) < 1
    assert abs((xs.max() + 1 - xs.min()) / 518 - 80 / 96) < 0.01  # object spans 1/1.2 of the crop
    t = preprocess_condition_image(img, size=518)
    assert t.shape == (3, 518, 518) and 0 <= t.min() and t.max() <= 1
    assert float(t[:, 5, 5].abs().max()) == 0.0  # transparent -> black (premultiplied)
    assert torch.allclose(t[:, 259, 259], torch.tensor([200, 100, 50]) / 255, atol=0.02)
    _, box_train = crop_condition_image(img, margin=0.1, alpha_threshold=0)
    assert box_train[0] < 0.05  # the faint pixel now counts
    # RGB input (no alpha): used whole
    _, box_rgb = crop_condition_image(np.zeros((100, 100, 3), np.uint8))
    assert np.allclose(box_rgb, (0, 0, 1, 1))
    jpg = Image.open(io.BytesIO(encode_image(crop, "jpeg")))
    assert jpg.mode == "RGB" and np.asarray(jpg)[0, 0].max() < 8


# ------------------------------------------------------------------------------------- per-voxel features

def direct_voxel_features(model, pngs, c2w, fov, indices, resolution=64) -> np.ndarray:
    """Independent reference: per-view DINOv2 maps, then a plain loop over voxels and views with a hand-written
    pinhole projection and bilinear interpolation (pixel centres at (i + 0.5) / size, zeros outside)."""
    maps = []
    for png in pngs:
        img = Image.open(io.BytesIO(png)).convert("RGBA").resize((518, 518), Image.Resampling.LANCZOS)
        a = np.asarray(img, np.float64) / 255
        rgb = a[..., :3] * a[..., 3:]
        x = torch.tensor(((rgb - MEAN) / STD).transpose(2, 0, 1)[None], dtype=torch.float32)
        tokens = model(pixel_values=x, output_hidden_states=True).hidden_states[-1][0, 5:]  # drop CLS + 4 regs
        maps.append(tokens.reshape(37, 37, -1).double().numpy())  # [row, col, C]
    n_ch = maps[0].shape[-1]
    out = np.zeros((len(indices), n_ch))
    for k, (i, j, l) in enumerate(indices):
        p = (np.array([i, j, l], np.float64) + 0.5) / resolution - 0.5
        acc = np.zeros(n_ch)
        for m, cam, f in zip(maps, c2w, fov):
            cam = np.asarray(cam, np.float64)
            right, up, back, eye = cam[:3, 0], cam[:3, 1], cam[:3, 2], cam[:3, 3]
            d = p - eye
            x_cv, y_cv, z_cv = d @ right, -(d @ up), -(d @ back)  # OpenCV: x right, y down, z forward
            focal = 0.5 / np.tan(f / 2)
            u, v = focal * x_cv / z_cv + 0.5, focal * y_cv / z_cv + 0.5
            px, py = u * 37 - 0.5, v * 37 - 0.5
            x0, y0 = int(np.floor(px)), int(np.floor(py))
            for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                    if 0 <= xx < 37 and 0 <= yy < 37:
                        acc += wy * wx * m[yy, xx]
        out[k] = acc / len(maps)
    return out


def test_features_stage_equals_direct_loop(dino):
    pngs = random_views(3, 96, seed=1)
    c2w, fov = feature_cameras(3, (0.4, 0.9))
    rng = np.random.default_rng(0)
    idx = np.unique(rng.integers(0, 64, size=(150, 3)), axis=0).astype(np.uint8)
    idx = np.concatenate([idx, [[0, 0, 0], [63, 63, 63], [0, 63, 0]]]).astype(np.uint8)  # corners: partly outside
    cfg = PreprocessConfig()
    cfg.features.batch_size = 2
    stage = Features(cfg, model=dino)
    row = {"sha256": "x", "error": None, "views": pngs, "views_c2w": pack_array(c2w), "views_fov": pack_array(fov),
           "voxel_coords": pack_array(idx)}
    out = stage(row)
    assert out["error"] is None
    feats = unpack_array(out["voxel_feats"])
    assert feats.dtype == np.float16 and feats.shape == (len(idx), 64)
    ref = direct_voxel_features(dino, pngs, c2w, fov, idx.astype(int))
    scale = np.abs(ref).max()
    assert np.abs(feats.astype(np.float64) - ref).max() < 2e-3 * scale + 1e-3


def test_features_stage_failures(dino):
    stage = Features(PreprocessConfig(), model=dino)
    c2w, fov = feature_cameras(2, (0.0, 0.0))
    base = {"sha256": "x", "error": None, "views_c2w": pack_array(c2w), "views_fov": pack_array(fov),
            "voxel_coords": pack_array(np.zeros((1, 3), np.uint8))}
    assert stage({**base, "views": []})["error"] == "features: no views"
    assert stage({**base, "views": random_views(3, 32)})["error"] == "features: 3 views but 2 cameras"
    assert stage({**base, "views": random_views(2, 32), "voxel_coords": None})["error"] == "features: no voxels"
