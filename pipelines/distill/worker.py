"""The Ray Train worker loop: shards -> batches -> `Trainer.step` -> metrics (MLflow, rank 0), snapshots,
checkpoints (`ray.train.report`), resume (`ray.train.get_checkpoint`), export at the end.

`train_loop_per_worker(config)` is what `pipelines.distill` hands to `TorchTrainer`; it runs a `WorkerLoop`.
`config` holds:

* ``cfg``: the `DistillJobConfig` (pipelines.distill.config);
* ``collate``: ``collate(rows, generator=None, cond_view=...) -> {"x0": dense [B, 8, 16³] | SparseTensor,
  "cond": images [B, 3, S, S], ...}`` (the driver binds `pipelines.preprocess.shards.collate` to the stage, SLat statistics
  and max-voxels filter; mdt does not import pipelines);
* ``run_dir``: `<storage>/<name>`;
* ``mlflow``: ``{"tracking_uri", "run_id"}`` or None;
* ``snapshot_rows``: a few shard rows (fixed conditions for snapshots) or None;
* ``hooks`` (optional): callables ``hook(loop, step, rows)`` run after every step (tests inject faults and
  record what each rank saw through them).

Data parallelism: DDP (gloo on CPU, nccl on GPU; the process group is Ray Train's) or FSDP2 sharding of the
student (`train.fsdp`). Every rank iterates its own `ray.train.get_dataset_shard("train")` (equal streaming
splits, so all ranks take the same number of steps per epoch; with the driver's `preserve_order` the split is
deterministic). Resume restores weights, EMA, optimizer, clipper, step, and every rank's own data position
(epoch + batches already consumed) and RNG streams.
"""
from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mdt.eval.snapshots import load_decoder, snapshot_png, snapshot_samples
from mdt.training import checkpoint as ckpt_io
from mdt.training.build import build_conditioner, build_student, build_teacher, export_model
from mdt.training.machinery import resolve_precision
from mdt.training.step import Trainer, bound_concat_cond, to_device
from mdt.training.teacher_data import teacher_batch
from mdt.training.wrappers import wrap_student
from pipelines.common.tracking import MetricLogger, lr_metrics, register_model

log = logging.getLogger("distill.worker")

# Random streams, all derived from train.seed: each rank draws its own objective noise / times and its own
# condition views; the epoch order is the same function of (seed, epoch) on every restart.
RANK_SEED_STRIDE = 1000          # objective stream of rank r: seed * 1000 + r
DATA_STREAM_OFFSET = 500         # condition-view stream of rank r: seed * 1000 + 500 + r
EPOCH_SEED_STRIDE = 7919         # shuffle seed of an epoch: seed * 7919 + epoch (a prime: epochs never collide)
FIXED_BATCH_SEED_OFFSET = 12345  # draws of the fixed-batch progress loss: seed + 12345


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * EPOCH_SEED_STRIDE + epoch


