"""The distillation / training driver on Ray Train: arguments checked before anything starts, the cluster's
resources checked before training starts, then a `TorchTrainer` running `pipelines.distill.worker` on the shards,
tracked in one MLflow run, with `result.json` beside the checkpoints.

    prepare(cfg)  -> cfg with local paths made absolute; ArgumentError (the job exits 2) for a missing dataset or
                     teacher, a relative output under `ray job submit`, or a re-run that does not match the run
                     already stored under the same name
    run(cfg)      -> DistillResult (trains to `train.max_steps`, resuming when the run exists; then, with
                     `eval.enabled`, evaluates the export on the same Ray instance and logs the table onto the
                     run's MLflow run)
    bench(cfg)    -> one-step breakdown vs the sum of its parts, vs a naive step, and 1 -> 2 worker throughput
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mdt.config import dump_yaml, to_dict
from pipelines.common import storage
from pipelines.distill import training_data
from pipelines.common.cluster import created_model_path, durable_output, init_ray, resolve_local_path
import shutil
import tempfile
from pipelines.common.tracking import log_eval_table
from pipelines.common.tracking import start_training_run
from pipelines.common.tracking import client

log = logging.getLogger("distill")

RUN_IDENTITY_FILE = "run_identity.json"   # what a re-run under the same name must match to resume


class ArgumentError(ValueError):
    """A bad argument, found before anything was started or built."""


@dataclass
class DistillResult:  # noqa: D101 (fields documented inline)
    name: str
    run_dir: str
    checkpoint: str | None       # path of the last checkpoint
    export_dir: str | None       # <checkpoint>/export (student/ and ema/ TRELLIS checkpoints)
    mlflow_run_id: str | None
    tracking_uri: str | None
    wall_s: float
    error: str | None = None
    metrics: dict | None = None  # the last ray.train.report of rank 0 (step, loss, samples_per_s, ...)
    eval_dir: str | None = None  # `eval.enabled`: the evaluation's results (table.md, results.json, previews)


# ------------------------------------------------------------------------------------------------ arguments


def _check_checkpoint(p: str | None, what: str) -> None:
    """A local TRELLIS checkpoint `<stem>.json` + `<stem>.safetensors`, or a hub id `<owner>/<repo>/<path>`."""
    if not p or "://" in p:
        return
    if Path(f"{p}.json").exists() and Path(f"{p}.safetensors").exists():
        return
    parts = p.split("/")
    hub_id = (not os.path.isabs(p) and not p.startswith(".") and len(parts) >= 3 and not Path(parts[0]).exists())
    if not hub_id:
        raise ArgumentError(f"{what} {p}: no checkpoint there (expected {p}.json and {p}.safetensors)")


def run_identity(cfg) -> dict:
    """What makes a stored run the same run: objective, stage, teacher, student init, model."""
    m = cfg.model
    model = {"teacher": m.teacher, "student": m.student, **({"shape_teacher": m.shape_teacher}
                                                             if m.shape_teacher else {})}
    if not (m.teacher or m.student):
        model.update(name=m.name, args=dict(m.args))
    return {"objective": cfg.objective.name, "stage": cfg.stage, **model}


def check_resume(cfg, run_dir: str) -> None:
    """A run stored under this name must be the same run (changing e.g. `train.max_steps` is fine)."""
    st = training_data.storage_config(cfg)
    uri = f"{run_dir}/{RUN_IDENTITY_FILE}"
    if not storage.exists(uri, st):
        return
    stored, wanted = json.loads(storage.read_bytes(uri, st)), run_identity(cfg)
    # the model's name/args are recorded only for a run without a teacher: compared when both runs have them
    # (else the teacher line already says what differs, and "args None -> {...}" would say nothing)
    diff = [f"{k} {stored.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(stored) & set(wanted))
            if stored.get(k) != wanted.get(k)]
    if diff:
        raise ArgumentError(f"run '{cfg.name}' in {cfg.output} is a different run ({'; '.join(diff)}): "
                            "give another --name to start a new run, or the stored run's settings to resume it")


def prepare(cfg):
    """Local paths -> absolute (workers run elsewhere); every argument checked. Starts and builds nothing."""
    try:
        durable_output(cfg.output, "--output")
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    cfg.output = resolve_local_path(cfg.output)
    cfg.data.uri = resolve_local_path(cfg.data.uri)
    cfg.model.teacher = resolve_local_path(cfg.model.teacher, must_exist=True)
    cfg.model.student = resolve_local_path(cfg.model.student, must_exist=True)
    cfg.model.shape_teacher = resolve_local_path(cfg.model.shape_teacher, must_exist=True)
    cfg.condition.model = (created_model_path(cfg.condition.model, cfg.output) if cfg.condition.tiny
                           else resolve_local_path(cfg.condition.model, must_exist=True))
    cfg.snapshot.decoder = resolve_local_path(cfg.snapshot.decoder, must_exist=True)
    try:
        training_data.check_data(cfg)
    except (OSError, ValueError) as e:
        raise ArgumentError(str(e).splitlines()[0]) from None
    _check_checkpoint(cfg.model.teacher, "--teacher")
    check_data_teacher(cfg)
    _check_checkpoint(cfg.model.student, "--student")
    _check_checkpoint(cfg.model.shape_teacher, "--shape-teacher")
    check_resume(cfg, run_dir(cfg))
    if cfg.eval.enabled:
        cfg.eval.decoder = resolve_local_path(cfg.eval.decoder, must_exist=True)
        cfg.eval.data = resolve_local_path(cfg.eval.data)
        cfg.eval.output = resolve_local_path(cfg.eval.output)
        _check_checkpoint(cfg.eval.decoder, "eval.decoder")
        try:
            eval_config(cfg).validate()
        except ValueError as e:  # an unknown preset or override (ConfigError), an inconsistent setting
            raise ArgumentError(f"eval: {str(e).splitlines()[0]}") from None
    return cfg


def eval_config(cfg, tracking: dict | None = None):
    """The evaluation of this run's export (`eval.*`): the evaluation preset on the run's data (or `eval.data`),
    with the run's conditioner, the exported weights MLflow registers as the student against the run's teacher
    (a flow-matching run: as the teacher, teacher samplers only), results under `<output>/<name>/eval`, its
    MLflow run in the training run's store and linked to it."""
    from pipelines.evaluate import driver as evaluate  # heavy: PIL, safetensors

    e = cfg.eval
    if not e.output and "://" in cfg.output:
        raise ArgumentError(f"output {cfg.output} is not local: give eval.output (a local directory)")
    weights = "student" if (cfg.mlflow.register_weights == "student" or not cfg.ema.enabled) else "ema"
    exported = f"{run_dir(cfg)}/export/{weights}/{cfg.model.export_stem}"
    as_teacher = cfg.objective.name == "flow_matching"
    ec = evaluate.make_config(e.preset, data=e.data or cfg.data.uri,
                              teacher=exported if as_teacher else cfg.model.teacher,
                              student=None if as_teacher else exported, decoder=e.decoder,
                              output=e.output or run_dir(cfg), distill_run_id=(tracking or {}).get("run_id"),
                              overrides=list(e.overrides) + ([("data.split", e.split)] if e.split else []))
    ec.name = "eval"
    ec.condition = dataclasses.replace(cfg.condition)
    if as_teacher:
        ec.samplers = [s for s in ec.samplers if s.model == "teacher"]
    ec.mlflow.enabled = bool(tracking)
    ec.mlflow.tracking_uri = (tracking or {}).get("tracking_uri")
    ec.mlflow.run_name = f"{cfg.name} eval"
    return ec


