"""Activation memory of the TRELLIS flow transformers in training, measured on small widths and extrapolated to
the released sizes.

    python -m mdt.bench.activations [--json PATH]

Measurement: the bytes the CPU allocator still holds after one training-mode forward (what autograd keeps for
the backward, plus the output), recorded by torch.profiler's memory events, at batch 1 and batch 2; per-sample
activation memory = the difference (fixed costs such as the timestep embedding cancel). Runs in float32.

Model (bytes per sample, float32; e = 4 bytes per element):

    SS flow   A = num_blocks · (a·L·C + b·T·C) · e
    SLat flow A = num_blocks · (a·L·C + b·T·C) · e + ((n_io · c · C_io + c' · C) · e + d) · N

L transformer tokens (SS: (resolution / patch)³; SLat: occupied cells after the ×2 downsampling), C the width,
T condition tokens (1374 for DINOv2 ViT-L/14-reg at 518 px), N SLat voxels, C_io the io blocks' width and n_io
the number of sparse residual blocks; c' · C per voxel is the first output block, which upsamples the
transformer's width (plus its skip) back to the 64³ voxels; d bytes per voxel do not depend on the width (the sparse convolutions'
neighbour indices). a and b are fitted by least squares on SS flows at several widths, token and condition
counts; c, c' and d on SLat flows with a and b fixed. With gradient checkpointing (`use_checkpoint`) the
blocks keep only their inputs (num_blocks · L · C · e) plus one block's activations while it is recomputed.
bf16 autocast stores most activations in 2 bytes: the model gives the float32 figure, an upper bound.
"""
from __future__ import annotations

import argparse
import json

import torch

from mdt.bench.models import shell_voxels
from mdt.models import build_model
from mdt.sparse import SparseTensor
from torch.profiler import ProfilerActivity, profile

COND_TOKENS_FULL = 1374
# The fit of `python -m mdt.bench.activations` (all points; measured on the 2-core CPU machine, torch 2.13.0): every
# measured point within 3% of the model. infra/estimate.py sizes the distillation presets with it.
MEASURED = {"a": 29.375, "b": 1.936, "c": 42.787, "c_wide": 43.311, "d": -35.3}
ELEMENT_BYTES = 4


def retained_forward_bytes(model: torch.nn.Module, inputs: tuple) -> int:
    """Bytes allocated during one forward (grad enabled) and still held when it returns."""

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(*inputs)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    del out
    return int(sum(n for _, n in events))


