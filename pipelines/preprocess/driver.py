"""Builds and runs the Ray Data graph of the preprocessing job from the configured stages.

    sources (driver) -> resume filter -> from_items -> map(StageRunner(download)) -> ... -> map_batches(ShardWriter)

:class:`StageRunner` wraps every stage class: it builds the stage once per actor, passes rows that already
failed through untouched, turns exceptions into ``row["error"] = "<stage>: <reason>"``, records the stage's
time in ``row["timings"]`` and makes every output row have exactly the same keys (a Ray Data requirement,
see pipelines/README.md).
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass, field

from pipelines.common import cluster, storage
from pipelines.preprocess.config import PreprocessConfig, config_hash, join_uri
from pipelines.preprocess.rows import add_timing, fail
from pipelines.preprocess.stages import resolve_stage, stage_keys, stage_resources
import pyarrow as pa
from pipelines.preprocess.shards import ShardWriter
from pipelines.preprocess.shards import shard_dir
import pyarrow.fs as pafs
from pipelines.preprocess.ledger import Ledger
from pipelines.preprocess import report as report_mod
from pipelines.preprocess.shards import write_manifest

log = logging.getLogger(__name__)

class StageRunner:
    """Row-level wrapper around one stage (see module docstring)."""

    def __init__(self, stage: str, cfg: PreprocessConfig, keys: tuple[str, ...], stage_kwargs: dict | None = None):
        cls = resolve_stage(stage)
        self.stage = cls(cfg, **(stage_kwargs or {}))
        self.name = getattr(cls, "name", stage)
        self.keys = keys

    def __call__(self, row: dict) -> dict:
        if not row.get("error"):
            t0 = time.perf_counter()
            try:
                out = self.stage(row)
                row = out if isinstance(out, dict) else row
            except Exception as e:  # a stage failure is a row failure, never a job failure
                log.warning("%s failed on %s: %s", self.name, row.get("file_identifier"), e)
                fail(row, self.name, f"{type(e).__name__}: {e}")
            add_timing(row, self.name, time.perf_counter() - t0)
        return {k: row.get(k) for k in self.keys}


class BatchStageRunner(StageRunner):
    """:class:`StageRunner` for a stage with ``call_batch(rows) -> [row | Exception]`` (Ray Data map_batches):
    one call per batch of rows, failures still per row; each row records its share of the batch's time."""

    def __call__(self, batch):
        rows = batch.to_pylist()
        live = [r for r in rows if not r.get("error")]
        if live:
            t0 = time.perf_counter()
            try:
                results = self.stage.call_batch(live)
            except Exception as e:  # the whole batch failed in a shared step: every row of it, with the reason
                log.warning("%s failed on a batch of %d rows: %s", self.name, len(live), e)
                results = [e] * len(live)
            share = (time.perf_counter() - t0) / len(live)
            for row, res in zip(live, results):
                if isinstance(res, Exception):
                    fail(row, self.name, f"{type(res).__name__}: {res}")
                else:
                    row.update(res)
                add_timing(row, self.name, share)
        return pa.Table.from_pylist([{k: r.get(k) for k in self.keys} for r in rows])


@dataclass
class RunResult:
    run_id: str
    config_hash: str
    output: str
    listed: int
    skipped_done: int
    skipped_failed: int
    summaries: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    listing: dict = field(default_factory=dict)
    manifest: dict | None = None
    report: dict | None = None


def init_ray(cfg: PreprocessConfig) -> bool:
    """Connect to / start Ray with the job's `ray` section; True when this call started (or connected) it."""
    return cluster.init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                            object_store_memory=(cfg.ray.object_store_memory_gb or 0) * 1024**3 or None)


