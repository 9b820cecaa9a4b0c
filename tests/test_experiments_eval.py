"""The benchmark's fast evaluation paths against straightforward computations: Chamfer matrices (general and
voxel-grid coordinates), boundary voxels, the per-metric evaluation of every problem, and the evaluation context
that reference jobs save for the distillation jobs."""
from __future__ import annotations

import itertools

import pytest
import torch

from mdt.eval import boundary, chamfer_matrix, surface_points
from mdt.experiments import jobs
from mdt.experiments.mixture import MixtureProblem, MixtureSpec
from mdt.experiments.shapes import ShapeSpec, ShapesProblem, SparseShapesProblem, make_shapes


def brute_chamfer(a: torch.Tensor, b: torch.Tensor) -> float:
    """Chamfer distance of two point sets from the definition: mean nearest-neighbour distance both ways / 2."""
    if len(a) == 0 or len(b) == 0:
        return 0.0 if len(a) == len(b) else 1.0
    d = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1).sqrt()        # explicit differences, [len(a), len(b)]
    return float((d.min(1).values.mean() + d.min(0).values.mean()) / 2)


@pytest.mark.parametrize("grid", [False, True])
def test_chamfer_matrix_equals_the_definition(grid):
    g = torch.Generator().manual_seed(3)
    sizes_a, sizes_b = (7, 0, 12, 1), (0, 9, 5)
    if grid:   # voxel centres of a 16^3 grid in [-1, 1]^3 (the surface points' coordinates)
        sets = [(torch.randint(16, (n, 3), generator=g).double() + 0.5) / 16 * 2 - 1 for n in sizes_a + sizes_b]
    else:
        sets = [torch.randn(n, 3, generator=g, dtype=torch.float64) * 0.7 for n in sizes_a + sizes_b]
    pa, pb = sets[:len(sizes_a)], sets[len(sizes_a):]
    got = chamfer_matrix(pa, pb)
    want = torch.tensor([[brute_chamfer(a, b) for b in pb] for a in pa], dtype=torch.float64)
    assert got.shape == (4, 3) and got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    # a set against itself: 0; one empty set: 1 (EMPTY_CHAMFER); both empty: 0
    assert chamfer_matrix([pa[0]], [pa[0]]).item() == 0.0
    assert got[1, 0] == 0.0 and got[0, 0] == 1.0


def test_chamfer_matrix_on_shape_surfaces_equals_the_definition():
    occ, _ = make_shapes(torch.arange(4), seed=1, spec=ShapeSpec())
    pts = [p[:40] for p in surface_points(occ)]
    want = torch.tensor([[brute_chamfer(a, b) for b in pts] for a in pts], dtype=torch.float64)
    assert torch.allclose(chamfer_matrix(pts, pts), want, rtol=1e-12, atol=1e-14)


def test_boundary_equals_the_six_neighbour_rule():
    occ = torch.rand(3, 5, 5, 5, generator=torch.Generator().manual_seed(0)) > 0.35
    want = torch.zeros_like(occ)
    for n, i, j, k in itertools.product(range(3), range(5), range(5), range(5)):
        if not occ[n, i, j, k]:
            continue
        for di, dj, dk in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
            a, b, c = i + di, j + dj, k + dk
            if not (0 <= a < 5 and 0 <= b < 5 and 0 <= c < 5) or not occ[n, a, b, c]:
                want[n, i, j, k] = True
    assert torch.equal(boundary(occ), want)
    assert boundary(occ).any() and not torch.equal(boundary(occ), occ)


def _subset_equals_full(problem, x, es, ref, paired):
    full = problem.evaluate(x, es, ref, paired)
    assert set(full) == set(problem.metrics_lower_is_better)
    for name, value in full.items():
        assert problem.evaluate(x, es, ref, paired, (name,)) == {name: value}
    with pytest.raises(ValueError, match="unknown metrics"):
        problem.evaluate(x, es, ref, paired, ("no_such_metric",))
    return full