def _ss_inputs(args: dict, batch: int, cond_tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = args["resolution"]
    return (torch.randn(batch, args["in_channels"], r, r, r, generator=g), torch.full((batch,), 500.0),
            torch.randn(batch, cond_tokens, args["cond_channels"], generator=g))


def _slat_inputs(args: dict, batch: int, cond_tokens: int, voxels: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    one = shell_voxels(voxels, args["resolution"])
    coords = torch.cat([torch.cat([torch.full((one.shape[0], 1), b, dtype=one.dtype), one[:, 1:]], 1)
                        for b in range(batch)])
    x = SparseTensor(torch.randn(coords.shape[0], args["in_channels"], generator=g), coords, batch_size=batch)
    return (x, torch.full((batch,), 500.0), torch.randn(batch, cond_tokens, args["cond_channels"], generator=g))


def slat_tokens(voxels: int, resolution: int = 64, patch_size: int = 2) -> int:
    c = shell_voxels(voxels, resolution)[:, 1:] // patch_size
    return int(torch.unique(c, dim=0).shape[0])


def per_sample_bytes(name: str, args: dict, cond_tokens: int, voxels: int | None = None) -> int:
    """Measured activation bytes of one more sample (batch 2 minus batch 1), training mode, float32."""
    torch.manual_seed(0)
    model = build_model(name, dict(args)).float().train()
    if hasattr(model, "convert_to_fp32"):
        model.convert_to_fp32()
    sizes = []
    for batch in (1, 2):
        inputs = (_ss_inputs(args, batch, cond_tokens) if voxels is None
                  else _slat_inputs(args, batch, cond_tokens, voxels))
        sizes.append(retained_forward_bytes(model, inputs))
    return sizes[1] - sizes[0]


def _ss_args(width: int, resolution: int, blocks: int = 2, cond_channels: int = 32, checkpoint: bool = False):
    return dict(resolution=resolution, in_channels=8, out_channels=8, model_channels=width,
                cond_channels=cond_channels, num_blocks=blocks, num_heads=width // 32, mlp_ratio=4, patch_size=1,
                pe_mode="ape", qk_rms_norm=True, use_fp16=False, use_checkpoint=checkpoint)


def _slat_args(width: int, io_width: int, blocks: int = 2, checkpoint: bool = False):
    return dict(resolution=64, in_channels=8, out_channels=8, model_channels=width, cond_channels=32,
                num_blocks=blocks, num_heads=width // 32, mlp_ratio=4, patch_size=2, num_io_res_blocks=2,
                io_block_channels=[io_width], pe_mode="ape", qk_rms_norm=True, use_fp16=False,
                use_checkpoint=checkpoint)


# (width, SS resolution -> L = resolution³, condition tokens): tiny and mid widths, a few token counts
SS_POINTS = [(64, 8, 16), (64, 12, 16), (64, 8, 256), (128, 8, 16), (128, 12, 64), (128, 10, 256)]
SLAT_POINTS = [(64, 16, 1500), (64, 32, 3000), (128, 16, 3000), (64, 16, 3000), (128, 32, 1500)]   # (width, io width, voxels)
N_IO_BLOCKS = 4          # SLatFlowModel with num_io_res_blocks 2 and one io level: 2 input + 2 output blocks


def fit(quick: bool = False) -> dict:
    """Measure the points and fit a, b (SS) and c (SLat io blocks); also the checkpointed SS figure."""
    ss_points = SS_POINTS[:3] if quick else SS_POINTS
    slat_points = SLAT_POINTS[:3] if quick else SLAT_POINTS
    rows, targets, measured = [], [], []
    for width, res, cond in ss_points:
        args = _ss_args(width, res)
        m = per_sample_bytes("SparseStructureFlowModel", args, cond)
        L = res ** 3
        rows.append([args["num_blocks"] * L * width * ELEMENT_BYTES, args["num_blocks"] * cond * width * ELEMENT_BYTES])
        targets.append(float(m))
        measured.append({"model": "ss_flow", "width": width, "tokens": L, "cond_tokens": cond, "bytes": m})
    sol = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                             torch.tensor(targets, dtype=torch.float64)[:, None]).solution[:, 0]
    a, b = float(sol[0]), float(sol[1])
    io_rows, io_targets = [], []
    for width, io_width, voxels in slat_points:
        args = _slat_args(width, io_width)
        m = per_sample_bytes("SLatFlowModel", args, 16, voxels)
        L = slat_tokens(voxels)
        transformer = args["num_blocks"] * (a * L * width + b * 16 * width) * ELEMENT_BYTES
        io_rows.append([N_IO_BLOCKS * voxels * io_width * ELEMENT_BYTES, voxels * width * ELEMENT_BYTES, voxels])
        io_targets.append(m - transformer)
        measured.append({"model": "slat_flow", "width": width, "io_width": io_width, "voxels": voxels,
                         "tokens": L, "cond_tokens": 16, "bytes": m})
    sol = torch.linalg.lstsq(torch.tensor(io_rows, dtype=torch.float64),
                             torch.tensor(io_targets, dtype=torch.float64)[:, None]).solution[:, 0]
    c, c_wide, d = float(sol[0]), float(sol[1]), float(sol[2])
    # checkpointed: one point, compared with the model's num_blocks·L·C + one block
    width, res, cond = ss_points[1]
    args = _ss_args(width, res, blocks=4, checkpoint=True)
    m_ckpt = per_sample_bytes("SparseStructureFlowModel", args, cond)
    m_full = per_sample_bytes("SparseStructureFlowModel", _ss_args(width, res, blocks=4), cond)
    for r in measured:
        r["model_bytes"] = predict(r, {"a": a, "b": b, "c": c, "c_wide": c_wide, "d": d})
    return {"a": a, "b": b, "c": c, "c_wide": c_wide, "d": d, "points": measured,
            "checkpoint_point": {"width": width, "tokens": res ** 3, "blocks": 4, "bytes_checkpointed": m_ckpt,
                                 "bytes_plain": m_full, "ratio": m_ckpt / m_full}}


def predict(point: dict, coef: dict, blocks: int = 2, checkpoint: bool = False) -> float:
    """Bytes per sample for a point dict (width, tokens, cond_tokens[, voxels, io_width]) and fitted coefficients."""
    C, L, T = point["width"], point["tokens"], point["cond_tokens"]
    block = (coef["a"] * L * C + coef["b"] * T * C) * ELEMENT_BYTES
    total = blocks * L * C * ELEMENT_BYTES + block if checkpoint else blocks * block
    if "voxels" in point:
        total += ((N_IO_BLOCKS * coef["c"] * point["io_width"] + coef["c_wide"] * C) * ELEMENT_BYTES
                  + coef["d"]) * point["voxels"]
    return total


def full_size(coef: dict, voxels: int = 21_000, tokens: int | None = None) -> dict:
    """Per-sample activation GiB of the released flows (24 blocks, width 1024, 1374 condition tokens), float32,
    with and without gradient checkpointing; SLat at `voxels` voxels (a typical TRELLIS structure, ~8% of 64³)
    and `tokens` transformer tokens (None: those of a spherical shell of that many voxels, `slat_tokens`)."""
    ss = {"width": 1024, "tokens": 16 ** 3, "cond_tokens": COND_TOKENS_FULL}
    slat = {"width": 1024, "tokens": tokens or slat_tokens(voxels), "cond_tokens": COND_TOKENS_FULL, "voxels": voxels,
            "io_width": 128}
    gib = 2 ** 30
    return {"ss_flow": {"tokens": ss["tokens"], "gib": predict(ss, coef, 24) / gib,
                        "gib_checkpointed": predict(ss, coef, 24, checkpoint=True) / gib},
            "slat_flow": {"tokens": slat["tokens"], "voxels": voxels, "gib": predict(slat, coef, 24) / gib,
                          "gib_checkpointed": predict(slat, coef, 24, checkpoint=True) / gib}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write the fit and the full-size figures here")
    p.add_argument("--quick", action="store_true", help="fewer measurement points (tests)")
    a = p.parse_args(argv)
    coef = fit(quick=a.quick)
    full = full_size(coef)
    for r in coef["points"]:
        print(f"{r['model']:<9} width {r['width']:>4} tokens {r['tokens']:>5} cond {r['cond_tokens']:>4}: measured "
              f"{r['bytes'] / 2 ** 20:8.2f} MiB, model {r['model_bytes'] / 2 ** 20:8.2f} MiB")
    print(f"a = {coef['a']:.2f}, b = {coef['b']:.2f}, c = {coef['c']:.2f}, c' = {coef['c_wide']:.2f} "
          f"(elements per token·channel), "
          f"d = {coef['d']:.0f} bytes per voxel")
    ck = coef["checkpoint_point"]
    print(f"gradient checkpointing, 4 blocks, width {ck['width']}, {ck['tokens']} tokens: "
          f"{ck['bytes_checkpointed'] / 2 ** 20:.2f} vs {ck['bytes_plain'] / 2 ** 20:.2f} MiB ({ck['ratio']:.2f}x)")
    for k, v in full.items():
        print(f"full size {k}: {v['tokens']} tokens, {v['gib']:.2f} GiB per sample, "
              f"{v['gib_checkpointed']:.2f} GiB with gradient checkpointing (float32)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"fit": coef, "full_size": full}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
