"""The distillation job on a simulated 2-node cluster (`ray.cluster_utils.Cluster`): one worker per node
(STRICT_SPREAD), gloo across the two raylets, a few MDT-dist steps to the end with the loss on a fixed batch going
down and the ranks' weights in sync."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from _distill_helpers import ci_config, perturbed_teacher, write_tiny_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_two_node_cluster(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.distill.driver import run

    data = write_tiny_shards(tmp_path / "data", n=4)
    teacher = perturbed_teacher(tmp_path / "teacher" / "ss_flow_tiny")
    if ray.is_initialized():
        ray.shutdown()  # leave the session's shared head alone; this test needs its own two raylets
    # 2 logical CPUs per node: one for the node's training worker, one left for Ray Data's read tasks (Ray Train
    # V2 excludes the workers' resources from Ray Data; a read task needs a whole CPU, so with 1 CPU per node the
    # shard read would wait forever).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        cfg = ci_config(tmp_path, data, teacher, uri, ["name=two-nodes", "train.max_steps=4", "train.ckpt_every=4",
                                                         "scaling.placement_strategy=STRICT_SPREAD",
                                                         "scaling.cpus_per_worker=1"])
        res = run(cfg)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert res.error is None, res.error
    state = json.loads((Path(res.checkpoint) / "state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 2
    assert len(set(state["nodes"])) == 2                 # one worker on each node
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    fixed = [m.value for m in sorted(c.get_metric_history(res.mlflow_run_id, "loss_fixed_batch"), key=lambda m: m.step)]
    assert len(fixed) == 4 and all(math.isfinite(v) for v in fixed)
    assert fixed[-1] < fixed[0]                          # loss on a fixed batch goes down
    assert all(m.value == 0.0 for m in c.get_metric_history(res.mlflow_run_id, "ddp_param_mismatch"))
    assert math.isfinite(json.loads((Path(res.run_dir) / "result.json").read_text())["wall_s"])
