"""Whether the MLflow store rank 0 logs to is the one the user looks at. Rank 0 runs on any
node of the Ray cluster: a store in a node's own files (sqlite, a folder) or a server on a
node's loopback address is a different store on every node, and the run would vanish into
the node rank 0 happened to land on. Ray-free: launch/cluster_tracking.py asks the cluster."""
from __future__ import annotations

import ipaddress
from urllib.parse import urlparse

from ..artifacts.storage import redact

FILE_SCHEMES = ("", "file", "sqlite")  # "" is a plain path, as MLflow takes one
WORKSPACES = ("databricks", "databricks-uc")  # MLflow's names for a hosted tracking service
SERVER_HINT = ("an MLflow tracking server every node reaches (e.g. http://<head address>:5000 from `mlflow server "
               "--host 0.0.0.0 --port 5000 ...` on the head), or a database server by a routable name; set it as "
               "tracking.uri (--set tracking.uri=...) or MLFLOW_TRACKING_URI in the job's environment "
               "(runtime_env env_vars, or on every node); see docs/mlflow.md")


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def store_kind(uri: str) -> str:
    """"file" (a store in the logging node's own files, the embedded default included),
    "loopback" (a server on the logging node's own loopback address) or "shared"."""
    if not uri:
        return "file"
    if uri in WORKSPACES:
        return "shared"
    parsed = urlparse(uri)
    if parsed.scheme.lower() in FILE_SCHEMES or len(parsed.scheme) == 1:  # C:\... on Windows
        return "file"
    try:
        host = parsed.hostname
    except ValueError:
        host = None
    return "loopback" if _loopback(host) else "shared"


def check_reach(uris: dict[str, str], one_host: bool, why: str) -> None:
    """uris: where rank 0 may run (a node, or "nodes the autoscaler adds") -> the URI it would
    log to there ("" for the embedded store). Raises ValueError naming the first URI that is
    not one store for all: a file store always, a loopback server unless every node is on
    this host (one machine: one loopback)."""
    for where, uri in uris.items():
        kind = store_kind(uri)
        if kind == "shared" or (kind == "loopback" and one_host):
            continue
        shown = repr(redact(uri)) if uri else "'' (the embedded sqlite store under ./mlruns of that node)"
        what = ("a store in that node's own files" if kind == "file" else
                "a server on that node's own loopback address")
        raise ValueError(
            f"tracking.uri / MLFLOW_TRACKING_URI={shown} on {where} is out of range: the training workers may run "
            f"on another node than this driver ({why}), and rank 0 would log to {what}, a store nobody looking at "
            f"the head's MLflow would see; allowed: {SERVER_HINT}")
