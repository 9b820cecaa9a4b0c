"""Training checkpoints: student, EMA, optimizer, step, data position, RNG and the MLflow run id.

A checkpoint is a directory (Ray Train persists and restores it; this module only reads and writes files):

    student.safetensors     full float32 state dict of the student (TRELLIS key names)
    ema.safetensors         the same keys with the EMA parameters (buffers from the student)
    optimizer.safetensors   optimizer tensors, keys "<param fqn>/<name>" (e.g. blocks.0.attn.to_qkv.weight/exp_avg)
    optimizer.json          optimizer param groups and non-tensor state
    state.json              step, data position, skipped steps, clipper buffer, MLflow run id, model name/args
    rng/rank<r>.json        RNG states of worker r (torch, CUDA, numpy, python, the objective's generator)

No pickle anywhere: weights and optimizer state are safetensors, the rest is JSON. With FSDP the full state
dicts are gathered (a collective: every rank calls `collect_state`), and only rank 0 writes the weight files.
"""
from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import distribute_tensor

STATE_FILE = "state.json"


# --------------------------------------------------------------------------------------------------- RNG


def _b64(t: Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state(generator: torch.Generator | None = None) -> dict:
    st: dict[str, Any] = {"torch": _b64(torch.get_rng_state()), "python": _py_state(random.getstate())}
    np_state = np.random.get_state()
    st["numpy"] = [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    if generator is not None:
        st["generator"] = _b64(generator.get_state())
        st["generator_device"] = str(generator.device)
    return st


def _py_state(s):
    return [s[0], list(s[1]), s[2]]


def set_rng_state(st: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(_unb64(st["torch"]))
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in st["cuda"]])
    if generator is not None and "generator" in st:
        generator.set_state(_unb64(st["generator"]))


# --------------------------------------------------------------------------------------------------- collect


def _full(t: Tensor) -> Tensor:
    if hasattr(t, "full_tensor"):  # FSDP2 DTensor shard -> full tensor (collective)
        t = t.full_tensor()
    return t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).contiguous()


def collect_state(trainer, model_for_state: nn.Module | None = None) -> dict[str, Any]:
    """Full (gathered) student / EMA / optimizer state; a collective under FSDP. Returns CPU tensors."""

    model = model_for_state or trainer.student
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    student = {k: v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
               for k, v in get_model_state_dict(model, options=opts).items()}
    ema = None
    if trainer.ema is not None:
        ema = dict(student)
        for k, v in trainer.ema.shadow.items():
            ema[k] = _full(v)
    optim = get_optimizer_state_dict(model, trainer.optimizer, options=opts)
    return {"student": student, "ema": ema, "optim": optim}


def _optim_to_files(optim: dict) -> tuple[dict[str, Tensor], dict]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict] = {}
    for fqn, st in optim.get("state", {}).items():
        for name, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{fqn}/{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(fqn, {})[name] = v
    groups = []
    for g in optim.get("param_groups", []):
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optim_from_files(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, v in tensors.items():
        fqn, name = key.rsplit("/", 1)
        state.setdefault(fqn, {})[name] = v
    for fqn, sc in meta.get("scalars", {}).items():
        state.setdefault(fqn, {}).update(sc)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------------------------------- write / read


def write_checkpoint(directory: str | os.PathLike, collected: dict | None, state: dict, rank: int,
                     rng: dict | None) -> Path:
    """Write this rank's part of a checkpoint into `directory` (rank 0: everything; others: their RNG)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if rng is not None:
        (d / "rng").mkdir(exist_ok=True)
        (d / "rng" / f"rank{rank}.json").write_text(json.dumps(rng))
    if rank == 0:
        assert collected is not None
        save_file(collected["student"], str(d / "student.safetensors"))
        if collected.get("ema") is not None:
            save_file(collected["ema"], str(d / "ema.safetensors"))
        tensors, meta = _optim_to_files(collected["optim"])
        save_file(tensors, str(d / "optimizer.safetensors"))
        (d / "optimizer.json").write_text(json.dumps(meta))
        (d / STATE_FILE).write_text(json.dumps(state, indent=2))
    return d


def read_state(directory: str | os.PathLike) -> dict:
    return json.loads((Path(directory) / STATE_FILE).read_text())


def read_weights(directory: str | os.PathLike, which: str = "student") -> dict[str, Tensor]:
    return load_file(str(Path(directory) / f"{which}.safetensors"))


def read_rng(directory: str | os.PathLike, rank: int) -> dict | None:
    p = Path(directory) / "rng" / f"rank{rank}.json"
    return json.loads(p.read_text()) if p.exists() else None


def restore(trainer, directory: str | os.PathLike, model_for_state: nn.Module | None = None) -> dict:
    """Load student, EMA, optimizer and scalar state from a checkpoint directory (every rank calls this)."""

    d = Path(directory)
    model = model_for_state or trainer.student
    opts = StateDictOptions(full_state_dict=True)
    student = read_weights(d, "student")
    set_model_state_dict(model, student, options=opts)
    if trainer.ema is not None and (d / "ema.safetensors").exists():
        ema = read_weights(d, "ema")
        with torch.no_grad():
            for k, s in trainer.ema.shadow.items():
                v = ema[k]
                if hasattr(s, "device_mesh"):  # DTensor shard: take the local slice of the full tensor

                    v = distribute_tensor(v.to(s.device_mesh.device_type), s.device_mesh, s.placements)
                    s.copy_(v)
                else:
                    s.copy_(v.to(s.device))
    meta = json.loads((d / "optimizer.json").read_text())
    optim = _optim_from_files(load_file(str(d / "optimizer.safetensors")), meta)
    set_optimizer_state_dict(model, trainer.optimizer, optim, options=opts)
    state = read_state(d)
    trainer.load_scalar_state(state)
    return state