def build_dataset(cfg: PreprocessConfig, rows: list[dict], run_id: str, chash: str,
                  limiter: str | None = None, done_sha256=None, claims: str | None = None):
    import ray.data  # heavy: ray, pandas


    per_block = max(1, cfg.ray.rows_per_block)
    check_resources(cfg)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / per_block)))
    for name, keys in stage_keys(cfg.stages):
        res = stage_resources(cfg, name)
        kwargs = {}
        if name == "download":
            kwargs = {"limiter": limiter, "done_sha256": done_sha256, "claims": claims}
        remote = {}
        if res.memory_gb:
            remote["memory"] = int(res.memory_gb * 1024**3)
        ctor = {"stage": name, "cfg": cfg, "keys": keys, "stage_kwargs": kwargs}
        pool = dict(compute=ray.data.ActorPoolStrategy(size=max(1, res.concurrency)), num_cpus=res.num_cpus,
                    num_gpus=res.num_gpus or None, **remote)
        if res.batch_size > 1:  # check_batching: the stage has call_batch
            ds = ds.map_batches(BatchStageRunner, fn_constructor_kwargs=ctor, batch_size=res.batch_size,
                                batch_format="pyarrow", **pool)
        else:
            ds = ds.map(StageRunner, fn_constructor_kwargs=ctor, **pool)
    w = stage_resources(cfg, "write")
    ds = ds.map_batches(ShardWriter, fn_constructor_kwargs={"cfg": cfg, "run_id": run_id, "config_hash": chash},
                        batch_size=max(1, cfg.write.rows_per_shard), batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=max(1, w.concurrency)), num_cpus=w.num_cpus)
    return ds


def check_batching(cfg: PreprocessConfig) -> None:
    """ValueError when `resources.<stage>.batch_size` is not >= 1, or > 1 for a stage without `call_batch`."""
    for name in cfg.stages:
        n = stage_resources(cfg, name).batch_size
        if n < 1 or (n > 1 and not hasattr(resolve_stage(name), "call_batch")):
            raise ValueError(f"resources.{name}.batch_size={n}: must be >= 1, and 1 for a stage that takes one row "
                             "at a time")


def check_resources(cfg: PreprocessConfig) -> None:
    """Warn when the actor pools cannot all run at once: Ray Data then runs stages one after another
    instead of streaming (and keeps every row in the object store in between)."""
    import ray  # heavy: ray, psutil

    need_cpu = need_gpu = 0.0
    for name in [*cfg.stages, "write"]:
        r = stage_resources(cfg, name)
        need_cpu += r.concurrency * r.num_cpus
        need_gpu += r.concurrency * r.num_gpus
    have = ray.cluster_resources() if ray.is_initialized() else {}
    if have and (need_cpu > have.get("CPU", 0) + 1e-9 or need_gpu > have.get("GPU", 0) + 1e-9):
        log.warning("the stages' actor pools need %.2f CPU / %.2f GPU but the cluster has %.2f / %.2f: "
                    "stages will not all run at once (lower resources.<stage>.concurrency or num_cpus)",
                    need_cpu, need_gpu, have.get("CPU", 0), have.get("GPU", 0))


def cleanup_orphans(cfg: PreprocessConfig, chash: str, committed: set[str]) -> int:
    """Delete shard files no ledger record names (left by a killed run) and stray temp files.

    Assumes one job per output at a time."""

    d = shard_dir(cfg.output, chash)
    n = 0
    fs, path = storage.filesystem(d, cfg.storage)

    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return 0
    for fi in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        base = fi.base_name
        if fi.type != pafs.FileType.File:
            continue
        if base.startswith(".tmp-") or (base.endswith(".parquet") and base not in committed):
            fs.delete_file(fi.path)
            n += 1
    if n:
        log.info("removed %d orphan/temporary shard files from %s", n, d)
    return n


def absolutize_paths(cfg: PreprocessConfig) -> None:
    """Local paths in the config become absolute on the driver: Ray workers do not share its cwd."""
    fix = cluster.resolve_local_path
    cfg.output = fix(cfg.output)
    cfg.download.cache_uri = fix(cfg.download.cache_uri)
    cfg.download.extract_dir = fix(cfg.download.extract_dir)
    cfg.tiny_models = cluster.created_model_path(cfg.tiny_models, cfg.output)


def prepare(cfg: PreprocessConfig) -> PreprocessConfig:
    """The job's arguments checked before Ray starts (one-line ValueError: a relative output under `ray job
    submit`, an unknown source kind, a local source path that does not exist), then local paths made absolute."""
    cluster.durable_output(cfg.output, "--output")
    from pipelines.preprocess.sources import check_specs  # heavy: psutil, ray

    check_specs(cfg)
    check_batching(cfg)
    absolutize_paths(cfg)
    return cfg


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


