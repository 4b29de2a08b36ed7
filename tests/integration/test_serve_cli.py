"""`python jobs/serve.py` (= `vdvae-dist serve`) in its own process with its own local Ray:
serves a run over HTTP with the --set overrides applied, and stops cleanly (exit 0, port
closed, no traceback) when its process group gets SIGTERM or SIGINT (Ctrl-C)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port, wait_for_http
from vdvae_dist.config import load

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).parents[2]
ENV = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")


def start(argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """The command in its own process group (session), its output in a file (a pipe nobody
    reads while it serves could fill up and block it)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env or ENV, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_until_serving(proc: subprocess.Popen, port: int, log: Path, timeout_s: float = 180) -> None:
    """/healthz answers 200 (the proxy answers 404/503 until the app is up); fails at once if
    the command exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout_s=2, ok_only=True)
            return
        except TimeoutError:
            pass
    raise TimeoutError(f"the service on port {port} did not come up within {timeout_s} s")


def stop_and_check(proc: subprocess.Popen, port: int, sig: signal.Signals, log: Path) -> str:
    """Send sig to the process group this test started; it must exit 0 within 20 s, print no
    traceback, and leave nothing listening on its port (bounds, not timings: they only
    limit how long a hang can last)."""
    os.killpg(proc.pid, sig)
    proc.wait(timeout=20)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out and f"{sig.name}: stopping the service" in out, out[-3000:]
    deadline = time.monotonic() + 10  # a local cluster's workers go down with their raylet
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        assert time.monotonic() < deadline, f"port {port} still open after the service exited"
        time.sleep(0.2)
    return out


def kill_group(proc: subprocess.Popen) -> None:
    """Cleanup (after a failure: leftovers of a clean stop are none): only the process group
    this test started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def test_serve_command_serves_a_run(tmp_path):
    from vdvae_dist.train.local import train_local

    cfg = load("tiny", overrides=["data.crops_per_image=8", "optim.total_steps=4", "optim.batch_size=4",
                                  f"train.output={tmp_path / 'run'}", "data.loader_workers=0", "train.grid_samples=4",
                                  "engine.device=cpu"])
    train_local(cfg, log=lambda *_: None)
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start(["jobs/serve.py", "--model", f"file://{tmp_path / 'run'}", "--address", "local", "--port", str(port),
                  "--set", "serve.max_n=4"], log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(proc, port, log)
        assert requests.get(url + "/info", timeout=30).json()["step"] == 4
        r = requests.post(url + "/sample", json={"n": 4, "seed": 1}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        r = requests.post(url + "/sample", json={"n": 5}, timeout=60)
        assert r.status_code == 422 and r.json()["allowed"] == "1..4"  # --set reached the service
        stop_and_check(proc, port, signal.SIGTERM, log)  # only the process group this test started
    finally:
        kill_group(proc)


def test_ctrl_c_stops_the_serve_command_cleanly(tmp_path):
    """SIGINT to the process group, as Ctrl-C in a terminal sends it."""
    import torch

    from vdvae_dist.artifacts.run_folder import EXPORT_NAME

    from vdvae_dist.artifacts.weights import export_dict
    from vdvae_dist.config import to_dict
    from vdvae_dist.model import build_model

    cfg = load("tiny")
    torch.manual_seed(0)
    torch.save(export_dict(to_dict(cfg), build_model(cfg.model).state_dict(), 2), tmp_path / EXPORT_NAME)
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start(["-m", "vdvae_dist.cli", "serve", "--model", str(tmp_path), "--address", "local", "--port", str(port)],
                 log)
    try:
        wait_until_serving(proc, port, log)
        stop_and_check(proc, port, signal.SIGINT, log)
    finally:
        kill_group(proc)


def test_serve_command_refuses_a_missing_model(tmp_path):
    """A local model that is not there: one clear error naming it, before Ray starts."""
    model = str(tmp_path / "none")
    out = subprocess.run([sys.executable, "-m", "vdvae_dist.cli", "serve", "--model", model, "--address", "local"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"model URI {model!r} does not exist" in out.stderr and "Traceback" not in out.stderr, out.stderr

