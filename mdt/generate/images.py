"""Input images: hostile-input-safe loading (byte and pixel caps) and TRELLIS's condition crop."""
from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch import Tensor

from mdt.conditioning import preprocess_condition_image, to_pil

MAX_IMAGE_PIXELS = 64_000_000       # larger inputs are refused (decompression bombs), far above any photo
MAX_IMAGE_BYTES = 256 * 1024 * 1024



# ------------------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------------------

def load_image(path: str | os.PathLike):
    """Read one image file (only that file); refuse oversize files and decompression bombs."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise ValueError(f"{path.name}: {size} bytes is larger than the {MAX_IMAGE_BYTES} accepted")
    with Image.open(path) as im:
        return _checked_pil(im, path.name)


def load_image_bytes(data: bytes, name: str = "image"):
    """`load_image` for bytes already read (under the same byte cap): the pixel cap, then decode."""

    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{name}: {len(data)} bytes is larger than the {MAX_IMAGE_BYTES} accepted")
    with Image.open(io.BytesIO(bytes(data))) as im:
        return _checked_pil(im, name)


def _checked_pil(im, name: str):
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:  # checked on the header, before any pixel is decoded
        raise ValueError(f"{name}: {w}x{h} pixels is more than the {MAX_IMAGE_PIXELS} accepted")
    im.load()
    return to_pil(im.copy())


def check_image(path: str | os.PathLike) -> str | None:
    """An input checked before any model loads, from its header only: ValueError (one line) when it is not a
    readable image within the size limits; returns a note when it has no alpha channel (it is then used whole:
    this chain has no background removal), else None."""
    path = Path(path)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ValueError(f"{path}: not a readable file")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is larger than the {MAX_IMAGE_BYTES} accepted")
    try:
        with Image.open(path) as im:
            (w, h), bands = im.size, im.getbands()
            has_alpha = "A" in bands or "transparency" in im.info
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not an image ({type(e).__name__})") from None
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"{path}: {w}x{h} pixels is more than the {MAX_IMAGE_PIXELS} accepted")
    if not has_alpha:
        return (f"{path.name} has no alpha channel: the whole image conditions the model (no background removal; "
                "cut the object out to RGBA first for TRELLIS's object-centred crop)")
    return None


def preprocess_image(image, size: int = 518, alpha_threshold: float = 204.0) -> Tensor:
    """TRELLIS's inference preprocessing: square 1.2× crop around the alpha bbox (alpha > 0.8·255), Lanczos
    resize, RGB premultiplied on black -> [3, size, size]. Images without alpha are used whole (background
    removal is not part of this chain)."""
    return preprocess_condition_image(image, size=size, alpha_threshold=alpha_threshold)
