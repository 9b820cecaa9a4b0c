"""Image feature networks for the appearance Fréchet distances FD_incep and FD_dinov2.

`load_feature_net(kind, source)` returns a `FeatureNet`: uint8 images [N, H, W, 3] -> float64 features [N, D],
with `name` (what was loaded) and `real` (learned weights or not). Nothing is ever downloaded:

* `inception`: the FID Inception-v3 pool3 features (2048-d). Real weights are a TorchScript file of the FID
  network (`inception-2015-12-05.pt`, the file clean-fid and the StyleGAN metrics use; called as
  `net(images_0_255, return_features=True)`), taken from `source` (a path) or from the torch hub cache
  (`<torch.hub.get_dir()>/checkpoints/`).
* `dinov2`: the DINOv2 CLS token after the final layer norm (`pooler_output`, the features of FD_dinov2,
  ViT-L/14 at 224 px), through `transformers` from `source` = a local directory or a hub id found in the
  local Hugging Face cache (`local_files_only`).

When no real weights are found the loader returns a named fixed-seed random network instead
(`tiny-random-inception` / `tiny-random-dinov2`, `real=False`) and says why in `FeatureNet.note`, so every
result can state which feature networks it used. Distances on random features rank sample sets but are not
comparable with published FD values.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception-2015-12-05.pt"
DINOV2_FD_HUB_ID = "facebook/dinov2-large"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("inception", "dinov2")


class FeatureNet:
    """A frozen image -> feature map; `forward` takes float images [N, 3, H, W] in [0, 1]."""

    def __init__(self, name: str, real: bool, forward: Callable[[torch.Tensor], torch.Tensor], note: str = "",
                 batch_size: int = 32):
        self.name, self.real, self.note = name, real, note
        self._forward = forward
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] (or [H, W, 3]) -> float64 [N, D]."""
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[None]
        out = []
        for i in range(0, len(x), self.batch_size):
            t = torch.from_numpy(np.ascontiguousarray(x[i:i + self.batch_size, ..., :3])).permute(0, 3, 1, 2)
            out.append(self._forward(t.float() / 255.0).double().flatten(1))
        return torch.cat(out).numpy()

    def describe(self) -> dict:
        return {"name": self.name, "real_weights": self.real, "note": self.note}


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size and x.shape[-2] == size else F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------------ Inception


def find_inception(source: str | None = None) -> Path | None:
    """The FID Inception TorchScript file: `source` if given, else the torch hub cache; None if absent."""
    if source:
        p = Path(source).expanduser()
        return p if p.is_file() else None
    p = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return p if p.is_file() else None


def inception_net(source: str | None = None, device: str = "cpu") -> FeatureNet:
    path = find_inception(source)
    if path is not None:
        net = torch.jit.load(str(path), map_location=device).eval()

        def forward(x):                       # the FID network resizes to 299 itself and takes values in 0..255
            return net(x.to(device) * 255.0, return_features=True).cpu()
        return FeatureNet(f"inception-v3-fid ({path})", True, forward)
    why = f"no Inception-v3 FID weights at {source}" if source else \
        f"no {INCEPTION_FILE} in {Path(torch.hub.get_dir()) / 'checkpoints'}"
    return random_conv_net("tiny-random-inception", seed=0, note=why)


# ------------------------------------------------------------------------------------------------ DINOv2


def dinov2_net(source: str | None = None, device: str = "cpu") -> FeatureNet:
    """DINOv2 CLS features from a local directory or a hub id already in the local cache."""
    src = source or DINOV2_FD_HUB_ID
    try:
        from transformers import AutoModel  # optional: transformers

        model = AutoModel.from_pretrained(src, local_files_only=True).to(device).eval().requires_grad_(False)
    except Exception as e:  # not on disk: fall back to a named random network
        why = f"DINOv2 weights {src!r} not available locally ({type(e).__name__})"
        return tiny_random_dinov2(note=why)
    return FeatureNet(f"dinov2 ({src})", True, _dinov2_forward(model, device))


def _dinov2_forward(model: nn.Module, device: str = "cpu", size: int = 224):
    def forward(x):
        out = model(pixel_values=_normalize(_resize(x, size)).to(device))
        return out.pooler_output.cpu()
    return forward


def tiny_random_dinov2(seed: int = 0, note: str = "") -> FeatureNet:
    """A 2-layer, 64-wide DINOv2 with fixed random weights (patch 14 at 224 px)."""
    from transformers import Dinov2Config, Dinov2Model  # heavy: transformers, PIL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, patch_size=14, image_size=224)).eval()
    model.requires_grad_(False)
    return FeatureNet(f"tiny-random-dinov2 (seed {seed})", False, _dinov2_forward(model), note)


# ------------------------------------------------------------------------------------------------ fallback


class _RandomConvNet(nn.Module):
    """Four stride-2 3x3 convs + ReLU with Kaiming-normal weights from a seed; global mean + std pooling."""

    def __init__(self, seed: int, channels=(16, 32, 64, 128)):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers, cin = [], 3
        for c in channels:
            conv = nn.Conv2d(cin, c, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * np.sqrt(2.0 / (cin * 9)))
                conv.bias.zero_()
            layers += [conv, nn.ReLU()]
            cin = c
        self.net = nn.Sequential(*layers).eval().requires_grad_(False)

    def forward(self, x):
        h = self.net(_normalize(_resize(x, 128))).flatten(2)
        return torch.cat([h.mean(2), h.std(2)], 1)


def random_conv_net(name: str, seed: int = 0, note: str = "") -> FeatureNet:
    return FeatureNet(f"{name} (seed {seed})", False, _RandomConvNet(seed), note)


def load_feature_net(kind: str, source: str | None = None, device: str = "cpu") -> FeatureNet:
    """`kind` in KINDS; `source` a path (or hub id for dinov2), None = the default locations."""
    if kind == "inception":
        net = inception_net(source, device)
    elif kind == "dinov2":
        net = dinov2_net(source, device)
    else:
        raise ValueError(f"unknown feature net {kind!r} (one of {KINDS})")
    if not net.real:
        log.warning("%s: using %s (%s)", kind, net.name, net.note)
    return net

