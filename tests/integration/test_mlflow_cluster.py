"""MLflow on a Ray cluster of two nodes (ray.cluster_utils.Cluster on one machine): a store
in a node's own files is refused on the driver before any worker starts, with a message
saying what to set; a tracking server named only in the nodes' environment (as a secret
mounted on the nodes) takes the run, though the driver names none."""
import json
import urllib.request

import pytest

from vdvae_dist.config import load
from vdvae_dist.data.shardwriter import build

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nodes(mlflow_server, tmp_path_factory):
    """Two Ray nodes whose environment names the MLflow server; the shards to train on."""
    import ray
    from ray.cluster_utils import Cluster

    nodes_env = {"MLFLOW_TRACKING_URI": mlflow_server}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "env_vars": nodes_env})
    cluster.add_node(num_cpus=2, env_vars=nodes_env)
    ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}})
    shards = tmp_path_factory.mktemp("shards")
    build("skimage:12", str(shards), 32, val=16, shard_bytes=30_000, progress=False)
    try:
        yield shards
    finally:
        ray.shutdown()
        cluster.shutdown()


def _cfg(shards, out, *extra):
    return load("tiny", overrides=["scaling.workers=2", "optim.batch_size=8", "optim.total_steps=2",
                                   "train.log_every=1", "train.checkpoint_every=2", f"train.output={out}",
                                   f"data.shards={shards}", "data.source=", "data.loader_workers=0",
                                   "data.shuffle_buffer=8", "train.grid_samples=4", *extra])


def _train_workers() -> int:
    from ray.util.state import list_actors

    return len([a for a in list_actors() if "RayTrainWorker" in a.class_name])


def test_a_store_in_a_nodes_own_files_is_refused_before_any_worker_starts(two_nodes, tmp_path, monkeypatch):
    from vdvae_dist.launch.ray_train import train_distributed

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workers = _train_workers()
    for uri in (f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "mlruns")):
        with pytest.raises(ValueError) as refused:
            train_distributed(_cfg(two_nodes, tmp_path / "run", f"tracking.uri={uri}"))
        message = str(refused.value)
        assert f"MLFLOW_TRACKING_URI='{uri}' on every node is out of range" in message
        assert "the Ray cluster has 2 alive nodes" in message and "a store in that node's own files" in message
        assert "allowed: an MLflow tracking server every node reaches" in message and "tracking.uri" in message
    assert _train_workers() == workers  # refused on the driver: no worker was started
    assert not (tmp_path / "mlflow.db").exists()


def test_a_server_named_in_the_nodes_environment_takes_the_run(two_nodes, mlflow_server, tmp_path, monkeypatch):
    from vdvae_dist.launch.ray_train import train_distributed

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the driver knows no server
    monkeypatch.chdir(tmp_path)  # where an embedded store would appear
    summary = train_distributed(_cfg(two_nodes, tmp_path / "run", "tracking.experiment=test-two-nodes"))
    assert summary["step"] == 2
    query = f"{mlflow_server}/api/2.0/mlflow/runs/get?run_id={summary['mlflow_run_id']}"
    run = json.loads(urllib.request.urlopen(query, timeout=10).read())["run"]
    assert run["info"]["status"] == "FINISHED"
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["world_size"] == "2"
    assert not (tmp_path / "mlruns").exists()  # nothing went to a store of the driver's node
