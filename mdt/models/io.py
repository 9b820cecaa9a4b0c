"""Loading and saving TRELLIS-format checkpoints: `<stem>.json` ({"name", "args"}) + `<stem>.safetensors`.

Only safetensors payloads are read (never pickle). Loading is strict: missing, unexpected or mis-shaped keys are
all reported in one error. Saving writes exactly the published layout (same keys, fp16 where TRELLIS stores fp16,
no safetensors metadata block), so a distilled student is a drop-in replacement file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .base import TrellisModule
from .slat_flow import ElasticSLatFlowModel, SLatFlowModel
from .slat_vae import (ElasticSLatEncoder, ElasticSLatGaussianDecoder, ElasticSLatMeshDecoder,
                       ElasticSLatRadianceFieldDecoder, SLatEncoder, SLatGaussianDecoder, SLatMeshDecoder,
                       SLatRadianceFieldDecoder)
from .ss_flow import SparseStructureFlowModel
from .ss_vae import SparseStructureDecoder, SparseStructureEncoder
from .trellis2_flow import TRELLIS2_CLASSES, is_trellis2_args

# The json `name` field of TRELLIS checkpoints -> class. Written out, not filled by decorators.
MODEL_CLASSES: dict[str, type[TrellisModule]] = {
    cls.__name__: cls for cls in (
        SparseStructureFlowModel, SLatFlowModel, ElasticSLatFlowModel, SparseStructureEncoder,
        SparseStructureDecoder, SLatEncoder, ElasticSLatEncoder, SLatGaussianDecoder, ElasticSLatGaussianDecoder,
        SLatRadianceFieldDecoder, ElasticSLatRadianceFieldDecoder, SLatMeshDecoder, ElasticSLatMeshDecoder)
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: bad json, a non-safetensors payload, or a key/shape mismatch."""


