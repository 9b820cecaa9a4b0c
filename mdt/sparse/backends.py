"""Backend selection for sparse convolution and attention.

Defaults are the portable PyTorch implementations. spconv / flash-attn are used only when selected (by
`set_backends` or the environment variables MDT_CONV_BACKEND / MDT_ATTN_BACKEND), importable, and the data is on
CUDA; "auto" picks them whenever that holds. The choice is made per call, so CPU tensors always work.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
import torch

CONV_BACKENDS = ("torch", "spconv", "auto")
ATTN_BACKENDS = ("sdpa", "flash_attn", "auto")

_conv = os.environ.get("MDT_CONV_BACKEND", "torch")
_attn = os.environ.get("MDT_ATTN_BACKEND", "sdpa")


def set_backends(conv: str | None = None, attn: str | None = None) -> None:
    global _conv, _attn
    if conv is not None:
        if conv not in CONV_BACKENDS:
            raise ValueError(f"conv backend must be one of {CONV_BACKENDS}, got {conv!r}")
        _conv = conv
    if attn is not None:
        if attn not in ATTN_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTN_BACKENDS}, got {attn!r}")
        _attn = attn


@lru_cache(maxsize=None)
def spconv_available() -> bool:
    return importlib.util.find_spec("spconv") is not None


@lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def conv_backend_for(is_cuda: bool) -> str:
    if _conv == "torch" or not is_cuda:
        return "torch"
    if spconv_available():
        return "spconv"
    if _conv == "spconv":
        raise RuntimeError("MDT_CONV_BACKEND=spconv but spconv is not installed (pip install '.[cuda]')")
    return "torch"


def attn_backend_for(is_cuda: bool, dtype) -> str:
    if _attn == "sdpa" or not is_cuda or dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    if flash_attn_available():
        return "flash_attn"
    if _attn == "flash_attn":
        raise RuntimeError("MDT_ATTN_BACKEND=flash_attn but flash-attn is not installed (pip install '.[cuda]')")
    return "sdpa"


def describe_backends() -> str:
    return (f"sparse conv backend: {_conv} (spconv installed: {spconv_available()}); "
            f"attention backend: {_attn} (flash-attn installed: {flash_attn_available()}); "
            "non-CUDA tensors always use torch / sdpa")
