"""`jobs/distill.py --bench`: the one-step breakdown (step vs the sum of its parts, vs a naive step of the same
maths) measured on the ci preset, and the JSON's ratio fields (the Ray Train throughput runs are replaced by
stand-in results here; `make`-level runs measure them)."""
from __future__ import annotations

import math

from _distill_helpers import ci_config, perturbed_teacher, write_tiny_shards


def test_bench_json_has_the_ratio_fields(tmp_path, monkeypatch, capsys):
    from pipelines.distill import driver as distill

    data = write_tiny_shards(tmp_path / "data", n=2)
    teacher = perturbed_teacher(tmp_path / "teacher" / "ss_flow_tiny")
    cfg = ci_config(tmp_path, data, teacher, None, ["data.batch_split=1"])
    rates = {1: 10.0, 2: 17.0}
    monkeypatch.setattr(distill, "start_ray", lambda cfg, need=None: None)
    monkeypatch.setattr(distill, "run", lambda c: distill.DistillResult(
        c.name, "", None, None, None, None, 1.0, None, {"samples_per_s": rates[c.scaling.num_workers]}))
    out = distill.bench(cfg, [1, 2], steps=2)
    r = out["ratios"]
    for key in ("step_vs_sum_of_parts", "step_vs_sum_of_parts_goal_max", "speedup_vs_naive",
                "speedup_vs_naive_goal_min", "workers_speedup"):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
    assert r["workers"] == [1, 2] and r["workers_speedup"] == 1.7
    step = out["step"]
    assert step["teacher_calls_per_step"] > 0 and step["student_calls_with_grad"] > 0
    assert step["naive"] and any("teacher" in k for k in step["naive"])
    assert any("sequential guidance" in k for k in step["naive"])   # the objective guides: two forwards there
    assert step["step_vs_sum_of_parts"] == step["step_ms"] / step["step_ms_estimated_from_parts"]
    printed = capsys.readouterr().out
    assert "step time / sum of its parts" in printed and "vs the naive step" in printed
