"""TRELLIS-format checkpoint I/O: round trip, published dtype layout, hub paths, clear errors, no pickle."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from mdt.models import (CheckpointError, SLatFlowModel, SparseStructureFlowModel, from_pretrained, save_pretrained)
from mdt.sparse import SparseTensor

TINY_SS = dict(resolution=8, in_channels=8, out_channels=8, model_channels=64, cond_channels=32, num_blocks=2,
               num_heads=4, mlp_ratio=4, patch_size=1, pe_mode="ape", qk_rms_norm=True, use_fp16=False)
TINY_SLAT = dict(resolution=16, in_channels=8, out_channels=8, model_channels=64, cond_channels=32, num_blocks=2,
                 num_heads=4, mlp_ratio=4, patch_size=2, num_io_res_blocks=1, io_block_channels=[16], pe_mode="ape",
                 qk_rms_norm=True, use_fp16=False)


def randomise(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_round_trip_is_bit_exact_and_outputs_identical(tmp_path):
    model = randomise(SparseStructureFlowModel(**TINY_SS)).eval()
    save_pretrained(model, tmp_path / "ss_flow")
    assert json.loads((tmp_path / "ss_flow.json").read_text()) == {"name": "SparseStructureFlowModel", "args": TINY_SS}
    loaded = from_pretrained(tmp_path / "ss_flow")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x, t, c = torch.randn(2, 8, 8, 8, 8), torch.tensor([100.0, 900.0]), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(model(x, t, c), loaded(x, t, c))
    # A second save of the loaded model writes the same bytes.
    save_pretrained(loaded, tmp_path / "again")
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "ss_flow.safetensors").read_bytes()


def test_fp16_models_are_written_in_the_published_mixed_layout(tmp_path):
    args = {**TINY_SLAT, "use_fp16": True}
    model = SLatFlowModel(**args)
    assert model.blocks[0].self_attn.to_qkv.weight.dtype == torch.float16        # torso primitive
    assert model.blocks[0].self_attn.q_rms_norm.gamma.dtype == torch.float32    # RMS gamma stays fp32
    assert model.blocks[0].norm2.weight.dtype == torch.float32
    assert model.input_blocks[0].conv1.conv.weight.dtype == torch.float16
    assert model.input_layer.weight.dtype == torch.float32
    model.float()  # e.g. a student trained in fp32 on CPU
    save_pretrained(model, tmp_path / "slat")
    stored = load_file(str(tmp_path / "slat.safetensors"))
    assert stored["blocks.0.mlp.mlp.0.weight"].dtype == torch.float16
    assert stored["blocks.0.norm2.weight"].dtype == torch.float32
    assert stored["t_embedder.mlp.0.weight"].dtype == torch.float32
    header_len = struct.unpack("<Q", (tmp_path / "slat.safetensors").read_bytes()[:8])[0]
    header = json.loads((tmp_path / "slat.safetensors").read_bytes()[8:8 + header_len])
    assert "__metadata__" not in header  # the released files carry none (byte-exact sizes)
    loaded = from_pretrained(tmp_path / "slat")  # CPU: computes in float32
    assert loaded.blocks[0].mlp.mlp[0].weight.dtype == torch.float32
    coords = torch.unique(torch.cat([torch.zeros(30, 1), torch.randint(0, 16, (30, 3))], 1).int(), dim=0)
    x = SparseTensor(torch.randn(coords.shape[0], 8), coords)  # distinct voxels: duplicates are not a valid input
    with torch.no_grad():
        out = loaded(x, torch.tensor([500.0]), torch.randn(1, 4, 32))
    assert torch.isfinite(out.feats).all()


def _write(tmp_path, state, name="SparseStructureFlowModel", args=TINY_SS, stem="bad"):
    (tmp_path / f"{stem}.json").write_text(json.dumps({"name": name, "args": args}))
    save_file(state, str(tmp_path / f"{stem}.safetensors"))
    return tmp_path / stem


def test_wrong_shape_missing_and_unexpected_keys_are_all_named(tmp_path):
    state = {k: v.clone() for k, v in SparseStructureFlowModel(**TINY_SS).state_dict().items()}
    state["input_layer.weight"] = torch.zeros(64, 9)
    del state["out_layer.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(_write(tmp_path, state))
    msg = str(err.value)
    assert "out_layer.bias" in msg and "extra.weight" in msg and "input_layer.weight: file (64, 9)" in msg


def test_non_safetensors_payload_is_rejected_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.json").write_text(json.dumps({"name": "SparseStructureFlowModel", "args": TINY_SS}))
    torch.save({"x": Evil()}, tmp_path / "evil.safetensors")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        from_pretrained(tmp_path / "evil")
    assert not marker.exists()


def test_bad_config_and_missing_files(tmp_path):
    (tmp_path / "cfg.json").write_text("{not json")
    save_file({"a": torch.zeros(1)}, str(tmp_path / "cfg.safetensors"))
    with pytest.raises(CheckpointError, match="not a TRELLIS model config"):
        from_pretrained(tmp_path / "cfg")
    (tmp_path / "unknown.json").write_text(json.dumps({"name": "NoSuchModel", "args": {}}))
    save_file({"a": torch.zeros(1)}, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(CheckpointError, match="unknown model class 'NoSuchModel'"):
        from_pretrained(tmp_path / "unknown")
    (tmp_path / "half.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        from_pretrained(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        from_pretrained(tmp_path / "nothing")


def test_hub_paths_go_through_huggingface_hub(tmp_path, monkeypatch):
    model = randomise(SparseStructureFlowModel(**TINY_SS))
    save_pretrained(model, tmp_path / "ckpts" / "ss_flow_tiny")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(tmp_path / filename)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = from_pretrained("someone/TRELLIS-tiny/ckpts/ss_flow_tiny")
    assert calls == [("someone/TRELLIS-tiny", "ckpts/ss_flow_tiny.json"),
                     ("someone/TRELLIS-tiny", "ckpts/ss_flow_tiny.safetensors")]
    assert torch.equal(loaded.out_layer.weight, model.out_layer.weight)


def test_hub_offline_mode_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        with pytest.raises(Exception) as err:
            from_pretrained("microsoft/TRELLIS-image-large/ckpts/ss_flow_img_dit_L_16l8_fp16")
        assert "offline" in str(err.value).lower() or "cache" in str(err.value).lower()
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