def test_shapes_evaluation_per_metric_and_against_the_definitions():
    problem = ShapesProblem(ShapeSpec(num_classes=3))
    es = problem.eval_set(2, 0)
    x = problem.data_as_sample(problem.eval_set(2, 1))
    teacher = problem.reference(problem.data_as_sample(problem.eval_set(2, 2)))
    full = _subset_equals_full(problem, x, es, teacher, teacher)
    # MMD-CD and COV/MMD-IoU against held-out data, from the definitions (per class, pooled over references)
    gen_occ = problem.decode(x)
    gen_pts = surface_points(gen_occ)
    labels = es["labels"].tolist()
    mmd_cd, mmd_iou, covered = [], [], 0
    for c in range(3):
        idx = [i for i, lab in enumerate(labels) if lab == c]
        for r in idx:
            mmd_cd.append(min(brute_chamfer(es["data_points"][r], gen_pts[j]) for j in idx))
            d = [1 - float((es["data"][r] & gen_occ[j]).sum()) / float((es["data"][r] | gen_occ[j]).sum())
                 for j in idx]
            mmd_iou.append(min(d))
        # COV: the references that are the nearest one (first of equals) of some generated shape
        nearest = {min(idx, key=lambda r: 1 - float((es["data"][r] & gen_occ[j]).sum())
                       / float((es["data"][r] | gen_occ[j]).sum())) for j in idx}
        covered += len(nearest)
    assert full["mmd_cd_data"] == pytest.approx(sum(mmd_cd) / len(mmd_cd), rel=1e-12)
    assert full["mmd_iou_data"] == pytest.approx(sum(mmd_iou) / len(mmd_iou), rel=1e-6)
    assert full["cov_iou_data"] == pytest.approx(covered / len(labels))


def test_mixture_and_sparse_evaluation_per_metric():
    mix = MixtureProblem(MixtureSpec(num_classes=3))
    es = mix.eval_set(40, 0)
    x, ref = mix.eval_set(40, 1)["data"], mix.eval_set(40, 2)["data"]
    _subset_equals_full(mix, x, es, ref, ref)
    spr = SparseShapesProblem(ShapeSpec(num_classes=2))
    es = spr.eval_set(1, 0)
    x = spr.noise(es, 5)
    _subset_equals_full(spr, x, es, spr.reference(spr.noise(es, 6)), spr.reference(spr.noise(es, 7)))


def test_saved_evaluation_context_equals_the_recomputed_one(tmp_path):
    """A distillation job gets the same evaluation set and reference structures from the context saved by the
    reference job as from recomputing them (sparse samples included)."""
    for pp in ({"name": "spr", "kind": "shapes_sparse", "spec": {"num_classes": 2}, "eval_per_class": 1},
               {"name": "shp", "kind": "shapes", "spec": {"num_classes": 2}, "eval_per_class": 2}):
        problem = jobs.build_problem(pp)
        es = problem.eval_set(pp["eval_per_class"], 4)
        ref, paired = problem.noise(es, 1), problem.noise(es, 2)
        path = jobs._paths(str(tmp_path), pp["name"])["ref"](4)
        torch.save({"ref": jobs._save_samples(ref), "paired": jobs._save_samples(paired)}, path)
        recomputed = jobs._eval_context(problem, pp, str(tmp_path), 4)          # a file without the context
        context = {"eval_set": es, "ref": problem.reference(ref), "paired": problem.reference(paired)}
        torch.save({"ref": jobs._save_samples(ref), "paired": jobs._save_samples(paired),
                    "context": jobs._to_saved(context)}, path)
        loaded = jobs._eval_context(problem, pp, str(tmp_path), 4)
        _assert_same(recomputed, loaded)
        x = problem.noise(es, 3)
        assert problem.evaluate(x, *recomputed) == problem.evaluate(x, *loaded)


def _assert_same(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    elif hasattr(a, "feats"):   # SparseTensor
        assert type(a) is type(b) and torch.equal(a.feats, b.feats) and torch.equal(a.coords, b.coords)
        assert a.batch_size == b.batch_size
    else:
        assert a == b
