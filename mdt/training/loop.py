"""The Ray Train worker loop: shards -> batches -> `Trainer.step` -> metrics (MLflow, rank 0), snapshots,
checkpoints (`ray.train.report`), resume (`ray.train.get_checkpoint`), export at the end.

`train_loop_per_worker(config)` is what `jobs/distill.py` hands to `TorchTrainer`. `config` holds:

* ``cfg``: the `DistillConfig`;
* ``collate``: ``collate(rows, generator=None, cond_view=...) -> {"x0": dense [B, 8, 16³] | SparseTensor,
  "cond": images [B, 3, S, S], ...}`` (the job passes `pipelines.shards.collate` with the stage, SLat statistics
  and max-voxels filter bound; mdt does not import pipelines);
* ``run_dir``: `<storage>/<name>` (MLflow run file, test hooks);
* ``mlflow``: ``{"tracking_uri", "run_id"}`` or None;
* ``snapshot_rows``: a few shard rows (fixed conditions for snapshots) or None.

Data parallelism: DDP (gloo on CPU, nccl on GPU; the process group is Ray Train's) or FSDP2 sharding of the
student (`train.fsdp`). Every rank iterates its own `ray.train.get_dataset_shard("train")` (equal streaming
splits, so all ranks take the same number of steps per epoch). Resume restores weights, EMA, optimizer, clipper,
step, data position (epoch + batches already consumed, skipped on restart) and every rank's RNG.
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .build import build_conditioner, build_student, build_teacher, export_model
from .machinery import resolve_precision
from .step import Trainer, to_device

log = logging.getLogger("mdt.training")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def wrap_student(student: torch.nn.Module, cfg, device: torch.device, world: int):
    """DDP (default) or FSDP2 (`train.fsdp`) around the student; the student itself when world == 1."""
    import torch.distributed as dist

    if world <= 1 or not dist.is_initialized():
        return student
    if cfg.train.fsdp:
        from torch.distributed.fsdp import fully_shard

        for name in ("input_blocks", "blocks", "out_blocks"):
            for blk in getattr(student, name, None) or []:
                fully_shard(blk)
        fully_shard(student)
        return student
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(student, device_ids=None, find_unused_parameters=cfg.train.find_unused_parameters)


class BatchStream:
    """Endless epochs over this worker's dataset shard; tracks (epoch, batch index) for resume."""

    def __init__(self, shard, cfg, rank: int, epoch: int = 0, skip: int = 0):
        self.shard, self.cfg, self.rank = shard, cfg, rank
        self.epoch, self.index = epoch, 0
        self.skip = skip if cfg.data.skip_on_resume else 0
        self.cache: list[dict] | None = [] if cfg.data.cache_in_memory else None
        self.cached_epoch_done = False

    def _epoch_iter(self) -> Iterator[Any]:
        d = self.cfg.data
        if self.cache is not None and self.cached_epoch_done:
            g = np.random.default_rng(self.cfg.train.seed * 7919 + self.epoch)
            perm = g.permutation(len(self.cache))
            for i in range(0, len(perm), d.batch_size):
                yield [self.cache[j] for j in perm[i:i + d.batch_size]]
            return
        kw = dict(batch_size=d.batch_size, batch_format="pyarrow", drop_last=False,
                  prefetch_batches=d.prefetch_batches)
        if d.shuffle_buffer and d.shuffle_buffer > 0:
            kw.update(local_shuffle_buffer_size=d.shuffle_buffer,
                      local_shuffle_seed=self.cfg.train.seed * 7919 + self.epoch)
        for tbl in self.shard.iter_batches(**kw):
            rows = tbl.to_pylist()
            if self.cache is not None:
                self.cache.extend(rows)
            yield rows
        if self.cache is not None:
            self.cached_epoch_done = True

    def __iter__(self):
        while True:
            n = 0
            for rows in self._epoch_iter():
                n += 1
                if self.skip > 0:
                    self.skip -= 1
                    self.index = n
                    continue
                self.index = n
                yield rows
            if n == 0:
                raise RuntimeError("the dataset shard of this worker is empty (fewer assets than workers?)")
            self.epoch += 1
            self.index = 0
            self.skip = 0

    def position(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.index}


