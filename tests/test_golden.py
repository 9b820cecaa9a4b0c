"""Every output of every TRELLIS golden case, loading each case only through `from_pretrained`."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import shared_path
from mdt.flow import FlowEulerSampler
from mdt.models import from_pretrained
from mdt.sparse import SparseTensor

TOL = 1e-4
CASES = ["ss_flow_p1", "ss_flow_p2", "slat_flow", "slat_flow_elastic", "ss_vae_enc", "ss_vae_dec", "slat_enc",
         "slat_dec_gs", "slat_dec_mesh"]


def golden(case: str):
    root = shared_path("reference", "trellis-golden")
    model = from_pretrained(root / case)
    return model, load_file(str(root / f"{case}.io.safetensors"))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def checked_outputs(case: str, model, io) -> dict[str, float]:
    """name of each golden output -> max abs error of ours."""
    errs: dict[str, float] = {}
    with torch.no_grad():
        if case.startswith("ss_flow"):
            errs["out"] = max_err(model(io["x"], io["t"], io["cond"]), io["out"])
            sampler = FlowEulerSampler(1e-5)
            a = sampler.sample(model, io["sample_noise"], io["cond"], io["sample_neg_cond"], steps=4, rescale_t=3.0,
                               cfg_strength=3.0)
            errs["sample_cfg3_steps4_rescale3"] = max_err(a, io["sample_cfg3_steps4_rescale3"])
            b = sampler.sample(model, io["sample_noise"], io["cond"], io["sample_neg_cond"], steps=5, rescale_t=3.0,
                               cfg_strength=5.0, cfg_interval=(0.5, 1.0))
            errs["sample_cfg5_steps5_rescale3_interval05_1"] = max_err(b, io["sample_cfg5_steps5_rescale3_interval05_1"])
        elif case.startswith("slat_flow"):
            out = model(SparseTensor(io["feats"], io["coords"]), io["t"], io["cond"])
            assert torch.equal(out.coords, io["out_coords"])
            errs["out_coords"] = 0.0
            errs["out_feats"] = max_err(out.feats, io["out_feats"])
        elif case == "ss_vae_enc":
            z, mean, logvar = model(io["occ"], return_raw=True)
            errs.update(z=max_err(z, io["z"]), mean=max_err(mean, io["mean"]), logvar=max_err(logvar, io["logvar"]))
        elif case == "ss_vae_dec":
            errs["logits"] = max_err(model(io["z"]), io["logits"])
        elif case == "slat_enc":
            z, mean, logvar = model(SparseTensor(io["feats"], io["coords"]), return_raw=True)
            assert torch.equal(z.coords, io["z_coords"])
            errs.update(z_coords=0.0, z_feats=max_err(z.feats, io["z_feats"]), mean=max_err(mean, io["mean"]),
                        logvar=max_err(logvar, io["logvar"]))
        elif case == "slat_dec_gs":
            x = SparseTensor(io["feats"], io["coords"])
            errs["trunk_feats"] = max_err(model.decode_trunk(x).feats, io["trunk_feats"])
            reps = model(x)
            for i, rep in enumerate(reps):
                for name in ("xyz", "features_dc", "scaling", "rotation", "opacity"):
                    errs[f"rep{i}_{name}"] = max_err(getattr(rep, name), io[f"rep{i}_{name}"])
        elif case == "slat_dec_mesh":
            x = SparseTensor(io["feats"], io["coords"])
            errs["trunk_feats"] = max_err(model.trunk(x).feats, io["trunk_feats"])
            out = model(x)
            ours, theirs = _keyed(out.coords, out.feats), _keyed(io["out_coords"], io["out_feats"])
            assert torch.equal(ours[0], theirs[0]), "subdivided coordinate sets differ"
            errs["out_coords"] = 0.0
            errs["out_feats"] = max_err(ours[1], theirs[1])
    return errs


def _keyed(coords: torch.Tensor, feats: torch.Tensor):
    c = coords.long()
    key = ((c[:, 0] * 2048 + c[:, 1]) * 2048 + c[:, 2]) * 2048 + c[:, 3]
    order = torch.argsort(key)
    return key[order], feats[order]


@pytest.mark.parametrize("case", CASES)
def test_golden_case(case):
    model, io = golden(case)
    errs = checked_outputs(case, model, io)
    expected_outputs = {k for k in io if k not in ("x", "t", "cond", "coords", "feats", "occ", "z", "sample_noise",
                                                   "sample_neg_cond")}
    if case == "ss_vae_enc":
        expected_outputs |= {"z"}
    assert expected_outputs <= set(errs), f"outputs not checked: {expected_outputs - set(errs)}"
    print(case, json.dumps({k: float(f"{v:.3g}") for k, v in errs.items()}))
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"{case}: outputs beyond {TOL}: {bad}"


def test_golden_directory_lists_only_known_cases():
    root = shared_path("reference", "trellis-golden")
    found = sorted(p.name[: -len(".io.safetensors")] for p in root.glob("*.io.safetensors"))
    assert found == sorted(CASES), "a golden case was added or removed: test it"
