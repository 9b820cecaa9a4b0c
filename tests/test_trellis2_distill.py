"""TRELLIS.2 teachers in the distillation job: the objectives' teacher targets in TRELLIS.2's guidance form with
the CFG weight mapped w' = 1 + w, teacher-generated latents (shape; texture with the shape latent as concat_cond),
and the three `trellis2-*-ci` presets through the CLI as shipped, each on a tiny TRELLIS.2-architecture teacher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _distill_helpers import PROJECT_ROOT, write_tiny_shards

# Tiny TRELLIS.2-architecture flows (the released args at CPU size): RoPE, shared modulation + per-block bias,
# qk RMS norm in self- and cross-attention, no patching; cond_channels = the tiny DINOv3's 32.
TINY_T2 = dict(model_channels=48, cond_channels=32, num_blocks=1, num_heads=2, mlp_ratio=2, pe_mode="rope",
               share_mod=True, initialization="scaled", qk_rms_norm=True, qk_rms_norm_cross=True)
SHAPE_CHANNELS = 8


def tiny_trellis2(path: Path, name: str, seed: int, **args) -> str:
    """A TRELLIS.2 flow with every weight random (N(0, 1/fan_in) matrices, small biases), in its checkpoint format."""
    from mdt.models import build_model, save_pretrained

    model = build_model(name, {**TINY_T2, **args})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5 if p.dim() > 1 else
                    (1.0 if k.endswith("gamma") or "norm" in k else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    save_pretrained(model, path)
    return str(path)


def shape_teacher(tmp: Path) -> str:
    return tiny_trellis2(tmp / "shape", "SLatFlowModel", 1, resolution=64, in_channels=SHAPE_CHANNELS,
                         out_channels=SHAPE_CHANNELS)


def tex_teacher(tmp: Path) -> str:
    return tiny_trellis2(tmp / "tex", "SLatFlowModel", 2, resolution=64, in_channels=2 * SHAPE_CHANNELS,
                         out_channels=SHAPE_CHANNELS)


def test_objective_targets_use_trellis2_guidance_form(tmp_path):
    """MDT-dist's weight w reaches a TRELLIS.2 teacher as w' = 1 + w in w'·v_c + (1 − w')·v_u (through the
    training wrapper); w' = w would give another velocity."""
    from mdt.distill.losses import guidance_form, guided_call
    from mdt.flow import trellis2_guided_velocity
    from mdt.models import from_pretrained
    from mdt.sparse import SparseTensor
    from mdt.training.wrappers import FrozenTeacher

    teacher = from_pretrained(shape_teacher(tmp_path))
    wrapped = FrozenTeacher(teacher)
    assert guidance_form(wrapped) == "trellis2"
    coords = torch.tensor([[0, 1, 2, 3], [0, 4, 4, 4], [0, 5, 1, 0], [1, 2, 2, 2], [1, 3, 3, 1]], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    x = SparseTensor(torch.randn(5, SHAPE_CHANNELS, generator=g), coords)
    cond, t = torch.randn(2, 3, 32, generator=g), torch.tensor([0.7, 0.3])
    with torch.no_grad():
        got = guided_call(wrapped, x, x.feats, t, cond, None, 2.0)
        want = trellis2_guided_velocity(teacher, x, t, cond, None, 3.0).feats
        wrong = trellis2_guided_velocity(teacher, x, t, cond, None, 2.0).feats
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, wrong, atol=1e-3)


