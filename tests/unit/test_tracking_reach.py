"""Which tracking URIs reach one MLflow store from every node (tracking/reach.py) and when
the driver decides the workers may run elsewhere (launch/cluster_tracking.py)."""
import pytest

from vdvae_dist.config import load
from vdvae_dist.launch.cluster_tracking import why_workers_may_leave
from vdvae_dist.tracking.reach import check_reach, store_kind


@pytest.mark.parametrize("uri, kind", [
    ("", "file"), ("sqlite:////tmp/mlruns/mlflow.db", "file"), ("file:///tmp/mlruns", "file"), ("mlruns", "file"),
    ("/abs/mlruns", "file"), ("http://127.0.0.1:5000", "loopback"), ("http://localhost:5000", "loopback"),
    ("https://[::1]:5000", "loopback"), ("http://0.0.0.0:5000", "loopback"),
    ("postgresql://u:p@127.0.0.1/mlflow", "loopback"), ("http://10.0.0.5:5000", "shared"),
    ("https://alice:s3cret@mlflow.example.com", "shared"), ("databricks", "shared"), ("databricks://profile", "shared"),
    ("postgresql://u:p@db.internal/mlflow", "shared")])
def test_store_kind(uri, kind):
    assert store_kind(uri) == kind


def test_a_loopback_server_is_one_store_only_when_every_node_is_on_this_host():
    check_reach({"node a": "http://127.0.0.1:5000", "node b": "http://127.0.0.1:5000"}, one_host=True, why="2 nodes")
    with pytest.raises(ValueError, match=r"MLFLOW_TRACKING_URI='http://127.0.0.1:5000' on node b is out of range: "
                                         r".*\(2 nodes\).*own loopback address.*allowed: an MLflow tracking server"):
        check_reach({"node a": "http://10.0.0.5:5000", "node b": "http://127.0.0.1:5000"}, one_host=False,
                    why="2 nodes")


def test_file_stores_and_no_uri_are_refused_even_on_one_host_without_credentials():
    with pytest.raises(ValueError, match=r"='' \(the embedded sqlite store under ./mlruns of that node\) on node a"):
        check_reach({"node a": ""}, one_host=True, why="2 nodes")
    with pytest.raises(ValueError, match="own files") as refused:
        check_reach({"every node": "file:///shared/mlruns"}, one_host=True, why="2 nodes")
    assert "set it as tracking.uri" in str(refused.value) and "MLFLOW_TRACKING_URI in the job's environment" in str(
        refused.value)
    with pytest.raises(ValueError) as refused:
        check_reach({"every node": "http://alice:s3cret@localhost:5000"}, one_host=False, why="2 nodes")
    assert "s3cret" not in str(refused.value) and "http://***@localhost:5000" in str(refused.value)
    check_reach({"every node": "https://alice:s3cret@mlflow.example.com"}, one_host=False, why="2 nodes")


def test_workers_may_leave_the_drivers_node_on_several_nodes_or_when_it_cannot_hold_them():
    cfg = load("tiny", overrides=["scaling.workers=2", "scaling.cpus_per_worker=2"])
    here = {"NodeID": "a", "Resources": {"CPU": 4.0}}
    assert why_workers_may_leave(cfg, [here], "a") is None
    assert why_workers_may_leave(cfg, [here, {"NodeID": "b", "Resources": {"CPU": 4.0}}], "a") == \
        "the Ray cluster has 2 alive nodes"
    small = {"NodeID": "a", "Resources": {"CPU": 3.0}}
    assert "the rest come from nodes the autoscaler adds" in why_workers_may_leave(cfg, [small], "a")
    gpu = load("tiny", overrides=["scaling.workers=2", "scaling.gpus_per_worker=1"])
    assert "0 GPUs" in why_workers_may_leave(gpu, [here], "a")  # a head without GPUs: GPU nodes come later
