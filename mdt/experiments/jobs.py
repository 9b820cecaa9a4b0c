"""Units of work of the benchmark, run in worker processes (one torch thread each).

* `teacher_job`: flow-matching training of a problem's teacher network (through mdt.training.Trainer); saves the
  EMA weights; on `gmm` also the exact teacher's straightness.
* `reference_job`: for one seed, the evaluation set, the teacher's 25-step CFG reference samples (independent
  noise) and the teacher evaluated at 1, 2, 4 and 25 steps from the evaluation noise (its 25-step samples are the
  paired reference of the students); saves both sample sets and the evaluation context built from them (the
  evaluation set and the reference structures), which every distillation job of the seed loads; and the seed's
  image-only training pool (`teacher_pool`: K teacher samples per condition). On validation seeds
  (`teacher_metrics=False`) only the samples, the context and the pool: the teacher's metrics are reported on the
  test seeds alone.
* `distill_job`: one method, one seed, one configuration (DistillHP overrides of the preset's `distill`): distil
  from the teacher (an image-only variant: from the seed's teacher pool) and evaluate at 1, 2 and 4 steps
  (validation runs: only the selection metric at the selection's step counts).
Every job takes plain dicts (picklable) and returns a dict of metrics, logs and CPU/wall times.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from mdt.sparse import SparseTensor, sparse_cat, sparse_unbind

from .gmm import GMMProblem, GMMSpec
from .methods import IMAGE_ONLY, RENOISE_OFFSET, DistillHP, TeacherHP, base_method, distill, sample, train_teacher
from .mixture import MixtureProblem, MixtureSpec
from .shapes import ShapeSpec, ShapesProblem, SparseShapesProblem

EVAL_STEPS = (1, 2, 4)
RENOISE_STEPS = (2, 4)         # also evaluated with the re-noising sampler (at 1 step it is the Euler step)
TEACHER_STEPS = 25
REF_NOISE_OFFSET = 50_000      # seed offset of the reference teacher samples' noise
EVAL_NOISE_OFFSET = 60_000     # seed offset of the evaluation noise (shared by all methods of a seed)
TRAIN_SEED_OFFSET = 1_000      # distillation data/noise streams of seed s: 1000 + 97 s, the same for every method
POOL_SEED_OFFSET = 20_000      # the image-only pool of seed s: eval_set seed 30_000 + s, noise 20_000 + s
POOL_COVERAGE_K = (1, 2, 4, 8, 16, 32, 64)      # gmm: the pool's mode coverage as a function of K
# evaluation sets are drawn with seed 10_000 + s (held-out floor: s + 500), so validation seeds (10, ...) and test
# seeds (0, 1, 2) never share evaluation data, noise or a distillation stream


def build_problem(pp: dict):
    kind = pp["kind"]
    if kind == "gmm":
        return GMMProblem(GMMSpec(**pp.get("spec", {})))
    if kind == "mixture":
        return MixtureProblem(MixtureSpec(**pp.get("spec", {})))
    spec = ShapeSpec(**pp.get("spec", {}))
    if kind == "shapes":
        return ShapesProblem(spec, pp.get("model", {}))
    if kind == "shapes_sparse":
        return SparseShapesProblem(spec, pp.get("model", {}))
    raise ValueError(f"unknown problem kind {kind!r}")


def _paths(out: str, name: str) -> dict:
    work = Path(out) / "work"
    work.mkdir(parents=True, exist_ok=True)
    return {"teacher": work / f"{name}_teacher.pt", "ref": lambda s: work / f"{name}_ref_seed{s}.pt"}


def _setup_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def _load_teacher(problem, pp: dict, out: str):
    model = problem.build_model(0)
    model.load_state_dict(torch.load(_paths(out, pp["name"])["teacher"], weights_only=True))
    return model.eval().requires_grad_(False)


def _save_samples(x) -> dict:
    if isinstance(x, SparseTensor):
        return {"feats": x.feats, "coords": x.coords, "batch_size": x.batch_size}
    return {"dense": x}


def _load_samples(d: dict):
    if "dense" in d:
        return d["dense"]
    return SparseTensor(d["feats"], d["coords"], batch_size=d["batch_size"])


def _to_saved(obj):
    """Nested dicts / lists of tensors and SparseTensors -> the same with SparseTensors as `_save_samples` dicts."""
    if isinstance(obj, SparseTensor):
        return {"sparse": _save_samples(obj)}
    if isinstance(obj, dict):
        return {k: _to_saved(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_saved(v) for v in obj)
    return obj


def _from_saved(obj):
    if isinstance(obj, dict):
        if set(obj) == {"sparse"}:
            return _load_samples(obj["sparse"])
        return {k: _from_saved(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_saved(v) for v in obj)
    return obj


def _generate(method: str, model, problem, es: dict, noise_seed: int, steps: int, cfg: float, batch: int | None,
              mode: str = "euler"):
    noise = problem.noise(es, noise_seed)
    g = torch.Generator().manual_seed(noise_seed + RENOISE_OFFSET)      # re-noising: the same per seed
    x = sample(method, model, noise, es["cond"], steps, cfg, batch=batch, mode=mode, generator=g)
    return problem.nonfinite_guard(x)


def teacher_pool(problem, teacher, pp: dict, seed: int) -> tuple[dict, dict | None]:
    """The image-only training set of a seed: `pp["imageonly_k"]` samples per condition of the teacher's own
    sampler (TEACHER_STEPS Euler steps + CFG at the problem's strength; the sparse problem: on the coordinates of
    the conditions' shapes, as a structure stage would give them), from noise of the seed's own stream. Returns
    ({"x0", "cond", "labels"}, pool statistics): on a problem with modes, the pool's `mode_coverage` and
    `off_mode` at K and at every POOL_COVERAGE_K (the first k samples per condition)."""
    k = int(pp["imageonly_k"])
    has_modes = "mode_coverage" in problem.metrics_lower_is_better
    k_gen = max(k, *POOL_COVERAGE_K) if has_modes else k
    es = problem.eval_set(k_gen, POOL_SEED_OFFSET + 10_000 + seed)
    x = _generate("teacher", teacher, problem, es, POOL_SEED_OFFSET + seed, TEACHER_STEPS, pp["distill"]["cfg"],
                  pp.get("eval_batch"))
    labels = es["labels"]
    stats = None
    if has_modes:
        first = (torch.arange(labels.shape[0]) % k_gen) < k        # the first k samples of each condition
        cov = {}
        for kk in sorted({k, *POOL_COVERAGE_K}):
            m = (torch.arange(labels.shape[0]) % k_gen) < kk
            cov[str(kk)] = problem.evaluate(x[m], {"labels": labels[m]}, None, None, ("mode_coverage", "off_mode"))
        stats = {"k": k, **cov[str(k)], "by_k": cov}
        x, es, labels = x[first], {"cond": es["cond"][first]}, labels[first]
    return {"x0": x, "cond": es["cond"], "labels": labels}, stats


def pool_batches(pool: dict):
    """sample_batch(n, g) over a fixed pool (uniform indices from the run's data generator `g`)."""
    x0, cond = pool["x0"], pool["cond"]
    parts = sparse_unbind(x0) if isinstance(x0, SparseTensor) else None

    def sample_batch(n: int, g: torch.Generator) -> dict:
        idx = torch.randint(cond.shape[0], (n,), generator=g)
        x = sparse_cat([parts[i] for i in idx.tolist()], 0) if parts is not None else x0[idx]
        return {"x0": x, "cond": cond[idx]}

    return sample_batch


def teacher_job(pp: dict, out: str, threads: int = 1) -> dict:
    _setup_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    problem = build_problem(pp)
    model = problem.build_model(0)
    hp = TeacherHP(**pp["teacher"])
    ema, log = train_teacher(model, problem.train_batch, hp, seed=0, log_every=max(1, hp.steps // 20))
    torch.save(ema.state_dict(), _paths(out, pp["name"])["teacher"])
    straight = problem.straightness() if hasattr(problem, "straightness") else None
    return {"job": "teacher", "problem": pp["name"], "log": log, "params": sum(p.numel() for p in model.parameters()),
            "straightness": straight, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def reference_job(pp: dict, out: str, seed: int, teacher_metrics: bool = True, threads: int = 1) -> dict:
    _setup_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    problem = build_problem(pp)
    teacher = _load_teacher(problem, pp, out)
    if hasattr(problem, "exact_teacher"):        # the exact teacher is the one sampled (its Euler steps)
        teacher = problem.exact_teacher()
    cfg = pp["distill"]["cfg"]
    es = problem.eval_set(pp["eval_per_class"], seed)
    batch = pp.get("eval_batch")
    if hasattr(problem, "ode_endpoints"):        # exact references: the ODE endpoints of the same noises
        ref = problem.ode_endpoints(problem.noise(es, REF_NOISE_OFFSET + seed), es["cond"])
        paired = problem.ode_endpoints(problem.noise(es, EVAL_NOISE_OFFSET + seed), es["cond"])
    else:
        ref = _generate("teacher", teacher, problem, es, REF_NOISE_OFFSET + seed, TEACHER_STEPS, cfg, batch)
        paired = _generate("teacher", teacher, problem, es, EVAL_NOISE_OFFSET + seed, TEACHER_STEPS, cfg, batch)
    ref_r, paired_r = _reference(problem, ref), _reference(problem, paired)
    context = {"eval_set": es, "ref": ref_r, "paired": paired_r}
    pool, pool_stats = teacher_pool(problem, teacher, pp, seed) if pp.get("imageonly_k") else (None, None)
    torch.save({"ref": _save_samples(ref), "paired": _save_samples(paired), "context": _to_saved(context),
                "pool": _to_saved(pool)}, _paths(out, pp["name"])["ref"](seed))
    metrics, data_floor, class_mean = {}, None, None
    if hasattr(problem, "class_mean_sample"):    # the collapsed reference sampler of the class_mean_worst gate
        class_mean = problem.evaluate(problem.class_mean_sample(es), es, ref_r, paired_r)
    if teacher_metrics:
        metrics[str(TEACHER_STEPS)] = problem.evaluate(paired, es, ref_r, paired_r)
        for steps in EVAL_STEPS:
            x = _generate("teacher", teacher, problem, es, EVAL_NOISE_OFFSET + seed, steps, cfg, batch)
            metrics[str(steps)] = problem.evaluate(x, es, ref_r, paired_r)
        # finite-sample floor: held-out data against a second, independent held-out set
        # (not for the sparse variant, whose samples live on the evaluation set's own coordinates)
        if hasattr(problem, "data_as_sample"):
            floor = problem.eval_set(pp["eval_per_class"], seed + 500)
            data_floor = problem.evaluate(problem.data_as_sample(floor), es, ref_r, None)
    return {"job": "reference", "problem": pp["name"], "method": "teacher", "seed": seed, "metrics": metrics,
            "data_floor": data_floor, "class_mean": class_mean, "pool": pool_stats, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0}


def _reference(problem, x):
    if hasattr(problem, "reference"):
        return problem.reference(x)
    return x


def _eval_context(problem, pp: dict, out: str, seed: int) -> tuple[dict, object, object]:
    """(evaluation set, reference structures of the teacher's reference and paired samples) of a seed, as saved by
    `reference_job`; rebuilt from the saved samples for work directories written before the context was saved."""
    saved = torch.load(_paths(out, pp["name"])["ref"](seed), weights_only=False)
    if "context" in saved:
        ctx = _from_saved(saved["context"])
        return ctx["eval_set"], ctx["ref"], ctx["paired"]
    es = problem.eval_set(pp["eval_per_class"], seed)
    return (es, _reference(problem, _load_samples(saved["ref"])),
            _reference(problem, _load_samples(saved["paired"])))


def distill_job(pp: dict, out: str, method: str, seed: int, overrides: dict | None = None, label: str | None = None,
                eval_steps: tuple[int, ...] = EVAL_STEPS, metrics: tuple[str, ...] | None = None,
                renoise_steps: tuple[int, ...] = RENOISE_STEPS, threads: int = 1) -> dict:
    """`metrics`: the metric names to compute (None: all of the problem's); `renoise_steps`: step counts also
    evaluated with the re-noising sampler (result "renoise")."""
    _setup_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    problem = build_problem(pp)
    teacher = _load_teacher(problem, pp, out)
    hp = DistillHP(**{**pp["distill"], **(overrides or {})})
    stream = TRAIN_SEED_OFFSET + 97 * seed                 # common random numbers across methods
    exact = problem.exact_teacher() if hasattr(problem, "exact_teacher") else None
    sample_batch = problem.train_batch
    if method.endswith(IMAGE_ONLY):                       # data-free: x0 from the seed's teacher pool
        saved = torch.load(_paths(out, pp["name"])["ref"](seed), weights_only=False)
        sample_batch = pool_batches(_from_saved(saved["pool"]))
    student, log = distill(base_method(method), teacher, sample_batch, hp, seed=stream,
                           log_every=max(1, hp.steps // 20), target_teacher=exact)
    train_wall, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    es, ref_r, paired_r = _eval_context(problem, pp, out, seed)
    results = {}
    for steps in eval_steps:
        x = _generate(method, student, problem, es, EVAL_NOISE_OFFSET + seed, steps, hp.cfg, pp.get("eval_batch"))
        results[str(steps)] = problem.evaluate(x, es, ref_r, paired_r, metrics)
    renoise = {}
    for steps in renoise_steps:
        x = _generate(method, student, problem, es, EVAL_NOISE_OFFSET + seed, steps, hp.cfg, pp.get("eval_batch"),
                      mode="consistency")
        renoise[str(steps)] = problem.evaluate(x, es, ref_r, paired_r, metrics)
    return {"job": "distill", "problem": pp["name"], "method": method, "label": label or method, "seed": seed,
            "overrides": dict(overrides or {}), "metrics": results, "renoise": renoise, "log": log,
            "train_wall_s": train_wall,
            "train_cpu_s": train_cpu, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
