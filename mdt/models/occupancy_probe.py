"""`OccupancyProbe`: a small latent -> occupancy decoder at the latent's own resolution (16³), fitted in seconds
on (SS latent, voxel occupancy) pairs of a dataset. The CPU demo uses it in place of the SS VAE decoder, which
does not exist for the demo's tiny random SS encoder; with TRELLIS checkpoints use `ss_dec_conv3d_16l8_fp16`.
Both load with `load_decoder(path)` (`<stem>.json` + `<stem>.safetensors`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdt.models.io import from_pretrained
from safetensors.torch import save_file
from safetensors.torch import load_file


class OccupancyProbe(nn.Module):
    """Latent [B, C, R, R, R] -> occupancy logits [B, 1, R·up, R·up, R·up] (two 3³ convs + a 1³ head)."""

    def __init__(self, latent_channels: int = 8, hidden: int = 32, upsample: int = 1):
        super().__init__()
        self.args = {"latent_channels": latent_channels, "hidden": hidden, "upsample": upsample}
        self.latent_channels, self.upsample = latent_channels, upsample
        self.net = nn.Sequential(
            nn.Conv3d(latent_channels, hidden, 3, padding=1), nn.SiLU(),
            nn.Conv3d(hidden, hidden, 3, padding=1), nn.SiLU(),
            nn.Conv3d(hidden, upsample ** 3, 1))

    def forward(self, z: Tensor) -> Tensor:
        h = self.net(z.float())
        if self.upsample > 1:
            h = _shuffle3d(h, self.upsample)
        return h

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Path(str(path) + ".json").write_text(json.dumps({"name": "OccupancyProbe", "args": self.args}))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path) + ".safetensors")


def _shuffle3d(h: Tensor, r: int) -> Tensor:
    b, c, x, y, z = h.shape
    h = h.reshape(b, 1, r, r, r, x, y, z).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return h.reshape(b, 1, x * r, y * r, z * r)


def fit_occupancy_probe(latents: Tensor, occupancy: Tensor, steps: int = 300, lr: float = 3e-3, hidden: int = 32,
                        batch_size: int = 16, seed: int = 0, log: Callable[[str], None] | None = None,
                        noise_std: float = 0.0) -> OccupancyProbe:
    """Fit an `OccupancyProbe` on latents [N, C, R, R, R] and occupancies [N, R', R', R'] (R' = R·upsample).

    `noise_std` > 0 adds Gaussian noise of that std to the latents during fitting, so that the probe decodes
    latents a little off the data (samples of an imperfect flow model) to the nearest shape, as a VAE decoder
    trained with a KL posterior's noise does."""
    up = occupancy.shape[-1] // latents.shape[-1]
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = OccupancyProbe(latents.shape[1], hidden, up)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    pos = occupancy.float().mean().clamp(1e-3, 1 - 1e-3)
    pos_weight = ((1 - pos) / pos).sqrt()  # balance the rare occupied cells a little
    n = latents.shape[0]
    for i in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=g)
        z = latents[idx]
        if noise_std > 0:
            z = z + noise_std * torch.randn(z.shape, generator=g)
        logits = probe(z)[:, 0]
        loss = F.binary_cross_entropy_with_logits(logits, occupancy[idx].float(), pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log is not None and (i + 1) % max(1, steps // 4) == 0:
            log(f"occupancy probe step {i + 1}/{steps}: bce {loss.item():.4f}")
    return probe.eval().requires_grad_(False)


def load_decoder(path: str | Path) -> nn.Module:
    """A TRELLIS SS decoder (`mdt.models.from_pretrained`) or an `OccupancyProbe`, by the json's `name`."""
    stem = str(path).removesuffix(".json").removesuffix(".safetensors")
    meta_path = Path(stem + ".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("name") == "OccupancyProbe":

        probe = OccupancyProbe(**meta["args"])
        probe.load_state_dict(load_file(stem + ".safetensors"))
        return probe.eval().requires_grad_(False)
    return from_pretrained(stem).eval().requires_grad_(False)
