"""Gradient checkpointing of the flows (TRELLIS's `use_checkpoint`): the same gradients as without it, less
memory kept for the backward, honoured by the distillation presets through `model.gradient_checkpointing`,
and the activation-memory model that sizes the presets."""
from __future__ import annotations

import json

import pytest
import torch

from mdt.bench import activations
from mdt.models import SLatFlowModel, SparseStructureFlowModel
from mdt.sparse import SparseTensor

SS_ARGS = dict(resolution=8, in_channels=4, out_channels=4, model_channels=32, cond_channels=16, num_blocks=3,
               num_heads=2, mlp_ratio=2, patch_size=2, pe_mode="ape", qk_rms_norm=True, use_fp16=False)
SLAT_ARGS = dict(resolution=16, in_channels=4, out_channels=4, model_channels=32, cond_channels=16, num_blocks=3,
                 num_heads=2, mlp_ratio=2, patch_size=2, num_io_res_blocks=1, io_block_channels=[16], pe_mode="ape",
                 qk_rms_norm=True, use_fp16=False)


def _perturbed(cls, args):
    torch.manual_seed(0)
    model = cls(**args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():     # TRELLIS zero-initialises the output layers: make every gradient non-zero
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.train()


def _inputs(kind: str):
    g = torch.Generator().manual_seed(2)
    cond = torch.randn(2, 5, 16, generator=g)
    t = torch.tensor([300.0, 800.0])
    if kind == "ss":
        return torch.randn(2, 4, 8, 8, 8, generator=g), t, cond
    coords = []
    for b, n in enumerate((60, 90)):
        idx = torch.randperm(16 ** 3, generator=g)[:n].sort().values
        coords.append(torch.cat([torch.full((n, 1), b), torch.stack([idx // 256, (idx // 16) % 16, idx % 16], 1)], 1))
    coords = torch.cat(coords).int()
    return SparseTensor(torch.randn(len(coords), 4, generator=g), coords, batch_size=2), t, cond


def _grads(model, inputs):
    out = model(*inputs)
    f = out.feats if isinstance(out, SparseTensor) else out
    (f.double() * torch.linspace(-1, 1, f.numel(), dtype=torch.float64).reshape(f.shape)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["ss", "slat"])
def test_checkpointing_gives_identical_gradients_and_keeps_less(kind):
    cls, args = {"ss": (SparseStructureFlowModel, SS_ARGS), "slat": (SLatFlowModel, SLAT_ARGS)}[kind]
    plain, ckpt = _perturbed(cls, args), _perturbed(cls, {**args, "use_checkpoint": True})
    inputs = _inputs(kind)
    g_plain, g_ckpt = _grads(plain, inputs), _grads(ckpt, inputs)
    assert g_plain.keys() == g_ckpt.keys()
    for n in g_plain:
        assert torch.equal(g_plain[n], g_ckpt[n]), n
    assert any(g.abs().sum() > 0 for n, g in g_plain.items() if n.startswith("blocks.0."))
    # the flag changes what the forward keeps for the backward (a flow that ignored it would keep the same)
    kept_plain = activations.retained_forward_bytes(plain, inputs)
    kept_ckpt = activations.retained_forward_bytes(ckpt, inputs)
    assert kept_ckpt < 0.7 * kept_plain, (kept_ckpt, kept_plain)


def test_build_student_honours_gradient_checkpointing(tmp_path):
    from mdt.models import save_pretrained
    from mdt.training.build import build_student
    from mdt.training.config import ModelConfig

    save_pretrained(_perturbed(SparseStructureFlowModel, SS_ARGS), tmp_path / "teacher")
    off = build_student(ModelConfig(teacher=str(tmp_path / "teacher")), torch.device("cpu"))
    on = build_student(ModelConfig(teacher=str(tmp_path / "teacher"), gradient_checkpointing=True),
                       torch.device("cpu"))
    assert off.use_checkpoint is False and on.use_checkpoint is True


@pytest.mark.parametrize("preset", ["trellis-ss", "trellis-slat", "trellis-image-large"])
def test_trellis_presets_checkpoint_the_student(preset):
    from mdt.training.config import load_trainer_config

    cfg = load_trainer_config(preset, [("data.uri", "x")])
    assert cfg.model.gradient_checkpointing is True


def test_activation_model_predicts_a_fresh_measurement():
    """The stored coefficients (measured by `python -m mdt.bench.activations`) predict a point they were not
    fitted on, within 10%."""
    args = activations._ss_args(96, 10, blocks=3, cond_channels=32)
    measured = activations.per_sample_bytes("SparseStructureFlowModel", args, 40)
    point = {"width": 96, "tokens": 1000, "cond_tokens": 40}
    predicted = activations.predict(point, activations.MEASURED, blocks=3)
    assert predicted == pytest.approx(measured, rel=0.10)
    # and the SLat flow's voxel terms
    sargs = activations._slat_args(96, 24)
    measured = activations.per_sample_bytes("SLatFlowModel", sargs, 16, 2000)
    point = {"width": 96, "tokens": activations.slat_tokens(2000), "cond_tokens": 16, "voxels": 2000, "io_width": 24}
    assert activations.predict(point, activations.MEASURED, blocks=2) == pytest.approx(measured, rel=0.15)


def test_estimate_uses_the_activation_model(capsys):
    from infra import estimate

    estimate.main(["--json"])
    out = json.loads(capsys.readouterr().out)
    mem = out["distill_memory"]
    for stage in ("ss", "slat"):
        m = mem[stage]
        assert m["per_gpu_batch"] == 8 and m["micro_batch"] == 4 and m["gradient_checkpointing"] is True
        assert m["activations_gib"] == pytest.approx(m["micro_batch"] * m["graphs_with_grad"]
                                                     * m["activation_gib_per_sample"])
        assert m["total_gib"] < 80
