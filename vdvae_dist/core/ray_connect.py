"""Connecting to Ray without hanging on a dead cluster.

`ray.init()` with no address joins the cluster `ray start` last recorded on this machine.
If that cluster died without `ray stop` (a crash, a killed head), the record stays and
ray.init retries it forever. An explicit address, or RAY_ADDRESS (set for `ray job
submit` drivers), is used as given; a recorded address is used only if something
listens there, otherwise we say so and start a local instance.
"""
from __future__ import annotations

import os
import socket

from .ray_private import ray_address_file


def recorded_address() -> str | None:
    path = ray_address_file()  # the file ray.init() itself reads
    if path is None or not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def listening(address: str, timeout_s: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def init_ray(address: str | None = None, log=print, **kwargs) -> None:
    import ray

    if address is None and not os.environ.get("RAY_ADDRESS"):
        recorded = recorded_address()
        if recorded and not listening(recorded):
            log(f"ignoring the Ray cluster recorded at {recorded} (nothing listens there; stale since a "
                "`ray start` head died without `ray stop`); starting a local Ray instance")
            address = "local"
    ray.init(address=address, **kwargs)
