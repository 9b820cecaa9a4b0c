"""What every TRELLIS network shares: the published fp16 layout of its torso, and its compute dtype."""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn

from mdt.sparse.conv import _ConvParams

# Layer types TRELLIS converts to half inside a torso (norms, RMS gammas and buffers always stay fp32).
FP16_PRIMITIVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.ConvTranspose3d, _ConvParams)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class TrellisModule(nn.Module):
    """Base of the TRELLIS networks. Subclasses name their torso containers in `TORSO`.

    With use_fp16 the torso's primitive layers are half at construction (so a model built on the meta device
    has the published dtype layout). `from_pretrained` casts to float32 for CPU compute; on CUDA the mixed
    layout is kept. Forward passes run the torso in `self.dtype`.
    """

    TORSO: tuple[str, ...] = ()
    use_fp16: bool = False

    def __init_subclass__(cls, **kwargs):
        # Record the outermost constructor's arguments: they are the checkpoint json's `args`.
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            if "trellis_args" not in self.__dict__:
                bound = signature.bind(self, *args, **kw)
                recorded = {k: v for k, v in bound.arguments.items() if k != "self"}
                extra = recorded.pop("kwargs", {})
                object.__setattr__(self, "trellis_args", {**recorded, **extra})
            init(self, *args, **kw)

        cls.__init__ = recording_init

    def torso_primitives(self):
        for name in self.TORSO:
            container = getattr(self, name, None)
            if container is None:
                continue
            for sub_name, module in container.named_modules(prefix=name):
                if isinstance(module, FP16_PRIMITIVES):
                    yield sub_name, module

    def convert_to_fp16(self) -> None:
        for _, module in self.torso_primitives():
            module.half()

    def convert_to_fp32(self) -> None:
        for _, module in self.torso_primitives():
            module.float()

    def set_precision(self, precision: str, device: torch.device) -> "TrellisModule":
        """The torso's compute dtype for inference: "auto" keeps what `from_pretrained` loaded on CUDA (the
        published fp16 torso) and is float32 elsewhere; "fp32"; "fp16" / "bf16" (torso primitives only, on any
        device). Half precision is honoured on a CPU too: with AVX512-BF16 a bf16 GEMM runs about 2x a float32
        one there, while fp16 has no fast CPU path (4096x1024x4096 on 2 threads: fp32 168, bf16 351, fp16 42
        GFLOPS, `python -m mdt.bench.cpu_gemm`)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "auto":
            return self if device.type == "cuda" else self.float()
        self.float()
        if precision != "fp32":
            half = torch.bfloat16 if precision == "bf16" else torch.float16
            for _, module in self.torso_primitives():
                module.to(half)
        return self

    @property
    def dtype(self) -> torch.dtype:
        for _, module in self.torso_primitives():
            for p in module.parameters(recurse=False):
                return p.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        return next(iter(self.state_dict().values())).device

    def published_dtypes(self) -> dict[str, torch.dtype]:
        """Storage dtype of every state-dict key in a TRELLIS checkpoint of this model."""
        dtypes = {k: torch.float32 for k in self.state_dict()}
        if self.use_fp16:
            for name, module in self.torso_primitives():
                for p_name, _ in module.named_parameters(recurse=False):
                    dtypes[f"{name}.{p_name}"] = torch.float16
        return dtypes
