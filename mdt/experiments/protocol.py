"""The benchmark's fair hyper-parameter protocol: one declared grid per method, selection on validation seeds,
report on disjoint test seeds.

A problem entry of a preset declares (before anything runs):
  grid:       {method: {DistillHP field: [values], ...}} for every distilled method; the configurations are the
              Cartesian product (lr x the method's key knob), and every method must get the same number of them;
  val_seeds:  seeds on which every configuration is distilled and scored (their evaluation sets, noise and
              held-out data are drawn from the seed, so they are disjoint from the test seeds' by construction);
  seeds:      the test seeds (3 in `small`): the selected configuration of each method is distilled again on each
              of them and only these runs are reported;
  selection:  {"metric": primary metric, "steps": step counts averaged} -- the score of a configuration is the
              primary metric averaged over the selection step counts and the validation seeds.
A configuration whose score is not finite (a diverged run) ranks last; ties keep the grid's order.
"""
from __future__ import annotations

import itertools
import math

from .methods import STUDENT_METHODS, DistillHP

SELECTION_STEPS = ("1", "2")


def grid_configs(pp: dict) -> dict[str, list[dict]]:
    """{method: [overrides, ...]} from the problem's declared grid; checks that every distilled method has a grid
    over DistillHP fields, that all grids have the same size and that validation and test seeds are disjoint."""
    grid = pp.get("grid")
    if not grid or set(grid) != set(STUDENT_METHODS):
        raise ValueError(f"{pp['name']}: the grid must declare exactly the methods {STUDENT_METHODS}")
    fields = set(DistillHP.__dataclass_fields__)
    out = {}
    for method in STUDENT_METHODS:
        axes = grid[method]
        unknown = set(axes) - fields
        if unknown:
            raise ValueError(f"{pp['name']}/{method}: grid keys {sorted(unknown)} are not DistillHP fields")
        keys = list(axes)
        out[method] = [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]
    sizes = {m: len(c) for m, c in out.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{pp['name']}: every method needs the same number of configurations, got {sizes}")
    if set(pp["val_seeds"]) & set(pp["seeds"]):
        raise ValueError(f"{pp['name']}: validation seeds {pp['val_seeds']} overlap test seeds {pp['seeds']}")
    return out


def config_score(per_seed_metrics: list[dict], metric: str, steps=SELECTION_STEPS) -> float:
    """Mean of `metric` over the selection step counts and the validation runs' metrics ({steps: {metric: v}})."""
    vals = [float(m[s][metric]) for m in per_seed_metrics for s in steps]
    return sum(vals) / len(vals) if all(math.isfinite(v) for v in vals) else float("nan")


def wanted_metrics(known, metrics=None) -> set[str]:
    """The metric names an evaluation computes: all of `known` (a problem's metrics) when `metrics` is None, else
    `metrics` (validation runs need only the selection metric), which must all be known."""
    if metrics is None:
        return set(known)
    unknown = set(metrics) - set(known)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)} (known: {sorted(known)})")
    return set(metrics)


def select(scores: list[float], lower_is_better: bool) -> int:
    """Index of the best score (non-finite scores rank last; the first of equal scores wins)."""
    sign = 1.0 if lower_is_better else -1.0
    keyed = [(sign * s if math.isfinite(s) else math.inf, i) for i, s in enumerate(scores)]
    return min(keyed)[1]