class BatchStream:
    """Endless epochs over this worker's dataset shard; (epoch, batch index) is its resume position.

    Epoch order: the shard's stream order (deterministic under `preserve_order`), locally shuffled with
    `epoch_seed` when `data.shuffle_buffer` > 0. With `data.cache_in_memory` the rows are kept after the first
    full pass, sorted by sha256, and every later epoch is the permutation `epoch_seed(seed, epoch)` of them; a
    restart inside such an epoch first re-reads one pass to rebuild the same cache."""

    def __init__(self, shard, data_cfg, seed: int, epoch: int = 0, skip: int = 0):
        self.shard, self.d, self.seed = shard, data_cfg, seed
        self.epoch, self.index = epoch, 0
        self.skip = skip if data_cfg.skip_on_resume else 0
        self.cache: list[dict] | None = [] if data_cfg.cache_in_memory else None
        self.cache_complete = False

    def _read_pass(self, epoch: int) -> Iterator[list[dict]]:
        kw = dict(batch_size=self.d.batch_size, batch_format="pyarrow", drop_last=False,
                  prefetch_batches=self.d.prefetch_batches)
        if self.d.shuffle_buffer and self.d.shuffle_buffer > 0:
            kw.update(local_shuffle_buffer_size=self.d.shuffle_buffer, local_shuffle_seed=epoch_seed(self.seed, epoch))
        for tbl in self.shard.iter_batches(**kw):
            yield tbl.to_pylist()

    def _complete_cache(self, rows: list[dict]) -> None:
        self.cache = sorted(rows, key=lambda r: r["sha256"])
        self.cache_complete = True

    def _epoch_batches(self) -> Iterator[list[dict]]:
        if self.cache is not None and not self.cache_complete and self.epoch > 0:
            self._complete_cache([r for rows in self._read_pass(0) for r in rows])  # restart inside epoch >= 1
        if self.cache is not None and self.cache_complete:
            perm = np.random.default_rng(epoch_seed(self.seed, self.epoch)).permutation(len(self.cache))
            for i in range(0, len(perm), self.d.batch_size):
                yield [self.cache[j] for j in perm[i:i + self.d.batch_size]]
            return
        seen: list[dict] = []
        for rows in self._read_pass(self.epoch):
            if self.cache is not None:
                seen.extend(rows)
            yield rows
        if self.cache is not None:
            self._complete_cache(seen)

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            n = 0
            for rows in self._epoch_batches():
                n += 1
                self.index = n
                if self.skip > 0:
                    self.skip -= 1
                    continue
                yield rows
            if n == 0:
                raise RuntimeError("the dataset shard of this worker is empty (fewer assets than workers?)")
            self.epoch += 1
            self.index = 0
            self.skip = 0

    def position(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.index}


class Window:
    """Averages of step metrics between two log points; `loss_bin_<i>` for each of the time bins that a step
    of the window drew a t in (bin i: t in [i/n, (i+1)/n))."""

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
        return ray.train.torch.get_device()
    return torch.device("cpu")


def train_loop_per_worker(config: dict) -> None:
    WorkerLoop(config).run()


