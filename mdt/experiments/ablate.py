"""Hyper-parameter ablations of the reproduction benchmark on an existing run's teacher (run it with --keep-work).

    python -m mdt.experiments.ablate --out DIR --preset small --problem gmm --seeds 0 1 2 \\
        --run mdt_delta0.05:mdt_release:delta=0.05 --run vm_nodnorm:vm:d_norm=false ...

Each `--run LABEL:METHOD[:KEY=VALUE,...]` distils METHOD from the teacher saved in DIR/work with the preset's
budget and the DistillHP overrides given (same seeds, data streams, evaluation noise and references as the main
run, so a run with a method's chosen configuration -- results.json "protocol" -- as its overrides reproduces the
main run's numbers for that method). Results are printed (mean ± std over the seeds
of every metric at 1, 2 and 4 steps) and merged into DIR/ablations.json as
{problem: {label: {"method", "overrides", "metrics": {steps: {metric: {mean, std}}}, "per_seed": [...]}}}.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

from . import jobs
from .methods import STUDENT_METHODS
from .presets import get_preset
from .reproduce import _fmt, _mean_std, lower_is_better


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_run(spec: str) -> tuple[str, str, dict]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[1] not in STUDENT_METHODS:
        raise argparse.ArgumentTypeError(f"expected LABEL:METHOD[:k=v,...] with METHOD in {STUDENT_METHODS}: {spec}")
    overrides = {}
    if len(parts) == 3 and parts[2]:
        for kv in parts[2].split(","):
            k, v = kv.split("=", 1)
            overrides[k.strip()] = _value(v.strip())
    return parts[0], parts[1], overrides


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory of a reproduce run made with --keep-work")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--problem", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the preset's seeds")
    ap.add_argument("--run", action="append", type=parse_run, required=True)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    preset = get_preset(args.preset)
    pp = next(p for p in preset["problems"] if p["name"] == args.problem)
    seeds = args.seeds if args.seeds is not None else pp["seeds"]
    out = Path(args.out)
    for s in seeds:
        if not (out / "work" / f"{pp['name']}_ref_seed{s}.pt").exists():
            raise SystemExit(f"missing {out}/work/{pp['name']}_ref_seed{s}.pt: run reproduce with --keep-work")
    tasks = [(label, method, ov, s) for label, method, ov in args.run for s in seeds]
    t0 = time.perf_counter()
    if args.workers > 0:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            res = pool.starmap(jobs.distill_job, [(pp, str(out), m, s, ov, label) for label, m, ov, s in tasks])
    else:
        res = [jobs.distill_job(pp, str(out), m, s, ov, label) for label, m, ov, s in tasks]

    path = out / "ablations.json"
    store = json.loads(path.read_text()) if path.exists() else {}
    prob = store.setdefault(args.problem, {})
    lines = []
    for label, method, ov in args.run:
        rows = [r for r in res if r["label"] == label]
        metrics = {}
        for steps in ("1", "2", "4"):
            names = rows[0]["metrics"][steps].keys()
            metrics[steps] = {k: _mean_std([r["metrics"][steps][k] for r in rows]) for k in names}
        prob[label] = {"method": method, "overrides": ov, "seeds": seeds, "metrics": metrics,
                       "per_seed": [{"seed": r["seed"], "metrics": r["metrics"], "log_last": r["log"][-1]}
                                    for r in rows]}
        names = sorted(metrics["1"])
        if not lines:
            lines.append(f"{'label':<28}{'steps':>6}" + "".join(
                f"{n + ('↓' if lower_is_better(args.problem, n) else '↑'):>18}" for n in names))
        for steps in ("1", "2", "4"):
            lines.append(f"{label:<28}{steps:>6}" + "".join(f"{_fmt(metrics[steps][n]):>18}" for n in names))
    path.write_text(json.dumps(store, indent=1))
    print(f"[{args.problem}] {len(tasks)} distillation runs, seeds {seeds}, {time.perf_counter() - t0:.1f}s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