def evaluate_export(cfg, tracking: dict | None) -> str:
    """Run the evaluation of `eval_config` (on the Ray instance this process is connected to) and log its table
    and headline metrics onto the training run; the evaluation's directory."""
    from pipelines.evaluate import driver as evaluate  # heavy: PIL, safetensors

    ec = eval_config(cfg, tracking)
    evaluate.absolutize_paths(ec)
    result = evaluate.run(ec)
    if tracking:
        log_eval_table(tracking["tracking_uri"], tracking["run_id"], result.run_dir,
                       evaluate.headline_metrics(result.results))
    return result.run_dir


def run_dir(cfg) -> str:
    return f"{cfg.output.rstrip('/')}/{cfg.name}"


# ------------------------------------------------------------------------------------------------ resources


def required_resources(cfg) -> dict[str, float]:
    """Logical resources of a run: its Train workers plus `scaling.data_cpus` for Ray Data's read tasks (Ray
    Train keeps the workers' reservation away from Ray Data)."""
    sc = cfg.scaling
    need = {"CPU": sc.num_workers * sc.cpus_per_worker + sc.data_cpus}
    if sc.use_gpu:
        need["GPU"] = float(sc.num_workers)
    return need


def start_ray(cfg, need: dict[str, float] | None = None) -> None:
    """Connect (address / $RAY_ADDRESS) or start a private instance with at least the CPUs the run needs."""
    need = need or required_resources(cfg)
    cpus = max(float(cfg.ray.num_cpus or os.cpu_count() or 1), need["CPU"])
    init_ray(cfg.ray.address, num_cpus=cpus, include_dashboard=cfg.ray.include_dashboard)


