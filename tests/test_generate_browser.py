"""The self-contained HTML 3-D view (mdt/export/html.py) in headless Chromium: the screenshot shows the objects.

Chromium comes from Debian (`bash infra/ci/install-system-deps.sh`). Without it the test skips with the reason,
unless CI is set, where it fails.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        reason = "Chromium is not installed (bash infra/ci/install-system-deps.sh installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + " (CI is set, so this is an error)")
        pytest.skip(reason)
    return exe


def screenshot(exe: str, page, out, width: int, height: int) -> np.ndarray:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--allow-file-access-from-files", f"--window-size={width},{height}", "--virtual-time-budget=4000",
           "--hide-scrollbars", f"--screenshot={out}", page.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and out.exists(), res.stderr[-2000:]
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


@pytest.mark.server
def test_html_view_shows_each_object_in_headless_chromium(tmp_path):
    from mdt.export.html import write_orbit_viewer
    from mdt.export.preview import PointCloud

    exe = chromium()
    g = torch.Generator().manual_seed(0)
    sphere = torch.randn(4000, 3, generator=g)
    sphere = 0.3 * sphere / sphere.norm(dim=1, keepdim=True)
    cube = torch.rand(4000, 3, generator=g) * 0.5 - 0.25
    red, blue = torch.tensor([[0.9, 0.1, 0.1]]).expand(4000, 3), torch.tensor([[0.1, 0.2, 0.9]]).expand(4000, 3)
    page = write_orbit_viewer(tmp_path / "view.html", [PointCloud("generated </script><b>x</b>", sphere, red),
                                                       PointCloud("ground truth", cube, blue)],
                              title="check", size=300)
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<script src" not in text   # nothing fetched
    img = screenshot(exe, page, tmp_path / "shot.png", 700, 420)
    reddish = (img[..., 0] > 120) & (img[..., 1] < 90) & (img[..., 2] < 90)
    bluish = (img[..., 2] > 120) & (img[..., 0] < 90)
    # Each panel draws its object: a few thousand coloured pixels, left panel red, right panel blue.
    assert reddish.sum() > 2000 and bluish.sum() > 2000, (reddish.sum(), bluish.sum())
    assert np.median(np.nonzero(reddish)[1]) < np.median(np.nonzero(bluish)[1])
    # The hostile title is shown as text, not parsed as markup.
    assert "&lt;/script&gt;" in text or "\\u003c/script>" in text
