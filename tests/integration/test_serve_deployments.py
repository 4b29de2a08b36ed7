"""The Serve config file as Serve users drive it: cluster/serve.yaml (loopback, no GPU, a
tiny model) deployed with Ray's own `serve run --non-blocking` CLI onto a local Ray
cluster, over real HTTP on 127.0.0.1.

- Raising the replica count in the file's `deployments:` block adds a replica and keeps
  the running one (the same replica answers: its weights were not reloaded); changing
  `args` instead replaces every replica (the contrast that shows the check can see it).
- Past max_ongoing_requests per replica and max_queued_requests in the proxy, requests
  are answered 503 at once, with a short body and Retry-After, while the accepted ones
  succeed.
- The batch statistics reach Ray's Prometheus endpoint, tagged with the deployment.
"""
import copy
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
import yaml

from tests.conftest import free_port, wait_for_http
from vdvae_dist.artifacts.run_folder import EXPORT_NAME
from vdvae_dist.artifacts.weights import export_dict
from vdvae_dist.config import load, to_dict
from vdvae_dist.model import build_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).parents[2]
APP, DEPLOYMENT = "vdvae", "VDVAE"


class Cluster:
    """A local Ray cluster exporting its metrics on 127.0.0.1, and the shipped Serve config
    made local: this machine's address, a tiny export, one CPU and no GPU per replica."""

    def __init__(self, root: Path):
        import ray

        self.metrics_port, self.http_port = free_port(), free_port()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _metrics_export_port=self.metrics_port,
                 _system_config={"metrics_report_interval_ms": 1000},  # metrics reach the endpoint within ~1 s
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        self.address = ray.get_runtime_context().gcs_address
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.root = root
        cfg = load("tiny")
        torch.manual_seed(0)
        torch.save(export_dict(to_dict(cfg), build_model(cfg.model).state_dict(), 1), root / EXPORT_NAME)
        spec = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
        spec["http_options"] = {"host": "127.0.0.1", "port": self.http_port}
        (app,) = spec["applications"]
        app["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": "1"}}
        app["args"]["model"] = str(root)
        app["args"]["set"] = [s for s in app["args"]["set"] if not s.startswith("serve.auth_token_env=")]
        (dep,) = app["deployments"]
        dep["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 0}
        self.spec = spec
        self.deploys = 0

    def config(self) -> tuple[dict, dict, dict]:
        """A copy of the local config, its application and its deployment entry."""
        spec = copy.deepcopy(self.spec)
        (app,) = spec["applications"]
        (dep,) = app["deployments"]
        return spec, app, dep

    def deploy(self, spec: dict) -> None:
        """`serve run --non-blocking <file>`: Ray's CLI submits the config and returns."""
        self.deploys += 1
        path = self.root / f"serve-{self.deploys}.yaml"
        path.write_text(yaml.safe_dump(spec))
        serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")
        out = subprocess.run([serve_cli, "run", "--non-blocking", "--address", self.address, str(path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]

    def wait_running(self, replicas: int, timeout_s: float = 180) -> None:
        """The app RUNNING with exactly `replicas` running replicas and none starting or
        stopping (bounds a hang; not a timing)."""
        from ray import serve

        deadline = time.monotonic() + timeout_s
        seen = None
        while time.monotonic() < deadline:
            app = serve.status().applications.get(APP)
            if app is not None:
                dep = app.deployments.get(DEPLOYMENT)
                seen = (app.status, dict(dep.replica_states) if dep else None)
                if seen == ("RUNNING", {"RUNNING": replicas}):
                    wait_for_http(self.url + "/healthz", timeout_s=60, ok_only=True)
                    return
            time.sleep(0.5)
        raise TimeoutError(f"app not RUNNING with {replicas} replica(s) within {timeout_s} s; last: {seen}")

    def replicas_answering(self, expected: int, tries: int = 300) -> dict[str, dict]:
        """replica id -> its /info, from GET /info until `expected` replicas have answered."""
        seen: dict[str, dict] = {}
        for _ in range(tries):
            info = requests.get(self.url + "/info", timeout=30).json()
            seen[info["replica"]] = info
            if len(seen) >= expected:
                break
        return seen

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray import serve

    c = Cluster(tmp_path_factory.mktemp("serve-deployments"))
    try:
        yield c
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_deployments_block_rescales_without_reloading_the_running_replica(cluster):
    spec, app, dep = cluster.config()
    assert dep["autoscaling_config"]["min_replicas"] == 1
    cluster.deploy(spec)  # the shipped file, as is but for the machine
    cluster.wait_running(1)
    (first,) = cluster.replicas_answering(1)

    dep["autoscaling_config"]["min_replicas"] = 2  # what a user edits to serve more
    cluster.deploy(spec)
    cluster.wait_running(2)
    answering = cluster.replicas_answering(2)
    assert len(answering) == 2 and first in answering, (first, list(answering))  # added one, kept the first

    app["args"]["set"] = [*app["args"]["set"], "serve.max_n=8"]  # a change of the app's own settings...
    cluster.deploy(spec)
    deadline = time.monotonic() + 180
    while True:  # ...replaces every replica: each new one loads the weights again
        cluster.wait_running(2)
        answering = cluster.replicas_answering(2)
        if all(info["max_n"] == 8 for info in answering.values()):
            break
        assert time.monotonic() < deadline, answering
    assert first not in answering


def test_requests_over_the_queue_limit_get_a_clean_503_and_the_rest_succeed(cluster):
    """One replica holding at most 2 requests, 2 more queued in the proxy; each batch waits
    2 s for company, so 12 requests sent at once find both full: the excess is refused at
    once, and every accepted request is answered."""
    spec, app, dep = cluster.config()
    app["args"]["set"] = [*app["args"]["set"], "serve.batch_wait_s=2"]
    del dep["autoscaling_config"]
    dep.update(num_replicas=1, max_ongoing_requests=2, max_queued_requests=2)
    cluster.deploy(spec)
    cluster.wait_running(1)

    def call(i):
        return requests.post(cluster.url + "/sample", json={"n": 1, "seed": i, "format": "npy"}, timeout=60)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(call, range(12)))
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 503} and codes.count(200) >= 4, codes  # 2 held by the replica + 2 queued
    for r in responses:
        if r.status_code == 503:
            assert "backpressure" in r.text and len(r.content) < 200, r.text  # Serve's own answer, no trace
            assert r.headers["retry-after"] == "1"
    assert call(99).status_code == 200  # load gone: served again
    deadline = time.monotonic() + 60  # Serve counts them where operators alert on them; bounds a hang
    while _sum(cluster.metrics(), "ray_serve_num_http_requests_total", 'status_code="503"') < codes.count(503):
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_batch_statistics_reach_rays_prometheus_endpoint(cluster):
    """Serve tags them with deployment, replica and application; Ray prefixes `ray_`."""
    cluster.wait_running(1)  # whatever ran before: one replica, so its counters are all there is to read
    before = requests.get(cluster.url + "/info", timeout=30).json()["batching"]["forward_requests"]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: requests.post(cluster.url + "/sample", json={"n": 1, "seed": i},
                                                     timeout=60).status_code, range(8)))
    assert codes.count(200) >= 1
    after = requests.get(cluster.url + "/info", timeout=30).json()["batching"]
    names = ("ray_vdvae_serve_batched_requests_total", "ray_vdvae_serve_batches_total",
             "ray_vdvae_serve_batch_size_bucket", "ray_vdvae_serve_queue_wait_seconds_bucket",
             "ray_vdvae_serve_forward_seconds_count", "ray_vdvae_serve_queued_requests")
    deadline = time.monotonic() + 60  # Ray exports every second here; bounds a hang
    while True:
        text = cluster.metrics()
        batched = _sum(text, "ray_vdvae_serve_batched_requests_total", f'deployment="{DEPLOYMENT}"')
        if batched >= after["forward_requests"] and all(n in text for n in names):
            break
        assert time.monotonic() < deadline, (batched, after, [n for n in names if n not in text])
        time.sleep(0.5)
    assert after["forward_requests"] > before
    assert _sum(text, "ray_vdvae_serve_batch_size_count", f'deployment="{DEPLOYMENT}"') >= after["batches"] > 0
    line = next(x for x in text.splitlines() if x.startswith("ray_vdvae_serve_batch_size_count{"))
    assert f'application="{APP}"' in line and 'replica="' in line


def _sum(text: str, name: str, tag: str) -> float:
    """Sum of a metric's samples (all replicas) that carry `tag`."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and tag in line)
