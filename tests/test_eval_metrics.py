"""Evaluation metrics on known cases (expected values derived by hand, not from the code under test):
Fréchet distance, Chamfer distance / F-score, voxel IoU, warm latency, feature-net loading, latent calibration
and the per-sampler report (regression flags)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from mdt.eval import frechet_distance
from mdt.eval.features import INCEPTION_FILE, load_feature_net
from mdt.eval.latency import warm_latency
from mdt.eval.report import flag_regressions, markdown_table
from mdt.eval.shapes import chamfer_fscore, paired_iou


# ------------------------------------------------------------------------------------------------ Fréchet


def test_frechet_identical_sets_is_zero():
    x = np.random.default_rng(0).standard_normal((500, 6))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_shifted_set_is_squared_shift():
    # same covariance, means differ by m: FD = |m|^2 exactly (the trace terms cancel)
    x = np.random.default_rng(1).standard_normal((400, 5))
    m = np.array([0.5, -1.0, 2.0, 0.0, 0.25])
    assert frechet_distance(x, x + m) == pytest.approx(float(m @ m), rel=1e-6)


def test_frechet_scaled_set_is_trace_of_covariance():
    # y = 2x (centred): S_y = 4 S_x, (S_x^1/2 S_y S_x^1/2)^1/2 = 2 S_x -> FD = tr(S) + 4 tr(S) - 4 tr(S) = tr(S)
    x = np.random.default_rng(2).standard_normal((300, 4)) @ np.diag([1.0, 2.0, 0.5, 3.0])
    x = x - x.mean(0)
    assert frechet_distance(x, 2 * x) == pytest.approx(float(np.trace(np.cov(x, rowvar=False))), rel=1e-6)


# ------------------------------------------------------------------------------------------------ geometry


def _grid(h: float = 0.2, n: int = 5) -> torch.Tensor:
    r = torch.arange(n, dtype=torch.float64) * h
    return torch.cartesian_prod(r, r, r)


def test_chamfer_identical_sets_is_zero_and_fscore_one():
    p = _grid()
    cd, f = chamfer_fscore(p, p.clone(), threshold=0.01)
    assert cd == 0.0 and f == 1.0


def test_chamfer_shifted_grid_is_the_shift():
    # a grid of spacing 0.2 shifted by 0.03 along x: every point's nearest neighbour is its own copy (0.03 <
    # 0.1), in both directions -> Chamfer 0.03; every point within 0.05 -> F = 1; none within 0.02 -> F = 0
    p = _grid()
    q = p + torch.tensor([0.03, 0.0, 0.0], dtype=torch.float64)
    cd, f = chamfer_fscore(p, q, threshold=0.05)
    assert cd == pytest.approx(0.03, abs=1e-12) and f == 1.0
    assert chamfer_fscore(p, q, threshold=0.02)[1] == 0.0


def test_chamfer_two_points_and_partial_fscore():
    # {0} vs {(3,4,0)}: distance 5 each way
    assert chamfer_fscore(torch.zeros(1, 3), torch.tensor([[3.0, 4.0, 0.0]]), 1.0) == (5.0, 0.0)
    # a = {0, 10e_x}, b = {0}: a->b distances 0 and 10 (mean 5), b->a 0 -> CD 2.5; P = 1/2, R = 1 -> F = 2/3
    a = torch.tensor([[0.0, 0, 0], [10.0, 0, 0]])
    cd, f = chamfer_fscore(a, torch.zeros(1, 3), 1.0)
    assert cd == pytest.approx(2.5) and f == pytest.approx(2 / 3)


def test_paired_iou_boxes():
    a = torch.zeros(2, 8, 8, 8, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[0, :4], b[0, 2:6] = True, True          # 4 and 4 slabs of 64 cells overlapping in 2: 128 / 384
    a[1, :4], b[1, :4] = True, True           # identical
    iou = paired_iou(a, b)
    assert iou[0].item() == pytest.approx(128 / 384) and iou[1].item() == 1.0
    assert paired_iou(torch.zeros(1, 2, 2, 2, dtype=torch.bool), torch.zeros(1, 2, 2, 2, dtype=torch.bool)) == 1.0


# ------------------------------------------------------------------------------------------------ latency


def test_warm_latency_is_the_median_after_warmup():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.3 if len(calls) == 1 else 0.01)   # only the first (warm-up) call is slow

    lat = warm_latency(fn, repeats=5, warmup=1)
    assert len(calls) == 6 and len(lat["times_s"]) == 5
    assert 0.009 < lat["median_s"] < 0.1
    assert lat["median_s"] == sorted(lat["times_s"])[2]


# ------------------------------------------------------------------------------------------------ feature nets


class _TinyFidNet(torch.nn.Module):
    """Stands in for the FID Inception TorchScript file: same call convention, 0..255 input."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 7, 3)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert float(x.max()) > 1.5  # the file expects 0..255 values
        return self.conv(x / 255.0).mean((2, 3))