def check_cluster(cfg, need: dict[str, float] | None = None) -> None:
    """ArgumentError naming the shortfall when the cluster can never run the job (unless it autoscales)."""
    import ray  # heavy: ray, psutil

    if cfg.ray.autoscaling:
        return
    need = need or required_resources(cfg)
    have = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    short = [f"{need[k]:g} {k} (cluster has {have.get(k, 0):g})" for k in need if have.get(k, 0) + 1e-9 < need[k]]
    sc = cfg.scaling
    per_worker = {"CPU": sc.cpus_per_worker, **({"GPU": 1.0} if sc.use_gpu else {})}
    if not any(all(n.get(k, 0) + 1e-9 >= v for k, v in per_worker.items()) for n in nodes):
        short.append(f"a node with {', '.join(f'{v:g} {k}' for k, v in per_worker.items())} for one worker")
    if short:
        raise ArgumentError(f"the cluster cannot run this job: it needs {' and '.join(short)} "
                            f"({sc.num_workers} workers x {sc.cpus_per_worker:g} CPU"
                            f"{' + 1 GPU' if sc.use_gpu else ''} + {sc.data_cpus:g} CPU for data reads); "
                            "lower scaling.num_workers / scaling.cpus_per_worker, add nodes, or set "
                            "ray.autoscaling=true")


# ------------------------------------------------------------------------------------------------ run


def check_data_teacher(cfg) -> dict:
    """Teacher-generated shards (jobs/synthesize.py) must come from the run's teacher unless
    `data.allow_teacher_mismatch`; returns the data's provenance (pipelines.synthesize.data_teachers)."""
    from pipelines.synthesize.driver import check_teacher, data_teachers  # heavy: PIL, safetensors

    data = data_teachers(cfg.data.uri, training_data.storage_config(cfg))
    # With teacher_data the run samples its own x0 from its teacher: only coordinates and conditions are read.
    reason = None if cfg.teacher_data.enabled else check_teacher(cfg.stage, cfg.model.teacher, data)
    if reason and not cfg.data.allow_teacher_mismatch:
        raise ArgumentError(reason)
    if reason:
        log.warning("distilling anyway (data.allow_teacher_mismatch): %s", reason)
    return data


