"""Half precision on a CPU: `TrellisModule.set_precision` (generate's `precision`, evaluate's
`compute.precision`), the features stage's `features.dtype`, and `python -m mdt.bench.cpu_gemm`.

Expected values come from the float32 run of the same network on the same input: a bf16 torso must differ from
it (it really ran in bf16) by no more than bf16's rounding allows."""
from __future__ import annotations

import pytest
import torch

from mdt.models import from_pretrained
from mdt.models.base import FP16_PRIMITIVES
from mdt.models.zoo import save_tiny_model

CPU = torch.device("cpu")


def _dtypes(model):
    torso = {p.dtype for _, m in model.torso_primitives() for p in m.parameters(recurse=False)}
    rest = {p.dtype for n, m in model.named_modules() if not isinstance(m, FP16_PRIMITIVES)
            for p in m.parameters(recurse=False)}
    return torso, rest


@pytest.fixture(scope="module")
def slat_flow_path(tmp_path_factory):
    return save_tiny_model("slat_flow", tmp_path_factory.mktemp("prec") / "slat_flow")


def test_set_precision_on_cpu(slat_flow_path):
    m = from_pretrained(slat_flow_path, device=CPU)
    assert _dtypes(m.set_precision("auto", CPU)) == ({torch.float32}, {torch.float32})
    assert _dtypes(m.set_precision("bf16", CPU)) == ({torch.bfloat16}, {torch.float32})   # norms stay float32
    assert m.dtype == torch.bfloat16
    assert _dtypes(m.set_precision("fp16", CPU)) == ({torch.float16}, {torch.float32})
    assert _dtypes(m.set_precision("fp32", CPU)) == ({torch.float32}, {torch.float32})
    with pytest.raises(ValueError, match="precision must be one of"):
        m.set_precision("half", CPU)


def _slat_forward(path, precision):
    from mdt.generate import sparse_noise

    torch.manual_seed(0)
    net = from_pretrained(path, device=CPU).eval().set_precision(precision, CPU)
    coords = torch.unique(torch.randint(0, 64, (300, 3), generator=torch.Generator().manual_seed(1)), dim=0).int()
    x = sparse_noise([coords], net.in_channels, [torch.Generator().manual_seed(2)], CPU)
    cond = torch.randn(1, 8, net.trellis_args["cond_channels"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return net(x, torch.tensor([500.0]), cond).feats.float()


def test_bf16_torso_runs_in_bf16_close_to_float32(slat_flow_path):
    ref = _slat_forward(slat_flow_path, "fp32")
    out = _slat_forward(slat_flow_path, "bf16")
    rel = float((out - ref).norm() / ref.norm())
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per value): the output moves, by a few per cent at most
    assert 1e-4 < rel < 0.05, rel
    assert torch.equal(_slat_forward(slat_flow_path, "auto"), ref)   # auto on a CPU is float32


def test_generate_chain_honours_bf16_on_cpu(tmp_path):
    from mdt.config import load_config
    from mdt.generate import GenerateConfig, ImageTo3D, load_image
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "mug.png"
    sets = [("models.tiny_models", str(tmp_path / "tiny")), ("models.dinov2", str(tmp_path / "absent-dinov2")),
            ("output", str(tmp_path / "out")), ("num_samples", 1)]
    fp32 = load_config(GenerateConfig, "demo", sets, prefix="generate_")
    bf16 = load_config(GenerateConfig, "demo", sets + [("precision", "bf16")], prefix="generate_")
    pipe32, pipe16 = ImageTo3D.from_config(fp32), ImageTo3D.from_config(bf16)
    for slot in ("ss_flow", "slat_flow", "slat_decoder_gs"):
        assert pipe32.models[slot].dtype == torch.float32 and pipe16.models[slot].dtype == torch.bfloat16, slot
    gen = pipe16.run(load_image(example), num_samples=1, seed=3, formats=["gaussians", "mesh"])
    g = gen.samples[0].gaussians
    assert g.xyz.dtype == torch.float32 and g.xyz.shape[0] > 0 and torch.isfinite(g.xyz).all()
    mesh = gen.samples[0].mesh
    assert mesh is not None and len(mesh.faces) > 0 and torch.isfinite(torch.as_tensor(mesh.vertices)).all()


def test_features_dtype_on_cpu(tmp_path):
    from pipelines.preprocess.config import PreprocessConfig
    from pipelines.preprocess.features import Features
    from mdt.models.zoo import save_tiny_dinov2
    from mdt.config import ConfigError

    dino = save_tiny_dinov2(tmp_path / "dino", hidden_size=64)
    for dtype, want in (("bfloat16", torch.bfloat16), ("float16", torch.float32), ("float32", torch.float32)):
        cfg = PreprocessConfig()
        cfg.features.checkpoint, cfg.features.device, cfg.features.dtype = str(dino), "cpu", dtype
        stage = Features(cfg)
        assert next(stage.model.parameters()).dtype == want, dtype
    with pytest.raises(ConfigError, match="features.dtype"):
        type(cfg.features)(dtype="half")


def test_cpu_gemm_bench_prints_each_dtype_against_fp32(capsys, tmp_path):
    import json

    from mdt.bench import cpu_gemm

    assert cpu_gemm.main(["--size", "64", "32", "48", "--repeats", "1", "--json", str(tmp_path / "g.json")]) == 0
    out = capsys.readouterr().out
    assert "fp32" in out and "bf16" in out and "fp16" in out and "x fp32" in out
    res = json.loads((tmp_path / "g.json").read_text())
    assert res["size_mkn"] == [64, 32, 48] and res["vs_fp32"]["fp32"] == 1.0
    assert all(v > 0 for v in res["gflops"].values())
