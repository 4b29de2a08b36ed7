"""`python jobs/serve.py` (= `vdvae-dist serve`) in its own process with its own local Ray:
serves a run over HTTP with the --set overrides applied, stopped by its process group."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port, wait_for_http
from vdvae_dist.config import load

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).parents[2]


def test_serve_command_serves_a_run(tmp_path):
    from vdvae_dist.train.local import train_local

    cfg = load("tiny", overrides=["data.crops_per_image=8", "optim.total_steps=4", "optim.batch_size=4",
                                  f"train.output={tmp_path / 'run'}", "data.loader_workers=0", "train.grid_samples=4"])
    train_local(cfg, log=lambda *_: None)
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "jobs/serve.py", "--model", f"file://{tmp_path / 'run'}", "--address",
                             "local", "--port", str(port), "--set", "serve.max_n=4"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(url + "/healthz", timeout_s=180, ok_only=True)  # the proxy answers 404/503 until the app is up
        assert requests.get(url + "/info", timeout=30).json()["step"] == 4
        r = requests.post(url + "/sample", json={"n": 4, "seed": 1}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        r = requests.post(url + "/sample", json={"n": 5}, timeout=60)
        assert r.status_code == 422 and r.json()["allowed"] == "1..4"  # --set reached the service
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # only the process group this test started
        proc.communicate(timeout=60)


def test_serve_command_refuses_a_missing_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vdvae_dist.cli", "serve", "--model", str(tmp_path / "none"),
                          "--set", "serve.port=0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "serve.port" in out.stderr and "1..65535" in out.stderr
