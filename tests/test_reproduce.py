"""The reproduction benchmark: metric unit checks, the exact SS-like packing, and the `ci` preset end to end
(`python -m mdt.experiments.reproduce --preset ci`): JSON structure, finite values, the PNG, NFE requirements and
sanity properties that can fail."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdt.eval import (OccupancyFeatureNet, chamfer_matrix, coverage_mmd, frechet_distance, iou_matrix,
                      sliced_wasserstein, surface_points)
from mdt.experiments.methods import METHODS
from mdt.experiments.presets import get_preset
from mdt.experiments.shapes import CLASS_NAMES, ShapeSpec, make_shapes, pack, unpack

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = ("gmm", "shapes", "shapes_sparse")


# ---- metrics ----------------------------------------------------------------------------------------------------
def test_sliced_wasserstein_and_frechet_on_gaussians():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    y = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)
    assert sliced_wasserstein(x, y) < 0.08
    # a shift by 1 along one axis: the sliced W2 is sqrt(E[(theta . e)^2]) = 1/sqrt(3) in 3-D
    assert sliced_wasserstein(x, y + torch.tensor([1.0, 0, 0]), num_projections=2000) == pytest.approx(
        1 / math.sqrt(3), rel=0.08)
    # Frechet distance between N(0, I) and N(m, 4 I) in 3-D is |m|^2 + 3 (1 + 4 - 2 * 2) = |m|^2 + 3
    m = torch.tensor([1.0, 2.0, 0.0])
    assert frechet_distance(x, y * 2 + m) == pytest.approx(5 + 3, rel=0.05)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # unequal sizes work (quantile interpolation)
    assert sliced_wasserstein(x[:1000], y) < 0.12


def test_shape_metrics():
    occ, _ = make_shapes(torch.arange(6), seed=0, spec=ShapeSpec())
    iou = iou_matrix(occ, occ)
    assert torch.allclose(iou.diagonal(), torch.ones(6, dtype=torch.float64))
    assert (iou <= 1).all() and (iou >= 0).all()
    pts = surface_points(occ)
    cd = chamfer_matrix(pts, pts)
    assert torch.allclose(cd.diagonal(), torch.zeros(6, dtype=torch.float64))
    assert (cd[~torch.eye(6, dtype=torch.bool)] > 0).all()
    cov, mmd = coverage_mmd(1 - iou)
    assert cov == 1.0 and mmd == pytest.approx(0.0)
    # generating one shape six times covers one reference out of six
    cov, mmd = coverage_mmd((1 - iou)[:, [0] * 6])
    assert cov == pytest.approx(1 / 6) and mmd > 0
    feats = OccupancyFeatureNet(seed=7)(occ)
    assert feats.shape == (6, 2 * (8 + 16 + 32)) and torch.isfinite(feats).all()


def test_sparse_metrics_and_held_out_floor():
    """The sparse problem at its own resolution: the data scored as a sample has no geometric error and colour
    coherence 1 (one colour sign per shape by construction); flipping the colour of half of each shape's voxels
    gives coherence 0; a held-out draw (other coordinates) is scored on the coordinate-free metrics only."""
    from mdt.experiments.shapes import SparseShapesProblem

    problem = SparseShapesProblem(ShapeSpec(num_classes=3), {"resolution": 16})
    es = problem.eval_set(2, seed=0)
    data = es["data"]
    assert int(data.coords[:, 1:].max()) < 16 and problem.build_model(0).net.resolution == 16
    own = problem.evaluate(data, es, None, None)
    assert own["mse_geo_data"] == 0.0 and own["colour_coherence"] == 1.0
    assert own["fd_stats_data"] == pytest.approx(0.0, abs=1e-6)
    feats = data.feats.clone()
    for sl in data.layout:
        n = sl.stop - sl.start
        feats[sl.start: sl.start + n // 2, 3:6] *= -1
    coh = problem.evaluate(data.replace(feats), es, None, None)["colour_coherence"]
    # per shape |(n - 2 floor(n / 2)) / n| <= 1 / n (0 for an even count)
    assert coh <= max(1 / (sl.stop - sl.start) for sl in data.layout) + 1e-9
    floor = problem.evaluate(problem.data_as_sample(problem.eval_set(2, seed=500)), es, None, None)
    assert set(floor) == {"fd_stats_data", "colour_coherence"}
    assert floor["colour_coherence"] == 1.0 and 0 < floor["fd_stats_data"] < math.inf


def test_packing_is_exact_and_ss_shaped():
    assert len(CLASS_NAMES) == 24
    occ, part = make_shapes(torch.arange(24), seed=3, spec=ShapeSpec())
    lat = pack(occ)
    assert lat.shape == (24, 8, 16, 16, 16)
    assert set(lat.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(unpack(lat), occ)
    assert torch.equal(unpack(lat + 0.3 * torch.rand(lat.shape) * lat.sign()), occ)
    assert (occ.flatten(1).sum(1) > 50).all(), "every class voxelises to a non-trivial shape"
    # channel 4a + 2b + c of latent voxel (i, j, k) is occupancy voxel (2i + a, 2j + b, 2k + c)
    assert bool(lat[5, 4 * 1 + 2 * 0 + 1, 7, 8, 9] > 0) == bool(occ[5, 15, 16, 19])


# ---- the ci preset end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce_ci")
    proc = subprocess.run([sys.executable, "-m", "mdt.experiments.reproduce", "--preset", "ci", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


@pytest.mark.slow
def test_ci_preset_results_structure(ci_run):
    out, stdout = ci_run
    res = json.loads((out / "results.json").read_text())
    assert set(res["meta"]["problems"]) == set(PROBLEMS)
    for problem in PROBLEMS:
        # the data-driven methods and the image-only rows: mdt_release's and the best consistency baseline's
        img = res["image_only"][problem]
        assert img["best_baseline"] in ("cm", "pcm", "scm"), problem
        assert img["methods"] == ["mdt_release_imageonly", f"{img['best_baseline']}_imageonly"]
        assert set(res[problem]) == set(METHODS) | set(img["methods"]), problem
        metrics = set(res[problem]["teacher"]["25"])
        assert metrics, problem
        for method in METHODS + tuple(img["methods"]):
            steps = {"1", "2", "4"} | ({"25"} if method == "teacher" else set())
            assert set(res[problem][method]) == steps, (problem, method)
            for s in steps:
                assert set(res[problem][method][s]) == metrics, (problem, method, s)
                for metric, v in res[problem][method][s].items():
                    assert set(v) == {"mean", "std"}
                    assert math.isfinite(v["mean"]) and math.isfinite(v["std"]) and v["std"] >= 0, \
                        (problem, method, s, metric, v)
    assert (out / "results.png").stat().st_size > 10_000
    assert (out / "logs.json").exists()
    assert "Table 2 [gmm]" in stdout and "Table 3 [shapes]" in stdout and "wall ratio" in stdout
    assert "PCM (K=" in stdout and "NFE per asset under TRELLIS" in stdout
    assert "Image-only [gmm]" in stdout and "MDT release img-only" in stdout and "re-noising sampler" in stdout


@pytest.mark.slow
def test_ci_preset_image_only_and_renoise(ci_run):
    """Image-only rows: trained on the pool (not the data: their results differ from the data-driven method's on the
    same seeds), the pool's size and cost as declared, the gmm pool's mode coverage consistent with K uniform draws
    over 8 modes; every reported student also sampled with re-noising at 2 and 4 steps, identical to nothing else."""
    out, _ = ci_run
    res = json.loads((out / "results.json").read_text())
    preset = {pp["name"]: pp for pp in get_preset("ci")["problems"]}
    from mdt.flow import count_nfe

    for problem in PROBLEMS:
        img, pp = res["image_only"][problem], preset[problem]
        assert img["k"] == pp["imageonly_k"]
        assert img["pool_nfe"] == img["conditions"] * img["k"] * count_nfe(25, pp["distill"]["cfg"])
        for method in img["methods"]:
            assert res["protocol"]["problems"][problem]["methods"][method]["chosen"] is not None
        assert set(res["renoise"][problem]) == set(METHODS[1:]) | set(img["methods"])
        for method, per in res["renoise"][problem].items():
            assert set(per) == {"2", "4"}, (problem, method)
    gmm = res["gmm"]
    d = res["paired"]["gmm"]["image_only"]["mdt_release_imageonly"]
    assert d["reference"] == "mdt_release" and all(v["mean"] != 0.0 for v in d["steps"].values())
    pool = res["image_only"]["gmm"]
    k = pool["k"]
    # K draws over 8 equally likely modes leave a mode empty with probability (7/8)^K: coverage ~ 1 - (7/8)^K
    assert abs(pool["pool"]["mode_coverage"]["mean"] - (1 - (7 / 8) ** k)) < 0.15
    assert pool["pool"]["mode_coverage"] == pool["pool_by_k"][str(k)]["mode_coverage"]
    assert pool["pool_by_k"]["1"]["mode_coverage"]["mean"] <= 1 / 8 + 1e-9
    assert pool["pool"]["off_mode"]["mean"] < 0.05          # the 25-step teacher's samples sit on the modes
    # re-noising keeps a mean-velocity student's 4-step samples on the modes at least as well as Euler does
    for method in ("vm", "mdt_release"):
        assert res["renoise"]["gmm"][method]["4"]["off_mode"]["mean"] <= gmm[method]["4"]["off_mode"]["mean"] + 0.05


@pytest.mark.slow
def test_ci_preset_nfe_and_sanity(ci_run):
    out, _ = ci_run
    res = json.loads((out / "results.json").read_text())
    from mdt.flow import count_nfe

    preset = {pp["name"]: pp for pp in get_preset("ci")["problems"]}
    for problem in PROBLEMS:
        nfe = res["nfe"][problem]
        assert nfe["teacher_25"]["nfe"] == count_nfe(25, preset[problem]["distill"]["cfg"])   # 2 per guided step
        assert nfe["student_1"]["ratio_vs_teacher25"] >= 20
        assert nfe["student_2"]["ratio_vs_teacher25"] >= 10
        wall = res["wall_time"][problem]
        assert all(wall[k]["seconds"] > 0 for k in ("teacher_25", "student_1", "student_2", "student_4"))
        assert res["notes"]["nfe_requirements"][problem] == {"student_1_ge_20x": True, "student_2_ge_10x": True}
    gmm = res["gmm"]
    # the exact teacher's Euler steps approach its ODE endpoints monotonically; one step is the collapsed class mean
    t = [gmm["teacher"][s]["pair_l2_ode"]["mean"] for s in ("1", "2", "4", "25")]
    assert t[0] > t[1] > t[2] > t[3] and t[3] < 0.1 * t[0]
    assert gmm["teacher"]["1"]["mode_coverage"]["mean"] == 0.0 and gmm["teacher"]["1"]["off_mode"]["mean"] == 1.0
    assert gmm["teacher"]["25"]["mode_coverage"]["mean"] > 0.9
    assert res["class_mean"]["gmm"]["pair_l2_ode"]["mean"] == pytest.approx(t[0], rel=1e-3)
    assert res["notes"]["orderings"]["gmm"]["baselines"]["values"]["teacher"] == t[0]
    # distillation moves every student towards the ODE endpoints: at 1 step each distilled method is closer to them
    # (paired) than the undistilled teacher's single step
    for method in ("cm", "pcm", "scm", "vm", "mdt_release", "mdt_paper"):
        assert gmm[method]["1"]["pair_l2_ode"]["mean"] < gmm["teacher"]["1"]["pair_l2_ode"]["mean"], method
    # shapes: more teacher steps are closer to the teacher's own 25-step samples (paired IoU rises)
    shp = res["shapes"]
    p = [shp["teacher"][s]["pair_iou_teacher"]["mean"] for s in ("1", "2", "4", "25")]
    assert p[0] < p[1] < p[2] < p[3] == 1.0
    # the printed ordering verdicts agree with the numbers in the table
    for problem in PROBLEMS:
        entry = res["notes"]["orderings"][problem]
        for chain in ("baselines", "ablation", "ablation_paper"):
            vals = entry[chain]["values"]
            for m, v in vals.items():
                assert v == res[problem][m]["1"][entry["metric"]]["mean"]


@pytest.mark.slow
def test_ci_preset_fair_protocol(ci_run):
    """results.json["protocol"]: every distilled method declared the same number of configurations, each scored on
    the validation seeds (disjoint from the test seeds) by the primary metric averaged over 1 and 2 steps; the chosen
    configuration is the best of those scores, and the reported runs are exactly the chosen configuration on the
    test seeds."""
    from mdt.experiments.methods import STUDENT_METHODS

    out, stdout = ci_run
    res = json.loads((out / "results.json").read_text())
    logs = json.loads((out / "logs.json").read_text())
    proto = res["protocol"]["problems"]
    assert set(proto) == set(PROBLEMS)
    for problem, entry in proto.items():
        assert not set(entry["val_seeds"]) & set(entry["test_seeds"]), problem
        sel = entry["selection"]
        assert sel["metric"] == res["notes"]["orderings"][problem]["metric"] and sel["steps"] == ["1", "2"]
        variants = entry["image_only"]["methods"]
        sizes = {m: len(entry["methods"][m]["configs"]) for m in entry["methods"]}
        assert set(entry["methods"]) == set(STUDENT_METHODS) | set(variants) and set(sizes.values()) == {2}, sizes
        # image-only variants: their base method's grid; the baseline is the best chosen CM/PCM/sCM validation score
        for v in variants:
            base = v.removesuffix("_imageonly")
            assert [c["config"] for c in entry["methods"][v]["configs"]] == \
                [c["config"] for c in entry["methods"][base]["configs"]]
        chosen_scores = {b: entry["methods"][b]["configs"][entry["methods"][b]["chosen_index"]]["score"]
                         for b in ("cm", "pcm", "scm")}
        assert chosen_scores == entry["image_only"]["baseline_scores"]
        pick = min if sel["lower_is_better"] else max
        assert chosen_scores[entry["image_only"]["best_baseline"]] == pick(chosen_scores.values())
        for method in entry["methods"]:
            m = entry["methods"][method]
            # each score is recomputed from its per-seed values; the chosen one is the best finite score
            scores = []
            for c in m["configs"]:
                vals = [v for per in c["per_seed"].values() for v in per.values()]
                assert set(c["per_seed"]) == {str(s) for s in entry["val_seeds"]}
                assert c["score"] == pytest.approx(sum(vals) / len(vals)), (problem, method)
                scores.append(c["score"] if sel["lower_is_better"] else -c["score"])
            assert m["chosen_index"] == scores.index(min(scores))
            assert m["chosen"] == m["configs"][m["chosen_index"]]["config"]
            # validation runs: one per configuration and validation seed, none on a test seed
            val = [r for r in logs if r["problem"] == problem and r.get("role") == "val" and r["method"] == method]
            assert sorted((r["seed"], r["label"]) for r in val) == sorted(
                (s, f"{method}@{i}") for s in entry["val_seeds"] for i in range(2))
            # reported runs: the chosen configuration, on every test seed and nowhere else
            test = [r for r in logs if r["problem"] == problem and r.get("role") == "test" and r["method"] == method]
            assert sorted(r["seed"] for r in test) == sorted(entry["test_seeds"]), (problem, method)
            assert all(r["overrides"] == m["chosen"] for r in test), (problem, method)
    assert "Selection (validation seeds" in stdout and "MDT paper" in stdout and "MDT release" in stdout
    assert len(proto["gmm"]["val_seeds"]) >= 3


@pytest.mark.slow
def test_ci_preset_gates_and_paired_differences(ci_run):
    """results.json["gates"][problem] = {teacher_monotone, class_mean_worst, straightness} recomputed from the tables;
    results.json["paired"]: per-seed differences to mdt_release whose mean is the difference of the reported means
    (same test seeds) and whose 95 % t-interval contains it."""
    out, stdout = ci_run
    res = json.loads((out / "results.json").read_text())
    for problem in PROBLEMS:
        g = res["gates"][problem]
        assert {"teacher_monotone", "class_mean_worst", "straightness"} <= set(g)
        primary = g["metric"]
        sign = 1 if res["meta"]["metric_lower_is_better"][problem][primary] else -1
        t = [res[problem]["teacher"][s][primary]["mean"] for s in ("1", "2", "4", "25")]
        assert g["teacher_monotone"] == all(sign * (a - b) > 0 for a, b in zip(t, t[1:]))
        if g["class_mean_worst"] is not None:
            cm = res["class_mean"][problem][primary]["mean"]
            assert g["class_mean_worst"] is (sign * (cm - t[2]) > 0 and sign * (cm - t[3]) > 0 and (
                primary not in res["data_floor"].get(problem, {}) or
                sign * (cm - res["data_floor"][problem][primary]["mean"]) > 0))
    assert res["gates"]["gmm"]["straightness"] >= 0.5 and res["gates"]["gmm"]["teacher_monotone"]
    assert res["gates"]["gmm"]["class_mean_worst"] is True and res["gates"]["gmm"]["informative"]
    assert "Gates (primary metric)" in stdout and "Paired differences vs mdt_release" in stdout
    for problem in PROBLEMS:
        e = res["paired"][problem]
        assert e["reference"] == "mdt_release" and set(e["methods"]) == set(METHODS) - {"mdt_release"}
        for method, per in e["methods"].items():
            for steps, d in per.items():
                assert len(d["diffs"]) == len(e["seeds"])
                expected = (res[problem][method][steps][e["metric"]]["mean"]
                            - res[problem]["mdt_release"][steps][e["metric"]]["mean"])
                assert d["mean"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
                if len(e["seeds"]) > 1:
                    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
                else:
                    assert d["ci95"] is None
        # image-only rows: paired against their data-driven method
        assert set(e["image_only"]) == set(res["image_only"][problem]["methods"])
        for method, v in e["image_only"].items():
            assert v["reference"] == method.removesuffix("_imageonly")
            for steps, d in v["steps"].items():
                expected = (res[problem][method][steps][e["metric"]]["mean"]
                            - res[problem][v["reference"]][steps][e["metric"]]["mean"])
                assert d["mean"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # the keys the benchmark's acceptance names: gmm, gates with their three entries, the protocol
    assert "gmm" in res and {"rule", "problems"} <= set(res["protocol"])
    for problem in PROBLEMS:
        g = res["gates"][problem]
        assert isinstance(g["teacher_monotone"], bool) and g["class_mean_worst"] in (True, False, None)
        assert g["straightness"] is None or isinstance(g["straightness"], float)
        assert {"grid", "selection", "val_seeds", "test_seeds", "methods"} <= set(res["protocol"]["problems"][problem])


def test_protocol_grid_rules():
    from mdt.experiments.presets import get_preset
    from mdt.experiments.protocol import grid_configs, select

    pp = get_preset("ci")["problems"][0]
    grid = grid_configs(pp)
    assert all(len(c) == 2 for c in grid.values())
    bad = json.loads(json.dumps(pp))
    bad["grid"]["cm"]["lr"] = [1e-4, 2e-4]                 # 4 configurations for CM, 2 for the others
    with pytest.raises(ValueError, match="same number"):
        grid_configs(bad)
    bad = json.loads(json.dumps(pp))
    bad["val_seeds"] = [pp["seeds"][0]]
    with pytest.raises(ValueError, match="overlap"):
        grid_configs(bad)
    bad = json.loads(json.dumps(pp))
    bad["grid"]["vm"]["no_such_knob"] = [1]
    with pytest.raises(ValueError, match="DistillHP"):
        grid_configs(bad)
    # a diverged (NaN) configuration ranks last whatever the direction; ties keep the grid order
    assert select([float("nan"), 0.3, 0.2], lower_is_better=True) == 2
    assert select([float("nan"), 0.3, 0.2], lower_is_better=False) == 1
    assert select([0.5, 0.5], lower_is_better=True) == 0


def test_small_preset_as_shipped_is_a_valid_fair_protocol():
    """The documented `--preset small` command's configuration: 3 test seeds per problem, validation seeds
    disjoint from them, lr x key knob = 4 configurations for every method, every configuration a valid DistillHP and
    every problem buildable."""
    from mdt.experiments.jobs import build_problem
    from mdt.experiments.methods import DistillHP, TeacherHP
    from mdt.experiments.presets import get_preset
    from mdt.experiments.protocol import grid_configs

    preset = get_preset("small")
    assert {pp["name"] for pp in preset["problems"]} == set(PROBLEMS)
    for pp in preset["problems"]:
        grid = grid_configs(pp)
        assert all(len(c) == 4 for c in grid.values()), pp["name"]
        assert all(len({c["lr"] for c in cs}) == 2 for cs in grid.values())
        assert len(pp["seeds"]) == 3 and pp["imageonly_k"] >= 1     # every problem has image-only rows
        TeacherHP(**pp["teacher"])
        for cs in grid.values():
            for c in cs:
                DistillHP(**{**pp["distill"], **c})
        build_problem(pp)


def test_ablation_run_spec_parsing():
    from mdt.experiments.ablate import parse_run
    from mdt.experiments.methods import DistillHP

    label, method, ov = parse_run("mdt_x:mdt_release:d_norm=false,lambda_vd=0.1,delta=0.05,w_vd=none")
    assert (label, method) == ("mdt_x", "mdt_release")
    assert ov == {"d_norm": False, "lambda_vd": 0.1, "delta": 0.05, "w_vd": None}
    DistillHP(**ov)                                   # every key is a DistillHP field
    assert parse_run("vm:vm") == ("vm", "vm", {})
    with pytest.raises(Exception):
        parse_run("x:teacher")


def test_trellis_nfe_accounting():
    """TRELLIS's pipeline sampler (25 steps, rescale 3, CFG only for t in [0.5, 1]) costs 25 + 19 = 44 evaluations
    per stage (the guided steps counted from its published time grid); a student guided at every step costs 2."""
    from mdt.experiments.methods import trellis_nfe
    from mdt.experiments.reproduce import format_trellis_nfe

    rows = trellis_nfe()
    assert rows["teacher_25"]["nfe_per_stage"] == 44 and rows["teacher_25"]["nfe_two_stages"] == 88
    assert rows["student_1"]["nfe_two_stages"] == 2 and rows["student_1_cfg"]["nfe_two_stages"] == 4
    assert rows["student_2_cfg"]["ratio_vs_teacher"] == 11.0 and rows["student_1"]["ratio_vs_teacher"] == 44.0
    assert "student_2_cfg" in format_trellis_nfe(rows)


def test_consistency_baselines_can_take_an_ema_target_network():
    """DistillHP.target_ema > 0: the CM/PCM/sCM target comes from an EMA copy of the student (the student itself
    under stop-gradient otherwise); the two runs differ, and the EMA run is deterministic."""
    from mdt.experiments.methods import DistillHP, distill
    from mdt.experiments.nets import MixtureVelocityNet

    torch.manual_seed(0)
    teacher = MixtureVelocityNet(2, 3, hidden=16, depth=1)

    def batch(n, g):
        labels = torch.randint(3, (n,), generator=g)
        return {"x0": torch.randn(n, 2, generator=g) + labels[:, None].float(),
                "cond": torch.nn.functional.one_hot(labels, 3).float()}

    def run(ema):
        hp = DistillHP(steps=6, batch_size=8, lr=1e-2, warmup=0, target_ema=ema)
        student, _ = distill("cm", teacher, batch, hp, seed=1, log_every=3)
        return torch.cat([p.flatten() for p in student.parameters()])

    plain, ema_a, ema_b = run(0.0), run(0.9), run(0.9)
    assert torch.equal(ema_a, ema_b) and not torch.allclose(plain, ema_a)


def test_sweep_preset_as_shipped_is_a_valid_protocol():
    """`--preset sweep`: the gmm problem at w in {0, 3, 7} x D in {8, 512, 8 x 16^3}, each with a valid fair grid, the
    same guidance in the problem and in the objectives, and a buildable mode layout with the declared separation."""
    from mdt.experiments.jobs import build_problem
    from mdt.experiments.methods import DistillHP
    from mdt.experiments.protocol import grid_configs

    preset = get_preset("sweep")
    combos = {(pp["spec"]["dim"], pp["spec"]["cfg"]) for pp in preset["problems"]}
    assert combos == {(d, w) for d in (8, 512, 8 * 16 ** 3) for w in (0.0, 3.0, 7.0)}
    for pp in preset["problems"]:
        assert pp["distill"]["cfg"] == pp["spec"]["cfg"] and pp["kind"] == "gmm" and pp["name"].startswith("gmm")
        assert len(pp["val_seeds"]) >= 3 and not set(pp["val_seeds"]) & set(pp["seeds"])
        for cs in grid_configs(pp).values():
            for c in cs:
                DistillHP(**{**pp["distill"], **c})
    big = build_problem(preset["problems"][-1])
    assert big.means.shape == (4, 8, 8 * 16 ** 3)


def test_image_only_pool_is_the_teachers_own_samples_and_batches_draw_from_it_only():
    """teacher_pool: K samples per condition of the exact gmm teacher's 25-step sampler (on the modes: its x0 is
    no data draw), its coverage statistics recomputed by hand; pool_batches returns pool rows with their own
    conditions, and the same generator seed gives the same batches (common random numbers)."""
    from mdt.experiments.gmm import GMMProblem, GMMSpec
    from mdt.experiments.jobs import pool_batches, teacher_pool

    problem = GMMProblem(GMMSpec(num_classes=2, modes=4))
    pp = {"imageonly_k": 8, "distill": {"cfg": 0.0}}
    pool, stats = teacher_pool(problem, problem.exact_teacher(), pp, seed=0)
    assert pool["x0"].shape == (16, 8) and torch.equal(pool["labels"], torch.arange(2).repeat_interleave(8))
    on = problem.on_mode(pool["x0"], pool["labels"])
    assert on.any(1).float().mean() > 0.95                           # 25 Euler steps of the exact teacher: on modes
    cov = sum(float((on[pool["labels"] == c].sum(0) >= 0.25 * 8 / 4).float().mean()) for c in range(2)) / 2
    assert stats["k"] == 8 and stats["mode_coverage"] == pytest.approx(cov)
    assert set(stats["by_k"]) == {"1", "2", "4", "8", "16", "32", "64"}
    sample = pool_batches(pool)
    a, b = sample(32, torch.Generator().manual_seed(3)), sample(32, torch.Generator().manual_seed(3))
    assert torch.equal(a["x0"], b["x0"]) and torch.equal(a["cond"], b["cond"])
    rows = {tuple(r.tolist()): int(lab) for r, lab in zip(pool["x0"], pool["labels"])}
    assert all(rows[tuple(x.tolist())] == int(c.argmax()) for x, c in zip(a["x0"], a["cond"]))
