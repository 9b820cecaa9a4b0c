"""The frozen image conditioners, DINOv2 (TRELLIS-image-large) and DINOv3 (TRELLIS.2), and the condition-image
preprocessing.

TRELLIS.2 (`ImageConditioner` on a `DINOv3ViTModel` directory or `facebook/dinov3-vitl16-pretrain-lvd1689m`):
the same recipe on DINOv3 ViT-L/16 — ImageNet normalisation, all last-block tokens [CLS, registers, patches]
before the model's own final norm, then a non-affine layer norm; 1024 channels, 1 + 4 + 32² = 1029 tokens at 512 px
(the image is cropped as below and resized with Lanczos to 512, or 1024 for the 1024 stages); neg_cond = zeros.

Model: DINOv2 ViT-L/14 with 4 registers through Hugging Face `transformers`
(`Dinov2WithRegistersModel`, hub id `facebook/dinov2-with-registers-large`, or any local directory written
with `save_pretrained`, e.g. the tiny random model of `save_tiny_dinov2` used by tests and the CPU demo).

* Input: RGB in [0, 1] at 518 x 518, premultiplied alpha on black, ImageNet mean/std normalisation.
* Tokens: the output of the last transformer block **before** DINOv2's own final layer norm ("prenorm"),
  all of them in the order [CLS, 4 registers, 37 x 37 patches] = 1374 tokens for ViT-L/14 at 518 px.
  We read it with a forward pre-hook on the model's final `layernorm` (its input is exactly that tensor),
  which does not depend on how a transformers version packs `hidden_states`; `tests` check that it equals
  `hidden_states[-1]`.
* Conditioning for the flow models: a non-affine layer norm (eps 1e-5) over channels on all tokens ->
  cond [B, T, C]. The negative condition is zeros of the same shape.
* Data preparation (pipelines.preprocess.features) uses the prenorm patch tokens without the extra layer norm,
  reshaped to [C, 37, 37] maps.

Condition-image preprocessing: bbox of the alpha channel (alpha > 0 for training renders, > 0.8 * 255 for
user images), a square crop of side int(1.2 * max(w, h)) centred on the bbox (regions outside the image are
transparent), Lanczos resize to 518, RGB premultiplied by alpha.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

DINOV2_HUB_ID = "facebook/dinov2-with-registers-large"
DINOV3_HUB_ID = "facebook/dinov3-vitl16-pretrain-lvd1689m"
IMAGE_SIZE = 518
DINOV3_IMAGE_SIZE = 512            # TRELLIS.2's `cond_512`; its 1024 stages use 1024
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COND_LAYERNORM_EPS = 1e-5


# ---------------------------------------------------------------------------------------------------------
# Model loading and token extraction
# ---------------------------------------------------------------------------------------------------------

def load_dinov2(name_or_path: str | os.PathLike = DINOV2_HUB_ID, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """A frozen, eval-mode `Dinov2WithRegistersModel` from a local directory or a hub id."""
    from transformers import Dinov2WithRegistersModel  # heavy: transformers, huggingface_hub

    path = str(name_or_path)
    kwargs = {"local_files_only": True} if Path(path).is_dir() else {}
    model = Dinov2WithRegistersModel.from_pretrained(path, **kwargs)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


# transformers `model_type` -> model class name: only these two are ever loaded (no remote code).
ENCODER_CLASSES = {"dinov2_with_registers": "Dinov2WithRegistersModel", "dinov3_vit": "DINOv3ViTModel"}
DEFAULT_IMAGE_SIZE = {"dinov2_with_registers": IMAGE_SIZE, "dinov3_vit": DINOV3_IMAGE_SIZE}


def encoder_type(name_or_path: str | os.PathLike) -> str:
    """The `model_type` of a local model directory or hub id, refused unless DINOv2-with-registers or DINOv3."""
    import transformers  # heavy: transformers, huggingface_hub

    path = str(name_or_path)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=Path(path).is_dir())
    if config.model_type not in ENCODER_CLASSES:
        raise ValueError(f"{path}: image encoder type {config.model_type!r} is not supported "
                         f"(supported: {sorted(ENCODER_CLASSES)})")
    return config.model_type


def load_image_encoder(name_or_path: str | os.PathLike = DINOV2_HUB_ID, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> nn.Module:
    """A frozen, eval-mode DINOv2-with-registers or DINOv3 model, told apart by its config's model_type."""
    import transformers  # heavy: transformers, huggingface_hub

    path = str(name_or_path)
    cls = getattr(transformers, ENCODER_CLASSES[encoder_type(path)])
    kwargs = {"local_files_only": True} if Path(path).is_dir() else {}
    model = cls.from_pretrained(path, **kwargs).to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