def test_inception_loads_torchscript_file_else_named_random_net(tmp_path):
    path = tmp_path / INCEPTION_FILE
    torch.jit.script(_TinyFidNet()).save(str(path))
    imgs = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    net = load_feature_net("inception", str(path))
    assert net.real and str(path) in net.name
    assert net(imgs).shape == (3, 7)
    fallback = load_feature_net("inception", str(tmp_path / "missing.pt"))
    assert not fallback.real and fallback.name.startswith("tiny-random-inception") and "missing.pt" in fallback.note
    f1, f2 = fallback(imgs), load_feature_net("inception", str(tmp_path / "missing.pt"))(imgs)
    assert f1.shape[0] == 3 and np.array_equal(f1, f2)     # fixed seed: the same features every time


def test_dinov2_loads_local_dir_else_named_random_net(tmp_path):
    from mdt.models.zoo import save_tiny_dinov2

    d = save_tiny_dinov2(tmp_path / "dino", hidden_size=32, image_size=224)
    imgs = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    net = load_feature_net("dinov2", str(d))
    assert net.real and net(imgs).shape == (2, 32)
    fallback = load_feature_net("dinov2", str(tmp_path / "nope"))
    assert not fallback.real and fallback.name == "tiny-random-dinov2 (seed 0)"
    assert fallback(imgs).shape == (2, 64)


def test_unknown_feature_net_is_an_error():
    with pytest.raises(ValueError, match="unknown feature net"):
        load_feature_net("clip")


# ------------------------------------------------------------------------------------------------ calibration