@dataclass
class Plan:
    run_id: str
    config_hash: str
    rows: list[dict]
    todo: list[dict]
    skipped_done: int
    skipped_failed: int
    listing: dict
    state: object


def plan(cfg: PreprocessConfig, lister=None) -> Plan:
    """List the sources (``lister(cfg)``, default ``sources.list_rows``) and apply the resume filter (driver
    only; no Ray)."""
    from pipelines.preprocess.sources import list_rows  # heavy: psutil, ray

    run_id = new_run_id()
    chash = config_hash(cfg)
    rows, listing = (lister or list_rows)(cfg)
    state = Ledger(cfg.output, chash, cfg.storage).state()
    todo, skipped_done, skipped_failed = [], 0, 0
    for r in rows:
        if cfg.resume.enabled and state.is_done(r):
            skipped_done += 1
        elif cfg.resume.enabled and not cfg.resume.retry_failed and state.is_failed(r):
            skipped_failed += 1
        else:
            todo.append(r)
    return Plan(run_id, chash, rows, todo, skipped_done, skipped_failed, listing, state)


def run(cfg: PreprocessConfig, resolved_config: dict | None = None, progress_every_s: float = 10.0,
        lister=None, unit: str = "assets") -> RunResult:
    """Run the whole job: list, filter, resume, process, write, compact, manifest, report (`unit`: what a row
    is, in the progress log)."""
    import ray  # heavy: ray, psutil

    from pipelines.preprocess.download import ContentClaimsActor, HostLimiterActor  # heavy: psutil, ray

    t_start = time.time()
    absolutize_paths(cfg)
    if cfg.tiny_models and any(s in cfg.stages for s in ("features", "encode")):
        from pipelines.preprocess.tiny_models import apply_tiny_models  # heavy: PIL, safetensors

        apply_tiny_models(cfg)  # before planning: checkpoint paths are part of the config hash
    p = plan(cfg, lister)
    run_id, chash, todo, state = p.run_id, p.config_hash, p.todo, p.state
    log.info("run %s, config hash %s, output %s", run_id, chash, cfg.output)
    cleanup_orphans(cfg, chash, state.shards)
    log.info("listed %d assets: %d to process, %d already done, %d failed before (use --retry-failed)",
             len(p.rows), len(todo), p.skipped_done, p.skipped_failed)
    result = RunResult(run_id, chash, cfg.output, len(p.rows), p.skipped_done, p.skipped_failed, listing=p.listing)

    if todo:
        init_ray(cfg)
        limiter_name = f"mdt-host-limiter-{run_id}"
        limiter = HostLimiterActor.options(name=limiter_name).remote(cfg.download.per_host_concurrency)
        claims_name = f"mdt-content-claims-{run_id}"
        claims = ContentClaimsActor.options(name=claims_name).remote()
        unknown = any(r["sha256"] is None for r in todo)
        done_sha = frozenset(state.done_sha) if (unknown and state.done_sha) else None
        ds = build_dataset(cfg, todo, run_id, chash, limiter_name, done_sha, claims_name)
        last = time.time()
        counts = {"done": 0, "failed": 0, "skipped": 0}
        for s in ds.iter_rows():
            result.summaries.append(dict(s))
            counts[s["status"]] = counts.get(s["status"], 0) + 1
            if time.time() - last > progress_every_s:
                last = time.time()
                n = sum(counts.values())
                rate = n / max(1e-9, last - t_start) * 3600
                log.info("progress %d/%d %s (done %d, failed %d) %.0f %s/h", n, len(todo), unit, counts["done"],
                         counts["failed"], rate, unit)
        ray.kill(limiter)
        ray.kill(claims)
    if cfg.write.compact_ledger and todo:
        Ledger(cfg.output, chash, cfg.storage).compact()
    result.wall_s = time.time() - t_start
    result.manifest = write_manifest(cfg, chash, run_id, resolved_config)
    result.report = report_mod.build_report(cfg, result)
    report_mod.save_report(cfg, result, resolved_config)
    return result


def run_dir(cfg: PreprocessConfig, run_id: str) -> str:
    return join_uri(cfg.output, "runs", run_id)