def run(cfg, resolved: dict | None = None, hooks=()) -> DistillResult:
    """Train to `train.max_steps` (resuming when the run exists). `prepare(cfg)` first unless already done.
    `hooks`: callables run by every worker after every step (`pipelines.distill.worker`)."""
    import ray.train  # heavy: ray, pandas
    from ray.train.torch import TorchConfig, TorchTrainer  # heavy: ray, pandas

    from mdt.training.build import ensure_tiny_conditioner  # heavy: PIL, safetensors
    from pipelines.distill.worker import train_loop_per_worker  # heavy: PIL, pandas

    t0 = time.time()
    cfg = prepare(cfg)
    resolved = resolved if resolved is not None else to_dict(cfg)
    st = training_data.storage_config(cfg)
    rdir = run_dir(cfg)
    start_ray(cfg)
    check_cluster(cfg)
    import ray.data  # heavy: ray, pandas

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True  # deterministic streaming split: exact per-rank resume
    ensure_tiny_conditioner(cfg.condition)
    ds, stats = training_data.load_dataset(cfg)
    collate = training_data.make_collate(cfg, stats)
    snapshot_rows = training_data.first_rows(cfg, cfg.snapshot.num_conditions) \
        if cfg.snapshot.num_conditions > 0 else None
    storage.write_bytes_atomic(f"{rdir}/{RUN_IDENTITY_FILE}", json.dumps(run_identity(cfg), indent=2).encode(), st)
    from pipelines.synthesize.driver import data_tags, data_teachers  # heavy: PIL, safetensors

    tracking = start_training_run(cfg, rdir, resolved, dump_yaml(resolved), st,
                                  tags=data_tags(data_teachers(cfg.data.uri, st)))

    sc = cfg.scaling
    backend = sc.backend if sc.backend != "auto" else ("nccl" if sc.use_gpu else "gloo")
    storage_path, storage_fs = cfg.output, None
    if storage.is_s3(cfg.output) and st.s3_endpoint_url:
        storage_fs, storage_path = storage.filesystem(cfg.output, st)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "collate": collate, "run_dir": rdir, "mlflow": tracking,
                           "snapshot_rows": snapshot_rows, "hooks": list(hooks)},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker={"CPU": sc.cpus_per_worker},
                                               placement_strategy=sc.placement_strategy),
        run_config=ray.train.RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
                                       failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(
                                           num_to_keep=cfg.train.keep_checkpoints)),
        datasets={"train": ds},
    )
    try:
        result = trainer.fit()
        ckpt = result.checkpoint.path if result.checkpoint is not None else None
        error = str(result.error) if getattr(result, "error", None) else None
        metrics = dict(result.metrics or {})
    except Exception as e:  # TrainingFailedError after max_failures
        log.exception("training failed")
        ckpt, error, metrics = None, f"{type(e).__name__}: {e}", None
    export = latest_export(cfg, ckpt, st) if ckpt else None
    eval_dir = None
    if cfg.eval.enabled and not error:
        try:
            eval_dir = evaluate_export(cfg, tracking)
        except Exception as e:
            log.exception("evaluation failed")
            error = f"evaluation failed: {type(e).__name__}: {e}"
    if tracking:

        client(tracking["tracking_uri"]).set_terminated(tracking["run_id"], "FAILED" if error else "FINISHED")
    res = DistillResult(cfg.name, rdir, ckpt, export, (tracking or {}).get("run_id"),
                        (tracking or {}).get("tracking_uri"), time.time() - t0, error, metrics, eval_dir)
    storage.write_bytes_atomic(f"{rdir}/result.json", json.dumps(res.__dict__, indent=2).encode(), st)
    storage.write_bytes_atomic(f"{rdir}/resolved_config.yaml", dump_yaml(resolved).encode(), st)
    return res


def latest_export(cfg, ckpt: str, st) -> str | None:
    """Copy the final checkpoint's export to `<output>/<name>/export` (a path that does not change with the step
    count: `.../export/ema/<stem>` is the next run's `--teacher`); its URI, or None when nothing was exported."""
    src = ckpt if "://" in ckpt or not storage.is_s3(cfg.output) else f"s3://{ckpt}"
    src = f"{src.rstrip('/')}/export"
    files = storage.list_files(src, st)
    if not files:
        return None
    dst = f"{run_dir(cfg)}/export"
    for f in files:
        storage.write_bytes_atomic(dst + f[len(src):], storage.read_bytes(f, st), st)
    return dst


# ------------------------------------------------------------------------------------------------ bench


