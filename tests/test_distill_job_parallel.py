"""JVP objectives with 2 data-parallel processes (gloo, CPU), and the precision of the networks' calls.

`scm` and MDT-dist with `mode: continuous` take a forward-mode JVP of the student (no grad). Under DDP the
wrapper's forward copies buffers in place (`broadcast_buffers`; the SS flow has a `pos_emb` buffer), which
`torch.func.jvp` refuses; under FSDP2 the sharded module's hooks gather the parameters. Both objectives train on
the SS flow and on the sparse SLat flow, under DDP and under FSDP2, and so does flow matching (no JVP) on SLat:
FSDP2 finds the tensors of a sparse block's inputs and outputs only inside containers it walks (a SparseTensor is a
dataclass for that), otherwise the block's parameters stay resharded in backward. After one step the ranks'
weights are equal, and FSDP2's update equals DDP's from the same start on the same batches.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from _distill_helpers import TINY_SLAT_ARGS, TINY_SS_ARGS, free_port

TESTS = str(Path(__file__).resolve().parent)


def _batch(stage: str, rank: int) -> dict:
    g = torch.Generator().manual_seed(rank)
    if stage == "ss":
        return {"x0": torch.randn(2, 8, 16, 16, 16, generator=g), "cond": torch.randn(2, 5, 32, generator=g)}
    from mdt.sparse import SparseTensor

    coords = []
    for b in range(2):
        idx = torch.randperm(64 ** 3, generator=g)[:40].sort().values
        coords.append(torch.stack([torch.full_like(idx, b), idx // 64 ** 2, (idx // 64) % 64, idx % 64], 1))
    c = torch.cat(coords).int()
    return {"x0": SparseTensor(torch.randn(len(c), 8, generator=g), c, batch_size=2),
            "cond": torch.randn(2, 5, 32, generator=g)}


def _worker(rank: int, port: int, q) -> None:
    import torch.distributed as dist

    sys.path.insert(0, TESTS)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    out = []
    try:
        from mdt.config import load_config
        from mdt.models import build_model
        from mdt.training import Trainer
        from pipelines.distill.config import DistillJobConfig
        from mdt.training.wrappers import wrap_student

        for stage, name, args in (("ss", "SparseStructureFlowModel", TINY_SS_ARGS),
                                  ("slat", "SLatFlowModel", TINY_SLAT_ARGS)):
            for objective in ("scm", "mdt") + (("flow_matching",) if stage == "slat" else ()):
                for fsdp in (False, True):
                    cfg = load_config(DistillJobConfig, "ci", [
                        ("data.uri", "/unused"), ("stage", stage), ("objective.name", objective),
                        ("objective.mdt.mode", "continuous"), ("objective.mdt.jvp", "func"),
                        ("objective.scm.jvp", "func"), ("train.fsdp", fsdp), ("data.batch_split", 1),
                        ("model.teacher", "/unused"), ("objective.flow_matching.p_uncond", 0.0)],
                        prefix="distill_")
                    torch.manual_seed(0)
                    teacher = build_model(name, dict(args)).eval().requires_grad_(False)
                    torch.manual_seed(0)
                    student = build_model(name, dict(args)).float()
                    with torch.no_grad():  # leave the zero-initialised output layer: a non-trivial target
                        for p in list(student.parameters()) + list(teacher.parameters()):
                            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
                    before = [p.detach().clone() for p in student.parameters()]
                    model = wrap_student(student, cfg, 2)
                    tr = Trainer(student, teacher, cfg, model=model, distributed=True)
                    res = tr.step(_batch(stage, rank), torch.Generator().manual_seed(rank))
                    with torch.no_grad():
                        after = [(p.full_tensor() if hasattr(p, "full_tensor") else p).double()
                                 for p in student.parameters()]
                    moved = sum((a - b.double()).abs().sum() for a, b in zip(after, before)).item()
                    out.append((stage, objective, fsdp, res.loss, res.skipped, sum(a.sum() for a in after).item(),
                                moved))
        q.put((rank, out, None))
    except Exception as e:  # reported to the test, which fails with it
        import traceback

        q.put((rank, out, f"after {[o[:3] for o in out]}: " + traceback.format_exc()[-1500:]))
        raise e
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_jvp_objectives_under_ddp_and_fsdp_on_ss_and_slat():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=420) for _ in range(2))
    for p in procs:
        p.join(timeout=60)
    for rank, _, err in results:
        assert err is None, f"rank {rank}:\n{err}"
    (_, r0, _), (_, r1, _) = results
    assert len(r0) == len(r1) == 10
    assert {a[:3] for a in r0} >= {("slat", o, True) for o in ("scm", "mdt", "flow_matching")}
    for a, b in zip(r0, r1):
        stage, objective, fsdp, loss, skipped, checksum, _ = a
        assert math.isfinite(loss) and loss > 0 and not skipped, a
        assert b[:3] == a[:3] and checksum == b[5], (a, b)       # one update, the same on both ranks
    by_key = {a[:3]: a for a in r0}
    for (stage, objective, fsdp), a in by_key.items():
        if fsdp:  # sharded: the same update as DDP; a block left out of backward would move ~lr x its size less
            ddp = by_key[(stage, objective, False)]
            assert a[6] > 0 and a[6] == pytest.approx(ddp[6], rel=1e-3), (a, ddp)
            assert a[5] == pytest.approx(ddp[5], rel=0, abs=1e-4), (a, ddp)


def test_teacher_outside_autocast_and_student_targets_in_fp32():
    """With a bf16 autocast step (CPU), the teacher runs with autocast off on float32 inputs; the student's
    no-grad calls (targets, finite differences) too; only its grad-enabled call is autocast."""
    from mdt.config import load_config
    from mdt.models import build_model
    from mdt.training import Trainer
    from pipelines.distill.config import DistillJobConfig

    cfg = load_config(DistillJobConfig, "ci", [("data.uri", "/unused"), ("model.teacher", "/unused"),
                                            ("objective.name", "mdt"), ("data.batch_split", 1)], prefix="distill_")
    torch.manual_seed(0)
    teacher = build_model("SparseStructureFlowModel", dict(TINY_SS_ARGS)).eval().requires_grad_(False)
    student = build_model("SparseStructureFlowModel", dict(TINY_SS_ARGS)).float()
    seen = {"teacher": [], "student_grad": [], "student_nograd": []}

    def spy(which):
        def hook(_m, args):
            key = which if which == "teacher" else ("student_grad" if torch.is_grad_enabled() else "student_nograd")
            seen[key].append((torch.is_autocast_enabled("cpu"), args[0].dtype))
        return hook

    teacher.register_forward_pre_hook(spy("teacher"))
    student.register_forward_pre_hook(spy("student"))
    tr = Trainer(student, teacher, cfg, autocast_dtype=torch.bfloat16)
    res = tr.step(_batch("ss", 0), torch.Generator().manual_seed(0))
    assert math.isfinite(res.loss)
    assert seen["teacher"] and all(s == (False, torch.float32) for s in seen["teacher"]), seen["teacher"]
    assert seen["student_nograd"] and all(s == (False, torch.float32) for s in seen["student_nograd"])
    assert seen["student_grad"] and all(enabled for enabled, _ in seen["student_grad"])
