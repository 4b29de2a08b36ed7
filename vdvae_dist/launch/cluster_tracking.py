"""The driver's check, before any worker starts, that rank 0 will log to one MLflow store
whichever node it lands on (tracking/reach.py says which URIs qualify), and the URI the
driver hands to the workers for when their own environment names none."""
from __future__ import annotations

import os

from ..config import RunConfig
from ..tracking.mlflow_tracker import default_uri
from ..tracking.reach import check_reach


def _tracking_env() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", "")


def why_workers_may_leave(cfg: RunConfig, nodes: list[dict], here: str) -> str | None:
    """Why the workers may run on a node other than the driver's: the cluster has several
    nodes, or the driver's node cannot hold them all (an autoscaler must add nodes); None
    when every worker must run here."""
    if len(nodes) > 1:
        return f"the Ray cluster has {len(nodes)} alive nodes"
    s = cfg.scaling
    have = next((n["Resources"] for n in nodes if n["NodeID"] == here), {})
    cpus, gpus = s.workers * s.cpus_per_worker, s.workers * s.gpus_per_worker
    if have.get("CPU", 0) < cpus or have.get("GPU", 0) < gpus:
        return (f"the driver's node has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs; "
                f"{s.workers} workers need {cpus:g} and {gpus:g}: the rest come from nodes the autoscaler adds")
    return None


def _nodes_tracking_env(nodes: list[dict]) -> dict[str, str]:
    """node id -> MLFLOW_TRACKING_URI as a worker on that node sees it (its environment and
    the job's runtime_env), from one zero-CPU task pinned to each node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_tracking_env)
    refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote() for n in nodes}
    return {node: ray.get(ref, timeout=120) for node, ref in refs.items()}


def workers_tracking_uri(cfg: RunConfig) -> str:
    """The URI handed to the workers (used where neither tracking.uri nor a worker's own
    MLFLOW_TRACKING_URI names one): the driver's tracking.uri or MLFLOW_TRACKING_URI, else,
    when every worker runs on this node, its embedded store. Raises ValueError, before
    training, when workers may run on another node and some node would log to a store of
    its own."""
    import ray

    driver_uri = cfg.tracking.uri or _tracking_env()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    here = ray.get_runtime_context().get_node_id()
    why = why_workers_may_leave(cfg, nodes, here)
    if why is None:
        return driver_uri or default_uri()[0]
    address = {n["NodeID"]: n["NodeManagerAddress"] for n in nodes}
    if cfg.tracking.uri:  # tracking.uri wins on every node
        uris = {"every node": cfg.tracking.uri}
    else:
        uris = {f"node {node[:8]} ({address[node]})": env or driver_uri
                for node, env in _nodes_tracking_env(nodes).items()}
        if len(nodes) == 1:  # the nodes still to come see what the job hands them
            uris["the nodes the autoscaler adds"] = driver_uri
    # several nodes on one host share one loopback; nodes an autoscaler adds are other hosts
    check_reach(uris, one_host=len(nodes) > 1 and len(set(address.values())) == 1, why=why)
    return driver_uri
