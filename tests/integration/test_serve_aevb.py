"""An AEVB model (the 2013 baseline) behind the same Serve app over real HTTP: the model
interface both kinds implement is what the service relies on."""
import io

import numpy as np
import pytest
import requests
import torch

from tests.conftest import free_port, wait_for_http
from vdvae_dist.artifacts.run_folder import EXPORT_NAME
from vdvae_dist.artifacts.weights import export_dict
from vdvae_dist.config import load, to_dict
from vdvae_dist.model import build_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_an_aevb_model_serves_samples_and_reconstructions(tmp_path):
    import ray
    from ray import serve

    from vdvae_dist.serve.process import run

    cfg = load("mnist-small", overrides=["model.kind=aevb"])
    torch.manual_seed(0)
    torch.save(export_dict(to_dict(cfg), build_model(cfg.model).state_dict(), 3), tmp_path / EXPORT_NAME)
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        url = run(str(tmp_path), load("mnist-small", overrides=["serve.host=127.0.0.1", f"serve.port={port}"]),
                  blocking=False)
        wait_for_http(url + "/healthz", timeout_s=120, ok_only=True)
        info = requests.get(url + "/info", timeout=30).json()
        assert info["latent_groups"] == 1 and info["image_shape"] == [1, 28, 28] and info["step"] == 3

        def sample(seed):
            r = requests.post(url + "/sample", json={"n": 2, "seed": seed, "format": "npy"}, timeout=60)
            assert r.status_code == 200, r.text
            return np.load(io.BytesIO(r.content), allow_pickle=False)

        a, b = sample(5), sample(5)
        assert a.shape == (2, 1, 28, 28) and a.dtype == np.uint8 and np.array_equal(a, b)
    finally:
        serve.shutdown()
        ray.shutdown()
