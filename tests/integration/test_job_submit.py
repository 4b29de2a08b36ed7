"""`ray job submit` of jobs/train.py to a local Ray head on loopback, stopped by its PID."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, wait_for_http
from vdvae_dist.core.ray_private import ray_address_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).parents[2]


def test_ray_job_submit_runs_the_training_job(tmp_path):
    bin_dir = Path(sys.executable).parent
    # Ray 2.60 enables token authentication by default; this head listens on loopback only
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")  # the job's `python` is this venv's
    port, dashboard = free_port(), free_port()
    record = Path(ray_address_file())  # `ray start` records its address here...
    before = record.read_text() if record.exists() else None
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             "--num-cpus", "4", "--include-dashboard", "true"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{dashboard}/api/version", timeout_s=120)
        # the runtime environment users submit with (cluster/runtime_env.yaml: the code
        # without tests/), on a CPU head with fewer threads
        runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
        assert runtime_env.pop("working_dir") == "."  # --working-dir below: the checkout
        runtime_env["env_vars"].update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
        submit = lambda: subprocess.run(  # noqa: E731
            [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir",
             str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--", "python", "jobs/train.py",
             "--preset", "tiny", "--workers", "2", "--set", "optim.total_steps=4", "--set", "train.checkpoint_every=2",
             "--set", "train.log_every=2", "--set", "data.crops_per_image=12", "--set", "data.shards=runs/shards", "--set", "data.shard_bytes=30000",
             "--set", "data.loader_workers=0", "--set", "train.grid_samples=4"],
            env=env, capture_output=True, text=True, timeout=600)
        out = submit()
        deadline = time.monotonic() + 120
        # the dashboard answers before the head's job agent has registered with it (busy machines)
        while out.returncode and "No available agent to submit job" in out.stderr and time.monotonic() < deadline:
            time.sleep(2)
            out = submit()
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "test bits/dim:" in out.stdout and "after 4 steps" in out.stdout and "2 workers" in out.stdout
        for noise in ("untested optimizer", "built successfully", "Setting accelerator to CPU",
                      "Reporting training result"):  # the stack's lines launch/quiet.py drops
            assert noise not in out.stdout + out.stderr
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # only the head this test started
        head.wait(timeout=60)
        if before is None:  # ...and a killed head leaves it behind: later ray.init() calls would try it
            record.unlink(missing_ok=True)
        else:
            record.write_text(before)
