"""Full-size TRELLIS layouts: keys, shapes and dtypes of every published checkpoint, built on the meta device."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import shared_path
from mdt.models import MODEL_CLASSES, build_model

DTYPES = {"F32": torch.float32, "F16": torch.float16, "float32": torch.float32, "float16": torch.float16}


def manifest() -> dict:
    return json.loads(shared_path("reference", "trellis-state-dict-shapes.json").read_text())


CLASS_NAMES = ["SparseStructureFlowModel", "ElasticSLatFlowModel", "SparseStructureEncoder", "SparseStructureDecoder",
               "ElasticSLatEncoder", "ElasticSLatGaussianDecoder", "ElasticSLatRadianceFieldDecoder",
               "ElasticSLatMeshDecoder"]


def test_manifest_lists_the_eight_classes():
    assert sorted(manifest()) == sorted(CLASS_NAMES)


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_meta_model_matches_published_layout(name):
    entry = manifest()[name]
    model = build_model(name, entry["config"], device="meta")
    state = model.state_dict()
    expected = {k: (tuple(shape), DTYPES[dt]) for k, (shape, dt) in entry["state_dict"].items()}
    assert sorted(state) == sorted(expected), (
        f"missing {sorted(set(expected) - set(state))[:5]}, unexpected {sorted(set(state) - set(expected))[:5]}")
    wrong = {k: ((tuple(v.shape), v.dtype), expected[k]) for k, v in state.items()
             if (tuple(v.shape), v.dtype) != expected[k]}
    assert not wrong, f"{len(wrong)} keys differ, e.g. {list(wrong.items())[:3]}"
    # save_pretrained writes the same dtype layout whatever the in-memory dtype is.
    assert {k: v for k, v in model.published_dtypes().items()} == {k: v[1] for k, v in expected.items()}


def test_non_elastic_names_build_the_same_networks():
    m = manifest()
    pairs = {"ElasticSLatFlowModel": "SLatFlowModel", "ElasticSLatEncoder": "SLatEncoder",
             "ElasticSLatGaussianDecoder": "SLatGaussianDecoder",
             "ElasticSLatRadianceFieldDecoder": "SLatRadianceFieldDecoder",
             "ElasticSLatMeshDecoder": "SLatMeshDecoder"}
    for elastic, plain in pairs.items():
        assert plain in MODEL_CLASSES
        a = build_model(elastic, m[elastic]["config"], device="meta").state_dict()
        b = build_model(plain, m[elastic]["config"], device="meta").state_dict()
        assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}


@pytest.mark.parametrize("case,key", [("ss_flow_p1", "pos_emb"), ("ss_flow_p2", "pos_emb"),
                                      ("slat_dec_gs", "offset_perturbation")])
def test_computed_buffers_equal_golden(case, key):
    root = shared_path("reference", "trellis-golden")
    config = json.loads((root / f"{case}.json").read_text())
    model = build_model(config["name"], config["args"])  # on CPU: buffers computed, not loaded
    stored = load_file(str(root / f"{case}.safetensors"))[key]
    torch.testing.assert_close(model.state_dict()[key], stored, rtol=0, atol=1e-6)


def test_full_size_computed_buffers_have_published_values_where_known():
    # pos_emb of the released SS flow: [4096, 1024] with 1020 sin/cos channels and 4 zero pads.
    cfg = manifest()["SparseStructureFlowModel"]["config"]
    pos = build_model("SparseStructureFlowModel", {**cfg, "use_fp16": False, "num_blocks": 1}).pos_emb
    assert pos.shape == (4096, 1024)
    assert torch.all(pos[:, 1020:] == 0) and pos[0, :170].abs().max() == 0 and torch.all(pos[0, 170:340] == 1)
