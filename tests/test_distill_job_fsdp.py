"""FSDP2 sharding of the student (`train.fsdp`, for L-size models) on 2 CPU processes (gloo): sharded steps with a
global gradient norm, the full-state checkpoint gathered from the shards, and an exact resume."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from _distill_helpers import free_port

TESTS = str(Path(__file__).resolve().parent)


def _worker(rank: int, port: int, tmp: str, q) -> None:
    import torch.distributed as dist

    sys.path.insert(0, TESTS)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        from _distill_helpers import ci_config
        from mdt.training import Trainer
        from mdt.training import checkpoint as ck
        from mdt.training.build import build_student
        from mdt.training.wrappers import wrap_student

        tmpp = Path(tmp)
        cfg = ci_config(tmpp, tmpp, None, None, ["objective.name=flow_matching", "train.fsdp=true",
                                                 "data.batch_split=2", "scaling.num_workers=2"])
        dev = torch.device("cpu")
        student = build_student(cfg.model, dev)
        model = wrap_student(student, cfg, 2)
        tr = Trainer(student, None, cfg, model=model, device=dev, distributed=True)
        sharded = all(hasattr(p, "device_mesh") for p in student.parameters())
        g = torch.Generator().manual_seed(rank)
        batch = {"x0": torch.randn(4, 8, 16, 16, 16, generator=g), "cond": torch.randn(4, 5, 32, generator=g)}
        norms = [tr.step(batch, torch.Generator().manual_seed(i + 10 * rank)).grad_norm for i in range(2)]
        state = ck.collect_state(tr)  # collective: full tensors gathered from the shards
        if rank == 0:
            ck.write_checkpoint(tmpp / "ck", state, {**tr.scalar_state(), "data": {}}, 0, None)
        dist.barrier()
        student2 = build_student(cfg.model, dev)
        tr2 = Trainer(student2, None, cfg, model=wrap_student(student2, cfg, 2), device=dev, distributed=True)
        ck.restore(tr2, tmpp / "ck")
        r1 = tr.step(batch, torch.Generator().manual_seed(99))
        r2 = tr2.step(batch, torch.Generator().manual_seed(99))
        q.put((rank, sharded, norms, len(state["student"]) if rank == 0 else None, r1.loss, r2.loss,
               r1.grad_norm, r2.grad_norm))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_two_processes(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path), q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    out = sorted(q.get(timeout=5) for _ in range(2))
    (_, sh0, n0, keys, a0, b0, ga0, gb0), (_, sh1, n1, _, a1, b1, ga1, gb1) = out
    assert sh0 and sh1                                   # parameters are DTensor shards
    assert n0 == n1                                      # one global gradient norm on both ranks
    assert keys == 29                                    # full state dict of the tiny SS flow (28 params + pos_emb)
    assert a0 == b0 and a1 == b1 and ga0 == gb0          # resumed from the gathered checkpoint: identical step