def test_texture_batch_binds_shape_latent_in_every_call(tmp_path):
    """Teacher-generated texture batch: concat_cond is the shape teacher's sample on the batch's coordinates, x0 the
    texture teacher's sample given it; one MDT step of a texture student trains with that concat_cond bound, and
    the loss changes when another concat_cond is bound (it is really used)."""
    from mdt.distill import MDTConfig, mdt_loss
    from mdt.models import from_pretrained
    from mdt.sparse import SparseTensor
    from mdt.training.config import TeacherDataConfig, TeacherSamplerConfig
    from mdt.training.step import bound_concat_cond
    from mdt.training.teacher_data import teacher_batch

    tex, shape = from_pretrained(tex_teacher(tmp_path)), from_pretrained(shape_teacher(tmp_path))
    student = from_pretrained(str(tmp_path / "tex"))
    coords = torch.tensor([[0, 1, 2, 3], [0, 4, 4, 4], [0, 5, 1, 0], [1, 2, 2, 2], [1, 3, 3, 1]], dtype=torch.int32)
    shard = SparseTensor(torch.zeros(5, 8), coords)
    tcfg = TeacherDataConfig(enabled=True, resolution=64, sampler=TeacherSamplerConfig(steps=2, guidance_strength=1.0),
                             shape_sampler=TeacherSamplerConfig(steps=2))
    cond = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    batch = teacher_batch({"x0": shard, "cond": cond}, tex, tcfg, torch.Generator().manual_seed(2), shape)
    assert torch.equal(batch["x0"].coords, coords) and torch.equal(batch["concat_cond"].coords, coords)
    assert batch["x0"].feats.shape == (5, SHAPE_CHANNELS) and batch["concat_cond"].feats.abs().sum() > 0
    pooled = teacher_batch({"x0": shard, "cond": cond}, tex, TeacherDataConfig(enabled=True, resolution=16,
                           sampler=TeacherSamplerConfig(steps=1)), torch.Generator(), shape)["x0"]
    assert pooled.coords.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]]  # 64³ // 4
    cfg = MDTConfig(w_vm=2.0, w_vd=3.0)

    def loss(concat):
        with bound_concat_cond((student, tex), concat):
            return float(mdt_loss(student, tex, batch, cfg, torch.Generator().manual_seed(3))["loss"].detach())

    with pytest.raises(ValueError, match="input channels"):
        loss(None)
    base = loss(batch["concat_cond"])
    assert torch.isfinite(torch.tensor(base))
    assert abs(loss(batch["concat_cond"].replace(-batch["concat_cond"].feats)) - base) > 1e-6


def _cli(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "jobs" / "distill.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("trellis2") / "data", n=4, image_size=64)


STAGES = {
    "ss": lambda tmp: ["--teacher", tiny_trellis2(tmp / "ss", "SparseStructureFlowModel", 0, resolution=16,
                                                  in_channels=8, out_channels=8)],
    "shape": lambda tmp: ["--teacher", shape_teacher(tmp)],
    "tex": lambda tmp: ["--teacher", tex_teacher(tmp), "--shape-teacher", shape_teacher(tmp)],
}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_trellis2_ci_preset_distils_each_stage(stage, shards, tmp_path):
    teachers = STAGES[stage](tmp_path)
    r = _cli(["--preset", f"trellis2-{stage}-ci", "--data", str(shards), *teachers], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    run_dir = tmp_path / "outputs" / "distill-trellis2-ci" / f"{'ss' if stage == 'ss' else 'slat'}-mdt"
    res = json.loads((run_dir / "result.json").read_text())
    assert res["error"] is None and res["metrics"]["step"] == 2
    stem = {"ss": "ss_flow_trellis2_student", "shape": "slat_flow_trellis2_shape_student",
            "tex": "slat_flow_trellis2_tex_student"}[stage]
    exported = Path(res["export_dir"], "ema", stem)
    saved = json.loads(exported.with_suffix(".json").read_text())
    assert saved["args"]["pe_mode"] == "rope" and saved["args"]["share_mod"] is True
    from mdt.models import from_pretrained

    student = from_pretrained(exported)
    assert type(student).__name__.startswith("Trellis2")
    assert res["metrics"]["loss"] == res["metrics"]["loss"]  # finite, not NaN


def test_gpu_presets_name_the_released_flows():
    """The GPU presets load and validate; their teachers are released TRELLIS.2 flows (stems of the manifest of
    the five released layouts), the conditioner is DINOv3 at 512 px and the student is sharded."""
    from conftest import shared_path
    from mdt.config import load_config
    from pipelines.distill.config import DistillJobConfig

    released = set(json.loads(shared_path("reference", "trellis2-flow-state-dict-shapes.json").read_text()))
    for preset, stage in (("trellis2-ss", "ss"), ("trellis2-shape", "slat"), ("trellis2-tex", "slat")):
        cfg = load_config(DistillJobConfig, preset, [("data.uri", "s3://bucket/shards")], prefix="distill_").validate()
        assert cfg.stage == stage and cfg.train.fsdp and cfg.condition.image_size == 512
        assert cfg.condition.model == "facebook/dinov3-vitl16-pretrain-lvd1689m"
        for path in filter(None, (cfg.model.teacher, cfg.model.shape_teacher)):
            assert path.startswith("microsoft/TRELLIS.2-4B/ckpts/") and path.rsplit("/", 1)[1] in released
        assert cfg.teacher_data.enabled == (stage == "slat")
    tex = load_config(DistillJobConfig, "trellis2-tex", [("data.uri", "x")], prefix="distill_")
    assert (tex.teacher_data.sampler.guidance_strength, tex.teacher_data.sampler.guidance_interval) == (1.0, [0.6, 0.9])
    assert tex.model.shape_teacher.endswith("img2shape_dit_1_3B_512_bf16")