def test_standardize_latents_gives_zero_mean_unit_std_per_channel():
    from mdt.eval.calibration import standardize_latents
    from mdt.models import SparseStructureEncoder

    torch.manual_seed(0)
    enc = SparseStructureEncoder(in_channels=1, latent_channels=4, num_res_blocks=1, num_res_blocks_middle=1,
                                 channels=[4, 8], use_fp16=False).eval()
    occ = (torch.rand(6, 1, 16, 16, 16) > 0.7).float()
    standardize_latents(enc, occ)
    with torch.no_grad():
        z = enc(occ)
    assert torch.allclose(z.mean((0, 2, 3, 4)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(z.std((0, 2, 3, 4)), torch.ones(4), atol=1e-4)


# ------------------------------------------------------------------------------------------------ report


def test_student_worse_with_more_steps_is_flagged_with_a_reason():
    rows = [{"sampler": "teacher 25-step", "kind": "teacher", "steps": 25, "nfe": 25, "iou": 0.8},
            {"sampler": "student 1-step", "kind": "student", "steps": 1, "nfe": 1, "iou": 0.7},
            {"sampler": "student 2-step", "kind": "student", "steps": 2, "nfe": 2, "iou": 0.75},
            {"sampler": "student 4-step", "kind": "student", "steps": 4, "nfe": 4, "iou": 0.6}]
    notes = flag_regressions(rows)
    assert len(notes) == 1 and notes[0].startswith("student 4-step") and "likely reason" in notes[0]
    assert "flag" not in rows[2] and rows[3]["flag"] == "worse than 2-step: IoU cond 0.75 -> 0.6"
    table = markdown_table(rows)
    assert table.count("⚠") == 1 and "| student 4-step | 4 |" in table


def test_regressions_are_checked_within_each_student_sampling_rule():
    """A re-noised row is compared with the 1-step sample and the re-noised rows below it, never with an Euler
    row (with the rules mixed up, the Euler 4-step would be flagged against the re-noised 2-step and the re-noised
    2-step against the Euler 2-step would pass for the wrong reason)."""
    rows = [{"sampler": "student 1-step", "kind": "student", "steps": 1, "iou": 0.7},
            {"sampler": "student 2-step", "kind": "student", "steps": 2, "iou": 0.6},
            {"sampler": "student 4-step", "kind": "student", "steps": 4, "iou": 0.65},
            {"sampler": "student 2-step re-noised", "kind": "student", "steps": 2, "iou": 0.72,
             "student_rule": "consistency"},
            {"sampler": "student 4-step re-noised", "kind": "student", "steps": 4, "iou": 0.5,
             "student_rule": "consistency"}]
    for r, mse in zip(rows, (0.1, 0.2, 0.3, 0.25, 0.5)):     # paired: worse with every step, under both rules
        r["mse_ref"] = mse
    notes = flag_regressions(rows)
    flagged = {r["sampler"]: r.get("flag") for r in rows}
    assert flagged == {"student 1-step": None,
                       "student 2-step": "worse than 1-step: IoU cond 0.7 -> 0.6, MSE to ref 0.1 -> 0.2",
                       "student 4-step": "worse than 2-step: MSE to ref 0.2 -> 0.3",
                       "student 2-step re-noised": None,          # its MSE to ref is paired: not checked
                       "student 4-step re-noised": "worse than 2-step: IoU cond 0.72 -> 0.5"}
    assert [n.split(":")[0] for n in notes] == ["student 2-step", "student 4-step", "student 4-step re-noised"]
    assert "Euler" in notes[0] and "re-noised rule trades" in notes[2]


def test_latency_task_runs_each_stage_repeats_plus_warmup_times(monkeypatch):
    """The latency task feeds each stage the output of the previous stage's last timed call: with repeats r and
    warm-up w every stage runs exactly r + w times (at full size one more SLat call is minutes on a CPU)."""
    from collections import Counter

    from pipelines.evaluate import driver

    calls = Counter()

    class CountingChain:
        slat_nets = {"teacher": object()}
        device = torch.device("cpu")

        def __init__(self, cfg, device):
            pass

        def latent_shape(self):
            return (2, 4, 4, 4)

        def condition(self, image):
            calls["condition"] += 1
            return torch.zeros(1, 3, 5)

        def sample(self, spec, noise, cond):
            calls["ss_sample"] += 1
            return noise

        def decode(self, x):
            calls["ss_decode"] += 1
            return torch.ones(1, 4, 4, 4, dtype=torch.bool)

        def sample_slat(self, spec, coords, cond, seeds):
            calls["slat_sample"] += 1
            assert coords[0].shape == (64, 3)     # the decoded occupancy of the timed call
            return "z"

        def decode_gaussians(self, z):
            assert z == "z"
            calls["slat_decode"] += 1
            return []

    monkeypatch.setattr(driver, "SamplingChain", CountingChain)
    cfg = driver.EvaluateConfig()
    cfg.samplers = cfg.samplers[:2]
    for repeats, warmup in ((1, 0), (3, 2)):
        calls.clear()
        cfg.latency = driver.EvalLatencyConfig(repeats=repeats, warmup=warmup)
        lat = driver.measure_latency(cfg, np.zeros((8, 8, 3), np.float32))
        assert set(lat) == {s.label for s in cfg.samplers}
        assert dict(calls) == {k: len(cfg.samplers) * (repeats + warmup) for k in
                               ("condition", "ss_sample", "ss_decode", "slat_sample", "slat_decode")}
        assert all(v["repeats"] == repeats for st in lat.values() for v in st.values())
