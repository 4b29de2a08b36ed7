"""Every private Ray name the project relies on, in one place, for the one Ray release they
were checked against (CHECKED_RAY; tests/unit/test_ray_private.py fails on another release,
so an upgrade re-checks each of them). Everything else uses Ray's public API.

- the file `ray start` records its address in: ray.init() reads it, but Ray has no public
  way to find it, and a stale record makes ray.init() hang (core/ray_connect.py);
- the loggers Ray Train V2 reports through (its module files, not its module names), quieted
  unless --verbose (launch/worker.py);
- whether this process started the Ray cluster it is connected to (then ray.shutdown() stops
  all of it, Serve included: serve/process.py);
- the HTTP address of the Serve instance already running on the cluster: serve.start() with
  other options silently keeps the old ones, and Serve has no public call that reads them
  (serve/process.py).
"""
from __future__ import annotations

import importlib.util
import logging

CHECKED_RAY = "2.60.0"

# Ray Train V2 modules that log every report and checkpoint at INFO
TRAIN_REPORT_MODULES = ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage")


def ray_address_file() -> str | None:
    """The path of the address record of `ray start` on this machine (it may not exist)."""
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:
        return None
    return get_ray_address_file(None)


def train_report_loggers() -> list[logging.Logger]:
    """The loggers of TRAIN_REPORT_MODULES, by module name and by file name (Ray 2.60 names
    some of them after the file)."""
    found = []
    for module in TRAIN_REPORT_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            found.append(logging.getLogger(spec.origin))
        found.append(logging.getLogger(module))
    return found


def started_ray_here() -> bool:
    """True if this process started the Ray cluster it is connected to (its node is a head
    that ray.init created, not one it joined)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return bool(node is not None and getattr(node, "head", False))


def running_serve_http() -> tuple[str, int] | None:
    """(host, port) of the Serve instance running on the connected cluster, None if none."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    have = client.http_config
    return have.host, have.port