class Window:
    """Averages of step metrics between two log points."""

    def __init__(self, nbins: int = 10):
        self.nbins = nbins
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.terms: dict[str, float] = {}
        self.bin_sum = np.zeros(self.nbins)
        self.bin_cnt = np.zeros(self.nbins)
        self.step_time = self.data_time = self.grad_norm = 0.0
        self.samples = 0
        self.wall0 = time.perf_counter()
        self.gn_count = 0

    def add(self, res, data_time: float) -> None:
        self.n += 1
        for k, v in res.terms.items():
            if math.isfinite(v):
                self.terms[k] = self.terms.get(k, 0.0) + v
        b = res.loss_bins.double().numpy()
        ok = np.isfinite(b)
        self.bin_sum[ok] += b[ok]
        self.bin_cnt[ok] += 1
        self.step_time += res.step_time
        self.data_time += data_time
        if math.isfinite(res.grad_norm):
            self.grad_norm += res.grad_norm
            self.gn_count += 1
        self.samples += res.samples

    def metrics(self, world: int) -> dict[str, float]:
        n = max(1, self.n)
        wall = max(1e-9, time.perf_counter() - self.wall0)
        out = {k: v / n for k, v in self.terms.items()}
        for i in range(self.nbins):
            if self.bin_cnt[i] > 0:
                out[f"loss_bin_{i}"] = self.bin_sum[i] / self.bin_cnt[i]
        out["grad_norm"] = self.grad_norm / max(1, self.gn_count) if self.gn_count else float("nan")
        out["step_time_s"] = self.step_time / n
        out["data_time_s"] = self.data_time / n
        out["samples_per_s"] = self.samples * world / wall
        return out


def _device(cfg) -> torch.device:
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = config["cfg"]
    collate = config["collate"]
    run_dir: str = config["run_dir"]
    tracking = config.get("mlflow")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(cfg)
    torch.set_num_threads(cfg.train.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    seed_everything(cfg.train.seed * 1000 + rank)
    gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)        # objective draws
    data_gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + 500 + rank)  # condition-view choice

    teacher = build_teacher(cfg.model, device)
    student = build_student(cfg.model, device, teacher)
    like = (type(student).__name__, dict(student.trellis_args))  # before FSDP renames the class
    model = wrap_student(student, cfg, device, world)
    conditioner = build_conditioner(cfg.condition, device)
    trainer = Trainer(student, teacher, cfg, model=model, device=device,
                      autocast_dtype=resolve_precision(cfg.train.precision, device), distributed=world > 1)

    # ---------------------------------------------------------------------------------------- resume
    position = {"epoch": 0, "batch_in_epoch": 0}
    resumed_from = None
    ck = ray.train.get_checkpoint()
    if ck is not None:
        with ck.as_directory() as d:
            state = ckpt_io.restore(trainer, d)
            rng = ckpt_io.read_rng(d, rank)
            if rng is not None:
                ckpt_io.set_rng_state(rng, gen)
                if "data_generator" in rng:
                    data_gen.set_state(ckpt_io._unb64(rng["data_generator"]))
        position = state.get("data", position)
        resumed_from = trainer.step_count
        if tracking and state.get("mlflow_run_id") and state["mlflow_run_id"] != tracking["run_id"]:
            log.warning("checkpoint was logged to MLflow run %s, this run logs to %s", state["mlflow_run_id"],
                        tracking["run_id"])
        log.info("rank %d resumed from step %d (epoch %d, batch %d)", rank, trainer.step_count,
                 position["epoch"], position["batch_in_epoch"])

    logger = None
    if rank == 0 and tracking:
        from .tracking import MetricLogger

        logger = MetricLogger(tracking["tracking_uri"], tracking["run_id"])
        logger.alerted = trainer.skipped_total
        if resumed_from is not None:
            logger.log(resumed_from, {"resumed_from_step": resumed_from})
            logger.set_tag("last_resumed_from_step", str(resumed_from))

    snap = SnapshotState(config.get("snapshot_rows"), cfg, collate, conditioner, device) \
        if config.get("snapshot_rows") and (rank == 0 or cfg.train.fsdp) else None

    shard = ray.train.get_dataset_shard("train")
    stream = BatchStream(shard, cfg, rank, position["epoch"], position["batch_in_epoch"])
    it = iter(stream)
    window = Window(trainer.ocfg.num_bins)
    log_every = cfg.mlflow.log_every or cfg.train.log_every
    max_steps = cfg.train.max_steps
    fail_marker = Path(run_dir) / ".fail_injected" if "://" not in run_dir else None

    if trainer.step_count == 0 and snap is not None and cfg.snapshot.every > 0:
        snap.run(trainer, teacher, student, 0, logger)
    fixed = None               # the first batch of this (re)start: a low-noise progress measure (rank 0)
    nodes = _gather_node_ids(world)
    # throughput reported with each checkpoint: from the end of this (re)start's first step (dataset pipeline
    # start-up and the first, slow step excluded) to now
    t_start, steps_at_start = None, trainer.step_count

    while trainer.step_count < max_steps:
        t0 = time.perf_counter()
        rows = next(it)
        b = collate(rows, generator=data_gen)
        cond = conditioner(b["cond"].to(device))
        batch = to_device({"x0": b["x0"], "cond": cond}, device)
        data_time = time.perf_counter() - t0
        if fixed is None:
            fixed = batch
        res = trainer.step(batch, gen)
        window.add(res, data_time)
        step = trainer.step_count
        if t_start is None:
            t_start, steps_at_start = time.perf_counter(), step

        if (cfg.train.fail_at_step is not None and step == cfg.train.fail_at_step and rank == world - 1
                and fail_marker is not None and not fail_marker.exists()):
            fail_marker.write_text(f"killed rank {rank} (pid {os.getpid()}) at step {step}\n")
            log.warning("test hook: killing this worker (rank %d, pid %d) at step %d", rank, os.getpid(), step)
            os.kill(os.getpid(), signal.SIGKILL)

        if step % log_every == 0 or step == max_steps:
            mismatch = _ddp_param_mismatch(trainer, world) if (world > 1 and not cfg.train.fsdp) else 0.0
        if logger is not None and (step % log_every == 0 or step == max_steps):
            m = window.metrics(world)
            if not cfg.train.fsdp:
                m["loss_fixed_batch"] = fixed_batch_loss(trainer, fixed, cfg.train.seed)
            if world > 1 and not cfg.train.fsdp:
                m["ddp_param_mismatch"] = mismatch
            m.update({"lr": res.lr, "skipped_steps": trainer.skipped_total, "epoch": stream.epoch})
            logger.log(step, m)
            if trainer.skipped_total > logger.alerted:
                logger.alert_nonfinite(trainer.skipped_total, step)
            log.info("step %d/%d loss %.5f grad_norm %.3g %.1f samples/s", step, max_steps, m.get("loss", math.nan),
                     m["grad_norm"], m["samples_per_s"])
            window.reset()
        elif logger is None and rank == 0 and step % log_every == 0:
            window.reset()

        if snap is not None and cfg.snapshot.every > 0 and step % cfg.snapshot.every == 0 and step < max_steps:
            snap.run(trainer, teacher, student, step, logger)

        final = step >= max_steps
        if final or (cfg.train.ckpt_every > 0 and step % cfg.train.ckpt_every == 0):
            if final and snap is not None:
                snap.run(trainer, teacher, student, step, logger)
            done = trainer.step_count - steps_at_start
            rate = done * cfg.data.batch_size * world / max(1e-9, time.perf_counter() - t_start) if done > 0 \
                else float("nan")
            _save_and_report(trainer, cfg, rank, world, stream.position(), tracking, gen, data_gen, res, final,
                             like, logger, {"nodes": nodes, "samples_per_s_since_start": rate})


