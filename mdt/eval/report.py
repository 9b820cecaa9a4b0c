"""Per-sampler evaluation summary: aggregation of per-sample measurements, the Table-2-style Markdown table, the
"worse with more steps" flags and a metrics-vs-NFE plot. Plain data in, plain data out (no I/O but the plot).

A sampler row (dict) carries: `sampler`, `kind` (teacher | student), `steps`, `nfe`, `fd_incep`, `fd_dinov2`,
`chamfer`, `fscore`, `iou` (with the conditioning asset), `mse_ref` / `iou_ref` (to the reference sampler's sample
from the same noise and condition), `latency_s` (warm median per asset, all stages) and `speedup`; for the full
two-stage chain also `fd_incep_asset`, `fd_dinov2_asset`, `chamfer_asset`, `fscore_asset` (of the decoded
Gaussians against the ground-truth assets).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .distribution import frechet_distance

# metric -> (column title, higher is better, format)
COLUMNS = {
    "nfe": ("NFE", None, "{:d}"),
    "fd_incep_asset": ("FD_incep asset ↓", False, "{:.3f}"),
    "fd_dinov2_asset": ("FD_dinov2 asset ↓", False, "{:.3f}"),
    "chamfer_asset": ("CD asset ↓", False, "{:.4f}"),
    "fscore_asset": ("F-score asset ↑", True, "{:.3f}"),
    "fd_incep": ("FD_incep ↓", False, "{:.3f}"),
    "fd_dinov2": ("FD_dinov2 ↓", False, "{:.3f}"),
    "chamfer": ("CD ↓", False, "{:.4f}"),
    "fscore": ("F-score ↑", True, "{:.3f}"),
    "iou": ("IoU cond ↑", True, "{:.3f}"),
    "mse_ref": ("MSE to ref ↓", False, "{:.4f}"),
    "iou_ref": ("IoU to ref ↑", True, "{:.3f}"),
    "latency_ms": ("latency ms ↓", False, "{:.1f}"),
    "speedup": ("speed-up", None, "{:.1f}x"),
}
# the quality metrics checked for a student that gets worse with more steps (with the tolerance that counts)
REGRESSION_CHECKS = {"iou": 0.01, "iou_ref": 0.01, "mse_ref": 0.0, "fd_incep": 0.0, "fd_dinov2": 0.0,
                     "chamfer": 0.0, "fscore": 0.01, "fd_incep_asset": 0.0, "fd_dinov2_asset": 0.0,
                     "chamfer_asset": 0.0, "fscore_asset": 0.01}
# a re-noised sample is no longer a function of its noise alone, so its distance to the reference sample of the
# same noise grows with the number of re-noisings whatever its quality: not a regression of that rule
PAIRED_METRICS = ("iou_ref", "mse_ref")
RENOISED_MULTISTEP_REASON = (
    "the re-noised rule trades the 1-step map's errors for those of the student at intermediate times, where it "
    "was trained less")
STUDENT_MULTISTEP_REASON = (
    "the Euler rule: an MDT-dist student learns the average velocity from t to 0, and Euler sub-steps apply that "
    "average over shorter intervals, which leaves the data distribution at 2 and 4 steps even for the exact student "
    "(tests/test_distill_math.py); the re-noised rule (sampler student_rule: consistency) does not")


def fd(features_gen: np.ndarray, features_ref: np.ndarray) -> float:
    """Fréchet distance between two feature sets [N, D]; NaN with fewer than two samples in either set."""
    if len(features_gen) < 2 or len(features_ref) < 2:
        return float("nan")
    return frechet_distance(features_gen, features_ref)


def add_speedup(rows: list[dict], reference: str) -> None:
    ref = next((r for r in rows if r["sampler"] == reference), None)
    for r in rows:
        lat = r.get("latency_s")
        r["latency_ms"] = 1000.0 * lat if lat is not None else float("nan")
        r["speedup"] = (ref["latency_s"] / lat) if (ref and lat and ref.get("latency_s")) else float("nan")


def _worse(metric: str, before: float, after: float) -> bool:
    higher_better = COLUMNS[metric][1]
    if before is None or after is None or math.isnan(before) or math.isnan(after):
        return False
    tol = REGRESSION_CHECKS[metric]
    return after < before - tol if higher_better else after > before * (1 + 1e-3) + tol


def flag_regressions(rows: list[dict], reason: str = STUDENT_MULTISTEP_REASON) -> list[str]:
    """Mark student rows whose quality is worse than with fewer steps of the same sampling rule (`row["flag"]`;
    the 1-step sample is the same under both rules and starts each rule's sequence; re-noised rows are not checked
    on the paired metrics); returns the notes."""
    notes = []
    pairs = []
    for rule in ("euler", "consistency"):
        students = sorted((r for r in rows if r["kind"] == "student"
                           and (r["steps"] == 1 or r.get("student_rule", "euler") == rule)), key=lambda r: r["steps"])
        pairs += [(p, c) for p, c in zip(students, students[1:]) if c.get("student_rule", "euler") == rule]
    for prev, cur in pairs:
        renoised = cur.get("student_rule", "euler") == "consistency"
        checks = [m for m in REGRESSION_CHECKS if not (renoised and m in PAIRED_METRICS)]
        worse = [m for m in checks if m in cur and m in prev and _worse(m, prev[m], cur[m])]
        if worse:
            detail = ", ".join(f"{COLUMNS[m][0].rstrip(' ↓↑')} {prev[m]:.3g} -> {cur[m]:.3g}" for m in worse)
            cur["flag"] = f"worse than {prev['steps']}-step: {detail}"
            why = RENOISED_MULTISTEP_REASON if renoised else reason
            notes.append(f"{cur['sampler']}: worse than {prev['sampler']} ({detail}); likely reason: {why}")
    return notes


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    cols = [c for c in (columns or COLUMNS) if any(c in r for r in rows)]
    head = ["sampler"] + [COLUMNS[c][0] for c in cols] + ["flag"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["sampler"]]
        for c in cols:
            v = r.get(c)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("–")
            else:
                cells.append(COLUMNS[c][2].format(int(v) if COLUMNS[c][2] == "{:d}" else v))
        cells.append("⚠ " + r["flag"] if r.get("flag") else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_metrics(rows: Sequence[dict], path: str, metrics: Sequence[str] = (
        "fd_incep_asset", "fd_dinov2_asset", "chamfer_asset", "fd_incep", "fd_dinov2", "iou", "chamfer",
        "latency_ms")) -> str:
    """One panel per metric: value vs NFE, a line per sampler kind (teacher, student). Writes a PNG."""
    import matplotlib  # heavy: matplotlib, PIL

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib, PIL

    metrics = [m for m in metrics if any(np.isfinite(r.get(m, float("nan"))) for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for kind, style in (("teacher", "o-"), ("student", "s--")):
            rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["nfe"])
            if rs:
                ax.plot([r["nfe"] for r in rs], [r.get(m, float("nan")) for r in rs], style, label=kind)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE")
        ax.set_title(COLUMNS[m][0])
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
