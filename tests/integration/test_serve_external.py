"""`vdvae-dist serve --address <a running cluster>`: the cluster outlives the command and
Serve's actors are detached, so stopping the command must take down what it started."""
import os
import signal

import pytest
import torch

from tests.conftest import free_port
from tests.integration.test_serve_cli import kill_group, start, stop_and_check, wait_until_serving
from vdvae_dist.artifacts.run_folder import EXPORT_NAME
from vdvae_dist.artifacts.weights import export_dict
from vdvae_dist.config import load, to_dict
from vdvae_dist.model import build_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_ctrl_c_stops_the_service_on_a_cluster_that_outlives_the_command(tmp_path):
    import ray
    from ray import serve

    cfg = load("tiny")
    torch.manual_seed(0)
    torch.save(export_dict(to_dict(cfg), build_model(cfg.model).state_dict(), 2), tmp_path / EXPORT_NAME)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})  # this test's cluster: the command joins it
    proc = None
    try:
        port, log = free_port(), tmp_path / "serve.log"
        proc = start(["-m", "vdvae_dist.cli", "serve", "--model", str(tmp_path), "--address",
                      ray.get_runtime_context().gcs_address, "--port", str(port)], log,
                     env=dict(os.environ, OMP_NUM_THREADS="1"))  # Ray's auth settings as this process's
        wait_until_serving(proc, port, log)
        stop_and_check(proc, port, signal.SIGINT, log)  # exit 0, and the port closed: Serve is gone
        assert serve.status().applications == {}
    finally:
        if proc is not None:
            kill_group(proc)
        serve.shutdown()
        ray.shutdown()
