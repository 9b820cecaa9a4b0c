"""`make bench` (mdt.bench.models) at test size: the JSON carries every ratio against its limit."""
from __future__ import annotations

import json
import math

import pytest

from mdt.bench import models as bench


def test_bench_json_has_flops_peak_and_memory_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--models", "ss_flow", "--size", "tiny", "--device", "cpu", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["machine"]["threads"] >= 1 and report["machine"]["device"] == "cpu"
    (r,) = report["results"]
    for key in bench.RATIO_FIELDS:
        assert math.isfinite(r[key]) and r[key] > 0, key
    # A lower bound derived by hand: 2 blocks of width C = 64 on 8³ = 512 tokens, each token through self-attention
    # qkv (3C²) and output (C²), cross-attention query (C²) and output (C²) and the MLP (2·4C²) = 14 C² weights,
    # 2 FLOPs per multiply-add.
    assert r["flops_per_forward"] >= 2 * 512 * 2 * 14 * 64 * 64
    assert r["fraction_of_peak"] == pytest.approx(r["achieved_gflops"] / r["peak_matmul_gflops"])
    assert r["achieved_gflops"] == pytest.approx(r["flops_per_forward"] / r["latency_s"] / 1e9)
    est = r["parameters_mb"] + r["activations_estimate_mb"]
    assert r["memory_over_estimate"] == pytest.approx(r["peak_memory_mb"] / est)
    printed = capsys.readouterr().out
    assert "of peak" in printed and "mem/est" in printed


def test_bench_rejects_bad_arguments():
    with pytest.raises(SystemExit) as e:
        bench.main(["--repeats", "0"])
    assert e.value.code == 2


def test_attention_flops_are_counted_on_cpu():
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    bench._register_cpu_attention_flops()
    q = torch.randn(1, 2, 16, 8)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * 2 * 16 * 16 * 8)     # QK^T and PV, 2 FLOPs per multiply-add