def bench(cfg, workers: list[int], steps: int) -> dict:
    """`mdt.training.bench.bench_step` (no Ray: the step vs the sum of its parts and vs a naive step of the same
    maths) and the samples/s of short Ray Train runs with each worker count, measured in this one call."""

    from mdt.training.bench import bench_step, format_step  # heavy: PIL, safetensors

    cfg = prepare(cfg)
    step = bench_step(cfg, cfg.scaling.use_gpu,
                      threads=max(1, int(cfg.train.torch_threads or cfg.scaling.cpus_per_worker)))
    print(format_step(step), flush=True)
    cores = os.cpu_count() or 1
    scratch = tempfile.mkdtemp(prefix="mdt-distill-bench-")   # throw-away checkpoints of the throughput runs
    runs = []
    variants = []
    for n in workers:
        c = dataclasses.replace(
            cfg, name=f"{cfg.name}-bench-{n}w", output=scratch,
            train=dataclasses.replace(cfg.train, max_steps=steps, ckpt_every=0, log_every=max(1, steps // 3),
                                      export=False, torch_threads=max(1, cores // n)),
            scaling=dataclasses.replace(cfg.scaling, num_workers=n),
            snapshot=dataclasses.replace(cfg.snapshot, every=0, num_conditions=0),
            mlflow=dataclasses.replace(cfg.mlflow, enabled=False),
            eval=dataclasses.replace(cfg.eval, enabled=False))
        variants.append(c)
    need = max((required_resources(c) for c in variants), key=lambda r: r["CPU"])
    start_ray(cfg, need)
    try:
        for c in variants:
            r = run(c)
            n = c.scaling.num_workers
            sps = (r.metrics or {}).get("samples_per_s")
            runs.append({"workers": n, "threads_per_worker": c.train.torch_threads,
                         "batch_per_worker": cfg.data.batch_size, "steps": steps, "samples_per_s": sps,
                         "wall_s": round(r.wall_s, 1), "error": r.error})
            print(f"{n} worker(s) x {c.train.torch_threads} thread(s), batch {cfg.data.batch_size}/worker, {steps} "
                  f"steps: {sps if sps is None else round(sps, 2)} samples/s (wall {r.wall_s:.0f} s)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base = next((r for r in runs if r["samples_per_s"]), None)
    for r in runs:
        r["speedup_vs_first"] = (r["samples_per_s"] / base["samples_per_s"]) if (base and r["samples_per_s"]) \
            else None
    out = {"step": step, "throughput": runs,
           "ratios": {"step_vs_sum_of_parts": step["step_vs_sum_of_parts"],
                      "step_vs_sum_of_parts_goal_max": step["step_vs_sum_of_parts_goal_max"],
                      "speedup_vs_naive": step["speedup_vs_naive"],
                      "speedup_vs_naive_goal_min": step["speedup_vs_naive_goal_min"],
                      "workers_speedup": runs[-1]["speedup_vs_first"] if len(runs) > 1 else None,
                      "workers": [r["workers"] for r in runs]}}
    print(format_ratios(out), flush=True)
    return out


def format_ratios(out: dict) -> str:
    r, runs = out["ratios"], out["throughput"]
    lines = ["", "ratios (measured side by side in this run):",
             f"  {'measure':<44} {'value':>8} {'goal':>8}",
             f"  {'step time / sum of its parts':<44} {r['step_vs_sum_of_parts']:>8.2f} "
             f"{'<= ' + format(r['step_vs_sum_of_parts_goal_max'], 'g'):>8}",
             f"  {'samples/s vs the naive step (same maths)':<44} {r['speedup_vs_naive']:>8.2f} "
             f"{'>= ' + format(r['speedup_vs_naive_goal_min'], 'g'):>8}"]
    if r["workers_speedup"] is not None:
        label = f"samples/s, {runs[0]['workers']} -> {runs[-1]['workers']} workers"
        lines.append(f"  {label:<44} {r['workers_speedup']:>8.2f} {'-':>8}")
    return "\n".join(lines)