def final_norm(model: nn.Module) -> nn.Module:
    """The model's own final layer norm (`layernorm` in DINOv2, `norm` in DINOv3), which the conditioner skips."""
    norm = getattr(model, "layernorm", None) or getattr(model, "norm", None)
    if not isinstance(norm, nn.LayerNorm):
        raise TypeError(f"{type(model).__name__} has no final layer norm named 'layernorm' or 'norm'")
    return norm


def num_prefix_tokens(model: nn.Module) -> int:
    """CLS + register tokens in front of the patch tokens."""
    return 1 + int(getattr(model.config, "num_register_tokens", 0))


def prenorm_tokens(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """All tokens [B, T, C] of the last block's output, before the model's final layer norm."""
    captured: list[Tensor] = []

    def hook(_module, args):
        captured.append(args[0])

    handle = final_norm(model).register_forward_pre_hook(hook)
    try:
        model(pixel_values=pixel_values)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one call of the final layer norm, got {len(captured)}")
    return captured[0]


def patch_token_maps(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """Prenorm patch tokens as maps [B, C, H/p, W/p] (CLS and registers dropped)."""
    tokens = prenorm_tokens(model, pixel_values)
    b, _, h, w = pixel_values.shape
    p = int(model.config.patch_size)
    patches = tokens[:, num_prefix_tokens(model):]
    return patches.transpose(1, 2).reshape(b, tokens.shape[-1], h // p, w // p)


def imagenet_normalize(images: Tensor) -> Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


class ImageConditioner(nn.Module):
    """Frozen DINOv2 (TRELLIS) or DINOv3 (TRELLIS.2) conditioner: images [B, 3, S, S] in [0, 1] (premultiplied)
    -> cond [B, T, C].

    `cond` = non-affine LayerNorm(eps 1e-5) of all prenorm tokens (1374 x 1024 for DINOv2 ViT-L/14 at 518 px,
    1029 x 1024 for DINOv3 ViT-L/16 at 512 px); `neg_cond` = zeros of the same shape. Images of another size are
    resized (bilinear) to `image_size` (default: 518 for DINOv2, 512 for DINOv3).
    """

    def __init__(self, model: nn.Module | str | os.PathLike = DINOV2_HUB_ID, image_size: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(model, nn.Module):
            model = load_image_encoder(model, device=device, dtype=dtype)
        self.model = model.eval()
        self.model.requires_grad_(False)
        model_type = getattr(getattr(model, "config", None), "model_type", "dinov2_with_registers")
        self.image_size = int(image_size or DEFAULT_IMAGE_SIZE.get(model_type, IMAGE_SIZE))

    def train(self, mode: bool = True):  # stays frozen in eval mode
        super().train(False)
        return self

    @property
    def channels(self) -> int:
        return int(self.model.config.hidden_size)

    def num_tokens(self, image_size: int | None = None) -> int:
        s = image_size or self.image_size
        return num_prefix_tokens(self.model) + (s // int(self.model.config.patch_size)) ** 2

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        param = next(self.model.parameters())
        x = images.to(device=param.device, dtype=torch.float32)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = imagenet_normalize(x).to(param.dtype)
        tokens = prenorm_tokens(self.model, x).float()
        return F.layer_norm(tokens, tokens.shape[-1:], eps=COND_LAYERNORM_EPS)

    def neg_cond(self, cond: Tensor) -> Tensor:
        return torch.zeros_like(cond)

    def get_cond(self, images: Tensor) -> dict[str, Tensor]:
        cond = self(images)
        return {"cond": cond, "neg_cond": self.neg_cond(cond)}


def zero_negative_condition(cond: Tensor) -> Tensor:
    """TRELLIS's negative condition (CFG and condition dropout): zeros shaped like `cond`."""
    return torch.zeros_like(cond)


# ---------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------

def to_pil(image) -> Image.Image:
    """bytes (PNG/JPEG), PIL image or uint8 array [H, W, 3|4] -> PIL image (RGB or RGBA)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
        image.load()
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() or image.mode == "P" else "RGB")
    return image


def alpha_bbox(image: Image.Image, threshold: float = 0.0) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) inclusive pixel extent of alpha > threshold; None when empty or no alpha."""
    if image.mode != "RGBA":
        return None
    a = np.asarray(image)[..., 3]
    ys, xs = np.nonzero(a > threshold)
    if not len(xs):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def crop_condition_image(image, size: int = IMAGE_SIZE, margin: float = 0.1,
                         alpha_threshold: float = 0.0) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Square crop around the object, resized (Lanczos) to `size`.

    The side is int((1 + 2 * margin) * max(w, h)) of the alpha bbox (1.2x for margin 0.1), centred on the
    bbox centre; outside the image is transparent. Without alpha (or an empty one) the whole image is used.
    Returns the image (same mode as the input, straight alpha) and the crop box (x0, y0, x1, y1) in
    normalised coordinates of the input.
    """
    img = to_pil(image)
    w_img, h_img = img.size
    bbox = alpha_bbox(img, alpha_threshold)
    if bbox is None:
        side = max(w_img, h_img)
        cx, cy = w_img / 2, h_img / 2
    else:
        x0, y0, x1, y1 = bbox  # inclusive pixel indices: the object covers [x0, x1 + 1) x [y0, y1 + 1)
        side = max(1, int((1 + 2 * margin) * max(x1 + 1 - x0, y1 + 1 - y0)))
        cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
    left, top = int(np.floor(cx - side / 2 + 0.5)), int(np.floor(cy - side / 2 + 0.5))
    box = (left, top, left + side, top + side)
    crop = img.crop(box).resize((size, size), Image.Resampling.LANCZOS)
    norm = (box[0] / w_img, box[1] / h_img, box[2] / w_img, box[3] / h_img)
    return crop, norm


def premultiplied_rgb(image) -> np.ndarray:
    """float32 [H, W, 3] in [0, 1]: RGB premultiplied by alpha (black background); RGB images as they are."""
    img = to_pil(image)
    a = np.asarray(img, np.float32) / 255.0
    if img.mode == "RGBA":
        return a[..., :3] * a[..., 3:4]
    return a[..., :3]


def image_to_tensor(image) -> Tensor:
    """[3, H, W] float32 in [0, 1], premultiplied on black."""
    return torch.from_numpy(np.ascontiguousarray(premultiplied_rgb(image).transpose(2, 0, 1)))


def preprocess_condition_image(image, size: int = IMAGE_SIZE, alpha_threshold: float = 0.8 * 255,
                               margin: float = 0.1) -> Tensor:
    """A user image -> conditioner input [3, size, size] (crop to the object, resize, premultiply).

    Images without a useful alpha channel are used whole (background removal is not part of this project);
    `alpha_threshold` is 0.8 * 255 as in TRELLIS's inference path, 0 for training renders.
    """
    crop, _ = crop_condition_image(image, size=size, margin=margin, alpha_threshold=alpha_threshold)
    return image_to_tensor(crop)


def encode_image(image: Image.Image, fmt: str = "png", jpeg_quality: int = 95) -> bytes:
    """PNG (keeps RGBA) or JPEG (RGB premultiplied on black) bytes."""
    buf = io.BytesIO()
    fmt = fmt.lower()
    if fmt == "png":
        image.save(buf, format="PNG")
    elif fmt in ("jpeg", "jpg"):
        rgb = np.round(premultiplied_rgb(image) * 255).astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=int(jpeg_quality))
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()
