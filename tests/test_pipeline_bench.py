"""`make bench-preprocess` output: the JSON carries every ratio the goals are judged by, computed from the
per-configuration results (values below derived by hand from the inputs)."""
from __future__ import annotations

import json

import pytest

from pipelines.preprocess.bench import goals, save, table


def result(workers: int, wall_s: float, compute_s: float, startup: float) -> dict:
    return {"workers": workers, "assets": 8, "render_workers": "warm", "done": 8, "failed": 0, "wall_s": wall_s,
            "assets_per_hour": 8 / wall_s * 3600, "compute_s": compute_s,
            "efficiency": compute_s / (wall_s * workers), "own_cpu_s": compute_s / 2, "own_share": 0.5,
            "blender_startup_share": startup,
            "stage_mean_s": {"download": 0.01, "render": 3.0, "voxelize": 0.2, "features": 0.5, "encode": 0.4,
                             "write": 0.02}}


def test_bench_json_has_the_ratio_fields(tmp_path):
    results = [result(1, 40.0, 36.0, 0.5), result(2, 25.0, 40.0, 0.01)]
    save(tmp_path, results)
    doc = json.loads((tmp_path / "bench.json").read_text())
    rat = doc["ratios"]
    assert rat["speedup"] == pytest.approx(1.6) and rat["speedup_goal"] == 1.8
    assert rat["speedup_workers"] == [1, 2]
    assert rat["streaming_efficiency"] == {"1": pytest.approx(0.9), "2": pytest.approx(0.8)}
    assert rat["efficiency_goal"] == 0.9
    assert rat["blender_startup_share"] == {"1": 0.5, "2": 0.01}
    assert rat["own_share_of_core_time"] == {"1": 0.5, "2": 0.5}
    assert rat["assets_per_hour"] == {"1": pytest.approx(720.0), "2": pytest.approx(1152.0)}
    assert doc["results"] == results
    text = goals(rat)
    assert "1.60x (goal >= 1.8x: below)" in text and "2 worker(s): 0.80 (goal >= 0.9: below)" in text
    assert "1 worker(s): 0.90 (goal >= 0.9: meets)" in text
    assert "| 2 | 0.01 | 3.00 | 0.20 | 0.50 | 0.40 | 0.02 | 25.0 | 1152 | 0.80 | 0.50 | 0.010 |" in table(results)
