"""TRELLIS.2 flows, sampler and DINOv3 conditioner against the golden outputs of the real TRELLIS.2 code, through
the public API (`from_pretrained`, `FlowEulerGuidanceIntervalSampler`, `ImageConditioner`); the full-size layouts
of the five released flows on the meta device; the checkpoint format (bf16 torso, `rope_phases` present or not)."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import shared_path
from mdt.flow import FlowEulerGuidanceIntervalSampler, count_nfe_trellis2, trellis2_guided_velocity
from mdt.models import (CheckpointError, ElasticSLatFlowModel, SLatFlowModel, SparseStructureFlowModel,
                        Trellis2ElasticSLatFlowModel, Trellis2SLatFlowModel, Trellis2SparseStructureFlowModel,
                        build_model, from_pretrained, save_pretrained)
from mdt.sparse import SparseTensor

TOL = 1e-4
FLOW_CASES = ["t2_ss_flow", "t2_slat_flow_shape", "t2_slat_flow_tex"]
SAMPLE_KEY = re.compile(r"sample_w([\d.]+)_rescale([\d.]+)_steps(\d+)_t([\d.]+)_interval([\d.]+)_([\d.]+)$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "complex64": torch.complex64}


def golden(case: str):
    root = shared_path("reference", "trellis2-golden")
    return from_pretrained(root / case), load_file(str(root / f"{case}.io.safetensors"))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def model_inputs(io) -> tuple:
    """(x, kwargs) as the case's model takes them: dense x, or a SparseTensor (+ concat_cond for the texture)."""
    if "coords" not in io:
        return io["x"], {}
    kwargs = {"concat_cond": SparseTensor(io["concat_feats"], io["coords"])} if "concat_feats" in io else {}
    return SparseTensor(io["feats"], io["coords"]), kwargs


@pytest.mark.parametrize("case", FLOW_CASES)
def test_flow_matches_golden(case):
    model, io = golden(case)
    assert type(model).__name__.startswith("Trellis2")
    x, kwargs = model_inputs(io)
    with torch.no_grad():
        out = model(x, io["t"], io["cond"], **kwargs)
    if isinstance(out, SparseTensor):
        assert torch.equal(out.coords, io["coords"].int())
        assert max_err(out.feats, io["out_feats"]) < TOL
    else:
        assert max_err(out, io["out"]) < TOL


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "two-passes"])
@pytest.mark.parametrize("case", FLOW_CASES)
def test_sampler_matches_golden(case, batched):
    model, io = golden(case)
    keys = [k for k in io if SAMPLE_KEY.match(k)]
    assert len(keys) == 2, keys
    x, kwargs = model_inputs(io)
    noise = x.replace(io["sample_noise"]) if isinstance(x, SparseTensor) else io["sample_noise"]
    for key in keys:
        w, r, steps, rescale_t, lo, hi = SAMPLE_KEY.match(key).groups()
        out = FlowEulerGuidanceIntervalSampler(1e-5).sample(
            model, noise, io["cond"], steps=int(steps), rescale_t=float(rescale_t), neg_cond=io["sample_neg_cond"],
            guidance_strength=float(w), guidance_rescale=float(r), guidance_interval=(float(lo), float(hi)),
            batched=batched, **kwargs)
        got = out.feats if isinstance(out, SparseTensor) else out
        assert max_err(got, io[key]) < TOL, key


def test_dinov3_conditioner_matches_golden():
    from mdt.conditioning import ImageConditioner

    root = shared_path("reference", "trellis2-golden")
    io = load_file(str(root / "t2_dinov3_tiny.io.safetensors"))
    conditioner = ImageConditioner(str(root / "t2_dinov3_tiny"), image_size=64)
    assert type(conditioner.model).__name__ == "DINOv3ViTModel"
    cond = conditioner(io["image"])
    assert max_err(cond, io["features"]) < TOL
    assert conditioner.num_tokens() == cond.shape[1]
    assert torch.equal(conditioner.get_cond(io["image"])["neg_cond"], torch.zeros_like(cond))


