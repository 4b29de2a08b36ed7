"""The serving process: starts Serve's HTTP proxies, deploys the app (`app.py`) and serves
until SIGINT or SIGTERM, then stops what it started, each step bounded in time.

`run` deploys and (blocking) waits for a signal; `stop_ray` (with core.ray_private's
`started_ray_here`) lets the caller (`vdvae-dist serve`, `jobs/serve.py`) take down Ray
afterwards without hanging on a cluster that is already dying.
"""
import os
import signal
import threading
import time

from ray import serve

from ..config import RunConfig
from ..core.ray_private import running_serve_http
from .app import APP_NAME, build
from .requests import redact_uri

LOOPBACK = ("127.0.0.1", "localhost", "::1")
STOP_TIMEOUT_S = 15.0  # longest wait for Serve to stop after SIGINT/SIGTERM


def check_local_model(uri: str) -> None:
    """Before Ray starts: a model on a local path (or file://) that is not there is refused
    at once (the replicas would each fail to load it, after Ray and Serve had started).
    Other URIs (s3://, gs://, http(s)://, MLflow's) are read by the replicas themselves."""
    from pathlib import Path

    from ..artifacts.run_folder import EXPORT_NAME

    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" in path or path.startswith(("runs:/", "models:/")):
        return
    if not Path(path).exists():
        raise ValueError(f"model URI {redact_uri(uri)!r} does not exist; allowed: an {EXPORT_NAME} (or a run folder "
                         "holding one) on a path, file://, s3:// or gs://, or an MLflow runs:/ or models:/ URI")


def start_serve(host: str, port: int) -> bool:
    """Start Serve's HTTP proxies on host:port; True if this call started Serve. A Serve
    instance already running on the cluster with other HTTP options is an error (Serve
    itself would ignore the new ones and keep the old address)."""
    have = running_serve_http()
    if have is None:
        serve.start(http_options={"host": host, "port": port})
        return True
    if have != (host, port):
        raise ValueError(f"Serve already runs on this Ray cluster with HTTP on {have[0]}:{have[1]}, not on "
                         f"serve.host:serve.port = {host}:{port} as asked; allowed: --host {have[0]} --port "
                         f"{have[1]} (the running instance), or stop it first (`serve shutdown`)")
    return False


def run(model_uri: str, cfg: RunConfig, blocking: bool = True, stop_serve: bool = True) -> str:
    """Start Serve's HTTP proxy on serve.host:serve.port and deploy; returns the base URL.
    Blocking (main thread): serves until SIGINT or SIGTERM, then returns; with stop_serve it
    first deletes the app, and stops Serve if this call started it, so the port closes (for
    a cluster that outlives this process; a local cluster this process started goes down
    with `ray.shutdown()`, which is quicker and works even when the signal went to the
    cluster's processes as well). A second signal exits at once."""
    s = cfg.serve
    url = f"http://{s.host}:{s.port}"
    if not blocking:
        start_serve(s.host, s.port)
        serve.run(build(model_uri, cfg), name=APP_NAME, route_prefix="/", blocking=False)
        return url
    started: bool | None = None  # unknown until start_serve returns
    previous = {sig: signal.signal(sig, _stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    stopping = False
    try:
        started = start_serve(s.host, s.port)
        serve.run(build(model_uri, cfg), name=APP_NAME, route_prefix="/", blocking=False)
        if s.host not in LOOPBACK and not s.auth_token_env:
            print(f"warning: serving on {s.host} without authentication; set serve.auth_token_env to the name of "
                  "an environment variable holding a bearer token", flush=True)
        print(f"serving {redact_uri(model_uri)} at {url} (POST /sample, POST /reconstruct, GET /info, /healthz, "
              "/docs)", flush=True)
        while True:
            time.sleep(3600)
    except StopSignal as e:
        stopping = True  # from now on a further signal exits at once (_stop_signal)
        print(f"{signal.Signals(e.signum).name}: stopping the service", flush=True)
        if not stop_serve:
            return url

        def stop():
            if started:
                serve.shutdown()
            elif started is False:  # someone else's Serve instance: only our app
                serve.delete(APP_NAME)

        if not call_with_timeout(stop, STOP_TIMEOUT_S):
            print(f"Serve did not stop within {STOP_TIMEOUT_S:g} s", flush=True)
    finally:
        if not stopping:  # an error while starting: the caller's handlers again
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return url


def stop_ray(timeout_s: float = 10.0) -> bool:
    """ray.shutdown(), bounded; False if the cluster was already gone or the shutdown did not
    return within timeout_s (after a SIGTERM to the whole process group, a local cluster's
    raylet drains and the driver's disconnect waits on it). The caller then exits at once: a
    local cluster's processes die with this process (Ray starts them fate-sharing)."""
    import ray

    from ..core.ray_connect import listening

    if not ray.is_initialized():
        return True
    if not listening(ray.get_runtime_context().gcs_address, timeout_s=0.5):
        return False
    return call_with_timeout(ray.shutdown, timeout_s)


class StopSignal(BaseException):
    """SIGINT or SIGTERM while serving (a BaseException, like KeyboardInterrupt: it
    interrupts whatever the main thread does, deploying included)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_signal(signum, frame):
    for sig in (signal.SIGINT, signal.SIGTERM):  # the next one exits at once
        signal.signal(sig, lambda signum, frame: os._exit(128 + signum))
    raise StopSignal(signum)


def call_with_timeout(fn, timeout_s: float) -> bool:
    """Run fn in a daemon thread; False if it did not return within timeout_s (it is left
    behind: a teardown talking to a dying cluster must not hold the process)."""
    done = threading.Event()
    errors: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as e:  # reported, not raised: the caller is shutting down anyway
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=target, daemon=True, name="serve-stop").start()
    if not done.wait(timeout_s):
        return False
    if errors:
        print(f"while stopping: {type(errors[0]).__name__}: {errors[0]}", flush=True)
    return True