def _gather_node_ids(world: int) -> list[str]:
    import ray
    import torch.distributed as dist

    me = ray.get_runtime_context().get_node_id()
    if world <= 1 or not dist.is_initialized():
        return [me]
    out: list = [None] * world
    dist.all_gather_object(out, me)
    return out


def _ddp_param_mismatch(trainer, world: int) -> float:
    """Largest difference between ranks of a parameter checksum (TRELLIS's i_ddpcheck); 0 when in sync."""
    import torch.distributed as dist

    with torch.no_grad():
        s = torch.stack([p.detach().double().sum() for p in trainer.student.parameters()]).cpu()
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return float((hi - lo).abs().max())


def fixed_batch_loss(trainer, batch, seed: int) -> float:
    """The objective's loss on a fixed batch with fixed draws (no grad): comparable from step to step."""
    if batch is None:
        return float("nan")
    g = torch.Generator().manual_seed(seed + 12345)
    kw = {"target_model": None} if trainer.takes_target else {}
    was = trainer.student.training
    trainer.student.eval()
    try:
        with torch.no_grad():
            terms = trainer.fn(trainer.student, trainer.teacher, batch, trainer.ocfg, generator=g, **kw)
    finally:
        trainer.student.train(was)
    return float(terms["loss"])


def _save_and_report(trainer, cfg, rank, world, position, tracking, gen, data_gen, res, final, like, logger,
                     extra: dict | None = None):
    import ray.train

    need_collect = rank == 0 or cfg.train.fsdp
    collected = ckpt_io.collect_state(trainer) if need_collect else None
    step = trainer.step_count
    state = {**trainer.scalar_state(), "data": position, "mlflow_run_id": (tracking or {}).get("run_id"),
             "model": {"name": like[0], "args": like[1]},
             "objective": cfg.objective.name, "stage": cfg.stage, "world_size": world, "time": time.time(),
             **(extra or {})}
    rng = ckpt_io.rng_state(gen)
    rng["data_generator"] = ckpt_io._b64(data_gen.get_state())
    metrics = {"step": step, "loss": res.loss, "skipped_steps": trainer.skipped_total,
               "samples_per_s": (extra or {}).get("samples_per_s_since_start", float("nan"))}
    with tempfile.TemporaryDirectory(prefix="mdt-ckpt-") as tmp:
        ckpt_io.write_checkpoint(tmp, collected if rank == 0 else None, state, rank, rng)
        if final and rank == 0 and cfg.train.export:
            _export(tmp, collected, cfg, like, tracking, logger)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:07d}")
    if cfg.train.wait_for_commit:
        # Block until the controller has registered this checkpoint: a worker lost right after `report`
        # would otherwise take its not-yet-polled report with it, and a restart would fall back one interval.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                               timeout_s=cfg.train.commit_timeout_s)