def manifest() -> dict:
    return json.loads(shared_path("reference", "trellis2-flow-state-dict-shapes.json").read_text())


FULL_SIZE = ["ss_flow_img_dit_1_3B_64_bf16", "slat_flow_img2shape_dit_1_3B_512_bf16",
             "slat_flow_img2shape_dit_1_3B_512_bf16_ft1024", "slat_flow_imgshape2tex_dit_1_3B_512_bf16",
             "slat_flow_imgshape2tex_dit_1_3B_512_bf16_ft1024"]


@pytest.mark.parametrize("stem", FULL_SIZE)
def test_full_size_layout_matches_release(stem):
    entry = manifest()[stem]
    model = build_model(entry["name"], entry["args"], device="meta")
    assert type(model).__name__ == "Trellis2" + entry["name"]
    model.convert_to(torch.bfloat16)
    state = model.state_dict()
    expected = {k: (tuple(shape), DTYPES[dtype]) for k, (shape, dtype) in entry["state_dict"].items()}
    assert sorted(state) == sorted(expected)
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == expected
    assert model.published_dtypes() == {k: d for k, (_, d) in expected.items()}
    assert sum(p.numel() for p in model.parameters()) == entry["parameters"]
    assert entry["parameters"] == sum(math.prod(s) for k, (s, _) in expected.items() if k != "rope_phases")


def test_family_told_apart_by_args():
    v1 = {"resolution": 8, "in_channels": 8, "out_channels": 8, "model_channels": 32, "cond_channels": 16,
          "num_blocks": 1, "num_heads": 2, "patch_size": 1, "pe_mode": "ape"}
    v2 = {"resolution": 8, "in_channels": 8, "out_channels": 8, "model_channels": 48, "cond_channels": 16,
          "num_blocks": 1, "num_heads": 2, "pe_mode": "rope", "share_mod": True}
    assert type(build_model("SparseStructureFlowModel", v1)) is SparseStructureFlowModel
    assert type(build_model("SparseStructureFlowModel", v2)) is Trellis2SparseStructureFlowModel
    slat2 = {**v2, "in_channels": 32, "out_channels": 32}
    assert type(build_model("SLatFlowModel", slat2)) is Trellis2SLatFlowModel
    assert type(build_model("ElasticSLatFlowModel", slat2)) is Trellis2ElasticSLatFlowModel
    assert not isinstance(build_model("SLatFlowModel", slat2), (SLatFlowModel, ElasticSLatFlowModel))
    with pytest.raises(CheckpointError, match="cannot be built"):
        build_model("SparseStructureFlowModel", {**v2, "patch_size": 2})


def test_rope_phases_accepted_present_or_absent(tmp_path):
    root = shared_path("reference", "trellis2-golden")
    model, io = golden("t2_ss_flow")
    assert "rope_phases" not in load_file(str(root / "t2_ss_flow.safetensors"))
    save_pretrained(model, tmp_path / "with_phases")
    stored = load_file(str(tmp_path / "with_phases.safetensors"))
    assert stored["rope_phases"].dtype == torch.complex64 and stored["rope_phases"].shape == (8 ** 3, 8)
    reloaded = from_pretrained(tmp_path / "with_phases")
    with torch.no_grad():
        assert max_err(reloaded(io["x"], io["t"], io["cond"]), io["out"]) < TOL
    # A file whose rope_phases disagree with the config is refused, not used.
    stored["rope_phases"] = stored["rope_phases"] * torch.polar(torch.ones(()), torch.tensor(0.5))
    save_file(stored, str(tmp_path / "bad.safetensors"))
    (tmp_path / "bad.json").write_text((tmp_path / "with_phases.json").read_text())
    with pytest.raises(CheckpointError, match="rope_phases"):
        from_pretrained(tmp_path / "bad")


