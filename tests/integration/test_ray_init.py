"""A stale `ray start` record must not hang the job: it starts a local Ray instead."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def test_stale_recorded_cluster_falls_back_to_a_local_instance():
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        os.makedirs(os.path.join(temp, "ray"))
        dead = f"127.0.0.1:{free_port()}"
        Path(temp, "ray", "ray_current_cluster").write_text(dead)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=temp, RAY_AUTH_MODE="disabled")
        code = ("import ray; from vdvae_dist.core.ray_connect import init_ray; "
                "init_ray(num_cpus=1, include_dashboard=False); "
                "print('started', ray.get_runtime_context().gcs_address); ray.shutdown()")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"ignoring the Ray cluster recorded at {dead}" in out.stdout
        assert "started " in out.stdout and dead not in out.stdout.split("started ", 1)[1]
    finally:
        subprocess.run(["pkill", "-f", temp], check=False)  # anything of that local instance left behind
        shutil.rmtree(temp, ignore_errors=True)