class WorkerLoop:
    """One Ray Train worker's training run: builds the networks and the trainer, resumes, then steps, logs,
    snapshots and checkpoints until `train.max_steps`."""

    def __init__(self, config: dict):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg = cfg = config["cfg"]
        self.collate = config["collate"]
        self.run_dir: str = config["run_dir"]
        self.tracking = config.get("mlflow")
        self.hooks = list(config.get("hooks") or ())
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = _device(cfg)
        torch.set_num_threads(cfg.train.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
        rank_seed = cfg.train.seed * RANK_SEED_STRIDE + self.rank
        seed_everything(rank_seed)
        self.gen = torch.Generator().manual_seed(rank_seed)                           # objective draws
        self.data_gen = torch.Generator().manual_seed(rank_seed + DATA_STREAM_OFFSET)  # condition-view choice

        self.teacher = build_teacher(cfg.model, self.device)
        self.shape_teacher = build_teacher(cfg.model, self.device, cfg.model.shape_teacher) \
            if cfg.model.shape_teacher else None
        self.latent_gen = torch.Generator().manual_seed(cfg.teacher_data.seed * 1000 + self.rank)
        self.student = build_student(cfg.model, self.device, self.teacher)
        # the checkpoint json's name (TRELLIS.2 classes share TRELLIS's), taken before FSDP renames the class
        self.like = (getattr(type(self.student), "CHECKPOINT_NAME", "") or type(self.student).__name__,
                     dict(self.student.trellis_args))
        model = wrap_student(self.student, cfg, self.world)
        self.conditioner = build_conditioner(cfg.condition, self.device)
        self.trainer = Trainer(self.student, self.teacher, cfg, model=model, device=self.device,
                               autocast_dtype=resolve_precision(cfg.train.precision, self.device),
                               distributed=self.world > 1)
        self.position = {"epoch": 0, "batch_in_epoch": 0}
        self.resumed_from: int | None = None
        self.logger = None
        rows = config.get("snapshot_rows")
        self.snap = SnapshotState(rows, cfg, self.collate, self.conditioner, self.device) \
            if rows and (self.rank == 0 or cfg.train.fsdp) else None
        self.fixed = None          # the first batch of this (re)start: a low-noise progress measure (rank 0)

    # ------------------------------------------------------------------------------------------ resume
    def resume(self) -> None:
        """Weights, optimizer, step, this rank's data position and RNG streams from the latest checkpoint."""
        ck = ray.train.get_checkpoint()
        if ck is None:
            return
        with ck.as_directory() as d:
            state = ckpt_io.restore(self.trainer, d)
            rng = ckpt_io.read_rng(d, self.rank)
        if rng is not None:
            ckpt_io.set_rng_state(rng, self.gen)
            if "data_generator" in rng:
                self.data_gen.set_state(ckpt_io._unb64(rng["data_generator"]))
        self.position = (rng or {}).get("data") or state.get("data", self.position)
        self.resumed_from = self.trainer.step_count
        if self.tracking and state.get("mlflow_run_id") and state["mlflow_run_id"] != self.tracking["run_id"]:
            log.warning("checkpoint was logged to MLflow run %s, this run logs to %s", state["mlflow_run_id"],
                        self.tracking["run_id"])
        log.info("rank %d resumed from step %d (epoch %d, batch %d)", self.rank, self.trainer.step_count,
                 self.position["epoch"], self.position["batch_in_epoch"])

    def open_logger(self) -> None:
        if self.rank != 0 or not self.tracking:
            return
        self.logger = MetricLogger(self.tracking["tracking_uri"], self.tracking["run_id"])
        self.logger.alerted = self.trainer.skipped_total
        if self.resumed_from is not None:
            self.logger.log(self.resumed_from, {"resumed_from_step": self.resumed_from})
            self.logger.set_tag("last_resumed_from_step", str(self.resumed_from))

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> None:
        cfg, tr = self.cfg, self.trainer
        self.resume()
        self.open_logger()
        self.stream = BatchStream(ray.train.get_dataset_shard("train"), cfg.data, cfg.train.seed,
                                  self.position["epoch"], self.position["batch_in_epoch"])
        it = iter(self.stream)
        self.window = Window(tr.ocfg.num_bins)
        log_every = cfg.mlflow.log_every or cfg.train.log_every
        max_steps = cfg.train.max_steps
        if tr.step_count == 0 and self.snap is not None and cfg.snapshot.every > 0:
            self.snapshot(0)
        self.nodes = self._gather_node_ids()
        # throughput reported with each checkpoint: from the end of this (re)start's first step (dataset pipeline
        # start-up and the first, slow step excluded) to now
        self.t_start, self.steps_at_start = None, tr.step_count
        while tr.step_count < max_steps:
            t0 = time.perf_counter()
            rows = next(it)
            b = self.collate(rows, generator=self.data_gen)
            cond = self.conditioner(b["cond"].to(self.device))
            batch = to_device({"x0": b["x0"], "cond": cond}, self.device)
            if cfg.teacher_data.enabled:  # TRELLIS.2 shape / texture: latents sampled by the teacher(s)
                batch = teacher_batch(batch, self.teacher, cfg.teacher_data, self.latent_gen, self.shape_teacher)
            data_time = time.perf_counter() - t0
            if self.fixed is None:
                self.fixed = batch
            res = tr.step(batch, self.gen)
            self.window.add(res, data_time)
            step = tr.step_count
            if self.t_start is None:
                self.t_start, self.steps_at_start = time.perf_counter(), step
            for hook in self.hooks:
                hook(self, step, rows)
            if step % log_every == 0 or step == max_steps:
                self.log(step, res)
            if self.snap is not None and cfg.snapshot.every > 0 and step % cfg.snapshot.every == 0 \
                    and step < max_steps:
                self.snapshot(step)
            final = step >= max_steps
            if final or (cfg.train.ckpt_every > 0 and step % cfg.train.ckpt_every == 0):
                if final and self.snap is not None:
                    self.snapshot(step)
                self.checkpoint(res, final)

    # ------------------------------------------------------------------------------------------ log
    def log(self, step: int, res) -> None:
        """Window averages to MLflow (rank 0); the DDP weight check is a collective, so every rank takes part."""
        cfg, tr = self.cfg, self.trainer
        ddp = self.world > 1 and not cfg.train.fsdp
        mismatch = self._ddp_param_mismatch() if ddp else 0.0
        if self.logger is None:
            self.window.reset()
            return
        m = self.window.metrics(self.world)
        if cfg.train.fixed_batch_loss and not cfg.train.fsdp:
            m["loss_fixed_batch"] = fixed_batch_loss(tr, self.fixed, cfg.train.seed)
        if ddp:
            m["ddp_param_mismatch"] = mismatch
        m.update({**lr_metrics(res.lr), "skipped_steps": tr.skipped_total, "epoch": self.stream.epoch})
        self.logger.log(step, m)
        if tr.skipped_total > self.logger.alerted:
            self.logger.alert_nonfinite(tr.skipped_total, step)
        log.info("step %d/%d loss %.5f grad_norm %.3g %.1f samples/s", step, cfg.train.max_steps,
                 m.get("loss", math.nan), m["grad_norm"], m["samples_per_s"])
        self.window.reset()

    def snapshot(self, step: int) -> None:
        self.snap.run(self.trainer, self.teacher, self.student, step, self.logger)

    # ------------------------------------------------------------------------------------------ checkpoint
    def checkpoint(self, res, final: bool) -> None:
        """Every rank writes its data position and RNG; rank 0 the weights, optimizer and state (FSDP: all ranks
        gather the full state); Ray Train persists the directory."""
        cfg, tr = self.cfg, self.trainer
        done = tr.step_count - self.steps_at_start
        rate = done * cfg.data.batch_size * self.world / max(1e-9, time.perf_counter() - self.t_start) \
            if done > 0 else float("nan")
        collected = ckpt_io.collect_state(tr) if (self.rank == 0 or cfg.train.fsdp) else None
        step = tr.step_count
        position = self.stream.position()
        state = {**tr.scalar_state(), "data": position, "mlflow_run_id": (self.tracking or {}).get("run_id"),
                 "model": {"name": self.like[0], "args": self.like[1]}, "objective": cfg.objective.name,
                 "stage": cfg.stage, "world_size": self.world, "time": time.time(), "nodes": self.nodes,
                 "samples_per_s_since_start": rate}
        rng = ckpt_io.rng_state(self.gen)
        rng["data_generator"] = ckpt_io._b64(self.data_gen.get_state())
        rng["data"] = position
        metrics = {"step": step, "loss": res.loss, "skipped_steps": tr.skipped_total, "samples_per_s": rate}
        with tempfile.TemporaryDirectory(prefix="mdt-ckpt-") as tmp:
            ckpt_io.write_checkpoint(tmp, collected if self.rank == 0 else None, state, self.rank, rng)
            if final and self.rank == 0 and cfg.train.export:
                self.export(tmp, collected)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{step:07d}")
        if cfg.train.wait_for_commit:
            # Block until the controller has registered this checkpoint: a worker lost right after `report`
            # would otherwise take its not-yet-polled report with it, and a restart would fall back one interval.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                                   timeout_s=cfg.train.commit_timeout_s)

    def export(self, tmp: str, collected: dict) -> None:
        """TRELLIS-format student (and EMA) into `<checkpoint>/export/`, logged to MLflow; the weights named by
        `mlflow.register_weights` (EMA by default: what evaluation samples) registered as a model version."""
        cfg = self.cfg
        stem = cfg.model.export_stem
        out = Path(tmp) / "export"
        export_model(self.like, collected["student"], out / "student" / stem)
        if collected.get("ema") is not None:
            export_model(self.like, collected["ema"], out / "ema" / stem)
        if self.logger is None:
            return
        self.logger.artifact(out, "export")
        which = cfg.mlflow.register_weights if collected.get("ema") is not None else "student"
        role = cfg.role
        name = cfg.mlflow.register_model or f"{cfg.name}-{role}"
        try:
            version = register_model(self.tracking["tracking_uri"], self.tracking["run_id"], name, f"export/{which}",
                                     description=f"{cfg.objective.name} {role} ({cfg.stage} stage, {which} "
                                                 "weights), TRELLIS format")
            self.logger.set_tag("registered_model", f"{name}/{version}")
            self.logger.set_tag("registered_weights", which)
            log.info("registered %s version %s (%s weights)", name, version, which)
        except Exception as e:  # a registry-less store must not lose the run
            log.warning("model registration failed: %s", e)
            self.logger.set_tag("registered_model_error", str(e)[:500])

    # ------------------------------------------------------------------------------------------ collectives
    def _gather_node_ids(self) -> list[str]:
        me = ray.get_runtime_context().get_node_id()
        if self.world <= 1 or not dist.is_initialized():
            return [me]
        out: list = [None] * self.world
        dist.all_gather_object(out, me)
        return out

    def _ddp_param_mismatch(self) -> float:
        """Largest difference between ranks of a parameter checksum (TRELLIS's i_ddpcheck); 0 when in sync."""
        with torch.no_grad():
            s = torch.stack([p.detach().double().sum() for p in self.student.parameters()]).cpu()
        lo, hi = s.clone(), s.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return float((hi - lo).abs().max())


def fixed_batch_loss(trainer, batch, seed: int) -> float:
    """The objective's loss on a fixed batch with fixed draws (no grad): comparable from step to step."""
    if batch is None:
        return float("nan")
    g = torch.Generator().manual_seed(seed + FIXED_BATCH_SEED_OFFSET)
    kw = {"target_model": None} if trainer.takes_target else {}
    was = trainer.student.training
    trainer.student.eval()
    try:
        with torch.no_grad(), bound_concat_cond((trainer.student, trainer.teacher), batch.get("concat_cond")):
            terms = trainer.fn(trainer.student_calls, trainer.teacher_calls, batch, trainer.ocfg, generator=g, **kw)
    finally:
        trainer.student.train(was)
    return float(terms["loss"])


class SnapshotState:
    """Fixed snapshot inputs (conditions, noise, reference latents) and a cached teacher run. In a teacher
    (flow-matching) run the trained network's columns are labelled "model", not "student"."""

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
            self.decoder = load_decoder(cfg.snapshot.decoder).to(device)

    def run(self, trainer, teacher, student, step: int, logger) -> None:
        s = self.cfg.snapshot
        t0 = time.perf_counter()
        model = trainer.model if self.cfg.train.fsdp else student
        cols = snapshot_samples(teacher, model, self.noise, self.cond, s.teacher_steps, s.student_steps,
                                s.cfg_strength, teacher_samples=self.teacher_samples)
        if teacher is not None:
            self.teacher_samples = cols[f"teacher {s.teacher_steps}"]
        if logger is None:
            return
        if self.cfg.objective.name == "flow_matching":
            cols = {k.replace("student", "model", 1): v for k, v in cols.items()}
        cols = {k: (v.cpu() if hasattr(v, "cpu") else v) for k, v in cols.items()}
        png = snapshot_png(cols, self.decoder, s.image_size, title=f"{self.cfg.name} step {step}",
                           reference=self.ref.cpu() if hasattr(self.ref, "cpu") else self.ref)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / f"step_{step:07d}.png"
            p.write_bytes(png)
            logger.artifact(p, "snapshots")
        logger.log(step, {"snapshot_time_s": time.perf_counter() - t0})