def _export(tmp: str, collected: dict, cfg, like, tracking, logger) -> None:
    """TRELLIS-format student (and EMA) into `<checkpoint>/export/`, logged to MLflow and registered."""
    stem = cfg.model.export_stem
    out = Path(tmp) / "export"
    export_model(like, collected["student"], out / "student" / stem)
    if collected.get("ema") is not None:
        export_model(like, collected["ema"], out / "ema" / stem)
    if logger is not None:
        from .tracking import register_model

        logger.artifact(out, "export")
        name = cfg.mlflow.register_model or f"{cfg.name}-student"
        try:
            version = register_model(tracking["tracking_uri"], tracking["run_id"], name, "export/student",
                                     description=f"{cfg.objective.name} student ({cfg.stage} stage), TRELLIS format")
            logger.set_tag("registered_model", f"{name}/{version}")
            log.info("registered %s version %s", name, version)
        except Exception as e:  # a registry-less store must not lose the run
            log.warning("model registration failed: %s", e)
            logger.set_tag("registered_model_error", str(e)[:500])


class SnapshotState:
    """Fixed snapshot inputs (conditions, noise, reference latents) and a cached teacher run."""

    def __init__(self, rows, cfg, collate, conditioner, device):
        self.cfg = cfg
        b = collate(rows[: cfg.snapshot.num_conditions], generator=None, cond_view=0)
        self.ref = b["x0"]
        self.cond = conditioner(b["cond"].to(device))
        g = torch.Generator().manual_seed(cfg.snapshot.seed)
        x = self.ref
        if hasattr(x, "feats"):
            self.noise = x.replace(torch.randn(x.feats.shape, generator=g)).to(device)
        else:
            self.noise = torch.randn(x.shape, generator=g).to(device)
        self.device = device
        self.teacher_samples = None
        self.decoder = None
        if cfg.snapshot.decoder:
            from mdt.eval.snapshots import load_decoder

            self.decoder = load_decoder(cfg.snapshot.decoder).to(device)

    def run(self, trainer, teacher, student, step: int, logger) -> None:
        from mdt.eval.snapshots import snapshot_png, snapshot_samples

        s = self.cfg.snapshot
        t0 = time.perf_counter()
        model = trainer.model if self.cfg.train.fsdp else student
        cols = snapshot_samples(teacher, model, self.noise, self.cond, s.teacher_steps, s.student_steps,
                                s.cfg_strength, teacher_samples=self.teacher_samples)
        if teacher is not None:
            self.teacher_samples = cols[f"teacher {s.teacher_steps}"]
        if logger is None:
            return
        cols = {k: (v.cpu() if hasattr(v, "cpu") else v) for k, v in cols.items()}
        png = snapshot_png(cols, self.decoder, s.image_size, title=f"{self.cfg.name} step {step}",
                           reference=self.ref.cpu() if hasattr(self.ref, "cpu") else self.ref)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / f"step_{step:07d}.png"
            p.write_bytes(png)
            logger.artifact(p, "snapshots")
        logger.log(step, {"snapshot_time_s": time.perf_counter() - t0})
