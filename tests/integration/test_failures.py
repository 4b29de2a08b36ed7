"""Two Ray nodes on one machine; a training worker process is killed mid-run and the run
resumes from its last checkpoint, replays the steps after it with the same losses, and
finishes with the right step count."""
import json
import os
import signal
import threading
import time

import pytest

from vdvae_dist.config import load
from vdvae_dist.data.shardwriter import build

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_killed_worker_resumes_from_the_last_checkpoint_across_two_nodes(tmp_path, mlflow_server):
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from vdvae_dist.launch.ray_train import train_distributed

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}})
    try:
        shards = tmp_path / "shards"
        build("skimage:12", str(shards), 32, val=16, shard_bytes=30_000, progress=False)
        out = tmp_path / "run"
        cfg = load("tiny", overrides=["scaling.workers=2", "scaling.placement=STRICT_SPREAD", "scaling.max_failures=2",
                                      "optim.batch_size=8", "optim.total_steps=20", "train.checkpoint_every=5",
                                      "train.log_every=1", f"train.output={out}", f"data.shards={shards}",
                                      "data.source=", "data.loader_workers=0", "data.shuffle_buffer=8",
                                      "train.grid_samples=4",
                                      # two nodes: a store in a node's own files is refused (docs/mlflow.md)
                                      f"tracking.uri={mlflow_server}"])
        result = {}
        runner = threading.Thread(target=lambda: result.update(train_distributed(cfg)))
        runner.start()
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline:  # wait for two steps past the checkpoint of step 10
            steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()] if metrics.exists() else []
            if steps and max(steps) >= 12:
                break
            time.sleep(0.2)
        workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "RayTrainWorker" in a.class_name]
        assert len(workers) == 2
        os.kill(workers[1].pid, signal.SIGKILL)  # the process, not a Python exception
        runner.join(timeout=600)
        assert result.get("step") == 20
        assert len(result["nodes"]) == 2  # the two workers ran on different nodes
        logged = [json.loads(l) for l in metrics.read_text().splitlines()]
        steps = [m["step"] for m in logged]
        assert steps[-1] == 20
        restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])  # the run went back
        assert steps[restart] > 1 and (steps[restart] - 1) % 5 == 0  # ...to just after a checkpoint
        assert sorted(set(steps)) == list(range(1, 21))
        # the replayed steps continue the interrupted curve: same data, noise and weights
        replayed = [m for m in logged[restart:] if m["step"] in steps[:restart]]
        assert len(replayed) >= 2
        first = {m["step"]: m for m in logged[:restart]}
        for m in replayed:
            assert m["loss"] == pytest.approx(first[m["step"]]["loss"], rel=1e-5)
            assert m["nelbo_nats_per_dim"] == pytest.approx(first[m["step"]]["nelbo_nats_per_dim"], rel=1e-5)
    finally:
        ray.shutdown()
        cluster.shutdown()
