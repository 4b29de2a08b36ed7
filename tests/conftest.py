import os
import socket
import uuid

import pytest
import torch

# 2-core machines: keep torch from oversubscribing when pytest runs beside other work
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def seeded():
    torch.manual_seed(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout_s: float = 60.0, ok_only: bool = False) -> None:
    """Poll a server started by a test until it answers (any HTTP status counts, or only
    2xx with ok_only, e.g. while an app behind an already listening proxy deploys)."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            if not ok_only:
                return
            time.sleep(0.1)
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer{' with 2xx' if ok_only else ''} within {timeout_s} s")


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1, reached over real HTTP through the
    standard AWS variables, exactly as users reach AWS or any S3-compatible store."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test-key",
           "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)  # s3fs.mkdir sends a constraint moto rejects
    return name


def start_mlflow_server(root, port: int):
    """A real `mlflow server` on 127.0.0.1:port with its store under root; returns the process
    once it answers /health."""
    import subprocess
    import sys

    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--backend-store-uri", f"sqlite:///{root}/db.sqlite",
                             "--default-artifact-root", str(root / "artifacts"), "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_http(f"http://127.0.0.1:{port}/health")
    return proc


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One MLflow tracking server per test module; its URL."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