@pytest.mark.parametrize("case", ["t2_ss_flow", "t2_slat_flow_tex"])
def test_bf16_checkpoint_round_trip(tmp_path, case):
    """Saved in the release's layout (bf16 torso linears, float32 elsewhere, same json name), loaded back exactly."""
    model, io = golden(case)
    model.convert_to(torch.bfloat16)
    json_path, st_path = save_pretrained(model, tmp_path / "student")
    assert json.loads(json_path.read_text())["name"] == json.loads(
        (shared_path("reference", "trellis2-golden") / f"{case}.json").read_text())["name"]
    with safe_open(str(st_path), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    torso = {k for k in dtypes if k.startswith("blocks.") and re.search(r"\.(to_\w+|mlp\.mlp\.\d)\.(weight|bias)$", k)}
    assert torso and all(dtypes[k] == "BF16" for k in torso)
    assert all(d in ("F32", "C64") for k, d in dtypes.items() if k not in torso)
    reloaded = from_pretrained(tmp_path / "student", keep_fp16=True)
    assert reloaded.dtype == torch.bfloat16
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), k
    x, kwargs = model_inputs(io)
    with torch.no_grad():
        a, b = model(x, io["t"], io["cond"], **kwargs), reloaded(x, io["t"], io["cond"], **kwargs)
    a, b = (a.feats, b.feats) if isinstance(a, SparseTensor) else (a, b)
    assert torch.equal(a, b)
    ref = io["out_feats"] if "out_feats" in io else io["out"]
    assert 0 < max_err(a, ref) < 0.2 * ref.abs().max().item()   # bf16 torso: close to, not equal to, float32


def test_guidance_forms_agree_and_rescale_is_per_sample():
    """TRELLIS's (1 + w)·v_c − w·v_u equals TRELLIS.2's w'·v_c + (1 − w')·v_u at w' = 1 + w; the rescale uses each
    sample's own std (a sample's result does not depend on the other samples in the batch)."""
    from mdt.flow import guided_velocity, trellis2_strength

    torch.manual_seed(0)
    weight = torch.randn(8, 8)
    model = lambda x, t, c: torch.tanh(x @ weight + c[:, :1, :] * (1 + t[:, None, None] / 1000))  # noqa: E731
    x, cond, t = torch.randn(3, 5, 8), torch.randn(3, 1, 8), torch.rand(3)
    v1 = guided_velocity(model, x, t, cond, None, 2.5)
    v2 = trellis2_guided_velocity(model, x, t, cond, None, trellis2_strength(2.5))
    assert torch.allclose(v1, v2, atol=1e-6)
    both = trellis2_guided_velocity(model, x, t, cond, None, 3.0, rescale=0.7)
    alone = trellis2_guided_velocity(model, x[:1], t[:1], cond[:1], None, 3.0, rescale=0.7)
    assert torch.allclose(both[:1], alone, atol=1e-6)
    assert not torch.allclose(both, trellis2_guided_velocity(model, x, t, cond, None, 3.0), atol=1e-3)


def test_nfe_of_released_defaults():
    """Released settings: SS 12 steps w 7.5 on [0.6, 1] with rescale_t 5; shape 12, 7.5, [0.6, 1], rescale_t 3;
    texture 12 steps at w 1 (one pass each)."""
    ss, shape, tex = (count_nfe_trellis2(12, 7.5, (0.6, 1.0), 5.0), count_nfe_trellis2(12, 7.5, (0.6, 1.0), 3.0),
                      count_nfe_trellis2(12, 1.0, (0.6, 0.9), 3.0))
    grid_ss = [5 * t / (1 + 4 * t) for t in torch.linspace(1, 0, 13, dtype=torch.float64).tolist()][:-1]
    assert ss == 12 + sum(t >= 0.6 for t in grid_ss)
    assert tex == 12
    assert (ss, shape, tex) == (22, 21, 12)
