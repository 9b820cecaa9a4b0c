"""Preprocessing benchmark: the demo preset's real stages on synthetic assets with 1 and with 2 CPU workers.

    python -m pipelines.preprocess.bench [--assets 8] [--workers 1,2] [--out outputs/bench-preprocess]

"N workers" = the job's process tree pinned to N cores (sched_setaffinity, inherited by Ray's raylet, its
actors and the Blender processes), Ray started with num_cpus=N, and N actors in each compute stage's pool
(render, voxelize, features, encode), one thread each. Each configuration runs in a fresh process with its own
Ray instance and output; the tiny models are created once beforehand and are not timed.

Printed per configuration: time per asset of each stage (mean over assets of the ledger timings: wall seconds
inside the stage, so they include waiting for a core when more actors than cores are busy), the job's wall time
(listing, Ray Data execution, shard commit, manifest, report — Ray startup excluded), assets/hour, and the
streaming efficiency = compute / (wall × workers), where compute is the CPU time actually spent on the pinned
cores during the run (/proc/stat: every stage, Blender included, plus Ray's own work): 1.0 means every worker
computed all the time. Own share: the part of that busy time spent by the job's own processes (its process
tree, /proc/<pid>/stat with the job as child subreaper, so detached warm Blender workers count too); below 1.0
other processes competed for the pinned cores and the timings understate what the machine can do.
Blender start-up share: of the render worker's wall time per asset, the part spent
before the asset is opened (a new Python process and `import bpy` for a cold worker, a fork for a warm one;
`--render-workers cold|warm`, default the preset's). Last lines: the 1 -> N worker speedup and every ratio
next to its goal (speedup >= 1.8, streaming efficiency >= 0.9). JSON (`<out>/bench.json`): the per-configuration
results and `ratios` (the same figures and their goals).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
import shutil
from mdt.config import load_config
from pipelines.preprocess.config import PreprocessConfig, StageResources

ROOT = Path(__file__).resolve().parents[1]
COMPUTE_STAGES = ("render", "voxelize", "features", "encode")


def busy_core_seconds(cores: set[int]) -> float:
    """CPU seconds the given cores have spent not idle since boot (user, nice, system, irq, softirq, steal)."""
    tick = os.sysconf("SC_CLK_TCK")
    busy = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name.startswith("cpu") and name != "cpu" and int(name[3:]) in cores:
                user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in vals[:8])
                busy += user + nice + system + irq + softirq + steal
    return busy / tick


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system, own and of waited-for children) of ``root`` and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))  # ppid, utime..cstime
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo += children.get(pid, [])
    return total / tick


def run_one(workers: int, assets: int, out: Path, tiny: Path, render_workers: str) -> dict:
    """One timed job run (called in a fresh, CPU-pinned process)."""
    from pipelines.preprocess import driver as graph  # heavy: numpy, pyarrow
    from pipelines.preprocess.ledger import Ledger  # heavy: numpy, pyarrow

    pools = 2 + len(COMPUTE_STAGES) * workers  # download + writer + N actors per compute stage
    share = round(workers / pools - 1e-3, 4)  # every actor of every pool fits at once: the stages stream
    overrides = [("sources.specs", [f"synthetic:{assets}"]), ("output", str(out)),
                 ("download.cache_uri", f"{out}/cache"), ("tiny_models", str(tiny)), ("ray.num_cpus", workers),
                 ("resume.enabled", False)]
    if render_workers != "preset":
        overrides.append(("render.warm_workers", render_workers == "warm"))
    cfg = load_config(PreprocessConfig, "demo", overrides, prefix="preprocess_")
    for stage in ("download", "write"):
        cfg.resources[stage] = StageResources(concurrency=1, num_cpus=share)
    for stage in COMPUTE_STAGES:
        cfg.resources[stage] = StageResources(concurrency=workers, num_cpus=share)
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphaned descendants stay in our tree
    graph.absolutize_paths(cfg)
    graph.init_ray(cfg)  # not timed: the wall time below starts at listing
    cores = os.sched_getaffinity(0)
    busy0, own0 = busy_core_seconds(cores), tree_cpu_seconds(os.getpid())
    result = graph.run(cfg, progress_every_s=30)
    compute_s = busy_core_seconds(cores) - busy0
    own_s = tree_cpu_seconds(os.getpid()) - own0
    rep = result.report
    startup = wall = 0.0
    for r in Ledger(cfg.output, result.config_hash).records():
        if r["stage"] == "write" and r["status"] == "done" and r["stats"]:
            t = json.loads(r["stats"]).get("render_timings") or {}
            if t.get("wall_s"):
                startup += t.get("startup", 0.0)
                wall += t["wall_s"]
    return {
        "workers": workers, "assets": assets, "render_workers": "warm" if cfg.render.warm_workers else "cold",
        "done": rep["done"], "failed": rep["failed"], "wall_s": result.wall_s,
        "assets_per_hour": rep["assets_per_hour"], "compute_s": compute_s,
        "efficiency": compute_s / (result.wall_s * workers), "own_cpu_s": own_s,
        "own_share": own_s / compute_s if compute_s else None,
        "blender_startup_share": startup / wall if wall else None,
        "stage_mean_s": {k: v["mean_s"] for k, v in rep["stages"].items()},
    }


SPEEDUP_GOAL = 1.8  # 1 -> 2 workers
EFFICIENCY_GOAL = 0.9


def ratios(results: list[dict]) -> dict:
    """The figures each goal is judged by, from the per-configuration results."""
    a, b = results[0], results[-1]
    return {
        "speedup": a["wall_s"] / b["wall_s"] if len(results) > 1 else None,
        "speedup_workers": [a["workers"], b["workers"]],
        "speedup_goal": SPEEDUP_GOAL,
        "streaming_efficiency": {str(r["workers"]): r["efficiency"] for r in results},
        "efficiency_goal": EFFICIENCY_GOAL,
        "own_share_of_core_time": {str(r["workers"]): r.get("own_share") for r in results},
        "blender_startup_share": {str(r["workers"]): r["blender_startup_share"] for r in results},
        "assets_per_hour": {str(r["workers"]): r["assets_per_hour"] for r in results},
    }


def table(results: list[dict]) -> str:
    stages = list(results[0]["stage_mean_s"])
    head = ("| workers | " + " | ".join(f"{s} s/asset" for s in stages) +
            " | wall s | assets/h | streaming efficiency | own share | Blender start-up share |")
    lines = [head, "|" + "---:|" * (len(stages) + 6)]
    for r in results:
        cells = [f"{r['stage_mean_s'][s]:.2f}" if r["stage_mean_s"][s] is not None else "-" for s in stages]
        share, own = r["blender_startup_share"], r.get("own_share")
        lines.append(f"| {r['workers']} | " + " | ".join(cells) +
                     f" | {r['wall_s']:.1f} | {r['assets_per_hour']:.0f} | {r['efficiency']:.2f} | "
                     f"{'-' if own is None else f'{own:.2f}'} | {'-' if share is None else f'{share:.3f}'} |")
    return "\n".join(lines)


def goals(rat: dict) -> str:
    lines = []
    if rat["speedup"] is not None:
        a, b = rat["speedup_workers"]
        ok = "meets" if rat["speedup"] >= rat["speedup_goal"] else "below"
        lines.append(f"speedup {a} -> {b} workers: {rat['speedup']:.2f}x (goal >= {rat['speedup_goal']}x: {ok})")
    for w, e in rat["streaming_efficiency"].items():
        ok = "meets" if e >= rat["efficiency_goal"] else "below"
        lines.append(f"streaming efficiency, {w} worker(s): {e:.2f} (goal >= {rat['efficiency_goal']}: {ok})")
    return "\n".join(lines)


def save(out: Path, results: list[dict]) -> dict:
    """``<out>/bench.json``: the per-configuration results and their ratios."""
    doc = {"results": results, "ratios": ratios(results)}
    (Path(out) / "bench.json").write_text(json.dumps(doc, indent=2))
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", type=int, default=8)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--out", default="outputs/bench-preprocess")
    p.add_argument("--render-workers", choices=("preset", "warm", "cold"), default="preset",
                   help="Blender workers: the preset's (warm), warm (import bpy once) or cold (once per asset)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one configuration
    p.add_argument("--tiny", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if args.one:
        res = run_one(args.one, args.assets, out / f"workers-{args.one}", Path(args.tiny), args.render_workers)
        (out / f"workers-{args.one}.json").write_text(json.dumps(res, indent=2))
        return 0 if res["done"] == args.assets else 1

    workers = [int(w) for w in args.workers.split(",")]
    cores = sorted(os.sched_getaffinity(0))
    if max(workers) > len(cores):
        p.error(f"{max(workers)} workers asked but this process may use {len(cores)} cores")
    out.mkdir(parents=True, exist_ok=True)
    from mdt.models.zoo import ensure_tiny_preprocess_models  # heavy: PIL, numpy

    tiny = out / "tiny-models"
    ensure_tiny_preprocess_models(str(tiny))
    results = []
    for n in workers:
        with tempfile.TemporaryDirectory() as scratch:

            shutil.rmtree(out / f"workers-{n}", ignore_errors=True)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_AUTH_MODE": "disabled", "TMPDIR": scratch}
            pinned = set(cores[:n])
            print(f"--- {n} worker(s): cores {sorted(pinned)}, {args.assets} synthetic assets", flush=True)
            for attempt in range(2):  # a Ray node that misses its 30 s start-up window on a busy machine
                rc = subprocess.call([sys.executable, "-m", "pipelines.preprocess.bench", "--one", str(n), "--assets",
                                      str(args.assets), "--out", str(out), "--tiny", str(tiny),
                                      "--render-workers", args.render_workers],
                                     cwd=ROOT, env=env, preexec_fn=lambda: os.sched_setaffinity(0, pinned))
                if rc == 0:
                    break
                print(f"the {n}-worker run failed (exit {rc}); {'retrying' if not attempt else 'giving up'}",
                      file=sys.stderr, flush=True)
        if rc != 0:
            print(f"the {n}-worker run failed (exit {rc})", file=sys.stderr)
            return 1
        results.append(json.loads((out / f"workers-{n}.json").read_text()))
    print(f"\nPreprocessing benchmark (preset demo: Blender Cycles CPU renders with {results[0]['render_workers']} "
          "Blender workers, 64³ voxelizer, tiny DINOv2 features, tiny SS/SLat encoders)")
    print(table(results))
    print(goals(save(out, results)["ratios"]))
    print(f"results: {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