def model_class(name: str, args: dict) -> type[TrellisModule]:
    """The class a checkpoint json describes. TRELLIS.2's flows share TRELLIS's names; their args differ."""
    if name in TRELLIS2_CLASSES and is_trellis2_args(args):
        return TRELLIS2_CLASSES[name]
    if name not in MODEL_CLASSES:
        raise CheckpointError(f"unknown model class {name!r}; known: {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[name]


def build_model(name: str, args: dict, device: str | torch.device | None = None) -> TrellisModule:
    cls = model_class(name, args)
    try:
        with torch.device(device or "cpu"):
            return cls(**args)
    except TypeError as exc:  # an argument the class does not take
        raise CheckpointError(f"{name} ({cls.__name__}) cannot be built from these args: {exc}") from exc


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """(`<stem>.json`, `<stem>.safetensors`) for a local `<dir>/<stem>` or a hub `<owner>/<repo>/<sub/stem>`."""
    path = str(path)
    for suffix in (".json", ".safetensors"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    local_json, local_st = Path(path + ".json"), Path(path + ".safetensors")
    if local_json.exists() and local_st.exists():
        return local_json, local_st
    if local_json.exists() or local_st.exists():
        missing = local_st if local_json.exists() else local_json
        raise FileNotFoundError(f"checkpoint {path!r} is incomplete: {missing} is missing")
    parts = path.split("/")
    if len(parts) < 3 or path.startswith((".", "/")):
        raise FileNotFoundError(f"no checkpoint at {path!r}: expected {local_json} and {local_st}, "
                                "or a hub path '<owner>/<repo>/<path/to/stem>'")
    # heavy: huggingface_hub
    from huggingface_hub import hf_hub_download  # honours HF_HOME, HF_HUB_OFFLINE and the local cache

    repo_id, stem = "/".join(parts[:2]), "/".join(parts[2:])
    return (Path(hf_hub_download(repo_id, f"{stem}.json")), Path(hf_hub_download(repo_id, f"{stem}.safetensors")))


def read_config(json_path: Path) -> tuple[str, dict]:
    try:
        config = json.loads(Path(json_path).read_text())
        return config["name"], dict(config["args"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{json_path} is not a TRELLIS model config ({{'name', 'args'}}): {exc}") from exc


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:  # never fall back to pickle
        raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from exc


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        lines = [f"{source} does not match {type(model).__name__}:"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("mis-shaped keys", misshaped)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", … ({len(keys)} in all)" if len(keys) > 20 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))
    # copy_ casts each stored tensor into the parameter's own dtype (fp16 torso on CUDA, fp32 on CPU).
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])


def from_pretrained(path: str | os.PathLike, device: str | torch.device | None = None,
                    keep_fp16: bool | None = None) -> TrellisModule:
    """Build a TRELLIS network from `<dir>/<stem>` or `<hf_repo>/<path/to/stem>` and load its weights.

    On CUDA the published mixed fp16/fp32 layout is kept (keep_fp16 defaults to True there); elsewhere the model
    is cast to float32 for compute.
    """
    json_path, st_path = resolve_checkpoint(path)
    name, args = read_config(json_path)
    device = torch.device(device or "cpu")
    model = build_model(name, args, device="meta")
    model = model.to_empty(device=device)
    _recompute_buffers(model, name, args)
    load_state_dict_strict(model, with_computed_buffers(model, read_safetensors(st_path), str(st_path)),
                           source=str(st_path))
    if keep_fp16 is None:
        keep_fp16 = device.type == "cuda"
    if not keep_fp16:
        model.float()
    return model.eval()


def _recompute_buffers(model: nn.Module, name: str, args: dict) -> None:
    """to_empty leaves buffers uninitialised; non-persistent ones would stay garbage, persistent ones are loaded."""
    for buf_name, buf in model.named_buffers():
        if buf_name not in model.state_dict():
            raise CheckpointError(f"{name}: non-persistent buffer {buf_name} cannot be restored from the file")


def with_computed_buffers(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Add the entries a model computes from its config (TRELLIS.2's `rope_phases`) when the file leaves them out;
    a file that carries one must carry the same values (else the file would silently change the network)."""
    computed = model.computed_buffers() if hasattr(model, "computed_buffers") else {}
    state = dict(state)
    for key, value in computed.items():
        if key not in state:
            state[key] = value
        elif state[key].shape != value.shape or state[key].dtype != value.dtype or not torch.allclose(
                state[key], value.to(state[key].device), atol=1e-5):
            raise CheckpointError(f"{source}: {key} differs from the value computed from the config")
    return state


def save_pretrained(model: TrellisModule, path: str | os.PathLike, args: dict | None = None) -> tuple[Path, Path]:
    """Write `<path>.json` and `<path>.safetensors` in TRELLIS's format and dtype layout."""
    path = Path(str(path).removesuffix(".safetensors").removesuffix(".json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    name = getattr(type(model), "CHECKPOINT_NAME", "") or type(model).__name__
    if name not in MODEL_CLASSES:
        raise CheckpointError(f"{name} is not a TRELLIS model class")
    args = args if args is not None else getattr(model, "trellis_args", None)
    if args is None:
        raise CheckpointError(f"{name} has no recorded constructor args; pass args=")
    dtypes = model.published_dtypes()
    state = {k: v.detach().to("cpu", dtypes[k]).contiguous() for k, v in model.state_dict().items()}
    if hasattr(model, "computed_buffers"):  # written as computed, whatever a cast did to the live buffer
        state.update({k: v.detach().cpu().contiguous() for k, v in model.computed_buffers().items()})
    json_path, st_path = path.with_name(path.name + ".json"), path.with_name(path.name + ".safetensors")
    tmp_json, tmp_st = json_path.with_suffix(".json.tmp"), st_path.with_suffix(".safetensors.tmp")
    tmp_json.write_text(json.dumps({"name": name, "args": args}, indent=4))
    save_file(state, str(tmp_st))
    os.replace(tmp_st, st_path)
    os.replace(tmp_json, json_path)
    return json_path, st_path
